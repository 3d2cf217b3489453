"""The Ray object-store backend ("ray"): put each bucket once, every receiver gets it.

No process group: works across nodes and across Ray jobs (given a shared namespace), at the
object store's speed. A small async actor, the *board* (one per publisher session, named in
the spec), orders each sync's stream: the sender posts `(header, [ObjectRef])` under
consecutive indices, each receiver takes index after index and releases it once loaded. The
board keeps at most `max_buffered_buckets` unreleased buckets (flow control: the object store
holds a bounded number of buckets), and the sender returns only once every receiver released
everything, so its objects outlive their readers. Every call names its sync's group, so a
straggler from a failed sync cannot read the next one's buckets.

Failure surfaces: the sender's process dies -> the publisher aborts the sync on the board and
receivers stop with the reason (a bucket whose owner died fails its `get` as well); the
publisher dies -> the board dies with it, every waiting call fails; anything slower -> the
waits time out after `timeout_s`.
"""

from __future__ import annotations

import asyncio
import uuid
import warnings
from typing import Any

import torch

from checkpoint_transport.channel import register_backend
from checkpoint_transport.spec import TransportConfig, TransportError, TransportSpec, TransportTimeout

_MARGIN_S = 10.0  # the board answers a timed-out wait itself; the client waits a little longer


class BucketBoard:
    """The ordered buckets of the current sync (an async Ray actor; pure asyncio inside).

    Long-lived (one per publisher): `reset(group, receivers)` starts a sync and drops whatever
    a failed previous one left; every call names its group, so a straggler of an old sync gets
    an error instead of someone else's buckets.
    """

    def __init__(self) -> None:
        self._group: str | None = None
        self._receivers = 0
        self._posted: dict[int, tuple[bytes, list[Any]]] = {}
        self._released: dict[int, set[int]] = {}
        self._abort_reason: str | None = None
        self._changed = asyncio.Condition()

    def _check(self, group: str) -> None:
        if group != self._group:
            raise TransportError(f"sync {group} is over (the board now serves {self._group})")

    async def _wait(self, group: str, predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: group != self._group or predicate())
            except TimeoutError:
                raise TransportTimeout(f"timed out after {timeout_s:.3g} s {what}") from None
            self._check(group)

    async def reset(self, group: str, receivers: int) -> None:
        async with self._changed:
            self._group, self._receivers = group, receivers
            self._posted.clear()
            self._released.clear()
            self._abort_reason = None
            self._changed.notify_all()

    async def post(self, group: str, index: int, header: bytes, refs: list[Any], timeout_s: float, max_buffered: int) -> None:
        await self._wait(
            group,
            lambda: self._abort_reason is not None or len(self._posted) < max_buffered,
            timeout_s,
            f"waiting for receivers to release earlier buckets before bucket {index}",
        )
        async with self._changed:
            if self._abort_reason is not None:
                raise TransportError(f"the sync was aborted: {self._abort_reason}")
            self._posted[index] = (header, refs)
            self._released[index] = set()
            self._changed.notify_all()

    async def take(self, group: str, index: int, timeout_s: float) -> tuple[bytes | None, Any]:
        """`(header, [ref])`, or `(None, reason)` when the publisher aborted the sync."""
        await self._wait(
            group,
            lambda: index in self._posted or self._abort_reason is not None,
            timeout_s,
            f"waiting for bucket {index} from the sender",
        )
        if index in self._posted:
            return self._posted[index]
        return None, self._abort_reason

    async def release(self, group: str, index: int, rank: int) -> None:
        async with self._changed:
            if group != self._group or index not in self._released:
                return
            self._released[index].add(rank)
            if len(self._released[index]) >= self._receivers:
                del self._released[index]
                del self._posted[index]  # drops the board's reference: the object may go
            self._changed.notify_all()

    async def wait_drained(self, group: str, timeout_s: float) -> None:
        await self._wait(group, lambda: not self._posted, timeout_s, "waiting for receivers to take the whole stream")

    async def abort(self, group: str, reason: str) -> None:
        async with self._changed:
            if group == self._group:
                self._abort_reason = self._abort_reason or reason
                self._posted.clear()  # nobody will read them: let the objects go
                self._released.clear()
            self._changed.notify_all()


_BOARD_PREFIX = "checkpoint_transport_board:"


def _call(ref: Any, timeout_s: float, what: str) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s + _MARGIN_S)
    except TransportError:
        raise
    except ray.exceptions.GetTimeoutError as error:
        raise TransportTimeout(f"timed out {what}") from error
    except ray.exceptions.RayTaskError as error:
        cause = error.as_instanceof_cause()
        if isinstance(cause, TransportError):
            raise cause from None
        raise TransportError(f"{what} failed: {cause}") from error
    except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as error:
        raise TransportError(f"the sync's board is gone while {what} (the publisher died or closed it): {error}") from error
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError) as error:
        raise TransportError(f"a bucket was lost while {what} (the sender died): {type(error).__name__}") from error


