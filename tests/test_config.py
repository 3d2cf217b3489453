"""The config loader: verl-shaped YAMLs, both key shapes, inheritance, errors (Hydra's override
forms: `tests/test_config_overrides.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checkpoint_transport import TransportConfig
from model_engine_server.cli import main as cli_main
from model_engine_server.config import ConfigError, ServerConfig, load_config

FIXTURES = Path(__file__).parent / "fixtures" / "verl"
SHIPPED = FIXTURES / "fully_async_megatron_shipped.yaml"
COMPOSED = FIXTURES / "composed_hydra_config.yaml"
REPO = Path(__file__).parent.parent


def launch_args(model_path: str = "/models/tiny") -> list[str]:
    lines = (FIXTURES / "launch_megatron_16_16_8.args").read_text().splitlines()
    return [line.replace("@MODEL_PATH@", model_path) for line in lines if line and not line.startswith("#")]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- defaults and whole files
def test_defaults_serve_one_in_process_replica_on_loopback():
    server = load_config(None).server
    assert server.backend == "hf" and server.in_process and server.replicas == 1
    assert server.http.host == "127.0.0.1" and server.model_path is None and server.temperature == 1.0


def test_shared_prompts_are_on_by_default_and_an_override_switches_them_off():
    assert load_config(None).server.engine_spec("/m").share_prompts
    assert not load_config(None, ["model_engine_server.share_prompts=false"]).server.engine_spec("/m").share_prompts


def test_shipped_yaml_with_a_launch_scripts_overrides_loads(tmp_path):
    loaded = load_config(SHIPPED, launch_args("/models/tiny"))
    server, sources = loaded.server, loaded.sources
    assert server.backend == "megatron" and "defaults" in sources["backend"]
    assert server.model_path == "/models/tiny" and sources["model_path"].startswith("inherited from actor_rollout_ref.model.path")
    assert server.temperature == 0.7 and "override" in sources["temperature"]
    assert server.enable_standalone and server.enable_old_mode
    assert (server.nnodes, server.n_gpus_per_node) == (1, 8)
    assert (server.megatron.tensor_model_parallel_size, server.megatron.pipeline_model_parallel_size) == (1, 1)
    assert server.replicas == 8 and not server.in_process
    assert server.scheduler.max_batch_size == 64 and server.scheduler.max_wait_ms == 5000
    assert server.scheduler.max_tokens_per_batch == 12288  # the rollout's log-prob token length per GPU
    assert "model_engine_server.use_dynamic_bsz" in loaded.ignored


def test_keys_outside_the_section_never_stop_start_up(tmp_path):
    broken_outside = {
        "trainer": {"steps": "${does.not.exist}", "bad": "${oc.env:NOT_SET_ANYWHERE_42}"},
        "actor_rollout_ref": {"model": {"path": "${missing.path}"}, "rollout": {"temperature": "${nope}"}},
        "something_unknown": {"deep": [1, 2, {"x": "${broken"}]},
        "model_engine_server": {"backend": "hf"},
    }
    server = load_config(write(tmp_path, broken_outside)).server
    assert server.model_path is None and server.temperature == 1.0  # unresolvable trainer keys are not inherited


def test_composed_hydra_config_loads_with_reference_keys_accepted(tmp_path):
    loaded = load_config(COMPOSED)
    server = loaded.server
    assert server.backend == "megatron" and loaded.sources["backend"].startswith("file, via ${actor_rollout_ref.actor.strategy}")
    assert server.megatron.tensor_model_parallel_size == 2 and server.replicas == 4
    assert server.temperature == 0.7 and server.model_path == "/models/Qwen2.5-Math-7B"
    assert server.scheduler.max_tokens_per_batch == 12288 and "max_token_len_per_gpu" in loaded.sources["scheduler.max_tokens_per_batch"]
    assert server.scheduler.max_batch_size == 64 and server.scheduler.max_wait_ms == 5000.0
    for ignored in ("profiler", "router_replay", "_target_", "megatron.use_mbridge", "megatron.override_transformer_config"):
        assert f"model_engine_server.{ignored}" in loaded.ignored


@pytest.mark.parametrize("path", sorted((REPO / "deploy").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_deploy_yaml_loads(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    if any(isinstance(d, dict) and "apiVersion" in d for d in documents):
        assert {d["kind"] for d in documents} >= {"RayCluster"}  # a Kubernetes manifest, not a server config
        return
    if isinstance(documents[0], list):  # verl's agent_loop_config_path format: entries naming their class
        pytest.importorskip("verl")
        from hydra.utils import get_class
        from verl.experimental.agent_loop.agent_loop import AgentLoopBase

        for entry in documents[0]:
            assert issubclass(get_class(entry["_target_"]), AgentLoopBase), entry
        return
    assert isinstance(load_config(path).server, ServerConfig)


def test_the_40_gpu_example_mirrors_the_reference_deployment():
    loaded = load_config(REPO / "deploy" / "fully-async-megatron-40gpu.yaml")
    training, server = loaded.training, loaded.server
    trainer_gpus = training.trainer.nnodes * training.trainer.n_gpus_per_node
    rollout_gpus = training.rollout.nnodes * training.rollout.n_gpus_per_node
    assert (trainer_gpus, rollout_gpus, server.total_gpus) == (16, 16, 8)
    assert server.backend == "megatron" and server.replicas * server.gpus_per_replica == 8


# ---------------------------------------------------------------- both key shapes
@pytest.mark.parametrize("enable_key", ["enable", "enable_standalone"])
def test_enable_and_enable_standalone_are_one_setting(tmp_path, enable_key):
    server = load_config(write(tmp_path, {"model_engine_server": {enable_key: False}})).server
    assert server.enable_standalone is False


@pytest.mark.parametrize("strategy,backend", [("megatron", "megatron"), ("fsdp", "hf"), ("fsdp2", "hf")])
def test_strategy_is_another_name_for_backend(tmp_path, strategy, backend):
    assert load_config(write(tmp_path, {"model_engine_server": {"strategy": strategy}})).server.backend == backend


def test_batch_size_and_timeout_map_onto_the_scheduler(tmp_path):
    server = load_config(write(tmp_path, {"model_engine_server": {"batch_size": 32, "timeout": 2.5}})).server
    assert server.scheduler.max_batch_size == 32 and server.scheduler.max_wait_ms == 2500
    assert load_config(write(tmp_path, {"model_engine_server": {"batch_size": -1}})).server.scheduler.max_batch_size is None


def test_two_names_of_one_setting_that_disagree_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="enable.*enable_standalone.*disagree"):
        load_config(write(tmp_path, {"model_engine_server": {"enable": True, "enable_standalone": False}}))


def test_an_override_of_either_name_beats_the_file_written_with_the_other(tmp_path):
    # the shipped YAML writes the reference design's names; users override ours, and the reverse
    path = write(tmp_path, {"model_engine_server": {"strategy": "megatron", "batch_size": 8, "enable": True}})
    server = load_config(path, ["model_engine_server.backend=hf", "model_engine_server.scheduler.max_batch_size=32",
                                "model_engine_server.enable_standalone=false"]).server
    assert (server.backend, server.scheduler.max_batch_size, server.enable_standalone) == ("hf", 32, False)
    ours = write(tmp_path, {"model_engine_server": {"backend": "megatron"}})
    assert load_config(ours, ["+model_engine_server.strategy=fsdp"]).server.backend == "hf"
    with pytest.raises(ConfigError, match="strategy.*backend.*disagree"):
        load_config(None, ["+model_engine_server.strategy=megatron", "+model_engine_server.backend=hf"])


def test_null_in_the_section_means_unset(tmp_path):
    server = load_config(write(tmp_path, {"model_engine_server": {"nnodes": None, "n_gpus_per_node": None}})).server
    assert server.nnodes == 1 and server.n_gpus_per_node is None


# ---------------------------------------------------------------- inheritance from the trainer
def actor_megatron(tmp_path: Path, section: dict) -> Path:
    return write(tmp_path, {
        "actor_rollout_ref": {
            "model": {"path": "~/models/qwen"},
            "actor": {"strategy": "megatron", "megatron": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                                           "context_parallel_size": 1}},
            "rollout": {"temperature": 0.6},
        },
        "model_engine_server": section,
    })


def test_unset_parallel_sizes_model_path_temperature_and_backend_come_from_the_actor(tmp_path):
    loaded = load_config(actor_megatron(tmp_path, {"n_gpus_per_node": 8}))
    server = loaded.server
    assert server.backend == "megatron" and loaded.sources["backend"].startswith("inherited from actor_rollout_ref.actor.strategy")
    assert server.megatron.tensor_model_parallel_size == 2 and server.megatron.pipeline_model_parallel_size == 2
    assert loaded.sources["megatron.tensor_model_parallel_size"] == (
        "inherited from actor_rollout_ref.actor.megatron.tensor_model_parallel_size (file)"
    )
    assert server.model_path == str(Path("~/models/qwen").expanduser()) and server.temperature == 0.6
    assert server.replicas == 2 and server.gpus_per_replica == 4


def test_the_sections_own_values_win_over_the_actors(tmp_path):
    section = {"n_gpus_per_node": 8, "temperature": 1.2, "model_path": "/m", "megatron": {"tensor_model_parallel_size": 1}}
    server = load_config(actor_megatron(tmp_path, section), ["actor_rollout_ref.rollout.temperature=0.9"]).server
    assert server.megatron.tensor_model_parallel_size == 1 and server.megatron.pipeline_model_parallel_size == 2
    assert server.temperature == 1.2 and server.model_path == "/m"


def test_an_override_of_a_trainer_key_is_inherited_and_says_so(tmp_path):
    loaded = load_config(actor_megatron(tmp_path, {"n_gpus_per_node": 8}), ["actor_rollout_ref.rollout.temperature=0.9"])
    assert loaded.server.temperature == 0.9
    assert loaded.sources["temperature"] == "inherited from actor_rollout_ref.rollout.temperature (override)"


def test_a_resumed_version_on_the_trainers_base_model_is_refused_but_on_an_export_of_that_step_taken(tmp_path):
    path = write(tmp_path, {"actor_rollout_ref": {"model": {"path": "/models/base"}}})
    with pytest.raises(ConfigError, match="initial_weight_version=7 with model_path inherited"):
        load_config(path, ["model_engine_server.initial_weight_version=7"])
    exported = load_config(path, ["model_engine_server.initial_weight_version=7", "model_engine_server.model_path=/ckpt/step7-hf"])
    assert exported.server.initial_weight_version == 7 and exported.server.model_path == "/ckpt/step7-hf"
    assert load_config(path).server.model_path == "/models/base"  # version 0: the base model is what verl starts from


@pytest.mark.parametrize("kl_key", ["actor_rollout_ref.actor.use_kl_loss", "algorithm.use_kl_in_reward"])
def test_a_kl_term_switches_ref_mode_on_unless_the_section_says_otherwise(tmp_path, kl_key):
    path = actor_megatron(tmp_path, {"n_gpus_per_node": 8})
    assert load_config(path).server.enable_ref_mode is False
    loaded = load_config(path, [f"+{kl_key}=true"])
    assert loaded.server.enable_ref_mode is True
    assert loaded.sources["enable_ref_mode"] == f"inherited from {kl_key} (override)"
    assert load_config(path, [f"+{kl_key}=false"]).server.enable_ref_mode is False
    explicit = load_config(path, [f"+{kl_key}=true", "model_engine_server.enable_ref_mode=false"])
    assert explicit.server.enable_ref_mode is False


# ---------------------------------------------------------------- errors that name the key
def test_unknown_key_names_it_suggests_and_lists_valid_keys(training_yaml):
    with pytest.raises(ConfigError) as caught:
        load_config(training_yaml, ["model_engine_server.megatron.tensor_parallel_size=2"])
    message = str(caught.value)
    assert "model_engine_server.megatron.tensor_parallel_size: unknown key" in message
    assert "did you mean 'tensor_model_parallel_size'" in message
    assert "pipeline_model_parallel_size" in message  # the valid keys are listed


def test_unknown_top_level_key_lists_our_keys_and_the_reference_names(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {"model_engine_server": {"max_token": 5}}))
    message = str(caught.value)
    assert "model_engine_server.max_token: unknown key" in message
    assert "enable_standalone" in message and "batch_size" in message


@pytest.mark.parametrize("override,names", [
    ("model_engine_server.nnodes=two", ["model_engine_server.nnodes", "integer"]),
    ("model_engine_server.backend=vllm", ["model_engine_server.backend", "'hf', 'megatron' or 'verl'"]),
    ("model_engine_server.strategy=vllm", ["model_engine_server.strategy", "megatron, fsdp, fsdp2, hf"]),
    ("model_engine_server.dtype=fp8", ["model_engine_server.dtype", "'float32'"]),
    ("model_engine_server.scheduler.max_tokens_per_batch=-5", ["model_engine_server.scheduler.max_tokens_per_batch", "greater than 0"]),
    ("model_engine_server.http.port=70000", ["model_engine_server.http.port", "65535"]),
    ("model_engine_server.ref.nnodes=0", ["model_engine_server.ref.nnodes"]),
    ("model_engine_server.timeout=soon", ["model_engine_server.timeout", "seconds"]),
])
def test_a_wrong_type_or_value_names_the_key_and_what_is_valid(training_yaml, override, names):
    with pytest.raises(ConfigError) as caught:
        load_config(training_yaml, [override])
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("section,names", [
    ({"strategy": "megatron", "n_gpus_per_node": 4, "megatron": {"tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2}},
     ["tensor_model_parallel_size=4", "pipeline_model_parallel_size=2", "= 8 devices per replica", "n_gpus_per_node=4 = 4 devices"]),
    ({"strategy": "megatron", "n_gpus_per_node": 6, "megatron": {"tensor_model_parallel_size": 4}}, ["n_gpus_per_node=6", "multiple of 4"]),
    ({"strategy": "megatron", "n_gpus_per_node": 4, "num_replicas": 3, "megatron": {"tensor_model_parallel_size": 2}},
     ["num_replicas=3", "6 devices", "4 devices"]),
    ({"strategy": "megatron", "n_gpus_per_node": 2, "megatron": {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 4}},
     ["expert_model_parallel_size=4"]),
    ({"strategy": "megatron", "megatron": {"virtual_pipeline_model_parallel_size": 2}}, ["virtual_pipeline_model_parallel_size=2"]),
    ({"nnodes": 2, "n_gpus_per_node": 3, "strategy": "megatron", "megatron": {"tensor_model_parallel_size": 4}}, ["split a node"]),
])
def test_a_layout_the_devices_cannot_hold_is_refused_naming_keys_and_numbers(tmp_path, section, names):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {"model_engine_server": section}))
    for name in names:
        assert name in str(caught.value)


def test_an_interpolation_inside_the_section_that_cannot_resolve_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model_engine_server.temperature: cannot resolve '\$\{nowhere.t\}'"):
        load_config(write(tmp_path, {"model_engine_server": {"temperature": "${nowhere.t}"}}))


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- the transport part and the package
def test_the_sections_transport_part_is_the_publishers_transport_config():
    transport = load_config(REPO / "deploy" / "fully-async-megatron-40gpu.yaml").server.transport
    assert isinstance(transport, TransportConfig)  # a publisher takes it as it is
    assert (transport.backend, transport.bucket_bytes) == ("nccl", 1 << 30)


def test_the_section_and_the_publisher_share_one_set_of_transport_defaults():
    assert ServerConfig().transport.model_dump(exclude={"allowed_endpoints"}) == TransportConfig().model_dump()


def test_a_transport_key_nothing_reads_is_an_unknown_key(training_yaml):
    with pytest.raises(ConfigError, match=r"transport\.bucket_mb: unknown key; did you mean 'bucket_bytes'"):
        load_config(training_yaml, ["model_engine_server.transport.bucket_mb=512"])


def test_the_scheduler_config_imports_without_the_scheduler():
    code = ("import sys; from model_engine_server.config.scheduler import SchedulerConfig; "
            "from model_engine_server.scheduler import SchedulerConfig as Same; assert Same is SchedulerConfig; "
            "import model_engine_server.config as c; assert c.SchedulerConfig is SchedulerConfig")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    alone = "import sys, model_engine_server.config; assert 'model_engine_server.scheduler' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- reference mode keys, secrets, CLI values
def test_reference_mode_keys_are_accepted_and_validated(tmp_path):
    section = {"enable_ref_mode": True, "ref_model_path": "/ref", "ref": {"nnodes": 1, "n_gpus_per_node": 2}}
    server = load_config(write(tmp_path, {"model_engine_server": section})).server
    assert server.enable_ref_mode and server.ref_model_path == "/ref" and server.ref.n_gpus_per_node == 2


def test_admin_token_comes_from_the_environment_and_is_never_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "from-env")
    loaded = load_config(write(tmp_path, {"model_engine_server": {"http": {"auth_token_env": "MY_TOKEN"}}}))
    assert loaded.server.http.token() == "from-env"
    explicit = load_config(write(tmp_path, {"model_engine_server": {"http": {"auth_token": "written-in-yaml"}}}))
    assert explicit.server.http.token() == "written-in-yaml"
    assert "written-in-yaml" not in explicit.describe()
    trainer = load_config(write(tmp_path, {"model_engine_server": {"trainer": {"api_token": "trainer-secret"}}}))
    assert trainer.server.trainer.bearer_token == "trainer-secret"
    assert "trainer-secret" not in trainer.describe() and "trainer-secret" not in repr(trainer.server)  # once printed


def test_command_line_host_and_port_win_and_say_so(training_yaml):
    loaded = load_config(training_yaml, ["model_engine_server.http.port=1234"], cli_values={"http.port": 9000, "http.host": None})
    assert loaded.server.http.port == 9000 and loaded.sources["http.port"] == "command line"


def test_config_command_prints_every_value_with_its_source(capsys):
    code = cli_main(["config", "--config", str(SHIPPED), *launch_args("/models/tiny")])
    out = capsys.readouterr().out
    assert code == 0
    assert "model_engine_server.backend: \"megatron\"  # inherited from defaults" in out
    assert "model_engine_server.temperature: 0.7  # inherited from actor_rollout_ref.rollout.temperature (override)" in out
    assert "model_engine_server.http.port: 8000  # default" in out
    assert "model_engine_server.megatron.tensor_model_parallel_size: 1  # override" in out


def test_config_command_accepts_hydra_style_config_path_and_name(capsys):
    assert cli_main(["config", f"--config-path={FIXTURES}", "--config-name=composed_hydra_config"]) == 0
    assert "model_engine_server.nnodes: 1  # file" in capsys.readouterr().out


def test_config_command_reports_an_unknown_key_and_exits_2(capsys):
    code = cli_main(["config", "model_engine_server.backnd=hf"])
    assert code == 2 and "model_engine_server.backnd: unknown key; did you mean 'backend'" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["defaults", "group override"])
def test_a_megatron_trainer_named_the_way_verl_names_it_gives_backend_megatron(tmp_path, how):
    """verl composes `defaults: [ppo_megatron_trainer]` (or `model_engine=megatron`) into
    actor.strategy megatron; this loader composes no defaults, and once served such a trainer
    the HF backend at TP 1, silently."""
    trainer = {"actor_rollout_ref": {"model": {"path": "/models/x"},
                                     "actor": {"megatron": {"tensor_model_parallel_size": 4}}},
               "model_engine_server": {"n_gpus_per_node": 8}}
    if how == "defaults":
        trainer = {"defaults": ["ppo_megatron_trainer", "_self_"], **trainer}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(trainer))
    loaded = load_config(path, ["model_engine=megatron"] if how == "group override" else [])
    assert loaded.server.backend == "megatron"
    assert loaded.server.megatron.tensor_model_parallel_size == 4
    assert "the trainer runs Megatron" in loaded.sources["backend"]
    explicit = load_config(path, ["actor_rollout_ref.actor.strategy=fsdp2"] + (["model_engine=megatron"] if how != "defaults" else []))
    assert explicit.server.backend == "hf"  # the trainer's own strategy decides where it is set


def test_ref_mode_switched_on_by_a_kl_setting_shows_the_devices_it_adds():
    loaded = load_config(None, ["model_engine_server.model_path=/m", "model_engine_server.n_gpus_per_node=8",
                                "+actor_rollout_ref.actor.use_kl_loss=true"])
    assert loaded.server.enable_ref_mode and loaded.server.reference_gpus == 8
    assert "serves the reference policy on 8 more device(s): 16 in all" in loaded.describe()
    assert "use_kl_loss" in loaded.describe().splitlines()[-1]
