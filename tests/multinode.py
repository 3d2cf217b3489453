"""A multi-node Ray cluster on this machine, for the multi-node tests.

Each node is its own raylet with its own logical GPUs and CPUs (Ray's `cluster_utils.Cluster`,
the utility Ray's own multi-node tests use), all joined to one head: placement groups,
node-affinity, actor death on node loss and cross-node object transfer behave as on separate
machines, while engines run on CPU. The head has no GPU, as in a real deployment where the head
only schedules, so every worker lands on a "GPU node".

The cluster replaces the session's embedded Ray while it runs (a driver joins one Ray at a
time) and restores it afterwards; `shutdown` checks that every node process is gone.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

NODE_OBJECT_STORE_BYTES = 80 << 20
WORKER_ENV = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
              "HF_HUB_OFFLINE": "1"}


@dataclass
class GpuNodes:
    """The cluster, and its GPU nodes by Ray node id (the head is not among them)."""

    cluster: Any
    nodes: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, gpus: int = 1, cpus: int = 2) -> str:
        """Join one more GPU node; returns its node id once the GCS lists it alive."""
        node = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, object_store_memory=NODE_OBJECT_STORE_BYTES)
        self.cluster.wait_for_nodes()
        self.nodes[node.node_id] = node
        return node.node_id

    def remove(self, node_id: str) -> None:
        """Kill every process of that node at once (raylet, object store, its workers): a machine
        lost. Ray's `remove_node` kills the node's own processes; its workers would notice the
        dead raylet only a moment later (and could finish a call meanwhile), so they are killed
        too, and this returns once all of them are gone."""
        import psutil

        node = self.nodes.pop(node_id)
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        workers = raylet.children(recursive=True)
        for worker in workers:
            worker.kill()
        self.cluster.remove_node(node, allow_graceful=False)
        psutil.wait_procs(workers, timeout=30)


def start_cluster(gpu_nodes: int, namespace: str) -> GpuNodes:
    """A head without GPUs plus `gpu_nodes` one-GPU nodes, and this driver connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "object_store_memory": NODE_OBJECT_STORE_BYTES,
                        "include_dashboard": False},
    )
    nodes = GpuNodes(cluster)
    for _ in range(gpu_nodes):
        nodes.add()
    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    return nodes


def stop_cluster(nodes: GpuNodes, deadline_s: float = 30.0) -> list[str]:
    """Disconnect and stop every node; returns the node processes (raylets, GCS, object stores)
    still alive past the deadline — nothing, when the cluster cleaned up."""
    import psutil
    import ray

    processes = [
        (name, info.process.pid)
        for node in nodes.cluster.list_all_nodes()
        for name, infos in node.all_processes.items()
        for info in infos
        if info.process is not None
    ]
    ray.shutdown()
    nodes.cluster.shutdown()
    end = time.monotonic() + deadline_s
    while True:
        alive = [f"{name} (pid {pid})" for name, pid in processes if _running(psutil, pid)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.2)


def _running(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cluster_for_module(gpu_nodes: int, namespace: str) -> Iterator[GpuNodes]:
    """Body of a module-scoped fixture: the cluster for the module's tests, then the session's
    embedded Ray back (if it ran), and a failure if any node process outlived the cluster."""
    import ray

    from tests.conftest import start_embedded_ray

    embedded = ray.is_initialized()
    cluster = start_cluster(gpu_nodes, namespace)
    try:
        yield cluster
    finally:
        leftovers = stop_cluster(cluster)
        if embedded:
            start_embedded_ray()
    assert leftovers == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, deadline_s: float = 300.0) -> None:
    """Until `serve` (started as `server`, writing `log`) answers /health; its log on failure."""
    import httpx
    import pytest

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if server.poll() is not None:
            pytest.fail(f"serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"serve not healthy within {deadline_s:g} s:\n{log.read_text()[-4000:]}")
