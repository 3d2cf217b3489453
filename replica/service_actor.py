"""`LogProbServiceActor`: the service `serve` builds, inside an async Ray actor, so any Ray actor
(a rollout agent loop, a trainer rank) reaches it through a handle (`clients.ray_client`).

A thin shell over the one composition root (`model_engine_server.launch.build_service`): the
same config gives the same product as `serve` (reference mode, disk updates under the same
roots, the configured temperature, the weight session). Every method translates and returns
wire-plain values (outcomes as `outcome_to_wire` dicts, reports as dicts), so the Ray-handle
client rebuilds exactly what the HTTP client does. The actor owns the replicas' placement
groups and workers; `shutdown()` removes them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import ray
import torch

from checkpoint_transport.spec import ReceiveReport, TransportSpec
from model_engine_server.config import ServerConfig
from model_engine_server.launch import build_service, build_serving_for, weight_roots_for
from model_engine_server.errors import Overloaded
from model_engine_server.protocol import LogProbRequest, outcome_to_wire
from model_engine_server.http.admin_policy import exposure_remedy, unauthenticated_exposure
from replica.http_in_actor import HttpInActor
from replica.manager import ReplicaManager

DEFAULT_ACTOR_NAME = "model-engine-server"
DEFAULT_NAMESPACE = "model-engine-server"  # `RayConfig.namespace`, where `serve` creates the actor


class LogProbServiceActor:
    """Holds the service the config describes; created by `start_service_actor`. With
    `with_http` it also serves the HTTP app over that same service (`serve` on the Ray runtime:
    one service, reached by HTTP and by actor handle alike)."""

    def __init__(self, config: ServerConfig | dict[str, Any], with_http: bool = False) -> None:
        self.config = ServerConfig.model_validate(config)
        self.serving = build_serving_for(self.config, owns_service=False) if with_http else None
        self.service = self.serving.service if self.serving else build_service(self.config)
        self.weight_roots = weight_roots_for(self.config)
        self.http: HttpInActor | None = None

    async def start(self) -> dict[str, Any]:
        await self.service.start()
        return await self.service.get_status()

    async def serve_http(self, host: str, port: int) -> tuple[str, int]:
        """Serve the app on `host:port` (0: any free port) from this actor's event loop; returns
        where it listens."""
        if self.serving is None:
            raise RuntimeError("this service actor was created without its HTTP app (with_http=False)")
        http_config = self.config.http.model_copy(update={"host": host})
        exposure = unauthenticated_exposure(http_config)  # checked where the app runs, with its token
        if exposure is not None and not http_config.allow_unauthenticated_remote:
            raise RuntimeError(f"refusing to serve: {exposure}; {exposure_remedy(http_config)}")
        if self.http is not None:
            raise RuntimeError("this service actor serves HTTP already")
        http = HttpInActor(self.serving.app, self.config.http.graceful_shutdown_s)
        where = await http.start(host, port)
        self.http = http
        return where

    async def ping(self) -> bool:
        return True

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        hint = self.config.http.retry_after_s  # what a client waits before resending a refused request
        return [outcome_to_wire(o.with_hint(hint) if isinstance(o, Overloaded) else o)
                for o in await self.service.score(requests, timeout_s)]

    async def pause_serving(self) -> None:
        await self.service.pause_serving()

    async def resume_serving(self) -> None:
        await self.service.resume_serving()

    async def get_status(self) -> dict[str, Any]:
        return await self.service.get_status()

    # ---------------------------------------------------------------- the weight session
    async def begin_weight_update(self, version: int) -> int:
        return await self.service.begin_weight_update(version)

    async def load_weights(self, bucket_refs: list["ray.ObjectRef"], version: int | None = None) -> list[str]:
        """Buckets stay in the caller's object store (each nested in a list, so Ray passes the
        reference on); replica workers fetch them from there."""
        names: list[str] = []
        for ref in bucket_refs:
            names += await self.service.load_weights(await _materialise_unless_ray(self.service, ref), version)
        return names

    async def receive_weights(self, spec: dict[str, Any], version: int) -> list[dict[str, Any]]:
        reports = await self.service.receive_weights(TransportSpec.model_validate(spec), version)
        return [report.to_dict() for report in reports]

    async def commit_weight_update(self, version: int) -> None:
        await self.service.commit_weight_update(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.service.abort_weight_update(reason, version)

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        return await self.service.update_weights(named_tensors, version)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        """Check an HF checkpoint folder on this actor's node fits, then load it as `version`;
        only folders under the configured weight roots are read (as over HTTP)."""
        return await self.service.update_weights_from_disk(model_path, version, roots=self.weight_roots)

    # ---------------------------------------------------------------- replica operations (Ray runtime)
    def _manager(self) -> ReplicaManager:
        policy = self.service.policy
        if not isinstance(policy, ReplicaManager):
            raise TypeError(f"this service runs its policy {type(policy).__name__}, not on Ray replicas")
        return policy

    async def health(self) -> list[dict[str, Any]]:
        return await self._manager().health()

    async def restart_replica(self, index: int, timeout_s: float | None = None) -> None:
        await self._manager().restart_replica(index, timeout_s)

    async def worker_placements(self) -> list[list[dict[str, Any]]]:
        """Per replica, per rank: where the worker runs (GPU ids, placement group, node)."""
        return [[asdict(info) for info in replica.worker_infos] for replica in self._manager().replicas]

    async def worker_handles(self, replica_index: int) -> list[Any]:
        """The worker actor handles of one replica, by rank (operations and fault drills)."""
        return list(self._manager().replicas[replica_index].workers)

    # ---------------------------------------------------------------- syncs the workers are handed (`replica.worker_driven`)
    async def hold_for_worker_update(self) -> None:
        """Pause for a sync verl's checkpoint engine drives (running batches finish, new requests wait)."""
        await self._manager().hold_for_worker_update()

    async def release_after_worker_update(self) -> None:
        """Resume after it (a failed one resumes by itself)."""
        await self._manager().release_after_worker_update()

    async def join_worker_update(self, version: int, replica_index: int, rank: int) -> bool:
        """Called by a replica worker that verl's checkpoint engine is about to stream `version`
        into: waits until the update is open; False means the version is already served."""
        return await self._manager().join_worker_update(version, replica_index, rank)

    async def report_worker_update(self, version: int, replica_index: int, rank: int, report: dict[str, Any]) -> None:
        """That worker's receive report; returns once the update committed, else raises why not."""
        await self._manager().report_worker_update(version, replica_index, rank, ReceiveReport.from_dict(report))

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """The service first (what can still run finishes, what cannot is answered 503
        `shutting_down`), then the HTTP server, if any, closes its connections."""
        await self.service.shutdown(drain, timeout_s)
        if self.http is not None:
            await self.http.stop()


