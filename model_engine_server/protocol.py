"""Wire types: what a caller sends (`LogProbRequest`) and gets back (`LogProbResult`).

Semantics of one result, for a request with ids `x[0..L-1]` and `response_start = s`:
`log_probs[j] = log softmax(logits[s + j - 1] / temperature)[x[s + j]]` for `j = 0 .. L-s-1`,
where `logits[i]` is the model's output after reading `x[0..i]`. `entropy[j]` is the entropy of
that same tempered distribution; with `top_k = k`, `top_k_ids[j]` / `top_k_log_probs[j]` are that
distribution's k most likely tokens (most likely first) and their log-probs, and `target_ranks[j]`
is `1 +` the number of tokens strictly more likely than `x[s + j]`. This is exactly what a PPO/GRPO trainer needs as old log-probs.

Checks that need only the request live here (pydantic). Checks that need the server's limits
(vocab size, maximum length, token budget) live in `check_against_limits`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from model_engine_server.errors import InvalidRequest, ModelEngineError, error_from_wire
from model_engine_server.temperature import temperature_problem
from model_engine_server.weight_session import MAX_WEIGHT_VERSION

MAX_TOP_K = 1000  # a request's bound: [response_len, k] ids and log-probs come back per request


def _array_to_list(value: Any) -> Any:
    """Accept numpy arrays and torch tensors where the schema says list (msgpack sends arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    return value


TokenIds = Annotated[list[int], BeforeValidator(_array_to_list)]
FloatList = Annotated[list[float], BeforeValidator(_array_to_list)]


class LogProbRequest(BaseModel):
    """One finished trajectory to score: prompt + response ids and where the response starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    input_ids: TokenIds = Field(description="prompt + response token ids")
    response_start: int = Field(description="index of the first response token (>= 1)")
    temperature: float | None = Field(
        default=None, description="the rollout's sampling temperature; unset: the server's configured one"
    )
    return_entropy: bool = False
    top_k: int | None = Field(
        default=None,
        description=f"also return each response position's top_k most likely tokens and their log-probs "
        f"(1..{MAX_TOP_K}; capped at the vocabulary size)",
    )
    return_ref_log_probs: bool = Field(
        default=False, description="also score with the frozen reference policy (ref mode)"
    )
    rollout_log_probs: FloatList | None = Field(
        default=None, description="the rollout engine's own log-probs of the response, for mismatch metrics"
    )
    min_weight_version: int | None = Field(
        default=None, description="wait until the server has at least this weight version"
    )

    @model_validator(mode="after")
    def _check_shape(self) -> "LogProbRequest":
        length = len(self.input_ids)
        if length == 0:
            raise ValueError("input_ids must not be empty")
        if length < 2:
            raise ValueError("input_ids needs at least 2 tokens (one prompt token and one response token)")
        if self.response_start < 1:
            raise ValueError(f"response_start must be >= 1 (a response token needs a token before it), got {self.response_start}")
        if self.response_start >= length:
            raise ValueError(f"response_start must be < len(input_ids)={length}, got {self.response_start}")
        if self.temperature is not None and (problem := temperature_problem(self.temperature)) is not None:
            raise ValueError(f"temperature {problem}")
        if self.rollout_log_probs is not None and len(self.rollout_log_probs) != length - self.response_start:
            raise ValueError(
                f"rollout_log_probs must have one value per response token "
                f"({length - self.response_start}), got {len(self.rollout_log_probs)}"
            )
        if self.rollout_log_probs is not None and not all(math.isfinite(v) for v in self.rollout_log_probs):
            position = next(i for i, v in enumerate(self.rollout_log_probs) if not math.isfinite(v))
            raise ValueError(f"rollout_log_probs must be finite (they are compared with the server's), got "
                             f"{self.rollout_log_probs[position]} at response position {position}")
        if self.top_k is not None and not 1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if self.min_weight_version is not None and not 0 <= self.min_weight_version <= MAX_WEIGHT_VERSION:
            raise ValueError(f"min_weight_version must be between 0 and {MAX_WEIGHT_VERSION} (weight versions "
                             f"are int64), got {self.min_weight_version}")
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens this request costs in the token budget."""
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start

    @classmethod
    def parse(cls, payload: Any) -> "LogProbRequest":
        """Build from a decoded wire dict, turning pydantic errors into `InvalidRequest`."""
        if isinstance(payload, cls):
            return payload
        if not isinstance(payload, dict):
            raise InvalidRequest(f"a request must be an object, got {type(payload).__name__}", "request")
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            raise invalid_request_from(error) from None


def resolve_temperature(request: LogProbRequest, default_temperature: float) -> LogProbRequest:
    """A request that names no temperature is scored at the server's configured one (the rollout
    temperature). The scheduler calls this at admission, so every transport (HTTP, Ray handle,
    in-process) means the same by an unset temperature."""
    if request.temperature is not None:
        return request
    return request.model_copy(update={"temperature": default_temperature})


def invalid_request_from(error: ValidationError) -> InvalidRequest:
    """Name the first offending field and say what is wrong with it, in one line."""
    first = error.errors()[0]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    location = ".".join(str(part) for part in first.get("loc", ()))
    if not location:  # a whole-model check: its message starts with the field it is about
        leading_word = message.split(" ", 1)[0]
        if leading_word in LogProbRequest.model_fields:
            return InvalidRequest(message.split(" ", 1)[1], leading_word)
        return InvalidRequest(message)
    return InvalidRequest(message, location)


@dataclass(frozen=True)
class RequestLimits:
    """The server-side bounds every request is checked against before it is queued."""

    vocab_size: int
    max_seq_len: int
    max_tokens_per_batch: int


def check_against_limits(request: LogProbRequest, limits: RequestLimits) -> None:
    """Reject what the engine cannot score, with a message naming the field and the bound."""
    try:
        ids = np.asarray(request.input_ids, dtype=np.int64)
    except OverflowError:  # an id past int64 is outside every vocabulary
        raise InvalidRequest(
            f"a token id is outside the vocabulary [0, {limits.vocab_size}) (beyond 64-bit range)", "input_ids"
        ) from None
    bad = np.flatnonzero((ids < 0) | (ids >= limits.vocab_size))
    if bad.size:
        position = int(bad[0])
        raise InvalidRequest(
            f"token id {int(ids[position])} at position {position} is outside the vocabulary "
            f"[0, {limits.vocab_size})",
            "input_ids",
        )
    if len(ids) > limits.max_seq_len:
        raise InvalidRequest(
            f"sequence has {len(ids)} tokens, more than the maximum length {limits.max_seq_len}", "input_ids"
        )
    if len(ids) > limits.max_tokens_per_batch:
        raise InvalidRequest(
            f"sequence has {len(ids)} tokens, more than the token budget of one batch "
            f"(max_tokens_per_batch={limits.max_tokens_per_batch}); raise the budget or split the request",
            "input_ids",
        )


@dataclass
class MismatchStats:
    """Rollout-vs-server log-prob mismatch of one request (when rollout_log_probs were sent)."""

    mean_abs_diff: float
    max_abs_diff: float
    kl_estimate: float  # k3 estimator of KL(rollout || server), mean over response tokens

    def to_wire(self) -> dict[str, float]:
        return {"mean_abs_diff": self.mean_abs_diff, "max_abs_diff": self.max_abs_diff, "kl_estimate": self.kl_estimate}


@dataclass
class ScoreOutput:
    """What an engine produced for one request, before the scheduler tags it."""

    log_probs: np.ndarray
    entropy: np.ndarray | None = None
    mismatch: MismatchStats | None = None
    top_k_ids: np.ndarray | None = None  # [response_len, k] int64
    top_k_log_probs: np.ndarray | None = None  # [response_len, k] float32
    target_ranks: np.ndarray | None = None  # [response_len] int64, with top_k: 1 + tokens more likely

    def tagged(self, request_id: str, weight_version: int, timings: dict[str, float]) -> "LogProbResult":
        """The answer to the request, labelled with the version its batch ran under."""
        return LogProbResult(
            request_id=request_id,
            log_probs=self.log_probs,
            weight_version=weight_version,
            entropy=self.entropy,
            mismatch=self.mismatch,
            timings=timings,
            top_k_ids=self.top_k_ids,
            top_k_log_probs=self.top_k_log_probs,
            target_ranks=self.target_ranks,
        )


@dataclass
class LogProbResult:
    """The answer to one `LogProbRequest`, tagged with the weight version that computed it."""

    request_id: str
    log_probs: np.ndarray
    weight_version: int
    entropy: np.ndarray | None = None
    ref_log_probs: np.ndarray | None = None
    mismatch: MismatchStats | None = None
    timings: dict[str, float] = field(default_factory=dict)
    top_k_ids: np.ndarray | None = None  # [response_len, k] int64, most likely first
    top_k_log_probs: np.ndarray | None = None  # [response_len, k] float32
    target_ranks: np.ndarray | None = None  # [response_len] int64, with top_k: 1 + tokens more likely

    def to_wire(self, arrays_as_lists: bool = False) -> dict[str, Any]:
        """A plain dict; arrays stay numpy (raw bytes in msgpack) unless JSON needs lists."""

        def arr(value: np.ndarray | None) -> Any:
            if value is None:
                return None
            return value.tolist() if arrays_as_lists else value

        return {
            "request_id": self.request_id,
            "log_probs": arr(self.log_probs),
            "entropy": arr(self.entropy),
            "ref_log_probs": arr(self.ref_log_probs),
            "weight_version": self.weight_version,
            "mismatch": self.mismatch.to_wire() if self.mismatch else None,
            "timings": dict(self.timings),
            **(
                {"top_k_ids": arr(self.top_k_ids), "top_k_log_probs": arr(self.top_k_log_probs),
                 "target_ranks": arr(self.target_ranks)}
                if self.top_k_ids is not None
                else {}  # absent unless asked for: old clients see the old shape
            ),
        }

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> "LogProbResult":
        def arr(value: Any) -> np.ndarray | None:
            return None if value is None else np.asarray(value, dtype=np.float32)

        mismatch = payload.get("mismatch")
        return cls(
            request_id=payload["request_id"],
            log_probs=arr(payload["log_probs"]),  # type: ignore[arg-type]
            weight_version=int(payload["weight_version"]),
            entropy=arr(payload.get("entropy")),
            ref_log_probs=arr(payload.get("ref_log_probs")),
            mismatch=MismatchStats(**mismatch) if mismatch else None,
            timings=dict(payload.get("timings") or {}),
            top_k_ids=None if payload.get("top_k_ids") is None else np.asarray(payload["top_k_ids"], dtype=np.int64),
            top_k_log_probs=arr(payload.get("top_k_log_probs")),
            target_ranks=None if payload.get("target_ranks") is None else np.asarray(payload["target_ranks"], dtype=np.int64),
        )


# ---------------------------------------------------------------- one request's outcome on a wire
Outcome = LogProbResult | ModelEngineError
"""What a caller gets for one request: its result, or the typed error for it alone."""


def outcome_to_wire(
    outcome: LogProbResult | ModelEngineError,
    request_id: str | None = None,
    arrays_as_lists: bool = False,
    error_to_wire: Callable[[ModelEngineError], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One request's answer as every transport sends it (an entry of HTTP's `{"results": [...]}`,
    an item of the Ray actor's reply): the result's own fields, or `{"request_id", "error": {...}}`.
    `error_to_wire` lets the HTTP layer log a 500 and send an id in place of its text."""
    if isinstance(outcome, ModelEngineError):
        error = outcome.to_wire() if error_to_wire is None else error_to_wire(outcome)
        return {"request_id": request_id, "error": error}
    return outcome.to_wire(arrays_as_lists)


def outcome_from_wire(entry: dict[str, Any]) -> LogProbResult | ModelEngineError:
    """Inverse of `outcome_to_wire`: the result, or the typed error the server sent."""
    if entry.get("error") is not None:
        return error_from_wire(entry["error"])
    return LogProbResult.from_wire(entry)
