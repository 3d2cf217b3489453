"""`ModelEngineWorker`: one Ray actor per one-GPU bundle, holding one engine (or engine shard).

Start-up order matters for model-parallel backends: the worker first joins the replica's
`torch.distributed` process group (NCCL with CUDA, else gloo; rank 0's node address and a free
port are discovered at start), and only then builds its engine with
`build_engine(backend, spec, **engine_kwargs)`. A Megatron engine therefore finds the default
process group initialised with world size = tp x pp x dp and plugs in unchanged.

The actor runs scoring and weight loads in its default concurrency group, one call at a time
(a weight load never overlaps a forward), and ping/health/shutdown in a `control` group, so a
health check is answered even while a long batch runs. The calls verl's checkpoint engine makes
on a rollout worker (`execute_checkpoint_engine`, `update_weights`) run in the default group too.

Two properties of the `Engine` describe its place in the replica:
- `returns_results`: whether this rank's outputs are the batch's results
  (Megatron: the last pipeline stage, tensor-parallel rank 0). Other ranks return None.
- `data_parallel_rank`: which share of a batch this rank scores. Default: Megatron's rank
  order (tensor-parallel fastest, then data-parallel, then pipeline), `(rank // tp) % dp`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import ray
import torch

from checkpoint_transport.bucket import group_into_host_buckets
from checkpoint_transport.receiver import receive_into_engine
from checkpoint_transport.spec import TransportSpec
from model_engine_server import cpu_heap
from model_engine_server.adapter import EngineOutcome, ModelEngineServerAdapter
from model_engine_server.engines.base import Engine, EngineSpec, ModelInfo, WeightSpec, build_engine
from model_engine_server.errors import WeightSyncError
from model_engine_server.protocol import LogProbRequest
from replica.worker_stream import coordinator_call, load_stream

logger = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    """Where a worker runs and what it is in its replica; reported once it is initialised."""

    rank: int
    world_size: int
    data_parallel_rank: int
    returns_results: bool
    node_ip: str
    node_id: str
    pid: int
    device: str
    dist_backend: str
    gpu_ids: list[str] = field(default_factory=list)
    placement_group_id: str | None = None
    bundle_resources: dict[str, float] = field(default_factory=dict)


def node_ip_address() -> str:
    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port that was free on this node a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def default_data_parallel_rank(rank: int, tensor_parallel_size: int, data_parallel_size: int) -> int:
    return (rank // tensor_parallel_size) % data_parallel_size


class ModelEngineWorker:
    """The body of the worker actor; a plain class so it can also be used in-process."""

    def __init__(self, rank: int, world_size: int, replica_name: str = "replica") -> None:
        self.rank = rank
        self.world_size = world_size
        self.replica_name = replica_name
        self.engine: Engine | None = None
        self.adapter: ModelEngineServerAdapter | None = None
        self.info: WorkerInfo | None = None
        self.checkpoint_engine: Any = None  # verl's, once attached (`attach_checkpoint_engine`)
        self.coordinator: Any = None  # the service actor that owns the update session
        self.replica_index = -1

    # ------------------------------------------------------------------ start-up
    def rendezvous_address(self) -> tuple[str, int]:
        """Called on rank 0 only: the address every rank uses to form the process group."""
        return node_ip_address(), free_port()

    def initialize(
        self,
        master_addr: str,
        master_port: int,
        backend: str,
        spec: EngineSpec,
        engine_kwargs: dict[str, Any],
        max_tokens_per_micro_batch: int,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        timeout_s: float = 600.0,
    ) -> WorkerInfo:
        """Join the process group, then build the engine; every rank calls this at once."""
        import torch.distributed as dist

        dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES leaves this worker one GPU
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        if not dist.is_initialized():
            dist.init_process_group(
                backend=dist_backend,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        self._check_process_group(dist_backend)
        cpu_heap.apply(spec.cpu_heap, owns_process=True)  # a worker process only serves
        self.engine = build_engine(backend, spec, **engine_kwargs)
        self.adapter = ModelEngineServerAdapter(self.engine, max_tokens_per_micro_batch, spec.logprob_chunk_mb)
        self.info = self._describe(dist_backend, tensor_parallel_size, data_parallel_size)
        return self.info

    def _check_process_group(self, dist_backend: str) -> None:
        """One all-reduce across the replica, so a broken NCCL/gloo set-up fails at start with
        its own error rather than inside the first model-parallel forward."""
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist_backend == "nccl" else torch.device("cpu")
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        if int(ones.item()) != self.world_size:
            raise RuntimeError(
                f"{self.replica_name}: all-reduce over the process group gave {int(ones.item())}, "
                f"expected world size {self.world_size}"
            )

    def _describe(self, dist_backend: str, tensor_parallel_size: int, data_parallel_size: int) -> WorkerInfo:
        context = ray.get_runtime_context() if ray.is_initialized() else None
        if context is not None and context.get_actor_id() is None:
            context = None  # a worker object in the driver (tests): no actor, no assigned resources
        default_dp_rank = default_data_parallel_rank(self.rank, tensor_parallel_size, data_parallel_size)
        engine = self._ready_engine()
        return WorkerInfo(
            rank=self.rank,
            world_size=self.world_size,
            data_parallel_rank=default_dp_rank if engine.data_parallel_rank is None else engine.data_parallel_rank,
            returns_results=engine.returns_results,
            node_ip=node_ip_address() if context else "127.0.0.1",
            node_id=context.get_node_id() if context else "",
            pid=os.getpid(),
            device=engine.info.device,
            dist_backend=dist_backend,
            gpu_ids=[str(g) for g in ray.get_gpu_ids()] if context else [],
            placement_group_id=context.get_placement_group_id() if context else None,
            bundle_resources=dict(context.get_assigned_resources()) if context else {},
        )

    # ------------------------------------------------------------------ work
    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError(f"worker {self.rank} of {self.replica_name} has no engine yet (initialize first)")
        return self.engine

    def score(self, requests: Sequence[LogProbRequest]) -> list[EngineOutcome] | None:
        """Score this data-parallel share; every rank of a model-parallel group runs it, and
        only the rank that `returns_results` sends outcomes back."""
        self._ready_engine()
        assert self.adapter is not None and self.info is not None
        outcomes = self.adapter.score(list(requests))
        return outcomes if self.info.returns_results else None

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        return self._ready_engine().load_weights(named_tensors)

    def discard_partial_weights(self) -> None:
        self._ready_engine().discard_partial_weights()

    def receive_weights(self, spec: dict[str, Any], version: int) -> dict[str, Any]:
        """Receive one checkpoint-transport stream (this worker's rank in `spec`) into the
        engine; returns the receive report as a dict and never raises."""
        return receive_into_engine(TransportSpec.model_validate(spec), self._ready_engine(), version).to_dict()

    def export_weight_buckets(self, bucket_bytes: int) -> list["ray.ObjectRef"]:
        """The full HF-named weights as buckets of at most `bucket_bytes`, each its own object in
        Ray's store (a restarted peer loads them one at a time, never one model-sized object).
        Every rank of a model-parallel group must call it together (the export is collective);
        only the rank that returns results keeps the buckets."""
        assert self.info is not None
        keep = self.info.returns_results
        refs = []
        for bucket in group_into_host_buckets(self._ready_engine().export_weights(), bucket_bytes):
            if keep:
                refs.append(ray.put(bucket))  # a copy into the store: the live parameters stay put
        return refs

    # ------------------------------------------------------------------ syncs driven from outside (verl)
    # verl's `CheckpointEngineManager` calls these on every worker of a rollout replica (the names
    # and signatures are its rollout worker's); `worker_stream.py` and `worker_driven.py` explain.
    def attach_checkpoint_engine(self, factory: Callable[[], Any], coordinator: Any, replica_index: int) -> None:
        """Take part in syncs that verl's checkpoint engine drives worker by worker: `factory()`
        builds this worker's checkpoint engine, once (it may keep a process group across syncs);
        `coordinator` (the service actor) opens, records and commits the update session."""
        if self.checkpoint_engine is None:
            self.checkpoint_engine = factory()
        self.coordinator = coordinator
        self.replica_index = replica_index

    def _attached_engine(self) -> Any:
        if self.checkpoint_engine is None or self.coordinator is None:
            raise RuntimeError(f"worker {self.rank} of {self.replica_name} has no checkpoint engine (attach one first)")
        return self.checkpoint_engine

    def execute_checkpoint_engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """verl's protocol: its manager names the checkpoint-engine step to run on every worker
        (`prepare`, `init_process_group`, `finalize`)."""
        return getattr(self._attached_engine(), method)(*args, **kwargs)

    def update_weights(self, global_steps: int | None = None) -> None:
        """Receive one sync from the checkpoint engine into the engine, inside the update
        session to version `global_steps`; returns once that version is committed, else raises
        why not. The stream is consumed to its end in every case (`worker_stream.py`)."""
        stream = self._attached_engine().receive_weights(global_steps=global_steps)
        try:
            if global_steps is None:
                raise WeightSyncError("a weight sync into the log-prob server needs global_steps: the version it serves")
            load = coordinator_call(self.coordinator.join_worker_update.remote(global_steps, self.replica_index, self.rank))
        except BaseException:
            load_stream(stream, None, self.rank, -1)  # let the sender and the other receivers finish
            raise
        report = load_stream(stream, self._ready_engine().load_weights if load else None, self.rank, global_steps)
        if load:
            coordinator_call(self.coordinator.report_worker_update.remote(global_steps, self.replica_index, self.rank,
                                                                           report.to_dict()))

    def weight_specs(self) -> dict[str, WeightSpec]:
        return self._ready_engine().weight_specs()

    def model_info(self) -> ModelInfo:
        return self._ready_engine().info

    # ------------------------------------------------------------------ control
    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def health(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "engine_ready": self.engine is not None}

    @ray.method(concurrency_group="control")
    def describe(self) -> WorkerInfo | None:
        return self.info

    @ray.method(concurrency_group="control")
    def shutdown(self) -> None:
        """Leave the process group cleanly before the actor is killed."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as error:  # a peer is already gone; the process ends anyway
                logger.debug("destroy_process_group on rank %d: %s", self.rank, error)


def worker_actor_class():  # -> ray.actor.ActorClass
    """The Ray actor class of `ModelEngineWorker` (default group: compute; `control`: pings)."""
    return ray.remote(concurrency_groups={"control": 2})(ModelEngineWorker)
