"""HuggingFace transformers engine: a causal LM from a local checkpoint, forward-only, packed.

Packed rows carry `position_ids` reset per sequence and the boundaries as `cu_seq_lens_*`
keywords. The default attention is varlen flash attention on CUDA when installed, else our
`packed_sdpa` (one causal SDPA per sequence, no `[T, T]` mask). With plain `sdpa`, transformers'
packed-sequence detection builds a block-diagonal mask from `position_ids` - but only in the
families whose mask builder is given them (OPT, Falcon and BioGPT's is not, and their packed
sequences would attend to each other). `use_cache=False` is required: with the cache on,
transformers skips that detection too (measured in ../shared/notes/cpu-megatron.md). Whatever
the attention, a start-up probe (`hf_probe.py`) compares the packed path with the model's own
forward and refuses a model it would score wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from model_engine_server.engines import packed_attention
from model_engine_server.engines.base import (
    EngineSpec,
    HiddenStateEngine,
    ModelInfo,
    WeightSpec,
    forward_settings,
    register_engine,
    resolve_device,
)
from model_engine_server.engines.hf_probe import packed_path_mismatch
from model_engine_server.errors import WeightSyncError
from model_engine_server.logprobs import LMHead
from model_engine_server.packing import PackedBatch

# Output scales the model applies after its LM head, which this engine (reading the head off
# `base_model`) would skip: refused unless they are 1.
UNSUPPORTED_CONFIG_KEYS = (
    "final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling", "lm_head_multiplier",
)
PACKABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "mlp", "moe"})
RECURRENT_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"})


def check_checkpoint_folder(model_path: str | None) -> Path:
    """A clear error for a missing or non-HF folder, before transformers' less direct ones."""
    if not model_path:
        raise ValueError("no model path given: set model_engine_server.model_path (or actor_rollout_ref.model.path)")
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {model_path!r} is not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {model_path!r} has no config.json: not a HuggingFace checkpoint")
    return path


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why `model` cannot score packed rows, or None. Only full and sliding-window attention
    read the sequence boundaries; a layer that carries state along the row (a convolution,
    linear attention, a state-space mixer) would run each sequence on from the one packed
    before it."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ()) | set(getattr(config, "layers_block_type", None) or ())
    unpackable = sorted(str(kind) for kind in kinds - PACKABLE_LAYER_TYPES)
    if not unpackable and (config.model_type in RECURRENT_MODEL_TYPES or getattr(config, "hybrid_override_pattern", None)):
        unpackable = [config.model_type]
    if not unpackable:
        unpackable = sorted({type(m).__name__ for m in model.modules() if "Mamba" in type(m).__name__})
    length_dependent = sorted(rope_types(config) & LENGTH_DEPENDENT_ROPE)
    if not unpackable and length_dependent:
        return (f"{type(model).__name__} uses rope_type {', '.join(length_dependent)}, whose rotary frequencies "
                "transformers sets from the longest position in the forward: in a packed row (or one without its "
                "last token, as this engine runs it) every sequence would get other frequencies than alone, so "
                "this engine does not serve it")
    if not unpackable:
        return None
    return (f"{type(model).__name__} has layers this engine cannot run on packed rows ({', '.join(unpackable)}): a "
            "layer carrying state along the row would run each sequence on from the one before it, and chunked "
            "attention is not applied, so this engine does not serve it")


# rope types whose frequencies transformers recomputes from the forward's own length
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def rope_types(config: Any) -> set[str]:
    """Every `rope_type` the config names (transformers 5's `rope_parameters`, flat or per layer
    type, or the older `rope_scaling`)."""
    found: set[str] = set()
    for settings in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if not isinstance(settings, dict):
            continue
        nested = [value for value in settings.values() if isinstance(value, dict)]
        for entry in nested or [settings]:
            kind = entry.get("rope_type") or entry.get("type")
            if kind:
                found.add(str(kind))
    return found


def _renamed_on_load(path: Path, parameter_names: set[str], architecture: str) -> str | None:
    """Why weights cannot be synced by checkpoint name into this model, or None. transformers
    renames some checkpoints' tensors as it loads them (a mixture of experts' per-expert
    tensors become one merged parameter); a trainer sends, and a folder holds, the checkpoint's
    names, which this engine would then refuse one by one. Scoring is unaffected."""
    from checkpoint_transport.checkpoint_files import CheckpointError, list_tensors

    try:
        stored = set(list_tensors(path))
    except CheckpointError:  # not a safetensors folder: nothing to compare, syncs say what is wrong
        return None
    foreign = sorted(stored - parameter_names - {"lm_head.weight"})
    if not foreign:
        return None
    return (f"{architecture} keeps its weights under other names than its checkpoint's (e.g. {foreign[0]!r}: transformers "
            "merges them as it loads), so the hf backend cannot take weight syncs for it; it scores with the weights "
            "it started from (as a reference policy does)")


def pick_attention(device: torch.device, requested: str | None) -> str:
    if requested:
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return packed_attention.NAME  # keeps packed sequences apart whatever mask the model builds


