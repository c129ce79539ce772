"""Start, watch and restart the worker process; talk to it over its Unix socket.

The supervisor spawns ``python -m worker`` (from the event loop's thread, so the worker's
parent-death signal is tied to the service process), waits for its readiness endpoint, and
watches it. When the worker exits unexpectedly (crash, OOM kill, SIGKILL):

- readiness drops at once (``/health`` answers 503, new requests get 503);
- in-flight generations see their stream break and report an error to their clients;
- jobs it was running go back to the queue, or fail with ``worker_crashed`` once they have
  started ``MM_JOB_MAX_ATTEMPTS`` times (their partial output lives only in the worker's
  staging folder and is never published);
- a new worker is started, with backoff if it keeps dying.

With ``MM_WORKER_URL`` the worker is external: the supervisor only follows its readiness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from jobstore import MAX_ATTEMPTS_ENV, MAX_DATA_BYTES_ENV, JobStore
from jobstore.node import worker_node
from service.config import Settings
from worker.proc import describe_exit
from worker.protocol import WORKER_TOKEN_HEADER
from worker.served import ENV_VAR as SERVED_MODELS_VAR
from worker.served import served_model_args

log = logging.getLogger("metal_marlin.service.supervisor")


def make_worker_client(settings: Settings, timeout_s: float) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for the worker (Unix socket, or loopback TCP)."""
    timeout = httpx.Timeout(connect=5.0, read=timeout_s, write=30.0, pool=10.0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
    headers = {WORKER_TOKEN_HEADER: settings.worker_token}
    url = settings.worker_url
    if url is None or url.startswith("unix:"):
        uds = str(settings.worker_socket) if url is None else url[len("unix:") :]
        transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits)
        return httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=timeout, headers=headers)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers)


async def cancel_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a watcher task and wait until it has ended, whatever it raised."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass


class WorkerSupervisor:
    def __init__(self, settings: Settings, store: JobStore, on_restart: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.on_restart = on_restart
        self.client = make_worker_client(settings, settings.request_timeout_s)
        self._probe = make_worker_client(settings, 5.0)
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.ready_info: dict[str, Any] = {}
        self.restarts = 0
        self.last_exit: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready_event = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        if self.settings.spawn_worker:
            self._spawn()
        self._task = asyncio.create_task(self._watch(), name="worker-supervisor")

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping = True
        self._set_ready(False)
        await cancel_task(self._task)
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                log.warning("worker did not exit within %.0f s; killing it", timeout_s)
                proc.kill()
                proc.wait()
        await self.client.aclose()
        await self._probe.aclose()

    # -- what the routes ask (the same as service.workers.WorkerPool) ----------------------
    #: generations this gateway has open on the worker (the pool ranks workers by it)
    inflight = 0
    url = "local"

    def candidates(self, model: str | None) -> list[WorkerSupervisor]:
        """The one worker, when it is ready."""
        return [self] if self.ready else []

    def mark_down(self, worker: Any, why: str) -> None:
        """Nothing to do: the supervisor follows its worker's process and readiness itself."""

    async def broadcast(self, method: str, path: str, timeout_s: float = 5.0) -> None:
        """One small best-effort request to the worker (a wake-up, an unload)."""
        if self.ready:
            try:
                await self.client.request(method, path, timeout=timeout_s)
            except Exception:  # noqa: BLE001 - the worker polls and re-checks anyway
                log.debug("%s %s on the worker failed", method, path, exc_info=True)

    def served_models(self) -> set[str]:
        """The gateway's own ``--model`` entries are its settings': none to add."""
        return set()

    def workers_info(self) -> list[dict[str, Any]] | None:
        return None

    async def aclose(self) -> None:
        """Close the clients of a supervisor that never started (tests, the OpenAPI export)."""
        await self.client.aclose()
        await self._probe.aclose()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- internals ---------------------------------------------------------------------
    def _worker_env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        threads = str(s.worker_threads or os.cpu_count() or 1)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        env["MM_WORKER_TOKEN"] = s.worker_token
        env[MAX_ATTEMPTS_ENV] = str(s.job_max_attempts)  # the worker settles orphans at start by the same cap
        env.pop(MAX_DATA_BYTES_ENV, None)
        if s.max_data_bytes is not None:
            env[MAX_DATA_BYTES_ENV] = str(s.max_data_bytes)  # the worker checks a result against it before publishing
        env.pop(SERVED_MODELS_VAR, None)  # the served models come as --model arguments
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self) -> None:
        s = self.settings
        assert s.worker_socket is not None
        cmd = [
            sys.executable, "-m", "worker",
            "--data-dir", str(s.data_dir),
            "--socket", str(s.worker_socket),
            "--memory-mb", str(s.worker_memory_mb),
            "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        ]
        if s.model_roots:
            cmd += ["--model-roots", s.model_roots]
        cmd += served_model_args(s.served_models)
        if not s.worker_jobs:
            cmd.append("--no-jobs")
        # Popen from the event loop thread: the worker's PR_SET_PDEATHSIG follows this thread.
        self.process = subprocess.Popen(cmd, env=self._worker_env(), stdin=subprocess.DEVNULL)
        log.info("started worker pid %d", self.process.pid)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    async def _check_ready(self) -> bool:
        try:
            resp = await self._probe.get("/ready")
        except (httpx.HTTPError, OSError):
            return False
        if resp.status_code != 200:
            return False
        try:
            self.ready_info = resp.json()
        except ValueError:
            return False
        return True

    async def _watch(self) -> None:
        backoff = 0.5
        next_probe = 0.0
        misses = 0
        while not self._stopping:
            proc = self.process
            if proc is not None and proc.poll() is not None:
                await self._handle_exit(proc.returncode)
                if self._stopping:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._spawn()
                self.restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                continue
            now = time.monotonic()
            if now >= next_probe:
                ok = await self._check_ready()
                misses = 0 if ok else misses + 1
                if ok and not self.ready:
                    log.info("worker is ready (pid %s)", self.ready_info.get("pid"))
                    backoff = 0.5
                    self._set_ready(True)
                elif self.ready and misses >= 3:  # a living worker may miss one probe under load
                    log.warning("worker stopped answering its readiness check")
                    self._set_ready(False)
                next_probe = now + (2.0 if self.ready and ok else 0.25)
            await asyncio.sleep(0.1)

    async def _handle_exit(self, returncode: int) -> None:
        self._set_ready(False)
        how = describe_exit(returncode)
        self.last_exit = how
        if self._stopping:
            return
        log.error("worker process %s", how)
        reason = f"The worker process {how} while this job was running"
        try:
            settled = await asyncio.to_thread(  # only our worker's jobs: others may share the store
                self.store.recover_running, reason, code="worker_crashed", max_attempts=self.settings.job_max_attempts,
                node=worker_node(self.settings.data_dir),
            )
        except Exception:  # noqa: BLE001
            log.exception("could not settle the crashed worker's jobs")
            return
        if settled.requeued or settled.failed:
            log.error("the crashed worker's jobs: requeued %s, failed %s", settled.requeued, settled.failed)
