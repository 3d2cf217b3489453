"""Load the `model_engine_server:` section from a fully-async training YAML plus overrides.

Steps, in order:
1. Read the YAML with OmegaConf (verl's own config library); drop Hydra's `hydra:` and
   `defaults:` directives. `${...}` interpolations stay lazy: a key outside the section is never
   resolved, so a file whose `defaults:` are not composed (verl's shipped YAML) still loads.
2. Apply the command-line overrides in Hydra's grammar (`config_overrides.py`).
3. Resolve the section's values (interpolations included, e.g. `${oc.select:...}`); keys of the
   reference design that mean nothing here (`profiler`, `router_replay`, Megatron optimizer
   settings, ...) are accepted and listed as ignored.
4. Map the reference design's other names onto ours (`enable`, `strategy`, `batch_size`,
   `timeout`, `max_token_len_per_gpu`) and fill unset values from the trainer's keys where verl
   users expect it (model path, rollout temperature, the actor's Megatron parallel sizes).
5. Validate with the pydantic models of `config.py`; a wrong key or type becomes a `ConfigError`
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
from typing import Any, Sequence, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, SecretStr, ValidationError

from model_engine_server.config import SECTION, ConfigError, ServerConfig
from model_engine_server.config_overrides import AppliedOverrides, apply_overrides

logger = logging.getLogger(__name__)

HYDRA_DIRECTIVES = ("hydra", "defaults")

# Keys of the reference design's section that configure its trainer-side worker (profiling,
# MoE router replay, torch.compile, its request-count batching) and have no meaning here.
IGNORED_SECTION_KEYS = frozenset(
    {"defaults", "rollout_n", "use_torch_compile", "micro_batch_size_per_gpu", "use_dynamic_bsz", "profiler", "router_replay"}
)
# verl's Megatron engine settings the section inherits wholesale; only the parallel sizes matter
# to a forward-only server (training, offload, checkpointing and fusion knobs do not).
IGNORED_MEGATRON_KEYS = frozenset(
    {
        "param_offload", "grad_offload", "optimizer_offload", "offload", "sequence_parallel",
        "use_distributed_optimizer", "use_dist_checkpointing", "dist_checkpointing_path",
        "dist_checkpointing_prefix", "dist_ckpt_optim_fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient", "dynamic_context_parallel",
        "max_seqlen_per_dp_cp_rank", "entropy_from_logits_with_chunking", "entropy_from_logits_chunk_size",
        "seed", "override_ddp_config", "override_transformer_config", "override_mcore_model_config",
        "use_mbridge", "vanilla_mbridge", "use_remove_padding", "pad_bshd_to_minibatch_max", "pad_to_length",
        "pad_to_length_bucket", "use_megatron_fsdp", "forward_only", "dtype", "router_replay", "qat",
    }
)
STRATEGY_TO_BACKEND = {"megatron": "megatron", "fsdp": "hf", "fsdp2": "hf", "hf": "hf"}
# the reference design's names -> ours (top level of the section only)
ALIASES = {
    "enable": "enable_standalone",
    "strategy": "backend",
    "batch_size": "scheduler.max_batch_size",
    "timeout": "scheduler.max_wait_ms",
    "max_token_len_per_gpu": "scheduler.max_tokens_per_batch",
}
MEGATRON_PARALLEL_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "virtual_pipeline_model_parallel_size",
)
TRAINER_MODEL_PATH = "actor_rollout_ref.model.path"
TRAINER_TEMPERATURE = "actor_rollout_ref.rollout.temperature"
TRAINER_STRATEGY = "actor_rollout_ref.actor.strategy"
TRAINER_MEGATRON = "actor_rollout_ref.actor.megatron"
TRAINER_LOG_PROB_TOKENS = "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"


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
    raw, sources, ignored = _read_section(training, applied)
    _apply_aliases(raw, sources)
    _inherit_backend_from_defaults(raw, sources, defaults)
    _inherit_from_trainer(raw, sources, training, applied)
    for key, value in (cli_values or {}).items():
        if value is not None:
            _set(raw, key, value)
            sources[key] = "command line"
    _drop_nulls_meaning_unset(raw, sources)
    try:
        server = ServerConfig.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, sources) from None
    return LoadedConfig(server, sources, training, Path(path) if path else None, ignored)


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
    defaults = cfg.get("defaults") if isinstance(cfg.get("defaults", None), ListConfig) else []
    defaults = OmegaConf.to_container(defaults) if isinstance(defaults, ListConfig) else []
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
        raise ConfigError(f"{SECTION} must be a mapping of settings, got {OmegaConf.to_yaml(node).strip()!r}")
    sources: dict[str, str] = {}
    ignored: list[str] = []
    raw = _resolve(node, "", applied, sources, ignored)
    return raw, sources, ignored


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


# ---------------------------------------------------------------- reference-design names
def _apply_aliases(raw: dict[str, Any], sources: dict[str, str]) -> None:
    for alias, canonical in ALIASES.items():
        if alias not in raw:
            continue
        value = _alias_value(alias, raw.pop(alias))
        source = f"{sources.pop(alias, 'file')} (as {alias})"
        if value is _UNSET:
            continue
        existing = _get(raw, canonical)
        if existing is not _UNSET:
            if existing != value and alias != "max_token_len_per_gpu":
                raise ConfigError(
                    f"{SECTION}.{alias}={value!r} and {SECTION}.{canonical}={existing!r} disagree; they name "
                    f"the same setting, set one of them"
                )
            continue  # the explicit key wins over the reference design's token length per GPU
        _set(raw, canonical, value)
        sources[canonical] = source


_UNSET = object()


def _alias_value(alias: str, value: Any) -> Any:
    """Translate a reference-design value into ours; -1 / null batch size means no count limit."""
    if alias == "strategy":
        if value not in STRATEGY_TO_BACKEND:
            raise ConfigError(
                f"{SECTION}.strategy: {value!r} is not a valid choice; valid: {', '.join(STRATEGY_TO_BACKEND)}"
            )
        return STRATEGY_TO_BACKEND[value]
    if alias == "batch_size":
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0):
            return None
        return value
    if alias == "timeout":
        if value is None:
            return _UNSET
        try:
            return float(value) * 1000.0
        except (TypeError, ValueError):
            raise ConfigError(f"{SECTION}.timeout: expected seconds as a number, got {value!r}") from None
    if alias == "max_token_len_per_gpu" and value is None:
        return _UNSET
    return value


# ---------------------------------------------------------------- inheritance
def _inherit_from_trainer(
    raw: dict[str, Any], sources: dict[str, str], cfg: DictConfig, applied: AppliedOverrides
) -> None:
    """Fill unset values from the trainer's keys, as the reference design's section does."""

    def inherit(key: str, trainer_key: str, convert=lambda value: value) -> None:  # type: ignore[no-untyped-def]
        if _get(raw, key) not in (_UNSET, None):
            return
        value = _select(cfg, trainer_key)
        if value is None:
            return
        converted = convert(value)
        if converted is None:
            return
        _set(raw, key, converted)
        origin = "override" if applied.set_by_override(trainer_key) else "file"
        sources[key] = f"inherited from {trainer_key} ({origin})"

    inherit("model_path", TRAINER_MODEL_PATH, lambda value: os.path.expanduser(value) if isinstance(value, str) and value else None)
    inherit("temperature", TRAINER_TEMPERATURE)
    inherit("backend", TRAINER_STRATEGY, _backend_of_trainer_strategy)
    inherit("scheduler.max_tokens_per_batch", TRAINER_LOG_PROB_TOKENS)
    if _get(raw, "backend") == "megatron":
        for name in MEGATRON_PARALLEL_KEYS:
            inherit(f"megatron.{name}", f"{TRAINER_MEGATRON}.{name}")


def _inherit_backend_from_defaults(raw: dict[str, Any], sources: dict[str, str], defaults: list[Any]) -> None:
    """The reference design picks its section through the file's `defaults:` list
    (`model_engine_server@model_engine_server: megatron_model_engine_server`); that choice
    sets `strategy: megatron` there, so it does here too."""
    if raw.get("backend") is not None:
        return
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for group, choice in entry.items():
            if str(group).split("@")[0] == SECTION and isinstance(choice, str):
                backend = "megatron" if "megatron" in choice else None
                if backend:
                    raw["backend"] = backend
                    sources["backend"] = f"inherited from defaults: {group}={choice} (file)"
                return


def _backend_of_trainer_strategy(value: Any) -> str | None:
    backend = STRATEGY_TO_BACKEND.get(value) if isinstance(value, str) else None
    if backend is None:
        logger.warning("%s=%r is not a strategy the server knows; not inheriting a backend", TRAINER_STRATEGY, value)
    return backend


def _select(cfg: DictConfig, key: str) -> Any:
    """A trainer key's resolved value, or None when absent or unresolvable (never fatal)."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


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


# ---------------------------------------------------------------- dotted access on plain dicts
def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
        node = child
    node[leaf] = value


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
