"""The package declares version ranges, and the constraints file our runs use sits inside them.

Exact pins in `pyproject.toml` would make `pip install` beside a trainer (verl 0.9.1 needs
transformers<5.11) fail to resolve or move the trainer's pins; the exact versions belong in
`deploy/constraints.txt`.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NOT_BESIDE_VERL = {"trl"}  # our `trl` extra: documented in pyproject.toml as not installable beside verl 0.9.1


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in listed]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"constraints pin exactly: {line}"
            pins[requirement.name.lower()] = Version(spec.version)
    return pins


def test_no_dependency_is_pinned_exactly_in_the_package():
    exact = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert exact == []


def test_every_constraint_lies_inside_the_range_the_package_declares():
    declared = {r.name.lower(): r for r in _requirements()}
    pins = _constraints()
    assert {"torch", "transformers"} <= set(pins)
    for name, version in pins.items():
        assert name in declared, f"{name} is pinned but not a dependency"
        assert declared[name].specifier.contains(version), f"{name}=={version} outside {declared[name]}"


def test_the_range_admits_the_transformers_verl_0_9_1_installs():
    (transformers,) = [r for r in _requirements() if r.name == "transformers"]
    assert transformers.specifier.contains("5.10.4")  # verl 0.9.1: transformers>=5.5.3,<5.11
    assert transformers.specifier.contains("5.9.0")  # its vllm, sglang and cpu extras pin 5.9.0


@pytest.mark.parametrize("extra", ["vllm", "sglang", "cpu", "fsdp", "megatron"])
def test_every_pin_of_verls_own_extras_lies_inside_our_ranges(extra):
    """A verl user installs `verl[vllm]` (or another extra) first: each exact pin it brings for
    a package we depend on must satisfy our range, or installing us would move it (once
    transformers==5.9.0 did not)."""
    pytest.importorskip("verl")
    ours = {r.name.lower(): r for r in _requirements() if r.name.lower() not in NOT_BESIDE_VERL}
    clashes = []
    for line in metadata.requires("verl") or []:
        requirement = Requirement(line)
        if requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        declared = ours.get(requirement.name.lower())
        if exact and declared is not None and not declared.specifier.contains(exact[0], prereleases=True):
            clashes.append(f"verl[{extra}] pins {requirement.name}=={exact[0]}, outside our {declared.specifier}")
    assert clashes == []


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_this_environment_runs_a_version_the_package_declares(name):
    (requirement,) = [r for r in _requirements() if r.name == name]
    assert requirement.specifier.contains(Version(metadata.version(name)).base_version)


def test_our_pins_lie_inside_the_ranges_verl_declares():
    """What we pin for our own runs must also satisfy verl 0.9.1, or CI would not test the
    environment a verl user has (pip check covers the installed set; this names the culprit)."""
    pytest.importorskip("verl")
    pins = _constraints()
    clashes = []
    for line in metadata.requires("verl") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(requirement.name.lower())
        if pinned is not None and not requirement.specifier.contains(pinned, prereleases=True):
            clashes.append(f"{requirement.name}=={pinned} outside verl's {requirement.specifier}")
    assert clashes == []


def test_the_wheel_carries_the_agent_loop_yaml_the_readme_points_at(tmp_path):
    """A pip-installed user has no repository checkout: the YAML verl's `agent_loop_config_path`
    names must come with the package, where `python -m clients.verl.agent_loop_yaml` says."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "source"  # a setuptools build writes build/ and *.egg-info/ beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "tests", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=240)
    (wheel,) = tmp_path.glob("model_engine_server-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "clients/verl/agent_loop.yaml" in names and "clients/verl/agent_loop_yaml.py" in names
    printed = subprocess.run([sys.executable, "-m", "clients.verl.agent_loop_yaml"], check=True, capture_output=True,
                             text=True, cwd=tmp_path).stdout.strip()
    assert Path(printed).is_file() and Path(printed).name == "agent_loop.yaml"
