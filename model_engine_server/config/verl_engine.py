"""`verl_engine`: the trainer's own engine settings that `backend: verl` builds verl's worker from.

The server scores with verl's `TrainingWorker` when `backend: verl`; to compute what the trainer
computes it must be built from the trainer's own settings: `actor_rollout_ref.model` (verl's
`HFModelConfig` keys) and the actor's engine section (`actor_rollout_ref.actor.fsdp_config`,
verl's `FSDPEngineConfig` keys) with the actor's `strategy`. The loader copies them here from
the training YAML (`config/verl.py`); they stay plain mappings because verl's dataclasses can
only be built where verl is installed, which is the engine's process (`engines/verl_backend/`),
not necessarily the one that reads the config. Empty mappings mean the server's own defaults
(fp32 on CPU, remove-padding on, no torch.compile).

No torch or verl import here: the schema and the engine spec both use this model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# verl strategies whose engine keeps an HF-named module (what weight syncs address), and the
# key of the actor section that holds that strategy's engine settings.
ENGINE_SECTION_OF_STRATEGY = {"fsdp": "fsdp_config", "fsdp2": "fsdp_config"}


class VerlEngineConfig(BaseModel):
    """What `backend: verl` needs from the trainer's `actor_rollout_ref`, as plain mappings."""

    model_config = ConfigDict(extra="forbid")

    strategy: str | None = Field(
        default=None, description="actor_rollout_ref.actor.strategy; None: fsdp2 (verl's FSDP engine)"
    )
    model: dict[str, Any] = Field(
        default_factory=dict, description="actor_rollout_ref.model (HFModelConfig keys; path is model_path)"
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="the actor's engine section, e.g. actor_rollout_ref.actor.fsdp_config"
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str | None) -> str | None:
        """Only FSDP engines are served: their parameters carry HF names, which is what a weight
        sync sends. A Megatron-trained policy has a backend of its own."""
        if strategy is not None and strategy not in ENGINE_SECTION_OF_STRATEGY:
            raise ValueError(
                f"strategy {strategy!r} is not served by backend verl, which runs verl's FSDP engine "
                f"(strategies: {', '.join(ENGINE_SECTION_OF_STRATEGY)}); for a Megatron-trained policy "
                "set model_engine_server.backend=megatron"
            )
        return strategy

    @property
    def is_default(self) -> bool:
        """Nothing came from the trainer: the engine uses the server's own defaults."""
        return self.strategy is None and not self.model and not self.engine
