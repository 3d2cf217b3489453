"""`serve` on the Ray runtime: the service and its HTTP app inside one named Ray actor.

Trainers and verl reach the server by actor handle (`RayLogProbClient`, verl's checkpoint
engine through `clients.verl.scoring_replica`) as well as over HTTP, so both must front the same
service. This process joins (or starts) Ray, creates the service actor `ray.actor_name` in
`ray.namespace` on this node (so HTTP listens on this machine), has it serve the app, and waits
for SIGINT/SIGTERM. The first signal drains: the service finishes what it can, answers what it
cannot 503 `shutting_down`, then the HTTP server closes and the actor and its replicas go. A
second signal ends the actor at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Any

from model_engine_server.config import ServerConfig

logger = logging.getLogger("model_engine_server.serve")


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served (checked before a model loads), or None."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return f"cannot listen on {host}:{port}: {error.strerror or error}"
    return None


def serve_on_ray(config: ServerConfig) -> int:
    problem = port_problem(config.http.host, config.http.port)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> int:
    import ray

    signals = _SignalCount()  # before anything slow: a signal during start-up ends it
    starting = asyncio.ensure_future(_start(config, signals))
    await asyncio.wait({starting, asyncio.ensure_future(signals.first.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # the actor, if made, is killed (and dies with this driver anyway)
        await asyncio.gather(starting, return_exceptions=True)
        logger.warning("interrupted during start-up")
        return 1
    started = starting.result()
    if isinstance(started, str):
        print(f"error: {started}", file=sys.stderr)
        return 1
    handle, (host, port) = started
    logger.info("model-engine-server listening on http://%s:%d (API docs at /docs); Ray actor %r in namespace %r "
                "of the Ray cluster at %s", host, port, config.ray.actor_name, config.ray.namespace,
                ray.get_runtime_context().gcs_address)
    gone = asyncio.ensure_future(_until_gone(handle))
    await asyncio.wait({gone, asyncio.ensure_future(signals.first.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if gone.done():  # nothing serves any more: say so and exit, so a supervisor restarts it
        logger.error("the service actor ended: %s", _cause(gone.result()))
        return 1
    gone.cancel()
    return await _drain(handle, config, signals)


async def _start(config: ServerConfig, signals: "_SignalCount") -> "tuple[Any, tuple[str, int]] | str":
    """The running service actor and where it listens, or why not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from model_engine_server.launch import ray_gpus_for
    from replica.runtime import join_ray_for
    from replica.service_actor import start_service_actor, stop_service_actor

    try:
        join_ray_for(config, ray_gpus_for(config))
    except (OSError, ValueError) as error:  # no cluster at the address; a reference path that is not a checkpoint
        return f"could not join or start Ray: {type(error).__name__}: {error}"
    signals.install()  # `ray.init` put its own SIGTERM handler in place, which exits without a drain
    # the app is built in the actor, whose environment is the Ray cluster's: the token goes with the config
    config = config.model_copy(update={"http": config.http.with_token_resolved()})
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    name = config.ray.actor_name
    try:
        handle = await start_service_actor(config, name=name, namespace=config.ray.namespace, with_http=True,
                                           scheduling_strategy=here)
    except Exception as error:
        return f"the service actor {name!r} did not start: {_cause(error)}"
    try:
        return handle, tuple(await handle.serve_http.remote(config.http.host, config.http.port))
    except BaseException as error:
        await stop_service_actor(handle, drain=False, timeout_s=5.0)
        if not isinstance(error, Exception):
            raise
        return f"could not serve HTTP: {_cause(error)}"


async def _until_gone(handle: Any, every_s: float = 2.0) -> BaseException:
    """Returns the error once the actor no longer answers (it died, or was killed)."""
    while True:
        try:
            await handle.ping.remote()
        except Exception as error:
            return error
        await asyncio.sleep(every_s)


async def _drain(handle: Any, config: ServerConfig, signals: "_SignalCount") -> int:
    """The first signal's shutdown: drain the actor, unless a second signal ends it at once."""
    import ray

    from replica.service_actor import stop_service_actor

    logger.info("draining: finishing accepted requests, then shutting the service down (a second signal ends it now)")
    drain = asyncio.ensure_future(stop_service_actor(handle, drain=True, timeout_s=config.http.graceful_shutdown_s))
    forced = asyncio.ensure_future(signals.second.wait())
    await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        logger.warning("second signal: ending the service actor without draining")
        ray.kill(handle, no_restart=True)
        drain.cancel()
        return 1
    forced.cancel()
    if drain.exception() is not None:  # e.g. the actor died under the same signal (a whole process group's)
        logger.error("the service actor did not shut down cleanly: %s", _cause(drain.exception()))
        return 1
    logger.info("shut down cleanly")
    return 0


class _SignalCount:
    """SIGINT/SIGTERM on this loop: the first sets `first`, the next `second`."""

    def __init__(self) -> None:
        self.first, self.second = asyncio.Event(), asyncio.Event()
        self.install()

    def install(self) -> None:
        """(Again) make this loop the one the signals reach."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._arrived)

    def _arrived(self) -> None:
        (self.second if self.first.is_set() else self.first).set()


def _cause(error: BaseException) -> str:
    """The error raised inside the actor, not Ray's wrapping of it."""
    from replica.executor import unwrap_task_error

    cause = unwrap_task_error(error)
    return f"{type(cause).__name__}: {cause}"
