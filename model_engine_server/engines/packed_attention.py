"""Varlen causal attention for packed rows without a `[T, T]` mask: one SDPA call per sequence.

transformers' SDPA path turns reset `position_ids` into a block-diagonal `[T, T]` mask and
attends over the whole row, so a row of 8,192 tokens costs 8,192^2 scores per head however
short its sequences are. Here each sequence attends only to itself (sum of L_k^2), the way
varlen flash attention does on GPU. The sequence boundaries come from the `cu_seq_lens_q`
keyword the engine passes through the model's forward (transformers forwards such keywords
to the attention function), and because this implementation has no mask function registered,
transformers builds no mask at all.

A row packed with shared prompts (`packing.pack_sequences(share_prompts=True)`) also carries
`segment_prefixes`: a response segment attends to its prompt segment's keys and then causally
to its own. Two ways, whichever costs less (measured on CPU with Qwen2.5's head shapes): a
response no longer than its prompt takes its own query rows against prompt + response keys
under a bottom-right causal mask (no work on the prompt's rows); a longer one takes one causal
SDPA over prompt + response and keeps its rows, because the fused causal kernel beats the
masked one by more than the prompt rows it recomputes.

A layer with a sliding window (a keyword, else the module's attribute) keeps transformers' rule,
a key is seen while `key > query - window`, as an explicit mask once a span outgrows the window.

Some decoder layers (StableLM's) call their attention without passing the forward's keywords
on, so neither keyword arrives and the row would read as one sequence. The engine therefore
also puts the row's layout in `ROW_LAYOUT` for the length of its forward (`row_layout`), and a
call whose keywords lack it takes it from there.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"
UNAPPLIED_KEYWORDS = ("softcap", "s_aux")  # Gemma2's score soft-capping, gpt-oss's attention sinks

# (cu_seq_lens, segment_prefixes or None) of the row being run; see the module docstring
ROW_LAYOUT: ContextVar[tuple[torch.Tensor, list[int] | None] | None] = ContextVar("packed_row_layout", default=None)


@contextlib.contextmanager
def row_layout(boundaries: torch.Tensor, segment_prefixes: list[int] | None) -> Iterator[None]:
    """The row's layout, for attention calls that do not get the forward's keywords."""
    token = ROW_LAYOUT.set((boundaries, segment_prefixes))
    try:
        yield
    finally:
        ROW_LAYOUT.reset(token)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, head_dim]
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"{NAME} takes one packed row without a mask (got batch {query.shape[0]})")
    unapplied = [name for name in UNAPPLIED_KEYWORDS if kwargs.get(name) is not None]
    if unapplied:
        raise ValueError(f"{NAME} does not apply {', '.join(unapplied)}: choose another attn_implementation")
    # Mistral, Phi-3 and Starcoder2 pass their window as a keyword; Qwen2 and Gemma set it per layer.
    # A keyword given wins even when None: EXAONE-4 sets the attribute on every layer and passes
    # None on its full-attention layers.
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    boundaries, segment_prefixes = kwargs.get("cu_seq_lens_q"), kwargs.get("segment_prefixes")
    layout = ROW_LAYOUT.get()
    if boundaries is None and layout is not None:  # a layer that did not pass the keywords on
        boundaries, segment_prefixes = layout
    total = query.shape[2]
    edges = [0, total] if boundaries is None else [int(x) for x in boundaries.tolist()]
    if edges[-1] != total:
        raise ValueError(f"cu_seq_lens_q ends at {edges[-1]} but the row has {total} tokens")
    prefixes = segment_prefixes or [-1] * (len(edges) - 1)
    if len(prefixes) != len(edges) - 1:
        raise ValueError(f"segment_prefixes has {len(prefixes)} entries for {len(edges) - 1} segments")
    grouped = query.shape[1] != key.shape[1]

    def causal(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The queries are the last positions of the keys' span; each sees the keys up to its own
        position, and within the sliding window when the layer has one."""
        rows, span = queries.shape[2], keys.shape[2]
        if rows == span and (not window or span <= window):  # the fused causal kernel is exact
            return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scaling, enable_gqa=grouped)
        query_at = torch.arange(span - rows, span, device=query.device).unsqueeze(1)
        key_at = torch.arange(span, device=query.device).unsqueeze(0)
        visible = key_at <= query_at
        if window:
            visible &= key_at > query_at - window  # transformers' sliding-window rule
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, scale=scaling, enable_gqa=grouped)

    def attend(start: int, stop: int, prefix: int) -> torch.Tensor:
        if prefix < 0:
            return causal(query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop])
        if prefixes[prefix] >= 0:
            raise ValueError(f"segment {prefix} is a continuation itself; prefixes are one level deep")
        head = slice(edges[prefix], edges[prefix + 1])
        prompt_len = edges[prefix + 1] - edges[prefix]
        keys = torch.cat([key[:, :, head], key[:, :, start:stop]], dim=2)
        values = torch.cat([value[:, :, head], value[:, :, start:stop]], dim=2)
        if stop - start <= prompt_len:
            return causal(query[:, :, start:stop], keys, values)
        rows = causal(torch.cat([query[:, :, head], query[:, :, start:stop]], dim=2), keys, values)
        return rows[:, :, prompt_len:].clone()  # a copy, so the prompt's rows are freed now

    outputs = [attend(start, stop, prefix) for start, stop, prefix in zip(edges[:-1], edges[1:], prefixes)]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="packed_sdpa"` known to transformers; idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    return NAME
