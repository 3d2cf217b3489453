"""`serve [--config FILE.yaml] [--host H] [--port P] [overrides]`: serve log-probs over HTTP.

Builds the service the config describes (an in-process replica, or Ray replicas), serves the
FastAPI app with uvicorn and logs where it listens; on the Ray runtime the service and its app
live in the named service actor, which trainers also reach by handle (`serve_ray.py`).
SIGINT/SIGTERM drain: uvicorn stops accepting connections and waits for the calls it accepted,
then the app's shutdown finishes queued requests and shuts the replicas down; the process then
exits 0. With no config at all
it serves a tiny model made into the cache folder. On a non-loopback host it refuses to start
(exit 2, before building anything) unless an admin token is set or
`--allow-unauthenticated-remote` says to serve without one.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import Any

from model_engine_server.commands.config import add_config_arguments, config_file

logger = logging.getLogger("model_engine_server.serve")

# What building a service raises for a user's setup, said in one line instead of a traceback:
# a model path that is not a checkpoint (OSError), a model the engine refuses (ValueError), a
# Ray cluster that is not there (ConnectionError, an OSError).
BUILD_ERRORS = (OSError, ValueError)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve log-probs over HTTP (defaults: a tiny model on 127.0.0.1:8000)")
    add_config_arguments(parser)
    parser.add_argument("--host", help="overrides model_engine_server.http.host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="overrides model_engine_server.http.port (0: any free port)")
    parser.add_argument(
        "--allow-unauthenticated-remote", action="store_const", const=True, default=None,
        help="serve on a non-loopback host with no admin token anyway (model_engine_server.http."
        "allow_unauthenticated_remote=true); without it, serve refuses to start",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model_engine_server import cpu_heap
    from model_engine_server.config import ConfigError, load_config
    from model_engine_server.http.admin_policy import exposure_remedy, unauthenticated_exposure
    from model_engine_server.commands.serve_ray import port_problem, serve_on_ray
    from model_engine_server.launch import build_serving
    from model_engine_server.runtimes import runtime_name

    cli_values = {"http.host": args.host, "http.port": args.port,
                  "http.allow_unauthenticated_remote": args.allow_unauthenticated_remote}
    try:
        loaded = load_config(config_file(args), args.overrides, cli_values=cli_values)
        # checked before anything is built: a refused start loads no model and starts no Ray
        exposure = unauthenticated_exposure(loaded.server.http)
        if exposure is not None and not loaded.server.http.allow_unauthenticated_remote:
            print(f"error: refusing to start: {exposure}; {exposure_remedy(loaded.server.http)}", file=sys.stderr)
            return 2
        if exposure is not None:
            logger.warning("!!! UNAUTHENTICATED ADMIN ROUTES: %s. Serving anyway, as allow_unauthenticated_remote "
                           "is set !!!", exposure)
        if runtime_name(loaded.server) == "ray":  # the service actor serves the app (serve_ray.py)
            return serve_on_ray(loaded.server)
        problem = port_problem(loaded.server.http.host, loaded.server.http.port)
        if problem is not None:  # before the model loads, which can take minutes
            print(f"error: {problem}", file=sys.stderr)
            return 1
        cpu_heap.apply(loaded.server.cpu_heap, owns_process=True)  # before the engine: this process only serves
        serving = build_serving(loaded)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BUILD_ERRORS as error:  # a model that is not there or not servable, a Ray cluster not found
        logger.debug("building the service failed", exc_info=True)  # the traceback, for --log-level DEBUG
        print(f"error: could not build the service: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    http = serving.config.http
    return _serve(serving.app, http.host, http.port, http.graceful_shutdown_s)


def _serve(app: Any, host: str, port: int, graceful_shutdown_s: float) -> int:
    import uvicorn

    from model_engine_server.http.draining import DrainingServer

    class Server(DrainingServer):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                for server in self.servers:
                    for sock in server.sockets:
                        bound_host, bound_port = sock.getsockname()[:2]
                        logger.info("model-engine-server listening on http://%s:%d (API docs at /docs)", bound_host, bound_port)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep the CLI's logging set-up
        access_log=False,
        timeout_graceful_shutdown=math.ceil(graceful_shutdown_s),  # uvicorn takes whole seconds: never round to 0
        lifespan="on",
    )
    server = Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; these handlers take that
    # re-raise (and any signal arriving while the process exits), so a drained shutdown ends
    # with exit status 0 instead of death by signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _after_shutdown)
    server.run()
    if not server.started:
        logger.error("could not start serving on %s:%d", host, port)
        return 1
    if server.force_exit:
        logger.warning("stopped by a second signal before the drain ended")
        return 1
    logger.info("shut down cleanly")
    return 0


def _after_shutdown(signum: int, frame: Any) -> None:
    logger.debug("%s re-raised by uvicorn after the drain; exiting normally", signal.Signals(signum).name)
