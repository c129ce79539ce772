"""Device selection (metal_marlin.device), ``--device`` / ``metal-marlin info``, and the GPU
code paths forced on the CPU by monkeypatching ``metal_marlin.device.on_gpu``.

CI has no GPU: "auto" must pick the CPU here and "gpu" must fail with the fix in its message.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from metal_marlin import device
from metal_marlin.backends import compute_namespace
from metal_marlin.cli import main
from metal_marlin.device import DeviceUnavailableError, MLXUnavailableError, device_info, gpu_backend, on_gpu, select_device

pytestmark = pytest.mark.skipif(gpu_backend() is not None, reason="these tests expect a machine without a GPU backend")


@pytest.fixture(autouse=True)
def _clean_device(monkeypatch: pytest.MonkeyPatch):
    """No MM_DEVICE from the environment; main() sets it, so record it for undo first."""
    monkeypatch.setenv("MM_DEVICE", "auto")
    monkeypatch.delenv("MM_DEVICE")
    yield
    mx.set_default_device(mx.cpu)


def test_auto_and_cpu_select_the_cpu_here() -> None:
    assert select_device() == "cpu"
    assert select_device("auto") == "cpu" and select_device("AUTO") == "cpu"
    assert select_device("cpu") == "cpu" and select_device("cpu") == "cpu"  # idempotent
    assert mx.default_device() == mx.cpu and on_gpu() is False


def test_gpu_without_a_backend_raises_with_the_fix() -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        select_device("gpu")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert mx.__version__ in message
    for needle in ("MM_EXTRAS=cuda bash scripts/bootstrap.sh", "metal-marlin[cuda]", "Apple silicon", "--device cpu"):
        assert needle in message, message


def test_bad_value_names_mm_device_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"--device must be one of auto, gpu, cpu.*'tpu'.*MM_DEVICE"):
        select_device("tpu")
    monkeypatch.setenv("MM_DEVICE", "metal")
    with pytest.raises(ValueError, match=r"^MM_DEVICE must be one of auto, gpu, cpu, got 'metal'") as info:
        select_device()
    assert not isinstance(info.value, DeviceUnavailableError)


def test_mm_device_is_honoured_and_the_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MM_DEVICE", "gpu")
    with pytest.raises(DeviceUnavailableError):
        select_device()
    assert select_device("cpu") == "cpu"  # the argument (--device) beats MM_DEVICE
    monkeypatch.setenv("MM_DEVICE", " CPU ")
    assert select_device() == "cpu"


def test_device_info_is_json_data() -> None:
    select_device("cpu")
    info = device_info()
    assert json.loads(json.dumps(info)) == info
    assert info["device"] == "cpu" and info["backend"] == "cpu" and info["mlx"] == mx.__version__
    assert isinstance(info["memory_bytes"], int) and info["memory_bytes"] > 2**26  # physical RAM
    assert info["metal_marlin"] and info["python"] == ".".join(map(str, sys.version_info[:3]))


def test_cli_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and info["backend"] == "cpu" and info["mlx"] == mx.__version__


def test_cli_info_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--device", "CPU"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert fields["device"] == "cpu" and fields["backend"] == "cpu" and fields["mlx"] == mx.__version__
    assert "GiB" in fields["memory_bytes"]
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(value_columns) == 1, lines  # aligned


@pytest.mark.parametrize("argv", [["info", "--device", "gpu"], ["--device", "gpu", "info"], ["--device", "cpu", "info", "--device", "GPU"]])
def test_cli_device_gpu_is_one_line_and_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metal-marlin: error: the GPU was requested") and "--device cpu" in lines[0]


def test_cli_device_before_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu" and os.environ["MM_DEVICE"] == "cpu"


def test_cli_exports_the_device_for_child_processes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--device", "cpu"]) == 0
    assert os.environ["MM_DEVICE"] == "cpu"
    monkeypatch.setenv("MM_DEVICE", "sideways")
    assert main(["info"]) == 2
    assert "MM_DEVICE must be one of auto, gpu, cpu" in capsys.readouterr().err


def test_cli_serve_device_gpu_fails_before_starting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import service.main

    started = []
    monkeypatch.setattr(service.main, "serve", lambda **kw: started.append(kw))
    assert main(["serve", "--device", "gpu"]) == 2
    assert started == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU backend" in err[0]


def test_cli_serve_passes_the_device_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.main

    seen = []
    monkeypatch.setattr(service.main, "serve", lambda **kw: seen.append(os.environ.get("MM_DEVICE")))
    assert main(["serve", "--device", "cpu"]) == 0
    assert seen == ["cpu"]  # the supervisor copies os.environ into the worker's environment


def test_missing_mlx_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # makes `import mlx.core` raise ImportError
    with pytest.raises(MLXUnavailableError, match=r"metal-marlin\[cpu\] or \[cuda\]"):
        device.import_mlx()
    assert on_gpu() is False  # numpy-only code keeps working
    assert compute_namespace("auto") is np
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metal-marlin: error: MLX cannot be imported") and "install metal-marlin[cpu] or [cuda]" in err


def test_compute_backend_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compute_namespace("auto") is np  # CPU here
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    assert compute_namespace("auto") is mx
    assert compute_namespace("numpy") is np  # explicit choices are kept
    monkeypatch.setattr(device, "on_gpu", lambda: False)
    assert compute_namespace("auto") is np


def test_awq_search_runs_in_mlx_on_the_gpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the GPU forced, awq_quantize's default backend ("auto") computes with MLX."""
    from metal_marlin import awq

    picked = []
    real = awq.compute_namespace
    monkeypatch.setattr(awq, "compute_namespace", lambda backend: picked.append(real(backend)) or picked[-1])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)  # [in, out]
    x = rng.standard_normal((16, 64)).astype(np.float32)
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    on_mlx = awq.awq_quantize(w, x, group_size=32, salient_ratio=0.0, n_grid=4)
    monkeypatch.setattr(device, "on_gpu", lambda: False)
    on_numpy = awq.awq_quantize(w, x, group_size=32, salient_ratio=0.0, n_grid=4)
    assert picked == [mx, np]
    np.testing.assert_allclose(np.asarray(on_mlx.q_scale), np.asarray(on_numpy.q_scale), rtol=1e-4)


