"""The scheduler's knobs, apart from its behaviour (`model_engine_server/scheduler.py`, which
re-exports `SchedulerConfig`), so the config schema never imports the scheduler: this module
needs pydantic and the pure temperature range only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_engine_server.temperature import MAX_TEMPERATURE, MIN_TEMPERATURE


class SchedulerConfig(BaseModel):
    """Batching and queueing knobs; the defaults suit one CPU machine and a small model."""

    model_config = ConfigDict(extra="forbid")

    max_tokens_per_batch: int = Field(default=8192, gt=0, description="token budget of one batch")
    max_batch_size: int | None = Field(default=None, gt=0, description="most requests per batch (None: no limit)")
    max_wait_ms: float = Field(default=5.0, ge=0, description="longest a batch waits to fill")
    max_queued_tokens: int = Field(default=1 << 20, gt=0, description="queue bound, in tokens")
    max_inflight_batches: int = Field(default=2, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, description="longest a request may wait in queue (a caller's timeout_s may only shorten it)")
    max_seq_len: int | None = Field(default=None, gt=1, description="None: the model's maximum positions")
    default_temperature: float = Field(
        default=1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="for requests that name no temperature (the configured rollout temperature)"
    )
    weight_update_timeout_s: float = Field(
        default=900.0, gt=0, description="a begun weight update not committed by then is aborted (publisher died)"
    )

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> "SchedulerConfig":
        """A request the batch budget admits must fit an empty queue, or it would be refused as
        `Overloaded` forever (and clients would retry it)."""
        if self.max_queued_tokens < self.max_tokens_per_batch:
            raise ValueError(
                f"max_queued_tokens={self.max_queued_tokens} must be at least max_tokens_per_batch="
                f"{self.max_tokens_per_batch}: a full batch's request could never be queued"
            )
        return self
