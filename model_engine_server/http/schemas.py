"""Body shapes of the HTTP API, for validation of the envelope and for the OpenAPI document.

Requests themselves are the core's `LogProbRequest`; results and errors are documented here in
their JSON form (in msgpack, the float lists are raw float32 arrays).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model_engine_server.protocol import LogProbRequest
from model_engine_server.weight_session import MAX_WEIGHT_VERSION


class LogProbCall(BaseModel):
    """`POST /v1/logprobs` body."""

    model_config = ConfigDict(extra="forbid")

    requests: list[LogProbRequest] = Field(description="requests scored independently, answered in order")
    timeout_s: float | None = Field(default=None, gt=0, description="longest each request may wait; default: server's")


class CallEnvelope(BaseModel):
    """What the route checks before looking at each request (each is then parsed on its own, so
    one bad request fails alone)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[Any]
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class ErrorBody(BaseModel):
    code: str = Field(description="stable error code, e.g. invalid_request, overloaded, worker_failed")
    message: str
    field: str | None = None
    retry_after_s: float | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    results: list[Any] | None = Field(default=None, description="per-request entries, when every request failed")


class MismatchWire(BaseModel):
    mean_abs_diff: float
    max_abs_diff: float
    kl_estimate: float


class LogProbResultWire(BaseModel):
    request_id: str
    log_probs: list[float | None] = Field(description="one per response token; null only where not finite (JSON)")
    entropy: list[float | None] | None = None
    ref_log_probs: list[float | None] | None = None
    weight_version: int
    mismatch: MismatchWire | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    top_k_ids: list[list[int]] | None = Field(default=None, description="[response_len, k], when top_k was asked")
    top_k_log_probs: list[list[float | None]] | None = Field(default=None, description="[response_len, k]")
    target_ranks: list[int] | None = Field(default=None, description="with top_k: 1 + tokens more likely than the actual one")


class ErrorEntry(BaseModel):
    request_id: str | None
    error: ErrorBody


class LogProbResponse(BaseModel):
    results: list[LogProbResultWire | ErrorEntry]


class WeightUpdateResponse(BaseModel):
    weight_version: int


# Admin routes with a JSON body (a version, a folder, a transport spec) are parsed before their
# token is checked (FastAPI reads the body first), so their size is bounded before anything else
ADMIN_JSON_BODY_BYTES = 1 << 20


class UpdateFromDiskBody(BaseModel):
    """`POST /v1/update_weights_from_disk` body (the name and fields SGLang uses)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(min_length=1, description="HF checkpoint folder, as seen from the server's machine")
    weight_version: int | None = Field(default=None, ge=0, le=MAX_WEIGHT_VERSION, description="version to serve it as; default: current + 1")


class HealthResponse(BaseModel):
    status: str
    weight_version: int | None = None
    reason: str | None = None
