"""The seam between the adapter and a model implementation, and the backend registry.

An engine runs forward only over a packed row and exposes its LM head, so log-probs are
computed by one shared chunked routine (`logprobs.py`) whatever the backend. Backends whose
outputs live elsewhere (the last pipeline stage) override `score_packed`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from checkpoint_transport.dtypes import DTYPES
from model_engine_server.config.verl_engine import VerlEngineConfig
from model_engine_server.cpu_heap import CpuHeap
from model_engine_server.logprobs import ChunkedScores, LMHead, chunked_log_probs, chunked_scores
from model_engine_server.packing import PackedBatch
from model_engine_server.registry import Registry


class EngineSpec(BaseModel):
    """How to build an engine: which checkpoint, which precision, where."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(default=None, description="local HF checkpoint folder")
    dtype: str = Field(default="float32", pattern="^(float32|bfloat16|float16)$")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu or cuda")
    attn_implementation: str | None = Field(default=None, description="None picks flash-attn/sdpa")
    share_prompts: bool = Field(
        default=True,
        description="pack identical prompts in a batch once (GRPO groups) where the engine's attention can",
    )
    logprob_chunk_mb: int = Field(
        default=128, gt=0, description="memory for the log-prob step's two fp32 tile buffers (tokens x vocabulary columns)"
    )
    allow_dtype_cast: bool = Field(default=False, description="cast weight updates of another float dtype")
    cpu_heap: CpuHeap = Field(
        default="auto",
        description="keep freed CPU memory for reuse (model_engine_server/cpu_heap.py); auto: only in a process the server owns",
    )
    verl_engine: VerlEngineConfig = Field(
        default_factory=VerlEngineConfig, description="backend verl only: the trainer's model and engine settings"
    )

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model the scheduler and clients need."""

    architecture: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_parameters: int
    dtype: str
    device: str
    tied_embeddings: bool
    model_parallel_size: int = 1  # ranks that run one forward together (TP x PP)
    shares_prompts: bool = False  # identical prompts in a batch are run once (`packing`, share_prompts)
    forward_settings: tuple[tuple[str, str], ...] = ()  # `forward_settings(config)`: what a new checkpoint must match


# HF config fields that change what the forward computes while every tensor keeps its name and
# shape (a checkpoint differing in one of them would load and score silently wrong)
FORWARD_SETTING_KEYS = (
    "tie_word_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "attention_bias", "logits_scaling", "final_logit_softcapping",
)


def forward_settings(config: Any) -> tuple[tuple[str, str], ...]:
    """`FORWARD_SETTING_KEYS` of an HF config, each as JSON (comparable, and picklable across Ray)."""
    import json

    return tuple((key, json.dumps(getattr(config, key, None), sort_keys=True, default=str)) for key in FORWARD_SETTING_KEYS)


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@runtime_checkable
class Engine(Protocol):
    """A forward-only model over packed rows; loads new weights by HuggingFace name."""

    info: ModelInfo

    @property
    def returns_results(self) -> bool:
        """Whether this rank's outputs are its batch's results (one rank per model-parallel group)."""
        ...

    @property
    def data_parallel_rank(self) -> int | None:
        """Which share of a batch this rank scores; None: the replica's default rank order."""
        ...

    def score_packed(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def weight_specs(self) -> dict[str, WeightSpec]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors in by HF name; returns the names now in place (a part of a fused
        parameter counts only once its whole parameter is written)."""
        ...

    def discard_partial_weights(self) -> None:
        """Forget parts of fused parameters still waiting for the rest (an aborted sync's)."""
        ...

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class HiddenStateEngine:
    """Shared scoring for engines that produce final hidden states on this rank."""

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:  # [T, H]
        raise NotImplementedError

    def lm_head(self) -> LMHead:
        raise NotImplementedError

    @torch.inference_mode()
    def score_packed(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.hidden_states(batch)
        response_hidden = hidden.index_select(0, batch.score_positions.to(hidden.device))
        del hidden
        return chunked_log_probs(
            response_hidden, self.lm_head(), batch.targets, temperatures, want_entropy, chunk_tokens
        )


    def top_k_unsupported(self) -> str | None:
        """Why this engine cannot return top-k log-probs now, or None when it can. Engines
        whose scores are not on this rank's hidden states (pipeline stages) override it."""
        return None

    @torch.inference_mode()
    def score_packed_top_k(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None, top_k: int
    ) -> ChunkedScores:
        """`score_packed` plus each scored position's `top_k` most likely tokens, from the same
        chunked pass (vocab-parallel heads merge their shards' top-k over the group)."""
        hidden = self.hidden_states(batch)
        response_hidden = hidden.index_select(0, batch.score_positions.to(hidden.device))
        del hidden
        return chunked_scores(
            response_hidden, self.lm_head(), batch.targets, temperatures, want_entropy, top_k, chunk_tokens
        )


@runtime_checkable
class TopKEngine(Protocol):
    """An engine that can also return top-k log-probs (`HiddenStateEngine`s can); the adapter
    refuses `top_k` with an `InvalidRequest` on any other (the verl backend, whose model code
    returns log-probs and entropy only)."""

    def top_k_unsupported(self) -> str | None: ...

    def score_packed_top_k(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None, top_k: int
    ) -> ChunkedScores: ...


EngineFactory = Callable[..., Engine]


def _load_builtin_backends() -> None:
    import model_engine_server.engines.hf  # noqa: F401  (registers "hf")

    try:
        import model_engine_server.engines.megatron  # noqa: F401  (registers "megatron" when present)
    except ImportError:
        pass
    if importlib.util.find_spec("verl") is not None:  # with verl installed, a broken import must show
        import model_engine_server.engines.verl_backend.engine  # noqa: F401  (registers "verl")


ENGINES: Registry[EngineFactory] = Registry("engine backend", _load_builtin_backends)
register_engine = ENGINES.register
engine_backends = ENGINES.names


def build_engine(backend: str, spec: EngineSpec, **kwargs: Any) -> Engine:
    """Build an engine by backend name; an unknown name lists the valid ones."""
    return ENGINES.get(backend)(spec, **kwargs)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)
