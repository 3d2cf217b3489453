"""Sender and receivers over each real backend (gloo process group, Ray object store), in threads
of this process: the same behaviours asserted for both."""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import pytest
import torch

from checkpoint_transport.channel import get_backend
from checkpoint_transport.receiver import WeightReceiver
from checkpoint_transport.sender import WeightSender
from checkpoint_transport.spec import ReceiveReport, SendReport, TransportConfig, TransportSpec

BUCKET_BYTES = 8 << 10


@pytest.fixture(scope="module", params=["gloo", "ray"])
def session(request):
    """One long-lived rendezvous per backend; every test runs its syncs as fresh groups in it."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    config = TransportConfig(backend=request.param, bucket_bytes=BUCKET_BYTES, timeout_s=20)
    opened = get_backend(request.param).open_session(config)
    yield opened
    opened.close()


def model_like_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.mlp.weight": torch.randn(24, 40 + i, generator=generator) for i in range(12)}
    tensors["model.norm.weight"] = torch.randn(40, generator=generator).to(torch.bfloat16)
    tensors["model.embed_tokens.weight"] = torch.randn(300, 24, generator=generator)  # > one bucket
    return tensors


class Sink:
    """What an engine's load function looks like: copy each bucket, report the names."""

    def __init__(self, reject: str | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.reject = reject

    def __call__(self, bucket: list[tuple[str, torch.Tensor]]) -> list[str]:
        for name, tensor in bucket:
            if name == self.reject:
                raise ValueError(f"unknown weight name {name!r}")
            self.tensors[name] = tensor.clone()
        return [name for name, _ in bucket]


def run_sync(
    session,
    stream: Iterable[tuple[str, torch.Tensor]],
    version: int,
    sinks: list[Callable],
    expected: set[str] | None = None,
    timeout_s: float | None = None,
    wrap_channel: Callable | None = None,
    on_receiver: Callable[[WeightReceiver], None] | None = None,
) -> tuple[SendReport, list[ReceiveReport]]:
    spec: TransportSpec = session.begin(f"test-{version}-{id(stream)}", len(sinks))
    if timeout_s is not None:
        spec = spec.model_copy(update={"timeout_s": timeout_s})
    reports: dict[int, ReceiveReport] = {}
    sent: list[SendReport] = []

    def receive(rank: int) -> None:
        receiver = WeightReceiver.from_spec(spec.for_rank(rank))
        if on_receiver:
            on_receiver(receiver)
        try:
            reports[rank] = receiver.receive(sinks[rank - 1], version, expected)
        finally:
            receiver.close()

    def send() -> None:
        sender = WeightSender.from_spec(spec)
        if wrap_channel:
            sender.channel = wrap_channel(sender.channel)
        try:
            sent.append(sender.send(stream, version))
        finally:
            sender.close()

    threads = [threading.Thread(target=receive, args=(rank,)) for rank in range(1, len(sinks) + 1)]
    threads.append(threading.Thread(target=send))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a sync did not finish"
    return sent[0], [reports[rank] for rank in range(1, len(sinks) + 1)]


def test_every_receiver_gets_every_tensor_bit_for_bit(session):
    weights = model_like_tensors()
    sinks = [Sink(), Sink()]
    sent, reports = run_sync(session, weights.items(), 1, sinks, expected=set(weights))
    assert sent.ok and sent.buckets > 2 and sent.tensors == len(weights)
    for sink, report in zip(sinks, reports):
        assert report.ok, report.error
        assert report.buckets == sent.buckets and report.bytes == sent.bytes
        assert set(sink.tensors) == set(weights)
        assert all(torch.equal(sink.tensors[name], weights[name]) for name in weights)
        assert all(sink.tensors[name].dtype == weights[name].dtype for name in weights)


def test_one_session_carries_consecutive_syncs(session):
    for version in (2, 3, 4):
        weights = model_like_tensors(seed=version)
        sink = Sink()
        sent, [report] = run_sync(session, weights.items(), version, [sink])
        assert sent.ok and report.ok and report.version == version
        assert torch.equal(sink.tensors["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def test_next_bucket_arrives_while_the_previous_one_is_loading(session):
    receivers: list[WeightReceiver] = []
    overlapped: list[bool] = []
    sink = Sink()

    def slow_load(bucket):
        if not overlapped:  # bucket 0: wait until bucket 1 has been fetched behind it
            event = threading.Event()
            for _ in range(200):
                if receivers[0].buckets_fetched >= 2:
                    event.set()
                    break
                event.wait(0.05)
            overlapped.append(event.is_set())
        return sink(bucket)

    weights = model_like_tensors()
    sent, [report] = run_sync(session, weights.items(), 5, [slow_load], on_receiver=receivers.append)
    assert report.ok and sent.ok
    assert overlapped == [True], "bucket 1 was not fetched while bucket 0 was loading"


def test_a_failing_export_stream_aborts_receivers_with_its_reason(session):
    def stream():
        yield from list(model_like_tensors().items())[:6]
        raise RuntimeError("gather of layer 6 failed on trainer rank 3")

    sent, reports = run_sync(session, stream(), 6, [Sink(), Sink()])
    assert not sent.ok and "gather of layer 6 failed" in sent.error
    for report in reports:
        assert not report.ok
        assert "sender aborted" in report.error and "gather of layer 6 failed" in report.error


class CorruptingChannel:
    """Flips one byte of bucket `index` after its checksum was taken (a bad wire or buffer)."""

    def __init__(self, inner, index: int = 1) -> None:
        self.inner, self.index, self.device, self.sent = inner, index, inner.device, 0

    def send(self, header: bytes, payload):
        if payload is not None:
            if self.sent == self.index:
                payload = payload.clone()
                payload[payload.numel() // 2] ^= 0xFF
            self.sent += 1
        self.inner.send(header, payload)

    def close(self) -> None:
        self.inner.close()


def test_a_corrupted_bucket_fails_its_checksum_and_the_stream_still_finishes(session):
    weights = model_like_tensors()
    sent, reports = run_sync(session, weights.items(), 7, [Sink(), Sink()], wrap_channel=CorruptingChannel)
    assert sent.ok  # the sender did its job; the damage happened after the checksum
    for report in reports:
        assert not report.ok and "bucket 1: checksum mismatch" in report.error
        assert report.buckets == sent.buckets  # took part until the end: nobody was left waiting


def test_a_stalled_sender_makes_receivers_time_out_with_a_reason(session):
    release = threading.Event()

    def stream():
        yield from list(model_like_tensors().items())[:3]
        release.wait(30)  # the trainer's export hangs

    try:
        sent, [report] = run_sync(session, stream(), 8, [Sink()], timeout_s=1.0)
    finally:
        release.set()
    # the sender gives up first, so receivers hear its reason rather than their own timeout
    assert not report.ok and "waiting for the export stream" in report.error, report.error
    assert not sent.ok


def test_a_receiver_whose_engine_rejects_a_tensor_does_not_stall_the_others(session):
    weights = model_like_tensors()
    rejecting, healthy = Sink(reject="model.layers.3.mlp.weight"), Sink()
    sent, [bad, good] = run_sync(session, weights.items(), 9, [rejecting, healthy], expected=set(weights))
    assert sent.ok
    assert not bad.ok and "unknown weight name 'model.layers.3.mlp.weight'" in bad.error
    assert bad.buckets == sent.buckets
    assert good.ok and set(healthy.tensors) == set(weights)


def test_a_stream_missing_an_expected_tensor_is_not_ok(session):
    weights = model_like_tensors()
    partial = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    sent, [report] = run_sync(session, partial.items(), 10, [Sink()], expected=set(weights))
    assert sent.ok and not report.ok
    assert report.missing == ["model.norm.weight"] and "lacks 1 tensors" in report.error


def test_a_bucket_from_another_version_is_refused(session):
    weights = model_like_tensors()
    spec = session.begin("version-mismatch", 1)
    reports: list[ReceiveReport] = []

    def receive() -> None:
        receiver = WeightReceiver.from_spec(spec.for_rank(1))
        reports.append(receiver.receive(Sink(), version=12))
        receiver.close()

    thread = threading.Thread(target=receive)
    thread.start()
    sender = WeightSender.from_spec(spec)
    sent = sender.send(weights.items(), version=11)
    sender.close()
    thread.join(timeout=60)
    assert sent.ok and not reports[0].ok and "belongs to version 11" in reports[0].error


@pytest.mark.gpu
def test_nccl_moves_buckets_between_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the sender and the receiver on distinct GPUs")
    session = get_backend("nccl").open_session(TransportConfig(backend="nccl", bucket_bytes=BUCKET_BYTES, timeout_s=60))
    spec = session.begin("nccl-two-gpus", 1)
    weights = {name: tensor.to("cuda:0") for name, tensor in model_like_tensors().items()}
    received: dict[str, torch.Tensor] = {}
    reports: list[ReceiveReport] = []

    def receive() -> None:
        torch.cuda.set_device(1)
        receiver = WeightReceiver.from_spec(spec.for_rank(1))

        def load(bucket):
            assert all(tensor.device == torch.device("cuda", 1) for _, tensor in bucket)
            received.update({name: tensor.cpu() for name, tensor in bucket})
            return [name for name, _ in bucket]

        reports.append(receiver.receive(load, 1, set(weights)))
        receiver.close()

    thread = threading.Thread(target=receive)
    thread.start()
    torch.cuda.set_device(0)
    sender = WeightSender.from_spec(spec)
    sent = sender.send(weights.items(), 1)
    sender.close()
    thread.join(timeout=120)
    session.close()
    assert sent.ok and reports[0].ok, (sent.error, reports[0].error)
    assert all(torch.equal(received[name], tensor.cpu()) for name, tensor in weights.items())
