"""Weight sync into a replica spanning two Ray nodes, beside one whose workers share a node.

A Ray cluster of several raylets runs on this machine (the head, one node with two logical
GPUs, two nodes with one each). Two replicas of the same ~90 MB decoder (HF engine, fp32, two
workers each) are placed at once: `one_node` on the two-GPU node, `two_nodes` across the two
one-GPU nodes. The publisher in this driver syncs each in turn, alternating, through each
transport (gloo: a `torch.distributed` broadcast group to the workers' processes; ray: buckets
in Ray's object store, pulled by each worker's raylet), while a client keeps scoring on that
replica, so the pause window includes a real drain. Figures per transport and placement:
`gb_per_s` (bytes of one copy of the weights / transfer time, best of the repeats),
`pause_window_s` (begin -> commit as the server saw it), and the two-node / one-node ratio.
All raylets share this machine's memory and cores, so "across nodes" here measures the
extra hops (object-store transfers between raylets, TCP between processes), not a network.

    python -m bench sync_multinode [--quick] [--json F]
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import fixed_targets

targets = fixed_targets([])  # figures only: two placements side by side, no threshold
REPLICAS = {"one_node": (1, 2), "two_nodes": (2, 1)}  # nodes_per_replica, gpus_per_replica_node


def _cluster(object_store_bytes: int):  # -> ray.cluster_utils.Cluster, connected
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                             "object_store_memory": object_store_bytes})
    cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=object_store_bytes)  # both one_node workers
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=object_store_bytes)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="bench-sync-multinode", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    return cluster


async def _keep_scoring(manager: Any, stop: asyncio.Event, answered: list[int]) -> None:
    from model_engine_server.protocol import LogProbResult

    request = {"input_ids": list(range(2, 66)), "response_start": 32}
    while not stop.is_set():
        outcomes = await manager.score([request] * 2)
        answered.append(sum(1 for o in outcomes if isinstance(o, LogProbResult)))


async def _measure(model_path: Path, weights: dict, repeats: int, bucket_bytes: int) -> dict[str, Any]:
    import ray

    from checkpoint_transport.spec import TransportConfig
    from clients.publisher import WeightPublisher
    from model_engine_server.engines.base import EngineSpec
    from model_engine_server.scheduler import SchedulerConfig
    from replica.config import ReplicaConfig
    from replica.manager import ReplicaManager

    managers = {}
    for name, (nnodes, per_node) in REPLICAS.items():
        config = ReplicaConfig(engine=EngineSpec(model_path=str(model_path)), nodes_per_replica=nnodes,
                               gpus_per_replica_node=per_node, scheduler=SchedulerConfig(max_wait_ms=1.0),
                               health_check_interval_s=None, weight_bucket_mb=max(1, bucket_bytes >> 20))
        managers[name] = ReplicaManager(config)
        managers[name].replicas[0].name = f"bench-{name}"  # placement-group names, unique per namespace
    await asyncio.gather(*(m.start() for m in managers.values()))
    figures: dict[str, Any] = {"nodes": {name: [i.node_id[:8] for i in await m.replicas[0].worker_placements()]
                                         for name, m in managers.items()}}
    address = ray.util.get_node_ip_address()
    version = 0
    try:
        for backend in ("gloo", "ray"):
            transport = TransportConfig(backend=backend, bucket_bytes=bucket_bytes, timeout_s=300, address=address)
            publishers = {name: WeightPublisher(m, transport) for name, m in managers.items()}
            runs: dict[str, list] = {name: [] for name in managers}
            version += 1
            for name, publisher in publishers.items():  # warm-up: rendezvous, first touch of every page
                await publisher.update_weights(weights, version)
            order = list(publishers.items())
            for repeat in range(repeats):  # alternate, so both placements see the same machine noise
                version += 1
                turn = repeat % len(order)  # and each goes first in turn
                for name, publisher in order[turn:] + order[:turn]:
                    stop, answered = asyncio.Event(), []
                    load = asyncio.ensure_future(_keep_scoring(managers[name], stop, answered))
                    await asyncio.sleep(0.2)
                    runs[name].append(await publisher.update_weights(weights, version))
                    stop.set()
                    await load
            for publisher in publishers.values():
                await publisher.close()
            figures[backend] = _summarise(runs)
    finally:
        await asyncio.gather(*(m.shutdown(drain=False, timeout_s=10) for m in managers.values()))
    return figures


def _summarise(runs: dict[str, list]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, reports in runs.items():
        best = min(reports, key=lambda r: r.transfer_s)
        out[name] = {"gb_per_s": best.gb_per_s, "transfer_s": best.transfer_s, "pause_window_s": best.pause_window_s,
                     "buckets": best.send.buckets}
    out["two_nodes_over_one_node_gb_per_s"] = out["two_nodes"]["gb_per_s"] / out["one_node"]["gb_per_s"]
    out["two_nodes_over_one_node_pause"] = out["two_nodes"]["pause_window_s"] / out["one_node"]["pause_window_s"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    import ray

    from model_engine_server.engines.base import EngineSpec, build_engine
    from model_engine_server.tiny_model import TinyModelShape, make_tiny_model

    shape = (TinyModelShape(hidden_size=256, intermediate_size=768, num_layers=2, vocab_size=8192, num_heads=4)
             if quick else TinyModelShape(hidden_size=512, intermediate_size=1536, num_layers=4, vocab_size=16384,
                                          num_heads=8))
    bucket_bytes = (4 << 20) if quick else (32 << 20)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        model_path = make_tiny_model(Path(folder) / "model", shape, seed=0)
        weights = dict(build_engine("hf", EngineSpec(model_path=str(model_path))).export_weights())
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        cluster = _cluster(object_store_bytes=max(256 << 20, 6 * bucket_bytes))
        try:
            figures = asyncio.run(_measure(model_path, weights, 2 if quick else 4, bucket_bytes))
        finally:
            ray.shutdown()
            cluster.shutdown()
    figures.update(model_mb=round(nbytes / 1e6, 1), bucket_mb=bucket_bytes >> 20, ray_nodes=4,
                   run_s=round(time.monotonic() - started, 1))
    return figures
