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
