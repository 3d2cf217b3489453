"""Admin routes locked down (issue 16, item 4): `serve` refuses a non-loopback host without a
token, `/v1/weights/receive` joins only allowed endpoints, `update_weights_from_disk` reads only
under the weight roots, and a 500 never echoes exception text."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from checkpoint_transport.spec import ReceiveReport, TransportSpec
from model_engine_server import launch
from model_engine_server.config import HttpConfig, ServerTransportConfig, load_config
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import ERROR_TYPES, Forbidden, ModelEngineError
from model_engine_server.http import admin_policy
from model_engine_server.http.admin_policy import (
    check_transport_spec,
    default_allowed_endpoints,
    endpoint_allowed,
    is_loopback,
    resolve_under_roots,
    unauthenticated_exposure,
)
from model_engine_server.http.app import create_app
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.weights_from_disk import update_weights_from_disk
from tests.test_http_support import ServerThread
from tests.test_serve import ServeProcess
from tests.test_update_from_disk import save_perturbed

TOKEN = "lockdown-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SECRET = "s3cret-/etc/shadow-at-10.9.8.7"
FOREIGN = "203.0.113.7"  # TEST-NET-3: never a node of ours


class FakeService:
    """Just enough of a `LogProbService` for the app; `fail_with` makes every call raise it."""

    def __init__(self, fail_with: BaseException | None = None, outcomes: list[Any] | None = None) -> None:
        self.fail_with = fail_with
        self.outcomes = outcomes
        self.updates: list[int] = []

    async def get_status(self) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        return {"weight_version": 0, "accepting": True}

    async def score(self, requests: list[Any], timeout_s: float | None = None) -> list[Any]:
        return list(self.outcomes or [])

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        pass


class RecordingService(FakeService):
    """A service whose weight session records the specs its workers would have joined."""

    def __init__(self) -> None:
        super().__init__()
        self.joined: list[TransportSpec] = []

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        self.joined.append(spec)
        return [ReceiveReport(rank=1, version=version, ok=True)]


def spec(address: str) -> dict[str, Any]:
    return TransportSpec(backend="gloo", group="g1", world_size=2, address=address, port=29500).model_dump()


# ---------------------------------------------------------------- serve refuses to expose itself
def test_serve_on_a_non_loopback_host_without_a_token_exits_2_naming_the_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MODEL_ENGINE_SERVER_TOKEN"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "model_engine_server.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=90,
    )
    assert done.returncode == 2, done.stderr
    assert "MODEL_ENGINE_SERVER_TOKEN" in done.stderr and "model_engine_server.http.auth_token" in done.stderr
    assert "--allow-unauthenticated-remote" in done.stderr
    assert not (tmp_path / "cache" / "model-engine-server").exists()  # refused before a model was made


def test_the_explicit_override_serves_with_a_loud_warning(tiny_model):
    server = ServeProcess(
        ["--host", "0.0.0.0", "--allow-unauthenticated-remote", f"model_engine_server.model_path={tiny_model}",
         "model_engine_server.device=cpu"],
        env={"MODEL_ENGINE_SERVER_TOKEN": ""},
    )
    try:
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        assert "UNAUTHENTICATED ADMIN ROUTES" in server.output
    finally:
        code = server.stop()
    assert code == 0, server.output


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost"])
def test_loopback_hosts_need_no_token(host):
    assert is_loopback(host)
    assert unauthenticated_exposure(HttpConfig(host=host), environ={}) is None


def test_a_token_from_the_config_or_the_environment_allows_a_remote_host():
    assert unauthenticated_exposure(HttpConfig(host="0.0.0.0"), environ={"MODEL_ENGINE_SERVER_TOKEN": "t"}) is None
    assert unauthenticated_exposure(HttpConfig(host="0.0.0.0", auth_token="t"), environ={}) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "server.example"):
        assert not is_loopback(host)
        assert unauthenticated_exposure(HttpConfig(host=host), environ={}) is not None


def test_the_override_is_a_config_key_too():
    loaded = load_config(None, ["model_engine_server.http.allow_unauthenticated_remote=true"])
    assert loaded.server.http.allow_unauthenticated_remote is True
    assert HttpConfig().allow_unauthenticated_remote is False


# ---------------------------------------------------------------- transport endpoints
def test_endpoints_match_loopback_cidrs_and_resolved_names():
    defaults = default_allowed_endpoints()
    assert endpoint_allowed("127.0.0.1", defaults) and endpoint_allowed("::1", defaults)
    assert endpoint_allowed("localhost", defaults)  # a name: every address it resolves to is loopback
    assert not endpoint_allowed(FOREIGN, defaults)
    assert endpoint_allowed(FOREIGN, ["203.0.113.0/24"]) and endpoint_allowed(FOREIGN, [FOREIGN])
    assert not endpoint_allowed("203.0.114.1", ["203.0.113.0/24"])
    assert endpoint_allowed("fd00::5", ["fd00::/8"]) and not endpoint_allowed("fd00::5", ["10.0.0.0/8"])
    assert endpoint_allowed("::ffff:203.0.113.7", ["203.0.113.0/24"])  # IPv4-mapped is the IPv4 address
    assert endpoint_allowed("127.0.0.1", ["localhost"])  # an allowed name stands for its addresses
    assert not endpoint_allowed("no-such-host.invalid", ["0.0.0.0/0", "::/0"])  # unresolvable: refused
    assert not endpoint_allowed("", ["0.0.0.0/0"])


def test_the_default_allows_the_alive_nodes_of_the_servers_ray_cluster(monkeypatch):
    calls: list[str] = []

    def nodes() -> list[dict[str, Any]]:
        calls.append("nodes")
        return [{"Alive": True, "NodeManagerAddress": "10.1.2.3"}, {"Alive": False, "NodeManagerAddress": "10.9.9.9"}]

    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, nodes=nodes)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    assert admin_policy.ray_node_addresses() == ["10.1.2.3"]
    assert endpoint_allowed("10.1.2.3", default_allowed_endpoints())
    assert not endpoint_allowed("10.9.9.9", default_allowed_endpoints())  # a dead node is no longer ours
    fake_ray.is_initialized = lambda: False
    calls.clear()
    assert admin_policy.ray_node_addresses() == [] and calls == []  # not connected: not asked


def test_listing_the_default_never_imports_ray():
    code = ("import sys; from model_engine_server.http.admin_policy import default_allowed_endpoints as d; "
            "print(d()); assert 'ray' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_spec_naming_a_foreign_host_is_forbidden_naming_host_and_setting():
    check_transport_spec(TransportSpec(backend="gloo", group="g", world_size=2), default_allowed_endpoints())
    with pytest.raises(Forbidden, match=rf"address='{FOREIGN}'.*model_engine_server\.transport\.allowed_endpoints"):
        check_transport_spec(TransportSpec(backend="gloo", group="g", world_size=2, address=FOREIGN), [])


def test_allowed_endpoints_are_checked_when_the_config_is_read():
    assert ServerTransportConfig(allowed_endpoints=[" 10.0.0.0/8 ", "trainer-0.cluster"]).allowed_endpoints == [
        "10.0.0.0/8", "trainer-0.cluster"]
    for bad in (["10.0.0.0/33"], [""], ["not a/cidr"]):
        with pytest.raises(ValidationError):
            ServerTransportConfig(allowed_endpoints=bad)


@pytest.fixture(scope="module")
def receiving():
    target = RecordingService()
    app = create_app(target, admin_token=TOKEN, allowed_endpoints=["198.51.100.0/24"])
    with ServerThread(app) as server:
        yield server.url, target


def test_receive_refuses_a_foreign_endpoint_and_never_tells_the_workers(receiving):
    url, target = receiving
    target.joined.clear()
    refused = httpx.post(f"{url}/v1/weights/receive", json={"spec": spec(FOREIGN), "version": 1}, headers=ADMIN)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "forbidden" and FOREIGN in error["message"]
    assert "model_engine_server.transport.allowed_endpoints" in error["message"]
    assert target.joined == []


def test_receive_joins_loopback_and_listed_endpoints(receiving):
    url, target = receiving
    target.joined.clear()
    for address in ("127.0.0.1", "198.51.100.20"):
        joined = httpx.post(f"{url}/v1/weights/receive", json={"spec": spec(address), "version": 1}, headers=ADMIN)
        assert joined.status_code == 200, joined.text
        assert joined.json()["reports"][0]["ok"]
    assert [s.address for s in target.joined] == ["127.0.0.1", "198.51.100.20"]
    assert httpx.post(f"{url}/v1/weights/receive", json={"spec": spec("127.0.0.1"), "version": 1}).status_code == 401


def test_build_serving_passes_the_allow_list_and_the_default_weight_root(tiny_model, monkeypatch):
    monkeypatch.setattr(launch, "build_service", lambda config, *observers: FakeService())
    loaded = load_config(None, [f"model_engine_server.model_path={tiny_model}",
                                "model_engine_server.transport.allowed_endpoints=[10.0.0.0/8]"])
    state = launch.build_serving(loaded).app.state
    assert state.allowed_endpoints == ("10.0.0.0/8",)
    assert state.weight_roots == (str(Path(tiny_model).resolve().parent),)
    loaded = load_config(None, [f"model_engine_server.model_path={tiny_model}", "model_engine_server.weight_roots=[/ckpt]"])
    assert launch.build_serving(loaded).app.state.weight_roots == ("/ckpt",)


# ---------------------------------------------------------------- weight roots
@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ckpt").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(root / "ckpt", target_is_directory=True)
    return root, outside


def test_paths_resolve_under_roots_and_cannot_escape(roots):
    root, outside = roots
    assert resolve_under_roots(root / "ckpt", [root]) == (root / "ckpt").resolve()
    assert resolve_under_roots(root / "inner", [root]) == (root / "ckpt").resolve()  # a link that stays inside
    assert resolve_under_roots(root / "missing", [root]) == (root / "missing").resolve()  # inside: 400 later
    messages = set()
    for path in (outside, outside / "missing", root / ".." / "outside", root / "escape", "/definitely/not/here"):
        with pytest.raises(Forbidden) as refused:
            resolve_under_roots(path, [root])
        messages.add(refused.value.message)
    assert len(messages) == 1 and "model_engine_server.weight_roots" in messages.pop()
    with pytest.raises(Forbidden):
        resolve_under_roots(root / "ckpt", [])


async def test_the_loader_refuses_outside_its_roots_before_reading(roots):
    root, outside = roots
    service = FakeService(fail_with=AssertionError("the service must not be asked"))
    with pytest.raises(Forbidden):
        await update_weights_from_disk(service, str(outside), roots=[str(root)])


@pytest.fixture(scope="module")
def from_disk(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("weight-roots")
    service = build_local_server(EngineSpec(model_path=str(tiny_model), device="cpu"),
                                 scheduler=SchedulerConfig(max_wait_ms=1, request_timeout_s=60))
    app = create_app(service, owns_service=True, admin_token=TOKEN, weight_roots=[str(root)])
    with ServerThread(app) as server:
        yield server.url, root


def test_update_from_disk_outside_the_roots_is_403_revealing_nothing(from_disk, tiny_model, tmp_path):
    url, root = from_disk
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    bodies = []
    for path in (tiny_model, tmp_path / "not-here", f"{root}/../{tmp_path.name}", root / "escape"):
        refused = httpx.post(f"{url}/v1/update_weights_from_disk", json={"model_path": str(path)}, headers=ADMIN)
        assert refused.status_code == 403, refused.text
        assert str(path) not in refused.text
        bodies.append(refused.json())
    assert all(body == bodies[0] for body in bodies)  # an existing and a missing folder look the same
    assert bodies[0]["error"]["code"] == "forbidden"
    assert httpx.get(f"{url}/v1/status").json()["weight_version"] == 0


def test_update_from_disk_inside_the_roots_loads_and_keeps_its_errors(from_disk, tiny_model):
    url, root = from_disk
    missing = httpx.post(f"{url}/v1/update_weights_from_disk", json={"model_path": str(root / "nope")}, headers=ADMIN)
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "model_path", missing.text
    save_perturbed(tiny_model, root / "step-1", seed=5)
    (root / "latest").symlink_to(root / "step-1", target_is_directory=True)
    loaded = httpx.post(f"{url}/v1/update_weights_from_disk", json={"model_path": str(root / "latest")},
                        headers=ADMIN, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert httpx.get(f"{url}/v1/status").json()["weight_version"] == loaded.json()["weight_version"] >= 1


# ---------------------------------------------------------------- a 500 tells only an id
@pytest.mark.parametrize("error", [RuntimeError(f"boom {SECRET}"), ModelEngineError(f"engine said {SECRET}")])
def test_a_500_answers_an_error_id_and_logs_the_text(error, caplog):
    with caplog.at_level(logging.ERROR), ServerThread(create_app(FakeService(fail_with=error))) as server:
        answered = httpx.get(f"{server.url}/v1/status")
    assert answered.status_code == 500
    assert SECRET not in answered.text
    body = answered.json()["error"]
    assert body["code"] == "internal_error" and body["error_id"] in body["message"]
    assert "see the server log" in body["message"]
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and SECRET in logged[0].getMessage()


def test_per_request_internal_errors_are_redacted_too():
    service = FakeService(outcomes=[ModelEngineError(f"replica said {SECRET}")])
    with ServerThread(create_app(service)) as server:
        answered = httpx.post(f"{server.url}/v1/logprobs", json={"requests": [{"input_ids": [1, 2, 3], "response_start": 1}]})
    assert answered.status_code == 500 and SECRET not in answered.text
    assert answered.json()["results"][0]["error"]["code"] == "internal_error"


def test_forbidden_is_a_registered_wire_error():
    assert ERROR_TYPES["forbidden"] is Forbidden and Forbidden("x").http_status == 403
