"""The model shapes the scoring benchmarks run: the toy, and the configurations users train.

The toy (~96M parameters, 151,936-token vocabulary) makes the LM head most of the model, which
flatters a path that skips the LM head on prompt positions. So the benchmarks also run the full
Qwen2.5-0.5B and Qwen2.5-1.5B configurations (written here from their published values, random
weights, saved to a temporary folder: nothing is downloaded), and predict - without running them -
the 7B and 32B shapes from FLOP counts. `key` is the shape's name in JSON (no dots, because
targets address figures by dotted paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_engine_server.tiny_model import TinyModelShape, make_tiny_model

TOY = TinyModelShape(
    arch="qwen2", vocab_size=151_936, hidden_size=512, intermediate_size=1536, num_layers=6,
    num_heads=8, num_kv_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
)


@dataclass(frozen=True)
class QwenShape:
    """A full Qwen2-architecture configuration (no sliding window, rope theta 1e6)."""

    name: str
    key: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1e6
    max_position_embeddings: int = 32_768

    def hf_config(self) -> Any:  # -> transformers.Qwen2Config; cheap, no weights
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=1e-6, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            bos_token_id=0, eos_token_id=1, pad_token_id=None,
        )

    def save(self, folder: Path, seed: int = 0) -> Path:
        """Random-init checkpoint of the full shape in `folder` (several GB for 1.5B in fp32)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.hf_config(), dtype=torch.float32)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        return folder


QWEN25_0_5B = QwenShape("qwen2.5-0.5b", "qwen2_5_0_5b", 896, 24, 14, 2, 4864, 151_936, True)
QWEN25_1_5B = QwenShape("qwen2.5-1.5b", "qwen2_5_1_5b", 1536, 28, 12, 2, 8960, 151_936, True)
QWEN25_7B = QwenShape("qwen2.5-7b", "qwen2_5_7b", 3584, 28, 28, 4, 18944, 152_064, False)
QWEN25_32B = QwenShape("qwen2.5-32b", "qwen2_5_32b", 5120, 64, 40, 8, 27648, 152_064, False)

MEASURED: dict[str, QwenShape | None] = {"toy": None, QWEN25_0_5B.name: QWEN25_0_5B, QWEN25_1_5B.name: QWEN25_1_5B}
PREDICTED = (QWEN25_7B, QWEN25_32B)  # too large for this machine: FLOP-count predictions only


def shape_key(name: str) -> str:
    """The JSON key of a measured shape ("" for the toy, whose figures stay at the top level)."""
    shape = MEASURED[name]
    return "" if shape is None else shape.key


def place(figures: dict[str, Any], name: str, measured: dict[str, Any]) -> None:
    """Put one shape's figures into a run's: the toy's at the top level, a real shape's under its key."""
    key = shape_key(name)
    if key:
        figures[key] = measured
    else:
        figures.update(measured)


def make_model(name: str, folder: Path, toy: TinyModelShape = TOY) -> Path:
    """The checkpoint of shape `name` under `folder`; `toy` lets tests swap in a tinier toy."""
    if name not in MEASURED:
        raise ValueError(f"unknown shape {name!r}; valid: {', '.join(MEASURED)}")
    shape = MEASURED[name]
    if shape is None:
        return make_tiny_model(folder / "toy", toy, seed=0)
    return shape.save(folder / shape.key)
