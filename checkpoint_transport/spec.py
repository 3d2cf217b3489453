"""What travels between the publisher, the sender and every receiver: specs and reports.

`TransportSpec` is small and serialisable (pydantic), so a publisher can hand it to Ray actors,
HTTP routes or subprocesses; each side builds its own channel from it. Reports are plain
dataclasses with `to_dict`/`from_dict` for the same reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_BUCKET_BYTES = 256 << 20  # the trainer holds ~2 buckets, each receiver ~2 (pipelined)


class TransportError(RuntimeError):
    """The channel failed: the peer died, a wait timed out, or the sender aborted the stream."""


class TransportTimeout(TransportError):
    pass


def known_backend(name: str) -> str:
    """A transport backend name the registry knows (`channel.register_backend`); a typo is
    refused where it is written, not when a sync first runs."""
    from checkpoint_transport.channel import transport_backends  # the registry imports this module

    if name not in transport_backends():
        raise ValueError(f"unknown transport backend {name!r}; valid backends: {', '.join(transport_backends())}")
    return name


class TransportConfig(BaseModel):
    """The publisher's knobs; the one transport config of a deployment.

    The server's `model_engine_server.transport:` section is this class plus the server's
    endpoint allow-list (`model_engine_server.config.ServerTransportConfig`), so a trainer can
    build its publisher from the YAML the server starts with."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(default="gloo", description="gloo (CPU torch.distributed), nccl (GPU), or ray (object store)")
    bucket_bytes: int = Field(default=DEFAULT_BUCKET_BYTES, gt=0, description="bytes per bucket")
    timeout_s: float = Field(default=120.0, gt=0, description="longest wait for any one step (rendezvous, a bucket)")
    address: str = Field(
        default="127.0.0.1", description="rendezvous host the workers can reach (the publisher's node IP on a cluster)"
    )
    max_buffered_buckets: int = Field(default=2, ge=1, description="ray: buckets in the object store at once")
    ray_namespace: str | None = Field(default=None, description="ray: namespace of the bucket board actor")

    _check_backend = field_validator("backend")(known_backend)


RECEIVER_IDLE_GRACE_S = 30.0


class TransportSpec(BaseModel):
    """One sync's rendezvous: which backend, where, which group, and this process's rank.

    Rank 0 sends; ranks 1..world_size-1 receive. A fresh `group` per sync keeps a failed sync
    from leaving half a collective behind for the next one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    group: str
    world_size: int = Field(ge=2)
    rank: int = Field(default=0, ge=0)
    address: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    bucket_bytes: int = Field(default=DEFAULT_BUCKET_BYTES, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    max_buffered_buckets: int = Field(default=2, ge=1)
    ray_namespace: str | None = None
    ray_board: str | None = None

    _check_backend = field_validator("backend")(known_backend)

    @property
    def receiver_idle_limit_s(self) -> float:
        """How long a receiver waits for its channel to move before it gives up: longer than
        a few channel timeouts, so only a stuck fetch trips it."""
        return self.timeout_s * 3 + RECEIVER_IDLE_GRACE_S

    def for_rank(self, rank: int) -> "TransportSpec":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a group of {self.world_size}")
        return self.model_copy(update={"rank": rank})


class _Report:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # type: ignore[no-untyped-def]
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SendReport(_Report):
    """What the sending rank did; `error` says why it stopped early."""

    version: int
    ok: bool = False
    error: str | None = None
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    pack_s: float = 0.0  # time producing buckets (export + copy + checksum), overlapped with sending
    send_s: float = 0.0  # time in the channel

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class ReceiveReport(_Report):
    """What one receiving worker got and loaded; `ok` only if the stream was complete and valid."""

    rank: int
    version: int
    ok: bool = False
    error: str | None = None
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0  # time the loader waited for data (not overlapped with loading)
    load_s: float = 0.0  # time in the engine's load function
    names_loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def failure_reason(reports: Sequence[ReceiveReport]) -> str | None:
    """The first receiver's error, naming its rank; None when every report is ok."""
    failed = [r for r in reports if not r.ok]
    if not reports:
        return "no worker received the stream"
    if not failed:
        return None
    first = failed[0]
    more = f" (and {len(failed) - 1} more workers failed)" if len(failed) > 1 else ""
    return f"rank {first.rank}: {first.error}{more}"
