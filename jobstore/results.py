"""Where succeeded jobs' results live: the interface, the local-disk default, and the selector.

The worker publishes a result (a staged folder with its ``.checksums.json``); the gateway lists,
downloads and deletes results; a worker that serves a job's model asks for a local folder of it.
Two backends behind :class:`ResultStore`:

- :class:`LocalResults` (the default): ``<data>/jobs/<job_id>/``, published by one ``rename``
  of the staged folder, so a result is visible whole or not at all;
- :class:`jobstore.s3results.S3Results` (``MM_RESULTS_URL=s3://bucket/prefix``): shared by
  several hosts; see that module for how it keeps the same guarantee without a rename.

This module imports neither boto3 nor MLX; boto3 only when S3 is selected.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from jobstore.layout import format_dir, holds_weights, jobs_dir, remove_tree, result_dir
from jobstore.records import is_job_id
from jobstore.redact import redact_url

#: ``s3://bucket/prefix`` selects S3-compatible storage; unset: the data directory.
RESULTS_URL_ENV = "MM_RESULTS_URL"
#: Seconds a presigned download link stays valid; unset or 0: downloads stream through the gateway.
PRESIGN_ENV = "MM_RESULTS_PRESIGN_S"


@dataclass
class ResultFile:
    """An open file of a result: its size and its bytes, read lazily (``close`` when done early)."""

    size: int
    chunks: Iterator[bytes]

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


class ResultStore(ABC):
    """Published results of succeeded jobs, keyed by job id; ``rel`` paths are ``/``-separated
    and relative to a result (``model.safetensors``, ``autoawq/model.safetensors``)."""

    #: Where results live, for logs (never a secret).
    location: str

    @abstractmethod
    def publish(self, job_id: str, staged: Path) -> None:
        """Make the staged folder (with its ``.checksums.json``) the result of ``job_id``, whole."""

    @abstractmethod
    def holds_weights(self, job_id: str, fmt: str = "mlx") -> bool:
        """Whether the published result of ``job_id`` has the weights of ``fmt``."""

    @abstractmethod
    def published(self) -> set[str]:
        """The job ids that have a visible result (one listing, not a probe per job)."""

    @abstractmethod
    def open_file(self, job_id: str, rel: str) -> ResultFile | None:
        """One file of a published result, or None when it is gone."""

    def presigned_url(self, job_id: str, rel: str) -> str | None:
        """A time-limited URL a client may download ``rel`` from directly, when configured; None:
        the gateway streams it."""
        return None

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Remove a result (it stops being visible first); no error when there is none."""

    @abstractmethod
    def local_folder(self, job_id: str, cache_dir: Path) -> Path | None:
        """A folder on this host with the whole, checksum-verified result (what a worker loads),
        or None when it is gone. ``cache_dir`` holds copies fetched from elsewhere."""

    def close(self) -> None:
        """Release connections (nothing to do for local disk)."""


class LocalResults(ResultStore):
    """``<data>/jobs/<job_id>/``: one host's disk, published by a rename."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.location = "the data directory"

    def _folder(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return result_dir(self.data_dir, job_id)

    def publish(self, job_id: str, staged: Path) -> None:
        final = self._folder(job_id)
        remove_tree(final, jobs_dir(self.data_dir) / ".trash")
        os.rename(staged, final)

    def holds_weights(self, job_id: str, fmt: str = "mlx") -> bool:
        return holds_weights(self._folder(job_id), fmt)

    def published(self) -> set[str]:
        root = jobs_dir(self.data_dir)
        if not root.is_dir():
            return set()
        return {p.name for p in root.iterdir() if is_job_id(p.name) and holds_weights(p)}

    def open_file(self, job_id: str, rel: str) -> ResultFile | None:
        fmt, name = split_rel(rel)
        try:
            handle = open(format_dir(self._folder(job_id), fmt) / name, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ResultFile(size=os.fstat(handle.fileno()).st_size, chunks=read_chunks(handle))

    def delete(self, job_id: str) -> None:
        remove_tree(self._folder(job_id), jobs_dir(self.data_dir) / ".trash")

    def local_folder(self, job_id: str, cache_dir: Path) -> Path | None:
        folder = self._folder(job_id)
        return folder if holds_weights(folder) else None


def split_rel(rel: str) -> tuple[str, str]:
    """``(format, file name)`` of a result-relative path: ``autoawq/x`` -> ``("autoawq", "x")``.
    Refuses anything but a plain name (optionally under ``autoawq/``), so no client text can
    name another place."""
    fmt, _, name = rel.rpartition("/")
    fmt = fmt or "mlx"
    if fmt not in ("mlx", "autoawq") or not name or name in (".", "..") or "\\" in name or name.startswith("."):
        raise ValueError(f"not a result file: {rel!r}")
    return fmt, name


def result_rel(fmt: str, name: str) -> str:
    """The result-relative path of file ``name`` of format ``fmt``."""
    return name if fmt == "mlx" else f"{fmt}/{name}"


def read_chunks(handle: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of an open file in chunks, closing it when done (or when the reader stops)."""
    try:
        while data := handle.read(chunk):
            yield data
    finally:
        handle.close()


def presign_seconds() -> int:
    """``MM_RESULTS_PRESIGN_S``: 0 (stream through the gateway) unless a positive whole number."""
    raw = os.environ.get(PRESIGN_ENV, "").strip()
    try:
        value = int(raw or 0)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{PRESIGN_ENV} must be a whole number of seconds >= 0, got {raw!r}")
    return value


def open_results(data_dir: Path) -> ResultStore:
    """The result store: S3 when ``MM_RESULTS_URL`` is ``s3://bucket[/prefix]``, else the data
    directory. Gateway, worker and job processes all open it here. A bad URL or a missing boto3
    raise ``ValueError`` naming the variable. Credentials, region and endpoint come from boto3's
    own settings (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), never from the URL."""
    url = os.environ.get(RESULTS_URL_ENV, "").strip()
    if not url:
        return LocalResults(data_dir)
    if not url.lower().startswith("s3://") or not url[len("s3://"):].split("/", 1)[0]:
        raise ValueError(f"{RESULTS_URL_ENV} must be s3://bucket[/prefix], got {redact_url(url)!r}; unset it to keep results in the data directory")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    try:
        from jobstore.s3results import S3Results
    except ImportError as exc:
        raise ValueError(f"{RESULTS_URL_ENV} selects S3 results, which need boto3: pip install 'metal-marlin[s3]' ({exc})") from exc
    return S3Results(bucket, prefix.strip("/"), presign_s=presign_seconds())
