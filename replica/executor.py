"""`RayWorkerExecutor`: the scheduler's `Executor` over one replica's Ray workers.

The unchanged `ModelEngineServer` schedules onto it. One batch is split by tokens across the
replica's data-parallel groups; every rank of a group receives the same share (one object in
Ray's store, fetched by each) and the rank that `returns_results` answers for the group.

Failure contract: a worker that dies, or a batch that outlives `batch_timeout_s`, fails the
whole batch with `WorkerFailed` naming the rank, at once (the other ranks are not waited for:
they may be stuck in a collective with the dead one), and marks the executor failed, after
which every call fails fast with the same reason; calls already waiting on the workers fail
with it at once too (a health check that finds a rank silent does not leave its batch waiting
for `batch_timeout_s`). A data-parallel group whose engine fails every request of its share of
`max_failed_batches_in_a_row` batches in a row, and then a two-token probe too (a sticky device
error, not requests it cannot score), marks the executor failed the same way, so the replica leaves routing and is
restarted instead of failing all traffic while it answers pings.
The replica reads `failure` to know it is dead; it never hangs a request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from checkpoint_transport.bucket import group_into_host_buckets
from checkpoint_transport.spec import ReceiveReport, TransportSpec
from model_engine_server.adapter import EngineOutcome
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import ModelEngineError, ServerShuttingDown, WeightSyncError, WorkerFailed
from model_engine_server.packing import prompt_group_runs
from model_engine_server.protocol import LogProbRequest
from replica.worker import WorkerInfo

logger = logging.getLogger(__name__)


def split_units(units: Sequence[Sequence[int]], costs: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` shares of the units' indices with costs as even as greedy allows (largest first,
    each to the lightest share); a share keeps its indices in their original order."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for unit in sorted(range(len(units)), key=lambda u: -costs[u]):
        lightest = min(range(parts), key=loads.__getitem__)
        shares[lightest].extend(units[unit])
        loads[lightest] += costs[unit]
    return [sorted(share) for share in shares]


def split_by_tokens(token_counts: Sequence[int], parts: int) -> list[list[int]]:
    """One request per unit, weighed by its tokens."""
    return split_units([[index] for index in range(len(token_counts))], token_counts, parts)


def split_for_data_parallel(requests: Sequence[LogProbRequest], parts: int, shares_prompts: bool) -> list[list[int]]:
    """A batch's shares for the data-parallel ranks. Where the engine shares prompts, a GRPO
    group stays on one rank (which then runs its prompt once), weighed at that shared cost; a
    group above a fair share of the whole tokens (an upper bound on the shared share) is cut,
    and with fewer groups than ranks requests are split one by one, so no rank idles."""
    counts = [r.num_tokens for r in requests]
    if not shares_prompts or parts == 1:
        return split_by_tokens(counts, parts)
    fair = max(1, -(-sum(counts) // parts))
    runs, costs = prompt_group_runs([r.input_ids for r in requests], [r.response_start for r in requests], fair)
    return split_by_tokens(counts, parts) if len(runs) < parts else split_units(runs, costs, parts)


PROBE = LogProbRequest(request_id="engine-probe", input_ids=[0, 0], response_start=1, temperature=1.0)


def participant_name(rank: int) -> str:
    return f"rank-{rank}"


async def receive_on_workers(workers: Sequence[Any], spec: TransportSpec, version: int, first_rank: int) -> list[ReceiveReport]:
    """Worker actors (`receive_weights(spec: dict, version) -> dict`) receive one stream in
    parallel as ranks `first_rank..`; one report per worker, a dead or silent one reported failed."""
    calls = [
        asyncio.ensure_future(_await(worker.receive_weights.remote(spec.for_rank(rank).model_dump(), version)))
        for rank, worker in enumerate(workers, start=first_rank)
    ]
    # Past the receivers' own no-progress bound a silent worker (stuck in a collective of a
    # replica that died) is reported as failed instead of holding the sync forever.
    deadline_s = spec.timeout_s * 4 + 60
    _, stragglers = await asyncio.wait(calls, timeout=deadline_s) if calls else (set(), set())
    for call in stragglers:
        call.cancel()
    reports = []
    for rank, call in enumerate(calls, start=first_rank):
        outcome: Any = TimeoutError(f"no report within {deadline_s:g} s") if call in stragglers else (call.exception() or call.result())
        if isinstance(outcome, BaseException):  # the worker died, its method raised, or it never answered
            reports.append(ReceiveReport(rank=rank, version=version, error=f"worker failed: {type(outcome).__name__}: {outcome}"))
        else:
            reports.append(ReceiveReport.from_dict(outcome))
    return reports


def unwrap_task_error(error: BaseException) -> BaseException:
    """The exception a worker method raised, without Ray's wrapper."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        return error.cause
    return error


