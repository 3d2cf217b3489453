"""Load the `model_engine_server:` section from a fully-async training YAML plus overrides.

Steps, in order:
1. Read the YAML with OmegaConf (verl's own config library); drop Hydra's `hydra:` and
   `defaults:` directives. `${...}` interpolations stay lazy: a key outside the section is never
   resolved, so a file whose `defaults:` are not composed (verl's shipped YAML) still loads.
2. Apply the command-line overrides in Hydra's grammar (`overrides.py`).
3. Resolve the section's values (interpolations included, e.g. `${oc.select:...}`); keys of the
   reference design that mean nothing here (`profiler`, `router_replay`, Megatron optimizer
   settings, ...) are accepted and listed as ignored.
4. Map the reference design's other names onto ours (`verl.py`: `enable`, `strategy`, `batch_size`,
   `timeout`, `max_token_len_per_gpu`) and fill unset values from the trainer's keys where verl
   users expect it (model path, rollout temperature, the actor's Megatron parallel sizes; with
   `backend: verl`, the trainer's model and actor engine settings).
5. Validate with the pydantic models of `schema.py`; a wrong key or type becomes a `ConfigError`
   naming the key and the valid choices.

Every resolved value remembers where it came from: default, file, override, command line, or
inherited from a named trainer key. `model-engine-server config` prints that.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, SecretStr, ValidationError

from model_engine_server.config.schema import SECTION, ConfigError, ServerConfig
from model_engine_server.config.overrides import AppliedOverrides, apply_overrides
from model_engine_server.config.verl import (
    ALIASES,
    IGNORED_MEGATRON_KEYS,
    IGNORED_SECTION_KEYS,
    TRAINER_MODEL_PATH,
    apply_aliases,
    inherit_backend_from_defaults,
    inherit_from_trainer,
    set_dotted,
)

logger = logging.getLogger(__name__)

HYDRA_DIRECTIVES = ("hydra", "defaults")


@dataclass
class LoadedConfig:
    """The resolved section, where each value came from, and the whole training config."""

    server: ServerConfig
    sources: dict[str, str]  # dotted key inside the section -> where its value came from
    training: DictConfig = field(repr=False)
    path: Path | None = None
    ignored: list[str] = field(default_factory=list)  # reference-design keys accepted without effect

    def describe(self) -> str:
        """The resolved section, one `key: value  # source` line per setting (secrets masked)."""
        lines = [f"# {SECTION} resolved from {self.path or 'defaults (no --config)'}"]
        for key, value in _leaves(self.server):
            shown = "'***'" if isinstance(value, SecretStr) else json.dumps(value)
            lines.append(f"{SECTION}.{key}: {shown}  # {self.sources.get(key, 'default')}")
        server = self.server
        lines.append(
            f"# derived: {server.replicas} replica(s) x {server.gpus_per_replica} device(s) each, on "
            f"{server.nnodes} node(s) x {server.gpus_per_node} device(s); runs "
            + ("in this process" if server.in_process else "as Ray replicas")
        )
        if server.reference_gpus:
            lines.append(
                f"# derived: ref mode ({self.sources.get('enable_ref_mode', 'set')}) serves the reference policy on "
                f"{server.reference_gpus} more device(s): {server.total_gpus + server.reference_gpus} in all"
            )
        if self.ignored:
            lines.append(f"# accepted without effect (reference-design keys): {', '.join(self.ignored)}")
        return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    cli_values: dict[str, Any] | None = None,
) -> LoadedConfig:
    """Read `path` (or nothing), apply Hydra-style `overrides`, then `cli_values` (dotted keys
    inside the section, e.g. {"http.port": 9000}), and validate the section."""
    training, applied, defaults = load_training_config(path, overrides)
    _refuse_a_misspelt_section(training)
    raw, sources, ignored = _read_section(training, applied)
    apply_aliases(raw, sources)
    inherit_backend_from_defaults(raw, sources, defaults, training)
    inherit_from_trainer(raw, sources, training, applied)
    for key, value in (cli_values or {}).items():
        if value is not None:
            set_dotted(raw, key, value)
            sources[key] = "command line"
    _drop_nulls_meaning_unset(raw, sources)
    try:
        server = ServerConfig.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, sources) from None
    _refuse_a_relabelled_base_model(server, sources)
    return LoadedConfig(server, sources, training, Path(path) if path else None, ignored)


def _refuse_a_relabelled_base_model(server: ServerConfig, sources: dict[str, str]) -> None:
    """`initial_weight_version: N` says the checkpoint at `model_path` holds step N's weights.
    One inherited from the trainer's `model.path` is the base model verl starts from (it resumes
    its own checkpoint, not that folder), so serving it as N would label the base model's
    log-probs as step N's, and a sync of N would be skipped as already served."""
    if server.initial_weight_version > 0 and sources.get("model_path", "").startswith(f"inherited from {TRAINER_MODEL_PATH}"):
        raise ConfigError(
            f"{SECTION}.initial_weight_version={server.initial_weight_version} with model_path inherited from "
            f"{TRAINER_MODEL_PATH} (the base model, not step {server.initial_weight_version}'s weights): when verl "
            f"resumes, leave initial_weight_version at 0 and let its first sync deliver the resumed weights, or set "
            f"{SECTION}.model_path to an HF export of step {server.initial_weight_version}"
        )


