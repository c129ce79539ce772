"""The SQLite job store: one database file (stdlib ``sqlite3``, WAL mode) in the data directory.

The service inserts jobs and reads them; the worker claims queued jobs atomically
(``UPDATE ... WHERE status='queued'``), records progress events and the outcome. Several
processes (service, worker, the worker's job process) open the same file; WAL lets readers
proceed while one writer commits, and ``busy_timeout`` serialises writers.

Every state change that a stale process could race is guarded in SQL: a worker may only
finish a job it claimed (``worker = ?``) while it is still ``running``, so a job that the
service already failed after a worker crash can never be flipped to ``succeeded``. Those
queries are shared with the Postgres backend (:mod:`jobstore.sql`); this module holds the
connection handling, the schema and its migrations.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobstore.sql import SQLJobStore

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
    # which worker host claimed a job, and when its worker last said it was alive (per-host
    # recovery and leases when several workers share the store)
    (3, "ALTER TABLE jobs ADD COLUMN worker_node TEXT;\nALTER TABLE jobs ADD COLUMN heartbeat_at REAL;"),
)
SCHEMA_VERSION = _MIGRATIONS[-1][0]


class SQLiteJobStore(SQLJobStore):
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

    # -- what the shared queries need (jobstore.sql) ------------------------------------
    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection: a single statement reads a consistent snapshot in WAL mode."""
        yield self._db

    def _spec_file_id(self, part: str) -> str:
        return f"json_extract(spec, '$.{part}.file_id')"
