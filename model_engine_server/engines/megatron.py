"""Megatron-core engine: GPTModel built from a HF checkpoint by mbridge, TP x PP, forward only.

Every rank of one model-parallel group (one replica: TP x PP workers, one per GPU) receives
the same packed batches and runs the same `score_packed`. Pipeline stages pass activations
forward; the last stage computes log-probs and entropy with the core's chunked routine
(`logprobs.py`), vocab-parallel over its TP ranks (only per-token max / sum-exp / target logit
are all-reduced, never logits), and broadcasts the few floats per token back along the
pipeline, so every rank returns the same result. `returns_results` marks the one rank per
group (last stage, TP rank 0) the replica takes results from.

Build kwargs (through `build_engine("megatron", spec, **kwargs)`):
  tensor_model_parallel_size, pipeline_model_parallel_size: the layout. The process group the
      replica formed must be TP x PP x DP workers; data_parallel_size=None (default) takes DP
      from the group size, which TP x PP must then divide.
  transformer_engine: None picks TransformerEngine's layer spec (THD packing) when it is
      installed and the device is CUDA, else Megatron's local spec (block-diagonal mask).
  seed: for Megatron's RNG tracker (weights come from the checkpoint; scoring draws nothing).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Iterable, Iterator

import torch

from checkpoint_transport.checkpoint_files import read_tensors
from model_engine_server.engines.base import (
    EngineSpec,
    HiddenStateEngine,
    ModelInfo,
    WeightSpec,
    forward_settings,
    register_engine,
    resolve_device,
)
from model_engine_server.engines.hf import check_checkpoint_folder
from model_engine_server.engines.megatron_bridge import (
    MegatronConfigError,
    build_gpt_model,
    check_supported,
    load_hf_config,
    make_bridge,
    transformer_engine_installed,
)
from model_engine_server.engines.megatron_cpu import route_current_device_to_cpu, seed_model_parallel
from model_engine_server.engines.megatron_packing import PerSequenceRotary, attention_inputs
from model_engine_server.engines.megatron_parallel import (
    acquire_layout,
    broadcast_from_last_stage,
    broadcast_scores_from_last_stage,
    ensure_process_group,
    receive_from_previous_stage,
    release_layout,
    send_to_next_stage,
)
from model_engine_server.engines.megatron_weights import TIED_ALIASES, HFWeightMap, checkpoint_weights
from model_engine_server.logprobs import ChunkedScores, LMHead
from model_engine_server.packing import PackedBatch

logger = logging.getLogger(__name__)


def import_megatron() -> None:
    """Import megatron-core and mbridge once, without their Apex/TransformerEngine warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mbridge  # noqa: F401
            import megatron.core  # noqa: F401
    except ImportError as error:
        raise MegatronConfigError(
            f"the megatron engine needs megatron-core and mbridge ({error}); install with pip install -e '.[megatron]'"
        ) from error


@contextlib.contextmanager
def _hidden_states_only(model: torch.nn.Module) -> Iterator[None]:
    """Let the last stage return final hidden states instead of `[tokens, vocab]` logits.

    GPTModel returns its decoder output (final norm included) when `post_process` is off;
    the LM head is applied later, in chunks of response tokens only.
    """
    post_process = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = post_process


