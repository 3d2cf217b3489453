"""The reference design's names and inheritance, mapped onto `ServerConfig`.

verl users write the section the way the reference design's config does: `enable`,
`strategy`, `batch_size`, `timeout`, `max_token_len_per_gpu`, and a whole block of Megatron
engine settings, with unset values following the trainer (`actor_rollout_ref.*`). This module
holds that vocabulary: which keys are accepted without effect, which are other names for ours,
and which trainer keys fill unset values. It works on the plain dict the loader resolved.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from model_engine_server.config.schema import SECTION, ConfigError
from model_engine_server.config.overrides import AppliedOverrides
from model_engine_server.config.verl_engine import ENGINE_SECTION_OF_STRATEGY

logger = logging.getLogger(__name__)

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
# The trainer's sizes the scoring replicas take over: those this build's engine runs. Context and
# expert parallelism and the virtual pipeline shape the trainer's memory and schedule; a forward-only
# replica of the same TP x PP scores without them.
INHERITED_MEGATRON_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
TRAINER_MODEL_PATH = "actor_rollout_ref.model.path"
TRAINER_TEMPERATURE = "actor_rollout_ref.rollout.temperature"
TRAINER_STRATEGY = "actor_rollout_ref.actor.strategy"
TRAINER_MEGATRON = "actor_rollout_ref.actor.megatron"
TRAINER_ACTOR = "actor_rollout_ref.actor"
TRAINER_MODEL = "actor_rollout_ref.model"
TRAINER_LOG_PROB_TOKENS = "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"
# verl builds a reference policy when either KL term is on; the server then serves it too
TRAINER_KL_KEYS = ("actor_rollout_ref.actor.use_kl_loss", "algorithm.use_kl_in_reward")


UNSET = object()


# ---------------------------------------------------------------- dotted access on plain dicts
def get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return UNSET
        node = node[part]
    return node


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
        node = child
    node[leaf] = value


# ---------------------------------------------------------------- reference-design names
def apply_aliases(raw: dict[str, Any], sources: dict[str, str]) -> None:
    for alias, canonical in ALIASES.items():
        if alias not in raw:
            continue
        value = _alias_value(alias, raw.pop(alias))
        alias_layer = sources.pop(alias, "file")
        if value is UNSET:
            continue
        existing = get_dotted(raw, canonical)
        if existing is not UNSET and existing != value and alias != "max_token_len_per_gpu":
            canonical_layer = sources.get(canonical, "file")
            if alias_layer == canonical_layer:
                raise ConfigError(
                    f"{SECTION}.{alias}={value!r} and {SECTION}.{canonical}={existing!r} disagree; they name "
                    f"the same setting, set one of them"
                )
            if canonical_layer == "override":  # a command-line override beats the file, under either name
                continue
        elif existing is not UNSET:
            continue  # the same value, or the explicit key over the reference design's token length per GPU
        set_dotted(raw, canonical, value)
        sources[canonical] = f"{alias_layer} (as {alias})"


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
            return UNSET
        try:
            return float(value) * 1000.0
        except (TypeError, ValueError):
            raise ConfigError(f"{SECTION}.timeout: expected seconds as a number, got {value!r}") from None
    if alias == "max_token_len_per_gpu" and value is None:
        return UNSET
    return value


# ---------------------------------------------------------------- inheritance
def inherit_from_trainer(
    raw: dict[str, Any], sources: dict[str, str], cfg: DictConfig, applied: AppliedOverrides
) -> None:
    """Fill unset values from the trainer's keys, as the reference design's section does."""

    def inherit(key: str, trainer_key: str, convert: Callable[[Any], Any] = lambda value: value) -> None:
        if get_dotted(raw, key) not in (UNSET, None):
            return
        value = select_trainer_key(cfg, trainer_key)
        if value is None:
            return
        converted = convert(value)
        if converted is None:
            return
        set_dotted(raw, key, converted)
        origin = "override" if applied.set_by_override(trainer_key) else "file"
        sources[key] = f"inherited from {trainer_key} ({origin})"

    inherit("model_path", TRAINER_MODEL_PATH, lambda value: os.path.expanduser(value) if isinstance(value, str) and value else None)
    inherit("temperature", TRAINER_TEMPERATURE)
    inherit("backend", TRAINER_STRATEGY, _backend_of_trainer_strategy)
    inherit("scheduler.max_tokens_per_batch", TRAINER_LOG_PROB_TOKENS)
    for kl_key in TRAINER_KL_KEYS:  # only `true` switches ref mode on; `false` leaves it unset
        inherit("enable_ref_mode", kl_key, lambda value: True if value is True else None)
    if get_dotted(raw, "backend") == "megatron":
        for name in INHERITED_MEGATRON_KEYS:
            inherit(f"megatron.{name}", f"{TRAINER_MEGATRON}.{name}")
    if get_dotted(raw, "backend") == "verl":  # verl's own worker, built from the trainer's own settings
        inherit("verl_engine.strategy", TRAINER_STRATEGY)
        inherit("verl_engine.model", TRAINER_MODEL)
        strategy = get_dotted(raw, "verl_engine.strategy")
        section = ENGINE_SECTION_OF_STRATEGY.get(strategy if isinstance(strategy, str) else "fsdp2")
        if section is not None:  # another strategy is refused by the schema, naming it
            inherit("verl_engine.engine", f"{TRAINER_ACTOR}.{section}")


def inherit_backend_from_defaults(
    raw: dict[str, Any], sources: dict[str, str], defaults: list[Any], cfg: DictConfig | None = None
) -> None:
    """The reference design picks its section through the file's `defaults:` list
    (`model_engine_server@model_engine_server: megatron_model_engine_server`); that choice
    sets `strategy: megatron` there, so it does here too. Failing that, and with no
    `actor.strategy` in the file, a Megatron trainer named the way verl names it (`defaults:
    [ppo_megatron_trainer]`, or the group choice `model_engine=megatron`) means backend
    megatron: the file's defaults are not composed here, and the trainer runs Megatron."""
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
    if cfg is None or select_trainer_key(cfg, TRAINER_STRATEGY) is not None:
        return  # the trainer's strategy says which engine it runs
    hints = [f"defaults: {entry}" for entry in defaults if isinstance(entry, str) and "megatron" in entry]
    engine = OmegaConf.select(cfg, "model_engine", default=None, throw_on_resolution_failure=False)
    if engine == "megatron":
        hints.append("model_engine=megatron")
    if hints:
        raw["backend"] = "megatron"
        sources["backend"] = f"inherited from {hints[0]} (the trainer runs Megatron)"


def _backend_of_trainer_strategy(value: Any) -> str | None:
    backend = STRATEGY_TO_BACKEND.get(value) if isinstance(value, str) else None
    if backend is None:
        logger.warning("%s=%r is not a strategy the server knows; not inheriting a backend", TRAINER_STRATEGY, value)
    return backend


def select_trainer_key(cfg: DictConfig, key: str) -> Any:
    """A trainer key's resolved value, or None when absent or unresolvable. A mapping is resolved
    whole; an interpolation inside it that fails is an error naming the key."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception as error:
            raise ConfigError(f"{key}: cannot resolve it: {str(error).splitlines()[0]}") from None
    return value
