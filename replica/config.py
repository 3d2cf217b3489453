"""`ReplicaConfig`: how many replicas, how each one is laid out on GPUs, and how long to wait.

Plain on purpose: the full `model_engine_server:` section of a training config is parsed
elsewhere (`model_engine_server/config/`) and mapped onto this. Field names follow that
section where they mean the same (`tensor_model_parallel_size`, ...); the section's `nnodes` /
`n_gpus_per_node` describe the whole deployment, these fields one replica.

Layout of one replica: `nodes_per_replica x gpus_per_replica_node` workers, one per one-GPU bundle. A
model-parallel group is `tensor_model_parallel_size x pipeline_model_parallel_size` of them;
the rest is data parallelism inside the replica (a batch is split across the groups by tokens).
Several replicas are independent copies behind the `ReplicaManager`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from checkpoint_transport.spec import DEFAULT_BUCKET_BYTES
from model_engine_server.engines.base import EngineSpec
from model_engine_server.scheduler import SchedulerConfig


class ReplicaConfig(BaseModel):
    """Everything needed to start the replicas of one policy on Ray."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(default="hf", description="engine backend name (engines registry): hf, megatron, verl")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="checkpoint, dtype, device of every worker")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for build_engine (besides the parallel sizes)"
    )
    nodes_per_replica: int = Field(default=1, gt=0, description="nodes one replica spans")
    gpus_per_replica_node: int = Field(default=1, gt=0, description="GPUs (workers) on each node of one replica")
    tensor_model_parallel_size: int = Field(default=1, gt=0)
    pipeline_model_parallel_size: int = Field(default=1, gt=0)
    num_replicas: int = Field(default=1, gt=0, description="independent copies behind the manager")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved in each worker's bundle")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    initial_weight_version: int = Field(default=0, ge=0, description="version of the checkpoint at model_path")
    start_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for GPUs (placement groups)")
    init_timeout_s: float = Field(default=600.0, gt=0, description="longest wait for process groups + engines")
    batch_timeout_s: float = Field(default=600.0, gt=0, description="a batch running longer fails as WorkerFailed")
    health_timeout_s: float = Field(default=10.0, gt=0, description="a worker not answering a ping is dead")
    health_check_interval_s: float | None = Field(
        default=10.0, gt=0, description="the manager pings every worker this often (None: only on demand)"
    )
    auto_restart: bool = Field(
        default=True, description="the health monitor restarts a dead replica (its weights copied from a live peer)"
    )
    max_restarts: int = Field(default=3, ge=0, description="automatic restarts per replica before it is left dead")
    weight_bucket_mb: int = Field(
        default=DEFAULT_BUCKET_BYTES >> 20, gt=0, description="weights are sent to workers in buckets of this size"
    )
    retry_on_worker_failure: bool = Field(
        default=True, description="requests of a batch lost with a dead replica are retried once on another"
    )
    max_failed_batches_in_a_row: int = Field(
        default=3, gt=0, description="a replica one of whose data-parallel groups fails every request of its share "
        "of this many batches in a row, and then a two-token probe, is marked dead (left out of routing, restarted by the monitor)"
    )
    ray_address: str | None = Field(
        default=None, description="the Ray cluster `start` joins when Ray is not running yet; None: embedded Ray "
        "on this machine (or RAY_ADDRESS)"
    )
    placement_strategy: str = Field(
        default="STRICT_PACK", pattern="^(STRICT_PACK|PACK)$", description="Ray strategy of each node's bundles"
    )

    @model_validator(mode="after")
    def _check_layout(self) -> "ReplicaConfig":
        if self.world_size % self.model_parallel_size:
            raise ValueError(
                f"a replica has nodes_per_replica x gpus_per_replica_node = {self.world_size} workers, not a multiple of "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {self.model_parallel_size}"
            )
        if self.backend in ("hf", "verl") and self.model_parallel_size != 1:
            raise ValueError(
                f"the {self.backend} backend has no model parallelism; use tensor/pipeline sizes 1 or backend megatron"
            )
        return self

    @property
    def world_size(self) -> int:
        """Workers (= GPUs) in one replica."""
        return self.nodes_per_replica * self.gpus_per_replica_node

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        """Model-parallel groups in one replica; each scores its own share of a batch."""
        return self.world_size // self.model_parallel_size

    @property
    def total_gpus(self) -> int:
        return self.world_size * self.num_replicas

    def build_engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `build_engine`: parallel sizes for a model-parallel backend."""
        kwargs = dict(self.engine_kwargs)
        if self.backend != "hf":
            kwargs.setdefault("tensor_model_parallel_size", self.tensor_model_parallel_size)
            kwargs.setdefault("pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        return kwargs