def _refuse_a_misspelt_section(training: DictConfig) -> None:
    """A file without the section but with a key a typo away from it would silently serve the
    defaults (a tiny model); a training config's other sections are not close to the name."""
    if SECTION in training:
        return
    import difflib

    close = difflib.get_close_matches(SECTION, [str(key) for key in training.keys()], n=1, cutoff=0.8)
    if close:
        raise ConfigError(f"the config has no {SECTION}: section but has {close[0]!r}; did you mean {SECTION}?")


def load_training_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> tuple[DictConfig, AppliedOverrides, list[Any]]:
    """The whole training config (unresolved) after overrides, without Hydra's directives;
    also the file's `defaults:` list (not composed, but it names the section's flavour)."""
    if path is None:
        cfg = OmegaConf.create({})
    else:
        if not Path(path).is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _load_yaml(Path(path))
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping at the top level, got a list")
        cfg = loaded
    directive = cfg.get("defaults", None)
    defaults = OmegaConf.to_container(directive) if isinstance(directive, ListConfig) else []
    for directive in HYDRA_DIRECTIVES:
        if directive in cfg:
            del cfg[directive]
    applied = apply_overrides(cfg, overrides)
    return cfg, applied, defaults


def _load_yaml(path: Path) -> Any:
    """OmegaConf's load; if an interpolation outside the section is not even valid syntax,
    that value is kept as literal text (with a warning) rather than refusing the file."""
    try:
        return OmegaConf.load(path)
    except Exception as error:
        first_error = error
    try:
        data = yaml.safe_load(path.read_text())
    except Exception as error:
        raise ConfigError(f"cannot read {path} as YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read {path}: {first_error}") from None
    return OmegaConf.create(_neutralise_broken_interpolations(data, ""))


