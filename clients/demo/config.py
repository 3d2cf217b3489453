"""Knobs of the demo loop; the defaults finish in a few minutes on a 2-core CPU."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DemoModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["qwen2", "llama", "qwen3"] = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=40, gt=0, description="trainer updates")
    prompts_per_step: int = Field(default=8, gt=0, description="groups per update")
    group_size: int = Field(default=4, gt=1, description="samples per prompt (GRPO group)")
    prompt_len: int = Field(default=16, gt=0)
    response_len: int = Field(default=32, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=3e-3, gt=0)
    clip_ratio: float = Field(default=0.2, gt=0)
    target_vocab: int = Field(default=32, gt=0, description="reward = share of response tokens below this id")
    staleness_limit: int = Field(default=2, ge=0, description="K: samples more than K versions old are stale")
    stale_policy: Literal["drop", "keep"] = Field(default="drop", description="what to do with stale samples")
    queue_groups: int = Field(default=16, gt=0, description="message queue bound, in groups")
    max_scoring_inflight: int = Field(default=8, gt=0, description="groups being scored at once")
    scoring_timeout_s: float = Field(default=120.0, gt=0, description="deadline of one sample's scoring")
    max_failed_groups_in_a_row: int = Field(
        default=3, gt=0, description="scoring failures in a row that stop the run with the last error"
    )
    max_tokens_per_batch: int = Field(default=4096, gt=0)
    max_wait_ms: float = Field(default=10.0, ge=0)
    seed: int = 0
    model: DemoModel = Field(default_factory=DemoModel)


def rollout_ahead(**overrides: object) -> DemoConfig:
    """A loop whose rollout outpaces training: long prompts and short responses (cheap to sample,
    dear to train on) and a deep queue that keeps stale groups. Samples then reach staleness 2, where
    the server's version can lie strictly between the rollout's and the trainer's, so the loglinear
    proximal approximation really interpolates (`clients/demo/proximal_approx.py`)."""
    values: dict[str, object] = dict(steps=30, prompt_len=128, response_len=8, queue_groups=48, stale_policy="keep",
                                     staleness_limit=16)
    return DemoConfig(**{**values, **overrides})
