"""What the SQL backends share: every transition of the job store, written once.

:class:`SQLJobStore` holds the queries and the rules (who may finish a job, the retry policy,
idempotency, the queue and per-owner bounds, cursor pagination) over a small DB-API-like
handle. A backend supplies the connection handling and the few places where the databases
differ:

- ``_tx()`` / ``_read()``: a transaction that writes, and a connection for a read;
- :attr:`SQLJobStore.FOR_UPDATE` and :attr:`SQLJobStore.FOR_CLAIM`: what a SELECT whose rows
  the transaction then changes appends. SQLite's ``BEGIN IMMEDIATE`` already holds the one
  write lock, so nothing; Postgres lets writers run side by side, so row locks
  (``FOR UPDATE``, and ``FOR UPDATE SKIP LOCKED`` for a claim: concurrent claimers take
  different jobs instead of queueing behind one row);
- ``_lock_for_create``: serialise the creators whose checks could race (a no-op for SQLite);
- ``_event_added``: tell listeners (Postgres ``NOTIFY``);
- ``_spec_file_id``: the SQL that reads ``spec.<part>.file_id`` out of the JSON text.

Queries use ``?`` placeholders and read result columns by name (``row["n"]``): both
``sqlite3.Row`` and psycopg's dict rows allow that, and the Postgres handle turns ``?`` into
``%s``. Rows become records (:mod:`jobstore.records`) here, so both backends hand out the same
``Job``/``JobEvent``/``StoredFile`` values.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from jobstore.base import JobStore
from jobstore.records import (
    JOB_STATUSES,
    TERMINAL_STATUSES,
    FileInUse,
    IdempotencyConflict,
    Job,
    JobEvent,
    JobStateError,
    OwnerLimit,
    QueueFull,
    Recovery,
    StoredFile,
    new_job_id,
)

Row = Mapping[str, Any]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Handle(Protocol):
    """A connection as the shared queries use it: ``execute(sql with ?, params)``."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...


# -- rows <-> records ------------------------------------------------------------------------
def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def dumps(value: Any) -> str | None:
    """JSON columns are text in both backends: what was written is what is read back (key order too)."""
    return None if value is None else json.dumps(value, separators=(",", ":"))


#: running -> queued: the claim, its host, lease and progress are cleared (attempts stay).
REQUEUE_SQL = (
    "UPDATE jobs SET status = 'queued', worker = NULL, worker_node = NULL, heartbeat_at = NULL, started_at = NULL, progress = NULL "
    "WHERE id = ?"
)