def _neutralise_broken_interpolations(node: Any, path: str) -> Any:
    if isinstance(node, dict):
        return {key: _neutralise_broken_interpolations(value, f"{path}.{key}" if path else str(key)) for key, value in node.items()}
    if isinstance(node, list):
        return [_neutralise_broken_interpolations(value, f"{path}[{index}]") for index, value in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            OmegaConf.create({"value": node})
        except Exception as error:
            if path == SECTION or path.startswith(SECTION + "."):
                raise ConfigError(f"{path}: {str(error).splitlines()[0]}") from None
            logger.warning("%s: %s; kept as literal text (outside %s)", path, str(error).splitlines()[0], SECTION)
            return node.replace("${", "\\${")
    return node


# ---------------------------------------------------------------- reading the section
def _read_section(cfg: DictConfig, applied: AppliedOverrides) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    try:
        node = OmegaConf.select(cfg, SECTION)
    except Exception as error:
        raise ConfigError(f"{SECTION}: cannot resolve it: {error}") from None
    if node is None:
        return {}, {}, []
    if not isinstance(node, DictConfig):
        shown = OmegaConf.to_yaml(node).strip() if isinstance(node, ListConfig) else node  # to_yaml takes containers only
        raise ConfigError(f"{SECTION} must be a mapping of settings, got {shown!r}")
    sources: dict[str, str] = {}
    ignored: list[str] = []
    raw = _resolve(node, "", applied, sources, ignored)
    return raw, sources, ignored


def unknown_section_keys(keys: Iterable[str]) -> list[str]:
    """Top-level keys of the section that no setting, alias or ignored verl key accounts for:
    for readers of the section other than the server (the trainers), which must not let a
    mistyped sub-section pass as its defaults."""
    valid = set(ServerConfig.model_fields) | set(ALIASES)
    return sorted(key for key in keys if key not in valid and not _is_ignored("", key))


def _is_ignored(prefix: str, key: str) -> bool:
    if key.startswith("_") and key.endswith("_"):  # _target_ and other OmegaConf/Hydra markers
        return True
    if prefix == "":
        return key in IGNORED_SECTION_KEYS
    return prefix == "megatron" and key in IGNORED_MEGATRON_KEYS


def _resolve(
    node: DictConfig, prefix: str, applied: AppliedOverrides, sources: dict[str, str], ignored: list[str]
) -> dict[str, Any]:
    """Plain values of one mapping in the section, interpolations resolved key by key so that a
    failure names the key; records each leaf's source (file or override)."""
    out: dict[str, Any] = {}
    for key in node.keys():
        key = str(key)
        path = f"{prefix}.{key}" if prefix else key
        if _is_ignored(prefix, key):
            ignored.append(f"{SECTION}.{path}")
            continue
        try:
            value = node[key]
        except Exception as error:
            expression = _raw_expression(node, key)
            raise ConfigError(f"{SECTION}.{path}: cannot resolve {expression!r}: {error}") from None
        if isinstance(value, DictConfig):
            out[key] = _resolve(value, path, applied, sources, ignored)
            continue
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = value
        source = "override" if applied.set_by_override(f"{SECTION}.{path}") else "file"
        if OmegaConf.is_interpolation(node, key):
            source += f", via {_raw_expression(node, key)}"
        sources[path] = source
    return out


def _raw_expression(node: DictConfig, key: str) -> str:
    try:
        return str(node._get_node(key)._value())  # the unresolved `${...}` text
    except Exception:
        return ""


def _drop_nulls_meaning_unset(raw: dict[str, Any], sources: dict[str, str], prefix: str = "") -> None:
    """`key: null` means "unset" (the reference design writes `nnodes: null`): where a setting
    cannot be None, drop it so its default applies."""
    model = _model_at(prefix.split(".")[:-1] if prefix else [])
    for key in list(raw):
        value = raw[key]
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            _drop_nulls_meaning_unset(value, sources, path + ".")
        elif value is None and model is not None and key in model.model_fields:
            if type(None) not in get_args(model.model_fields[key].annotation):
                del raw[key]
                sources.pop(path, None)


def _leaves(model: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.extend(_leaves(value, path + "."))
        else:
            out.append((path, value))
    return out


# ---------------------------------------------------------------- errors that name the key
def _model_at(path: Sequence[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = ServerConfig
    for part in path:
        info = model.model_fields.get(part)
        annotation = getattr(info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _explain(error: ValidationError, sources: dict[str, str]) -> ConfigError:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        path = ".".join([SECTION, *loc])
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            valid = sorted(model.model_fields) if model else []
            if not loc[:-1]:
                valid = sorted(valid + list(ALIASES))
            guess = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            lines.append(f"{path}: unknown key{hint} Valid keys here: {', '.join(valid)}")
        elif not loc:
            lines.append(message)
        else:
            source = sources.get(".".join(loc))
            written = f" [{source}]" if source and source not in ("file", "override") else ""
            lines.append(f"{path}: {message} (got {item.get('input')!r}){written}")
    return ConfigError("invalid model_engine_server config:\n  " + "\n  ".join(lines))
