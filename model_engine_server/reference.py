"""`PolicyWithReference`: the policy service, and in reference mode the frozen reference beside it.

With a KL loss the trainer needs, besides the old log-probs, the log-probs of a frozen reference
policy. In reference mode (`model_engine_server.enable_ref_mode`) the server hosts that model on
services of its own (an in-process scheduler or a replica manager, like the policy) and this
class puts the two behind the one `LogProbService` every front end holds.

Contract:
- A request with `return_ref_log_probs` is submitted to the policy and to the reference at the
  same time, not one after the other; its result is the policy's result (log-probs, entropy,
  mismatch, the POLICY's weight version) with `ref_log_probs` computed at the same positions and
  temperature, and the reference's timings under `ref_*` keys. If either side fails, the request
  is answered at once with that side's typed error (the reference's is prefixed; the policy's
  wins when both fail together) and the other half is withdrawn. Requests without the flag go
  to the policy in one call.
- Without reference mode, such a request is refused (400) naming `enable_ref_mode`; the
  scheduler underneath never sees the flag.
- Weights: updates (`update_weights`, the begin/load/commit protocol a publisher drives,
  `update_weights_from_disk`) go to the policy only; the reference never changes.
- `pause_serving` / `resume_serving` apply to both: an operator's pause means the server
  computes nothing. Weight syncs do not pause the reference (they drain the policy only), so a
  ref request waits only for its policy half during a sync.
- Status: the policy's status at the top level (weight version, queue, replicas), the
  reference's under `reference`, and `ref_mode`.
It implements `LogProbService` explicitly, so it is what every front end holds (`front()` wraps a
bare service); a service without a reference is the same composite with `reference=None`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import InvalidRequest, ModelEngineError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, Outcome
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService
from model_engine_server.weights_from_disk import update_weights_from_disk

if TYPE_CHECKING:
    from checkpoint_transport.spec import ReceiveReport, TransportSpec

REF_MODE_SETTING = "model_engine_server.enable_ref_mode"
REF_MODE_OFF = f"this server hosts no reference policy; set {REF_MODE_SETTING}=true to serve ref log-probs"



def policy_part(request: LogProbRequest) -> LogProbRequest:
    """What the policy scores: the request without the reference flag."""
    return request.model_copy(update={"return_ref_log_probs": False}) if request.return_ref_log_probs else request


def reference_part(request: LogProbRequest) -> LogProbRequest:
    """What the reference scores: the same ids, positions and temperature, log-probs only (no
    entropy, no mismatch, no version wait: those belong to the policy)."""
    return request.model_copy(update={
        "return_ref_log_probs": False, "return_entropy": False, "rollout_log_probs": None, "min_weight_version": None,
        "top_k": None,
    })


def merge(policy: Outcome, reference: Outcome) -> Outcome:
    """The policy's result with the reference's log-probs; either side's error fails the request."""
    if isinstance(policy, ModelEngineError):
        return policy
    if isinstance(reference, ModelEngineError):
        return from_reference(reference)
    timings = {**policy.timings, **{f"ref_{key}": value for key, value in reference.timings.items()}}
    return dataclasses.replace(policy, ref_log_probs=reference.log_probs, timings=timings)


async def _score_all(service: LogProbService, requests: list[LogProbRequest], timeout_s: float | None) -> list[Outcome]:
    if not requests:
        return []
    outcomes = await service.score(requests, timeout_s)
    if len(outcomes) != len(requests):  # a broken service must not shift answers between requests
        return [WorkerFailed(f"a service answered {len(outcomes)} outcomes for {len(requests)} requests")] * len(requests)
    return list(outcomes)


async def _score_on(service: LogProbService, request: LogProbRequest, timeout_s: float | None) -> Outcome:
    return (await _score_all(service, [request], timeout_s))[0]


def from_reference(error: ModelEngineError) -> ModelEngineError:
    """The same typed error, its message saying the reference half failed."""
    tagged = copy.copy(error)
    tagged.message = f"reference policy: {error.message}"
    tagged.args = (tagged.message,)
    return tagged


