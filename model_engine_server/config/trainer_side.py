"""The `model_engine_server.trainer:` part: how verl's trainers and agent loops use the server.

These keys are read by the integrations in `clients/verl/` (the trainer subclasses and the
scoring agent loop), not by the server; they live in the same section so one YAML configures
both ends. The rules say what happens to a sample the server did not score, or scored under a
weight version other than the policy the trainer treats as old, so that no such sample is ever
used silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MissingRule = Literal["recompute", "rescore", "fail"]
StaleRule = Literal["recompute", "rescore", "accept", "fail"]


class TrainerSideConfig(BaseModel):
    """Where the trainer side finds the server, and its rules for unusable samples."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        default=None,
        description="the server's HTTP URL (http://host:port); None: the Ray actor named `actor_name`",
    )
    actor_name: str = Field(default="model-engine-server", description="the named Ray actor `serve` runs; "
                            "unset: the section's `ray.actor_name`")
    ray_namespace: str | None = Field(default="model-engine-server", description="namespace of that actor; "
                                      "unset: the section's `ray.namespace`; None: the caller's")
    api_token: SecretStr | None = Field(default=None, description="bearer token of a locked-down server (masked when shown)")

    timeout_s: float = Field(default=600.0, gt=0, description="deadline of one scoring call")
    on_missing: MissingRule = Field(
        default="recompute",
        description="a sample without server log-probs: recompute on the trainer (verl's own path), "
        "rescore on the server now, or fail naming the samples",
    )
    on_stale: StaleRule = Field(
        default="rescore",
        description="a sample scored under another version than the trainer's old policy: rescore at "
        "that version (waits for the server to hold it), recompute on the trainer, accept as is, or fail",
    )
    max_version_lag: int = Field(
        default=0, ge=0, description="a sample this many versions behind the old policy still counts as current"
    )
    join_weight_sync: bool = Field(
        default=True,
        description="add the server's replicas (on Ray, the actor `actor_name`) to the trainer's own "
        "checkpoint-engine sync, so every `update_weights(global_steps)` also reaches them; the trainer "
        "refuses to start when that actor is not found. Off: the server gets weights another way "
        "(publisher, update_weights_from_disk), or it never leaves version 0 and every later sample is stale",
    )
    score_ref: bool = Field(
        default=False, description="also take ref_log_prob from the server (its reference mode must be on)"
    )

    @property
    def bearer_token(self) -> str | None:
        return None if self.api_token is None else self.api_token.get_secret_value()
