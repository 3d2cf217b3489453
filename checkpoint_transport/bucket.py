"""Flat buckets of named tensors: the unit every transport backend moves.

A bucket is one contiguous uint8 buffer holding several tensors back to back (each at an
offset aligned to `ALIGN` bytes, so a slice can be viewed as its dtype without a copy) plus a
`BucketHeader`: the version, the bucket's index in the stream, each tensor's HF name, dtype,
shape, offset and size, and a checksum of the whole buffer. The stream ends with a header
whose `end` flag is set; it carries the totals so a receiver can tell a truncated stream from
a complete one, or the reason the sender gave up (`abort_reason`).

Pure torch + msgpack: no process group, no Ray.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import msgpack
import torch

from checkpoint_transport.dtypes import DTYPES, dtype_name

ALIGN = 64  # bytes; a multiple of every dtype's size, and of the checksum's 8-byte words
_CHECKSUM_BLOCK_WORDS = 1 << 13  # 64 KiB blocks
_CHECKSUM_SLICE_BLOCKS = 64  # 4 MiB of words at a time through the weighted pass on CUDA
CHECKSUM_KIND = "sum64x3"

class BucketFormatError(ValueError):
    """A header or buffer that does not describe a well-formed bucket (corrupt or hostile)."""


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class BucketHeader:
    """Everything a receiver needs to unpack and verify one bucket (or to end the stream)."""

    version: int
    index: int
    entries: list[TensorEntry] = field(default_factory=list)
    nbytes: int = 0
    checksum: str = ""
    checksum_kind: str = CHECKSUM_KIND
    end: bool = False
    abort_reason: str | None = None
    total_buckets: int = 0
    total_tensors: int = 0

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "version": self.version,
                "index": self.index,
                "entries": [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries],
                "nbytes": self.nbytes,
                "checksum": self.checksum,
                "checksum_kind": self.checksum_kind,
                "end": self.end,
                "abort_reason": self.abort_reason,
                "total_buckets": self.total_buckets,
                "total_tensors": self.total_tensors,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "BucketHeader":
        try:
            raw = msgpack.unpackb(data)
            entries = [TensorEntry(str(n), str(d), tuple(int(s) for s in shape), int(o), int(b)) for n, d, shape, o, b in raw["entries"]]
            return cls(
                version=int(raw["version"]),
                index=int(raw["index"]),
                entries=entries,
                nbytes=int(raw["nbytes"]),
                checksum=str(raw["checksum"]),
                checksum_kind=str(raw["checksum_kind"]),
                end=bool(raw["end"]),
                abort_reason=raw["abort_reason"],
                total_buckets=int(raw["total_buckets"]),
                total_tensors=int(raw["total_tensors"]),
            )
        except Exception as error:  # msgpack, key and type errors all mean the same thing here
            raise BucketFormatError(f"unreadable bucket header: {type(error).__name__}: {error}") from error

    def validate(self) -> None:
        """Reject a header whose entries do not fit its buffer, before touching any memory."""
        if self.checksum_kind != CHECKSUM_KIND:
            raise BucketFormatError(f"bucket {self.index}: unknown checksum kind {self.checksum_kind!r}")
        if self.nbytes < 0 or self.nbytes % ALIGN:
            raise BucketFormatError(f"bucket {self.index}: size {self.nbytes} is not a multiple of {ALIGN}")
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise BucketFormatError(f"bucket {self.index}: tensor {entry.name!r} appears twice")
            seen.add(entry.name)
            if entry.dtype not in DTYPES:
                raise BucketFormatError(f"bucket {self.index}: tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
            numel = 1
            for size in entry.shape:
                if size < 0:
                    raise BucketFormatError(f"bucket {self.index}: tensor {entry.name!r} has shape {entry.shape}")
                numel *= size
            if entry.nbytes != numel * DTYPES[entry.dtype].itemsize:
                raise BucketFormatError(
                    f"bucket {self.index}: tensor {entry.name!r} declares {entry.nbytes} bytes for shape {entry.shape}"
                )
            if entry.offset % ALIGN or entry.offset < 0 or entry.offset + entry.nbytes > self.nbytes:
                raise BucketFormatError(f"bucket {self.index}: tensor {entry.name!r} lies outside the bucket")


def buffer_checksum(flat: torch.Tensor) -> str:
    """A fast checksum on the buffer's own device (no copy to host for NCCL buckets).

    Three 64-bit sums over the 8-byte words: a plain sum (catches any changed word), a sum of
    per-block sums weighted by block position (catches moved blocks) and a sum of words weighted
    by their position within their block (catches swapped words, and changes that cancel in the
    plain sum). Integer overflow wraps, as it does on every CPU and GPU torch supports. The
    weighted sum is an int64 matrix-vector product on a CPU (no temporary; about two plain sums'
    time); CUDA has no int64 matmul, so there it multiplies a slice of blocks at a time. Detects
    corruption, not tampering.
    """
    words = flat.view(torch.int64)
    full = words.numel() // _CHECKSUM_BLOCK_WORDS * _CHECKSUM_BLOCK_WORDS
    blocks = words[:full].view(-1, _CHECKSUM_BLOCK_WORDS)
    tail = words[full:]
    block_sums = torch.cat([blocks.sum(1), tail.sum().reshape(1)])
    block_weights = torch.arange(1, block_sums.numel() + 1, device=flat.device, dtype=torch.int64)
    word_weights = torch.arange(1, _CHECKSUM_BLOCK_WORDS + 1, device=flat.device, dtype=torch.int64)
    inner = (tail * word_weights[: tail.numel()]).sum() + _weighted_block_sum(blocks, word_weights)
    sums = (block_sums.sum(), (block_sums * block_weights).sum(), inner)
    return "".join(f"{int(value) & (2**64 - 1):016x}" for value in sums)


def _weighted_block_sum(blocks: torch.Tensor, word_weights: torch.Tensor) -> torch.Tensor:
    if blocks.device.type == "cpu":
        return (blocks @ word_weights).sum()
    return _weighted_block_sum_sliced(blocks, word_weights)


def _weighted_block_sum_sliced(blocks: torch.Tensor, word_weights: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.int64, device=blocks.device)
    for start in range(0, blocks.shape[0], _CHECKSUM_SLICE_BLOCKS):
        total += (blocks[start : start + _CHECKSUM_SLICE_BLOCKS] * word_weights).sum()
    return total


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """A DTensor's module is loaded wherever one exists; importing it here would cost every
    process that moves weights (each Ray worker) most of a second."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def group_into_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `bucket_bytes` (aligned); a larger tensor travels alone.

    Lazy: it pulls from the trainer's export stream only as far as the next bucket needs, so
    the trainer holds at most a bucket of gathered tensors at a time.
    """
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected (str, torch.Tensor) pairs, got ({type(name).__name__}, {type(tensor).__name__})")
        if _is_dtensor(tensor):
            raise TypeError(f"{name!r} is a DTensor (one shard of an FSDP2/TP parameter): export whole tensors, "
                            "`tensor.full_tensor()` called on every rank in step, and publish from one rank")
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if group and size + nbytes > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, tensor))
        size += nbytes
    if group:
        yield group


def group_into_host_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`group_into_buckets` over detached, contiguous CPU copies: groups to hand to Ray's
    object store as they are (one `ray.put` per group, no flat buffer)."""
    return group_into_buckets(((name, _on_host(tensor)) for name, tensor in named_tensors), bucket_bytes)


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        return tensor  # group_into_buckets names what it got instead
    return tensor.detach().cpu().contiguous()