async def _materialise_unless_ray(service: Any, ref: "ray.ObjectRef") -> Any:
    """Ray replicas take the reference itself (workers fetch from the caller's store); an
    in-process policy needs the tensors here."""
    if isinstance(service.policy, ReplicaManager):
        return ref
    return await ref


async def start_service_actor(
    config: ServerConfig | dict[str, Any],
    name: str | None = DEFAULT_ACTOR_NAME,
    namespace: str | None = DEFAULT_NAMESPACE,
    with_http: bool = False,
    **options: Any,
) -> Any:  # -> ray.actor.ActorHandle
    """Create the service actor (named, so other actors can look it up: in `namespace`, by
    default where trainers look; None: the caller's), start its replicas and return its handle;
    if start-up fails the actor is killed and the error raised. `options`: more Ray actor
    options (`serve` pins the actor to its own node)."""
    actor_class = ray.remote(LogProbServiceActor)
    config = config.model_dump() if isinstance(config, ServerConfig) else config
    handle = actor_class.options(name=name, namespace=namespace, num_cpus=0, max_concurrency=10_000,
                                 **options).remote(config, with_http)
    try:
        await handle.start.remote()
    except BaseException:
        ray.kill(handle, no_restart=True)
        raise
    return handle


async def stop_service_actor(handle: Any, drain: bool = True, timeout_s: float = 30.0) -> None:
    """Shut the replicas down (no actor or placement group left), then end the actor."""
    try:
        await handle.shutdown.remote(drain, timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
