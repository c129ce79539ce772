"""The job store: jobs, their events, uploaded files and idempotency keys, shared by the
service (which creates and reads jobs) and the worker (which claims and finishes them).

:class:`JobStore` is the interface (:mod:`jobstore.base`); :func:`open_store` picks the
backend: the SQLite file in the data directory by default, a Postgres database when
``MM_DATABASE_URL`` names one (several gateways and worker hosts then share it). This package
imports neither MLX nor FastAPI; psycopg only when Postgres is selected.
"""

from __future__ import annotations

import os

from jobstore.base import JobStore
from jobstore.records import (
    EVENT_ID_PREFIX,
    FILE_ID_PREFIX,
    FILE_PURPOSES,
    JOB_ID_PREFIX,
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
    fingerprint,
    is_file_id,
    is_job_id,
    new_file_id,
    new_job_id,
    parse_event_id,
)
from jobstore.redact import redact_url
from jobstore.sqlite import SQLiteJobStore


#: How many times a job may start before a crash of its worker fails it (``MM_JOB_MAX_ATTEMPTS``).
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_ENV = "MM_JOB_MAX_ATTEMPTS"
#: The disk quota for uploads and results together, in bytes (unset: none).
MAX_DATA_BYTES_ENV = "MM_MAX_DATA_BYTES"
#: A ``postgresql://`` (or ``postgres://``) URL selects the Postgres job store; unset: SQLite.
DATABASE_URL_ENV = "MM_DATABASE_URL"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def job_max_attempts() -> int:
    """The retry cap for jobs whose worker died (``MM_JOB_MAX_ATTEMPTS``, default 3)."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV} must be a whole number >= 1, got {raw!r}")
    return value


def open_store(data_dir: str | os.PathLike[str]) -> JobStore:
    """The job store: Postgres when ``MM_DATABASE_URL`` is set, else the SQLite file of ``data_dir``.

    The service, the worker and the worker's job processes all open it here, and the worker
    inherits the service's environment, so they agree on the backend. A URL of another scheme,
    one that does not parse, or a missing psycopg raise ``ValueError`` naming the variable; an
    unreachable server raises ``ConnectionError``. The password never appears in either.
    """
    url = os.environ.get(DATABASE_URL_ENV, "").strip()
    if not url:
        return SQLiteJobStore.in_data_dir(data_dir)
    if not url.lower().startswith(POSTGRES_SCHEMES):
        raise ValueError(
            f"{DATABASE_URL_ENV} must be a postgresql:// (or postgres://) URL, got {redact_url(url)!r}; "
            "unset it to keep jobs in the data directory's SQLite file"
        )
    try:
        from jobstore.postgres import PostgresJobStore
    except ImportError as exc:
        raise ValueError(
            f"{DATABASE_URL_ENV} selects the Postgres job store, which needs psycopg 3: pip install 'metal-marlin[postgres]' ({exc})"
        ) from exc
    return PostgresJobStore(url, setting=DATABASE_URL_ENV)


__all__ = [
    "EVENT_ID_PREFIX", "FILE_ID_PREFIX", "FILE_PURPOSES", "JOB_ID_PREFIX", "JOB_STATUSES", "TERMINAL_STATUSES",
    "DATABASE_URL_ENV", "DEFAULT_MAX_ATTEMPTS", "MAX_ATTEMPTS_ENV", "MAX_DATA_BYTES_ENV", "POSTGRES_SCHEMES", "job_max_attempts",
    "FileInUse", "IdempotencyConflict", "Job", "JobEvent", "JobStateError", "JobStore", "OwnerLimit", "QueueFull", "Recovery",
    "SQLiteJobStore", "StoredFile", "fingerprint", "is_file_id", "is_job_id", "new_file_id", "new_job_id",
    "open_store", "parse_event_id",
]
