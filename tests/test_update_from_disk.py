"""`update_weights_from_disk`: an HF checkpoint folder is checked against the served model before
the update begins (a bad folder changes nothing), then served as the next version; over HTTP
(`POST /v1/update_weights_from_disk`) with the sync and async clients, on a single-model server."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.http_client import HttpLogProbClient, SyncHttpLogProbClient
from model_engine_server.config import HttpConfig
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import InvalidRequest
from model_engine_server.http.app import create_app
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model, perturbed_weights
from model_engine_server.weights_from_disk import plan_load
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread

TOKEN = "disk-admin-token"
TOLERANCE = 1e-5


# ---------------------------------------------------------------- checkpoints on disk (shared with test_ref_mode*)
def save_perturbed(source: Path, target: Path, seed: int) -> Path:
    """A checkpoint one 'optimizer step' away from `source`, saved by transformers itself."""
    model = reference_model(source)
    model.load_state_dict(perturbed_weights(dict(model.state_dict()), seed))
    model.save_pretrained(target)
    return target


def copy_with_tensors(source: Path, target: Path, edit) -> Path:  # edit: dict[str, Tensor] -> dict[str, Tensor]
    """`source`'s config with its tensors changed by `edit` (names dropped, added, reshaped, cast)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(edit(dict(load_file(str(source / "model.safetensors")))), str(target / "model.safetensors"))
    return target


