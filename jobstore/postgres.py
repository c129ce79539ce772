"""The Postgres job store: one database shared by several gateways and worker hosts.

Selected by ``MM_DATABASE_URL=postgresql://...`` (:func:`jobstore.open_store`); psycopg 3 with
a ``psycopg_pool.ConnectionPool``. The queries and the rules are the SQLite store's
(:mod:`jobstore.sql`), so records, errors, ordering and pagination are the same. What differs
is how concurrent writers are kept apart: SQLite takes one write lock per transaction,
Postgres runs transactions side by side (READ COMMITTED), so

- a claim selects the oldest queued job ``FOR UPDATE SKIP LOCKED`` and moves it to running in
  the same transaction: each job goes to one worker, and concurrent claimers take the next
  job instead of waiting for the first;
- every transition that reads a job and then writes it locks the job's row (``FOR UPDATE``),
  so a cancel cannot overwrite a claim it raced. Event rows are only inserted under that row
  lock, so one job's event ids commit in increasing order (a follower never skips one);
- ``create_job`` takes transaction-scoped advisory locks, always in the same order: the queue
  (with a queue bound), the owner (with a per-owner bound), the idempotency key. Creators whose
  counts could race run one after the other; the second sees the first's committed row. The
  key is the primary key of ``idempotency_keys``, so across replicas it names one job at most;
- an event is announced with ``NOTIFY mm_job_events, '<job id>'`` (delivered at commit).
  :meth:`PostgresJobStore.wait_for_events` listens on a connection of its own in a background
  thread and wakes the waiters of that job; while that connection is down, waiters time out
  and their callers poll, as with SQLite;
- the schema is versioned (``schema_version``: one row per applied migration) and brought up
  to date when a store opens, in one transaction under an advisory lock, so replicas that
  start together apply each migration once.

Ids and timestamps come from the same code as SQLite's (:mod:`jobstore.records`; seconds since
the epoch as ``double precision``). Id columns are ``COLLATE "C"``: they sort bytewise, as in
SQLite, whatever the database's locale. The tables live in the connection's current schema
(the first of its ``search_path``), so one database can hold several stores. Needs
PostgreSQL 11 or newer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from jobstore.redact import redact_url, redact_url_secrets
from jobstore.sql import Cursor, Handle, SQLJobStore

log = logging.getLogger("metal_marlin.jobstore.postgres")

#: The NOTIFY channel of new events; the payload is the job id.
EVENTS_CHANNEL = "mm_job_events"
#: Advisory lock names are hashed to a 64-bit key (``hashtextextended``) under this prefix.
LOCK_NAMESPACE = "metal-marlin:"
#: How long a first waiter waits for the LISTEN connection before it reads (so no event falls
#: between its read and the LISTEN); past that it polls.
LISTEN_READY_S = 2.0
#: How often the listener thread looks up from its socket to see whether it should stop.
LISTEN_TICK_S = 0.5

_SCHEMA_V1 = """
CREATE TABLE jobs (
    id               TEXT COLLATE "C" PRIMARY KEY,
    created_at       DOUBLE PRECISION NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
    spec             TEXT NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    progress         TEXT,
    error            TEXT,
    result           TEXT
);
CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE TABLE job_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at DOUBLE PRECISION NOT NULL,
    level      TEXT NOT NULL,
    type       TEXT NOT NULL,
    message    TEXT NOT NULL,
    data       TEXT
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
CREATE TABLE files (
    id         TEXT COLLATE "C" PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    bytes      BIGINT NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    format     TEXT NOT NULL
);
CREATE INDEX files_by_purpose ON files (purpose, id);
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id      TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  DOUBLE PRECISION NOT NULL
)
"""

#: ``(version, script)``, applied in order; the numbers match the SQLite store's, so a version
#: names the same tables in both. Append, never edit: a database in the field is at any version.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _SCHEMA_V1),
    # who submitted a job (a digest of the API key), for per-key limits
    (2, "ALTER TABLE jobs ADD COLUMN owner TEXT;\nCREATE INDEX jobs_by_owner ON jobs (owner, status)"),
    # which worker host claimed a job, and when its worker last said it was alive (per-host
    # recovery and leases when several workers share the store)
    (3, "ALTER TABLE jobs ADD COLUMN worker_node TEXT;\nALTER TABLE jobs ADD COLUMN heartbeat_at DOUBLE PRECISION"),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_VERSIONS_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))"


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """The shared ``?`` placeholders as psycopg's ``%s`` (the shared SQL never holds a literal ``?`` or ``%``)."""
    if "%" in sql:
        raise ValueError(f"a literal % in shared SQL would be read as a placeholder: {sql!r}")
    return sql.replace("?", "%s")


