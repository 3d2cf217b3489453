"""Prometheus metrics: scheduler events through a `SchedulerObserver`, state from `get_status()`.

In reference mode both policies are shown: the reference's metrics carry a `_ref` prefix
(`model_engine_server_ref_requests_total`, `..._ref_queue_depth`, ...), from its own observer
(`reference_observer`) and from the `reference` part of the status.

Each `ServerMetrics` owns its `CollectorRegistry`, so two apps in one process (tests, a policy
and a reference server) never collide on metric names. Counters and histograms move with
events (requests, batches); gauges (queue depth, weight version, time paused) are read from
the service's status when `/metrics` is scraped, so they are never stale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from model_engine_server.scheduler_state import SchedulerObserver

if TYPE_CHECKING:
    from model_engine_server.errors import ModelEngineError
    from model_engine_server.protocol import LogProbResult

PREFIX = "model_engine_server"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = tuple(float(2**power) for power in range(6, 21))  # 64 .. 1M tokens
MISMATCH_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class ScoringMetrics:
    """Event metrics of one scheduler (the policy's, or the reference's under a `_ref` prefix)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, what: str) -> None:
        r = registry
        self.requests = Counter(f"{prefix}_requests", f"{what} scoring requests by outcome", ["outcome", "code"], registry=r)
        self.tokens = Counter(f"{prefix}_tokens", f"tokens scored by the {what} (prompt + response)", registry=r)
        self.response_tokens = Counter(f"{prefix}_response_tokens", f"response tokens given {what} log-probs", registry=r)
        self.batch_requests = Histogram(
            f"{prefix}_batch_size_requests", f"requests per {what} batch", buckets=REQUEST_COUNT_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            f"{prefix}_batch_size_tokens", f"tokens per {what} batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            f"{prefix}_batch_compute_seconds", f"time to compute one {what} batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            f"{prefix}_request_latency_seconds", f"queue + compute time of a {what} request", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            f"{prefix}_request_queue_seconds", f"time a {what} request waited before its batch", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mismatch: Histogram | None = None


class PrometheusObserver(SchedulerObserver):
    """The scheduler's hooks, counted into one `ScoringMetrics`."""

    def __init__(self, metrics: ScoringMetrics) -> None:
        self.metrics = metrics

    def request_done(self, result: "LogProbResult", tokens: int) -> None:
        m = self.metrics
        m.requests.labels(outcome="ok", code="").inc()
        m.tokens.inc(tokens)
        m.response_tokens.inc(len(result.log_probs))
        if "total_ms" in result.timings:
            m.request_seconds.observe(result.timings["total_ms"] / 1000)
        if "queue_ms" in result.timings:
            m.queue_seconds.observe(result.timings["queue_ms"] / 1000)
        if result.mismatch is not None and m.mismatch is not None:
            m.mismatch.observe(result.mismatch.mean_abs_diff)

    def request_failed(self, error: "ModelEngineError") -> None:
        self.metrics.requests.labels(outcome="failed", code=error.code).inc()

    def request_rejected(self, error: "ModelEngineError") -> None:
        self.metrics.requests.labels(outcome="rejected", code=error.code).inc()

    def request_lost(self, error: "ModelEngineError") -> None:
        self.metrics.requests.labels(outcome="lost", code=error.code).inc()

    def batch_done(self, num_requests: int, num_tokens: int, compute_s: float) -> None:
        m = self.metrics
        m.batch_requests.observe(num_requests)
        m.batch_tokens.observe(num_tokens)
        m.batch_seconds.observe(compute_s)


class _StatusCollector(Collector):
    """Gauges read from the last status snapshot (taken by the /metrics route)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        yield from _status_gauges(self.status, PREFIX)
        reference = self.status.get("reference")
        if "ref_mode" in self.status:
            hosted = float(bool(self.status["ref_mode"]))
            yield GaugeMetricFamily(f"{PREFIX}_ref_mode", "1 when the reference policy is hosted", value=hosted)
        if isinstance(reference, dict):
            yield from _status_gauges(reference, f"{PREFIX}_ref")


def _status_gauges(status: dict[str, Any], prefix: str) -> Iterator[Any]:
    gauges = {
        "queue_depth": ("requests waiting in the queue", status.get("queue_depth")),
        "queued_tokens": ("tokens waiting in the queue", status.get("queued_tokens")),
        "inflight_batches": ("batches being computed", status.get("inflight_batches")),
        "outstanding_tokens": ("queued plus in-flight tokens", status.get("outstanding_tokens")),
        "weight_version": ("weight version being served", status.get("weight_version")),
        "paused": ("1 while serving is paused", status.get("paused")),
        "weights_incomplete": ("1 after a failed sync, until a complete one", bool(status.get("weights_incomplete"))),
        "replicas": ("replicas behind this server", status.get("num_replicas")),
        "live_replicas": ("replicas being routed to (alive, not joining)", status.get("live_replicas")),
    }
    for name, (documentation, value) in gauges.items():
        if value is not None:
            yield GaugeMetricFamily(f"{prefix}_{name}", documentation, value=float(value))
    yield from _replica_gauges(status.get("replicas"), prefix)
    paused = status.get("paused_seconds_total")
    if paused is not None:
        yield CounterMetricFamily(f"{prefix}_paused_seconds", "time spent paused (weight syncs, admin)", value=float(paused))


def _replica_gauges(replicas: Any, prefix: str) -> Iterator[Any]:
    """Per replica, labelled by name: whether it serves, and how often it was restarted — a
    replica lost with its node and not (yet) placed again shows as up 0."""
    if not isinstance(replicas, list) or not replicas:
        return
    up = GaugeMetricFamily(f"{prefix}_replica_up", "1 while the replica is alive and routed to", labels=["replica"])
    restarts = GaugeMetricFamily(f"{prefix}_replica_restarts", "restarts of the replica so far", labels=["replica"])
    for entry in replicas:
        up.add_metric([entry["name"]], float(entry["alive"] and not entry.get("joining", False)))
        restarts.add_metric([entry["name"]], float(entry["restarts"]))
    yield up
    yield restarts


class ServerMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.policy = ScoringMetrics(r, PREFIX, "policy")
        self.policy.mismatch = Histogram(
            f"{PREFIX}_rollout_logprob_mean_abs_diff",
            "per-request mean |server - rollout| log-prob, when rollout_log_probs are sent",
            buckets=MISMATCH_BUCKETS,
            registry=r,
        )
        self.reference = ScoringMetrics(r, f"{PREFIX}_ref", "reference")
        self.http_requests = Counter(
            f"{PREFIX}_http_requests", "HTTP calls by route and status", ["route", "status"], registry=r
        )
        self.http_in_progress = Gauge(f"{PREFIX}_http_requests_in_progress", "HTTP calls being handled", registry=r)
        self._status = _StatusCollector()
        r.register(self._status)
        self.observer = PrometheusObserver(self.policy)
        self.reference_observer = PrometheusObserver(self.reference)

    def render(self, status: dict[str, Any]) -> bytes:
        """The Prometheus text exposition, with gauges from `status`."""
        self._status.status = status
        return generate_latest(self.registry)
