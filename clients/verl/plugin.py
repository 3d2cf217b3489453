"""What verl loads to know our integration: a V1 trainer mode, an agent loop, a CPU platform.

verl imports every entry point of the group `verl.plugins` at the end of `import verl`
(`pyproject.toml` declares this module there), and swallows a failing plugin at debug level.
Without the entry point (or with `VERL_USE_EXTERNAL_PLUGINS=none`), the explicit equivalent is
`VERL_USE_EXTERNAL_MODULES=clients.verl.plugin`, which verl imports at the same point. Either
way the plugin runs inside every process that imports verl: the driver, the TaskRunner and
every Ray worker, which is where verl looks names up.

Registering means importing the module whose decorators register. The trainer
(`clients.verl.trainer_v1`) and the agent loop (`clients.verl.agent_loop`) import verl's V1
trainer and agent-loop packages, which cost seconds and would run half-way through verl's own
`__init__` (a circular import); so they are imported right after verl's
`verl.trainer.ppo.v1` / `verl.experimental.agent_loop` themselves finish importing, the moment
a name could be looked up there, and a process that never uses them never pays for them. The
CPU platform registers at once (its registry is already loaded by then); registering does not
select it (`VERL_PLATFORM=cpu` does). Any failure is logged as a warning here, never silent.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

# verl module -> our module that registers into it, imported once the former has loaded
REGISTRATIONS: dict[str, str] = {
    "verl.plugin.platform.platform_manager": "model_engine_server.engines.verl_backend.cpu_platform",
    "verl.trainer.ppo.v1": "clients.verl.trainer_v1",
    "verl.experimental.agent_loop": "clients.verl.agent_loop",
    "verl.workers.rollout.replica": "clients.verl.rollout_replica",
    # the gloo checkpoint-engine backend, also without `custom_backend_module`
    "verl.checkpoint_engine.base": "clients.verl.checkpoint_engine",
}


def import_logged(module: str, after: str) -> None:
    """Import `module`; a failure is a warning naming it (verl would hide it at debug level)."""
    try:
        importlib.import_module(module)
    except Exception as error:
        logger.warning("model-engine-server verl plugin: %s was not registered (needed once %s loads): %s: %s",
                       module, after, type(error).__name__, error)
        logger.debug("model-engine-server verl plugin: importing %s failed", module, exc_info=True)


class _ThenRun(importlib.abc.Loader):
    """A module's own loader, followed by callbacks once the module has fully executed."""

    def __init__(self, loader: importlib.abc.Loader, callbacks: Sequence[Callable[[], None]]) -> None:
        self.loader = loader
        self.callbacks = list(callbacks)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps its own loader (source lookups, resources); this one was only a wrapper
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback()


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after named modules finish importing (at once if already imported)."""

    def __init__(self) -> None:
        self._pending: dict[str, list[Callable[[], None]]] = {}
        self._resolving: set[str] = set()

    def add(self, module: str, callback: Callable[[], None]) -> None:
        if module in sys.modules:
            callback()
        else:
            self._pending.setdefault(module, []).append(callback)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._pending or fullname in self._resolving:
            return None
        self._resolving.add(fullname)  # the real finders answer the lookup below, not this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._resolving.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _ThenRun(spec.loader, self._pending.pop(fullname))
        return spec


def install() -> AfterImport:
    """Put the registrations in place (once per process)."""
    for finder in sys.meta_path:
        if isinstance(finder, AfterImport):
            return finder
    finder = AfterImport()
    sys.meta_path.insert(0, finder)
    for after, module in REGISTRATIONS.items():
        finder.add(after, lambda module=module, after=after: import_logged(module, after))
    return finder


install()
