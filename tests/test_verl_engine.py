"""`backend: verl`: verl's own `TrainingWorker` behind the server, against verl's own recompute.

The reference (`tests/verl_reference.py`) is the trainer's old-log-prob path in this process:
left-right padded batch -> `left_right_2_no_padding` -> `TrainingWorker.infer_batch` ->
`no_padding_2_padding`. The server gets the same sequences as packed rows over HTTP and must give
the same numbers (fp32, CPU) to 1e-6, and the HF backend's to `CROSS_PROCESS_ATOL`. Weight syncs
go through the server's session (begin -> transport -> commit) into the FSDP2 parameters.

The CPU tests need verl's CPU platform in this process, which `verl_reference` selects only when
there is no CUDA; on a CUDA machine the `gpu` test covers the nvidia path instead.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from checkpoint_transport.spec import TransportConfig
from clients.http_client import SyncHttpLogProbClient
from clients.local_client import LocalClient
from clients.publisher import WeightPublisher
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.cli import main as cli_main
from model_engine_server.config import ConfigError, ServerConfig, load_config
from model_engine_server.config.verl_engine import VerlEngineConfig
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import InvalidRequest, WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from replica.config import ReplicaConfig
from replica.worker import ModelEngineWorker, free_port
from tests._tolerances import CROSS_PROCESS_ATOL, assert_distinguishable, assert_scores_close, max_abs_diff
from tests.test_replica import assert_nothing_left
from tests.test_serve import ServeProcess
from tests.verl_reference import left_right_batch, model_path_str, recompute, training_worker

VERL_ATOL = 1e-6  # the same engine on the same rows: verl's recompute vs the server (fp32, CPU)
GPU_ATOL = 1e-4  # CUDA: verl's and the HF backend's kernels differ (fp32)
SHAPES = [(6, 2), (11, 5), (24, 1), (40, 39), (64, 20), (97, 60)]  # (length, response_start)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reference needs verl's CPU platform")


# ---------------------------------------------------------------- shared set-up
def sequences(seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, 512) for _ in range(length)], start) for length, start in SHAPES]


def requests_at(temperature: float, seed: int = 0) -> list[LogProbRequest]:
    return [LogProbRequest(input_ids=ids, response_start=start, temperature=temperature, return_entropy=True)
            for ids, start in sequences(seed)]


def verl_scores(worker: Any, temperature: float, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """verl's recompute of `sequences(seed)`: per sequence its response log-probs and entropies."""
    pairs = sequences(seed)
    batch = left_right_batch([ids[:start] for ids, start in pairs], [ids[start:] for ids, start in pairs])
    log_probs, entropy = recompute(worker, batch, temperature)
    widths = [len(ids) - start for ids, start in pairs]
    return ([log_probs[row, :width].numpy() for row, width in enumerate(widths)],
            [entropy[row, :width].numpy() for row, width in enumerate(widths)])


def training_yaml(folder: Path, model_path: Path, device: str = "cpu", **fsdp_config: Any) -> Path:
    """A verl training config (the keys the server reads) with the trainer's FSDP2 engine in fp32."""
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    config = {
        "actor_rollout_ref": {
            "model": {"path": str(model_path), "use_remove_padding": True,
                      "override_config": {"attn_implementation": "sdpa"}},
            "actor": {"strategy": "fsdp2", "fsdp_config": {"model_dtype": "fp32", "mixed_precision": fp32,
                                                           "use_torch_compile": False, **fsdp_config}},
        },
        "model_engine_server": {"device": device},
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tiny_model):
    """verl's TrainingWorker on the tiny model (cached for the whole run; starts the gloo group)."""
    return training_worker(model_path_str(tiny_model))


@pytest.fixture(scope="module")
def verl_config(tiny_model, tmp_path_factory, reference) -> ServerConfig:
    """The server's section from a training YAML; `reshard_after_forward: false` keeps every
    FSDP unit's gathered parameters between forwards, so a load that misses them serves stale ones."""
    folder = tmp_path_factory.mktemp("verl_config")
    return load_config(training_yaml(folder, tiny_model, reshard_after_forward=False),
                       ["model_engine_server.backend=verl"]).server


