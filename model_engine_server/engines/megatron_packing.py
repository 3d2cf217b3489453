"""How a packed row (`packing.PackedBatch`) is presented to Megatron's attention.

Two ways, chosen by the layer spec:

* TransformerEngine spec (GPU): THD format, `PackedSeqParams` with `cu_seqlens`; TE's fused
  attention keeps sequences apart and Megatron applies RoPE per sequence from `cu_seqlens`.
* Local spec (CPU, or GPU without TransformerEngine): its attention refuses `PackedSeqParams`,
  so the row gets an explicit block-diagonal causal mask, and RoPE angles are taken per token
  from the position ids reset per sequence. Megatron would otherwise rotate by the position
  in the whole row: equal in exact arithmetic (RoPE sees relative positions only), but in
  fp32 the angle error grows with the absolute position, so a sequence packed late in a long
  row would drift from the same sequence scored alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model_engine_server.packing import PackedBatch


def block_causal_mask(cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device) -> torch.Tensor:
    """`[1, 1, T, T]` bool, True where attention is forbidden (Megatron's convention).

    Token i may attend to token j only when both belong to the same sequence and j <= i.
    """
    boundaries = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = boundaries[1:] - boundaries[:-1]
    if int(boundaries[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens ends at {int(boundaries[-1])}, the row has {num_tokens} tokens")
    sequence_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    same_sequence = sequence_of_token.unsqueeze(0) == sequence_of_token.unsqueeze(1)
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril_()
    return (~(same_sequence & causal)).view(1, 1, num_tokens, num_tokens)


def thd_packed_seq_params(batch: PackedBatch, device: torch.device) -> Any:  # -> PackedSeqParams
    """THD descriptors of a packed row for TransformerEngine attention (no padding between sequences)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = batch.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=batch.max_seqlen,
        max_seqlen_kv=batch.max_seqlen,
    )


class PerSequenceRotary:
    """A forward hook on Megatron's `RotaryEmbedding` that re-indexes its table by position id.

    The module returns angles for positions `0 .. T-1` of the row, `[T, 1, 1, dim]`; with the
    hook, row t gets the angles of `position_ids[t]` (its position within its own sequence),
    computed by Megatron's own frequency code. Set `position_ids` before each forward; `None`
    leaves the table unchanged.
    """

    def __init__(self, rotary_module: torch.nn.Module) -> None:
        self.position_ids: torch.Tensor | None = None
        self._handle = rotary_module.register_forward_hook(self._reindex)

    def _reindex(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self.position_ids is None:
            return output
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise TypeError(f"unexpected rotary embedding output {type(output).__name__}; expected [T, 1, 1, dim]")
        if int(self.position_ids.max()) >= output.shape[0]:
            raise ValueError("a position id exceeds the rotary table built for this row")
        return output.index_select(0, self.position_ids.to(output.device))

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class AttentionInputs:
    """What `GPTModel.forward` needs besides token ids: exactly one of mask / THD params."""

    attention_mask: torch.Tensor | None
    packed_seq_params: Any


def attention_inputs(batch: PackedBatch, use_thd: bool, device: torch.device) -> AttentionInputs:
    if batch.shares_prompts:  # the adapter never shares prompts for this engine
        raise ValueError("the Megatron engine scores whole sequences; this row shares prompts")
    if use_thd:
        return AttentionInputs(attention_mask=None, packed_seq_params=thd_packed_seq_params(batch, device))
    return AttentionInputs(
        attention_mask=block_causal_mask(batch.cu_seqlens, batch.num_tokens, device), packed_seq_params=None
    )
