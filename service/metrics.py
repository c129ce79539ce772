"""The service's Prometheus metrics, on prometheus-client (text exposition format 0.0.4).

Each :class:`ServiceMetrics` has its own :class:`~prometheus_client.CollectorRegistry`, not the
library's global one: one process may build several apps (the tests do), and each must count
only its own requests. Values that live elsewhere (job counts in the job store, the worker's
state) are read when /metrics is scraped, by a custom collector, rather than mirrored into
gauges that could drift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("metal_marlin.service.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DEVICE_LABELS = ("device", "backend", "name")

# Without this every counter and histogram series gets a `<name>_created` gauge beside it: twice
# the series for a timestamp that text-format scrapers ignore. The switch is process-wide; the
# service is the only user of prometheus-client in its process.
prometheus_client.disable_created_metrics()

T = TypeVar("T")


class Counter(prometheus_client.Counter):
    """A counter whose ``inc`` also takes the label values as keywords, as the service counts:
    ``requests.inc(method=..., route=..., status=...)`` rather than ``.labels(...).inc()``."""

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None, **labels: str) -> None:
        if labels:
            self.labels(**labels).inc(amount, exemplar)
        else:
            super().inc(amount, exemplar)


class Histogram(prometheus_client.Histogram):
    """A histogram whose ``observe`` also takes the label values as keywords (see :class:`Counter`)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None, **labels: str) -> None:
        if labels:
            self.labels(**labels).observe(amount, exemplar)
        else:
            super().observe(amount, exemplar)


def _read(source: Callable[[], T] | None, default: T) -> T | None:
    """``source()``, or ``default`` without a source; None if it fails, so that a broken source
    leaves its gauge without samples instead of failing the whole scrape."""
    if source is None:
        return default
    try:
        return source()
    except Exception:  # noqa: BLE001 - /metrics must keep answering
        log.debug("a scrape-time metric source failed", exc_info=True)
        return None


class _ScrapeTimeGauges:
    """The gauges computed at each scrape: jobs by status, queue depth, worker up, worker device,
    and how fast the worker's schedulers act on cancellations (from its last readiness answer;
    they restart from zero with the worker or when a model is unloaded, hence gauges)."""

    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]] | None,
        worker_up: Callable[[], bool] | None,
        worker_device: Callable[[], Mapping[str, Any] | None] | None,
        worker_generation: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self._job_counts = job_counts
        self._worker_up = worker_up
        self._worker_device = worker_device
        self._worker_generation = worker_generation

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("mm_jobs", "Quantization jobs by status", labels=("status",)),
            GaugeMetricFamily("mm_job_queue_depth", "Quantization jobs waiting to run", labels=()),
            GaugeMetricFamily("mm_worker_up", "1 when the worker answers its readiness check", labels=()),
            GaugeMetricFamily(
                "mm_worker_device_info",
                "The worker's compute device (last reported): device gpu/cpu, backend cuda/metal/cpu, name",
                labels=DEVICE_LABELS,
            ),
            GaugeMetricFamily(
                "mm_worker_cancel_lag_steps",
                "Cancelled generations by the decode steps run between the cancellation and the release of its slot",
                labels=("steps",),
            ),
            GaugeMetricFamily("mm_worker_cancel_lag_steps_max", "Most decode steps a cancelled generation ran on", labels=()),
        )

    def describe(self) -> Iterable[Metric]:
        """The names without reading anything, so the registry can check them for clashes."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        jobs, queue, up, device, lag, lag_max = self._families()
        counts = _read(self._job_counts, {})
        if counts is not None:
            for status, n in sorted(counts.items()):
                jobs.add_metric([status], n)
            queue.add_metric([], counts.get("queued", 0))
        worker_up = _read(self._worker_up, False)
        if worker_up is not None:
            up.add_metric([], 1.0 if worker_up else 0.0)
        info = _read(self._worker_device, None)
        if info:  # nothing until a worker has answered
            values = (info.get("device"), info.get("backend"), info.get("device_name"))
            device.add_metric(["" if v is None else str(v) for v in values], 1.0)
        generation = _read(self._worker_generation, None)
        if generation:
            for steps, n in sorted((generation.get("cancel_lag_steps_hist") or {}).items()):
                lag.add_metric([steps], float(n))
            lag_max.add_metric([], float(generation.get("cancel_lag_steps_max") or 0))
        return (jobs, queue, up, device, lag, lag_max)


class ServiceMetrics:
    """Every metric the service exports, in one registry of its own."""

    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]] | None = None,
        worker_up: Callable[[], bool] | None = None,
        worker_device: Callable[[], Mapping[str, Any] | None] | None = None,
        worker_generation: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("mm_http_requests_total", "HTTP requests by route and status", ("method", "route", "status"), registry=reg)
        self.request_seconds = Histogram("mm_http_request_duration_seconds", "Time to the response headers", ("route",), registry=reg, buckets=LATENCY_BUCKETS)
        self.generations = Counter("mm_generation_requests_total", "Completion requests by endpoint and outcome", ("endpoint", "outcome"), registry=reg)
        self.prompt_tokens = Counter("mm_prompt_tokens_total", "Prompt tokens processed", ("model",), registry=reg)
        self.completion_tokens = Counter("mm_completion_tokens_total", "Tokens generated", ("model",), registry=reg)
        self.ttft = Histogram("mm_time_to_first_token_seconds", "Request start to first generated token", ("endpoint",), registry=reg, buckets=LATENCY_BUCKETS)
        self.inflight = prometheus_client.Gauge("mm_inflight_generations", "Generation requests in progress", registry=reg)
        self.rejected = Counter("mm_rejected_requests_total", "Requests refused with 429", ("reason",), registry=reg)
        self.worker_restarts = Counter("mm_worker_restarts_total", "Times the worker process was restarted", registry=reg)
        reg.register(_ScrapeTimeGauges(job_counts, worker_up, worker_device, worker_generation))

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
