"""The SQLite job store: one database file (stdlib ``sqlite3``, WAL mode) in the data directory.

The service inserts jobs and reads them; the worker claims queued jobs atomically
(``UPDATE ... WHERE status='queued'``), records progress events and the outcome. Several
processes (service, worker, the worker's job process) open the same file; WAL lets readers
proceed while one writer commits, and ``busy_timeout`` serialises writers.

Every state change that a stale process could race is guarded in SQL: a worker may only
finish a job it claimed (``worker = ?``) while it is still ``running``, so a job that the
service already failed after a worker crash can never be flipped to ``succeeded``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

DB_NAME = "jobs.sqlite3"

#: Version 1: the tables as first shipped (``IF NOT EXISTS``: files made before versioning have
#: them already, at ``user_version`` 0).
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    created_at       REAL NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
    spec             TEXT NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    progress         TEXT,
    error            TEXT,
    result           TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, id);
CREATE TABLE IF NOT EXISTS job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    level      TEXT NOT NULL,
    type       TEXT NOT NULL,
    message    TEXT NOT NULL,
    data       TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE TABLE IF NOT EXISTS files (
    id         TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    bytes      INTEGER NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    format     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_purpose ON files (purpose, id);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  REAL NOT NULL
);
"""

#: ``(version, script)``, applied in order inside one transaction each; ``PRAGMA user_version``
#: records the last one applied. Append, never edit: a file in the field is at any version.
_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _SCHEMA_V1),
    # who submitted a job (a digest of the API key), for per-key limits
    (2, "ALTER TABLE jobs ADD COLUMN owner TEXT;\nCREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, status);"),
)
SCHEMA_VERSION = _MIGRATIONS[-1][0]


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _job(row: sqlite3.Row) -> Job:
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
        progress=_loads(row["progress"]),
        error=_loads(row["error"]),
        result=_loads(row["result"]),
        owner=row["owner"],
    )


def _file(row: sqlite3.Row) -> StoredFile:
    return StoredFile(
        id=row["id"], created_at=row["created_at"], bytes=row["bytes"], filename=row["filename"], purpose=row["purpose"], format=row["format"]
    )


def _event(row: sqlite3.Row) -> JobEvent:
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        created_at=row["created_at"],
        level=row["level"],
        type=row["type"],
        message=row["message"],
        data=_loads(row["data"]),
    )


