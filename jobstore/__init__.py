"""The job store: jobs, their events, uploaded files and idempotency keys, shared by the
service (which creates and reads jobs) and the worker (which claims and finishes them).

:class:`JobStore` is the interface (:mod:`jobstore.base`); :func:`open_store` picks the
backend. Today that is the SQLite file in the data directory. This package imports neither
MLX nor FastAPI.
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
from jobstore.sqlite import SQLiteJobStore


#: How many times a job may start before a crash of its worker fails it (``MM_JOB_MAX_ATTEMPTS``).
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_ENV = "MM_JOB_MAX_ATTEMPTS"
#: The disk quota for uploads and results together, in bytes (unset: none).
MAX_DATA_BYTES_ENV = "MM_MAX_DATA_BYTES"


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
    """The job store of a data directory."""
    return SQLiteJobStore.in_data_dir(data_dir)


__all__ = [
    "EVENT_ID_PREFIX", "FILE_ID_PREFIX", "FILE_PURPOSES", "JOB_ID_PREFIX", "JOB_STATUSES", "TERMINAL_STATUSES",
    "DEFAULT_MAX_ATTEMPTS", "MAX_ATTEMPTS_ENV", "MAX_DATA_BYTES_ENV", "job_max_attempts",
    "FileInUse", "IdempotencyConflict", "Job", "JobEvent", "JobStateError", "JobStore", "OwnerLimit", "QueueFull", "Recovery",
    "SQLiteJobStore", "StoredFile", "fingerprint", "is_file_id", "is_job_id", "new_file_id", "new_job_id",
    "open_store", "parse_event_id",
]
