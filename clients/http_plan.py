"""The HTTP clients' logic without a transport: what to send, how to read the reply, when to retry.

Each call is a generator of steps - `Post` (send this, give me the reply) and `Sleep` (wait
this long) - that ends with the call's result. `clients/http_client.py` runs the same plans
with an async and with a blocking httpx client, so retries, deadlines and reply parsing are
written once, and tests can drive a plan with replies of their choosing.

Retries: a call refused as a whole with 429/503, a connection that could not be opened, and
single requests answered `overloaded` / `shutting_down` (decided in `clients/retry.py`, as the
Ray-handle client decides) are retried with exponential backoff (with jitter), never sooner
than the server's `Retry-After`, until `max_retries` or the deadline; then the last answer is
returned (per request) or raised (whole call).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generator, Iterable, Sequence

import httpx
import numpy as np
import torch

from clients.base import Outcome, RequestLike
from clients.retry import RESPONSE_GRACE_S, Deadline, RetryPolicy, entries_to_resend
from model_engine_server import codec
from model_engine_server.errors import (
    ModelEngineError,
    WorkerFailed,
    error_from_wire,
)
from model_engine_server.http.wire import JSON, MSGPACK, encode_body, encode_weights, is_msgpack
from model_engine_server.protocol import LogProbRequest, outcome_from_wire

RETRYABLE_STATUSES = frozenset({429, 503})


@dataclass
class Post:
    """Send `body` to `path`; the plan gets the response back, or the transport's error."""

    path: str
    body: bytes
    content_type: str
    timeout_s: float | None


@dataclass
class Sleep:
    """Wait before the next attempt; the plan gets None back."""

    seconds: float


Step = Post | Sleep
Reply = httpx.Response | httpx.HTTPError | None