def local_verl_server(config: ServerConfig) -> ModelEngineServer:
    return build_local_server(config.engine_spec(), "verl", SchedulerConfig(request_timeout_s=60))


def save_checkpoint(base: Path, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict(weights, strict=False)  # a tied head follows the embedding
    model.save_pretrained(folder)
    return folder


def assert_matches(results: list[Any], expected: tuple[list[np.ndarray], list[np.ndarray]], atol: float, what: str) -> float:
    """Every result's log-probs and entropies within `atol`; returns the largest difference."""
    worst = 0.0
    for index, (result, log_probs, entropy) in enumerate(zip(results, *expected, strict=True)):
        assert_scores_close(result.log_probs, log_probs, atol, f"{what}: log-probs of sequence {index}")
        assert_scores_close(result.entropy, entropy, atol, f"{what}: entropy of sequence {index}")
        worst = max(worst, max_abs_diff(result.log_probs, log_probs), max_abs_diff(result.entropy, entropy))
    return worst


# ---------------------------------------------------------------- (a) serve == verl's recompute
@cpu_only
def test_serve_with_backend_verl_scores_as_verls_recompute_and_as_the_hf_backend(tiny_model, tmp_path, reference):
    hf = ModelEngineServerAdapter(build_engine("hf", EngineSpec(model_path=str(tiny_model), device="cpu")))
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's: the same GEMM kernels
    server = ServeProcess(["--config", str(training_yaml(tmp_path, tiny_model)), "model_engine_server.backend=verl"],
                          env=threads)
    try:
        with SyncHttpLogProbClient(server.url, timeout_s=120) as client:
            for temperature in (1.0, 0.7):
                results = client.compute_log_probs(requests_at(temperature))
                worst = assert_matches(results, verl_scores(reference, temperature), VERL_ATOL, f"verl, T={temperature}")
                hf_outputs = hf.score(requests_at(temperature))
                expected_hf = ([o.log_probs for o in hf_outputs], [o.entropy for o in hf_outputs])
                worst_hf = assert_matches(results, expected_hf, CROSS_PROCESS_ATOL, f"hf, T={temperature}")
                print(f"T={temperature}: max |server - verl| = {worst:.3g}, max |server - hf| = {worst_hf:.3g}")
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "backend=verl" in server.output  # verl's engine served, not the hf one


# ---------------------------------------------------------------- (b) weight syncs through the session
@cpu_only
async def test_a_sync_through_the_session_serves_what_verl_computes_on_the_new_weights(verl_config, tiny_model, tmp_path, reference):
    server = local_verl_server(verl_config)
    new = perturbed_weights(dict(server.executor.adapter.engine.export_weights()), seed=1)
    new_reference = training_worker(model_path_str(save_checkpoint(tiny_model, new, tmp_path / "v1")))
    expected_old, expected_new = verl_scores(reference, 0.7), verl_scores(new_reference, 0.7)
    assert_distinguishable(expected_new[0], expected_old[0], "the new weights' log-probs")
    publisher = WeightPublisher(server, TransportConfig(backend="gloo", bucket_bytes=16 << 10, timeout_s=60))
    try:  # a forward first: FSDP then holds gathered copies of the old weights
        assert_matches(await LocalClient(server).compute_log_probs(requests_at(0.7)), expected_old, VERL_ATOL, "before")
        report = await publisher.update_weights(new, 1)  # begin -> gloo stream into the engine -> commit
        assert report.ok and server.weight_version == 1
        results = await LocalClient(server).compute_log_probs(requests_at(0.7))
        assert all(r.weight_version == 1 for r in results)
        assert_matches(results, expected_new, VERL_ATOL, "after the sync")
        exported = dict(server.executor.adapter.engine.export_weights())
        assert all(torch.equal(exported[name], new[name]) for name in exported)
    finally:
        await publisher.close()
        await server.shutdown()


@cpu_only
async def test_an_incomplete_sync_is_refused_at_commit_and_the_old_weights_keep_serving(verl_config, reference):
    server = local_verl_server(verl_config)
    new = perturbed_weights(dict(server.executor.adapter.engine.export_weights()), seed=2)
    await server.begin_weight_update(1)  # nothing delivered
    with pytest.raises(WeightSyncError, match="did not arrive complete"):
        await server.commit_weight_update(1)
    assert server.weight_version == 0 and server.status()["weights_incomplete"] is None
    results = await LocalClient(server).compute_log_probs(requests_at(1.0))
    assert_matches(results, verl_scores(reference, 1.0), VERL_ATOL, "the old weights, after a refused commit")

    await server.begin_weight_update(2)  # a part delivered: refused, and nothing serves half-loaded weights
    await server.load_weights(list(new.items())[:3])
    with pytest.raises(WeightSyncError, match="is missing"):
        await server.commit_weight_update(2)
    assert server.weight_version == 0 and server.status()["weights_incomplete"]
    await server.shutdown()



@cpu_only
async def test_top_k_is_refused_by_the_verl_engine_and_the_rest_of_the_batch_is_scored(verl_config, reference):
    """verl's engine computes no top-k: a request asking for it fails naming `top_k`, its
    neighbours in the same call are answered as verl computes them."""
    server = local_verl_server(verl_config)
    plain = requests_at(1.0)
    asking = plain[0].model_copy(update={"request_id": "wants-top-k", "top_k": 5})
    outcomes = await LocalClient(server).score([asking, *plain])
    assert isinstance(outcomes[0], InvalidRequest) and "top_k" in outcomes[0].message, outcomes[0]
    assert_matches(outcomes[1:], verl_scores(reference, 1.0), VERL_ATOL, "the batch beside a refused top_k")
    await server.shutdown()

@cpu_only
def test_the_engine_refuses_unknown_names_and_wrong_shapes_and_leaves_the_weights_alone(verl_config):
    engine = build_engine("verl", verl_config.engine_spec())
    before = {n: t.clone() for n, t in engine.export_weights()}  # the export aliases the live parameters
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(WeightSyncError, match="unknown weight name 'model.no_such.weight'"):
        engine.load_weights([("model.no_such.weight", torch.zeros(3))])
    with pytest.raises(WeightSyncError, match=f"weight '{name}' has shape"):
        engine.load_weights([(name, torch.zeros(2, 2))])
    with pytest.raises(WeightSyncError, match="has dtype torch.bfloat16"):
        engine.load_weights([(name, before[name].to(torch.bfloat16))])
    after = dict(engine.export_weights())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert set(engine.weight_specs()) == set(before) and engine.info.architecture == "Qwen2ForCausalLM"
    assert engine.load_weights([("lm_head.weight", before["model.embed_tokens.weight"] * 2)]) == ["lm_head.weight"]
    assert torch.equal(dict(engine.export_weights())["model.embed_tokens.weight"], before["model.embed_tokens.weight"] * 2)


@cpu_only
def test_a_replica_worker_builds_the_verl_engine_and_scores_as_verl(verl_config, reference):
    """The replica layer's worker (as a plain object: the process group is this test process's)."""
    replica = ReplicaConfig(backend="verl", engine=verl_config.engine_spec())
    worker = ModelEngineWorker(rank=0, world_size=1)
    info = worker.initialize("127.0.0.1", free_port(), replica.backend, replica.engine, replica.build_engine_kwargs(), 4096)
    assert info.returns_results and info.dist_backend == "gloo"
    outcomes = worker.score(requests_at(0.7))
    assert outcomes is not None
    assert_matches(outcomes, verl_scores(reference, 0.7), VERL_ATOL, "replica worker")
    assert set(worker.weight_specs()) == set(dict(worker.engine.export_weights()))


@cpu_only
async def test_a_ray_replica_serves_backend_verl_and_takes_a_sync_through_the_session(ray_cluster, verl_config, tiny_model,
                                                                                     tmp_path, reference):
    """The `ray` runtime: the worker actor forms its gloo group, builds verl's engine in its own
    process, scores, and receives a sync streamed by the publisher (begin -> gloo -> commit)."""
    from replica.manager import ReplicaManager
    from replica.runtime import replica_config_for

    config = verl_config.model_copy(update={"runtime": "ray"})
    replica = replica_config_for(config, str(tiny_model)).model_copy(
        update={"start_timeout_s": 60.0, "init_timeout_s": 180.0, "health_check_interval_s": None})
    manager = ReplicaManager(replica)
    await manager.start()
    publisher = WeightPublisher(manager, TransportConfig(backend="gloo", bucket_bytes=16 << 10, timeout_s=120))
    try:
        outcomes = await manager.score(requests_at(1.0))
        # the worker runs 1 torch thread, this process 2: kernel rounding, not a different engine
        assert_matches(outcomes, verl_scores(reference, 1.0), CROSS_PROCESS_ATOL, "ray replica")
        new = perturbed_weights(dict(build_engine("hf", EngineSpec(model_path=str(tiny_model))).export_weights()), seed=4)
        new_reference = training_worker(model_path_str(save_checkpoint(tiny_model, new, tmp_path / "v1")))
        expected_new = verl_scores(new_reference, 1.0)
        assert_distinguishable(expected_new[0], verl_scores(reference, 1.0)[0], "the new weights' log-probs")
        assert (await publisher.update_weights(new, 1)).ok
        outcomes = await manager.score(requests_at(1.0))
        assert all(o.weight_version == 1 for o in outcomes)
        worst = assert_matches(outcomes, expected_new, CROSS_PROCESS_ATOL, "ray replica after the sync")
        print(f"ray replica after the sync: max |replica - verl| = {worst:.3g}")
    finally:
        await publisher.close()
        await manager.shutdown(drain=False, timeout_s=10.0)
    await assert_nothing_left()


# ---------------------------------------------------------------- (c) bad config: clear errors
def test_backend_verl_with_a_megatron_trainer_says_to_use_backend_megatron(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"actor_rollout_ref": {"actor": {"strategy": "megatron"}},
                                      "model_engine_server": {"backend": "verl"}}))
    with pytest.raises(ConfigError, match="model_engine_server.verl_engine.strategy.*backend=megatron"):
        load_config(config)
    assert cli_main(["config", "--config", str(config)]) == 2
    assert "strategy 'megatron' is not served by backend verl" in capsys.readouterr().err


