"""The driver of `tests/test_weight_session_property.py`: one seeded random sequence of weight-update
operations against the module's `ReplicaManager`, with scoring traffic flowing the whole time, and
the record of what it committed and what every request got (the test module states the invariants
it checks)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import ray
import torch

from checkpoint_transport.spec import TransportConfig
from clients.publisher import WeightPublisher
from model_engine_server.errors import ModelEngineError, WeightSyncError
from model_engine_server.protocol import LogProbRequest
from model_engine_server.tiny_model import perturbed_weights
from replica.manager import ReplicaManager

SEEDS = tuple(int(s) for s in os.environ.get("WEIGHT_SESSION_SEEDS", "3,8,12").split(","))  # more: explore
OPERATIONS = 24  # per sequence
MAX_KILLS = int(os.environ.get("WEIGHT_SESSION_KILLS", "1"))  # per sequence: a restart costs seconds on 2 cores
UPDATE_TIMEOUT_S = 5.0  # weight_update_timeout_s: a begun update nobody finishes is aborted
REQUEST_TIMEOUT_S = 3.0  # longest a request waits in a queue (drained, incomplete weights)
BATCH_TIMEOUT_S = 60.0  # longest a batch (or a discard of partial weights) may run on a worker
ANSWER_BOUND_S = 2 * (REQUEST_TIMEOUT_S + BATCH_TIMEOUT_S) + 10  # with one retry elsewhere
OPERATION_BOUND_S = 90.0
# A receiver that dies while the others join a sync's group stalls them in gloo's rendezvous for
# timeout_s or more (measured: over 25 s at timeout_s=8 on a loaded machine). The update's deadline
# abort sends discard_partial_weights to the surviving worker, where it queues behind that blocked
# receive; past batch_timeout_s the healthy replica is marked dead. BATCH_TIMEOUT_S is kept well
# above that stall so sequences keep a live replica (it would be a liveness cost, not a
# correctness one: nothing is served from it either way).
TRANSPORT = TransportConfig(backend="gloo", bucket_bytes=64 << 10, timeout_s=8)
VOCAB = 512
SCALE = 0.05  # weight perturbation per version
MIN_RESPONSE = 4  # tokens: a gap between versions is the largest of several
# operation -> weight, while an update this driver began is open / while none is
OPEN_MIX = {"complete": 10, "partial": 12, "rest": 8, "partial_then_commit": 8, "commit": 18, "abort": 5, "begin": 5,
            "publish": 4, "publish_failing": 3, "outside": 4, "kill": 4, "settle": 3, "pause": 4}
CLOSED_MIX = {"begin": 28, "publish": 14, "publish_failing": 10, "outside": 6, "commit": 4, "abort": 3,
              "kill": 4, "settle": 4, "pause": 6}


# ---------------------------------------------------------------------- shared state
@dataclass
class Served:
    """The module's manager and what it has committed, across sequences."""

    manager: ReplicaManager
    publisher: WeightPublisher
    base: dict[str, torch.Tensor]
    committed: dict[int, dict[str, torch.Tensor]]  # version -> the weights it was committed with
    last_version: int = 0  # the highest version number any test has used
    results: int = 0  # results checked, over every sequence

    def fresh_version(self) -> int:
        self.last_version += 1
        return self.last_version

    def next_version(self, rng: random.Random, current: int) -> int:
        """Usually a new number; sometimes a retry of one tried before and never committed (a
        trainer retrying a failed sync: the same number, the same weights)."""
        retries = [v for v in range(current + 1, self.last_version + 1) if v not in self.committed]
        if retries and rng.random() < 0.2:
            return rng.choice(retries)
        return self.fresh_version()

    def weights_of(self, version: int) -> dict[str, torch.Tensor]:
        return perturbed_weights(self.base, seed=version, scale=SCALE)


# ---------------------------------------------------------------------- one random sequence
@dataclass
class Outcome:
    index: int  # into the pool
    value: Any  # LogProbResult | ModelEngineError | any other exception | "hang ..."
    seconds: float
    during: int  # the operation in progress when it was submitted


@dataclass
class OpenSession:
    """An update this driver began: its version, the weights it delivers, the names it tried."""

    version: int
    weights: dict[str, torch.Tensor]
    attempted: set[str] = field(default_factory=set)


