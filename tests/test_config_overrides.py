"""Hydra's override grammar on our configs: every form a verl launch script uses, on the section
and on the training config around it, and the forms we refuse, each named."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_engine_server.config import ConfigError, load_config, load_training_config


def training_after(training_yaml: Path, *overrides: str):
    return load_training_config(training_yaml, list(overrides))[0]


def test_override_changes_an_existing_key(training_yaml):
    assert training_after(training_yaml, "trainer.steps=20").trainer.steps == 20


def test_override_adds_a_key_the_uncomposed_file_lacks(training_yaml):
    assert training_after(training_yaml, "data.max_prompt_length=1024").data.max_prompt_length == 1024


def test_plus_adds_a_key(training_yaml):
    assert training_after(training_yaml, "+trainer.extra.depth=3").trainer.extra.depth == 3


def test_plus_plus_adds_or_replaces(training_yaml):
    cfg = training_after(training_yaml, "++trainer.steps=5", "++trainer.fresh=x")
    assert (cfg.trainer.steps, cfg.trainer.fresh) == (5, "x")


@pytest.mark.parametrize("override", ["~trainer.name", "~trainer.name=run"])
def test_tilde_deletes_a_key(training_yaml, override):
    assert "name" not in training_after(training_yaml, override).trainer


def test_tilde_with_a_value_deletes_only_a_key_holding_it(training_yaml):
    kept = training_after(training_yaml, "~trainer.name=run").trainer  # deleted: it holds "run"
    assert "name" not in kept
    with pytest.raises(ConfigError, match="trainer.name is 'run', not 'other'"):
        training_after(training_yaml, "~trainer.name=other")


def test_list_override(training_yaml):
    cfg = training_after(training_yaml, "trainer.logger=['console','tensorboard']")
    assert list(cfg.trainer.logger) == ["console", "tensorboard"]


def test_quoted_strings_stay_strings(training_yaml):
    cfg = training_after(training_yaml, "trainer.name='1'", 'trainer.title="a b c"')
    assert cfg.trainer.name == "1" and cfg.trainer.title == "a b c"


def test_null_and_numbers_like_one_dot(training_yaml):
    cfg = training_after(training_yaml, "trainer.name=null", "trainer.lr=1.", "trainer.tiny=1e-6", "trainer.flag=True")
    assert cfg.trainer.name is None and cfg.trainer.lr == 1.0 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.tiny == 1e-6 and cfg.trainer.flag is True


def test_dict_override_merges(training_yaml):
    cfg = training_after(training_yaml, "trainer={extra: 1}")
    assert cfg.trainer.extra == 1 and cfg.trainer.steps == 10


def test_section_overrides_through_every_form(training_yaml):
    loaded = load_config(training_yaml, [
        "model_engine_server.megatron.tensor_model_parallel_size=2",
        "+model_engine_server.strategy=megatron",
        "++model_engine_server.n_gpus_per_node=4",
        "~model_engine_server.nnodes",
        "model_engine_server.temperature=0.5",
    ])
    server = loaded.server
    assert server.megatron.tensor_model_parallel_size == 2 and server.backend == "megatron"
    assert server.n_gpus_per_node == 4 and server.nnodes == 1 and server.temperature == 0.5
    assert loaded.sources["megatron.tensor_model_parallel_size"] == "override"
    assert loaded.sources.get("nnodes", "default") == "default"


def test_interpolation_in_an_override_resolves_against_the_config(training_yaml):
    server = load_config(training_yaml, ["trainer.t=0.3", "model_engine_server.temperature=${trainer.t}"]).server
    assert server.temperature == 0.3


@pytest.mark.parametrize("override,message", [
    ("model_engine_server.nnodes=1,2", "sweep"),
    ("trainer.logger=[console", "cannot parse override"),
    ("model_engine_server@model_engine_server=megatron_model_engine_server", "config group"),
])
def test_unusable_overrides_are_errors_naming_them(training_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(training_yaml, [override])


def test_a_config_group_choice_outside_the_section_is_skipped(training_yaml):
    assert load_config(training_yaml, ["actor_rollout_ref/rollout=sglang"]).server.nnodes == 1
