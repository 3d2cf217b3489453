"""Command-line overrides in Hydra's own grammar, applied to an OmegaConf tree.

A verl launch script passes `key=value`, `+key=value`, `++key=value`, `~key`, lists
(`trainer.logger=['console','tensorboard']`), quoted strings, `null` and numbers like `1.`.
Parsing is Hydra's (`OverridesParser`), never a hand-written splitter, so every form a verl user
writes means here what it means to verl.

One deliberate difference from Hydra: the training YAML is read *without* composing its
`defaults:` list (that needs verl's config tree), so many keys a launch script changes do not
exist in the file. `key=value` therefore adds a missing key instead of failing, and `+key=value`
replaces an existing one; both are logged at debug level. Config-group choices
(`group=option`, `group@pkg=option`) cannot be composed without verl and are skipped with a
warning unless they target the server's own section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from model_engine_server.config.schema import SECTION, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class AppliedOverrides:
    """What the overrides touched, in order, so the loader can say where each value came from."""

    events: list[tuple[str, str]] = field(default_factory=list)  # ("set" | "delete", full dotted key)
    skipped: list[str] = field(default_factory=list)  # group choices that cannot be composed

    def set_by_override(self, path: str) -> bool:
        """True when the last override touching `path` (or a parent of it) set a value there."""
        last = None
        for kind, key in self.events:
            if path == key or path.startswith(key + "."):
                last = kind
        return last == "set"


def parse_overrides(overrides: Sequence[str]) -> list[Any]:
    """Hydra `Override` objects; a syntax error names the override and Hydra's reason."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as error:
            reason = str(error).splitlines()[0]
            raise ConfigError(f"cannot parse override {line!r}: {reason}") from None
    return parsed


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> AppliedOverrides:
    """Apply overrides in order, in place; returns which keys they set or deleted."""
    applied = AppliedOverrides()
    for override in parse_overrides(overrides):
        key = override.key_or_group
        line = override.input_line
        if override.is_sweep_override():
            raise ConfigError(f"override {line!r} is a sweep (several values); the server takes one value per key")
        if override.package is not None or "/" in key:
            if key.split("/")[0].split("@")[0] == SECTION:
                raise ConfigError(
                    f"override {line!r} picks a config group; set the section's keys instead, "
                    f"e.g. {SECTION}.backend=megatron"
                )
            logger.warning("skipping config-group override %r: groups are not composed here", line)
            applied.skipped.append(line)
            continue
        if override.is_delete():
            _delete(cfg, key, line, override.value())
            applied.events.append(("delete", key))
            continue
        value = override.value()
        exists = OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False) is not _MISSING
        if override.is_add() and exists:
            logger.debug("override %r: key exists already; replacing it", line)
        elif not override.is_add() and not override.is_force_add() and not exists:
            logger.debug("override %r: key not in the file (its defaults are not composed); adding it", line)
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except Exception as error:  # e.g. a key through a value that is not a mapping
            raise ConfigError(f"cannot apply override {line!r}: {error}") from None
        applied.events.append(("set", key))
    return applied


_MISSING = object()


def _delete(cfg: DictConfig, key: str, line: str, expected: Any = None) -> None:
    """`~key` deletes; `~key=value` deletes only a key holding that value, as Hydra does."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        current = OmegaConf.select(parent, leaf, throw_on_resolution_failure=False)
        if expected is not None and current != expected:
            raise ConfigError(f"override {line!r}: {key} is {current!r}, not {expected!r}; nothing deleted")
        del parent[leaf]
    else:
        logger.debug("override %r: nothing to delete at %s", line, key)
