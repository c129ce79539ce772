"""The worker's model registry: lazy loading, LRU eviction under the memory budget (fake engines)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jobstore import open_store
from worker.generation import MIB, LoadedModel, ModelFilesMissing, ModelLoadFailed, ModelNotFound, ModelRegistry, ModelUnavailable


class FakeScheduler:
    def __init__(self) -> None:
        self.closed = False

    def shutdown(self, **_: object) -> None:
        self.closed = True


def make_registry(tmp_path: Path, budget_mib: int, sizes: dict[str, int]) -> tuple[ModelRegistry, list[str]]:
    store = open_store(tmp_path)
    reg = ModelRegistry(tmp_path, store, budget_mib * MIB)
    loads: list[str] = []

    def fake_load(model_id: str, path: Path | None) -> LoadedModel:
        loads.append(model_id)
        return LoadedModel(model_id, path, engine=None, scheduler=FakeScheduler(), nbytes=sizes[model_id] * MIB)

    reg._load_sync = fake_load  # type: ignore[method-assign]
    reg.resolve = lambda model_id: None  # type: ignore[method-assign]
    reg.estimate_bytes = lambda model_id, path: reg._measured.get(model_id, sizes[model_id] * MIB)  # type: ignore[method-assign]
    return reg, loads


def test_lazy_load_reuse_and_lru_eviction(tmp_path: Path) -> None:
    reg, loads = make_registry(tmp_path, 1000, {"a": 400, "b": 400, "c": 400})

    async def scenario() -> None:
        a = await reg.acquire("a")
        reg.release(a)
        a2 = await reg.acquire("a")  # loaded once, reused
        assert a2 is a and loads == ["a"]
        reg.release(a2)
        b = await reg.acquire("b")
        reg.release(b)
        await asyncio.sleep(0.01)
        a3 = await reg.acquire("a")  # a becomes most recently used
        reg.release(a3)
        c = await reg.acquire("c")  # needs room: evicts b (least recently used), keeps a
        reg.release(c)
        assert {m.id for m in reg.loaded()} == {"a", "c"} and b.scheduler.closed and not a.scheduler.closed
        assert reg.used_bytes == 800 * MIB

    asyncio.run(scenario())


def test_busy_models_are_never_evicted(tmp_path: Path) -> None:
    reg, _ = make_registry(tmp_path, 1000, {"a": 600, "b": 600, "big": 2000})

    async def scenario() -> None:
        a = await reg.acquire("a")  # in use
        with pytest.raises(ModelUnavailable, match="retry later"):
            await reg.acquire("b")
        with pytest.raises(ModelUnavailable, match="memory budget"):
            await reg.acquire("big")
        reg.release(a)
        b = await reg.acquire("b")  # now a is idle and can go
        assert [m.id for m in reg.loaded()] == ["b"] and a.scheduler.closed
        reg.release(b)

    asyncio.run(scenario())


def test_unload_waits_for_the_last_request(tmp_path: Path) -> None:
    reg, _ = make_registry(tmp_path, 1000, {"a": 100})

    async def scenario() -> None:
        a = await reg.acquire("a")
        assert reg.unload("a")
        assert not a.scheduler.closed  # still serving
        reg.release(a)
        assert a.scheduler.closed and reg.loaded() == []
        assert not reg.unload("a")

    asyncio.run(scenario())


def test_resolve_only_succeeded_jobs(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    reg = ModelRegistry(tmp_path, store, 100 * MIB)
    assert reg.resolve("smollm2-135m-instruct") is None
    job, _ = store.create_job({"model": {"source": "builtin"}})
    with pytest.raises(ModelNotFound):
        reg.resolve(job.id)  # queued
    store.claim("w")
    store.finish(job.id, "w", "succeeded", message="ok")
    with pytest.raises(ModelFilesMissing, match="no longer on the server"):
        reg.resolve(job.id)  # a known model without its files: not a mere unknown id
    folder = tmp_path / "jobs" / job.id
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    assert reg.resolve(job.id) == folder
    for bad in ("../etc", "qjob-zzz", "gpt-4"):
        with pytest.raises(ModelNotFound):
            reg.resolve(bad)


def test_served_models_resolve_by_name_and_are_sized_by_kind(tmp_path: Path) -> None:
    import json

    from metal_marlin.generate.engine import dense_cpu_weights_default

    def folder(name: str, config: dict) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
        return path

    served = {
        "float": folder("float", {"model_type": "llama"}),
        "native": folder("native", {"quantization": {"group_size": 64, "bits": 4}}),
        "awq": folder("awq", {"quantization_config": {"quant_method": "awq", "version": "gemm"}}),
        "gguf": tmp_path / "m.gguf",
    }
    served["gguf"].write_bytes(b"GGUF" + b"\0" * 96)
    reg = ModelRegistry(tmp_path / "data", open_store(tmp_path / "data"), 1 << 30, served=served)
    for name, path in served.items():
        assert reg.resolve(name) == path
    with pytest.raises(ModelNotFound):
        reg.resolve("not-registered")
    quantized = 2000 + (8000 if dense_cpu_weights_default() else 0)  # + float32 copies of the int4 matrices
    assert reg.estimate_bytes("float", served["float"]) == 2000  # float16 -> float32, no int4 copies
    assert reg.estimate_bytes("native", served["native"]) == reg.estimate_bytes("awq", served["awq"]) == quantized
    assert reg.estimate_bytes("gguf", served["gguf"]) == 700  # dequantized to float32


def test_load_failures_name_the_model_by_id_and_log_its_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Loaders put file names in their exceptions; what the registry raises (and clients read)
    holds the id only, and the path goes to the log."""
    import json
    import shutil

    def folder(name: str, weights: bytes | None) -> Path:
        path = tmp_path / "models" / name
        path.mkdir(parents=True)
        config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 100, "rms_norm_eps": 1e-5, "head_dim": 16}
        (path / "config.json").write_text(json.dumps(config))
        if weights is not None:
            (path / "model.safetensors").write_bytes(weights)
        return path

    served = {"corrupt": folder("corrupt", b"not safetensors"), "no-weights": folder("no-weights", None), "deleted": folder("deleted", b"x")}
    shutil.rmtree(served["deleted"])  # after the worker started with it
    reg = ModelRegistry(tmp_path / "data", open_store(tmp_path / "data"), 1 << 30, served=served)
    expected = {"corrupt": ModelLoadFailed, "no-weights": ModelFilesMissing, "deleted": ModelFilesMissing}

    async def scenario() -> None:
        for name, error in expected.items():
            with pytest.raises(error) as info:
                await reg.acquire(name)
            assert f"{name!r}" in str(info.value) and "/" not in str(info.value), info.value

    with caplog.at_level("WARNING", logger="metal_marlin.worker.models"):
        asyncio.run(scenario())
    assert reg.loaded() == [] and reg.used_bytes == 0
    for path in served.values():
        assert str(path) in caplog.text
