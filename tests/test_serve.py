"""`model-engine-server serve` as a real subprocess: zero-config start, verl config start, and a
SIGTERM under load that answers every accepted request and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from model_engine_server.protocol import LogProbRequest
from tests.helpers import reference_log_probs, reference_model

FIXTURES = Path(__file__).parent / "fixtures" / "verl"
LISTENING = re.compile(r"listening on (http://[\d.]+:\d+)")
START_TIMEOUT_S = 180


class ServeProcess:
    """`python -m model_engine_server.cli serve ...` with its output collected on a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model_engine_server.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = LISTENING.search(self.output)
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"serve did not start listening:\n{self.output}")

    def stop(self, sig: int | None = signal.SIGTERM, timeout_s: float = 120) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(timeout=10)
        return code


@pytest.fixture
def cache_home(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def score_json(url: str, requests: list[dict[str, Any]], timeout: float = 120) -> httpx.Response:
    # a fresh connection per call: a call is either refused at connect or accepted and answered
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return client.post(f"{url}/v1/logprobs", json={"requests": requests})


def test_serve_with_no_config_makes_and_serves_a_tiny_model(cache_home):
    server = ServeProcess([], env={"XDG_CACHE_HOME": str(cache_home)})
    try:
        assert server.url.startswith("http://127.0.0.1:")
        response = score_json(server.url, [{"input_ids": [1, 2, 3, 4], "response_start": 2, "return_entropy": True}])
        assert response.status_code == 200
        result = response.json()["results"][0]
        assert len(result["log_probs"]) == 2 and len(result["entropy"]) == 2
        assert (cache_home / "model-engine-server" / "tiny-qwen2" / "config.json").is_file()
        assert "made a tiny random Qwen2 checkpoint" in server.output
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0, server.output


def test_serve_from_a_verl_config_and_launch_overrides_scores_at_its_temperature(tiny_model):
    lines = (FIXTURES / "launch_megatron_16_16_8.args").read_text().splitlines()
    overrides = [line.replace("@MODEL_PATH@", str(tiny_model)) for line in lines if line and not line.startswith("#")]
    overrides += ["model_engine_server.strategy=fsdp", "model_engine_server.n_gpus_per_node=1",
                  "model_engine_server.device=cpu", "model_engine_server.timeout=0.005"]
    server = ServeProcess(["--config", str(FIXTURES / "fully_async_megatron_shipped.yaml"), *overrides])
    try:
        ids = list(range(20, 60))
        response = score_json(server.url, [{"input_ids": ids, "response_start": 15, "return_entropy": True}])
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        expected, expected_entropy = reference_log_probs(
            reference_model(tiny_model), LogProbRequest(input_ids=ids, response_start=15, temperature=0.7)
        )
        torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(result["entropy"]), expected_entropy, atol=1e-5, rtol=0)
    finally:
        code = server.stop()
    assert code == 0, server.output


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tiny_model, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"model_engine_server": {
        "model_path": str(tiny_model), "device": "cpu",
        "scheduler": {"max_tokens_per_batch": 1100, "max_inflight_batches": 1, "max_wait_ms": 1},
    }}))
    server = ServeProcess(["--config", str(config)])
    calls, per_call, length = 8, 4, 1000
    answers: list[httpx.Response | BaseException | None] = [None] * calls
    signalled = False

    def call(index: int) -> None:
        requests = [{"input_ids": [(index * 7 + j * 3 + k) % 500 + 1 for k in range(length)], "response_start": 10}
                    for j in range(per_call)]
        try:
            answers[index] = score_json(server.url, requests)
        except BaseException as error:  # recorded and asserted on below
            answers[index] = error

    try:
        assert httpx.post(f"{server.url}/v1/pause").status_code == 200  # hold the work until all calls are in
        threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/status").json()["scoring_calls_in_progress"] < calls:
            assert time.monotonic() < deadline, "calls were not all accepted"
            time.sleep(0.05)
        assert httpx.post(f"{server.url}/v1/resume").status_code == 200
        server.proc.send_signal(signal.SIGTERM)  # with 32 batches of ~1000 tokens still to compute
        signalled = True
        for thread in threads:
            thread.join(timeout=120)
        with pytest.raises(httpx.TransportError):  # no new connections once it stopped
            score_json(server.url, [{"input_ids": [1, 2], "response_start": 1}], timeout=10)
    finally:
        code = server.stop(sig=None if signalled else signal.SIGTERM)
    for index, answer in enumerate(answers):
        assert isinstance(answer, httpx.Response), f"call {index} got {answer!r}\n{server.output}"
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert len(results) == per_call and all(len(r["log_probs"]) == length - 10 for r in results)
    assert code == 0, server.output
    assert "shut down cleanly" in server.output


@pytest.mark.parametrize("runtime", ["in_process", "ray"])
def test_sigterm_while_paused_answers_the_held_requests_503_shutting_down_and_exits_0(tiny_model, tmp_path, runtime):
    """Requests queued behind a pause (or an open weight update) cannot run before the drain
    ends. Once uvicorn's wait ran out first and cut them off with a bare text 500; now the
    service answers them `shutting_down` (which clients retry elsewhere) before that wait.
    On the Ray runtime `ray.init` took SIGTERM over and exited at once, cutting them off."""
    config = tmp_path / "serve.yaml"
    section: dict = {"model_path": str(tiny_model), "device": "cpu", "http": {"graceful_shutdown_s": 2}, "runtime": runtime}
    if runtime == "ray":
        section["ray"] = {"num_cpus": 2}
    config.write_text(yaml.safe_dump({"model_engine_server": section}))
    server = ServeProcess(["--config", str(config)], env={"RAY_AUTH_MODE": "disabled"} if runtime == "ray" else None)
    answer: list[httpx.Response | BaseException] = []

    def call() -> None:
        try:
            answer.append(score_json(server.url, [{"input_ids": [1, 2, 3, 4], "response_start": 2}]))
        except BaseException as error:  # recorded and asserted on below
            answer.append(error)

    try:
        assert httpx.post(f"{server.url}/v1/pause").status_code == 200
        held = threading.Thread(target=call)
        held.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/status").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the call was not queued"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        held.join(timeout=120)
    finally:
        code = server.stop(sig=None)
    [response] = answer
    assert isinstance(response, httpx.Response), f"{response!r}\n{server.output}"
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down", response.text
    assert code == 0, server.output


KILL_THE_ACTOR = """
import sys
import ray
ray.init(address=sys.argv[1], namespace="someone-else", log_to_driver=False)
ray.kill(ray.get_actor("model-engine-server", namespace="model-engine-server"), no_restart=True)
"""


def test_on_the_ray_runtime_serve_exits_1_when_its_service_actor_dies(tiny_model):
    """The service (and its HTTP app) live in the named actor; a serve process left running with
    nothing behind it would keep a supervisor from restarting it."""
    env = {"RAY_AUTH_MODE": "disabled"}
    server = ServeProcess([f"model_engine_server.model_path={tiny_model}", "model_engine_server.runtime=ray",
                           "model_engine_server.ray.num_cpus=2"], env=env)
    try:
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        address = re.search(r"of the Ray cluster at (\S+)", server.output).group(1)
        killed = subprocess.run([sys.executable, "-c", KILL_THE_ACTOR, address], capture_output=True, text=True,
                                timeout=120, env={**os.environ, **env})
        assert killed.returncode == 0, killed.stderr[-2000:]
        code = server.stop(sig=None, timeout_s=60)
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert code == 1 and "the service actor ended" in server.output, server.output[-3000:]