class HttpPlans:
    """A client's settings, and the plan of each kind of call."""

    def __init__(
        self, base_url: str, wire: str, timeout_s: float | None, retry: RetryPolicy, admin_token: str | None
    ) -> None:
        if wire not in ("msgpack", "json"):
            raise ValueError(f"wire must be 'msgpack' or 'json', got {wire!r}")
        self.base_url = base_url.rstrip("/")
        self.wire = wire
        self.timeout_s = timeout_s
        self.retry = retry
        self.headers = {"accept": MSGPACK if wire == "msgpack" else JSON}
        if admin_token:
            self.headers["authorization"] = f"Bearer {admin_token}"

    # ---------------------------------------------------------------- bodies
    def _payload(self, request: RequestLike) -> Any:
        if not isinstance(request, LogProbRequest):
            return request
        payload = request.model_dump(exclude_unset=True)  # unset temperature: the server's default applies
        payload["request_id"] = request.request_id
        if self.wire == "msgpack":
            payload["input_ids"] = np.asarray(request.input_ids, dtype=np.int64)
            if request.rollout_log_probs is not None:
                payload["rollout_log_probs"] = np.asarray(request.rollout_log_probs, dtype=np.float64)
        return payload

    def _call_body(self, payloads: list[Any], deadline: Deadline) -> Post:
        remaining = deadline.remaining()
        envelope: dict[str, Any] = {"requests": payloads}
        if remaining is not None:
            envelope["timeout_s"] = max(remaining, 1e-3)
        as_msgpack = self.wire == "msgpack"
        return Post(
            "/v1/logprobs",
            encode_body(envelope, as_msgpack),
            MSGPACK if as_msgpack else JSON,
            None if remaining is None else remaining + RESPONSE_GRACE_S,
        )

    # ---------------------------------------------------------------- plans
    def score_plan(self, requests: Sequence[RequestLike], timeout_s: float | None) -> Generator[Step, Reply, list[Outcome]]:
        """`POST /v1/logprobs`, one outcome per request in the caller's order. Requests answered
        `overloaded` / `shutting_down` are sent again (only they), a refused call is sent again
        whole, until the retries or the deadline run out; then the last answers stand."""
        deadline = Deadline(timeout_s if timeout_s is not None else self.timeout_s)
        payloads = [self._payload(r) for r in requests]
        outcomes: list[Outcome | None] = [None] * len(payloads)
        pending = list(range(len(payloads)))
        attempt = 0
        while pending:
            reply = yield self._call_body([payloads[i] for i in pending], deadline)
            entries, error, retry_after = _read_call_reply(reply, len(pending), deadline)
            if entries is None:  # the call as a whole failed, with no per-request answers
                assert error is not None
                delay = self.retry.delay(attempt, retry_after)
                if not (_retryable_call(reply) and attempt < self.retry.max_retries and deadline.allows(delay)):
                    if len(pending) == len(payloads):  # nothing answered yet: the call failed
                        raise error
                    for index in pending:  # earlier attempts answered the others: keep their answers
                        outcomes[index] = error
                    break
            else:
                for index, outcome in zip(pending, entries):
                    outcomes[index] = outcome
                pending, resend_after = entries_to_resend(outcomes, pending, self.retry, attempt, deadline, retry_after)
                if resend_after is None:
                    break
                delay = resend_after
            yield Sleep(delay)
            attempt += 1
        return outcomes  # type: ignore[return-value]

    def admin_plan(self, path: str, body: bytes = b"", content_type: str = JSON, retry: bool = True) -> Generator[Step, Reply, Any]:
        """POST an admin route; retried on 429/503 and refused connections when `retry`."""
        deadline = Deadline(self.timeout_s)
        attempt = 0
        while True:
            reply = yield Post(path, body, content_type, deadline.remaining())
            if isinstance(reply, httpx.Response) and reply.status_code < 400:
                return reply.json()
            error, retry_after = _error_of(reply, deadline, path)
            delay = self.retry.delay(attempt, retry_after)
            retryable = _retryable_call(reply) if retry else isinstance(reply, httpx.ConnectError)
            if not (retryable and attempt < self.retry.max_retries and deadline.allows(delay)):
                raise error
            yield Sleep(delay)
            attempt += 1

    def weights_plan(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> Generator[Step, Reply, Any]:
        """`POST /v1/update_weights` with the tensors in one msgpack body; not retried once sent."""
        return self.admin_plan("/v1/update_weights", encode_weights(named_tensors, version), MSGPACK, retry=False)

    def get_error(self, reply: Reply, path: str) -> ModelEngineError:
        """The error a failed GET stands for; a timeout is against the client's own."""
        return _error_of(reply, Deadline(self.timeout_s if isinstance(reply, httpx.HTTPError) else None), path)[0]

    def from_disk_plan(self, model_path: str, version: int | None) -> Generator[Step, Reply, Any]:
        """`POST /v1/update_weights_from_disk`; not retried once sent (a version is not
        loaded twice), only when the connection could not be opened."""
        body: dict[str, Any] = {"model_path": str(model_path)}
        if version is not None:
            body["weight_version"] = int(version)
        return self.admin_plan("/v1/update_weights_from_disk", json.dumps(body).encode(), JSON, retry=False)


def _retryable_call(reply: Reply) -> bool:
    if isinstance(reply, httpx.Response):
        return reply.status_code in RETRYABLE_STATUSES
    return isinstance(reply, (httpx.ConnectError, httpx.ConnectTimeout))


def _read_call_reply(
    reply: Reply, expected: int, deadline: Deadline
) -> tuple[list[Outcome] | None, ModelEngineError | None, float | None]:
    """(per-request outcomes or None, the whole call's error, Retry-After seconds)."""
    if not isinstance(reply, httpx.Response):
        return None, *_error_of(reply, deadline, "/v1/logprobs")
    retry_after = _retry_after(reply)
    try:
        body = codec.decode(reply.content) if is_msgpack(reply.headers.get("content-type")) else reply.json()
    except Exception:
        body = None
    entries = body.get("results") if isinstance(body, dict) else None
    if isinstance(entries, list) and len(entries) == expected:
        return [outcome_from_wire(_nulls_to_nan(entry)) for entry in entries], None, retry_after
    error, _ = _error_of(reply, deadline, "/v1/logprobs")
    return None, error, retry_after


def _nulls_to_nan(entry: dict[str, Any]) -> dict[str, Any]:
    """JSON sends non-finite values as null: give them back as NaN. msgpack arrays are views of
    the response body: copy them so callers get ordinary writable arrays."""
    for key in ("log_probs", "entropy", "ref_log_probs"):
        value = entry.get(key)
        if isinstance(value, list) and any(v is None for v in value):
            entry[key] = [float("nan") if v is None else v for v in value]
        elif isinstance(value, np.ndarray) and not value.flags.writeable:
            entry[key] = value.copy()
    for key in ("top_k_ids", "top_k_log_probs", "target_ranks"):  # ids and ranks are never null
        value = entry.get(key)
        if key == "top_k_log_probs" and isinstance(value, list):  # [response_len, k]
            entry[key] = [[float("nan") if v is None else v for v in row] for row in value]
        elif isinstance(value, np.ndarray) and not value.flags.writeable:
            entry[key] = value.copy()
    return entry


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _error_of(reply: Reply, deadline: Deadline, what: str) -> tuple[ModelEngineError, float | None]:
    """The typed error a failed reply stands for (the server's own, rebuilt), and Retry-After."""
    if isinstance(reply, httpx.TimeoutException) and not isinstance(reply, httpx.ConnectTimeout):
        return deadline.expired_error(what), None
    if isinstance(reply, httpx.HTTPError) or reply is None:
        return WorkerFailed(f"{what}: cannot reach the server ({type(reply).__name__}: {reply})"), None
    try:
        payload = reply.json().get("error")
    except Exception:
        payload = None
    if isinstance(payload, dict):
        error = error_from_wire(payload)
        if error.code != payload.get("code"):  # an HTTP-only code (unauthorized, payload_too_large, ...)
            error.code = str(payload.get("code"))
    else:
        error = ModelEngineError(f"{what}: HTTP {reply.status_code}: {reply.text[:200]}")
    error.http_status = reply.status_code
    return error, _retry_after(reply)
