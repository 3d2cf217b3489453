"""The seam between the bucket protocol and the wires: channels, sessions, and the registry.

A backend supplies three things:
- a `TransportSession`, opened by the publisher for one sync: it owns the rendezvous (a TCP
  store, a Ray actor) and produces the `TransportSpec` every rank builds its channel from;
- a `SenderChannel` for rank 0: moves one header and its payload to every receiver;
- a `ReceiverChannel` for ranks 1..n: yields them in order.
Everything above (packing, checksums, pipelining, validation, reports) is backend-independent
and lives in `sender.py` / `receiver.py`, so every backend passes the same tests.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from checkpoint_transport.spec import TransportConfig, TransportSpec


class SenderChannel(Protocol):
    device: torch.device  # where buckets must be packed (cuda for NCCL, cpu otherwise)

    def send(self, header: bytes, payload: torch.Tensor | None) -> None:
        """Deliver one header (and its bucket, unless it ends the stream) to every receiver."""
        ...

    def close(self) -> None: ...


class ReceiverChannel(Protocol):
    device: torch.device

    def recv_header(self) -> bytes:
        """The next header; raises `TransportError` (peer gone, sender aborted) or `TransportTimeout`."""
        ...

    def recv_payload(self, index: int, nbytes: int) -> torch.Tensor:
        """Bucket `index`, announced by the last header, as a flat uint8 tensor on `device`;
        valid until `release(index)`."""
        ...

    def discard_payload(self, index: int, nbytes: int) -> None:
        """Consume the announced bucket without keeping it (a failed receiver keeps the
        collective moving so the sender and the other receivers are not stalled)."""
        ...

    def release(self, index: int) -> None:
        """The bucket is loaded (or discarded); the backend may free it."""
        ...

    def acknowledge_end(self) -> None:
        """The end-of-stream header arrived; the sender may now let its buffers go."""
        ...

    def close(self) -> None: ...


class TransportSession(Protocol):
    """The publisher's side of the rendezvous: long-lived (a TCP store, a Ray actor), one
    fresh group per sync so a failed sync leaves nothing behind for the next one."""

    backend: str

    def begin(self, group: str, receivers: int) -> TransportSpec:
        """The spec (rank 0) of a new sync named `group` with `receivers` receiving ranks."""
        ...

    def abort(self, reason: str) -> None:
        """Make the current sync's receivers stop waiting now, with `reason` (best effort;
        broadcast backends only notice the sender leaving or time out)."""
        ...

    def close(self) -> None: ...


class TransportBackend(Protocol):
    name: str

    def open_session(self, config: TransportConfig) -> TransportSession: ...

    def sender_channel(self, spec: TransportSpec) -> SenderChannel: ...

    def receiver_channel(self, spec: TransportSpec) -> ReceiverChannel: ...


_BACKENDS: dict[str, Callable[[], TransportBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[[], TransportBackend]], Callable[[], TransportBackend]]:
    def decorator(factory: Callable[[], TransportBackend]) -> Callable[[], TransportBackend]:
        _BACKENDS[name] = factory
        return factory

    return decorator


def _load_builtin_backends() -> None:
    import checkpoint_transport.ray_store  # noqa: F401  (registers "ray"; imports ray lazily)
    import checkpoint_transport.torch_dist  # noqa: F401  (registers "gloo" and "nccl")


def transport_backends() -> list[str]:
    _load_builtin_backends()
    return sorted(_BACKENDS)


def get_backend(name: str) -> TransportBackend:
    """A backend by name; an unknown name lists the valid ones."""
    _load_builtin_backends()
    if name not in _BACKENDS:
        raise ValueError(f"unknown transport backend {name!r}; valid backends: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()
