"""Small random HF checkpoints made locally (nothing can be downloaded at run time).

The same seed gives the same weights, so tests, demos and benchmarks agree on what they load.
Sizes are flags: the defaults make a ~1M-parameter model that scores in milliseconds on CPU;
the benchmarks ask for ~100M parameters with a 151,936-token vocabulary. With `tokenizer=True` the
folder also gets a small byte-level tokenizer trained here (`tiny_tokenizer`), for text prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ARCHITECTURES = ("qwen2", "llama", "qwen3")


@dataclass
class TinyModelShape:
    arch: str = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool | None = None  # None: qwen2 tied, llama untied, qwen3 tied
    init_std: float = 0.05

    def problem(self) -> str | None:
        """Why transformers could not run a model of this shape, or None."""
        sizes = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.num_kv_heads)
        if min(sizes) < 1:
            return "every size must be at least 1"
        if self.hidden_size % self.num_heads:
            return f"hidden size {self.hidden_size} is not a multiple of the {self.num_heads} heads"
        if self.num_heads % self.num_kv_heads:
            return f"the {self.num_heads} heads are not a multiple of the {self.num_kv_heads} key/value heads"
        if (self.hidden_size // self.num_heads) % 2:
            return f"the head size {self.hidden_size // self.num_heads} must be even (rotary embeddings)"
        return None


def _config(shape: TinyModelShape):  # -> transformers.PretrainedConfig
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if shape.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {shape.arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if (problem := shape.problem()) is not None:
        raise ValueError(f"tiny model shape: {problem}")
    tied = shape.tie_word_embeddings
    if tied is None:
        tied = shape.arch != "llama"
    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=tied,
        initializer_range=shape.init_std,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    if shape.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if shape.arch == "qwen3":
        return Qwen3Config(**common, head_dim=shape.hidden_size // shape.num_heads, use_sliding_window=False)
    return LlamaConfig(**common)


def make_tiny_model(
    output_dir: str | Path, shape: TinyModelShape | None = None, seed: int = 0, tokenizer: bool = False
) -> Path:
    """Write a random-init checkpoint (config.json + model.safetensors) and return its folder.

    `tokenizer=True` also saves a tokenizer whose ids fit the vocabulary (`tokenizer.json`,
    `tokenizer_config.json`). It is off by default: a folder without one is how the server is told
    to score token ids only, and the tests of that rely on it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    shape = shape or TinyModelShape()
    config = _config(shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    if tokenizer:
        from model_engine_server.tiny_tokenizer import save_tiny_tokenizer

        save_tiny_tokenizer(output, shape.vocab_size, model_max_length=shape.max_position_embeddings)
    return output


def perturbed_weights(
    named_tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """New weights near the given ones (what one optimizer step looks like), deterministic per seed."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor + scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype)
        for name, tensor in named_tensors.items()
    }
