"""`WeightReceiver`: one receiving worker of a sync; hands verified buckets to the engine.

Pipelined: a fetch thread receives bucket i+1 (and verifies its checksum) while the calling
thread loads bucket i into the engine. Two slots bound the memory: at most one bucket being
loaded and one in transfer.

A receiver never leaves a collective early because of bad data: after the first problem
(checksum mismatch, malformed header, the engine rejecting a tensor, a duplicate) it keeps
taking part in the stream without loading, so the sender and the other receivers finish, and
reports the first problem. Only a broken channel (peer died, timeout) ends it early.
The report is `ok` only when the stream ended normally, every bucket verified and loaded, the
totals in the end header match, and no expected tensor is missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Collection, Sequence

import torch

from checkpoint_transport.bucket import BucketFormatError, BucketHeader, buffer_checksum, unpack_bucket
from checkpoint_transport.channel import ReceiverChannel, get_backend
from checkpoint_transport.spec import ReceiveReport, TransportError, TransportSpec

logger = logging.getLogger(__name__)

LoadBucket = Callable[[list[tuple[str, torch.Tensor]]], Sequence[str]]
_SLOTS = 2


class WeightReceiver:
    """Receives complete weight versions over one channel; build it with `from_spec`."""

    def __init__(self, spec: TransportSpec, channel: ReceiverChannel) -> None:
        if spec.rank == 0:
            raise ValueError("rank 0 is the sender; receivers are ranks 1..world_size-1")
        self.spec = spec
        self.channel = channel
        self.buckets_fetched = 0  # progress, readable from other threads (tests, status)

    @classmethod
    def from_spec(cls, spec: TransportSpec) -> "WeightReceiver":
        """Join the sync's group (blocks until every member joined, for broadcast backends)."""
        return cls(spec, get_backend(spec.backend).receiver_channel(spec))

    def receive(
        self, load_bucket: LoadBucket, version: int | None = None, expected_names: Collection[str] | None = None
    ) -> ReceiveReport:
        """Receive one whole stream. `load_bucket` copies a bucket's tensors (views, valid only
        during the call) into the engine and returns the names it loaded."""
        report = ReceiveReport(rank=self.spec.rank, version=version if version is not None else -1)
        started = time.monotonic()
        ready: queue.Queue[tuple] = queue.Queue()
        slots = threading.Semaphore(_SLOTS)
        failed = threading.Event()
        fetcher = threading.Thread(
            target=self._fetch, args=(version, ready, slots, failed), name="bucket-fetcher", daemon=True
        )
        fetcher.start()
        loaded: set[str] = set()

        def fail(reason: str) -> None:
            if report.error is None:
                report.error = reason
                logger.warning("rank %d: %s", self.spec.rank, reason)
            failed.set()

        while True:
            waited = time.monotonic()
            try:
                item = ready.get(timeout=self.spec.receiver_idle_limit_s)
            except queue.Empty:  # the fetch thread itself is stuck: should not happen
                fail(f"no progress from the channel for {self.spec.receiver_idle_limit_s:.3g} s")
                break
            report.wait_s += time.monotonic() - waited
            kind = item[0]
            if kind == "bucket":
                header, flat = item[1], item[2]
                report.buckets += 1
                report.tensors += len(header.entries)
                report.bytes += header.nbytes
                if not failed.is_set():
                    self._load(header, flat, load_bucket, loaded, report, fail)
                del flat, item
                self.channel.release(header.index)
                slots.release()
            elif kind == "skipped":
                header = item[1]
                report.buckets += 1
                report.tensors += len(header.entries)
                report.bytes += header.nbytes
            elif kind == "bad":
                fail(item[1])
            elif kind == "broken":
                fail(item[1])
                break
            else:  # "end"
                header = item[1]
                if header.abort_reason:
                    fail(f"the sender aborted the stream: {header.abort_reason}")
                elif (header.total_buckets, header.total_tensors) != (report.buckets, report.tensors):
                    fail(
                        f"the stream ended after {report.buckets} buckets / {report.tensors} tensors, "
                        f"the sender sent {header.total_buckets} / {header.total_tensors}"
                    )
                break
        fetcher.join(timeout=5.0)
        report.names_loaded = sorted(loaded)
        if expected_names is not None and report.error is None:
            report.missing = sorted(set(expected_names) - loaded)
            if report.missing:
                fail(f"the stream lacks {len(report.missing)} tensors the model needs, e.g. {report.missing[:3]}")
        report.ok = report.error is None
        report.seconds = time.monotonic() - started
        return report

    def _load(
        self,
        header: BucketHeader,
        flat: torch.Tensor,
        load_bucket: LoadBucket,
        loaded: set[str],
        report: ReceiveReport,
        fail: Callable[[str], None],
    ) -> None:
        duplicates = [e.name for e in header.entries if e.name in loaded]
        if duplicates:
            fail(f"bucket {header.index}: tensor {duplicates[0]!r} was already sent in this stream")
            return
        began = time.monotonic()
        try:
            names = load_bucket(unpack_bucket(flat, header))
        except Exception as error:
            fail(f"bucket {header.index}: the engine rejected it: {error}")
            return
        finally:
            report.load_s += time.monotonic() - began
        loaded.update(names)

    def _fetch(self, version: int | None, ready: queue.Queue, slots: threading.Semaphore, failed: threading.Event) -> None:
        """The fetch thread: headers and payloads in order, verified, into `ready`."""
        if self.channel.device.type == "cuda":
            torch.cuda.set_device(self.channel.device)
        expected_index = 0
        try:
            while True:
                slots.acquire()
                header = BucketHeader.from_bytes(self.channel.recv_header())
                if header.end:
                    self.channel.acknowledge_end()
                    ready.put(("end", header))
                    return
                problem = self._check_header(header, version, expected_index)
                expected_index += 1
                if problem is None and not failed.is_set():
                    flat = self.channel.recv_payload(header.index, header.nbytes)
                    self.buckets_fetched += 1
                    actual = buffer_checksum(flat) if flat.numel() else ""
                    if flat.numel() and actual != header.checksum:
                        problem = f"bucket {header.index}: checksum mismatch (got {actual}, header says {header.checksum})"
                    else:
                        ready.put(("bucket", header, flat))
                        continue
                    del flat
                else:
                    self.channel.discard_payload(header.index, max(header.nbytes, 0))
                if problem is not None:
                    failed.set()
                    ready.put(("bad", problem))
                ready.put(("skipped", header))
                self.channel.release(header.index)
                slots.release()
        except TransportError as error:
            ready.put(("broken", str(error)))
        except Exception as error:
            logger.exception("rank %d: receiving failed", self.spec.rank)
            ready.put(("broken", f"receiving failed: {type(error).__name__}: {error}"))

    @staticmethod
    def _check_header(header: BucketHeader, version: int | None, expected_index: int) -> str | None:
        if version is not None and header.version != version:
            return f"bucket {header.index} belongs to version {header.version}, this sync is version {version}"
        if header.index != expected_index:
            return f"bucket {header.index} arrived where bucket {expected_index} was due"
        try:
            header.validate()
        except BucketFormatError as error:
            return str(error)
        return None

    def close(self) -> None:
        self.channel.close()


def receive_weights(
    spec: TransportSpec,
    load_bucket: LoadBucket,
    version: int | None = None,
    expected_names: Collection[str] | None = None,
) -> ReceiveReport:
    """Join, receive one stream, leave; never raises (what a worker's Ray method calls)."""
    try:
        receiver = WeightReceiver.from_spec(spec)
    except Exception as error:
        return ReceiveReport(rank=spec.rank, version=version if version is not None else -1,
                             error=f"could not join sync {spec.group}: {error}")
    try:
        return receiver.receive(load_bucket, version, expected_names)
    finally:
        receiver.close()


def receive_into_engine(spec: TransportSpec, engine, version: int | None = None) -> ReceiveReport:  # type: ignore[no-untyped-def]
    """Receive into an `Engine` (anything with `load_weights` and `weight_specs`): every name
    in `weight_specs()` must arrive for the report to be `ok`."""
    return receive_weights(spec, engine.load_weights, version, set(engine.weight_specs()))
