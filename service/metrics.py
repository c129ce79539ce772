"""Prometheus text exposition (format 0.0.4) for a handful of counters, gauges and histograms.

Small and dependency-free on purpose: the service needs counters with labels, a few
histograms, and gauges computed at scrape time (job counts from the job store).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}
        if not self.label_names:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge set directly or computed at scrape time by ``collect``."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        collect: Callable[[], Iterable[tuple[dict[str, str], float]]] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}
        self._collect = collect

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        if self._collect is not None:
            try:
                items = sorted((self._key(lbl), float(v)) for lbl, v in self._collect())
            except Exception:  # noqa: BLE001 - a failing collector must not break /metrics
                items = []
        else:
            with self._lock:
                items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        counts = self._counts.get(self._key(labels))
        return counts[-1] if counts else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        for key, counts, total in items:
            for bound, n in zip(self.buckets, counts):
                le = f'le="{_num(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {n}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {counts[-1]}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """Every metric the service exports."""

    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]] | None = None,
        worker_up: Callable[[], bool] | None = None,
        worker_device: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter("mm_http_requests_total", "HTTP requests by route and status", ("method", "route", "status")))
        self.request_seconds = add(Histogram("mm_http_request_duration_seconds", "Time to the response headers", ("route",), LATENCY_BUCKETS))
        self.generations = add(Counter("mm_generation_requests_total", "Completion requests by endpoint and outcome", ("endpoint", "outcome")))
        self.prompt_tokens = add(Counter("mm_prompt_tokens_total", "Prompt tokens processed", ("model",)))
        self.completion_tokens = add(Counter("mm_completion_tokens_total", "Tokens generated", ("model",)))
        self.ttft = add(Histogram("mm_time_to_first_token_seconds", "Request start to first generated token", ("endpoint",), LATENCY_BUCKETS))
        self.inflight = add(Gauge("mm_inflight_generations", "Generation requests in progress"))
        self.rejected = add(Counter("mm_rejected_requests_total", "Requests refused with 429", ("reason",)))
        self.worker_restarts = add(Counter("mm_worker_restarts_total", "Times the worker process was restarted"))
        self.inflight.set(0)

        def jobs() -> Iterable[tuple[dict[str, str], float]]:
            counts = job_counts() if job_counts else {}
            return [({"status": s}, n) for s, n in counts.items()]

        def queue() -> Iterable[tuple[dict[str, str], float]]:
            counts = job_counts() if job_counts else {}
            return [({}, counts.get("queued", 0))]

        add(Gauge("mm_jobs", "Quantization jobs by status", ("status",), collect=jobs))
        add(Gauge("mm_job_queue_depth", "Quantization jobs waiting to run", (), collect=queue))
        add(Gauge("mm_worker_up", "1 when the worker answers its readiness check", (), collect=lambda: [({}, 1.0 if worker_up and worker_up() else 0.0)]))

        def device() -> Iterable[tuple[dict[str, str], float]]:
            info = worker_device() if worker_device else None
            if not info:  # no worker has answered yet
                return []
            labels = {"device": info.get("device"), "backend": info.get("backend"), "name": info.get("device_name")}
            return [({k: "" if v is None else str(v) for k, v in labels.items()}, 1.0)]

        add(Gauge("mm_worker_device_info", "The worker's compute device (last reported): device gpu/cpu, backend cuda/metal/cpu, name", ("device", "backend", "name"), collect=device))

    def render(self) -> str:
        return self.registry.render()