def test_gpu_path_builds_no_float32_weight_copies(monkeypatch: pytest.MonkeyPatch, make_tiny) -> None:
    """Needs generate/engine.py's dense_cpu_weights_default to ask device.on_gpu()."""
    from types import SimpleNamespace

    import mlx.nn as nn

    from metal_marlin.checkpoints import build_model
    from metal_marlin.generate.engine import Engine, dense_cpu_weights_default
    from metal_marlin.models.llama import LlamaConfig

    monkeypatch.delenv("MM_DENSE_CPU_WEIGHTS", raising=False)
    cfg, weights = make_tiny()
    model = build_model(LlamaConfig.from_hf_dict(cfg), weights)
    nn.quantize(model, group_size=32, bits=4)
    tokenizer = SimpleNamespace(eos_token_ids=set(), chat_template=None, vocab_size=cfg["vocab_size"])

    monkeypatch.setattr(device, "on_gpu", lambda: True)
    assert dense_cpu_weights_default() is False
    assert Engine(model, tokenizer, {"context_length": 256}).dense_weight_bytes == 0

    monkeypatch.setattr(device, "on_gpu", lambda: False)
    assert dense_cpu_weights_default() is True
    assert Engine(model, tokenizer, {"context_length": 256}).dense_weight_bytes > 0


def test_worker_exits_with_one_line_when_the_gpu_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.main import main as worker_main

    monkeypatch.setenv("MM_DEVICE", "gpu")  # as the service's `serve --device gpu` passes it
    assert worker_main(["--data-dir", str(tmp_path / "data"), "--no-jobs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("worker: error: the GPU was requested") and "Traceback" not in err[0]
    assert not (tmp_path / "data").exists()  # failed before any side effect (lock, job store)
    monkeypatch.setenv("MM_DEVICE", "quantum")
    assert worker_main(["--data-dir", str(tmp_path / "data"), "--no-jobs"]) == 2
    assert "MM_DEVICE must be one of" in capsys.readouterr().err


def test_activation_dtype_is_float16_on_the_gpu_float32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    from metal_marlin.generate.engine import default_activation_dtype

    monkeypatch.delenv("MM_DTYPE", raising=False)
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    assert default_activation_dtype() == mx.float16
    monkeypatch.setattr(device, "on_gpu", lambda: False)
    assert default_activation_dtype() == mx.float32
    monkeypatch.setenv("MM_DTYPE", "bfloat16")
    assert default_activation_dtype() == mx.bfloat16
    monkeypatch.setenv("MM_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MM_DTYPE"):
        default_activation_dtype()


def test_warmup_runs_every_batch_size_and_leaves_generation_unchanged(make_tiny) -> None:
    """Engine.warmup (what a GPU worker runs before it reports ready) computes a prefill and a
    decode step per batch size up to the engine's limit, and changes no later result."""
    from types import SimpleNamespace

    import mlx.nn as nn

    from metal_marlin.checkpoints import build_model
    import mlx.core as mx

    from metal_marlin.generate.engine import Engine
    from metal_marlin.models.llama import LlamaConfig

    cfg, weights = make_tiny()
    model = build_model(LlamaConfig.from_hf_dict(cfg), weights)
    nn.quantize(model, group_size=32, bits=4)
    tokenizer = SimpleNamespace(eos_token_ids=set(), chat_template=None, vocab_size=cfg["vocab_size"])
    engine = Engine(model, tokenizer, {"context_length": 256}, max_batch_size=4, dense_cpu_weights=False)
    calls = []
    forward = engine.forward_last
    engine.forward_last = lambda tokens, cache, left_padding=None: calls.append(tuple(tokens.shape)) or forward(tokens, cache, left_padding)
    before = engine.prefill([1, 2, 3], engine.make_cache())
    calls.clear()
    assert engine.warmup((1, 2, 8)) >= 0  # 8 exceeds max_batch_size: skipped
    assert calls == [(1, 16), (1, 1), (2, 16), (2, 1)]
    assert mx.array_equal(engine.prefill([1, 2, 3], engine.make_cache()), before)


def test_a_gpu_worker_warms_a_model_up_when_it_loads_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from metal_marlin.generate.engine import Engine
    from worker import generation

    warmed = []
    monkeypatch.setattr(device, "on_gpu", lambda: True)
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, path, **kw: SimpleEngine(kw["max_batch_size"])))
    monkeypatch.setattr("metal_marlin.generate.scheduler.BatchScheduler", lambda engine: None)
    monkeypatch.setattr(generation, "_param_bytes", lambda engine: 0)

    class SimpleEngine:
        dense_weight_bytes = 0

        def __init__(self, max_batch_size: int) -> None:
            self.max_batch_size = max_batch_size

        def warmup(self, sizes):
            warmed.append(list(sizes))
            return 0.0

    registry = generation.ModelRegistry(tmp_path, None, 1 << 30, max_batch_size=16)
    registry._load_sync("m", None)
    assert warmed == [[1, 2, 3, 4, 8, 16]]
    monkeypatch.setattr(device, "on_gpu", lambda: False)
    registry._load_sync("m", None)
    assert len(warmed) == 1  # the CPU compiles nothing at run time: no warm-up