class SQLiteJobStore(JobStore):
    """Thread-safe access to ``<data_dir>/jobs.sqlite3`` (one connection per thread, and per process)."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._migrate()

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION` (each step under the write lock, so two
        processes opening a new file at once apply it once)."""
        for version, script in _MIGRATIONS:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = db.execute("PRAGMA user_version").fetchone()
                if current < version:
                    for statement in filter(str.strip, script.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {int(version)}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> SQLiteJobStore:
        return cls(Path(data_dir) / DB_NAME)

    # -- connection handling -------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        pid = getattr(self._local, "pid", None)
        if db is None or pid != os.getpid():  # never share a connection across fork
            db = self._connect()
            self._local.db = db
            self._local.pid = os.getpid()
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so read-then-write is atomic."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

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
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT fingerprint, job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row["fingerprint"] != request_fingerprint:
                        raise IdempotencyConflict(idempotency_key, row["job_id"])
                    job = db.execute("SELECT * FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
                    if job is not None:
                        return _job(job), False
            if max_queued is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                if queued >= max_queued:
                    raise QueueFull(queued, max_queued)
            if max_active_per_owner is not None:
                (active,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN ('queued', 'running')", (owner,)
                ).fetchone()
                if active >= max_active_per_owner:
                    raise OwnerLimit(active, max_active_per_owner)
            job_id = new_job_id(now)
            db.execute(
                "INSERT INTO jobs (id, created_at, status, spec, owner) VALUES (?, ?, 'queued', ?, ?)",
                (job_id, now, _dumps(spec), owner),
            )
            if idempotency_key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (key, fingerprint, job_id, created_at) VALUES (?, ?, ?, ?)",
                    (idempotency_key, request_fingerprint, job_id, now),
                )
            self._add_event(db, job_id, "created", "Job created and queued", now=now)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row), True

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, *, after: str | None = None, limit: int = 20, status: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        rows, has_more = self._page("jobs", after=after, limit=limit, equal={"status": status}, order="desc")
        return [_job(r) for r in rows], has_more

    def _page(self, table: str, *, after: str | None, limit: int, equal: dict[str, str | None], order: str) -> tuple[list[sqlite3.Row], bool]:
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
        rows = self._db.execute(f"SELECT * FROM {table} {where} ORDER BY id {order.upper()} LIMIT ?", (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    def lookup_idempotency(self, key: str) -> tuple[str, str] | None:
        """``(fingerprint, job_id)`` recorded for an Idempotency-Key, or None."""
        row = self._db.execute("SELECT fingerprint, job_id FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row["fingerprint"], row["job_id"])

    def succeeded_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE status = 'succeeded' ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(JOB_STATUSES, 0)
        for row in self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            out[row["status"]] = row["n"]
        return out

    def events(self, job_id: str, *, after: int | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Oldest first, so a client can follow a running job by passing the last id it saw."""
        rows = self._db.execute(
            "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
            (job_id, after or 0, limit + 1),
        ).fetchall()
        return [_event(r) for r in rows[:limit]], len(rows) > limit

    # -- service-side transitions -----------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: flagged; the worker stops between blocks."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            status = row["status"]
            if status == "queued":
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? WHERE id = ?",
                    (now, job_id),
                )
                self._add_event(db, job_id, "cancelled", "Job cancelled before it started", now=now)
            elif status == "running":
                if not row["cancel_requested"]:
                    db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    self._add_event(db, job_id, "cancel_requested", "Cancellation requested; the job stops after the current block", now=now)
            elif status != "cancelled":
                raise JobStateError(f"job {job_id} already {status}; only queued or running jobs can be cancelled", status)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def delete(self, job_id: str) -> Job:
        """Remove a finished job's rows (events and idempotency keys cascade)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["status"] not in TERMINAL_STATUSES:
                raise JobStateError(f"job {job_id} is {row['status']}; cancel it before deleting it", row["status"])
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _job(row)

    def recover_running(self, reason: str, *, code: str, max_attempts: int, worker: str | None = None) -> Recovery:
        """Settle every running job (of ``worker`` when given) whose process is gone.

        The retry policy: a job goes back to the queue while it has started fewer than
        ``max_attempts`` times; after that it fails with ``code``. A job whose cancellation
        was requested is cancelled instead. Each outcome is an event the client can follow.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        now = time.time()
        out = Recovery()
        with self._tx() as db:
            query = "SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'running'"
            rows = db.execute(query, ()).fetchall() if worker is None else db.execute(query + " AND worker = ?", (worker,)).fetchall()
            for row in rows:
                job_id, attempts = row["id"], row["attempts"]
                data = {"code": code, "attempt": attempts, "max_attempts": max_attempts}
                if row["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id))
                    self._add_event(db, job_id, "cancelled", f"Job cancelled ({reason})", now=now, data=data)
                    out.cancelled.append(job_id)
                elif attempts < max_attempts:
                    db.execute(
                        "UPDATE jobs SET status = 'queued', worker = NULL, started_at = NULL, progress = NULL WHERE id = ?", (job_id,)
                    )
                    message = f"{reason}; attempt {attempts} of {max_attempts} did not complete, so the job is queued again"
                    self._add_event(db, job_id, "requeued", message, level="warning", now=now, data=data)
                    out.requeued.append(job_id)
                else:
                    message = f"{reason}; the job was given up after {attempts} attempt(s) (limit {max_attempts})"
                    db.execute(
                        "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                        (now, _dumps({"message": message, "code": code}), job_id),
                    )
                    self._add_event(db, job_id, "failed", message, level="error", now=now, data=data)
                    out.failed.append(job_id)
        return out

    # -- worker-side transitions ------------------------------------------------------------
    def claim(self, worker: str) -> Job | None:
        """Atomically move the oldest queued job to running for ``worker``."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            cur = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ?, attempts = attempts + 1, "
                "progress = NULL, error = NULL WHERE id = ? AND status = 'queued'",
                (now, worker, row["id"]),
            )
            if cur.rowcount != 1:
                return None
            self._add_event(db, row["id"], "started", "Job started", now=now, data={"worker": worker})
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _job(job)

    def record_progress(self, job_id: str, worker: str, progress: dict[str, Any], message: str) -> bool:
        """Persist a progress event. False when the job is no longer this worker's running job."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running' AND worker = ?",
                (_dumps(progress), job_id, worker),
            )
            if cur.rowcount != 1:
                return False
            self._add_event(db, job_id, "progress", message, now=now, data=progress)
        return True

    def add_event(self, job_id: str, type: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            self._add_event(db, job_id, type, message, level=level, data=data)

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["cancel_requested"])

    def still_owned(self, job_id: str, worker: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND worker = ?", (job_id, worker)
        ).fetchone()
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
                "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ? "
                "WHERE id = ? AND status = 'running' AND worker = ?",
                (status, now, _dumps(result), _dumps(error), job_id, worker),
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
                "SELECT cancel_requested FROM jobs WHERE id = ? AND status = 'running' AND worker = ?", (job_id, worker)
            ).fetchone()
            if row is None:
                return False
            if row["cancel_requested"]:
                db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id))
                self._add_event(db, job_id, "cancelled", "Job cancelled", now=now)
            else:
                db.execute(
                    "UPDATE jobs SET status = 'queued', worker = NULL, started_at = NULL, progress = NULL WHERE id = ?",
                    (job_id,),
                )
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
        row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else _file(row)

    def list_files(
        self, *, after: str | None = None, limit: int = 20, purpose: str | None = None, order: str = "desc"
    ) -> tuple[list[StoredFile], bool]:
        """By creation, newest first unless ``order="asc"``; ``after`` is the last id of the previous page."""
        rows, has_more = self._page("files", after=after, limit=limit, equal={"purpose": purpose}, order=order)
        return [_file(r) for r in rows], has_more

    def file_ids(self) -> set[str]:
        return {r["id"] for r in self._db.execute("SELECT id FROM files")}

    def delete_file(self, file_id: str) -> StoredFile:
        """Remove a file's record; :class:`FileInUse` while a queued or running job reads it."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                raise KeyError(file_id)
            users = db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND "
                "(json_extract(spec, '$.model.file_id') = ? OR json_extract(spec, '$.calibration.file_id') = ?) ORDER BY id",
                (file_id, file_id),
            ).fetchall()
            if users:
                raise FileInUse(file_id, [r["id"] for r in users])
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return _file(row)

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _add_event(
        db: sqlite3.Connection,
        job_id: str,
        type: str,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO job_events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, time.time() if now is None else now, level, type, message, _dumps(data)),
        )
