"""`WeightSender`: rank 0 of a sync, fed by the trainer's export stream of `(hf_name, tensor)`.

Pipelined: a producer thread pulls the stream, packs the next bucket (copy + checksum) while
the calling thread has the current one on the wire, so the trainer's export (gathering shards,
the slow part on a real trainer) overlaps the transfer. At most three buckets exist at once:
one being sent, one packed and waiting, one being packed. Host buffers are reused across
buckets and syncs (`buffers.HOST_BUFFERS`).

A failure of the stream itself (the trainer's export raised, a duplicate name, a dtype that
cannot travel) ends the stream with an abort header that carries the reason, so receivers stop
at once instead of timing out. A failure of the channel is reported as it is, once the export
has been read to its end without packing: a trainer whose export is collective (FSDP2's
`full_tensor()` on every rank, rank 0 sending) would otherwise leave its other ranks waiting in
a gather that rank 0 never joins. A sync cancelled by its publisher (`cancelled` set) ends at
the next bucket with an abort header that names the cancel; the export is then read to its end
by the packing thread, after `send` has returned (a cancelled caller waits for nothing). A
sender already blocked in the channel, or waiting for receivers to join, cannot be interrupted:
it returns when that call does, within `timeout_s`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterable

import torch

from checkpoint_transport.bucket import BucketHeader, group_into_buckets, pack_bucket, packed_size
from checkpoint_transport.buffers import HOST_BUFFERS
from checkpoint_transport.channel import SenderChannel, get_backend
from checkpoint_transport.spec import SendReport, TransportError, TransportSpec

logger = logging.getLogger(__name__)

_END = object()

# The receivers wait `timeout_s` for each header: the sender gives up on a stalled export sooner,
# so its abort header (naming the stall) reaches them before their own timeout does.
EXPORT_WAIT_SHARE = 0.8
CANCEL_POLL_S = 0.1  # how soon a sender waiting for the export notices its sync was cancelled


class _StreamFailed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class WeightSender:
    """Sends complete weight versions over one channel; build it with `from_spec`."""

    def __init__(self, spec: TransportSpec, channel: SenderChannel) -> None:
        if spec.rank != 0:
            raise ValueError(f"the sender is rank 0, this spec is for rank {spec.rank}")
        self.spec = spec
        self.channel = channel

    @classmethod
    def from_spec(cls, spec: TransportSpec) -> "WeightSender":
        """Join the sync's group as rank 0 (blocks until every receiver joined, for broadcast backends)."""
        return cls(spec, get_backend(spec.backend).sender_channel(spec))

    def send(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, cancelled: threading.Event | None = None
    ) -> SendReport:
        """Stream every tensor to every receiver; the report's `error` says why it stopped early."""
        report = SendReport(version=version)
        started = time.monotonic()
        packed: queue.Queue[object] = queue.Queue(maxsize=1)
        stop = threading.Event()
        pack_seconds = [0.0]
        producer = threading.Thread(
            target=self._produce, args=(named_tensors, version, packed, stop, pack_seconds), name="bucket-packer", daemon=True
        )
        producer.start()
        index = 0
        channel_failed = False
        try:
            while True:
                item = self._next_bucket(packed, cancelled)
                if item is _END or isinstance(item, _StreamFailed):
                    reason = item.reason if isinstance(item, _StreamFailed) else None
                    end = BucketHeader(
                        version=version,
                        index=index,
                        end=True,
                        abort_reason=reason,
                        total_buckets=report.buckets,
                        total_tensors=report.tensors,
                    )
                    report.error = reason
                    sent_at = time.monotonic()
                    self.channel.send(end.to_bytes(), None)
                    report.send_s += time.monotonic() - sent_at
                    report.ok = reason is None
                    break
                flat, header, pooled = item  # type: ignore[misc]
                sent_at = time.monotonic()
                self.channel.send(header.to_bytes(), flat)
                report.send_s += time.monotonic() - sent_at
                if pooled is not None:  # every receiver has it (or the object store copied it)
                    HOST_BUFFERS.give(pooled)
                report.buckets += 1
                report.tensors += len(header.entries)
                report.bytes += header.nbytes
                index += 1
                del flat, item
        except TransportError as error:
            channel_failed = True
            report.ok = False
            report.error = report.error or str(error)
        except Exception as error:  # a bug or an unexpected channel failure: still a report
            channel_failed = True
            logger.exception("sending version %d failed", version)
            report.ok = False
            report.error = report.error or f"{type(error).__name__}: {error}"
        finally:
            stop.set()  # the producer reads the rest of the export without packing (module docstring)
            producer.join(timeout=self.spec.timeout_s if channel_failed else 1.0)
        report.pack_s = pack_seconds[0]
        report.seconds = time.monotonic() - started
        return report

    def _next_bucket(self, packed: "queue.Queue[object]", cancelled: threading.Event | None) -> object:
        """The next packed bucket, or why there is none: a stalled export, or a cancelled sync."""
        export_wait_s = self.spec.timeout_s * EXPORT_WAIT_SHARE
        deadline = time.monotonic() + export_wait_s
        while cancelled is None or not cancelled.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _StreamFailed(f"timed out after {export_wait_s:.3g} s waiting for the export stream's next tensors")
            try:
                return packed.get(timeout=min(remaining, CANCEL_POLL_S))
            except queue.Empty:
                continue
        return _StreamFailed("the sync was cancelled by its publisher")

    def _produce(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        packed: "queue.Queue[object]",
        stop: threading.Event,
        pack_seconds: list[float],
    ) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    packed.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        device = self.channel.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        seen: set[str] = set()
        export = iter(named_tensors)
        try:
            began = time.monotonic()
            for index, group in enumerate(group_into_buckets(export, self.spec.bucket_bytes)):
                for name, _ in group:
                    if name in seen:
                        raise ValueError(f"tensor {name!r} appears twice in the export stream")
                    seen.add(name)
                pooled = HOST_BUFFERS.take(packed_size(group)) if device.type == "cpu" else None
                flat, header = pack_bucket(group, version, index, device, out=pooled)
                item = (flat, header, pooled)
                del group, flat
                pack_seconds[0] += time.monotonic() - began
                if not put(item):  # the channel failed: read the rest so a collective export ends on every rank
                    del item
                    for _ in export:
                        pass
                    return
                began = time.monotonic()
            pack_seconds[0] += time.monotonic() - began
            put(_END)
        except BaseException as error:  # the trainer's export failed: tell the receivers why
            put(_StreamFailed(f"the export stream failed: {type(error).__name__}: {error}"))

    def close(self) -> None:
        self.channel.close()


def send_weights(
    spec: TransportSpec,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    sender_factory: Callable[[TransportSpec], WeightSender] = WeightSender.from_spec,
    cancelled: threading.Event | None = None,
) -> SendReport:
    """Join (through `sender_factory`), send, leave; never raises (a sending Ray actor returns
    the report as it is). Setting `cancelled` ends the stream at the next bucket."""
    try:
        sender = sender_factory(spec)
    except Exception as error:
        return SendReport(version=version, error=f"the sender could not join sync {spec.group}: {error}")
    try:
        return sender.send(named_tensors, version, cancelled)
    finally:
        sender.close()
