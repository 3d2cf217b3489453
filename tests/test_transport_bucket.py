"""The bucket format alone: packing, grouping, checksums, header validation (pure, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_transport.bucket import (
    ALIGN,
    BucketFormatError,
    BucketHeader,
    TensorEntry,
    buffer_checksum,
    group_into_buckets,
    group_into_host_buckets,
    pack_bucket,
    unpack_bucket,
)
from checkpoint_transport.channel import get_backend, transport_backends


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(37, 16, generator=generator)),
        ("model.norm.weight", torch.randn(16, generator=generator).to(torch.bfloat16)),
        ("half", torch.randn(3, 5, generator=generator).to(torch.float16)),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.empty(0, 4)),
        ("mask", torch.tensor([True, False, True])),
        ("ids", torch.arange(7, dtype=torch.int64)),
        ("transposed", torch.randn(4, 6, generator=generator).t()),  # not contiguous
    ]


def test_unpacked_tensors_equal_packed_ones_bit_for_bit():
    tensors = mixed_tensors()
    flat, header = pack_bucket(tensors, version=3, index=0)
    assert flat.numel() == header.nbytes and header.nbytes % ALIGN == 0
    unpacked = unpack_bucket(flat, BucketHeader.from_bytes(header.to_bytes()))
    assert [name for name, _ in unpacked] == [name for name, _ in tensors]
    for (_, original), (_, copy) in zip(tensors, unpacked):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original)


def test_every_tensor_starts_at_an_aligned_offset():
    _, header = pack_bucket(mixed_tensors(), version=1, index=0)
    assert all(entry.offset % ALIGN == 0 for entry in header.entries)


def test_groups_respect_the_bucket_size_and_keep_order():
    tensors = [(f"t{i}", torch.zeros(100 + i)) for i in range(30)]  # ~400-520 bytes each
    groups = list(group_into_buckets(tensors, bucket_bytes=2048))
    assert [name for group in groups for name, _ in group] == [name for name, _ in tensors]
    for group in groups:
        _, header = pack_bucket(group, 0, 0)
        assert header.nbytes <= 2048
    assert len(groups) > 1


def test_a_tensor_larger_than_a_bucket_travels_alone():
    tensors = [("small", torch.zeros(4)), ("big", torch.zeros(10_000)), ("after", torch.zeros(4))]
    groups = list(group_into_buckets(tensors, bucket_bytes=1024))
    assert [[name for name, _ in group] for group in groups] == [["small"], ["big"], ["after"]]


def test_grouping_pulls_the_export_stream_only_as_far_as_the_next_bucket():
    pulled = []

    def stream():
        for i in range(10):
            pulled.append(i)
            yield f"t{i}", torch.zeros(64)  # 256 bytes each

    first = next(iter(group_into_buckets(stream(), bucket_bytes=512)))
    assert len(first) == 2 and len(pulled) == 3  # the third tensor told it the bucket was full


def test_grouping_rejects_items_that_are_not_name_tensor_pairs():
    with pytest.raises(TypeError, match="expected"):
        list(group_into_buckets([("w", [1.0, 2.0])], bucket_bytes=1024))
    with pytest.raises(TypeError, match="expected"):
        list(group_into_host_buckets([("w", [1.0, 2.0])], bucket_bytes=1024))


def test_host_buckets_group_the_same_way_and_hold_detached_contiguous_copies():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    named = [("t", weight.T), ("w", weight), *((f"z{i}", torch.zeros(64)) for i in range(4))]  # 256 bytes each
    groups = list(group_into_host_buckets(named, bucket_bytes=600))
    assert [[n for n, _ in g] for g in groups] == [[n for n, _ in g] for g in group_into_buckets(named, 600)]
    for name, tensor in (pair for group in groups for pair in group):
        assert tensor.is_contiguous() and not tensor.requires_grad and tensor.device.type == "cpu"
    assert torch.equal(groups[0][0][1], weight.T)


@settings(max_examples=40, deadline=None)
@given(position=st.integers(min_value=0, max_value=4095), bit=st.integers(min_value=0, max_value=7))
def test_checksum_changes_when_any_single_bit_flips(position, bit):
    flat = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    original = buffer_checksum(flat)
    flat[position] ^= 1 << bit
    assert buffer_checksum(flat) != original


def test_checksum_changes_when_blocks_swap_places():
    flat = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    swapped = torch.cat([flat[1 << 19 :], flat[: 1 << 19]])
    assert torch.equal(flat.sort().values, swapped.sort().values)
    assert buffer_checksum(flat) != buffer_checksum(swapped)


@settings(max_examples=40, deadline=None)
@given(first=st.integers(min_value=0, max_value=(1 << 15) - 1), gap=st.integers(min_value=1, max_value=1 << 13),
       delta=st.integers(min_value=1, max_value=1 << 40))
def test_checksum_changes_when_words_swap_or_changes_cancel_out(first, gap, delta):
    """Two sums missed both within a 64 KiB block: swapped words, and +d on one word with -d
    on another (the plain sum and every block sum stay as they were). The sums wrap modulo 2**64,
    so a change d on two words k apart with d * k a multiple of 2**64 would still cancel."""
    words = torch.randint(-(1 << 62), 1 << 62, (1 << 15,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    second = (first + gap) % words.numel()
    original = buffer_checksum(words.view(torch.uint8))
    swapped = words.clone()
    swapped[[first, second]] = words[[second, first]]
    if words[first] != words[second]:
        assert buffer_checksum(swapped.view(torch.uint8)) != original
    offset = words.clone()
    offset[first] += delta
    offset[second] -= delta
    assert buffer_checksum(offset.view(torch.uint8)) != original


def test_the_checksums_cuda_way_of_weighting_equals_its_cpu_way():
    """CUDA has no int64 matmul: there the weighted sum runs a slice of blocks at a time. Both
    ways wrap the same, so a bucket packed on a GPU verifies on a CPU receiver and back."""
    from checkpoint_transport.bucket import _CHECKSUM_BLOCK_WORDS, _weighted_block_sum, _weighted_block_sum_sliced

    blocks = torch.randint(-(1 << 62), 1 << 62, (150, _CHECKSUM_BLOCK_WORDS), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(4))
    weights = torch.arange(1, _CHECKSUM_BLOCK_WORDS + 1, dtype=torch.int64)
    assert int(_weighted_block_sum(blocks, weights)) == int(_weighted_block_sum_sliced(blocks, weights))


def test_header_with_an_entry_outside_its_bucket_is_rejected():
    flat, header = pack_bucket([("w", torch.zeros(16))], 0, 0)
    header.entries = [TensorEntry("w", "float32", (16,), offset=ALIGN, nbytes=64)]
    with pytest.raises(BucketFormatError, match="outside"):
        unpack_bucket(flat, header)


def test_header_whose_size_disagrees_with_the_shape_is_rejected():
    flat, header = pack_bucket([("w", torch.zeros(16))], 0, 0)
    header.entries = [TensorEntry("w", "float32", (17,), offset=0, nbytes=64)]
    with pytest.raises(BucketFormatError, match="declares"):
        unpack_bucket(flat, header)


def test_header_naming_a_tensor_twice_is_rejected():
    _, header = pack_bucket([("a", torch.zeros(4)), ("b", torch.zeros(4))], 0, 0)
    header.entries[1] = TensorEntry("a", *[getattr(header.entries[1], f) for f in ("dtype", "shape", "offset", "nbytes")])
    with pytest.raises(BucketFormatError, match="twice"):
        header.validate()


def test_unreadable_header_bytes_raise_a_format_error():
    with pytest.raises(BucketFormatError, match="unreadable"):
        BucketHeader.from_bytes(b"\x00not msgpack")


def test_unknown_backend_names_the_valid_ones():
    assert {"gloo", "nccl", "ray"} <= set(transport_backends())
    with pytest.raises(ValueError, match="valid backends: gloo, nccl, ray"):
        get_backend("carrier-pigeon")


def test_buffer_pool_reuses_a_returned_buffer_and_keeps_only_a_few():
    from checkpoint_transport.buffers import HostBufferPool

    pool = HostBufferPool(max_idle=2)
    first = pool.take(1000)
    pool.give(first)
    assert pool.take(800) is first  # big enough: reused, not reallocated
    buffers = [pool.take(100 * (i + 1)) for i in range(4)]
    for buffer in buffers:
        pool.give(buffer)
    assert pool.take(350) is buffers[3]  # the largest two were kept
    assert pool.take(100) is buffers[2]
    assert pool.take(100) is not buffers[0]


def test_buffer_pool_keeps_no_more_idle_bytes_than_its_bound():
    """Bounded by count alone, four idle buffers of a sync with 1 GiB buckets (or of buckets made
    for one huge tensor) stayed in the trainer's memory for good."""
    from checkpoint_transport.buffers import HostBufferPool

    pool = HostBufferPool(max_idle=4, max_idle_bytes=1000)
    huge = pool.take(5000)
    pool.give(huge)
    assert pool.idle_bytes() == 0 and pool.take(5000) is not huge
    buffers = [pool.take(400) for _ in range(3)]
    for buffer in buffers:
        pool.give(buffer)
    assert pool.idle_bytes() == 800  # a third buffer of 400 would pass the bound
    again = [pool.take(400) for _ in range(3)]
    assert [any(a is b for b in buffers) for a in again] == [True, True, False]