def _pg_param(value: Any) -> Any:
    """Postgres text cannot hold NUL (SQLite's can): store U+FFFD in its place rather than fail a write."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class _Handle:
    """A psycopg connection as :mod:`jobstore.sql` uses it."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        # no parameters: None, so a migration script may hold several statements
        return self.conn.execute(_pg_sql(sql), [_pg_param(p) for p in params] if params else None)  # type: ignore[arg-type]


class _EventListener:
    """``LISTEN mm_job_events`` on a connection of its own, in a daemon thread; fans each
    notification out to the callbacks registered for its job id."""

    def __init__(self, url: str, connect_kwargs: dict[str, Any], describe: str) -> None:
        self._url = url
        self._connect_kwargs = connect_kwargs
        self._describe = describe
        self._waiters: dict[str, set[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, job_id: str, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(wake)

    def remove(self, job_id: str, wake: Callable[[], None]) -> None:
        with self._lock:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[job_id]

    def ensure_started(self, wait_s: float) -> bool:
        """Start the thread on first use and give it ``wait_s`` to LISTEN; True when it listens."""
        with self._lock:
            started = self._thread is not None
            if not started:
                self._thread = threading.Thread(target=self._run, name="mm-jobstore-listen", daemon=True)
                self._thread.start()
        return self._ready.is_set() if started else self._ready.wait(wait_s)

    def stop(self) -> None:
        """Ask the thread to end: it closes its connection within :data:`LISTEN_TICK_S` (not
        waited for: closing a store should not cost a tick)."""
        self._stop.set()

    def _wake(self, job_ids: list[str] | None) -> None:
        with self._lock:
            if job_ids is None:
                callbacks = [w for ws in self._waiters.values() for w in ws]
            else:
                callbacks = [w for job_id in job_ids for w in self._waiters.get(job_id, ())]
        for wake in callbacks:
            wake()

    def _run(self) -> None:
        delay, connected_before = 0.1, False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, **self._connect_kwargs) as conn:
                    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(EVENTS_CHANNEL)))
                    self._ready.set()
                    if connected_before:
                        self._wake(None)  # notifications sent while we were away are lost: re-read
                    connected_before, delay = True, 0.1
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=LISTEN_TICK_S):  # yields each one as it arrives
                            self._wake([note.payload])
            except psycopg.Error as exc:
                reason = redact_url_secrets(str(exc).strip(), self._url)
                log.warning("event listener on %s lost its connection (%s); waiters poll until it is back", self._describe, reason)
            finally:
                self._ready.clear()
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)


