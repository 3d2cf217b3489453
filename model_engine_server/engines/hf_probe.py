"""A start-up check that the HF engine's packed path computes what the model itself computes.

The engine reads hidden states off `base_model` for sequences packed into one row and applies
`get_output_embeddings()` itself. Both steps assume things a model class may not honour: an
attention implementation may ignore the row's boundaries (some families build their causal mask
without `position_ids`, so transformers' packed-sequence detection never runs under `sdpa` or
`eager`), and a causal LM may do more between its base model and its logits than the output
embedding (a dense + norm prediction head). Either would give log-probs that are simply wrong,
answered as if exact. So before serving, two short sequences are scored packed in one row, the
engine's way, and compared with the model's own forward of each sequence alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model_engine_server.packing import pack_sequences

if TYPE_CHECKING:
    from model_engine_server.engines.hf import HFEngine

PROBE_LENGTHS = (7, 11)
# mean |packed - alone| over the probe's log-probs: kernel rounding stays far below these (bf16
# logits near 20 are 0.125 apart, so a half-precision token may flip by that much), while a
# sequence reading its neighbour or a skipped head moves them by about 0.5-3 (measured on tiny
# random models: 0.47-0.58 and 1.27 on average)
MISMATCH_MEAN = {torch.float32: 1e-3, torch.float64: 1e-6}
MISMATCH_MEAN_HALF = 0.2


def _probe_sequences(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(20261207)
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in PROBE_LENGTHS]


@torch.inference_mode()
def _packed_log_probs(engine: "HFEngine", sequences: list[list[int]]) -> torch.Tensor:
    batch = pack_sequences(sequences, [1] * len(sequences))
    hidden = engine.hidden_states(batch).index_select(0, batch.score_positions.to(engine.device))
    head = engine.lm_head()
    logits = hidden @ head.weight.T + (head.bias if head.bias is not None else 0)
    return logits.float().log_softmax(-1).gather(-1, batch.targets.to(engine.device)[:, None])[:, 0].cpu()


@torch.inference_mode()
def _alone_log_probs(engine: "HFEngine", sequences: list[list[int]]) -> torch.Tensor:
    values = []
    for ids in sequences:
        row = torch.tensor([ids], device=engine.device)
        logits = engine.model(input_ids=row, use_cache=False).logits[0, :-1]
        values.append(logits.float().log_softmax(-1).gather(-1, row[0, 1:, None])[:, 0].cpu())
    return torch.cat(values)


def packed_path_mismatch(engine: "HFEngine") -> str | None:
    """Why the engine's packed path cannot be trusted for this model, or None when it agrees."""
    sequences = _probe_sequences(engine.info.vocab_size)
    packed, alone = _packed_log_probs(engine, sequences), _alone_log_probs(engine, sequences)
    gap = float((packed - alone).abs().mean())
    dtype = next(engine.model.parameters()).dtype
    if gap <= MISMATCH_MEAN.get(dtype, MISMATCH_MEAN_HALF):
        return None
    attention = engine.model.config._attn_implementation
    return (f"{engine.info.architecture} with attention {attention!r}: log-probs of sequences packed in one row differ "
            f"from the model's own forward of each alone by {gap:.3g} on average, so this engine would score it wrong "
            "(the attention does not keep packed sequences apart, or the model's head does more than its output "
            "embedding); try another attn_implementation (packed_sdpa, flash_attention_2)")