def test_a_sender_whose_channel_fails_reads_the_export_to_its_end():
    """A collective export (FSDP2's `full_tensor()` on every rank, rank 0 sending) needs rank 0
    to pull every tensor, else its other ranks wait in a gather it never joins: the sender kept
    packing stopped and left the rest of the export unread."""
    from checkpoint_transport.sender import WeightSender
    from checkpoint_transport.spec import TransportError, TransportSpec

    class BreaksOnSecondBucket:
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.sent = 0

        def send(self, header: bytes, flat: torch.Tensor | None) -> None:
            self.sent += 1
            if self.sent == 2:
                raise TransportError("a peer left the group while sending a header")

    pulled: list[str] = []

    def export():
        for index in range(40):
            pulled.append(f"w{index}")
            yield f"w{index}", torch.full((256,), float(index))

    spec = TransportSpec(backend="gloo", group="g", world_size=2, bucket_bytes=2048, timeout_s=30.0)
    report = WeightSender(spec, BreaksOnSecondBucket()).send(export(), version=1)
    assert not report.ok and "peer left" in report.error
    assert len(pulled) == 40  # every tensor was pulled before send returned


def test_a_dtensor_shard_is_refused_with_how_to_export_it_whole():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from checkpoint_transport.bucket import group_into_buckets

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(TypeError, match=r"'w' is a DTensor .*full_tensor\(\)"):
            list(group_into_buckets([("w", sharded)], 1 << 20))
    finally:
        if owned:
            dist.destroy_process_group()