class PostgresJobStore(SQLJobStore):
    """The job store in a Postgres database (thread-safe: a connection pool per process)."""

    FOR_UPDATE = " FOR UPDATE"
    FOR_CLAIM = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, url: str, *, setting: str = "the database URL", min_size: int = 1, max_size: int = 10, timeout_s: float = 10.0
    ) -> None:
        """Check ``url``, connect, and migrate the schema. ``setting`` names where the URL came
        from (``MM_DATABASE_URL``) in errors. Raises ``ValueError`` for a URL that does not parse
        and ``ConnectionError`` when the server cannot be reached; neither shows the password.
        The pool (opened on first use) keeps ``min_size`` to ``max_size`` connections; a call
        waits up to ``timeout_s`` for one."""
        self.url = url
        self.setting = setting
        self.min_size, self.max_size, self.timeout_s = min_size, max_size, timeout_s
        self._describe = f"{setting}={redact_url(url)}"
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ValueError(f"{self._describe} is not a valid PostgreSQL connection URL: {redact_url_secrets(str(exc), url)}") from None
        self._connect_kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if "connect_timeout" not in given:  # the URL's own wins
            self._connect_kwargs["connect_timeout"] = max(1, round(timeout_s))
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._listener: _EventListener | None = None
        self._pid = os.getpid()
        self._migrate()

    def __repr__(self) -> str:
        return f"PostgresJobStore({self._describe})"

    def _unavailable(self, exc: BaseException) -> ConnectionError:
        return ConnectionError(f"cannot reach the Postgres job store ({self._describe}): {redact_url_secrets(str(exc).strip(), self.url)}")

    # -- schema --------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION`: every missing migration in one
        transaction, under an advisory lock, so stores that open at once apply each once (the
        second waits, then finds them recorded)."""
        try:
            conn = psycopg.connect(self.url, **self._connect_kwargs)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        try:
            with conn, conn.transaction():
                db = _Handle(conn)
                db.execute(_ADVISORY_LOCK, (LOCK_NAMESPACE + "schema",))
                db.execute(_VERSIONS_TABLE)
                current = db.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version").fetchone()["v"]
                for version, script in MIGRATIONS:
                    if version > current:
                        db.execute(script)
                        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time()))
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        except psycopg.Error as exc:  # e.g. no CREATE privilege on the schema
            raise RuntimeError(f"cannot bring the Postgres job store ({self._describe}) to schema version {SCHEMA_VERSION}: {exc}") from exc
        if current > SCHEMA_VERSION:
            log.warning("%s is at schema version %d, newer than this code's %d", self._describe, current, SCHEMA_VERSION)

    def schema_versions(self) -> list[int]:
        """The migrations applied to this database, in order."""
        with self._read() as db:
            return [r["version"] for r in db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]

    # -- connection handling -------------------------------------------------------------
    def _connection_pool(self) -> ConnectionPool[Any]:
        """This process's pool, opened on first use (after a fork the parent's is not ours)."""
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            self._forget_parents()
            if self._pool is None:
                pool = ConnectionPool(
                    self.url,
                    kwargs=self._connect_kwargs,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    open=False,
                    timeout=self.timeout_s,
                    check=ConnectionPool.check_connection,  # a server restart costs a reconnect, not an error
                    name="mm-jobstore",
                )
                try:
                    pool.open(wait=True, timeout=self.timeout_s)
                except PoolTimeout as exc:
                    pool.close()
                    raise self._unavailable(exc) from None
                self._pool = pool
            return self._pool

    def _forget_parents(self) -> None:
        """In a forked child, drop the parent's pool and listener (their threads stayed behind); under ``_lock``."""
        if self._pid != os.getpid():
            self._pool = self._listener = None
            self._pid = os.getpid()

    @contextmanager
    def _read(self) -> Iterator[_Handle]:
        """A pooled connection in autocommit: each read is one statement, its own snapshot."""
        with self._connection_pool().connection() as conn:
            yield _Handle(conn)

    @contextmanager
    def _tx(self) -> Iterator[_Handle]:
        with self._connection_pool().connection() as conn, conn.transaction():
            yield _Handle(conn)

    def close(self) -> None:
        """Close the pool and the listener; the next call opens new ones."""
        with self._lock:
            pool, listener, mine = self._pool, self._listener, self._pid == os.getpid()
            self._pool = self._listener = None
        if listener is not None and mine:
            listener.stop()
        if pool is not None and mine:
            pool.close(timeout=self.timeout_s)

    # -- the hooks of the shared queries ---------------------------------------------------
    def _lock_for_create(self, db: Handle, *, idempotency_key: str | None, owner: str | None, queue_bounded: bool, owner_bounded: bool) -> None:
        names = []
        if queue_bounded:
            names.append("queue")
        if owner_bounded:
            names.append("owner" if owner is None else f"owner={owner}")
        if idempotency_key is not None:
            names.append(f"key={idempotency_key}")
        for name in names:  # always in this order: two creators never wait on each other in a cycle
            db.execute(_ADVISORY_LOCK, (LOCK_NAMESPACE + name,))

    def _event_added(self, db: Handle, job_id: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (EVENTS_CHANNEL, job_id))

    def _spec_file_id(self, part: str) -> str:
        return f"(spec::json #>> '{{{part},file_id}}')"

    # -- waiting for events ------------------------------------------------------------------
    def _event_listener(self) -> _EventListener:
        with self._lock:
            self._forget_parents()
            if self._listener is None:
                self._listener = _EventListener(self.url, self._connect_kwargs, self._describe)
            return self._listener

    def _has_events_after(self, job_id: str, after: int | None, listener: _EventListener, wait_s: float) -> bool:
        listener.ensure_started(wait_s)  # LISTEN before reading, so nothing falls between the two
        return bool(self.events(job_id, after=after, limit=1)[0])

    async def wait_for_events(self, job_id: str, *, after: int | None, timeout_s: float) -> bool:
        """Return as soon as ``job_id`` has an event after ``after`` (True), or after
        ``timeout_s`` (False). Registers with the listener, then reads once (an event written
        before the registration is found by the read, one after it by the notification)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        woken = asyncio.Event()

        def wake() -> None:  # from the listener thread
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        listener = self._event_listener()
        listener.add(job_id, wake)
        try:
            if await asyncio.to_thread(self._has_events_after, job_id, after, listener, min(LISTEN_READY_S, timeout_s)):
                return True
            remaining = deadline - loop.time()
            if remaining > 0:
                try:
                    await asyncio.wait_for(woken.wait(), remaining)
                except asyncio.TimeoutError:
                    return False
            return woken.is_set()
        finally:
            listener.remove(job_id, wake)
