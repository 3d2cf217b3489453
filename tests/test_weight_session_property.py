"""Property test of the weight-update session on real Ray replicas (issue 16).

Seeded random sequences of operations — begin (a new version, or a stale one), bucket deliveries
through the manager (complete, partial, the rest of a partial one, outside any update), commit,
abort, publisher syncs over gloo (complete, or with a trainer export that raises part-way),
and worker kills with restarts — run against one `ReplicaManager` of two replicas (one worker
each) while scoring traffic flows continuously. Refusals are expected; the invariants are:

1. Every result is tagged with a version that was committed (the manager's commit returned, or a
   publisher sync reported ok), and its log-probs and entropies equal a reference computed in
   this process on exactly that version's weights, one request alone, within
   `CROSS_PROCESS_ATOL` = 1e-5 absolute (fp32; the workers run 1 torch thread and this process 2,
   see tests/_tolerances.py). The versions' references differ from each other, and from a
   half-and-half mix of two versions, by more than 100x that, so a result computed on another
   version's weights, or on a mix, cannot pass.
2. Every request ends, within a bound, with a result or a typed `ModelEngineError` with a reason.
3. The server's refusals hold: a second begin while one is open, a stale version, a load with no
   update open, a commit with names never delivered, a sync whose sender failed.
4. After the sequence, one complete update succeeds and every replica serves at that version.

Each operation draws from a generator seeded by (seed, operation index); which mix it draws from
depends on whether an update is open, and timing (kills, deadlines) shapes what follows, so a
sequence is reproducible in its choices, not in every interleaving. The default seeds were picked
from a sweep to cover, between them, kills while idle / during a bucket delivery / during a gloo
stream, inline and background restarts (weights copied from a peer), partial deliveries refused at
commit and completed by a later one, stale and retried versions, and failing senders. Explore more
with WEIGHT_SESSION_SEEDS=1,2,...,40 (and WEIGHT_SESSION_KILLS=2 for both replicas dead at once).
Breaking the server on purpose is caught: commit on any delivery (the driver's check), an abort
that keeps serving partly overwritten weights, or a restart relabelled without copying (the
log-prob check names the version the result actually came from). The driver and its settings:
`tests/weight_session_driver.py`.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch

from clients.publisher import WeightPublisher
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import ModelEngineError
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from replica.manager import ReplicaManager
from tests._tolerances import CROSS_PROCESS_ATOL, assert_distinguishable, max_abs_diff
from tests.helpers import random_requests
from tests.test_replica import assert_nothing_left, replica_config
from tests.weight_session_driver import (
    ANSWER_BOUND_S, BATCH_TIMEOUT_S, MIN_RESPONSE, OPERATION_BOUND_S, OPERATIONS, REQUEST_TIMEOUT_S, SEEDS, TRANSPORT,
    UPDATE_TIMEOUT_S, VOCAB, Driver, Served,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

@pytest.fixture(scope="module")
def base_weights(tiny_model) -> dict[str, torch.Tensor]:
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model)))
    return {name: tensor.detach().clone() for name, tensor in engine.export_weights()}


@pytest.fixture(scope="module")
def pool() -> list[LogProbRequest]:
    """Fixed requests (their references are cached per version), each with >= 4 response tokens."""
    candidates = random_requests(60, VOCAB, seed=77, min_len=12, max_len=48)
    chosen = [r for r in candidates if len(r.input_ids) - r.response_start >= MIN_RESPONSE][:12]
    assert len(chosen) == 12
    return chosen


class References:
    """Log-probs and entropies of one request alone on given weights, in this process."""

    def __init__(self, model_path: str) -> None:
        self.adapter = ModelEngineServerAdapter(build_engine("hf", EngineSpec(model_path=model_path)), 8192)
        self._cache: dict[tuple[Any, int], np.ndarray] = {}

    def of(self, key: Any, weights: dict[str, torch.Tensor], requests: list[LogProbRequest]) -> list[np.ndarray]:
        """One array per request: its log-probs followed by its entropies."""
        missing = [i for i in range(len(requests)) if (key, i) not in self._cache]
        if missing:
            self.adapter.engine.load_weights(weights.items())
            for index in missing:
                [out] = self.adapter.score([requests[index]])
                self._cache[(key, index)] = np.concatenate([out.log_probs, out.entropy]).astype(np.float64)
        return [self._cache[(key, i)] for i in range(len(requests))]


@pytest.fixture(scope="module")
def references(tiny_model) -> References:
    return References(str(tiny_model))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(ray_cluster, tiny_model, base_weights):
    scheduler = SchedulerConfig(
        max_tokens_per_batch=2048, max_wait_ms=2.0, request_timeout_s=REQUEST_TIMEOUT_S,
        weight_update_timeout_s=UPDATE_TIMEOUT_S,
    )
    config = replica_config(
        tiny_model, num_replicas=2, gpus_per_replica_node=1, scheduler=scheduler, auto_restart=False,
        health_check_interval_s=1.0, batch_timeout_s=BATCH_TIMEOUT_S, health_timeout_s=5.0,
        weight_bucket_mb=1,
    )
    manager = ReplicaManager(config)
    await manager.start()
    publisher = WeightPublisher(manager, TRANSPORT)
    try:
        yield Served(manager, publisher, base_weights, {0: base_weights})
    finally:
        await publisher.close()
        await manager.shutdown(drain=False, timeout_s=5.0)
        await assert_nothing_left()


# ---------------------------------------------------------------------- checks
def check_outcomes(driver: Driver, served: Served, references: References, pool: list[LogProbRequest]) -> dict[str, int]:
    problems: list[str] = []
    counts = {"results": 0, "errors": 0}
    for outcome in driver.outcomes:
        value, where = outcome.value, f"request {outcome.index} (submitted during op {outcome.during})"
        if isinstance(value, LogProbResult):
            counts["results"] += 1
            version = value.weight_version
            if version not in served.committed:
                problems.append(f"{where}: tagged version {version}, which was never committed")
                continue
            want = references.of(version, served.committed[version], pool)[outcome.index]
            got = np.concatenate([value.log_probs, value.entropy]).astype(np.float64)
            gap = max_abs_diff(got, want)
            if gap > CROSS_PROCESS_ATOL:
                closest = min(
                    ((v, max_abs_diff(got, references.of(v, w, pool)[outcome.index]))
                     for v, w in {**served.committed, **driver.attempted_versions}.items()),
                    key=lambda pair: pair[1],
                )
                problems.append(f"{where}: tagged version {version} but {gap:.3g} from its reference "
                                f"(closest: version {closest[0]} at {closest[1]:.3g})")
        elif isinstance(value, ModelEngineError):
            counts["errors"] += 1
            if not value.message:
                problems.append(f"{where}: failed with {type(value).__name__} and no reason")
        else:
            problems.append(f"{where}: {value!r} after {outcome.seconds:.1f} s (neither a result nor a typed error)")
    assert not problems, "\n".join(problems[:20]) + "\n" + driver.history()
    return counts


def check_distinguishable(versions: list[int], served: Served, references: References, pool: list[LogProbRequest]) -> None:
    """Each pair of versions (and a half-and-half mix of two) differs by > 100x the tolerance on every request."""
    refs = {v: references.of(v, served.committed[v], pool) for v in versions}
    for i, a in enumerate(versions):
        for b in versions[i + 1:]:
            assert_distinguishable(refs[a], refs[b], f"versions {a} and {b}")
    a, b = versions[0], versions[-1]
    names = list(served.base)
    mixed = {n: (served.committed[a] if k % 2 else served.committed[b])[n] for k, n in enumerate(names)}
    mixed_refs = references.of(("mix", a, b), mixed, pool)
    assert_distinguishable(refs[a], mixed_refs, f"version {a} vs mixed with {b}")
    assert_distinguishable(refs[b], mixed_refs, f"version {b} vs mixed with {a}")


async def final_update(driver: Driver, served: Served, references: References, pool: list[LogProbRequest]) -> int:
    manager = served.manager
    for replica in manager.replicas:  # a restart may have failed (its peer died during the copy)
        if not replica.alive:
            await asyncio.wait_for(manager.restart_replica(replica.index), OPERATION_BOUND_S)
    if manager.status()["updating_weights"]:
        await manager.abort_weight_update("the sequence is over")
    version = served.fresh_version()
    weights = served.weights_of(version)
    if random.Random(f"{driver.seed}/final").random() < 0.5:
        assert await asyncio.wait_for(manager.update_weights(list(weights.items()), version), OPERATION_BOUND_S) == version
    else:
        report = await asyncio.wait_for(served.publisher.update_weights(weights, version), OPERATION_BOUND_S)
        assert report.ok
    served.committed[version] = weights
    status = manager.status()
    assert status["weight_version"] == version and status["weights_incomplete"] is None, status
    assert not status["updating_weights"] and status["live_replicas"] == len(manager.replicas), status
    want = references.of(version, weights, pool)
    for replica in manager.replicas:  # each replica alone, so both are seen serving the new version
        for index in (0, 1):
            result = await asyncio.wait_for(replica.submit(pool[index], timeout_s=30), ANSWER_BOUND_S)
            assert result.weight_version == version
            got = np.concatenate([result.log_probs, result.entropy]).astype(np.float64)
            assert max_abs_diff(got, want[index]) <= CROSS_PROCESS_ATOL, f"{replica.name}: request {index}"
    return version


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_update_sequences_never_serve_unloaded_weights_and_answer_every_request(
    seed, served, references, pool
):
    driver = Driver(served, pool, seed)
    started = time.monotonic()
    await driver.run()
    counts = check_outcomes(driver, served, references, pool)
    final = await final_update(driver, served, references, pool)
    versions = sorted({driver.started_at_version, final, *(v for v in served.committed if v >= driver.started_at_version)})
    check_distinguishable(versions, served, references, pool)
    served.results += counts["results"]
    print(f"seed {seed}: {OPERATIONS} operations, {counts['results']} results, {counts['errors']} typed errors, "
          f"versions {versions}, {time.monotonic() - started:.1f} s\n" + driver.history())


async def test_the_sequences_were_served_and_left_nothing_open(served):
    """Not vacuous: results were checked (a sequence may serve none, e.g. after a failed sync
    left the weights incomplete until its final update). Nothing is left open or locked."""
    assert served.results > 0
    manager = served.manager
    status = manager.status()
    assert not status["updating_weights"] and status["weights_incomplete"] is None
    before = status["weight_version"]
    # no lock left held: a begin goes through at once; aborted with nothing delivered, the old weights serve on
    assert await asyncio.wait_for(manager.begin_weight_update(served.fresh_version()), 10) == len(manager.replicas)
    await manager.abort_weight_update("nothing delivered")
    status = manager.status()
    assert status["weight_version"] == before and status["weights_incomplete"] is None
