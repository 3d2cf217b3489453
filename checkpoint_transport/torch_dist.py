"""`torch.distributed` broadcast backends: "gloo" (CPU buckets) and "nccl" (GPU buckets).

Each sync gets its own process group, built straight from a store rather than through
`init_process_group`/`new_group`: the workers may already run a default group for their own
tensor/pipeline parallelism, and `new_group` would need every member of that default group to
take part. Here the publisher hosts a `TCPStore` (it need not be the sending rank), every
member connects as a client under a per-sync key prefix, and builds a `ProcessGroupGloo` or
`ProcessGroupNCCL` of exactly {sender} + receivers. Nothing global is touched.

Per bucket the sender broadcasts three things from rank 0: the header's length, the header,
the payload. After the end-of-stream header, one small all-reduce lets the sender know every
receiver has taken the whole stream before it lets its buffers (and process) go.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from checkpoint_transport.buffers import HOST_BUFFERS
from checkpoint_transport.channel import register_backend
from checkpoint_transport.spec import TransportConfig, TransportError, TransportSpec, TransportTimeout

logger = logging.getLogger(__name__)


def _translate(error: Exception, what: str) -> TransportError:
    text = str(error)
    if "Timed out" in text or "timeout" in text.lower():
        return TransportTimeout(f"timed out {what}: {text.splitlines()[0][:300]}")
    if "Connection closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
        return TransportError(f"a peer left the group while {what} (it died or gave up): {text.splitlines()[0][:300]}")
    return TransportError(f"{what} failed: {type(error).__name__}: {text.splitlines()[0][:300] if text else ''}")


class _TorchSession:
    """Hosts the TCP store the groups rendezvous through; it only carries rendezvous keys."""

    def __init__(self, backend: str, config: TransportConfig) -> None:
        self.backend = backend
        self.config = config
        timeout = datetime.timedelta(seconds=config.timeout_s)
        self._store = dist.TCPStore(config.address, 0, None, True, timeout, wait_for_workers=False)
        self._group: str | None = None

    def begin(self, group: str, receivers: int) -> TransportSpec:
        self._group = group
        return TransportSpec(
            backend=self.backend,
            group=group,
            world_size=receivers + 1,
            address=self.config.address,
            port=self._store.port,
            bucket_bytes=self.config.bucket_bytes,
            timeout_s=self.config.timeout_s,
            max_buffered_buckets=self.config.max_buffered_buckets,
        )

    def abort(self, reason: str) -> None:
        # A collective cannot be interrupted from outside; receivers see the sender's channel
        # close (immediately) or time out after spec.timeout_s.
        logger.info("aborting sync %s: %s", self._group, reason)

    def close(self) -> None:
        self._store = None  # type: ignore[assignment]


NCCL_WATCHDOG_FACTOR = 4


class _Group:
    """One member of a per-sync broadcast group."""

    def __init__(self, spec: TransportSpec, nccl: bool) -> None:
        self.spec = spec
        self.nccl = nccl
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if nccl:
            if not torch.cuda.is_available() or not dist.is_nccl_available():
                raise TransportError("the nccl transport needs CUDA and a torch build with NCCL")
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        try:
            self._store = dist.TCPStore(spec.address, spec.port, None, False, timeout)
            prefix = dist.PrefixStore(f"checkpoint_transport/{spec.group}/", self._store)
            if nccl:
                options = dist.ProcessGroupNCCL.Options()
                # the watchdog tears the whole process down when it fires: leave it far behind
                # the host-side wait of `broadcast`, which raises a `TransportError` instead
                options._timeout = timeout * NCCL_WATCHDOG_FACTOR
                self._pg = dist.ProcessGroupNCCL(prefix, spec.rank, spec.world_size, options)
            else:
                self._pg = dist.ProcessGroupGloo(prefix, spec.rank, spec.world_size, timeout)
        except Exception as error:
            raise _translate(error, f"joining group {spec.group} at {spec.address}:{spec.port}") from error
        self._options = dist.BroadcastOptions()
        self._options.rootRank = 0

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        try:
            self._wait(self._pg.broadcast([tensor], self._options))
            if self.nccl:
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as error:
            raise _translate(error, what) from error

    def acknowledge(self, value: int) -> int:
        """All-reduce one integer: receivers add 1 once they hold the whole stream."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        try:
            self._wait(self._pg.allreduce([tensor]))
        except Exception as error:
            raise _translate(error, "acknowledging the end of the stream") from error
        return int(tensor.item())

    def _wait(self, work: "dist.Work") -> None:
        """Block this thread until `work` is done. NCCL's plain `wait()` only orders the stream
        and returns at once, so a missing peer would hang the next synchronize; with a timeout
        it waits on the host and raises when the peer does not come."""
        if self.nccl:
            work.wait(datetime.timedelta(seconds=self.spec.timeout_s))
        else:
            work.wait()  # gloo's wait blocks and honours the group's timeout

    def close(self) -> None:
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # already broken: nothing left to release cleanly
                pass
        self._store = None


