"""The worker's job loop: claim a queued job, run it in a child process, publish the result.

A job writes into ``<data>/jobs/.staging/<job_id>.<attempt>/``; only after the child exits
successfully does the runner publish that folder to the result store (:mod:`jobstore.results`:
by default one ``rename`` into ``<data>/jobs/<job_id>/``, atomic on one file system; on S3 the
manifest put last) and then mark the job ``succeeded`` (guarded: only if it is still this
worker's running job; otherwise the result is removed again, unless another worker has
meanwhile succeeded with the same job). A result is therefore visible exactly when its job has
succeeded, whatever crashes in between. Before the rename the runner records the SHA-256 of
every file in ``.checksums.json`` (and in the job's result), so a reader can verify a visible
result against what the job wrote.

A job with ``export_format: "autoawq"`` also has the AutoAWQ GEMM export of its result in
``<data>/jobs/<job_id>/autoawq/``, written by the job process inside the staging folder, so it
is published by the same rename, or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobstore import DEFAULT_MAX_ATTEMPTS, Job, JobStore, is_job_id
from jobstore.layout import data_bytes, holds_weights, jobs_dir, remove_tree, result_summary, results_cache_dir, spec_formats, write_checksums
from jobstore.node import DEFAULT_LEASE_S
from jobstore.results import LocalResults, ResultStore
from jobstore.redact import redact_paths, server_locations
from worker.job_process import EXIT_CANCELLED, EXIT_INVALID, EXIT_LOST, EXIT_OK
from worker.proc import describe_exit
from worker.sources import parse_roots

log = logging.getLogger("metal_marlin.worker.jobs")


def cleanup_data_dir(store: JobStore, data_dir: Path) -> None:
    """At worker start: drop staging/trash leftovers, and local result folders (published ones
    and fetched copies of shared ones) of jobs that did not succeed."""
    root = jobs_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    cache = results_cache_dir(data_dir)
    for name in (".staging", ".trash"):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (".tmp", ".trash"):
        shutil.rmtree(cache / name, ignore_errors=True)
    for folder in (root, cache):
        for child in folder.iterdir() if folder.is_dir() else ():
            if child.is_dir() and is_job_id(child.name):
                job = store.get(child.name)
                if job is None or job.status != "succeeded":
                    remove_tree(child, folder / ".trash")


class JobRunner:
    """A daemon thread that runs queued jobs one at a time."""

    def __init__(
        self,
        store: JobStore,
        data_dir: Path,
        worker_id: str,
        *,
        roots: str = "",
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        poll_interval_s: float = 1.0,
        cancel_grace_s: float = 10.0,
        max_data_bytes: int | None = None,
        results: ResultStore | None = None,
        node: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.store = store
        self.node = node
        #: a running job's lease: heartbeats every third of it; others' jobs past it are taken back
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._next_reap = 0.0
        self.results = results if results is not None else LocalResults(Path(data_dir))
        self.data_dir = Path(data_dir)
        self.worker_id = worker_id
        self.roots = roots
        self.python = python
        self.env = dict(env) if env is not None else None
        self.poll_interval_s = poll_interval_s
        self.cancel_grace_s = cancel_grace_s
        self.max_data_bytes = max_data_bytes
        # a job's error message is what its client reads: it names no server path
        self._server_paths = server_locations(self.data_dir, parse_roots(roots))
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self.current_job: str | None = None
        self.jobs_run = 0

    # -- control --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop taking jobs; a running job is stopped and put back in the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- loop -----------------------------------------------------------------------------
    def _reap_lost(self) -> None:
        """Take back jobs whose worker stopped heartbeating (a host that died or lost the
        network), by the retry policy; at most every half lease."""
        now = time.time()
        if now < self._next_reap:
            return
        self._next_reap = now + self.lease_s / 2
        reason = f"The worker running this job stopped answering (no heartbeat for {self.lease_s:g} s)"
        settled = self.store.recover_running(reason, code="worker_lost", max_attempts=self.max_attempts, stale_before=now - self.lease_s)
        if settled.requeued or settled.failed or settled.cancelled:
            log.warning("jobs of a lost worker: requeued %s, failed %s, cancelled %s", settled.requeued, settled.failed, settled.cancelled)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._reap_lost()
                job = self.store.claim(self.worker_id, self.node)
            except Exception:  # noqa: BLE001 - a locked/busy database must not kill the loop
                log.exception("could not claim a job")
                job = None
            if job is None:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
                continue
            self.current_job = job.id
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001
                log.exception("job %s: runner error", job.id)
                self.store.finish(
                    job.id, self.worker_id, "failed",
                    error={"code": "internal_error", "message": redact_paths(f"worker error: {exc}", self._server_paths)},
                    message=redact_paths(f"Job failed: worker error: {exc}", self._server_paths),
                )
            finally:
                self.current_job = None
                self.jobs_run += 1

    def _run(self, job: Job) -> None:
        root = jobs_dir(self.data_dir)
        staging_root = root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = staging_root / f"{job.id}.{job.attempts}"
        error_file = staging_root / f"{job.id}.{job.attempts}.error.json"
        shutil.rmtree(staging, ignore_errors=True)
        error_file.unlink(missing_ok=True)
        cmd = [
            self.python, "-m", "worker.job_process",
            "--data-dir", str(self.data_dir),
            "--job-id", job.id,
            "--worker", self.worker_id,
            "--output", str(staging),
            "--error-file", str(error_file),
            "--roots", self.roots,
            "--parent-pid", str(os.getpid()),
        ]
        log.info("job %s: starting (attempt %d)", job.id, job.attempts)
        self._child = child = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        cancel_seen_at: float | None = None
        stopped_for_shutdown = False
        next_beat = time.monotonic() + self.lease_s / 3
        try:
            while True:
                try:
                    returncode = child.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.lease_s / 3
                    try:
                        self.store.heartbeat(job.id, self.worker_id)
                    except Exception:  # noqa: BLE001 - a busy database: the lease has two more beats
                        log.warning("job %s: could not record a heartbeat", job.id, exc_info=True)
                if self._stopping.is_set() and not stopped_for_shutdown:
                    stopped_for_shutdown = True
                    child.send_signal(signal.SIGKILL)
                    continue
                if cancel_seen_at is None and self.store.cancel_requested(job.id):
                    cancel_seen_at = time.monotonic()
                if cancel_seen_at is not None and time.monotonic() - cancel_seen_at > self.cancel_grace_s:
                    log.warning("job %s: did not stop within %.0f s of cancellation; killing it", job.id, self.cancel_grace_s)
                    child.send_signal(signal.SIGKILL)
                    cancel_seen_at = float("inf")
        finally:
            self._child = None
        self._finish(job, returncode, staging, error_file, stopped_for_shutdown)

    def _over_quota(self) -> bool:
        """Would publishing the staged result leave uploads and results over the quota? (The
        staged files are counted already: they sit under ``jobs/.staging``.)"""
        return self.max_data_bytes is not None and data_bytes(self.data_dir) > self.max_data_bytes

    def _publish(self, job: Job, staging: Path) -> None:
        """Checksums, publish, then ``succeeded``; a job that stopped being ours (requeued after
        this worker was presumed dead) publishes nothing over another worker's result."""
        write_checksums(staging)
        summary = result_summary(staging)
        if not self.store.still_owned(job.id, self.worker_id):
            log.warning("job %s: finished, but it is no longer this worker's; discarding the result", job.id)
            return
        self.results.publish(job.id, staging)
        if not self.store.finish(job.id, self.worker_id, "succeeded", result=summary, message="Job succeeded"):
            current = self.store.get(job.id)
            log.warning("job %s: finished, but it is no longer this worker's; discarding the result", job.id)
            if current is None or current.status != "succeeded":
                self.results.delete(job.id)

    def _finish(self, job: Job, returncode: int, staging: Path, error_file: Path, shutdown: bool) -> None:
        trash = jobs_dir(self.data_dir) / ".trash"
        error: dict[str, Any] | None = None
        if error_file.is_file():
            try:
                error = json.loads(error_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                error = None
            error_file.unlink(missing_ok=True)
        try:
            if shutdown:
                self.store.requeue(job.id, self.worker_id, "The worker shut down while this job ran; it was put back in the queue")
                return
            missing = [f for f in spec_formats(job.spec) if not holds_weights(staging, f)]
            if returncode == EXIT_OK and missing:
                error = {"code": "internal_error", "message": f"the job process ended without writing its {' and '.join(missing)} result"}
            elif returncode == EXIT_OK and self._over_quota():
                error = {
                    "code": "storage_quota_exceeded",
                    "message": f"the result does not fit the server's storage quota (MM_MAX_DATA_BYTES = {self.max_data_bytes} bytes); "
                    "delete old results or uploads and submit the job again",
                }
            elif returncode == EXIT_OK:
                self._publish(job, staging)
                return
            cancelled = returncode == EXIT_CANCELLED or (returncode < 0 and self.store.cancel_requested(job.id))
            if cancelled:
                self.store.finish(job.id, self.worker_id, "cancelled", message="Job cancelled")
                return
            if returncode == EXIT_LOST:
                return  # someone else already settled this job (e.g. failed it after a crash)
            if error is None:
                error = {"code": "job_process_died", "message": f"the job process {describe_exit(returncode)}"}
                if returncode == -signal.SIGKILL:
                    error["message"] += " (out of memory?)"
            elif returncode not in (EXIT_INVALID,):
                error.setdefault("code", "internal_error")
            message = redact_paths(str(error.get("message", "job failed")), self._server_paths)
            public = {"code": error.get("code", "internal_error"), "message": message}
            self.store.finish(job.id, self.worker_id, "failed", error=public, message=f"Job failed: {public['message']}")
        finally:
            remove_tree(staging, trash)