class MegatronEngine(HiddenStateEngine):
    """One rank's shard of a Megatron-core GPTModel serving forward-only scoring."""

    def __init__(
        self,
        spec: EngineSpec,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        data_parallel_size: int | None = None,
        transformer_engine: bool | None = None,
        seed: int = 1234,
    ) -> None:
        path = check_checkpoint_folder(spec.model_path)
        import_megatron()
        hf_config = load_hf_config(str(path))
        check_supported(hf_config)  # before any collective: a clear error on every rank alike
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = spec.torch_dtype()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device if self.device.index is not None else torch.cuda.current_device())
        else:
            route_current_device_to_cpu()
        use_te = transformer_engine_installed() and self.device.type == "cuda"
        if transformer_engine is not None:
            if transformer_engine and not use_te:
                raise MegatronConfigError("transformer_engine=True needs TransformerEngine installed and a CUDA device")
            use_te = transformer_engine
        self.uses_transformer_engine = use_te
        self._owns_process_group = ensure_process_group(
            self.device, tensor_model_parallel_size, pipeline_model_parallel_size
        )
        try:
            self.layout = acquire_layout(tensor_model_parallel_size, pipeline_model_parallel_size, data_parallel_size)
        except BaseException:
            if self._owns_process_group:
                torch.distributed.destroy_process_group()
            raise
        try:
            seed_model_parallel(seed)
            self.bridge = make_bridge(hf_config, self.dtype, use_te, tensor_model_parallel_size)
            self.model = build_gpt_model(self.bridge, self.device, self.dtype)
            self._rotary = None if use_te else PerSequenceRotary(self.model.rotary_pos_emb)
            self.weights = HFWeightMap(self.bridge, self.model, self.layout, self.dtype)
            self._load_checkpoint(str(path))
            self._head = self._build_lm_head() if self.layout.is_last_stage else None
        except BaseException:
            self.close()
            raise
        self.hf_config = hf_config
        self.info = ModelInfo(
            architecture=(getattr(hf_config, "architectures", None) or [hf_config.model_type])[0],
            vocab_size=int(hf_config.vocab_size),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 1 << 20)),
            hidden_size=int(hf_config.hidden_size),
            num_parameters=sum(math.prod(s.shape) for s in self.weights.specs.values()),
            dtype=spec.dtype,
            device=str(self.device),
            tied_embeddings=self.weights.tied,
            model_parallel_size=self.layout.tp_size * self.layout.pp_size,
            forward_settings=forward_settings(hf_config),
        )

    @property
    def returns_results(self) -> bool:
        """True on the rank whose results the replica reports (last PP stage, TP rank 0)."""
        return self.layout.returns_results

    @property
    def data_parallel_rank(self) -> int:
        """Which data-parallel copy of the model-parallel group this rank belongs to."""
        return self.layout.dp_rank

    def _load_checkpoint(self, path: str) -> None:
        stored = checkpoint_weights(path)
        aliases = set(TIED_ALIASES) if self.weights.tied else set()
        unmapped = sorted(set(stored) - set(self.weights.specs) - aliases)
        if unmapped:
            raise MegatronConfigError(
                f"the checkpoint has weights mbridge does not map to the Megatron model, e.g. {unmapped[:5]}; "
                "scoring without them would be wrong. Use the 'hf' engine backend for this model"
            )
        provided = {TIED_ALIASES.get(name, name) if self.weights.tied else name for name in stored}
        missing = sorted(set(self.weights.specs) - provided)
        if missing:
            raise MegatronConfigError(f"the checkpoint lacks weights the model needs, e.g. {missing[:5]}")
        wanted = [
            name for name in stored if (TIED_ALIASES.get(name, name) if self.weights.tied else name) in self.weights.local_hf_names
        ]
        self.weights.load(read_tensors(stored, wanted), allow_cast=True)
        self.weights.discard_partial_weights()  # the checkpoint was no sync: the first one starts afresh

    def _build_lm_head(self) -> LMHead:
        """This TP rank's vocab rows, without padding rows (they would enter the softmax)."""
        if self.weights.tied:
            weight = self.model.shared_embedding_or_output_weight()
        else:
            weight = self.model.output_layer.weight
        rows = int(weight.shape[0])
        vocab_start = self.layout.tp_rank * rows
        valid_rows = min(rows, int(self.bridge.hf_config.vocab_size) - vocab_start)
        if valid_rows <= 0:
            raise MegatronConfigError(f"TP rank {self.layout.tp_rank} holds only vocabulary padding; use a smaller TP")
        return LMHead(
            weight=weight[:valid_rows],
            vocab_start=vocab_start,
            group=self.layout.tp_group if self.layout.tp_size > 1 else None,
        )

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Run this stage; `[T, H]` final hidden states on the last stage (pass-through elsewhere)."""
        num_tokens = batch.num_tokens
        inputs = attention_inputs(batch, self.uses_transformer_engine, self.device)
        if self._rotary is not None:
            self._rotary.position_ids = batch.position_ids[0].to(self.device)
        if not self.layout.is_first_stage:
            shape = (num_tokens, 1, int(self.bridge.hf_config.hidden_size))
            self.model.set_input_tensor(receive_from_previous_stage(self.layout, shape, self.dtype, self.device))
        try:
            with _hidden_states_only(self.model):
                output = self.model(
                    input_ids=batch.input_ids.to(self.device),
                    position_ids=batch.position_ids.to(self.device),
                    attention_mask=inputs.attention_mask,
                    packed_seq_params=inputs.packed_seq_params,
                )
        finally:
            self.model.set_input_tensor(None)
        if not self.layout.is_last_stage:
            send_to_next_stage(self.layout, output)
        return output[:, 0, :]

    def lm_head(self) -> LMHead:
        if self._head is None:
            raise RuntimeError("only the last pipeline stage holds the LM head")
        return self._head

    @torch.inference_mode()
    def score_packed(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layout.pp_size == 1:
            return super().score_packed(batch, temperatures, want_entropy, chunk_tokens)
        if self.layout.is_last_stage:
            log_probs, entropy = super().score_packed(batch, temperatures, want_entropy, chunk_tokens)
        else:
            self.hidden_states(batch)
            num_scored = int(batch.targets.shape[0])
            log_probs = torch.empty(num_scored, dtype=torch.float32, device=self.device)
            entropy = torch.empty_like(log_probs) if want_entropy else None
        results = torch.stack([log_probs, entropy]) if entropy is not None else log_probs.unsqueeze(0)
        results = broadcast_from_last_stage(self.layout, results.contiguous())
        return results[0], (results[1] if want_entropy else None)

    @torch.inference_mode()
    def score_packed_top_k(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None, top_k: int
    ) -> ChunkedScores:
        """Under pipeline parallelism only the last stage holds the head: it computes the top-k
        (vocab-parallel over its TP group) and every stage receives the same results."""
        if self.layout.pp_size == 1:
            return super().score_packed_top_k(batch, temperatures, want_entropy, chunk_tokens, top_k)
        scores = None
        if self.layout.is_last_stage:
            scores = super().score_packed_top_k(batch, temperatures, want_entropy, chunk_tokens, top_k)
        else:
            self.hidden_states(batch)
        k = min(top_k, int(self.bridge.hf_config.vocab_size))
        return broadcast_scores_from_last_stage(
            self.layout, scores, int(batch.targets.shape[0]), k, want_entropy, self.device
        )

    def weight_specs(self) -> dict[str, WeightSpec]:
        """Every HF tensor of the whole model (all stages), full unsharded shapes."""
        return dict(self.weights.specs)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """HF-named tensors, possibly a partial bucket; see `HFWeightMap.load`."""
        return self.weights.load(named_tensors, allow_cast=self.spec.allow_dtype_cast)

    def discard_partial_weights(self) -> None:
        self.weights.discard_partial_weights()

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model as HF tensors on every rank; all ranks of the group must iterate it."""
        return self.weights.export()

    def close(self) -> None:
        """Release Megatron's parallel state (and the one-process group if this engine made it)."""
        rotary = getattr(self, "_rotary", None)
        if rotary is not None:
            rotary.remove()
        if getattr(self, "layout", None) is None:
            return
        self.layout = None  # type: ignore[assignment]
        released = release_layout()
        if released and self._owns_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@register_engine("megatron")
def build_megatron_engine(
    spec: EngineSpec,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    data_parallel_size: int | None = None,
    transformer_engine: bool | None = None,
    seed: int = 1234,
    **unused: Any,
) -> MegatronEngine:
    if unused:
        logger.warning("megatron engine ignores build arguments %s", sorted(unused))
    return MegatronEngine(
        spec,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=data_parallel_size,
        transformer_engine=transformer_engine,
        seed=seed,
    )