class TorchSenderChannel:
    def __init__(self, spec: TransportSpec, nccl: bool) -> None:
        self._group = _Group(spec, nccl)
        self.device = self._group.device

    def send(self, header: bytes, payload: torch.Tensor | None) -> None:
        data = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        self._group.broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.device), "sending a header size")
        self._group.broadcast(data, "sending a header")
        if payload is not None and payload.numel():
            self._group.broadcast(payload, "sending a bucket")
        if payload is None:  # end of stream: wait until every receiver holds it
            receivers = self._group.spec.world_size - 1
            acknowledged = self._group.acknowledge(0)
            if acknowledged != receivers:
                raise TransportError(f"{acknowledged} of {receivers} receivers acknowledged the end of the stream")

    def close(self) -> None:
        self._group.close()


class TorchReceiverChannel:
    def __init__(self, spec: TransportSpec, nccl: bool) -> None:
        self._group = _Group(spec, nccl)
        self.device = self._group.device
        self._held: dict[int, torch.Tensor] = {}  # pooled host buffers of buckets being loaded

    def recv_header(self) -> bytes:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._group.broadcast(size, "waiting for the next header")
        length = int(size.item())
        if not 0 < length < 1 << 30:
            raise TransportError(f"header size {length} is not plausible: the stream is out of step")
        data = torch.empty(length, dtype=torch.uint8, device=self.device)
        self._group.broadcast(data, "receiving a header")
        return data.cpu().numpy().tobytes()

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.device.type == "cpu":
            pooled = HOST_BUFFERS.take(nbytes)
            return pooled[:nbytes], pooled
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device), None

    def recv_payload(self, index: int, nbytes: int) -> torch.Tensor:
        buffer, pooled = self._buffer(nbytes)
        try:
            if nbytes:
                self._group.broadcast(buffer, "receiving a bucket")
        except BaseException:
            if pooled is not None:
                HOST_BUFFERS.give(pooled)
            raise
        if pooled is not None:
            self._held[index] = pooled
        return buffer

    def discard_payload(self, index: int, nbytes: int) -> None:
        self.recv_payload(index, nbytes)  # a broadcast has no way to skip: take part, then drop it
        self.release(index)

    def acknowledge_end(self) -> None:
        self._group.acknowledge(1)

    def release(self, index: int) -> None:
        pooled = self._held.pop(index, None)
        if pooled is not None:
            HOST_BUFFERS.give(pooled)

    def close(self) -> None:
        self._held.clear()
        self._group.close()


class _TorchBackend:
    def __init__(self, name: str, nccl: bool) -> None:
        self.name = name
        self.nccl = nccl

    def open_session(self, config: TransportConfig) -> _TorchSession:
        return _TorchSession(self.name, config)

    def sender_channel(self, spec: TransportSpec) -> TorchSenderChannel:
        return TorchSenderChannel(spec, self.nccl)

    def receiver_channel(self, spec: TransportSpec) -> TorchReceiverChannel:
        return TorchReceiverChannel(spec, self.nccl)


@register_backend("gloo")
def gloo_backend() -> _TorchBackend:
    return _TorchBackend("gloo", nccl=False)


@register_backend("nccl")
def nccl_backend() -> _TorchBackend:
    return _TorchBackend("nccl", nccl=True)