class RayWorkerExecutor:
    """Runs each batch on a replica's workers; built by `ModelEngineReplica` after start-up."""

    def __init__(
        self,
        name: str,
        workers: Sequence[Any],
        infos: Sequence[WorkerInfo],
        model_info: ModelInfo,
        weight_specs: dict[str, WeightSpec] | WeightSyncError,
        batch_timeout_s: float = 600.0,
        weight_bucket_bytes: int = 512 << 20,
        on_failure: Callable[[str], None] | None = None,
        max_failed_batches_in_a_row: int = 3,
    ) -> None:
        """`weight_specs`: the engine's layout, or why it takes no weight syncs (every begin is
        then refused with that reason, and scoring goes on)."""
        self.name = name
        self.workers = list(workers)
        self.infos = list(infos)
        self._model_info = model_info
        self._weight_specs = weight_specs
        self.batch_timeout_s = batch_timeout_s
        self.weight_bucket_bytes = weight_bucket_bytes
        self.on_failure = on_failure
        self.failure: str | None = None
        self.closed = False
        self.groups = self._data_parallel_groups()
        self.max_failed_batches_in_a_row = max_failed_batches_in_a_row
        self._failed_batches_in_a_row = [0] * len(self.groups)  # per data-parallel group
        self._waiting: set[asyncio.Task[Any]] = set()  # rank calls in flight: a failure cancels them

    def _data_parallel_groups(self) -> list[list[int]]:
        """Ranks of each data-parallel group, indexed by data-parallel rank; each group must
        have exactly one rank that returns results."""
        size = max(info.data_parallel_rank for info in self.infos) + 1
        groups: list[list[int]] = [[] for _ in range(size)]
        for info in self.infos:
            groups[info.data_parallel_rank].append(info.rank)
        for dp_rank, ranks in enumerate(groups):
            returning = [r for r in ranks if self.infos[r].returns_results]
            if len(returning) != 1:
                raise RuntimeError(
                    f"{self.name}: data-parallel group {dp_rank} (ranks {ranks}) has {len(returning)} ranks "
                    "that return results; exactly one must"
                )
        return groups

    def _returning_rank(self, group: list[int]) -> int:
        return next(r for r in group if self.infos[r].returns_results)

    # ------------------------------------------------------------------ Executor protocol
    def model_info(self) -> ModelInfo:
        return self._model_info

    async def weight_specs(self) -> dict[str, WeightSpec]:
        if isinstance(self._weight_specs, WeightSyncError):
            raise self._weight_specs
        return dict(self._weight_specs)

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise WorkerFailed(self.failure)
        if self.closed:
            raise ServerShuttingDown(f"{self.name} is shut down")

    def mark_failed(self, reason: str) -> None:
        """Remember the first failure; later calls fail fast with it."""
        if self.failure is None:
            self.failure = reason
            logger.warning("%s", reason)
            for task in list(self._waiting):
                task.cancel()
            if self.on_failure is not None:
                self.on_failure(reason)

    async def _call_ranks(self, calls: dict[int, "ray.ObjectRef"], what: str, timeout_s: float) -> dict[int, Any]:
        """Await one call per rank; the first death, the timeout or the executor's failure
        (`mark_failed`, e.g. by a health check) fails all of them at once."""
        tasks = {asyncio.ensure_future(_await(ref)): rank for rank, ref in calls.items()}
        self._waiting.update(tasks)
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self._waiting.difference_update(tasks)
            for task in tasks:
                task.cancel()  # no-op on finished ones; a cancelled caller leaves nothing waiting
        if any(task.cancelled() for task in done):  # `mark_failed` cancelled them
            raise WorkerFailed(self.failure or f"{self.name}: {what} was cancelled")
        results: dict[int, Any] = {}
        for task in done:
            rank = tasks[task]
            error = task.exception()
            if error is None:
                results[rank] = task.result()
            elif isinstance(error, RayActorError):
                self.mark_failed(f"{self.name}: worker rank {rank} died during {what}: {type(error).__name__}")
                raise WorkerFailed(self.failure or "worker died")
            else:
                cause = unwrap_task_error(error)
                if len(self.infos) > 1 and len(self.groups) < len(self.infos):
                    # model-parallel peers may be stuck in a collective with the failed rank
                    self.mark_failed(f"{self.name}: rank {rank} raised during {what}: {cause!r}")
                raise cause if isinstance(cause, ModelEngineError) else WorkerFailed(
                    f"{self.name}: rank {rank} raised during {what}: {type(cause).__name__}: {cause}"
                ) from None
        if pending:
            slow = sorted(tasks[t] for t in pending)
            self.mark_failed(f"{self.name}: ranks {slow} did not finish {what} within {timeout_s:g} s")
            raise WorkerFailed(self.failure or "timeout")
        return results

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[EngineOutcome]:
        shares = split_for_data_parallel(requests, len(self.groups), self._model_info.shares_prompts)
        outcomes = await self._execute(requests, shares)
        await self._count_failed_shares(outcomes, shares)
        return outcomes

    async def _execute(self, requests: Sequence[LogProbRequest], shares: Sequence[Sequence[int]]) -> list[EngineOutcome]:
        """Run share g of `requests` (indices) on data-parallel group g; an empty share skips it."""
        self._check_usable()
        calls: dict[int, ray.ObjectRef] = {}
        for group, share in zip(self.groups, shares):
            if not share:
                continue
            share_ref = ray.put([requests[i] for i in share])
            for rank in group:
                calls[rank] = self.workers[rank].score.remote(share_ref)
        results = await self._call_ranks(calls, f"a batch of {len(requests)} requests", self.batch_timeout_s)
        outcomes: list[EngineOutcome | None] = [None] * len(requests)
        for group, share in zip(self.groups, shares):
            if not share:
                continue
            group_outcomes = results[self._returning_rank(group)]
            if group_outcomes is None or len(group_outcomes) != len(share):
                raise WorkerFailed(f"{self.name}: data-parallel group {group} returned no outcome per request")
            for index, outcome in zip(share, group_outcomes):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    async def _count_failed_shares(self, outcomes: Sequence[EngineOutcome], shares: Sequence[Sequence[int]]) -> None:
        """A data-parallel group whose every request of a batch failed in its engine counts
        towards a sticky failure (one broken device of several fails only its group's share);
        any request it answers resets its count. At the bound a probe decides: a request of two
        tokens any working engine scores, sent to that group alone (a request it cannot score,
        resent, is not the engine's fault, and must not take the replica down)."""
        for group, share in enumerate(shares):
            if not share:
                continue
            if not all(isinstance(outcomes[i], WorkerFailed) for i in share):
                self._failed_batches_in_a_row[group] = 0
                continue
            self._failed_batches_in_a_row[group] += 1
            if self._failed_batches_in_a_row[group] >= self.max_failed_batches_in_a_row:
                await self._probe(group, last=outcomes[share[0]])

    async def _probe(self, group: int, last: EngineOutcome) -> None:
        probe_shares = [[0] if each == group else [] for each in range(len(self.groups))]
        try:
            (answer,) = await self._execute([PROBE], probe_shares)
        except ModelEngineError as error:
            answer = error
        if isinstance(answer, ModelEngineError):
            self.mark_failed(f"{self.name}: the engine of data-parallel group {group} failed every request of "
                             f"{self._failed_batches_in_a_row[group]} batches in a row, and a two-token probe "
                             f"({answer}; last: {last})")
        else:
            self._failed_batches_in_a_row[group] = 0

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Send tensors in buckets, each put once in Ray's store and loaded by every worker;
        a name counts as loaded only when every worker loaded it."""
        loaded: list[str] = []
        for bucket in group_into_host_buckets(named_tensors, self.weight_bucket_bytes):
            loaded += await self.load_weights_ref(ray.put(bucket))
        return loaded

    async def load_weights_ref(self, bucket_ref: "ray.ObjectRef") -> list[str]:
        """Load one bucket already in Ray's store (a manager puts it once for all replicas)."""
        self._check_usable()
        calls = {rank: worker.load_weights.remote(bucket_ref) for rank, worker in enumerate(self.workers)}
        try:
            results = await self._call_ranks(calls, "a weight load", self.batch_timeout_s)
        except WorkerFailed:
            raise
        except ModelEngineError as error:
            raise WeightSyncError(error.message) from None
        names = set(results[0])
        for rank_names in results.values():
            names &= set(rank_names)
        return [name for name in results[0] if name in names]

    def participants(self) -> list[str]:
        """One per worker, in rank order (a transport's receive rank r + 1 is worker r)."""
        return [participant_name(rank) for rank in range(len(self.workers))]

    async def receive_weights(self, spec: TransportSpec, version: int, first_rank: int) -> list[ReceiveReport]:
        self._check_usable()
        return await receive_on_workers(self.workers, spec, version, first_rank)

    async def discard_partial_weights(self) -> None:
        """Queued on every worker, not awaited: a worker runs its calls from here in order, so
        the discard happens before any later load of the next update, and a worker still busy
        in a stream that will time out is not mistaken for a dead one."""
        self._check_usable()
        for worker in self.workers:
            worker.discard_partial_weights.remote()

    async def export_weight_buckets(self) -> list["ray.ObjectRef"]:
        """References to the full HF-named weights in buckets (for a restarted peer to copy),
        exported by data-parallel group 0; the tensors move worker to worker, never through here."""
        self._check_usable()
        group = self.groups[0]
        calls = {rank: self.workers[rank].export_weight_buckets.remote(self.weight_bucket_bytes) for rank in group}
        results = await self._call_ranks(calls, "a weight export", self.batch_timeout_s)
        return list(results[self._returning_rank(group)])

    async def close(self) -> None:
        """The replica owns the workers and kills them; the executor only stops taking work."""
        self.closed = True


async def _await(ref: Awaitable[Any]) -> Any:
    return await ref