class Driver:
    def __init__(self, served: Served, pool: list[LogProbRequest], seed: int) -> None:
        self.served = served
        self.manager = served.manager
        self.pool = pool
        self.seed = seed
        self.rng = random.Random(seed)
        self.traffic_rng = random.Random(seed + 1)
        self.names = list(served.base)
        self.session: OpenSession | None = None
        self.log: list[str] = []
        self.outcomes: list[Outcome] = []
        self.restarts: list[asyncio.Task[None]] = []
        self.kills = 0
        # every sequence kills a worker at least once, usually after something was committed
        self.kill_at = self.rng.randrange(OPERATIONS // 3, OPERATIONS)
        self.op = 0
        self.attempted_versions: dict[int, dict[str, torch.Tensor]] = {}  # for diagnostics
        self.started_at_version = self.manager.weight_version

    # ---------------------------------------------------------------- traffic
    async def traffic(self, stop: asyncio.Event) -> None:
        running: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            if len(running) < 4:
                task = asyncio.ensure_future(self.score_one(self.traffic_rng.randrange(len(self.pool))))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(self.traffic_rng.uniform(0.005, 0.04))
        await asyncio.gather(*running)

    async def score_one(self, index: int, via: Any = None) -> None:
        during, started = self.op, time.monotonic()
        service = via if via is not None else self.manager
        value: Any
        try:
            value = await asyncio.wait_for(service.submit(self.pool[index], timeout_s=REQUEST_TIMEOUT_S), ANSWER_BOUND_S)
        except ModelEngineError as error:
            value = error
        except TimeoutError:
            value = f"hang: no answer within {ANSWER_BOUND_S:g} s"
        except Exception as error:  # noqa: BLE001 - an untyped failure is a finding, recorded
            value = error
        self.outcomes.append(Outcome(index, value, time.monotonic() - started, during))

    # ---------------------------------------------------------------- helpers
    def updating(self) -> bool:
        return bool(self.manager.status()["updating_weights"])

    def sync_session(self) -> None:
        """The manager may have closed our update meanwhile (its deadline, a failed delivery)."""
        if self.session is not None and not self.updating():
            self.session = None

    def note(self, text: str) -> None:
        self.log.append(f"op {self.op}: {text}")

    def buckets(self, names: list[str], weights: dict[str, torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
        parts = self.rng.randint(1, min(3, len(names)))
        cuts = sorted(self.rng.sample(range(1, len(names)), parts - 1)) if parts > 1 else []
        bounds = [0, *cuts, len(names)]
        return [[(n, weights[n]) for n in names[a:b]] for a, b in zip(bounds, bounds[1:])]

    # ---------------------------------------------------------------- operations
    async def begin(self) -> None:
        current = self.manager.weight_version
        stale = self.rng.random() < 0.15
        version = self.rng.randint(0, current) if stale else self.served.next_version(self.rng, current)
        was_open = self.updating()
        started = time.monotonic()
        try:
            receivers = await self.manager.begin_weight_update(version)
        except ModelEngineError as error:
            self.note(f"begin({version}) refused: {error.message[:160]}")
            if was_open:
                assert isinstance(error, WeightSyncError) and "already in progress" in error.message, error
                assert time.monotonic() - started < 1.0, "a second begin was not refused at once"
            elif stale:
                assert isinstance(error, WeightSyncError) and "greater than the current" in error.message, error
            return
        assert not was_open, f"begin({version}) accepted while another update was open"
        assert not stale, f"begin({version}) accepted at or below the current version {current}"
        participants = [r for r in self.manager.replicas if r.alive and r.status().get("updating_weights")]
        assert receivers == sum(len(r.workers) for r in participants), "the receiver count is not the participants' workers"
        self.session = OpenSession(version, self.served.weights_of(version))
        self.attempted_versions[version] = self.session.weights
        self.note(f"begin({version}) -> {receivers} receivers")

    async def deliver(self, which: str) -> None:
        self.sync_session()
        session = self.session
        if session is None or which == "outside":  # no update open, or the wrong version
            version = session.version + 1 if session is not None else self.served.last_version + 1000
            decoy = perturbed_weights(self.served.base, seed=10_000 + self.op, scale=SCALE)
            names = self.rng.sample(self.names, self.rng.randint(1, len(self.names)))
            was_open = self.updating()
            with pytest.raises(WeightSyncError) as refused:
                await self.manager.load_weights([(n, decoy[n]) for n in names], version)
            self.note(f"load of {len(names)} decoy tensors as v{version} (open: {was_open}) refused: "
                      f"{refused.value.message[:120]}")
            return
        if which == "rest" and not set(self.names) - session.attempted:
            which = "partial"  # nothing left to complete: overwrite some again
        if which == "complete":
            names = list(self.names)
            self.rng.shuffle(names)
        elif which == "rest":
            names = sorted(set(self.names) - session.attempted)
        else:
            names = self.rng.sample(self.names, self.rng.randint(1, len(self.names) - 1))
        loaded = 0
        for bucket in self.buckets(names, session.weights):
            session.attempted.update(n for n, _ in bucket)
            try:
                loaded += len(await self.manager.load_weights(bucket, session.version))
            except ModelEngineError as error:
                self.note(f"deliver {which} v{session.version}: a bucket failed: {error.message[:160]}")
                self.sync_session()
                return
        self.note(f"deliver {which} v{session.version}: {len(names)} tensors, {loaded} loaded")

    async def commit(self) -> None:
        self.sync_session()
        session = self.session
        wrong = session is not None and self.rng.random() < 0.1
        version = session.version + (1 if wrong else 0) if session is not None else self.manager.weight_version + 1
        try:
            await self.manager.commit_weight_update(version)
        except ModelEngineError as error:
            self.note(f"commit({version}) refused: {error.message[:200]}")
            if wrong:  # refused before anything: our update stays open
                assert self.updating(), "a commit naming the wrong version closed the open update"
            self.sync_session()
            return
        assert session is not None and not wrong, f"commit({version}) accepted with no update of that version open"
        missing = set(self.names) - session.attempted
        assert not missing, f"commit({version}) accepted though {sorted(missing)} were never delivered"
        self.served.committed[version] = session.weights
        self.session = None
        self.note(f"commit({version}) ok")

    async def abort(self) -> None:
        await self.manager.abort_weight_update(f"property test {self.seed}: abort at op {self.op}")
        assert not self.updating()
        self.note(f"abort (open: {self.session.version if self.session else None})")
        self.session = None

    async def publish(self, failing: bool) -> None:
        version = self.served.next_version(self.rng, self.manager.weight_version)
        weights = self.served.weights_of(version)
        self.attempted_versions[version] = weights
        items = list(weights.items())
        cut = self.rng.randint(0, len(items) - 1)

        def failing_export():
            yield from items[:cut]
            raise RuntimeError(f"the trainer's export failed after {cut} tensors")

        was_open, started = self.updating(), time.monotonic()
        try:
            report = await self.served.publisher.update_weights(failing_export() if failing else weights, version)
        except ModelEngineError as error:  # refused at begin (WeightSyncError, no live replica), or failed
            self.note(f"publish{' failing' if failing else ''}({version}) failed: {error.message[:200]}")
            if was_open and "already in progress" in error.message:  # refused at begin: left alone
                assert self.updating(), "a refused sync closed the update that was open"
            elif was_open:  # refused otherwise only if the open update ended meanwhile (its deadline)
                assert not self.updating(), error
            self.sync_session()
            return
        assert not failing, f"a sync whose export raised after {cut} of {len(items)} tensors committed version {version}"
        assert not was_open and report.ok
        self.served.committed[version] = weights
        self.note(f"publish({version}) ok: {report.send.buckets} buckets to {len(report.receives)} workers "
                  f"in {time.monotonic() - started:.2f} s")

    async def kill(self) -> None:
        """Kill one live replica's worker — idle, in the middle of a bucket delivery, or while a
        publisher streams over gloo — then (usually) a health check, and restart it in the
        background (its weight copy waits for any open update)."""
        entries = self.manager.status()["replicas"]
        candidates = [r for r, e in zip(self.manager.replicas, entries) if e["alive"] and not e["joining"]]
        if self.kills >= MAX_KILLS or not candidates:
            self.note("kill skipped")
            return
        self.kills += 1
        replica = self.rng.choice(candidates)
        self.sync_session()
        mode = self.rng.choice(["idle", "during a delivery" if self.session is not None else "during a publish"])
        concurrent = None
        if mode == "during a delivery":
            concurrent = asyncio.ensure_future(self.deliver("complete"))
            await asyncio.sleep(self.rng.uniform(0.0, 0.02))
        elif mode == "during a publish":
            concurrent = asyncio.ensure_future(self.publish(failing=False))
            replicas = self.manager.replicas
            while not concurrent.done() and not any(r.alive and r.status().get("updating_weights") for r in replicas):
                await asyncio.sleep(0.002)  # begun: the stream starts about now
            await asyncio.sleep(self.rng.uniform(0.0, 0.05))
        ray.kill(replica.workers[0], no_restart=True)
        self.note(f"killed {replica.name}'s worker {mode}")
        if concurrent is not None:
            await concurrent
        if self.rng.random() < 0.7:
            await self.manager.health()
        restart = asyncio.ensure_future(self.manager.restart_replica(replica.index))
        if self.rng.random() < 0.4:  # waits for an open update to end (commit, abort or its deadline)
            started = time.monotonic()
            await asyncio.gather(restart, return_exceptions=True)
            self.note(f"restarted {replica.name} in {time.monotonic() - started:.1f} s: "
                      f"{restart.exception() or 'ok'}")
            await self.probe_replicas()
        else:
            self.note(f"restarting {replica.name} in the background")
            self.restarts.append(restart)

    async def settle_restarts(self) -> None:
        outcomes = await asyncio.gather(*self.restarts, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self.note(f"a restart failed: {type(outcome).__name__}: {outcome}")
        self.restarts = [t for t in self.restarts if not t.done()]
        await self.probe_replicas()

    async def probe_replicas(self) -> None:
        """Score on each serving replica directly (a restarted one serves the weights it copied
        from a peer); checked with the traffic's outcomes."""
        entries = self.manager.status()["replicas"]
        for replica, entry in zip(self.manager.replicas, entries):
            serving = entry["alive"] and not entry["joining"]
            if serving and not entry.get("updating_weights") and not entry.get("weights_incomplete"):
                for index in (0, 1):
                    await self.score_one(index, replica)

    async def step(self) -> None:
        # each operation draws from its own generator, so how many numbers one operation drew
        # (which can depend on timing) does not shift the choices of the next
        self.rng = random.Random(f"{self.seed}/{self.op}")
        if self.op == self.kill_at and self.kills == 0:
            await self.kill()
            return
        # the mix depends on whether our update is open, so that sessions get used (like the
        # rules of a stateful property test); every operation stays possible in either state
        self.sync_session()
        mix = OPEN_MIX if self.session is not None else CLOSED_MIX
        choice = self.rng.choices(list(mix), weights=list(mix.values()))[0]
        if choice == "begin":
            await self.begin()
        elif choice in ("complete", "partial", "rest", "outside"):
            await self.deliver(choice)
        elif choice == "commit":
            await self.commit()
        elif choice == "partial_then_commit":  # what the server must refuse, unless earlier ones filled the gaps
            await self.deliver("partial")
            await self.commit()
        elif choice == "abort":
            await self.abort()
        elif choice in ("publish", "publish_failing"):
            await self.publish(choice == "publish_failing")
        elif choice == "kill":
            await self.kill()
        elif choice == "settle":
            await self.settle_restarts()
            self.note("restarts settled")
        else:
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))
            self.note("pause")

    async def run(self) -> None:
        stop = asyncio.Event()
        traffic = asyncio.ensure_future(self.traffic(stop))
        try:
            for self.op in range(OPERATIONS):
                try:
                    await asyncio.wait_for(self.step(), OPERATION_BOUND_S)
                except TimeoutError:
                    raise AssertionError(f"operation {self.op} hung\n" + self.history()) from None
                except Exception as error:
                    raise AssertionError(f"operation {self.op} raised {error!r}\n" + self.history()) from error
                await asyncio.sleep(self.rng.uniform(0.0, 0.05))
            self.op = OPERATIONS
            await asyncio.wait_for(self.settle_restarts(), OPERATION_BOUND_S)
        finally:
            stop.set()
            await asyncio.wait_for(traffic, ANSWER_BOUND_S + 5)

    def history(self) -> str:
        return f"seed {self.seed}, operations:\n  " + "\n  ".join(self.log)
