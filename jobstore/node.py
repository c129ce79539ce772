"""Which worker host a job runs on, so that recovery touches only the jobs of the one that died.

Several workers may share one job store. Each claims jobs under a claim token of its own
process (``worker``) and under its *node*: ``MM_WORKER_NAME`` when set, else this host's name
and its data directory. One worker at a time holds a data directory (its lock), so when a
worker starts, or its supervisor sees it die, every running job of its node belonged to a
process that is gone: those, and only those, are settled at once. A worker on another host
that dies is noticed by its lease instead (``MM_JOB_LEASE_S`` without a heartbeat).
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

NAME_ENV = "MM_WORKER_NAME"
LEASE_ENV = "MM_JOB_LEASE_S"
DEFAULT_LEASE_S = 60.0


def worker_node(data_dir: str | os.PathLike[str]) -> str:
    """This host's worker node: ``MM_WORKER_NAME``, else ``<hostname>:<digest of the data dir>``."""
    name = os.environ.get(NAME_ENV, "").strip()
    if name:
        return name
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}:{digest}"


def job_lease_s() -> float:
    """``MM_JOB_LEASE_S``: seconds a running job may go without its worker's heartbeat before
    another worker takes it back (default 60; the worker heartbeats every third of it)."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    try:
        value = float(raw or DEFAULT_LEASE_S)
    except ValueError:
        value = 0.0
    if value < 1:
        raise ValueError(f"{LEASE_ENV} must be a number of seconds >= 1, got {raw!r}")
    return value
