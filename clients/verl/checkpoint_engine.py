"""A verl checkpoint-engine backend over our `checkpoint_transport` (gloo): weight syncs on CPU.

verl's built-in backends (nccl, nixl, mooncake, kimi, hccl) need accelerators. This one moves the
same syncs over our torch.distributed gloo broadcast (`checkpoint_transport.torch_dist`), with its
checksummed, pipelined buckets (`WeightSender` / `WeightReceiver`): a CPU cluster, a test, or a
replica on another network can take part in verl's `CheckpointEngineManager` sync unchanged.

Enable it in the trainer's config (every process that builds a checkpoint engine imports the
module named there, which registers the backend):

    actor_rollout_ref.rollout.checkpoint_engine.backend=model_engine_server_gloo
    actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=clients.verl.checkpoint_engine

`engine_kwargs.model_engine_server_gloo` may set `timeout_s` (the longest wait for any one step:
the rendezvous, a bucket) and `address` (the rendezvous host every worker can reach; default the
sending worker's node IP). The bucket size is verl's `update_weights_bucket_megabytes`.

The roles, as verl's manager calls them each sync: actor rank 0 (built with `is_master=True` by
verl's trainer workers) hosts the rendezvous store and sends; the other actor ranks sit the
stream out but still run their weight generator to the end (a trainer engine may gather each
tensor collectively across its ranks); every rollout worker receives. `prepare` opens a fresh
group name per sync, so a sync that failed leaves nothing behind for the next one; `finalize`
leaves the group. A failed send raises, with the reason, on the trainer; a receiver's stream
raises at its end when it broke, was aborted by the sender or did not verify, after yielding
what it verified.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterable, Iterable
from typing import Any, AsyncGenerator

import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

from checkpoint_transport.channel import TransportSession, get_backend
from checkpoint_transport.handoff import BucketHandoff
from checkpoint_transport.receiver import WeightReceiver
from checkpoint_transport.sender import WeightSender
from checkpoint_transport.spec import TransportConfig, TransportError, TransportSpec
from checkpoint_transport.threads import run_in_thread

logger = logging.getLogger(__name__)

BACKEND = "model_engine_server_gloo"
NO_VERSION = -1  # bucket headers carry a version; a sync without global_steps carries this one


def _version(global_steps: int | None) -> int:
    return NO_VERSION if global_steps is None else int(global_steps)


@CheckpointEngineRegistry.register(BACKEND)
class TransportCheckpointEngine(CheckpointEngine):
    """verl's `CheckpointEngine` over `checkpoint_transport`'s gloo broadcast."""

    def __init__(self, bucket_size: int, is_master: bool = False, timeout_s: float = 120.0, address: str | None = None) -> None:
        self.is_master = is_master
        self.config = TransportConfig(
            backend="gloo", bucket_bytes=bucket_size, timeout_s=timeout_s, address=address or _node_ip()
        )
        self._session: TransportSession | None = None  # the master's rendezvous store, kept across syncs
        self._sender: WeightSender | None = None
        self._receiver: WeightReceiver | None = None
        self._sits_out = False

    # ---------------------------------------------------------------- the group, once per sync
    def prepare(self) -> dict[str, Any] | None:
        """The master opens this sync's group and returns its rendezvous (as rank 0's spec; its
        size is only known in `build_topology`); every other worker has nothing to announce."""
        self.finalize()
        if not self.is_master:
            return None
        if self._session is None:
            self._session = get_backend("gloo").open_session(self.config)
        return self._session.begin(f"verl-{uuid.uuid4().hex[:12]}", receivers=1).model_dump()

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[Any]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """Actor rank 0 sends as rank 0; the other actor ranks sit out (spec None); rollout
        worker i receives as rank i + 1."""
        if not metadata or metadata[0] is None:
            raise ValueError(f"actor rank 0 must build the {BACKEND} engine with is_master=True (verl's trainer workers do)")
        spec = TransportSpec.model_validate(metadata[0]).model_copy(update={"world_size": rollout_world_size + 1})
        actor = {"spec": [spec.for_rank(0).model_dump()] + [None] * (actor_wg_world_size - 1)}
        rollout = {"spec": [spec.for_rank(rank).model_dump() for rank in range(1, rollout_world_size + 1)]}
        return actor, rollout

    def init_process_group(self, spec: dict[str, Any] | None) -> None:
        """Join this sync's group (blocks until every member joined; verl calls every worker at once)."""
        if spec is None:
            self._sits_out = True
            return
        member = TransportSpec.model_validate(spec)
        if member.rank == 0:
            self._sender = WeightSender.from_spec(member)
        else:
            self._receiver = WeightReceiver.from_spec(member)

    def finalize(self) -> None:
        """Leave the group (the master keeps its store for the next sync's group)."""
        sender, self._sender = self._sender, None
        receiver, self._receiver = self._receiver, None
        self._sits_out = False
        for member in (sender, receiver):
            if member is not None:
                member.close()

    # ---------------------------------------------------------------- one stream
    async def send_weights(self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: int | None = None) -> dict[str, float]:
        """Stream `weights` (the trainer engine's per-tensor generator) to every receiver; raises
        with the reason when the sync did not reach all of them. Returns verl sync metrics."""
        if isinstance(weights, AsyncIterable):
            raise TypeError(f"the {BACKEND} backend sends a plain (sync) generator of (name, tensor)")
        if self._sender is None:
            if not self._sits_out:
                raise TransportError("send_weights before init_process_group")
            for _ in weights:  # producing a tensor may be collective over the trainer's ranks
                pass
            return {}
        report = await run_in_thread(self._sender.send, weights, _version(global_steps))
        if not report.ok:
            raise TransportError(f"sending version {global_steps} failed: {report.error}")
        return {
            "model_engine_server/weight_sync_seconds": report.seconds,
            "model_engine_server/weight_sync_gb_per_s": report.gb_per_s,
        }

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Every verified tensor, in order; each is a view valid until the next one is asked for
        after its bucket ends. Raises `TransportError` at the end if the stream did not arrive
        whole. A consumer that stops early still lets the stream run to its end (not loaded)."""
        receiver = self._receiver
        if receiver is None:
            raise TransportError("receive_weights before init_process_group")
        handoff = BucketHandoff()
        receiving = run_in_thread(handoff.run, receiver, None if global_steps is None else int(global_steps))
        try:
            while (bucket := await run_in_thread(handoff.next_bucket)) is not None:
                for name, tensor in bucket:
                    yield name, tensor
                handoff.release()
        finally:
            handoff.close()
            report = await receiving
        if not report.ok:
            raise TransportError(f"receiving version {global_steps} failed: {report.error}")


def _node_ip() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
