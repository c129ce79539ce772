"""What the routes share: settings, the job store, the result store, the worker supervisor, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from jobstore import JobStore
from jobstore.results import ResultStore
from service.config import Settings
from service.metrics import ServiceMetrics
from service.supervisor import WorkerSupervisor
from service.workers import WorkerPool


@dataclass
class ServiceState:
    settings: Settings
    store: JobStore
    results: ResultStore
    #: the gateway's own worker, or worker hosts elsewhere (same methods for the routes)
    supervisor: WorkerSupervisor | WorkerPool
    metrics: ServiceMetrics
    inflight: int = 0


def get_state(request: Request) -> ServiceState:
    return request.app.state.mm
