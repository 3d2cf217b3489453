"""The deploy files, run or validated: `deploy/ray/*.sh` start a token-authenticated cluster on
this machine that `serve` joins, and `deploy/kuberay/raycluster.yaml` is read by Ray's own
KubeRay parser, its pod templates and Service validate against the Kubernetes schema, and its
server command and config load with our CLI and loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from model_engine_server.config import load_config
from model_engine_server.protocol import LogProbResult
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.multinode import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


ADMIN_TOKEN = "deploy-admin-t0ken"


def _kill_tree(marker: str) -> None:
    """Every process whose command line names `marker` (this cluster's temp dir), and their
    children: never `ray stop`, which would stop every Ray on the machine."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]
    victims = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for process in victims.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(list(victims.values()), timeout=30)
    assert not alive, f"processes left behind: {alive}"


def _run(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


FIND_THE_ACTOR = """
import json, sys
import ray
from clients.ray_client import RayLogProbClient
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.protocol import LogProbRequest
rules = TrainerSideConfig()  # a trainer's defaults: the actor `serve` names, in the server's default namespace
ray.init(address=sys.argv[1], namespace="a-trainers-own-job", log_to_driver=False)
client = RayLogProbClient.from_name(rules.actor_name, namespace=rules.ray_namespace, call_timeout_s=120).sync()
[result] = client.compute_log_probs([LogProbRequest.model_validate(json.loads(sys.argv[2]))])
print(json.dumps(result.log_probs.tolist()))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_start_head_and_join_worker_form_a_token_cluster_that_serve_joins(tiny_model, tmp_path):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="mes-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path / "home"), RAY_PORT=str(port), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    server = None
    try:
        head = _run(["bash", str(DEPLOY / "ray/start-head.sh")],
                    dict(env, RAY_START_ARGS=f"--num-cpus=1 --num-gpus=0 --temp-dir={temp_dir}"))
        assert head.returncode == 0, head.stderr[-3000:]
        assert f":{port}. On each worker node run:" in head.stdout
        token = _run(["ray", "get-auth-token"], env).stdout.strip()
        assert len(token) >= 32  # the head script made one (token authentication is the default)

        refused = _run(["bash", str(DEPLOY / "ray/join-worker.sh"), f"127.0.0.1:{port}"], env)
        assert refused.returncode == 2 and "RAY_AUTH_TOKEN is not set" in refused.stderr
        worker = _run(["bash", str(DEPLOY / "ray/join-worker.sh"), f"127.0.0.1:{port}"],
                      dict(env, RAY_AUTH_TOKEN=token, RAY_START_ARGS=f"--num-cpus=2 --num-gpus=2 --temp-dir={temp_dir}"))
        assert worker.returncode == 0, worker.stderr[-3000:]

        http_port = free_port()
        overrides = [f"model_engine_server.model_path={tiny_model}", "model_engine_server.num_replicas=2",
                     "model_engine_server.device=cpu", f"model_engine_server.ray.address=127.0.0.1:{port}",
                     "model_engine_server.scheduler.max_wait_ms=1"]
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "model_engine_server.cli", "serve", "--host", "127.0.0.1", "--port", str(http_port),
                 *overrides],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                # the admin token is in serve's environment only, not the cluster's where the app runs
                env=dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                         MODEL_ENGINE_SERVER_TOKEN=ADMIN_TOKEN),
            )
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url, server, log)
        assert httpx.post(f"{url}/v1/pause", timeout=30).status_code == 401
        assert httpx.post(f"{url}/v1/resume", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).status_code == 200
        requests = random_requests(6, 512, seed=90, max_len=150)
        response = httpx.post(f"{url}/v1/logprobs", json={"requests": [r.model_dump() for r in requests]}, timeout=120)
        assert response.status_code == 200, response.text
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        assert status["live_replicas"] == 2
        (node,) = {n for replica in status["replicas"] for n in replica["nodes"]}  # both on the 2-GPU worker
        assert node
        model = reference_model(tiny_model)
        for request, entry in zip(requests, response.json()["results"]):
            expected, _ = reference_log_probs(model, request)
            got = LogProbResult.from_wire(entry).log_probs
            torch.testing.assert_close(torch.from_numpy(got.copy()), expected, atol=1e-5, rtol=0)
        # another driver on the cluster (a trainer) finds the same service by its actor name
        lookup = _run([sys.executable, "-c", FIND_THE_ACTOR, f"127.0.0.1:{port}", json.dumps(requests[0].model_dump())],
                      dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
        assert lookup.returncode == 0, lookup.stderr[-3000:]
        by_actor = json.loads(lookup.stdout.strip().splitlines()[-1])
        torch.testing.assert_close(torch.tensor(by_actor), torch.tensor(response.json()["results"][0]["log_probs"]),
                                   atol=1e-5, rtol=0)  # scored alone there, in a batch of six here
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        _kill_tree(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------- KubeRay
def _manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kuberay/raycluster.yaml").read_text())}


def test_kuberay_raycluster_is_read_by_rays_own_kuberay_parser_as_the_scoring_layout():
    import ray
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = _manifest()["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    as_served = dict(cluster, metadata={**cluster["metadata"], "namespace": "default"})  # the API server adds it
    node_types = _derive_autoscaling_config_from_ray_cr(as_served)["available_node_types"]
    head, (workers,) = node_types.pop("headgroup"), node_types.values()
    assert head["resources"].get("GPU", 0) == 0  # the head schedules; replicas live on GPU workers
    scoring = load_config(DEPLOY / "fully-async-megatron-40gpu.yaml", ["model_engine_server.ray.address=auto"]).server
    assert workers["resources"]["GPU"] == scoring.gpus_per_node
    assert workers["max_workers"] * workers["resources"]["GPU"] >= scoring.total_gpus
    assert not scoring.in_process  # joins the cluster (ray.address=auto on the head pod)


def test_kuberay_pod_templates_and_service_validate_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = _manifest()
    spec = manifest["RayCluster"]["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]})
    version = "1.30.0"
    for name, template in templates.items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)
    kubernetes_validate.validate(manifest["Service"], version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail: a misspelt field
        broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                  "template": {"spec": {"containers": [{"name": "c", "imagee": "x"}]}}}
        kubernetes_validate.validate(broken, version, strict=True)


def test_kuberay_server_command_is_one_our_cli_and_config_loader_accept():
    """The head pod's server command, with the config its ConfigMap is made from (the file the
    manifest's `kubectl create configmap` line names), starts with our CLI and loader."""
    import re

    from model_engine_server.cli import build_parser

    text = (DEPLOY / "kuberay/raycluster.yaml").read_text()
    (source,) = re.findall(r"--from-file=training\.yaml=(\S+)", text)
    head = _manifest()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    (container,) = [c for c in head["containers"] if c["name"] == "model-engine-server"]
    command = container["command"]
    assert command[:2] == ["model-engine-server", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.config == "/config/training.yaml"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/config" in mounted
    loaded = load_config(ROOT / source, args.overrides, cli_values={"http.host": args.host, "http.port": args.port}).server
    assert loaded.ray.address == "auto" and (loaded.http.host, loaded.http.port) == ("0.0.0.0", 8000)
    assert not loaded.in_process
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] == loaded.http.port


def test_the_head_keeps_ray_up_until_serve_stopped_listening():
    """The head's pre-stop hook, run for real against a listener standing in for serve: it waits
    while the port takes connections and returns once it is closed. Without it the head's Ray
    stopped at the pod's SIGTERM, under the service actor that was draining."""
    import socket
    import time

    head = _manifest()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    (ray_head,) = [c for c in head["containers"] if c["name"] == "ray-head"]
    (server,) = [c for c in head["containers"] if c["name"] == "model-engine-server"]
    command = ray_head["lifecycle"]["preStop"]["exec"]["command"]
    port = server["ports"][0]["containerPort"]
    assert f"/{port}" in command[-1]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        hook = subprocess.Popen([*command[:-1], command[-1].replace(f"/{port}", f"/{listener.getsockname()[1]}")])
        try:
            time.sleep(2.5)
            assert hook.poll() is None, "the hook returned while serve was still listening"
        finally:
            listener.close()
        assert hook.wait(timeout=30) == 0
    assert head["terminationGracePeriodSeconds"] >= 60
