"""Service settings: environment variables (``MM_*``) with keyword overrides.

=======================  ===================================================================
``MM_DATA_DIR``          data directory (``./data``): ``jobs.sqlite3``, ``jobs/<id>/``, ``files/<id>``
``MM_API_KEY``           bearer key required on ``/v1`` routes (unset: no auth)
``MM_MODEL_ROOTS``       folders jobs may read models/calibration files from (``os.pathsep``)
``MM_SERVED_MODELS``     local models to serve by name: ``NAME=PATH`` entries (``os.pathsep``);
                         ``--model NAME=PATH`` replaces them (see :mod:`worker.served`)
``MM_MAX_BODY_BYTES``    largest request body (1 MiB), except uploads
``MM_MAX_UPLOAD_BYTES``  largest file upload, ``POST /v1/files`` (4 GiB)
``MM_MAX_QUEUED_JOBS``   queued jobs beyond which submissions get 429 (16)
``MM_MAX_INFLIGHT``      concurrent generation requests beyond which requests get 429 (unset:
                         twice the worker's decode batch, so 32 on a CPU worker, 256 on a GPU)
``MM_MAX_PROMPTS``       prompts x n per completion request (16)
``MM_REQUEST_TIMEOUT``   seconds a generation request may take in all, model load included
                         (300); then 504 ``request_timeout`` (see below)
``MM_WORKER_SOCKET``     Unix socket of the worker (``<data>/run/worker.sock``)
``MM_WORKER_URL``        use an already running worker at this URL (``unix:/path`` or
                         ``http://127.0.0.1:port``) instead of starting one
``MM_WORKERS``           worker hosts to front over TCP, comma-separated ``http(s)://host:port``
                         (``--worker URL``, repeatable); the gateway then starts no worker
``MM_WORKER_TOKEN``      the token every internal request carries (shared with those workers;
                         unset: a random one for the gateway's own worker)
``MM_WORKER_MEMORY_MB``  memory budget of the worker's loaded models (4096)
``MM_WORKER_THREADS``    BLAS/OpenMP threads of the worker (CPU count)
``MM_WORKER_JOBS``       ``0`` to run a generation-only worker (jobs stay queued)
=======================  ===================================================================

Generation limits (:mod:`service.openai_api`): past the in-flight limit a request gets 429
``too_many_requests`` with ``Retry-After: 1`` and never reaches the worker. A request that
takes longer than ``MM_REQUEST_TIMEOUT`` is cancelled: 504 ``request_timeout``, or, once a
stream has started, that error as its last SSE event. ``MM_STREAM_IDLE_TIMEOUT`` (60) bounds
how long a stream may go without a line from the worker once its first token came (a stalled
worker holds its client no longer than that; waiting for a batch row and prefill count only
against ``MM_REQUEST_TIMEOUT``): the stream ends with a ``stream_timeout`` error event and the
generation is cancelled.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from urllib.parse import urlsplit
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jobstore import DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS_ENV, MAX_DATA_BYTES_ENV
from worker.served import parse_served_models
from worker.sources import parse_roots

DEFAULT_INFLIGHT = 32  # the in-flight limit before the worker reports its decode batch
MAX_UDS_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean (1/0), got {raw!r}")


def parse_worker_urls(urls: Any) -> list[str]:
    """``http(s)://host:port`` worker URLs (blank entries dropped, duplicates refused)."""
    out: list[str] = []
    for raw in urls or ():
        url = str(raw).strip().rstrip("/")
        if not url:
            continue
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path or parsed.query:
            raise ValueError(f"a worker URL must be http(s)://host:port, got {url!r} (MM_WORKERS, --worker)")
        if url in out:
            raise ValueError(f"worker {url!r} is named twice (MM_WORKERS, --worker)")
        out.append(url)
    return out


def default_socket_path(data_dir: Path) -> Path:
    """``<data>/run/worker.sock``, or a short path under the temp dir if that is too long."""
    path = data_dir.resolve() / "run" / "worker.sock"
    if len(str(path)) <= MAX_UDS_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mm-{digest}" / "worker.sock"


