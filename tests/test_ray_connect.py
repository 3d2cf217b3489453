"""Joining Ray, in fresh processes: embedded with logical GPUs when no address is given, the
cluster `RAY_ADDRESS` names when a job runner set it (`ray job submit`)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_connect_ray_embedded_declares_the_logical_gpus_asked_for(tmp_path):
    """In a fresh process (the session's Ray is already up here): no address -> local Ray
    with as many logical GPUs as the configuration needs when there is no CUDA."""
    script = (
        "import ray, torch\n"
        "from replica.placement import connect_ray\n"
        "connect_ray(None, 3, num_cpus=1, object_store_memory=80 * 1024 * 1024)\n"
        "gpus = ray.cluster_resources().get('GPU', 0)\n"
        "expected = torch.cuda.device_count() or 3\n"
        "print('GPUS', gpus, expected)\n"
        "ray.shutdown()\n"
        "assert gpus == expected, (gpus, expected)\n"
    )
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.getcwd())
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_connect_ray_joins_the_cluster_named_by_ray_address_without_embedded_sizes(ray_cluster, tmp_path):
    """A `ray job submit` entrypoint has RAY_ADDRESS and no configured address: join that
    cluster (the session's, with its 4 logical GPUs), dropping sizes Ray refuses when joining."""
    script = (
        "import ray\n"
        "from replica.placement import connect_ray\n"
        "connect_ray(None, 3, num_cpus=1, object_store_memory=80 * 1024 * 1024)\n"
        "print('GPUS', ray.cluster_resources().get('GPU', 0))\n"
        "ray.shutdown()\n"
    )
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.getcwd(), RAY_ADDRESS=address)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPUS 4.0" in done.stdout, done.stdout