def _find_board(spec: TransportSpec):  # -> ray.actor.ActorHandle
    """The publisher's board, by the name in the spec."""
    import ray

    if spec.ray_board is None:
        raise TransportError("a ray transport spec must name its board (ray_board)")
    try:
        return ray.get_actor(spec.ray_board, namespace=spec.ray_namespace)
    except ValueError as error:
        raise TransportError(f"no board {spec.ray_board!r} in namespace {spec.ray_namespace!r}: the publisher is gone") from error


class _RaySession:
    backend = "ray"

    def __init__(self, config: TransportConfig) -> None:
        import ray

        if not ray.is_initialized():
            raise TransportError("the ray transport needs ray.init() in the publisher's process")
        self.config = config
        self.namespace = config.ray_namespace or ray.get_runtime_context().namespace
        self.board_name = f"{_BOARD_PREFIX}{uuid.uuid4().hex[:12]}"
        actor = ray.remote(num_cpus=0, max_concurrency=1000)(BucketBoard)
        self._board = actor.options(name=self.board_name, namespace=self.namespace).remote()
        self._group: str | None = None

    def begin(self, group: str, receivers: int) -> TransportSpec:
        _call(self._board.reset.remote(group, receivers), self.config.timeout_s, "starting a sync on the board")
        self._group = group
        return TransportSpec(
            backend="ray",
            group=group,
            world_size=receivers + 1,
            bucket_bytes=self.config.bucket_bytes,
            timeout_s=self.config.timeout_s,
            max_buffered_buckets=self.config.max_buffered_buckets,
            ray_namespace=self.namespace,
            ray_board=self.board_name,
        )

    def abort(self, reason: str) -> None:
        if self._group is not None:
            self._board.abort.remote(self._group, reason)

    def close(self) -> None:
        import ray

        ray.kill(self._board)


class RaySenderChannel:
    device = torch.device("cpu")

    def __init__(self, spec: TransportSpec) -> None:
        self._spec = spec
        self._board = _find_board(spec)
        self._index = 0

    def send(self, header: bytes, payload: torch.Tensor | None) -> None:
        import ray

        refs = [ray.put(payload.numpy())] if payload is not None else []
        timeout = self._spec.timeout_s
        _call(self._board.post.remote(self._spec.group, self._index, header, refs, timeout, self._spec.max_buffered_buckets), timeout, f"posting bucket {self._index}")
        self._index += 1
        if payload is None:  # end of stream: keep the objects alive until every receiver is done
            _call(self._board.wait_drained.remote(self._spec.group, timeout), timeout, "waiting for receivers to finish")

    def close(self) -> None:
        self._board = None


class RayReceiverChannel:
    device = torch.device("cpu")

    def __init__(self, spec: TransportSpec) -> None:
        self._spec = spec
        self._board = _find_board(spec)
        self._next = 0
        self._current: tuple[int, list[Any]] | None = None

    def recv_header(self) -> bytes:
        timeout, index = self._spec.timeout_s, self._next
        header, refs = _call(self._board.take.remote(self._spec.group, index, timeout), timeout, f"waiting for bucket {index}")
        if header is None:
            raise TransportError(f"the sync was aborted: {refs}")
        self._current = (index, refs)
        self._next += 1
        return header

    def recv_payload(self, index: int, nbytes: int) -> torch.Tensor:
        assert self._current is not None and self._current[0] == index
        refs = self._current[1]
        array = _call(refs[0], self._spec.timeout_s, f"fetching bucket {index}")
        with warnings.catch_warnings():  # zero-copy view of the read-only object store buffer
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(array)
        if flat.numel() != nbytes:
            raise TransportError(f"bucket {index} holds {flat.numel()} bytes, its header says {nbytes}")
        return flat

    def discard_payload(self, index: int, nbytes: int) -> None:
        pass  # nothing to consume: the object simply is not fetched

    def release(self, index: int) -> None:
        self._board.release.remote(self._spec.group, index, self._spec.rank)

    def acknowledge_end(self) -> None:
        assert self._current is not None
        index = self._current[0]
        _call(self._board.release.remote(self._spec.group, index, self._spec.rank), self._spec.timeout_s, "acknowledging the end")

    def close(self) -> None:
        self._board = None
        self._current = None


class _RayBackend:
    name = "ray"

    def open_session(self, config: TransportConfig) -> _RaySession:
        return _RaySession(config)

    def sender_channel(self, spec: TransportSpec) -> RaySenderChannel:
        return RaySenderChannel(spec)

    def receiver_channel(self, spec: TransportSpec) -> RayReceiverChannel:
        return RayReceiverChannel(spec)


@register_backend("ray")
def ray_backend() -> _RayBackend:
    return _RayBackend()