def job_from_row(row: Row) -> Job:
    return Job(
        id=row["id"],
        created_at=row["created_at"],
        status=row["status"],
        spec=json.loads(row["spec"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        cancel_requested=bool(row["cancel_requested"]),
        attempts=row["attempts"],
        worker=row["worker"],
        progress=loads(row["progress"]),
        error=loads(row["error"]),
        result=loads(row["result"]),
        owner=row["owner"],
    )


def file_from_row(row: Row) -> StoredFile:
    return StoredFile(
        id=row["id"], created_at=row["created_at"], bytes=row["bytes"], filename=row["filename"], purpose=row["purpose"], format=row["format"]
    )


def event_from_row(row: Row) -> JobEvent:
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        created_at=row["created_at"],
        level=row["level"],
        type=row["type"],
        message=row["message"],
        data=loads(row["data"]),
    )


class SQLJobStore(JobStore):
    """The job store's transitions over a SQL database (see the module docstring for the hooks)."""

    #: Appended to a SELECT whose rows the transaction changes next.
    FOR_UPDATE = ""
    #: Appended to the claim's SELECT of the oldest queued job.
    FOR_CLAIM = ""

    # -- what a backend provides ---------------------------------------------------------
    @abstractmethod
    def _tx(self) -> AbstractContextManager[Handle]:
        """A write transaction: committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Handle]:
        """A connection for one read."""

    @abstractmethod
    def _spec_file_id(self, part: str) -> str:
        """SQL for ``spec.<part>.file_id`` (NULL when absent); ``part`` is a fixed word, never input."""

    def _lock_for_create(self, db: Handle, *, idempotency_key: str | None, owner: str | None, queue_bounded: bool, owner_bounded: bool) -> None:
        """Serialise the ``create_job`` calls whose checks could race (nothing to do where writers are serial)."""

    def _event_added(self, db: Handle, job_id: str) -> None:
        """An event row was inserted for ``job_id`` in this transaction (a hook for listeners)."""

    # -- creation ------------------------------------------------------------------------
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
        """Insert a queued job; returns ``(job, created)``.

        With an idempotency key seen before: the same fingerprint returns the original job
        (``created=False``); a different one raises :class:`IdempotencyConflict`.
        ``max_queued`` bounds the queue: raises :class:`QueueFull` when it is reached.
        ``max_active_per_owner`` bounds ``owner``'s queued and running jobs: raises
        :class:`OwnerLimit` when it is reached.
        """
        now = time.time()
        with self._tx() as db:
            self._lock_for_create(
                db, idempotency_key=idempotency_key, owner=owner, queue_bounded=max_queued is not None, owner_bounded=max_active_per_owner is not None
            )
            if idempotency_key is not None:
                row = db.execute("SELECT fingerprint, job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["fingerprint"] != request_fingerprint:
                        raise IdempotencyConflict(idempotency_key, row["job_id"])
                    job = db.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
                    if job is not None:
                        return job_from_row(job), False
            if max_queued is not None:
                queued = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").fetchone()["n"]
                if queued >= max_queued:
                    raise QueueFull(queued, max_queued)
            if max_active_per_owner is not None:
                same_owner, args = ("owner IS NULL", ()) if owner is None else ("owner = ?", (owner,))
                active = db.execute(
                    f"SELECT COUNT(*) AS n FROM jobs WHERE {same_owner} AND status IN ('queued', 'running')", args
                ).fetchone()["n"]
                if active >= max_active_per_owner:
                    raise OwnerLimit(active, max_active_per_owner)
            job_id = new_job_id(now)
            db.execute(
                "INSERT INTO jobs (id, created_at, status, spec, owner) VALUES (?, ?, 'queued', ?, ?)",
                (job_id, now, dumps(spec), owner),
            )
            if idempotency_key is not None:
                db.execute(
                    "INSERT INTO idempotency_keys (key, fingerprint, job_id, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, job_id = excluded.job_id, created_at = excluded.created_at",
                    (idempotency_key, request_fingerprint, job_id, now),
                )
            self._add_event(db, job_id, "created", "Job created and queued", now=now)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row), True

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    def list(self, *, after: str | None = None, limit: int = 20, status: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        rows, has_more = self._page("jobs", after=after, limit=limit, equal={"status": status}, order="desc")
        return [job_from_row(r) for r in rows], has_more

    def _page(self, table: str, *, after: str | None, limit: int, equal: dict[str, str | None], order: str) -> tuple[list[Row], bool]:
        """One page of ``table`` by id (ids sort by creation); ``equal`` filters (None: any)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        clauses, args = [], []
        if after is not None:
            clauses.append("id < ?" if order == "desc" else "id > ?")
            args.append(after)
        for column, value in equal.items():
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM {table} {where} ORDER BY id {order.upper()} LIMIT ?", (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    def lookup_idempotency(self, key: str) -> tuple[str, str] | None:
        """``(fingerprint, job_id)`` recorded for an Idempotency-Key, or None."""
        with self._read() as db:
            row = db.execute("SELECT fingerprint, job_id FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row["fingerprint"], row["job_id"])

    def succeeded_jobs(self) -> list[Job]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'succeeded' ORDER BY id").fetchall()
        return [job_from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(JOB_STATUSES, 0)
        with self._read() as db:
            for row in db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall():
                out[row["status"]] = row["n"]
        return out

    def events(self, job_id: str, *, after: int | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Oldest first, so a client can follow a running job by passing the last id it saw."""
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?", (job_id, after or 0, limit + 1)
            ).fetchall()
        return [event_from_row(r) for r in rows[:limit]], len(rows) > limit

    # -- service-side transitions -----------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: flagged; the worker stops between blocks."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE id = ?{self.FOR_UPDATE}", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            status = row["status"]
            if status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? WHERE id = ?", (now, job_id))
                self._add_event(db, job_id, "cancelled", "Job cancelled before it started", now=now)
            elif status == "running":
                if not row["cancel_requested"]:
                    db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    self._add_event(db, job_id, "cancel_requested", "Cancellation requested; the job stops after the current block", now=now)
            elif status != "cancelled":
                raise JobStateError(f"job {job_id} already {status}; only queued or running jobs can be cancelled", status)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row)

    def delete(self, job_id: str) -> Job:
        """Remove a finished job's rows (events and idempotency keys cascade)."""
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE id = ?{self.FOR_UPDATE}", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["status"] not in TERMINAL_STATUSES:
                raise JobStateError(f"job {job_id} is {row['status']}; cancel it before deleting it", row["status"])
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(row)

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
        """Settle the running jobs whose process is gone: all of them, or only those claimed by
        ``worker``, by a worker of ``node`` (a host's worker that restarted), or whose last
        heartbeat is older than ``stale_before`` (a worker elsewhere that stopped answering).

        The retry policy: a job goes back to the queue while it has started fewer than
        ``max_attempts`` times; after that it fails with ``code``. A job whose cancellation
        was requested is cancelled instead. Each outcome is an event the client can follow.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        now = time.time()
        out = Recovery()
        where, args = ["status = 'running'"], []
        for clause, value in (("worker = ?", worker), ("worker_node = ?", node), ("COALESCE(heartbeat_at, started_at) < ?", stale_before)):
            if value is not None:
                where.append(clause)
                args.append(value)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id, attempts, cancel_requested FROM jobs WHERE {' AND '.join(where)} ORDER BY id{self.FOR_UPDATE}", args
            ).fetchall()
            for row in rows:
                job_id, attempts = row["id"], row["attempts"]
                data = {"code": code, "attempt": attempts, "max_attempts": max_attempts}
                if row["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id))
                    self._add_event(db, job_id, "cancelled", f"Job cancelled ({reason})", now=now, data=data)
                    out.cancelled.append(job_id)
                elif attempts < max_attempts:
                    db.execute(REQUEUE_SQL, (job_id,))
                    message = f"{reason}; attempt {attempts} of {max_attempts} did not complete, so the job is queued again"
                    self._add_event(db, job_id, "requeued", message, level="warning", now=now, data=data)
                    out.requeued.append(job_id)
                else:
                    message = f"{reason}; the job was given up after {attempts} attempt(s) (limit {max_attempts})"
                    db.execute(
                        "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                        (now, dumps({"message": message, "code": code}), job_id),
                    )
                    self._add_event(db, job_id, "failed", message, level="error", now=now, data=data)
                    out.failed.append(job_id)
        return out

    # -- worker-side transitions ------------------------------------------------------------
    def claim(self, worker: str, node: str | None = None) -> Job | None:
        """Atomically move the oldest queued job to running for ``worker`` (of host ``node``)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1{self.FOR_CLAIM}").fetchone()
            if row is None:
                return None
            cur = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, heartbeat_at = ?, worker = ?, worker_node = ?, "
                "attempts = attempts + 1, progress = NULL, error = NULL WHERE id = ? AND status = 'queued'",
                (now, now, worker, node, row["id"]),
            )
            if cur.rowcount != 1:
                return None
            self._add_event(db, row["id"], "started", "Job started", now=now, data={"worker": worker})
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return job_from_row(job)

    def record_progress(self, job_id: str, worker: str, progress: dict[str, Any], message: str) -> bool:
        """Persist a progress event. False when the job is no longer this worker's running job."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running' AND worker = ?", (dumps(progress), job_id, worker)
            )
            if cur.rowcount != 1:
                return False
            self._add_event(db, job_id, "progress", message, now=now, data=progress)
        return True

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Record that ``worker`` still runs ``job_id``; False when it is no longer its job."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running' AND worker = ?", (time.time(), job_id, worker)
            )
            return cur.rowcount == 1

    def add_event(self, job_id: str, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Append an event to a job; ``KeyError`` when there is no such job."""
        with self._tx() as db:
            if db.execute(f"SELECT id FROM jobs WHERE id = ?{self.FOR_UPDATE}", (job_id,)).fetchone() is None:
                raise KeyError(job_id)
            self._add_event(db, job_id, type, message, level=level, data=data)

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["cancel_requested"])

    def still_owned(self, job_id: str, worker: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT 1 AS yes FROM jobs WHERE id = ? AND status = 'running' AND worker = ?", (job_id, worker)).fetchone()
        return row is not None

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
        """running -> succeeded/failed/cancelled, only for the claiming worker."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"not a terminal status: {status}")
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ? WHERE id = ? AND status = 'running' AND worker = ?",
                (status, now, dumps(result), dumps(error), job_id, worker),
            )
            if cur.rowcount != 1:
                return False
            self._add_event(db, job_id, status, message, level="error" if status == "failed" else "info", now=now)
        return True

    def requeue(self, job_id: str, worker: str, message: str) -> bool:
        """running -> queued (graceful worker shutdown); a cancelled request still wins."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                f"SELECT cancel_requested FROM jobs WHERE id = ? AND status = 'running' AND worker = ?{self.FOR_UPDATE}", (job_id, worker)
            ).fetchone()
            if row is None:
                return False
            if row["cancel_requested"]:
                db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id))
                self._add_event(db, job_id, "cancelled", "Job cancelled", now=now)
            else:
                db.execute(REQUEUE_SQL, (job_id,))
                self._add_event(db, job_id, "requeued", message, level="warning", now=now)
        return True

    # -- uploaded files --------------------------------------------------------------------
    def add_file(self, file_id: str, *, nbytes: int, filename: str, purpose: str, format: str, created_at: float) -> StoredFile:
        with self._tx() as db:
            db.execute(
                "INSERT INTO files (id, created_at, bytes, filename, purpose, format) VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, created_at, nbytes, filename, purpose, format),
            )
        return StoredFile(file_id, created_at, nbytes, filename, purpose, format)

    def get_file(self, file_id: str) -> StoredFile | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else file_from_row(row)

    def list_files(
        self, *, after: str | None = None, limit: int = 20, purpose: str | None = None, order: str = "desc"
    ) -> tuple[list[StoredFile], bool]:
        """By creation, newest first unless ``order="asc"``; ``after`` is the last id of the previous page."""
        rows, has_more = self._page("files", after=after, limit=limit, equal={"purpose": purpose}, order=order)
        return [file_from_row(r) for r in rows], has_more

    def file_ids(self) -> set[str]:
        with self._read() as db:
            return {r["id"] for r in db.execute("SELECT id FROM files").fetchall()}

    def delete_file(self, file_id: str) -> StoredFile:
        """Remove a file's record; :class:`FileInUse` while a queued or running job reads it."""
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM files WHERE id = ?{self.FOR_UPDATE}", (file_id,)).fetchone()
            if row is None:
                raise KeyError(file_id)
            users = db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND "
                f"({self._spec_file_id('model')} = ? OR {self._spec_file_id('calibration')} = ?) ORDER BY id",
                (file_id, file_id),
            ).fetchall()
            if users:
                raise FileInUse(file_id, [r["id"] for r in users])
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return file_from_row(row)

    # -- helpers -------------------------------------------------------------------------
    def _add_event(
        self,
        db: Handle,
        job_id: str,
        type: str,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """Insert an event. Every caller holds the job's row (it changed it, inserted it, or
        selected it ``FOR_UPDATE``), so one job's event ids are committed in increasing order
        and a follower that passes the last id it saw never skips one."""
        db.execute(
            "INSERT INTO job_events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, time.time() if now is None else now, level, type, message, dumps(data)),
        )
        self._event_added(db, job_id)