def assert_log_probs_of(model_dir: Path, requests: list[LogProbRequest], results: list, field: str = "log_probs") -> None:
    model = reference_model(model_dir)
    for request, result in zip(requests, results):
        expected, _ = reference_log_probs(model, request)
        got = result[field] if isinstance(result, dict) else getattr(result, field)
        torch.testing.assert_close(torch.tensor(np.asarray(got, dtype=np.float32)), expected, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def served_model(tiny_model):
    return build_engine("hf", EngineSpec(model_path=str(tiny_model), device="cpu"))


# ---------------------------------------------------------------- the check before the update
def test_a_checkpoint_saved_by_transformers_fits_and_loads_every_served_tensor(tiny_model, tmp_path, served_model):
    folder = save_perturbed(tiny_model, tmp_path / "new", seed=1)
    plan = plan_load(folder, served_model.info, served_model.weight_specs())
    assert set(plan.load_as) == set(served_model.weight_specs())
    loaded = dict(plan.named_tensors())
    on_disk = load_file(str(folder / "model.safetensors"))
    for name, tensor in loaded.items():
        assert torch.equal(tensor, on_disk[name])


def test_a_tied_models_lm_head_in_the_checkpoint_is_skipped(tiny_model, tmp_path, served_model):
    assert served_model.info.tied_embeddings and "lm_head.weight" not in served_model.weight_specs()
    folder = copy_with_tensors(tiny_model, tmp_path / "with_head",
                               lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    plan = plan_load(folder, served_model.info, served_model.weight_specs())
    assert plan.skipped == ["lm_head.weight"] and "lm_head.weight" not in plan.load_as


def test_bf16_tensors_are_cast_to_the_served_dtype(tiny_model, tmp_path, served_model):
    folder = copy_with_tensors(tiny_model, tmp_path / "bf16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    stored = load_file(str(folder / "model.safetensors"))
    for name, tensor in plan_load(folder, served_model.info, served_model.weight_specs()).named_tensors():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, stored[name].float())


def _drop_one(tensors):
    return {k: v for k, v in tensors.items() if k != "model.norm.weight"}


def _add_one(tensors):
    return {**tensors, "model.extra.weight": torch.zeros(3)}


def _reshape_one(tensors):
    return {**tensors, "model.norm.weight": torch.zeros(7)}


def _int_one(tensors):
    return {**tensors, "model.norm.weight": torch.zeros(tensors["model.norm.weight"].shape, dtype=torch.int32)}


@pytest.mark.parametrize("edit,reason", [
    (_drop_one, "1 tensor(s) missing, e.g. ['model.norm.weight']"),
    (_add_one, "the served model does not have, e.g. ['model.extra.weight']"),
    (_reshape_one, "model.norm.weight [7] (served [64])"),
    (_int_one, "dtypes that cannot be cast: model.norm.weight torch.int32"),
], ids=["missing", "unknown", "shape", "dtype"])
def test_each_difference_is_refused_naming_the_tensor(tiny_model, tmp_path, served_model, edit, reason):
    folder = copy_with_tensors(tiny_model, tmp_path / "edited", edit)
    with pytest.raises(InvalidRequest, match="does not fit") as refused:
        plan_load(folder, served_model.info, served_model.weight_specs())
    assert reason in refused.value.message and refused.value.field == "model_path"


def test_another_architecture_or_no_checkpoint_is_refused(tiny_models, tmp_path, served_model):
    specs = served_model.weight_specs()
    with pytest.raises(InvalidRequest, match="holds a LlamaForCausalLM checkpoint; the server serves Qwen2ForCausalLM"):
        plan_load(tiny_models["llama_untied"], served_model.info, specs)
    with pytest.raises(InvalidRequest, match="is not a folder"):
        plan_load(tmp_path / "absent", served_model.info, specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="no config.json"):
        plan_load(tmp_path / "empty", served_model.info, specs)


# ---------------------------------------------------------------- over HTTP, single-model server
@pytest.fixture(scope="module")
def served(tiny_model):
    service = build_local_server(EngineSpec(model_path=str(tiny_model), device="cpu"),
                                 scheduler=SchedulerConfig(max_wait_ms=1, request_timeout_s=60))
    app = create_app(service, HttpConfig(), owns_service=True, admin_token=TOKEN)
    with ServerThread(app) as server:
        yield server


async def test_clients_load_folders_as_the_next_version_and_serve_them(served, tiny_model, tmp_path):
    requests = random_requests(4, 512, seed=71, max_len=80)
    first = save_perturbed(tiny_model, tmp_path / "first", seed=2)
    second = save_perturbed(tiny_model, tmp_path / "second", seed=3)
    with SyncHttpLogProbClient(served.url, admin_token=TOKEN) as client:
        start = client.get_status()["weight_version"]
        assert client.update_weights_from_disk(str(first)) == start + 1  # default: current + 1
        results = client.compute_log_probs(requests)
    assert {r.weight_version for r in results} == {start + 1}
    assert_log_probs_of(first, requests, results)
    async with HttpLogProbClient(served.url, admin_token=TOKEN, wire="json") as client:
        assert await client.update_weights_from_disk(str(second), start + 5) == start + 5
        results = await client.compute_log_probs(requests)
        with pytest.raises(InvalidRequest, match="greater than the current weight version") as stale:
            await client.update_weights_from_disk(str(first), start + 5)
    assert stale.value.field == "weight_version"
    assert {r.weight_version for r in results} == {start + 5}
    assert_log_probs_of(second, requests, results)


def test_a_bad_folder_is_400_and_the_old_weights_keep_serving(served, tiny_models):
    headers = {"authorization": f"Bearer {TOKEN}"}
    probe = {"requests": [{"input_ids": list(range(20, 60)), "response_start": 5}]}
    before = httpx.post(f"{served.url}/v1/logprobs", json=probe).json()["results"][0]
    for folder in (tiny_models["llama_untied"], "/definitely/not/here"):
        refused = httpx.post(f"{served.url}/v1/update_weights_from_disk", json={"model_path": str(folder)}, headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["field"] == "model_path"
    after = httpx.post(f"{served.url}/v1/logprobs", json=probe).json()["results"][0]
    assert after["weight_version"] == before["weight_version"] and after["log_probs"] == before["log_probs"]
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_the_route_is_admin_only_and_checks_its_body(served):
    url = f"{served.url}/v1/update_weights_from_disk"
    assert httpx.post(url, json={"model_path": "/x"}).status_code == 401
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, json={"path": "/x"}, headers=headers).status_code == 422
    assert httpx.post(url, json={"model_path": "/x", "weight_version": -1}, headers=headers).status_code == 422


def test_a_checkpoint_of_other_shapes_names_them(tiny_model, tmp_path, served_model):
    other = make_tiny_model(tmp_path / "wide", TinyModelShape(hidden_size=32, num_heads=2, num_kv_heads=1))
    with pytest.raises(InvalidRequest, match=r"of other shapes: model.embed_tokens.weight \[512, 32\] \(served \[512, 64\]\)"):
        plan_load(other, served_model.info, served_model.weight_specs())
