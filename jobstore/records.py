"""What the job store holds: jobs, their events, uploaded files; their ids and the store's errors.

Plain data, shared by every backend (:mod:`jobstore.sqlite` today) and by their users (the
service and the worker). Nothing here touches a database.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PREFIX = "qjob-"
EVENT_ID_PREFIX = "qjev-"
FILE_ID_PREFIX = "file-"
FILE_PURPOSES = ("model", "calibration")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request body (job {job_id})")
        self.key = key
        self.job_id = job_id


class FileInUse(Exception):
    """A queued or running job reads the file (maps to HTTP 409)."""

    def __init__(self, file_id: str, job_ids: list[str]) -> None:
        super().__init__(f"file {file_id} is a source of queued or running job(s) {', '.join(job_ids)}; cancel them first")
        self.file_id = file_id
        self.job_ids = job_ids


class JobStateError(Exception):
    """The job is not in a state that allows the operation (maps to HTTP 409)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    created_at: float
    status: str
    spec: dict[str, Any]
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    attempts: int
    worker: str | None
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    #: Who submitted it: a digest of the API key (never the key), None without auth.
    owner: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass
class StoredFile:
    """An uploaded file's record; its bytes are ``<data>/files/<id>``."""

    id: str
    created_at: float
    bytes: int
    filename: str
    purpose: str
    format: str


@dataclass
class Recovery:
    """What :meth:`~jobstore.base.JobStore.recover_running` did with the jobs of a dead process."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


@dataclass
class JobEvent:
    id: int
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @property
    def public_id(self) -> str:
        return f"{EVENT_ID_PREFIX}{self.id}"


_id_lock = threading.Lock()
_id_last = (0, 0)


def _new_sorted_id(prefix: str, now: float | None) -> str:
    """``prefix`` + 12 hex digits of milliseconds + a 4-digit sequence + 8 random hex digits.

    Ids sort by creation (strictly, within this process), so a list cursor (``after``)
    stays valid even when the item it names was deleted.
    """
    global _id_last
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        last_ms, last_seq = _id_last
        if ms <= last_ms:
            ms, seq = last_ms, last_seq + 1
            if seq > 0xFFFF:
                ms, seq = ms + 1, 0
        else:
            seq = 0
        _id_last = (ms, seq)
    return f"{prefix}{ms:012x}{seq:04x}{secrets.token_hex(4)}"


def _is_sorted_id(value: str, prefix: str) -> bool:
    body = value[len(prefix) :]
    return value.startswith(prefix) and len(body) == 24 and all(c in "0123456789abcdef" for c in body)


def new_job_id(now: float | None = None) -> str:
    return _new_sorted_id(JOB_ID_PREFIX, now)


def new_file_id(now: float | None = None) -> str:
    return _new_sorted_id(FILE_ID_PREFIX, now)


def is_job_id(value: str) -> bool:
    return _is_sorted_id(value, JOB_ID_PREFIX)


def is_file_id(value: str) -> bool:
    return _is_sorted_id(value, FILE_ID_PREFIX)


def parse_event_id(value: str) -> int | None:
    if not value.startswith(EVENT_ID_PREFIX) or not value[len(EVENT_ID_PREFIX) :].isdigit():
        return None
    return int(value[len(EVENT_ID_PREFIX) :])


def fingerprint(payload: Any) -> str:
    """Stable hash of a JSON-able request body (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class QueueFull(Exception):
    """Too many queued jobs (maps to HTTP 429)."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"the job queue is full ({queued} queued, limit {limit}); retry later")
        self.queued = queued
        self.limit = limit


class OwnerLimit(Exception):
    """One API key has too many queued and running jobs (maps to HTTP 429)."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"this API key has {active} queued or running jobs (limit {limit}); wait for one to finish or cancel one")
        self.active = active
        self.limit = limit
