"""The job store's interface: what the service and the worker may ask of any backend.

Two implementations: :class:`jobstore.sqlite.SQLiteJobStore` (the embedded default) and
:class:`jobstore.postgres.PostgresJobStore` (one database shared by several gateways and
worker hosts). Both implement the same methods with the same guarantees:

- every transition a stale process could race is conditional: a worker may only record
  progress for, finish, or requeue a job that is still ``running`` under its claim token;
- ``claim`` hands one queued job to exactly one worker;
- ``create_job`` with an idempotency key is atomic with the key's record;
- ids sort by creation, so list cursors stay valid when the row they name is deleted;
- a job's event ids increase in the order they become visible, so a follower that passes the
  last id it saw as ``after`` never misses one.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from jobstore.records import Job, JobEvent, Recovery, StoredFile


class JobStore(ABC):
    """Jobs, their events, uploaded files' records and idempotency keys."""

    # -- jobs: the service's side -----------------------------------------------------
    @abstractmethod
    def create_job(
        self,
        spec: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        request_fingerprint: str | None = None,
        max_queued: int | None = None,
        owner: str | None = None,
        max_active_per_owner: int | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job: ``(job, created)``; raises ``IdempotencyConflict``, ``QueueFull``, ``OwnerLimit``."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, *, after: str | None = None, limit: int = 20, status: str | None = None) -> tuple[list[Job], bool]:
        """Newest first, one page: ``(jobs, has_more)``."""

    @abstractmethod
    def lookup_idempotency(self, key: str) -> tuple[str, str] | None:
        """``(fingerprint, job_id)`` recorded for an Idempotency-Key, or None."""

    @abstractmethod
    def succeeded_jobs(self) -> list[Job]: ...

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, zeros included)."""

    @abstractmethod
    def events(self, job_id: str, *, after: int | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Oldest first after the event id ``after``: ``(events, has_more)``."""

    async def wait_for_events(self, job_id: str, *, after: int | None, timeout_s: float) -> bool:
        """Wait until ``job_id`` may have an event after the id ``after``, at most ``timeout_s``.

        True: woken early because one was written; False: the time ran out. Either way the
        caller re-reads :meth:`events` (a wake-up is a hint, not a delivery). This default has
        no wake-up channel and just sleeps, so its callers poll every ``timeout_s``; a backend
        with one (Postgres ``LISTEN``) returns as soon as the event is committed. A coroutine,
        because the gateway follows events on its event loop: a thread blocked per follower
        would soon exhaust the thread pool every other request needs.
        """
        await asyncio.sleep(timeout_s)
        return False

    @abstractmethod
    def request_cancel(self, job_id: str) -> Job:
        """Queued: cancelled now; running: flagged. ``KeyError``, ``JobStateError`` when finished."""

    @abstractmethod
    def delete(self, job_id: str) -> Job:
        """Remove a finished job with its events and keys; ``JobStateError`` while it runs."""

    @abstractmethod
    def recover_running(
        self,
        reason: str,
        *,
        code: str,
        max_attempts: int,
        worker: str | None = None,
        node: str | None = None,
        stale_before: float | None = None,
    ) -> Recovery:
        """Settle the running jobs of a process that is gone (all, one ``worker``'s, one host
        ``node``'s, or those without a heartbeat since ``stale_before``), by the retry policy
        (see :mod:`jobstore.sql`)."""

    # -- jobs: the worker's side ------------------------------------------------------
    @abstractmethod
    def claim(self, worker: str, node: str | None = None) -> Job | None:
        """Move the oldest queued job to running for ``worker`` (its claim token; ``node``: its
        host, see :func:`jobstore.node.worker_node`), or None."""

    @abstractmethod
    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Renew ``worker``'s lease on its running job; False when the job is no longer its own."""

    @abstractmethod
    def record_progress(self, job_id: str, worker: str, progress: dict[str, Any], message: str) -> bool:
        """Persist a progress event; False when the job is no longer ``worker``'s running job."""

    @abstractmethod
    def add_event(self, job_id: str, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool:
        """True when cancellation was asked for (or the job is gone)."""

    @abstractmethod
    def still_owned(self, job_id: str, worker: str) -> bool: ...

    @abstractmethod
    def finish(
        self,
        job_id: str,
        worker: str,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        message: str,
    ) -> bool:
        """running -> a terminal status, only for the claiming worker; False otherwise."""

    @abstractmethod
    def requeue(self, job_id: str, worker: str, message: str) -> bool:
        """running -> queued (graceful shutdown); a requested cancellation wins."""

    # -- uploaded files -----------------------------------------------------------------
    @abstractmethod
    def add_file(self, file_id: str, *, nbytes: int, filename: str, purpose: str, format: str, created_at: float) -> StoredFile: ...

    @abstractmethod
    def get_file(self, file_id: str) -> StoredFile | None: ...

    @abstractmethod
    def list_files(
        self, *, after: str | None = None, limit: int = 20, purpose: str | None = None, order: str = "desc"
    ) -> tuple[list[StoredFile], bool]: ...

    @abstractmethod
    def file_ids(self) -> set[str]: ...

    @abstractmethod
    def delete_file(self, file_id: str) -> StoredFile:
        """Remove a file's record; ``FileInUse`` while a queued or running job reads it."""

    @abstractmethod
    def close(self) -> None:
        """Release this thread's connection (the store stays usable: it reconnects)."""
