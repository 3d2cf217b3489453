"""Getting Ray and GPUs: `connect_ray` (embedded or a cluster, one code path) and the
placement groups that give each replica its dedicated GPUs, with a bounded wait.

A replica of `nodes_per_replica x gpus_per_replica_node` workers asks for one placement group per
node, each of `gpus_per_replica_node` one-GPU bundles packed onto a single node (STRICT_PACK), so the workers
of a node can use NVLink/shared memory. Ranks are node-major: bundle `j` of node group `n` is
rank `n * gpus_per_replica_node + j`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


class PlacementTimeout(RuntimeError):
    """The cluster could not give a replica its GPUs within the start timeout."""


EMBEDDED_ONLY_KWARGS = ("num_cpus", "num_gpus", "resources", "object_store_memory")  # Ray refuses them when joining


def connect_ray(address: str | None = None, num_gpus_needed: int = 0, **init_kwargs: Any) -> None:
    """Join Ray: embedded on this machine when `address` is None (and `RAY_ADDRESS` is unset),
    else `ray.init(address=...)`.

    Does nothing when Ray is already initialised (a test session, a trainer that started it).
    Embedded on a machine without CUDA, Ray is told it has `num_gpus_needed` logical GPUs, so a
    configuration written for a GPU cluster places its bundles the same way here while the
    engines run on CPU.
    """
    if ray.is_initialized():
        return
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    for name in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    init_kwargs.setdefault("runtime_env", {"env_vars": env_vars})
    init_kwargs.setdefault("include_dashboard", False)
    address = address or os.environ.get("RAY_ADDRESS") or None  # `ray job submit` entrypoints carry it
    if address is not None:
        sizes = sorted(key for key in EMBEDDED_ONLY_KWARGS if init_kwargs.pop(key, None) is not None)
        if sizes:
            logger.info("joining the Ray cluster at %s: %s apply to an embedded Ray only", address, ", ".join(sizes))
        ray.init(address=address, **init_kwargs)
        return
    if not torch.cuda.is_available() and num_gpus_needed > 0:
        init_kwargs.setdefault("num_gpus", num_gpus_needed)
    ray.init(address="local", **init_kwargs)  # not a cluster an earlier `ray start` left on this machine


@dataclass
class ReplicaPlacement:
    """The placement groups of one replica and where each rank's bundle is."""

    groups: list[PlacementGroup]
    gpus_per_node: int
    cpus_per_bundle: float

    @property
    def world_size(self) -> int:
        return len(self.groups) * self.gpus_per_node

    def scheduling_for(self, rank: int) -> PlacementGroupSchedulingStrategy:
        """Pin `rank` to its own one-GPU bundle (so every worker gets a distinct GPU)."""
        node, bundle = divmod(rank, self.gpus_per_node)
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[node],
            placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=True,
        )

    def bundle_of(self, rank: int) -> tuple[int, int]:
        """(node group, bundle index) of `rank`."""
        return divmod(rank, self.gpus_per_node)

    def remove(self) -> None:
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception as error:  # already removed, or Ray is going away
                logger.debug("removing placement group %s: %s", group.id, error)
        self.groups = []


def _resources_line(resources: dict[str, float]) -> str:
    return f"GPU={resources.get('GPU', 0):g}, CPU={resources.get('CPU', 0):g}"


async def reserve_replica_gpus(
    nnodes: int,
    gpus_per_node: int,
    cpus_per_bundle: float,
    timeout_s: float,
    name: str,
    strategy: str = "STRICT_PACK",
) -> ReplicaPlacement:
    """Create the replica's placement groups and wait until all are placed, at most `timeout_s`.

    On timeout every group asked for is removed (no pending reservation is left to grab GPUs
    later) and `PlacementTimeout` names what was asked and what the cluster has.
    """
    bundle = {"GPU": 1.0, "CPU": float(cpus_per_bundle)}
    groups = [placement_group([dict(bundle)] * gpus_per_node, strategy=strategy, name=f"{name}-node{n}") for n in range(nnodes)]
    placement = ReplicaPlacement(groups, gpus_per_node, cpus_per_bundle)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(group.ready() for group in groups))
    except TimeoutError:
        placement.remove()
        total, available = ray.cluster_resources(), ray.available_resources()
        raise PlacementTimeout(
            f"{name}: asked for {nnodes} node(s) x {gpus_per_node} bundle(s) of {{GPU: 1, CPU: {cpus_per_bundle:g}}} "
            f"({nnodes * gpus_per_node} GPUs, {strategy} per node); not placed within {timeout_s:g} s. "
            f"Cluster total: {_resources_line(total)} on {sum(1 for n in ray.nodes() if n.get('Alive'))} node(s); "
            f"available now: {_resources_line(available)}. Lower num_replicas / gpus_per_replica_node, free GPUs, "
            "or add nodes."
        ) from None
    except BaseException:
        placement.remove()
        raise
    return placement
