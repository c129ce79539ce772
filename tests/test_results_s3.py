"""Results on S3-compatible storage (``MM_RESULTS_URL``), against a real S3 API server: moto in
server mode, spoken to over HTTP by boto3 (see ``_s3.py``).

The store's own guarantees first (multipart upload, nothing visible before the manifest, a
failed publish leaves nothing behind, a fetched copy is checked against the checksums), then the
service end to end: a gateway with its real worker runs a job (plain round-to-nearest, the
cheapest job the API takes: the point here is where the result goes, not its quality), publishes
it to the bucket only, and serves, streams, presigns and deletes it from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from _net import free_port
from jobstore import new_job_id
from jobstore.layout import CHECKSUMS_FILE, write_checksums
from jobstore.results import open_results

PART = 5 << 20


def _staged(folder: Path, big: int = 2 * PART + 123) -> Path:
    """A fake staged result: weights large enough for a three-part upload, a config, an export."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(big))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "autoawq").mkdir()
    (folder / "autoawq" / "model.safetensors").write_bytes(b"awq" * 100)
    write_checksums(folder)
    return folder


@pytest.fixture
def s3(s3_results_env: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setenv("MM_S3_MULTIPART_MB", "5")
    store = open_results(tmp_path / "data")
    yield store
    store.close()


def _keys(store: Any) -> list[str]:
    return store._keys_under(store.prefix)


def test_publish_is_multipart_whole_and_visible_only_with_its_manifest(s3: Any, tmp_path: Path) -> None:
    job_id = new_job_id()
    staged = _staged(tmp_path / "staged")
    weights = (staged / "model.safetensors").read_bytes()
    assert s3.published() == set() and not s3.holds_weights(job_id) and s3.open_file(job_id, "model.safetensors") is None

    s3.publish(job_id, staged)
    assert s3.published() == {job_id} and s3.holds_weights(job_id) and s3.holds_weights(job_id, "autoawq")
    keys = _keys(s3)
    assert not [k for k in keys if "/.staging/" in f"/{k}"], keys  # the temporary keys are gone
    assert sorted(keys) == sorted(f"results/jobs/{job_id}/{n}" for n in (CHECKSUMS_FILE, "model.safetensors", "config.json", "autoawq/model.safetensors"))
    head = s3.s3.head_object(Bucket=s3.bucket, Key=f"results/jobs/{job_id}/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB at most: a multipart object
    opened = s3.open_file(job_id, "model.safetensors")
    assert opened.size == len(weights) and b"".join(opened.chunks) == weights
    assert b"".join(s3.open_file(job_id, "autoawq/model.safetensors").chunks) == b"awq" * 100
    with pytest.raises(ValueError):
        s3.open_file(job_id, "../other/model.safetensors")

    # a worker's local copy: fetched, verified, reused while the manifest is the same
    cache = tmp_path / "cache"
    folder = s3.local_folder(job_id, cache)
    assert folder == cache / job_id and (folder / "model.safetensors").read_bytes() == weights
    assert s3.local_folder(job_id, cache) == folder

    s3.delete(job_id)
    assert s3.published() == set() and _keys(s3) == [] and s3.local_folder(job_id, cache) is None


def test_a_publish_that_fails_midway_leaves_nothing_visible_and_no_temporary_keys(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = new_job_id()
    staged = _staged(tmp_path / "staged")
    seen: list[list[str]] = []
    real_copy = s3.s3.copy

    def copy_then_fail(source: dict[str, str], bucket: str, key: str, **kw: Any) -> None:
        real_copy(source, bucket, key, **kw)
        seen.append(_keys(s3))  # one file copied, the staging keys all there
        raise ConnectionError("the network went away")

    monkeypatch.setattr(s3.s3, "copy", copy_then_fail)
    with pytest.raises(ConnectionError):
        s3.publish(job_id, staged)
    assert len([k for k in seen[0] if "/.staging/" in k]) == 3  # every file was uploaded first (the manifest goes last, direct)
    assert s3.published() == set() and not s3.holds_weights(job_id)  # one copied file, no manifest: invisible
    assert not [k for k in _keys(s3) if "/.staging/" in k]


def test_a_damaged_object_is_never_loaded(s3: Any, tmp_path: Path) -> None:
    job_id = new_job_id()
    s3.publish(job_id, _staged(tmp_path / "staged", big=1000))
    s3.s3.put_object(Bucket=s3.bucket, Key=f"results/jobs/{job_id}/config.json", Body=b'{"model_type": "evil"}')
    with pytest.raises(OSError, match="checksum mismatch"):
        s3.local_folder(job_id, tmp_path / "cache")
    assert not (tmp_path / "cache" / job_id).exists()


def test_bad_settings_are_refused_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MM_RESULTS_URL", "gs://bucket")
    with pytest.raises(ValueError, match="MM_RESULTS_URL"):
        open_results(tmp_path)
    monkeypatch.setenv("MM_RESULTS_URL", "s3://bucket")
    monkeypatch.setenv("MM_RESULTS_PRESIGN_S", "soon")
    with pytest.raises(ValueError, match="MM_RESULTS_PRESIGN_S"):
        open_results(tmp_path)


# -- the service, end to end ------------------------------------------------------------------
KEY = "s3-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
RTN_JOB = {"method": "rtn", "n_samples": 2, "seq_len": 32, "n_grid": 2}


def _serve(data_dir: Path, env: dict[str, str], log: Path, *args: str, worker: bool = True) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """``python -m service`` on a free port: healthy (its worker ready), or only answering
    when it has no worker of its own (``worker=False``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--data-dir", str(data_dir), "--api-key", KEY, "--log-level", "warning", *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if http.get("/health").status_code == 200 or not worker:
                return proc, http
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(log.read_text(errors="replace")[-3000:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_the_service_publishes_serves_and_deletes_results_in_the_bucket(s3_server: Any, s3_results_env: tuple[str, str], tmp_path: Path) -> None:
    bucket, _ = s3_results_env
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MM_WORKER_THREADS": "1", "MM_WORKER_MEMORY_MB": "2048"}
    proc, http = _serve(tmp_path / "data", env, tmp_path / "service.log")
    try:
        job = http.post("/v1/quantization/jobs", json=RTN_JOB).json()
        deadline = time.monotonic() + 180
        while job["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
            job = http.get(f"/v1/quantization/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        job_id = job["id"]
        assert not (tmp_path / "data" / "jobs" / job_id).exists()  # the bucket holds it, not the disk
        objects = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
        assert f"results/jobs/{job_id}/model.safetensors" in objects and f"results/jobs/{job_id}/{CHECKSUMS_FILE}" in objects

        # streamed through the gateway, whole, matching the checksum the API lists
        listed = {f["filename"]: f for f in job["result_files"]}
        body = http.get(f"/v1/quantization/jobs/{job_id}/result").content
        assert len(body) == listed["model.safetensors"]["bytes"] and hashlib.sha256(body).hexdigest() == listed["model.safetensors"]["sha256"]
        assert job_id in [m["id"] for m in http.get("/v1/models").json()["data"]]

        # the worker fetches it from the bucket into its cache and serves it
        out = http.post("/v1/completions", json={"model": job_id, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert (tmp_path / "data" / "cache" / "results" / job_id / "model.safetensors").is_file()

        # a second gateway (no worker; the same SQLite job store) configured for presigned
        # downloads redirects to the bucket
        presign_env = {**env, "MM_RESULTS_PRESIGN_S": "60"}
        nobody = f"http://127.0.0.1:{free_port()}"  # a worker URL where none listens: this gateway only downloads
        other, other_http = _serve(tmp_path / "data", presign_env, tmp_path / "other.log", "--worker-url", nobody, worker=False)
        try:
            redirect = other_http.get(f"/v1/quantization/jobs/{job_id}/result", params={"file": "config.json"})
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_server.endpoint)
            fetched = httpx.get(redirect.headers["location"])
            assert fetched.status_code == 200 and json.loads(fetched.content) == json.loads(http.get(f"/v1/quantization/jobs/{job_id}/result", params={"file": "config.json"}).content)
        finally:
            other_http.close()
            _stop(other)

        assert http.delete(f"/v1/quantization/jobs/{job_id}").status_code == 200
        left = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        assert left == [] and job_id not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    finally:
        http.close()
        _stop(proc)