class PolicyWithReference:
    """One `LogProbService` over the policy service and an optional reference service."""

    def __init__(
        self, policy: LogProbService, reference: LogProbService | None = None, observer: SchedulerObserver | None = None
    ) -> None:
        self.policy = policy
        self.reference = reference
        self.observer = observer or SchedulerObserver()
        self._disk_update = asyncio.Lock()

    @property
    def ref_mode(self) -> bool:
        return self.reference is not None

    def _services(self) -> list[LogProbService]:
        return [self.policy] if self.reference is None else [self.policy, self.reference]

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> "PolicyWithReference":
        """Start both services at once (replicas reserve devices, load engines); if one cannot
        start, shut the other down and raise its error."""
        outcomes = await asyncio.gather(*(service.start() for service in self._services()), return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            await asyncio.gather(*(s.shutdown(drain=False, timeout_s=5.0) for s in self._services()), return_exceptions=True)
            raise errors[0]
        return self

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        await asyncio.gather(*(s.shutdown(drain, timeout_s) for s in self._services()))

    # ---------------------------------------------------------------- scoring
    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[Outcome]:
        """One entry per request, in order. A request's reference half runs beside its policy
        half; when either half fails, the other is withdrawn and the request answered at once
        with that half's error (an overloaded or refused half is not held for the other)."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        parsed: list[tuple[int, LogProbRequest]] = []
        for index, item in enumerate(requests):
            try:
                request = LogProbRequest.parse(item)
                if request.return_ref_log_probs and self.reference is None:
                    raise InvalidRequest(REF_MODE_OFF, "return_ref_log_probs")
            except InvalidRequest as error:
                outcomes[index] = error
                self.observer.request_rejected(error)
                continue
            parsed.append((index, request))
        plain = [(index, request) for index, request in parsed if not request.return_ref_log_probs]
        with_ref = [(index, request) for index, request in parsed if request.return_ref_log_probs]
        plain_answers, ref_answers = await asyncio.gather(
            _score_all(self.policy, [request for _, request in plain], timeout_s),
            asyncio.gather(*(self._score_one(request, timeout_s) for _, request in with_ref)),
        )
        for (index, _), outcome in [*zip(plain, plain_answers), *zip(with_ref, ref_answers)]:
            outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    async def _score_one(self, request: LogProbRequest, timeout_s: float | None) -> Outcome:
        """One request with both halves; the reference exists (`score` refused it otherwise)."""
        assert self.reference is not None
        policy = asyncio.ensure_future(_score_on(self.policy, policy_part(request), timeout_s))
        reference = asyncio.ensure_future(_score_on(self.reference, reference_part(request), timeout_s))
        try:
            done, _ = await asyncio.wait({policy, reference}, return_when=asyncio.FIRST_COMPLETED)
            if policy in done and isinstance(policy.result(), ModelEngineError):
                return policy.result()
            if reference in done and isinstance(reference.result(), ModelEngineError):
                return from_reference(reference.result())  # type: ignore[arg-type]
            return merge(await policy, await reference)
        finally:
            for half in (policy, reference):
                half.cancel()  # a no-op on a finished half; an unfinished one leaves its queue

    # ---------------------------------------------------------------- pause / resume: both
    async def pause_serving(self) -> None:
        await asyncio.gather(*(s.pause_serving() for s in self._services()))

    async def resume_serving(self) -> None:
        await asyncio.gather(*(s.resume_serving() for s in self._services()))

    # ---------------------------------------------------------------- weights: the policy only
    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        return await self.policy.update_weights(named_tensors, version)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None, roots: Sequence[str] | None = None) -> int:
        """Serve an HF checkpoint folder as the policy's next version (see `weights_from_disk`);
        one at a time, so two calls never race for the same default version. `roots`: the
        folders it may be read from (None: anywhere)."""
        async with self._disk_update:
            return await update_weights_from_disk(self.policy, model_path, version, roots=roots)

    async def weight_layout(self) -> tuple[ModelInfo, dict[str, WeightSpec]]:
        return await self.policy.weight_layout()

    async def begin_weight_update(self, version: int) -> int:
        return await self.policy.begin_weight_update(version)

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> list[str]:
        return await self.policy.load_weights(named_tensors, version)

    async def receive_weights(self, spec: "TransportSpec", version: int) -> list["ReceiveReport"]:
        return await self.policy.receive_weights(spec, version)

    async def commit_weight_update(self, version: int) -> None:
        await self.policy.commit_weight_update(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.policy.abort_weight_update(reason, version)

    # ---------------------------------------------------------------- status
    async def get_status(self) -> dict[str, Any]:
        """The policy's status, plus the reference's under `reference` when hosted; `accepting`
        and `weights_incomplete` cover both, so `/health` reports either side's trouble."""
        status = dict(await self.policy.get_status())
        status["ref_mode"] = self.reference is not None
        if self.reference is None:
            return status
        reference = dict(await self.reference.get_status())
        status["reference"] = reference
        status["accepting"] = bool(status.get("accepting", True)) and bool(reference.get("accepting", True))
        if reference.get("weights_incomplete") and not status.get("weights_incomplete"):
            status["weights_incomplete"] = f"reference policy: {reference['weights_incomplete']}"
        return status


def front(service: LogProbService) -> PolicyWithReference:
    """The composite every front end holds: `service` itself, or a policy-only composite over it."""
    return service if isinstance(service, PolicyWithReference) else PolicyWithReference(service)