def packed_size(group: list[tuple[str, torch.Tensor]]) -> int:
    return sum(_aligned(t.numel() * t.element_size()) for _, t in group)


def pack_bucket(
    group: list[tuple[str, torch.Tensor]],
    version: int,
    index: int,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BucketHeader]:
    """Copy a group into one aligned flat buffer on `device` (the front of `out`, a reused
    uint8 buffer, when it is large enough); returns the buffer and its header."""
    entries, offset = [], 0
    for name, tensor in group:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset = _aligned(offset + nbytes)
    if out is not None and out.numel() >= offset:
        flat = out[:offset]
    else:
        flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for entry, (_, tensor) in zip(entries, group):
        if entry.nbytes:
            flat[entry.offset : entry.offset + entry.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
        padding_end = _aligned(entry.offset + entry.nbytes)
        flat[entry.offset + entry.nbytes : padding_end].zero_()  # padding is part of the checksum
    header = BucketHeader(version=version, index=index, entries=entries, nbytes=offset, checksum=buffer_checksum(flat))
    return flat, header


def unpack_bucket(flat: torch.Tensor, header: BucketHeader) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy), one per entry; the caller copies them into the model."""
    header.validate()
    if flat.numel() != header.nbytes:
        raise BucketFormatError(f"bucket {header.index}: buffer holds {flat.numel()} bytes, header says {header.nbytes}")
    tensors = []
    for entry in header.entries:
        dtype = DTYPES[entry.dtype]
        if entry.nbytes:
            view = flat[entry.offset : entry.offset + entry.nbytes].view(dtype).view(entry.shape)
        else:
            view = torch.empty(entry.shape, dtype=dtype, device=flat.device)
        tensors.append((entry.name, view))
    return tensors
