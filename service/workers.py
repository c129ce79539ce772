"""Several workers behind one gateway: ``--worker URL`` (repeated) or ``MM_WORKERS``.

Each worker runs on its own host (``python -m worker --host 0.0.0.0 --port 8001``, or behind a
TLS-terminating proxy, then ``https://...``) with the shared ``MM_WORKER_TOKEN``; the gateway
never starts or restarts them. It probes each one's ``/ready`` (device, free model memory,
loaded and served models, requests in flight) and routes every generation by
:meth:`WorkerPool.candidates`: the ready workers that have the model loaded first, each group
least loaded first. A worker that cannot be reached when a request opens is marked down and the
request moves to the next candidate (it had not started there); when one dies, its generations
that had produced no token yet move to the next candidate too, and those that had end with an
OpenAI-shaped ``worker_unavailable`` error (see :mod:`service.relay`).

Jobs need no routing: every worker claims queued jobs from the shared job store
(``MM_DATABASE_URL``), and publishes results to the shared result store (``MM_RESULTS_URL``).

:class:`WorkerPool` offers what the routes use of :class:`service.supervisor.WorkerSupervisor`
(``ready``, ``ready_info``, ``candidates``, ``broadcast``, ``served_models``, ``workers_info``),
so the routes do not care which one they have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.config import Settings
from service.supervisor import cancel_task
from worker.protocol import WORKER_TOKEN_HEADER

log = logging.getLogger("metal_marlin.service.workers")

#: Seconds between readiness probes of a ready worker (a down one is probed 4x as often).
PROBE_INTERVAL_S = 2.0
#: A ready worker is marked down after this many failed probes in a row.
MISSES_BEFORE_DOWN = 2


def worker_client(url: str, token: str, timeout_s: float) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for a worker over TCP (``http://`` or ``https://``)."""
    timeout = httpx.Timeout(connect=5.0, read=timeout_s, write=30.0, pool=10.0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers={WORKER_TOKEN_HEADER: token})


@dataclass
class RemoteWorker:
    """One worker host as the gateway sees it."""

    url: str
    client: httpx.AsyncClient
    probe: httpx.AsyncClient
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    misses: int = 0
    #: Generations this gateway has open on it (the worker's own count lags a probe behind).
    inflight: int = 0
    next_probe: float = 0.0

    def load(self) -> int:
        return self.inflight + int(self.info.get("active_requests") or 0)

    def has_model(self, model: str | None) -> bool:
        return model is not None and model in (self.info.get("loaded_models") or [])

    def summary(self) -> dict[str, Any]:
        device = self.info.get("device_info") or {}
        return {
            "url": self.url,
            "ready": self.ready,
            "worker_id": self.info.get("worker_id"),
            "device": device.get("device"),
            "device_name": device.get("device_name"),
            "free_bytes": self.info.get("free_bytes"),
            "loaded_models": self.info.get("loaded_models", []),
            "active_requests": self.info.get("active_requests"),
            "current_job": self.info.get("current_job"),
        }


class WorkerPool:
    """The workers named by ``settings.workers``, probed from the gateway's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [
            RemoteWorker(url, worker_client(url, settings.worker_token, settings.request_timeout_s), worker_client(url, settings.worker_token, 5.0))
            for url in settings.workers
        ]
        self.restarts = 0  # the gateway restarts no remote worker; kept for /health's shape
        self.last_exit: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- what the routes ask ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(w.ready for w in self.workers)

    @property
    def ready_info(self) -> dict[str, Any]:
        """The first ready worker's answer, with the pool's decode batch: the sum of the ready
        workers' (what the gateway's in-flight limit follows)."""
        ready = [w for w in self.workers if w.ready]
        if not ready:
            return {}
        info = dict(ready[0].info)
        info["max_batch_size"] = sum(int(w.info.get("max_batch_size") or 0) for w in ready) or None
        info["loaded_models"] = sorted({m for w in ready for m in w.info.get("loaded_models") or []})
        info["active_requests"] = sum(int(w.info.get("active_requests") or 0) for w in ready)
        return info

    def candidates(self, model: str | None) -> list[RemoteWorker]:
        """Ready workers to try for ``model``, best first: those that have it loaded, then the
        rest; within each, least loaded first, then most free model memory. A model some worker
        serves by name (``--model`` on its host) goes only to the workers that serve it."""
        ready = [w for w in self.workers if w.ready]
        serving = [w for w in ready if model in (w.info.get("served_models") or [])]
        ready = serving or ready
        return sorted(ready, key=lambda w: (not w.has_model(model), w.load(), -int(w.info.get("free_bytes") or 0)))

    def mark_down(self, worker: RemoteWorker, why: str) -> None:
        if worker.ready:
            log.warning("worker %s is down: %s", worker.url, why)
        worker.ready = False

    async def broadcast(self, method: str, path: str, timeout_s: float = 5.0) -> None:
        """Send one small request to every ready worker (wake-ups, unloads); best effort."""

        async def one(worker: RemoteWorker) -> None:
            try:
                await worker.probe.request(method, path, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - each worker re-checks the store anyway
                log.debug("%s %s on %s failed", method, path, worker.url, exc_info=True)

        await asyncio.gather(*(one(w) for w in self.workers if w.ready))

    def served_models(self) -> set[str]:
        """Names served by any ready worker (``--model`` on that host)."""
        return {m for w in self.workers if w.ready for m in w.info.get("served_models") or []}

    def workers_info(self) -> list[dict[str, Any]]:
        return [w.summary() for w in self.workers]

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        await asyncio.gather(*(self._probe(w) for w in self.workers))
        self._task = asyncio.create_task(self._watch(), name="worker-pool")

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def stop(self) -> None:
        self._stopping = True
        await cancel_task(self._task)
        for w in self.workers:
            await w.client.aclose()
            await w.probe.aclose()

    async def aclose(self) -> None:
        """Close the clients of a pool that never started (tests, the OpenAPI export)."""
        await self.stop()

    async def _probe(self, worker: RemoteWorker) -> None:
        try:
            resp = await worker.probe.get("/ready")
            ok = resp.status_code == 200
            info = resp.json() if ok else None
        except (httpx.HTTPError, OSError, ValueError) as exc:
            ok, info = False, None
            why = str(exc) or type(exc).__name__
        else:
            why = f"/ready answered {resp.status_code}"
        if ok and isinstance(info, dict):
            if not worker.ready:
                log.info("worker %s is ready (%s)", worker.url, info.get("worker_id"))
            worker.info, worker.ready, worker.misses = info, True, 0
            return
        worker.misses += 1
        if worker.ready and worker.misses >= MISSES_BEFORE_DOWN:
            self.mark_down(worker, why)

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(PROBE_INTERVAL_S / 4)
            now = time.monotonic()
            due = [w for w in self.workers if not w.ready or now >= w.next_probe]
            for w in due:
                w.next_probe = now + PROBE_INTERVAL_S
            await asyncio.gather(*(self._probe(w) for w in due))