def load_causal_lm(path: Path, spec: EngineSpec, device: torch.device) -> torch.nn.Module:
    """The checkpoint's causal LM on `device`, in eval mode without gradients, with the attention
    `pick_attention` chooses; a family without that attention is a clear error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    packed_attention.register()
    attention = pick_attention(device, spec.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=spec.torch_dtype(), attn_implementation=attention, local_files_only=True,
        )
    except KeyError as error:  # a family that looks its attention classes up by name (Falcon)
        if error.args != (attention,):
            raise
        raise ValueError(f"the model at {str(path)!r} has no attention {attention!r} (its family picks attention "
                         "classes of its own); set attn_implementation to one it has that keeps packed sequences "
                         "apart (flash_attention_2 on CUDA)") from None
    return model.to(device).eval().requires_grad_(False)


class HFEngine(HiddenStateEngine):
    """A `transformers` causal LM held in eval mode on one device."""

    def __init__(self, spec: EngineSpec) -> None:
        path = check_checkpoint_folder(spec.model_path)
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.model = load_causal_lm(path, spec, self.device)
        config = self.model.config
        for key in UNSUPPORTED_CONFIG_KEYS:
            if getattr(config, key, None) not in (None, 1.0):
                raise ValueError(f"{type(self.model).__name__} uses {key}, which this engine does not apply yet")
        problem = packing_problem(self.model)
        if problem is not None:
            raise ValueError(problem)
        self._state = self.model.state_dict()  # shares storage with the parameters
        self._params = {name: param for name, param in self.model.named_parameters()}
        self._renamed = _renamed_on_load(path, set(self._state), type(self.model).__name__)
        self.info = ModelInfo(
            architecture=type(self.model).__name__,
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 1 << 20)),
            hidden_size=int(config.hidden_size),
            num_parameters=sum(p.numel() for p in self._params.values()),
            dtype=spec.dtype,
            device=str(self.device),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            shares_prompts=spec.share_prompts and self._reads_segment_prefixes(),
            forward_settings=forward_settings(config),
        )
        mismatch = packed_path_mismatch(self)
        if mismatch is not None:
            raise ValueError(mismatch)

    def _reads_segment_prefixes(self) -> bool:
        """Only our packed attention reads `segment_prefixes`; flash-attn and SDPA would let a
        response segment attend to itself alone."""
        return self.model.config._attn_implementation == packed_attention.NAME

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        if batch.shares_prompts and not self._reads_segment_prefixes():
            raise ValueError(f"attention {self.model.config._attn_implementation!r} cannot score shared prompts")
        boundaries = batch.cu_seqlens.to(self.device)
        prefixes = batch.segment_prefixes if batch.shares_prompts else None
        shared = {"segment_prefixes": prefixes} if prefixes is not None else {}
        with packed_attention.row_layout(boundaries, prefixes):
            outputs = self.model.base_model(
                input_ids=batch.input_ids.to(self.device),
                position_ids=batch.position_ids.to(self.device),
                use_cache=False,
                cu_seq_lens_q=boundaries,
                cu_seq_lens_k=boundaries,
                max_length_q=batch.max_seqlen,
                max_length_k=batch.max_seqlen,
                **shared,
            )
        return outputs.last_hidden_state[0]

    def lm_head(self) -> LMHead:
        head = self.model.get_output_embeddings()
        return LMHead(weight=head.weight, bias=getattr(head, "bias", None))

    def weight_specs(self) -> dict[str, WeightSpec]:
        """Every tensor a complete sync must deliver (tied aliases are accepted, not required)."""
        if self._renamed is not None:
            raise WeightSyncError(self._renamed)
        return {name: WeightSpec(tuple(p.shape), p.dtype) for name, p in self._params.items()}

    @torch.inference_mode()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors in place by HF name; any unknown name, shape or dtype is rejected.

        Each tensor is checked before it is copied, so a rejected tensor changes nothing; the
        caller (the sync protocol) decides whether earlier ones left the weights incomplete.
        """
        if self._renamed is not None:
            raise WeightSyncError(self._renamed)
        loaded = []
        for name, tensor in named_tensors:
            target = self._state.get(name)
            if target is None:
                raise WeightSyncError(f"unknown weight name {name!r} for {self.info.architecture}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise WeightSyncError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            if tensor.dtype != target.dtype and not (
                self.spec.allow_dtype_cast and tensor.dtype.is_floating_point
            ):
                raise WeightSyncError(
                    f"weight {name!r} has dtype {tensor.dtype}, expected {target.dtype} "
                    "(set allow_dtype_cast to convert)"
                )
            target.copy_(tensor)
            loaded.append(name)
        return loaded

    returns_results = True  # one device, one engine: every rank's results are its own
    data_parallel_rank = None

    def discard_partial_weights(self) -> None:
        """Every tensor is written whole here: nothing waits for parts."""

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self._params.items():
            yield name, param.detach()


@register_engine("hf")
def build_hf_engine(spec: EngineSpec, **_: object) -> HFEngine:
    return HFEngine(spec)