@dataclass
class Settings:
    data_dir: Path = Path("data")
    api_key: str | None = None
    model_roots: str = ""
    served_models: Any = field(default_factory=dict)  # NAME=PATH entries; {name: Path} after init
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 4 << 30
    #: Uploads and results together (in-progress ones included) stay under this; None: no quota.
    max_data_bytes: int | None = None
    max_queued_jobs: int = 16
    #: A job whose worker dies goes back to the queue until it has started this many times.
    job_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: Queued plus running jobs one API key may have (all clients share one key without auth).
    max_jobs_per_key: int = 4
    #: None: follow the worker (:meth:`inflight_limit`); a number: exactly that many.
    max_inflight: int | None = None
    max_prompts: int = 16
    request_timeout_s: float = 300.0
    #: Seconds a streamed generation may go without a line from the worker after its first token.
    stream_idle_timeout_s: float = 60.0
    worker_socket: Path | None = None
    worker_url: str | None = None
    #: Worker hosts the gateway fronts over TCP (``--worker URL``, ``MM_WORKERS``); it starts none.
    workers: tuple[str, ...] = ()
    worker_memory_mb: int = 4096
    worker_threads: int | None = None
    worker_jobs: bool = True
    worker_start_timeout_s: float = 180.0
    worker_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.served_models = parse_served_models(self.served_models)
        if self.api_key == "":
            self.api_key = None
        self.workers = tuple(parse_worker_urls(self.workers))
        if self.workers and self.worker_url is not None:
            raise ValueError("give either several workers (--worker, MM_WORKERS) or one worker URL (--worker-url, MM_WORKER_URL), not both")
        if self.worker_socket is None and self.worker_url is None:
            self.worker_socket = default_socket_path(self.data_dir)
        if self.worker_socket is not None:
            self.worker_socket = Path(self.worker_socket)
        for name in ("max_body_bytes", "max_upload_bytes", "max_data_bytes", "max_queued_jobs", "job_max_attempts", "max_jobs_per_key", "max_inflight", "max_prompts", "worker_memory_mb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "stream_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def inflight_limit(self, worker_batch: int | None) -> int:
        """Generation requests admitted at once. Unless ``MM_MAX_INFLIGHT`` fixes it: twice the
        worker's decode batch (``worker_batch``, from its readiness answer), so one full batch
        decodes while as many wait for a free row; a GPU worker batches 128 sequences where a
        CPU one batches 16, and a fixed 32 would leave most of a GPU's batch empty. 32 while
        the worker has not said (it is not ready then, and requests get 503 anyway)."""
        if self.max_inflight is not None:
            return self.max_inflight
        return 2 * worker_batch if worker_batch else DEFAULT_INFLIGHT

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys: ``api_key`` split at commas (empty: no authentication)."""
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip())

    @property
    def spawn_worker(self) -> bool:
        """Start and supervise our own worker (unless ``worker_url`` names an external one)."""
        return self.worker_url is None and not self.workers

    @property
    def roots(self) -> list[Path]:
        return parse_roots(self.model_roots)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from ``MM_*`` variables; keyword arguments that are not None win."""
        threads = os.environ.get("MM_WORKER_THREADS", "").strip()
        values: dict[str, Any] = {
            "data_dir": Path(os.environ.get("MM_DATA_DIR", "").strip() or "data"),
            "api_key": os.environ.get("MM_API_KEY") or None,
            "model_roots": os.environ.get("MM_MODEL_ROOTS", ""),
            "served_models": os.environ.get("MM_SERVED_MODELS", ""),
            "max_body_bytes": _env_int("MM_MAX_BODY_BYTES", 1 << 20),
            "max_upload_bytes": _env_int("MM_MAX_UPLOAD_BYTES", 4 << 30),
            "max_data_bytes": _env_int(MAX_DATA_BYTES_ENV, None),
            "max_jobs_per_key": _env_int("MM_MAX_JOBS_PER_KEY", 4),
            "max_queued_jobs": _env_int("MM_MAX_QUEUED_JOBS", 16),
            "job_max_attempts": _env_int(MAX_ATTEMPTS_ENV, DEFAULT_MAX_ATTEMPTS),
            "max_inflight": _env_int("MM_MAX_INFLIGHT", None),
            "max_prompts": _env_int("MM_MAX_PROMPTS", 16),
            "request_timeout_s": _env_float("MM_REQUEST_TIMEOUT", 300.0),
            "stream_idle_timeout_s": _env_float("MM_STREAM_IDLE_TIMEOUT", 60.0),
            "worker_socket": Path(os.environ["MM_WORKER_SOCKET"]) if os.environ.get("MM_WORKER_SOCKET") else None,
            "worker_url": os.environ.get("MM_WORKER_URL") or None,
            "workers": tuple(os.environ.get("MM_WORKERS", "").split(",")),
            "worker_memory_mb": _env_int("MM_WORKER_MEMORY_MB", 4096),
            "worker_threads": int(threads) if threads else None,
            "worker_jobs": _env_bool("MM_WORKER_JOBS", True),
        }
        if os.environ.get("MM_WORKER_TOKEN"):  # shared with workers on other hosts
            values["worker_token"] = os.environ["MM_WORKER_TOKEN"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **overrides)
