"""Results on S3-compatible storage (``MM_RESULTS_URL=s3://bucket/prefix``), shared by every host.

Layout under ``prefix``:

- ``jobs/<job_id>/<file>``: a published result, the same relative paths as on local disk;
- ``jobs/<job_id>/.checksums.json``: its manifest (the SHA-256 of every file), **written last**.
  A result is visible exactly when its manifest exists: S3 has no rename of a folder, so the
  manifest is the one object whose appearance publishes the rest;
- ``.staging/<job_id>.<token>/<file>``: where a worker uploads first (multipart above
  ``MM_S3_MULTIPART_MB``, default 8 MiB; each object appears only when its upload completes).
  Only when every file is there are they copied (server side, multipart too) under ``jobs/``,
  then the manifest is put, then the staging keys go.

Deleting removes the manifest first, so a result stops being visible before its files go.
A worker that serves a job's model fetches it into a local cache folder and checks every file
against the manifest before it loads anything (:meth:`S3Results.local_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from jobstore.layout import CHECKSUMS_FILE, holds_weights, remove_tree, verify_result
from jobstore.records import is_job_id
from jobstore.results import ResultFile, ResultStore, result_rel, split_rel

log = logging.getLogger("metal_marlin.jobstore.s3")

MULTIPART_ENV = "MM_S3_MULTIPART_MB"
DEFAULT_MULTIPART_MB = 8
MISSING_CODES = ("NoSuchKey", "404", "NotFound")


def _multipart_bytes() -> int:
    raw = os.environ.get(MULTIPART_ENV, "").strip()
    try:
        mb = int(raw or DEFAULT_MULTIPART_MB)
    except ValueError:
        mb = 0
    if mb < 5:  # S3 refuses parts under 5 MiB (except the last)
        raise ValueError(f"{MULTIPART_ENV} must be a whole number of MiB >= 5, got {raw!r}")
    return mb << 20


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING_CODES


class S3Results(ResultStore):
    """Published results in one bucket under one prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, presign_s: int = 0, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.presign_s = presign_s
        self.location = f"s3://{bucket}/{self.prefix}"
        self.s3 = client or boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        part = _multipart_bytes()
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)

    # -- keys -----------------------------------------------------------------------------
    def _job_prefix(self, job_id: str) -> str:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return f"{self.prefix}jobs/{job_id}/"

    def _key(self, job_id: str, rel: str) -> str:
        split_rel(rel)  # only result file names reach a key
        return self._job_prefix(job_id) + rel

    def _manifest_bytes(self, job_id: str) -> bytes | None:
        """The published manifest of ``job_id`` as stored, or None: no visible result."""
        try:
            return bytes(self.s3.get_object(Bucket=self.bucket, Key=self._job_prefix(job_id) + CHECKSUMS_FILE)["Body"].read())
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def _manifest(self, job_id: str) -> dict[str, str] | None:
        body = self._manifest_bytes(job_id)
        if body is None:
            return None
        try:
            return dict(json.loads(body)["files"])
        except (ValueError, KeyError, TypeError):
            log.warning("result of %s has an unreadable manifest", job_id)
            return None

    def _keys_under(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # -- the interface ----------------------------------------------------------------------
    def publish(self, job_id: str, staged: Path) -> None:
        manifest = (staged / CHECKSUMS_FILE).read_bytes()
        files = sorted(json.loads(manifest)["files"])
        staging = f"{self.prefix}.staging/{job_id}.{secrets.token_hex(6)}/"
        try:
            for rel in files:
                self.s3.upload_file(str(staged / rel), self.bucket, staging + rel, Config=self.transfer)
            final = self._job_prefix(job_id)
            self.s3.delete_object(Bucket=self.bucket, Key=final + CHECKSUMS_FILE)  # an older attempt's result stops being visible
            for rel in files:
                self.s3.copy({"Bucket": self.bucket, "Key": staging + rel}, self.bucket, final + rel, Config=self.transfer)
            self.s3.put_object(Bucket=self.bucket, Key=final + CHECKSUMS_FILE, Body=manifest, ContentType="application/json")
        finally:
            self._delete_keys(self._keys_under(staging))

    def holds_weights(self, job_id: str, fmt: str = "mlx") -> bool:
        files = self._manifest(job_id)
        return files is not None and result_rel(fmt, "model.safetensors") in files

    def published(self) -> set[str]:
        root = f"{self.prefix}jobs/"
        ids = set()
        for key in self._keys_under(root):
            job_id, _, name = key[len(root):].partition("/")
            if name == CHECKSUMS_FILE and is_job_id(job_id):
                ids.add(job_id)
        return ids

    def open_file(self, job_id: str, rel: str) -> ResultFile | None:
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(job_id, rel))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        body = obj["Body"]

        def chunks() -> Any:
            try:
                yield from body.iter_chunks(1 << 20)
            finally:
                body.close()

        return ResultFile(size=int(obj["ContentLength"]), chunks=chunks())

    def presigned_url(self, job_id: str, rel: str) -> str | None:
        if self.presign_s <= 0:
            return None
        params = {"Bucket": self.bucket, "Key": self._key(job_id, rel)}
        return str(self.s3.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_s))

    def delete(self, job_id: str) -> None:
        prefix = self._job_prefix(job_id)
        self.s3.delete_object(Bucket=self.bucket, Key=prefix + CHECKSUMS_FILE)  # invisible first
        self._delete_keys(self._keys_under(prefix))

    def local_folder(self, job_id: str, cache_dir: Path) -> Path | None:
        """The cached copy when its manifest is the published one; else fetch every file into a
        temporary folder, verify it against the manifest, and rename it into place."""
        manifest = self._manifest_bytes(job_id)
        if manifest is None:
            return None
        target = Path(cache_dir) / job_id
        try:
            if (target / CHECKSUMS_FILE).read_bytes() == manifest and holds_weights(target):
                return target
        except OSError:
            pass
        tmp = Path(cache_dir) / ".tmp" / f"{job_id}.{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            for rel in json.loads(manifest)["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.bucket, self._key(job_id, rel), str(tmp / rel), Config=self.transfer)
            (tmp / CHECKSUMS_FILE).write_bytes(manifest)
            problems = verify_result(tmp)
            if problems:
                raise OSError(f"the result of {job_id} fetched from {self.location} is damaged: {'; '.join(problems)}")
            remove_tree(target, Path(cache_dir) / ".trash")
            try:
                os.rename(tmp, target)
            except OSError:  # another thread fetched it first
                if not holds_weights(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def close(self) -> None:
        self.s3.close()