def test_verl_engine_settings_with_another_backend_are_refused():
    with pytest.raises(ConfigError, match="verl_engine is set, but model_engine_server.backend=hf"):
        load_config(None, ["model_engine_server.verl_engine.strategy=fsdp2"])


def test_the_trainers_shipped_fsdp_config_becomes_verls_own_dataclasses(tiny_model):
    """verl's own composed default config (fsdp actor, bf16 autocast, torch.compile): inherited
    whole, turned into verl's dataclasses, training-only knobs off, FSDP1 run as FSDP2 (on a
    GPU too: FSDP1's flat parameters would make every weight sync incomplete)."""
    import verl

    from model_engine_server.engines.verl_backend import build

    shipped = Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"
    overrides = ["+model_engine_server.backend=verl", "+model_engine_server.device=cpu",
                 f"actor_rollout_ref.model.path={tiny_model}", "actor_rollout_ref.actor.fsdp_config.param_offload=true"]
    spec = load_config(shipped, overrides).server.engine_spec()
    assert spec.verl_engine.strategy == "fsdp" and spec.verl_engine.engine["use_torch_compile"] is True
    device = torch.device("cpu")
    build.select_platform(device)
    engine, model = build.fsdp_engine_config(spec), build.hf_model_config(spec, device)
    assert (engine.strategy, engine.param_offload, engine.use_torch_compile, engine.mixed_precision) == ("fsdp2", False, True, None)
    assert build.engine_settings(spec)["strategy"] == "fsdp2"  # the same on every device
    assert model.path == str(tiny_model) and model.override_config["attn_implementation"] == "sdpa"


