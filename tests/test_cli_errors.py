"""Common mistakes at the command line end in one `error:` line and a non-zero exit, before
anything slow happens, never in a traceback."""

from __future__ import annotations

import socket

import pytest

from model_engine_server.cli import main


def test_a_model_written_onto_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    assert main(["make-tiny-model", str(target)]) == 1
    assert "error: cannot write the model to" in capsys.readouterr().err


def test_a_misspelt_section_is_named_not_served_as_defaults(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model_engine_sever:\n  model_path: /models/mine\n")
    assert main(["config", "--config", str(config)]) == 2
    assert "did you mean model_engine_server" in capsys.readouterr().err


def test_serving_a_model_path_that_is_not_there_says_so(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["serve", "--port", "0", f"model_engine_server.model_path={missing}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not build the service") and str(missing) in err


@pytest.mark.parametrize("runtime", ["in_process", "ray"])
def test_a_port_in_use_is_refused_before_a_model_loads(tiny_model, capsys, runtime):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), f"model_engine_server.model_path={tiny_model}",
                     f"model_engine_server.runtime={runtime}"])
    assert code == 1 and f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_config_folder_without_a_config_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["config", "--config-path", "deploy"])
    assert exited.value.code == 2 and capsys.readouterr().err.startswith("error: --config-path needs --config-name")


def test_a_demo_flag_out_of_range_names_the_flag(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps: input should be greater than 0"


def test_overrides_are_taken_before_and_after_flags_as_hydra_takes_them(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_engine_server:\n  backend: hf\n")
    assert main(["config", "model_engine_server.model_path=/models/a", "--config", str(config),
                 "model_engine_server.temperature=0.7"]) == 0
    shown = capsys.readouterr().out
    assert 'model_path: "/models/a"  # override' in shown and "temperature: 0.7  # override" in shown
    # Hydra's delete form after a flag too (it was refused as an unknown argument)
    assert main(["config", "model_engine_server.model_path=/models/a", "--config", str(config),
                 "~model_engine_server.backend"]) == 0
    assert 'model_engine_server.backend: "hf"  # default' in capsys.readouterr().out  # the file's was deleted
    with pytest.raises(SystemExit) as refused:
        main(["config", "--config", str(config), "--no-such-flag"])
    assert refused.value.code == 2


def test_a_scalar_section_and_two_ways_of_naming_the_file_are_usage_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_engine_server: megatron_model_engine_server\n")
    assert main(["config", "--config", str(config)]) == 2
    assert "must be a mapping of settings, got 'megatron_model_engine_server'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["config", "--config", str(config), "--config-name", "run"])
    assert refused.value.code == 2


def test_a_model_path_under_home_is_expanded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["config", "model_engine_server.model_path='~/models/a'"]) == 0
    assert f'model_path: "{tmp_path}/models/a"' in capsys.readouterr().out


def test_runtime_in_process_refuses_a_layout_it_would_shrink(capsys):
    assert main(["config", "model_engine_server.model_path=/m", "model_engine_server.runtime=in_process",
                 "model_engine_server.n_gpus_per_node=4"]) == 2
    assert "runtime=in_process serves one single-device replica" in capsys.readouterr().err
