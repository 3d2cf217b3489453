"""How the verl integration reaches the server: one configured client, and scoring with it.

The `model_engine_server.trainer:` rules say where the server is: `address` set means HTTP
(`HttpLogProbClient`), unset means the named Ray service actor (`RayLogProbClient.from_name`).

Two owners, two lifetimes:
- the agent loop runs inside verl's `AgentLoopWorker` (a Ray actor with one event loop) and verl
  instantiates a new agent-loop object for every trajectory, so the client cannot live on the
  loop object: `shared_client` keeps one per process and event loop (an HTTP connection pool is
  bound to the loop that opened it), reused by every trajectory;
- the v0 trainer's `_compute_old_log_prob` is synchronous code running on the trainer actor's
  event loop thread, so it holds a blocking `SyncLogProbClient` (a private loop in a thread).

`score_for_trainer` turns every way the server can fail a rescore into
`ServerLogProbsUnusable` naming the samples: the trainer must never train on a sample whose
numbers it could not obtain, and the user must learn which samples and why.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Sequence

from clients.base import LogProbClient, Outcome, SyncLogProbClient
from clients.http_client import HttpLogProbClient
from clients.ray_client import RayLogProbClient
from clients.verl.server_fields import ServerLogProbsUnusable
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.errors import ModelEngineError
from model_engine_server.protocol import LogProbRequest

CALL_GRACE_S = 10.0  # beyond a request's deadline, for the transport to report that deadline

_ClientKey = tuple[str | None, str, str | None, str | None, float]
_shared: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_ClientKey, LogProbClient]]" = (
    weakref.WeakKeyDictionary()
)


def make_client(rules: TrainerSideConfig) -> LogProbClient:
    """The configured async client; raises `ValueError` when the Ray actor does not exist."""
    if rules.address:
        return HttpLogProbClient(rules.address, timeout_s=rules.timeout_s, admin_token=rules.bearer_token)
    return RayLogProbClient.from_name(rules.actor_name, namespace=rules.ray_namespace, call_timeout_s=rules.timeout_s)


def _key(rules: TrainerSideConfig) -> _ClientKey:
    return rules.address, rules.actor_name, rules.ray_namespace, rules.bearer_token, rules.timeout_s


def shared_client(rules: TrainerSideConfig) -> LogProbClient:
    """This process's client for `rules` on the running event loop, made on first use."""
    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    key = _key(rules)
    if key not in per_loop:
        per_loop[key] = make_client(rules)
    return per_loop[key]


def where(rules: TrainerSideConfig) -> str:
    """The server as the user configured it, for messages."""
    return rules.address or f"the Ray actor {rules.actor_name!r}"


def blocking_client(rules: TrainerSideConfig) -> SyncLogProbClient:
    """A client for synchronous code (the v0 trainer's step methods)."""
    return SyncLogProbClient(make_client(rules), call_timeout_s=rules.timeout_s + CALL_GRACE_S)


def score_for_trainer(
    client: SyncLogProbClient, rules: TrainerSideConfig, requests: Sequence[LogProbRequest], names: Sequence[str]
) -> list[Outcome]:
    """Per-request outcomes within `timeout_s`; a call that fails as a whole (server unreachable,
    deadline passed) raises `ServerLogProbsUnusable` naming the samples."""
    try:
        return client.score(list(requests), timeout_s=rules.timeout_s)
    except (ModelEngineError, TimeoutError) as error:
        shown = ", ".join(map(str, names[:8])) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")
        raise ServerLogProbsUnusable(
            f"could not rescore {len(names)} samples on the server at {where(rules)} within "
            f"model_engine_server.trainer.timeout_s={rules.timeout_s:g} ({type(error).__name__}: {error}): {shown}"
        ) from error
