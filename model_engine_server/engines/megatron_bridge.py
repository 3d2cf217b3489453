"""The mbridge seam: a HF config in, Megatron-core's GPTModel (this rank's shard) out.

mbridge maps HuggingFace configs and weight names to Megatron's. It is written for training
with TransformerEngine; to serve with the local layer spec and with transformers 5, the
registered bridge class is combined with `_ScoringBridgeMixin`, which changes only:

* the layer spec: TransformerEngine's when it is installed, else Megatron's local spec
  (mbridge always asks for TE's, which fails with `NameError: TENorm` without it);
* weight names of the local spec's separate norms (`input_layernorm`, `pre_mlp_layernorm`),
  which mbridge's maps (TE's fused `layer_norm_weight` names) do not cover;
* the tied-embedding map, kept per instance: mbridge writes it into the class dict, so a tied
  model built earlier in the process would make a later untied one load `lm_head.weight` wrong.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any

import torch

from model_engine_server.engines.megatron_cpu import cpu_config_overrides, tensor_cuda_is_identity

# Dense decoder-only families whose mbridge mapping this engine has been checked against HF
# transformers (tests/test_megatron_engine.py). mbridge maps more (MoE, vision-language); those
# need expert parallelism or a vision tower this engine does not build.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

_LOCAL_SPEC_NORMS = {
    "input_layernorm.weight": "model.layers.{layer}.input_layernorm.weight",
    "pre_mlp_layernorm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
}


class MegatronConfigError(ValueError):
    """The model or the parallel layout cannot be served by the Megatron engine (raised at start)."""


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def load_hf_config(model_path: str) -> Any:  # -> transformers.PretrainedConfig
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, local_files_only=True)


def check_supported(hf_config: Any) -> None:
    """A clear error at start for a model this engine would not score exactly."""
    from mbridge import AutoBridge

    model_type = getattr(hf_config, "model_type", None)
    mapped_by_mbridge = AutoBridge.list_supported_models()
    if model_type not in mapped_by_mbridge:
        raise MegatronConfigError(
            f"architecture {model_type!r} is not supported by mbridge "
            f"(it maps: {', '.join(sorted(mapped_by_mbridge))}); use the 'hf' engine backend for it"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MegatronConfigError(
            f"architecture {model_type!r} is mapped by mbridge, but the megatron engine serves only "
            f"dense decoder-only models ({', '.join(SUPPORTED_MODEL_TYPES)}); use the 'hf' engine backend for it"
        )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise MegatronConfigError(
            f"RoPE scaling {rope_type!r} is not mapped exactly by mbridge; use the 'hf' engine backend"
        )
    if getattr(hf_config, "use_sliding_window", False):
        raise MegatronConfigError("sliding-window attention is not built by mbridge; use the 'hf' engine backend")
    if getattr(hf_config, "mlp_bias", False):
        raise MegatronConfigError("MLP biases are not mapped by mbridge; use the 'hf' engine backend")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise MegatronConfigError(f"activation {hf_config.hidden_act!r} is not mapped by mbridge (silu only)")


def restore_rope_theta(hf_config: Any) -> None:
    """transformers 5 moved `rope_theta` into `rope_parameters`; mbridge still reads the attribute."""
    if getattr(hf_config, "rope_theta", None) is None:
        rope = getattr(hf_config, "rope_parameters", None) or {}
        hf_config.rope_theta = rope.get("rope_theta", 10000.0)


class _ScoringBridgeMixin:
    """Put before an mbridge bridge class in the MRO; see the module docstring."""

    use_transformer_engine: bool = False
    hf_config: Any
    config: Any

    def _adjust_mapping_for_shared_weights(self) -> None:
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        self._DIRECT_MAPPING = {  # instance attribute: never touches the class dict
            **type(self)._DIRECT_MAPPING,  # type: ignore[attr-defined]
            "output_layer.weight": "model.embed_tokens.weight" if tied else "lm_head.weight",
        }

    def _get_transformer_layer_spec(self, vp_stage: int | None = None) -> Any:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        self.has_vp_stage = "vp_stage" in inspect.signature(get_gpt_decoder_block_spec).parameters
        extra = {"vp_stage": vp_stage} if self.has_vp_stage else {}
        return get_gpt_decoder_block_spec(self.config, use_transformer_engine=self.use_transformer_engine, **extra)

    def _weight_name_mapping_mcore_to_hf(self, mcore_weights_name: str) -> list[str]:
        parts = mcore_weights_name.split(".")
        if len(parts) == 5 and parts[:2] == ["decoder", "layers"]:
            template = _LOCAL_SPEC_NORMS.get(".".join(parts[3:]))
            if template is not None:
                return [template.format(layer=parts[2])]
        return super()._weight_name_mapping_mcore_to_hf(mcore_weights_name)  # type: ignore[misc]


def make_bridge(hf_config: Any, dtype: torch.dtype, use_transformer_engine: bool, tp_size: int) -> Any:
    """An mbridge bridge for `hf_config` that builds a scoring model at this rank's layout.

    Megatron's parallel state must be initialised (the bridge reads the layout from it).
    """
    from mbridge.core.bridge import _MODEL_REGISTRY

    restore_rope_theta(hf_config)
    base = _MODEL_REGISTRY[hf_config.model_type]
    scoring_class = type(
        f"Scoring{base.__name__}",
        (_ScoringBridgeMixin, base),
        {"use_transformer_engine": use_transformer_engine},
    )
    vocab_size = int(hf_config.vocab_size)
    # Pad only when the vocabulary does not split evenly over TP ranks; the padded rows are
    # cut off the LM head before scoring (see MegatronEngine.lm_head).
    pad_to = tp_size if vocab_size % tp_size else None
    with warnings.catch_warnings():  # TransformerConfig warns about training-only defaults
        warnings.simplefilter("ignore", UserWarning)
        bridge = scoring_class(hf_config, dtype=dtype, make_vocab_size_divisible_by=pad_to)
    overrides: dict[str, Any] = {
        # Forward-only: sequence parallelism would only scatter activations we need whole.
        "sequence_parallel": False,
        **cpu_config_overrides(),
    }
    if not use_transformer_engine:
        # The fused causal softmax kernel ignores the mask and applies a plain triangle, which
        # would let packed sequences see each other; the local spec needs the masked path.
        overrides["masked_softmax_fusion"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bridge.set_extra_args(**overrides)
    return bridge


def build_gpt_model(bridge: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """This rank's GPTModel stage, in eval mode without gradients, on `device`, every floating
    parameter in `dtype`.

    The bridge's model provider is called directly: mbridge's `get_model` also wraps the
    model for training (Float16Module, DDP) and calls `.cuda()`. Without Float16Module the
    local layer spec leaves its norm weights in float32 under a bf16 model; they are cast here,
    as Float16Module casts them, so every parameter has the dtype the weight layout promises
    (an export in float32 was refused by a restarted peer, and with pipeline stages the
    receiving stages, expecting `dtype`, broke the broadcast).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    provider = bridge._model_provider(post_model_creation_callbacks=[])
    with tensor_cuda_is_identity():
        model = provider(pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