@cpu_only
@pytest.mark.parametrize("settings,message", [
    ({"engine": {"reshard_after_foward": False}}, "verl_engine.engine: .*reshard_after_foward"),
    ({"engine": {"ulysses_sequence_parallel_size": 2}}, "ulysses_sequence_parallel_size must be 1"),
    ({"model": {"use_fused_kernels": True}}, "use_fused_kernels: verl's fused kernels take one temperature"),
])
def test_engine_settings_verl_cannot_serve_fail_the_build_naming_the_key(tiny_model, reference, settings, message):
    from model_engine_server.engines.verl_backend.build import VerlEngineError

    spec = EngineSpec(model_path=str(tiny_model), device="cpu", verl_engine=VerlEngineConfig(**settings))
    with pytest.raises(VerlEngineError, match=message):
        build_engine("verl", spec)


@cpu_only
def test_backend_verl_refuses_model_parallel_sizes(tiny_model, reference):
    from model_engine_server.engines.verl_backend.build import VerlEngineError

    with pytest.raises(VerlEngineError, match="one device per replica, got tensor_model_parallel_size=2"):
        build_engine("verl", EngineSpec(model_path=str(tiny_model), device="cpu"), tensor_model_parallel_size=2)


# ---------------------------------------------------------------- CUDA: verl's nvidia platform, NCCL
@pytest.mark.gpu
def test_on_cuda_backend_verl_serves_as_the_hf_backend_and_follows_a_weight_sync(tiny_model, tmp_path):
    """A fresh server process (verl's nvidia platform, its own NCCL group) against the HF backend
    on the same GPU, before and after a weight sync over HTTP (begin -> load -> commit)."""
    spec = EngineSpec(model_path=str(tiny_model), device="cuda", attn_implementation="sdpa")
    hf_engine = build_engine("hf", spec)
    hf = ModelEngineServerAdapter(hf_engine)
    server = ServeProcess(["--config", str(training_yaml(tmp_path, tiny_model, device="cuda")),
                           "model_engine_server.backend=verl"])
    try:
        with SyncHttpLogProbClient(server.url, timeout_s=300) as client:
            for version in (0, 1):
                if version:
                    new = perturbed_weights({n: t.cpu() for n, t in hf_engine.export_weights()}, seed=3)
                    assert client.update_weights(new.items(), version) == version
                    hf_engine.load_weights((n, t.cuda()) for n, t in new.items())
                results = client.compute_log_probs(requests_at(0.7))
                expected = hf.score(requests_at(0.7))
                assert all(r.weight_version == version for r in results)
                assert_matches(results, ([o.log_probs for o in expected], [o.entropy for o in expected]),
                               GPU_ATOL, f"cuda, version {version}")
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "backend=verl" in server.output


FREED_AFTER_CLOSE = """
import gc, sys, weakref
from model_engine_server.engines.base import EngineSpec, build_engine
engine = build_engine("verl", EngineSpec(model_path=sys.argv[1]))
model = weakref.ref(engine.worker.engine.module)
engine.close()
del engine
gc.collect()
print("model freed" if model() is None else "model still alive")
"""


@cpu_only
def test_a_closed_verl_engine_frees_its_model_even_when_it_first_imported_verl(tiny_model):
    """verl keeps the ImportErrors of its optional checkpoint engines, tracebacks included; an
    engine that imported verl's worker modules from its own stack stayed alive through them.
    A fresh interpreter, so this engine is the first import."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FREED_AFTER_CLOSE, str(tiny_model)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model freed" in done.stdout, done.stdout[-500:]


def test_a_failed_verl_import_on_the_loader_thread_is_raised_to_the_caller(monkeypatch):
    from model_engine_server.engines.verl_backend import build

    monkeypatch.setattr(build, "VERL_WORKER_MODULES", ("verl_no_such_module_for_this_test",))
    with pytest.raises(ModuleNotFoundError, match="verl_no_such_module_for_this_test"):
        build.import_verl_worker_modules()
