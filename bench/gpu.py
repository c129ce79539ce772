"""Everything on one GPU, ours side by side with mlx-lm: one command, one JSON report.

Written for a lent NVIDIA H200 (MLX's CUDA backend, mlx-lm, no internet, at most 10 minutes
per command), it also runs on a CPU with ``--smoke`` (tiny sizes) so it can be debugged
anywhere. Sections (``--sections``, run in the order given):

- ``smollm``: the built-in SmolLM2-135M-Instruct, AWQ 4-bit g64 (salient 0) by us; the same
  folder loaded by ``mlx_lm.load``. Ours runs at float16 activations like mlx-lm
  (``--ours-dtypes float16,float32`` adds ``Engine.load``'s float32, what the service runs). Prompt tokens/s (512-token prefill), time to first token,
  batch-1 decode tokens/s, aggregate decode tokens/s at 1/8/32/128 concurrent sequences
  (``BatchScheduler`` vs ``mlx_lm.generate.BatchGenerator``), peak GPU memory.
- ``llama8b``: a Llama-3-8B-shaped model with random int4 weights (speed does not depend on
  the values), the same arrays in our ``LlamaModel`` and in mlx-lm's ``llama.Model``; the same
  figures, plus the bandwidth bound (weight bytes read per decoded token vs the device
  bandwidth measured in this run) and each engine's fraction of it.
- ``awq``: AWQ wall time on SmolLM2 at AutoAWQ's default calibration (128 x 512 tokens), ours
  vs mlx-lm's ``awq_quantize`` on the same tokens, each in its own child process
  (``bench/quality.py``'s ``run_one``), peak memory, perplexity of both and of the original;
  then seconds per block of our real per-block search on one random 8B-shaped block, per
  compute backend (a child process each, capped at ``block_timeout_s``).
- ``serve``: ``metal-marlin serve`` vs ``mlx_lm.server`` on the same folder, streaming chat
  clients (``bench/serve.py``'s client and server code) at 1/16/64; and the gateway cost:
  the service vs the engine alone, in-process, on the same prompts.
- ``ppl``: perplexity of our 4-bit SmolLM2 on the GPU vs the CPU (a child process, compared
  over the windows it finished within ``ppl_cpu_timeout_s``), and on the GPU at float32 /
  bfloat16 / float16 activations.

serve and ppl use the awq section's 128 x 512 folder when awq ran first in the same
command, else ``--smollm-model``, else one quantized on the spot (16 x 256).

Method: MLX's CUDA backend JIT-compiles every new kernel at first use (tens of seconds), so
every timed figure follows an untimed warm-up of exactly the same shapes (its seconds are
reported as ``warmup_s``). Ours and mlx-lm alternate per repeat (the order flips every
repeat); medians of ``--repeats`` are reported with the raw runs. Timers are
``time.perf_counter`` stopped after ``mx.eval``/``.item()``. Peak memory is
``mx.get_peak_memory()`` after ``mx.reset_peak_memory()`` around each run (both models stay
loaded, so ``peak_above_active_mb`` is the run's own working memory).

The report (``--out``) is rewritten after every figure, so a command killed at its time limit
keeps what it measured; an exception in a section is recorded under ``errors`` and the next
section runs. ``--budget-s`` skips what would not fit (each figure checks the time left).

Run on the H200 (two commands of < 10 minutes each; the repo need not be installed)::

    python bench/gpu.py --sections llama8b,smollm --budget-s 540 --out $OUT/gpu-1.json
    python bench/gpu.py --sections awq,serve,ppl --budget-s 540 --out $OUT/gpu-2.json

Here (CPU, tiny sizes, about 8 minutes on 2 cores): ``python bench/gpu.py --smoke --out /tmp/gpu_smoke.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the repo need not be installed (the GPU machine runs a checkout)
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:  # bench/serve.py and bench/quality.py are imported from here
    sys.path.append(str(HERE))

import metal_marlin  # noqa: E402,F401  (first: gives MLX's CPU backend a fast BLAS on Linux)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from _machine import relative_args, repo_command  # noqa: E402

SECTIONS = ("smollm", "llama8b", "awq", "serve", "ppl")
MiB = 2**20
SERVED_NAME = "smollm2-w4"


# ---------------------------------------------------------------------------------------
# Settings: full size on the GPU, tiny with --smoke
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    """Every size the run uses, so the report states exactly what was measured."""

    repeats: int = 3
    bandwidth_bytes: int = 2 * 2**30
    prompt_tokens: int = 512  # prefill and time-to-first-token prompt
    decode_prompt_tokens: int = 32  # batch-1 decode starts after this short prompt
    decode_tokens: int = 128
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    agg_prompt_tokens: int = 32
    agg_tokens: int = 128  # max_tokens per sequence (EOS ignored)
    smollm_calibration: tuple[int, int] = (16, 256)  # when smollm quantizes the folder itself
    smollm_n_grid: int = 20
    smollm_method: str = "awq"  # smoke: "rtn" (the same folder layout, seconds instead of minutes)
    ours_dtypes: tuple[str, ...] = ("float16",)  # smollm: ours at these activation dtypes (first is "ours")
    llama: str = "8b"
    awq_calibration: tuple[int, int] = (128, 512)
    awq_eval_windows: int = 16  # windows of 512 (bench/quality.py's window), per corpus
    awq_n_grid: int = 20  # both quantizers' scale-search grid (20 is both defaults)
    block_calibration: tuple[int, int] = (16, 512)
    block_backends: tuple[str, ...] = ("auto",)  # auto is MLX on a GPU
    block_runs: int = 2
    block_timeout_s: float = 90.0  # per backend; a slower one reports what it finished
    serve_levels: tuple[int, ...] = (1, 16, 64)
    serve_max_tokens: int = 64
    gateway_levels: tuple[int, ...] = (1, 16)
    ppl_window: int = 512
    ppl_windows: int = 16
    ppl_cpu_timeout_s: float = 90.0  # the CPU child reports the windows it finished by then
    reserve_s: float = 20.0  # left unspent for writing the report and stopping servers

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            repeats=1, bandwidth_bytes=64 * MiB, prompt_tokens=32, decode_prompt_tokens=8, decode_tokens=8,
            concurrency=(1, 2), agg_prompt_tokens=8, agg_tokens=4, smollm_calibration=(4, 64), smollm_n_grid=5, smollm_method="rtn",
            ours_dtypes=("float32",), llama="tiny", awq_calibration=(4, 64), awq_eval_windows=2, awq_n_grid=5,
            block_calibration=(4, 64), block_backends=("auto",), block_runs=2, serve_levels=(1, 2),
            serve_max_tokens=8, gateway_levels=(1, 2), ppl_window=64, ppl_windows=2, reserve_s=5.0,
        )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _pair(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


# ---------------------------------------------------------------------------------------
# Budget and report
# ---------------------------------------------------------------------------------------
class Budget:
    """Wall-clock seconds left for this command: figures that would not fit are skipped,
    not started (the runner kills the command at its limit)."""

    def __init__(self, total_s: float | None, reserve_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s
        self.reserve_s = reserve_s

    def left(self) -> float:
        if self.total_s is None:
            return float("inf")
        return self.total_s - (time.monotonic() - self.start) - self.reserve_s

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds

    def timeout(self, minimum: float = 1.0) -> float | None:
        """A subprocess/HTTP timeout: what is left (at least ``minimum``), None without a budget."""
        left = self.left()
        return None if left == float("inf") else max(left, minimum)


class Report:
    """The JSON report, rewritten atomically after every figure."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def save(self) -> None:
        self.data["machine"]["end_utc"] = _utc_now()
        self.data["summary"] = summarize(self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(finite(self.data), indent=1, default=_json_default, allow_nan=False) + "\n")
        tmp.replace(self.path)


def finite(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None: the report stays strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


@dataclasses.dataclass
class Context:
    """What sections share: settings, budget, report, and the 4-bit SmolLM2 folder once made."""

    args: argparse.Namespace
    settings: Settings
    budget: Budget
    report: Report
    workdir: Path
    smollm_folder: Path | None = None
    smollm_folder_origin: str | None = None

    def save(self) -> None:
        self.report.save()


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM where /proc has it. ``ru_maxrss`` is not used for
    children: Linux carries a parent's high-water mark across fork + exec, and this parent
    is big (loaded models) by the time it starts them."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(message: str) -> None:
    """Progress line (the remote runner shows only the tail of the output)."""
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------------------
def with_memory(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` between a peak-memory reset and a reading; adds peak and active MiB."""
    gc.collect()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    result = fn()
    peak = mx.get_peak_memory()
    result.update(peak_mb=peak / MiB, peak_above_active_mb=(peak - active) / MiB)
    return result


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median of every numeric key over the runs."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)] if runs else []
    out = {}
    for k in keys:
        values = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(values) if values else None
    return out


def alternate(fns: dict[str, Callable[[], dict[str, Any]]], repeats: int, budget: Budget, memory: bool = True) -> dict[str, Any]:
    """Warm each function up once (untimed: compiles the kernels of exactly these shapes), then
    ``repeats`` rounds with the order reversed every round; stops early when a further round
    would not fit the budget (the round just timed is the estimate). Peak memory of this
    process per run, unless ``memory`` is False (the work runs in other processes)."""
    out: dict[str, Any] = {name: {"runs": []} for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name]["warmup_s"] = time.perf_counter() - t0
    names = list(fns)
    last_round = 0.0
    for r in range(repeats):
        if r > 0 and not budget.fits(last_round):
            out["stopped_early"] = f"budget: {r} of {repeats} repeats"
            break
        t0 = time.perf_counter()
        for name in names if r % 2 == 0 else names[::-1]:
            out[name]["runs"].append(with_memory(fns[name]) if memory else fns[name]())
        last_round = time.perf_counter() - t0
    for name in fns:
        out[name]["median"] = medians(out[name]["runs"])
    return out


def stream_times(tokens: Iterable[Any]) -> dict[str, float]:
    """Time to the first item and decode rate after it, for any per-token iterator."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in tokens:
        last = time.perf_counter()
        first = first or last
        count += 1
    assert first is not None and last is not None
    return {
        "ttft_s": first - start,
        "decode_tok_s": (count - 1) / (last - first) if count > 1 else None,
        "tokens": count,
    }


# ---------------------------------------------------------------------------------------
# Machine and bandwidth
# ---------------------------------------------------------------------------------------
def relative_argv(argv: Sequence[str]) -> list[str]:
    """The command line with absolute paths made relative to the working directory (or, when
    outside it, reduced to '<abs>/name'), so no machine path enters the report."""
    return relative_args(argv, Path.cwd())


def nvidia_smi(query: str = "--query-gpu=name,driver_version,memory.total") -> str | None:
    """nvidia-smi's CSV answer to ``query``, or None where nvidia-smi is absent or fails."""
    try:
        done = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
    try:
        device_info = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in mx.device_info().items()}
    except Exception as exc:  # noqa: BLE001  (older MLX)
        device_info = {"error": repr(exc)}
    return {
        "device_info": device_info,
        "mlx": mx.__version__,
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "nvidia_smi": nvidia_smi(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "default_device": str(mx.default_device()),
        "command": repo_command(argv),
        "start_utc": _utc_now(),
    }


def measure_bandwidth(n_bytes: int, repeats: int = 5) -> dict[str, Any]:
    """Device memory bandwidth of an elementwise copy ``x * 1`` (bytes read + written)."""
    x = mx.random.uniform(shape=(n_bytes // 4,), dtype=mx.float32)
    mx.eval(x)

    def once() -> float:
        t0 = time.perf_counter()
        y = x * 1.0
        mx.eval(y)
        dt = time.perf_counter() - t0
        del y
        return dt

    t0 = time.perf_counter()
    once()
    warmup = time.perf_counter() - t0
    moved = 2 * x.nbytes
    runs = [moved / once() / 1e9 for _ in range(repeats)]
    return {"bytes_read_plus_written": moved, "array_mib": x.nbytes / MiB, "warmup_s": warmup,
            "runs_gb_s": runs, "gb_s": statistics.median(runs), "method": "y = x * 1.0 on float32, median of 5 after 1 warm-up"}


# ---------------------------------------------------------------------------------------
# Models: loading ours and mlx-lm's from one folder; the random 8B-shaped pair
# ---------------------------------------------------------------------------------------
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def load_engine(folder: Path, dtype: str, max_batch_size: int) -> Any:
    """Our engine on ``folder`` at activation ``dtype``. ``Engine.load`` always loads float32
    (what ``metal-marlin serve`` runs); mlx-lm computes in the stored float16, hence the choice."""
    from metal_marlin.checkpoints.loader import load_model
    from metal_marlin.generate.engine import Engine
    from metal_marlin.tokenizer import Tokenizer

    if dtype == "float32":
        return Engine.load(folder, max_batch_size=max_batch_size)
    model, _, metadata = load_model(folder, DTYPES[dtype])
    return Engine(model, Tokenizer.from_folder(metadata.get("source", folder)), metadata, max_batch_size=max_batch_size)


def load_mlx_lm(folder: Path) -> Any:
    """``mlx_lm.load`` of our folder. On MLX's CPU backend (smoke) its floats are widened to
    float32 in place: the x86 CPU backend has no fast float16 matmul (see bench/serve.py)."""
    import mlx_lm
    from mlx.utils import tree_map

    model, _ = mlx_lm.load(str(folder))
    if mx.default_device() == mx.cpu:
        model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())
    return model


class IdsTokenizer:
    """Just enough of a tokenizer for an engine fed token ids (the random 8B model has none):
    no EOS, and ids 'decode' to their numbers."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids: set[int] = set()
        self.eos_token_id = None
        self.bos_token_id = None
        self.chat_template = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def llama_config(kind: str) -> Any:
    """Llama-3-8B's shape (random weights), or a tiny one for the smoke run."""
    from _models import llama_config as shaped

    if kind == "8b":
        return shaped()
    return shaped(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=1024)


def random_quantized_llama(config: Any, dtype: Any = mx.float16) -> Any:
    """bench/_models.py's random 4-bit g64 model of shape ``config`` (no float weight is
    ever materialised; activations stay bounded)."""
    from _models import random_quantized_llama as build

    return build(config, dtype)


def mlx_lm_llama(config: Any, params: dict[str, mx.array], group_size: int = 64, bits: int = 4) -> Any:
    """mlx-lm's ``llama.Model`` of the same shape holding the SAME arrays (no copy): built
    lazily, quantized by ``nn.quantize`` (still lazy), then loaded strictly with ``params``."""
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(
        model_type="llama", hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        rms_norm_eps=config.rms_norm_eps, vocab_size=config.vocab_size, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, num_key_value_heads=config.num_key_value_heads,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
    )
    model = Model(args)
    nn.quantize(model, group_size=group_size, bits=bits)
    model.load_weights(list(params.items()), strict=True)
    return model


def decode_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of weights one decoded token reads: every quantized linear (incl. lm_head) in full,
    the norms, and ONE row of the embedding."""
    from metal_marlin.models.layers import QuantizedLinear

    linear = norms = embed_row = 0
    for _, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            linear += sum(module[k].nbytes for k in ("weight", "scales", "biases") if k in module)
        elif isinstance(module, nn.QuantizedEmbedding):
            embed_row += sum(module[k].nbytes // module[k].shape[0] for k in ("weight", "scales", "biases"))
        elif isinstance(module, nn.RMSNorm):
            norms += module.weight.nbytes
    return {"linear_bytes": linear, "norm_bytes": norms, "embedding_row_bytes": embed_row,
            "total_bytes": linear + norms + embed_row}


# ---------------------------------------------------------------------------------------
# The figures, one function per engine and figure
# ---------------------------------------------------------------------------------------
def _greedy(max_tokens: int) -> Any:
    from metal_marlin.generate import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def ours_prefill(engine: Any, ids: list[int]) -> dict[str, float]:
    """``Engine.prefill`` on a fresh cache (it evaluates the last position's logits)."""
    t0 = time.perf_counter()
    engine.prefill(ids, engine.make_cache())
    dt = time.perf_counter() - t0
    return {"prompt_tok_s": len(ids) / dt, "seconds": dt}


def mlx_lm_prefill(model: Any, ids: list[int]) -> dict[str, float]:
    """mlx-lm's prefill as ``generate_step`` does it: all but the last token into the cache
    (only the cache is evaluated), then the last token's logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(ids)[None]
    t0 = time.perf_counter()
    model(x[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    mx.eval(model(x[:, -1:], cache=cache)[:, -1, :])
    dt = time.perf_counter() - t0
    return {"prompt_tok_s": len(ids) / dt, "seconds": dt}


def ours_stream(engine: Any, ids: list[int], n: int) -> dict[str, float]:
    """``Engine.stream`` greedy, EOS ignored: time to first token and decode rate after it."""
    return stream_times(engine.stream(ids, _greedy(n)))


def mlx_lm_stream(model: Any, ids: list[int], n: int) -> dict[str, float]:
    """``mlx_lm.generate.generate_step`` (what ``stream_generate`` runs; greedy by default, no
    EOS check), the same timing from outside."""
    from mlx_lm.generate import generate_step

    return stream_times(generate_step(mx.array(ids), model, max_tokens=n))


def ours_aggregate(engine: Any, prompts: list[list[int]], n: int) -> dict[str, float]:
    """``BatchScheduler`` (no thread) with all ``prompts`` at once, ``n`` tokens each."""
    from metal_marlin.generate.scheduler import BatchScheduler

    sched = BatchScheduler(engine, max_batch_size=len(prompts), start=False)
    t0 = time.perf_counter()
    handles = [sched.submit(p, _greedy(n)) for p in prompts]
    sched.run_until_idle()
    wall = time.perf_counter() - t0
    tokens = sum(h.result().completion_tokens for h in handles)
    s = sched.stats
    return {"decode_tok_s": s["decode_tokens"] / s["decode_time"], "e2e_tok_s": tokens / wall,
            "step_ms": 1e3 * s["decode_time"] / max(s["decode_steps"], 1), "tokens": tokens, "wall_s": wall,
            "prefill_s": s["prefill_time"]}


def mlx_lm_aggregate(model: Any, prompts: list[list[int]], n: int) -> dict[str, float]:
    """``mlx_lm.generate.BatchGenerator`` with every prompt inserted at once, decode batch as
    large as the prompt count, no stop tokens; its own stats (``decode_time`` covers its
    decode steps, as our scheduler's does)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=n, completion_batch_size=len(prompts))
    try:
        t0 = time.perf_counter()
        gen.insert(prompts, [n] * len(prompts))
        tokens = 0
        with gen.stats() as stats:
            while responses := gen.next_generated():
                tokens += len(responses)
        wall = time.perf_counter() - t0
    finally:
        gen.close()
    return {"decode_tok_s": stats.decode_tps, "e2e_tok_s": tokens / wall,
            "step_ms": 1e3 * stats.decode_time / max(stats.generation_steps, 1), "tokens": tokens, "wall_s": wall,
            "prefill_s": stats.prompt_time}


def engine_figures(ctx: Context, out: dict[str, Any], engines: dict[str, tuple[str, Any]],
                   prompt: list[int], decode_prompt: list[int], agg_prompts: list[list[int]]) -> None:
    """Prompt tok/s, TTFT, batch-1 decode, aggregate decode at each concurrency; ``engines``
    maps a name to ``("ours", Engine)`` or ``("mlx_lm", model)``. Fills ``out`` as it goes."""
    s, budget = ctx.settings, ctx.budget

    def pick(ours: Callable[..., dict], theirs: Callable[..., dict], *args: Any) -> dict[str, Callable[[], dict]]:
        return {name: (lambda f=ours if kind == "ours" else theirs, o=obj: f(o, *args)) for name, (kind, obj) in engines.items()}

    figures = [
        ("prompt", f"{len(prompt)}-token prompt, prefill only", pick(ours_prefill, mlx_lm_prefill, prompt)),
        ("ttft", f"{len(prompt)}-token prompt, prefill + first greedy token", pick(ours_stream, mlx_lm_stream, prompt, 1)),
        ("decode_b1", f"{s.decode_tokens} greedy tokens after a {len(decode_prompt)}-token prompt",
         pick(ours_stream, mlx_lm_stream, decode_prompt, s.decode_tokens)),
    ]
    for key, what, fns in figures:
        if not budget.fits(30):
            out[key] = {"skipped": "budget"}
            continue
        log(f"  {key}: {what}")
        out[key] = {"what": what, **alternate(fns, s.repeats, budget)}
        ctx.save()
    out.setdefault("aggregate", {})
    for n in s.concurrency:
        if not budget.fits(30):
            out["aggregate"][str(n)] = {"skipped": "budget"}
            continue
        log(f"  aggregate decode, {n} concurrent sequences x {s.agg_tokens} tokens")
        fns = pick(ours_aggregate, mlx_lm_aggregate, agg_prompts[:n], s.agg_tokens)
        out["aggregate"][str(n)] = {"what": f"{n} sequences, {s.agg_prompt_tokens}-token prompts, {s.agg_tokens} tokens each",
                                    **alternate(fns, s.repeats, budget)}
        ctx.save()


def logits_diff(ours: Any, theirs: Any, ids: list[int]) -> dict[str, float]:
    """Max |difference| of the two models' float32 logits on ``ids`` (same weights expected)."""
    x = mx.array(ids)[None]
    a = ours(x).astype(mx.float32)
    b = theirs(x).astype(mx.float32)
    diff = mx.max(mx.abs(a - b)).item()
    return {"max_abs_diff": diff, "logits_abs_max": mx.max(mx.abs(a)).item(),
            "argmax_agree": float(mx.mean(mx.argmax(a, -1) == mx.argmax(b, -1)).item()),
            "finite": bool(mx.all(mx.isfinite(a)).item())}


def long_prompt(tokenizer: Any, length: int) -> list[int]:
    """``length`` tokens of held-out Wikipedia articles joined by blank lines (no article alone
    reaches 512 tokens)."""
    from metal_marlin.calibration import token_stream, wikipedia_text

    return token_stream(tokenizer, wikipedia_text("evaluation"), length)[:length].tolist()


def wiki_prompts(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """``n`` distinct prompts of ``length`` tokens, each from another held-out Wikipedia article."""
    from metal_marlin.calibration import wikipedia_text

    prompts = []
    for text in wikipedia_text("evaluation"):
        ids = tokenizer.encode(text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    raise ValueError(f"fewer than {n} held-out articles of {length} tokens")


# ---------------------------------------------------------------------------------------
# Section: smollm
# ---------------------------------------------------------------------------------------
def ensure_smollm_folder(ctx: Context) -> Path:
    """The 4-bit g64 SmolLM2 folder: ``--smollm-model``, else one made earlier in this run (the
    awq section's 128 x 512 one), else quantized now (smaller calibration)."""
    if ctx.smollm_folder is not None:
        return ctx.smollm_folder
    given = ctx.args.smollm_model
    if given and (Path(given) / "config.json").is_file():
        ctx.smollm_folder, ctx.smollm_folder_origin = Path(given), "given by --smollm-model"
        return ctx.smollm_folder
    from metal_marlin.pipeline import awq_quantize_model

    n, length = ctx.settings.smollm_calibration
    folder = Path(given) if given else ctx.workdir / "smollm2-w4g64"
    log(f"quantizing SmolLM2 ({ctx.settings.smollm_method.upper()} 4-bit g64, salient 0, {n} x {length} calibration tokens) into {folder.name}")
    method = ctx.settings.smollm_method
    stats = awq_quantize_model(None, folder, group_size=64, salient_ratio=0.0, bits=4, n_samples=n, seq_len=length,
                               n_grid=ctx.settings.smollm_n_grid, verbose=False, method=method)
    ctx.smollm_folder = folder
    ctx.smollm_folder_origin = (f"{method.upper()} by this run: {n} x {length} calibration tokens, "
                                f"n_grid {ctx.settings.smollm_n_grid}, {stats['time_s']:.1f} s")
    return folder


def section_smollm(ctx: Context, out: dict[str, Any]) -> None:
    """SmolLM2 4-bit: our engine(s) and mlx-lm on the same folder, every engine figure."""
    s = ctx.settings
    folder = ensure_smollm_folder(ctx)
    out["model"] = {"folder": folder.name, "origin": ctx.smollm_folder_origin}
    engines: dict[str, tuple[str, Any]] = {}
    out["engines"] = {}
    for i, dtype in enumerate(s.ours_dtypes):
        name = "ours" if i == 0 else f"ours_{dtype}"
        engine = load_engine(folder, dtype, max(s.concurrency))
        engines[name] = ("ours", engine)
        out["engines"][name] = {"kind": "ours", "dtype": dtype, "prefill_chunk": engine.prefill_chunk,
                                "max_batch_size": engine.max_batch_size, "dense_cpu_weight_mb": engine.dense_weight_bytes / MiB}
    engines["mlx_lm"] = ("mlx_lm", load_mlx_lm(folder))
    out["engines"]["mlx_lm"] = {"kind": "mlx_lm", "dtype": "float32 (widened on CPU)" if mx.default_device() == mx.cpu else "as stored (float16)"}
    first = engines["ours"][1]
    tok = first.tokenizer
    check_ids = wiki_prompts(tok, 1, 16)[0]
    out["peer_check"] = logits_diff(first.model, engines["mlx_lm"][1], check_ids)
    log(f"  mlx_lm.load on our folder works; logits max |diff| {out['peer_check']['max_abs_diff']:.3g}")
    prompt = long_prompt(tok, s.prompt_tokens)
    agg = wiki_prompts(tok, max(s.concurrency) + 1, max(s.agg_prompt_tokens, s.decode_prompt_tokens))
    engine_figures(ctx, out, engines, prompt, agg[-1][: s.decode_prompt_tokens], [p[: s.agg_prompt_tokens] for p in agg[:-1]])


# ---------------------------------------------------------------------------------------
# Section: llama8b
# ---------------------------------------------------------------------------------------
def section_llama8b(ctx: Context, out: dict[str, Any]) -> None:
    """The random 8B-shaped pair: same arrays in both, logits checked equal and finite, then
    every engine figure and the bandwidth bound."""
    from mlx.utils import tree_flatten

    from metal_marlin.generate.engine import Engine

    s = ctx.settings
    config = llama_config(s.llama)
    out["config"] = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    t0 = time.perf_counter()
    ours = random_quantized_llama(config)
    params = dict(tree_flatten(ours.parameters()))
    not_f16 = sorted(k for k, v in params.items() if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float16)
    if not_f16:
        raise RuntimeError(f"parameters left in another float dtype: {not_f16[:5]}")
    theirs = mlx_lm_llama(config, params)
    out["build_s"] = time.perf_counter() - t0
    out["weights"] = {"model_mb": sum(v.nbytes for v in params.values()) / MiB, **decode_weight_bytes(ours),
                      "quantization": "every linear + embedding + lm_head 4-bit g64, float16 scales/biases/activations"}
    log(f"  random 4-bit {s.llama} model built in {out['build_s']:.1f} s ({out['weights']['model_mb']:.0f} MiB)")
    rng = np.random.default_rng(0)
    check_ids = rng.integers(0, config.vocab_size, 8).tolist()
    out["peer_check"] = logits_diff(ours, theirs, check_ids)
    log(f"  ours vs mlx-lm logits max |diff| {out['peer_check']['max_abs_diff']:.3g}, finite {out['peer_check']['finite']}")
    if not out["peer_check"]["finite"]:  # speed does not depend on the values: measure, and say so
        log("  WARNING: logits are not finite on this device; speed figures are still measured")
    ctx.save()
    engine = Engine(ours, IdsTokenizer(config.vocab_size), {"context_length": config.max_position_embeddings},
                    max_batch_size=max(s.concurrency))
    engines = {"ours": ("ours", engine), "mlx_lm": ("mlx_lm", theirs)}
    prompt = rng.integers(0, config.vocab_size, s.prompt_tokens).tolist()
    decode_prompt = rng.integers(0, config.vocab_size, s.decode_prompt_tokens).tolist()
    agg = [rng.integers(0, config.vocab_size, s.agg_prompt_tokens).tolist() for _ in range(max(s.concurrency))]
    engine_figures(ctx, out, engines, prompt, decode_prompt, agg)
    out["bound"] = bandwidth_bound(ctx.report.data.get("bandwidth", {}), out)


def bandwidth_bound(bandwidth: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s if every decoded token had to read all its weights once at the measured copy
    bandwidth; and each engine's batch-1 decode as a fraction of it."""
    gb_s = bandwidth.get("gb_s")
    if not gb_s:
        return {"skipped": "no bandwidth measurement"}
    bound = gb_s * 1e9 / out["weights"]["total_bytes"]
    result: dict[str, Any] = {"bandwidth_gb_s": gb_s, "bytes_per_token": out["weights"]["total_bytes"], "bound_tok_s": bound}
    for name, fig in (out.get("decode_b1") or {}).items():
        if isinstance(fig, dict) and "median" in fig:
            result[f"{name}_fraction_of_bound"] = fig["median"]["decode_tok_s"] / bound
    return result


# ---------------------------------------------------------------------------------------
# Section: awq
# ---------------------------------------------------------------------------------------
AWQ_VARIANTS = {"ours": "ours", "mlx_lm": "mlx-lm-awq", "original": "original"}


def awq_child(variant: str, n_samples: int, seq_len: int, max_windows: int, workdir: Path, n_grid: int = 20) -> dict[str, Any]:
    """In a child process: ``bench/quality.py``'s ``run_one`` (quantize, time, RSS, then
    perplexity on both corpora), plus the MLX peak memory up to the start of evaluation,
    taken where ``run_one`` hands the model to ``metal_marlin.eval.perplexity``. ``run_one``
    takes no grid size: another ``n_grid`` (the smoke run's) is given to both quantizers
    through the module attributes it imports them from."""
    import functools

    import metal_marlin.eval as mm_eval
    import metal_marlin.pipeline as pipeline
    import mlx_lm.quant.awq as their_awq
    import quality

    if n_grid != 20:
        pipeline.awq_quantize_model = functools.partial(pipeline.awq_quantize_model, n_grid=n_grid)
        their_awq.awq_quantize = functools.partial(their_awq.awq_quantize, n_grid=n_grid)

    peak: dict[str, float] = {}
    real = mm_eval.perplexity

    def perplexity(*a: Any, **k: Any) -> Any:
        peak.setdefault("peak_memory_mb", mx.get_peak_memory() / MiB)
        peak.setdefault("own_peak_rss_mb", peak_rss_mb())
        return real(*a, **k)

    mm_eval.perplexity = perplexity
    t0 = time.perf_counter()
    result = quality.run_one(variant, 4, 64, n_samples, seq_len, max_windows, workdir, 0.0)
    result["child_compute_s"] = time.perf_counter() - t0
    result.update(peak, n_grid=n_grid)
    return result


def run_awq_child(ctx: Context, variant: str, workdir: Path) -> dict[str, Any]:
    n, length = ctx.settings.awq_calibration
    cmd = [sys.executable, str(Path(__file__).resolve()), "--awq-child", variant, "--workdir", str(workdir), "--awq-calibration", f"{n}x{length}",
           "--awq-eval-windows", str(ctx.settings.awq_eval_windows), "--awq-n-grid", str(ctx.settings.awq_n_grid)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.budget.timeout(), env=_child_env())
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({done.returncode}): {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = wall
    return result


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def block_child(backend: str, settings: Settings) -> None:
    """In a child process: our real per-block AWQ search (``pipeline._quantize_block``, as
    ``quantize_loaded_model`` runs it: block widened to float32, scale + clip search, AWQ vs
    RTN) on one random float16 block of the ``llama8b`` shape, random hidden states as its
    calibration input. One JSON line per finished run (the first is the warm-up), flushed, so
    a parent that stops us at its time limit keeps what was measured."""
    from metal_marlin.backends import compute_namespace
    from metal_marlin.models.llama import DecoderBlock
    from metal_marlin.pipeline import _as_float32, _quantize_block, validate_settings

    config = llama_config(settings.llama)
    n, length = settings.block_calibration
    mx.random.seed(1)
    block = DecoderBlock(config)
    block.set_dtype(mx.float16)
    mx.eval(block.parameters())
    block.update(_as_float32(block))
    x = mx.random.normal((n, length, config.hidden_size))
    mx.eval(x)
    spec = validate_settings(config, 4, 64, 0.0, "rms")
    xp = compute_namespace(backend)
    print(json.dumps({"event": "ready", "resolved": xp.__name__}), flush=True)
    for i in range(1 + settings.block_runs):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        _, _, stats = _quantize_block(block, x, spec, 0.0, "rms", 20, False, "awq", xp)
        print(json.dumps({"event": "warmup" if i == 0 else "run", "seconds": time.perf_counter() - t0,
                          "choice": stats["choice"], "peak_mb": mx.get_peak_memory() / MiB,
                          "peak_rss_mb": peak_rss_mb()}), flush=True)


def block_search(ctx: Context, backend: str) -> dict[str, Any]:
    """Seconds per block of the real search (see :func:`block_child`), in a child process
    stopped after ``block_timeout_s`` (or the budget): a slow backend reports a lower bound."""
    s = ctx.settings
    n, length = s.block_calibration
    out: dict[str, Any] = {"backend": backend, "calibration": f"{n} x {length} random hidden states",
                           "block": f"{s.llama} DecoderBlock, random float16 weights (searched in float32), n_grid 20"}
    limit = min(ctx.budget.timeout() or s.block_timeout_s, s.block_timeout_s)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--block-child", backend, *(["--smoke"] if ctx.args.smoke else []),
           "--block-calibration", f"{n}x{length}"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_child_env())
        stdout, stderr = done.stdout, done.stderr
        if done.returncode != 0:
            out["error"] = stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr = decode(exc.stdout), decode(exc.stderr)
        out["timed_out_after_s"] = limit
    out["child_wall_s"] = time.perf_counter() - t0
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    out["resolved"] = next((e["resolved"] for e in events if e["event"] == "ready"), None)
    warm = [e for e in events if e["event"] == "warmup"]
    out["warmup_s"] = warm[0]["seconds"] if warm else None
    out["runs"] = [e for e in events if e["event"] == "run"]
    if out["runs"]:
        out["median_s_per_block"] = statistics.median(r["seconds"] for r in out["runs"])
        out["peak_mb"] = max(r["peak_mb"] for r in out["runs"])
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in out["runs"])
    elif warm:
        out["cold_s_per_block"] = warm[0]["seconds"]  # kernels compiled inside: an upper bound
    return out


def section_awq(ctx: Context, out: dict[str, Any]) -> None:
    """AWQ time, memory and perplexity, ours vs mlx-lm vs the original; then the per-block search."""
    from metal_marlin.backends import compute_namespace

    s = ctx.settings
    n, length = s.awq_calibration
    out["calibration"] = (f"{n} x {length} tokens of the built-in Wikipedia calibration split (same tokens for both), "
                          f"n_grid {s.awq_n_grid}")
    out["eval"] = f"{s.awq_eval_windows} windows of 512 per corpus (bench/quality.py's windows)"
    out["ours_compute_backend"] = f"auto -> {compute_namespace('auto').__name__}"
    out["runs"] = {}
    workdir = ctx.workdir / "awq"
    for name, variant in AWQ_VARIANTS.items():
        if not ctx.budget.fits(60):
            out["runs"][name] = {"skipped": "budget"}
            continue
        log(f"  {variant}: quantize ({n} x {length}) + perplexity, in a child process")
        out["runs"][name] = run_awq_child(ctx, variant, workdir)
        log(f"    {json.dumps({k: v for k, v in out['runs'][name].items() if not isinstance(v, (dict, list))})}")
        if name == "ours":
            ctx.smollm_folder = workdir / "ours-w4g64s0.0"
            ctx.smollm_folder_origin = f"AWQ by this run's awq section: {n} x {length} calibration tokens"
        ctx.save()
    out["block_search"] = {}
    for backend in s.block_backends:
        resolved = compute_namespace(backend).__name__
        if any(b.get("resolved") == resolved for b in out["block_search"].values()):
            continue
        if not ctx.budget.fits(60):
            out["block_search"][backend] = {"skipped": "budget"}
            continue
        log(f"  per-block search, {s.llama} block, backend {backend} ({resolved}), child process")
        out["block_search"][backend] = result = block_search(ctx, backend)
        log(f"    warm-up {result.get('warmup_s')} s, per block {result.get('median_s_per_block')} s")
        ctx.save()


# ---------------------------------------------------------------------------------------
# Section: serve
# ---------------------------------------------------------------------------------------
def _metal_marlin_cli() -> list[str]:
    """``metal-marlin`` next to this Python when installed, else the same entry point via -c
    (the GPU machine runs a checkout that is not pip-installed)."""
    script = Path(sys.executable).with_name("metal-marlin")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from metal_marlin.cli import main; sys.exit(main())"]


def start_servers(folder: Path, scratch: Path) -> list[Any]:
    """``metal-marlin serve --model smollm2-w4=FOLDER`` and ``mlx_lm.server --model FOLDER``
    (bench/serve.py's ``Server``), both on 127.0.0.1, both ready. On MLX's CPU backend (smoke)
    mlx_lm.server gets serve.py's float32 copy and the BLAS that metal_marlin interposes,
    as bench/serve.py does."""
    from serve import Server, free_port, mlx_lm_server, start_all

    env = _child_env()
    env.pop("MM_API_KEY", None)
    p = free_port()
    ours = Server("metal-marlin serve", [*_metal_marlin_cli(), "serve", "--host", "127.0.0.1", "--port", str(p),
                                         "--data-dir", str(scratch / "data"), "--model", f"{SERVED_NAME}={folder}"],
                  p, SERVED_NAME, scratch / "ours.log", env, "/health")
    theirs = mlx_lm_server(folder, scratch, env, sys.executable, float32=mx.default_device() == mx.cpu)
    return start_all([ours, theirs])


def serve_levels(ctx: Context, out: dict[str, Any], servers: list[Any]) -> None:
    """Each level: one untimed warm-up per server (same clients and tokens), then the servers
    alternate for ``repeats`` rounds (bench/serve.py's ``run_level``)."""
    from serve import run_level

    s = ctx.settings
    timeout = ctx.budget.timeout(30) or 3600.0
    for server in servers:  # loads the model into our worker, compiles the kernels in both
        warm = asyncio.run(run_level(server, 1, 1, 4, timeout))
        if warm["errors"]:
            raise RuntimeError(f"{server.name} warm-up failed: {warm['error_messages']}")
    out["levels"] = {}
    for clients in s.serve_levels:
        if not ctx.budget.fits(30):
            out["levels"][str(clients)] = {"skipped": "budget"}
            continue
        log(f"  {clients} streaming clients x {s.serve_max_tokens} tokens")
        fns = {key: (lambda srv=server: asyncio.run(run_level(srv, clients, 1, s.serve_max_tokens, timeout)))
               for key, server in zip(("ours", "mlx_lm"), servers)}
        out["levels"][str(clients)] = alternate(fns, s.repeats, ctx.budget, memory=False)
        out["levels"][str(clients)]["gpu_processes_after"] = nvidia_smi("--query-compute-apps=pid,process_name,used_memory")
        ctx.save()


def engine_alone(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """The worker's engine and scheduler in-process, same prompts and params as the service's
    clients (temperature 0, EOS honoured): end-to-end output tokens/s without the gateway."""
    from metal_marlin.generate import SamplingParams
    from metal_marlin.generate.scheduler import BatchScheduler

    sched = BatchScheduler(engine, start=False)
    t0 = time.perf_counter()
    handles = [sched.submit(p, SamplingParams(temperature=0.0, max_tokens=max_tokens)) for p in prompts]
    sched.run_until_idle()
    wall = time.perf_counter() - t0
    tokens = sum(h.result().completion_tokens for h in handles)
    return {"output_tokens_per_s": tokens / wall, "output_tokens": tokens, "wall_s": wall}


def gateway_cost(ctx: Context, out: dict[str, Any], folder: Path) -> None:
    """Service vs engine alone at the gateway levels: ``Engine.load(folder, max_batch_size=16)``
    and a default ``BatchScheduler`` (what the worker builds), chat prompts as the clients send."""
    from serve import PROMPTS

    from metal_marlin.generate.engine import Engine

    s = ctx.settings
    engine = Engine.load(folder, max_batch_size=16)
    out["gateway"] = {}
    for clients in s.gateway_levels:
        level = out.get("levels", {}).get(str(clients), {})
        if "ours" not in level or not ctx.budget.fits(20):
            out["gateway"][str(clients)] = {"skipped": "no service figure or budget"}
            continue
        prompts = [engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(clients)]
        alone = alternate({"engine": lambda p=prompts: engine_alone(engine, p, s.serve_max_tokens)}, s.repeats, ctx.budget)
        service = level["ours"]["median"]["output_tokens_per_s"]
        engine_tps = alone["engine"]["median"]["output_tokens_per_s"]
        out["gateway"][str(clients)] = {**alone, "service_tok_s": service, "engine_tok_s": engine_tps,
                                        "gateway_cost_pct": 100.0 * (1.0 - service / engine_tps)}
        ctx.save()


def section_serve(ctx: Context, out: dict[str, Any]) -> None:
    """Both servers on the same folder, the streaming levels, then the gateway cost."""
    folder = ensure_smollm_folder(ctx).resolve()
    out["model"] = {"folder": folder.name, "origin": ctx.smollm_folder_origin, "served_as": SERVED_NAME}
    out["what"] = (f"each client one streaming /v1/chat/completions request, temperature 0, max_tokens "
                   f"{ctx.settings.serve_max_tokens} (bench/serve.py's prompts and client)")
    scratch = Path(tempfile.mkdtemp(prefix="serve-", dir=ctx.workdir))
    servers: list[Any] = []
    try:
        log("  starting metal-marlin serve and mlx_lm.server")
        t0 = time.perf_counter()
        servers = start_servers(folder, scratch)
        out["startup_s"] = time.perf_counter() - t0
        serve_levels(ctx, out, servers)
    finally:
        for server in servers:
            server.stop()
        if servers:
            out["logs_tail"] = {srv.name: srv.log_path.read_text(errors="replace")[-1500:] for srv in servers}
    gateway_cost(ctx, out, folder)


# ---------------------------------------------------------------------------------------
# Section: ppl
# ---------------------------------------------------------------------------------------
def window_nlls(model: Any, windows: np.ndarray) -> Iterator[dict[str, float]]:
    """Per-window mean NLL and token count (``metal_marlin.eval.perplexity`` on one window at
    a time), so a comparison can use whatever prefix of the windows a slow device finished."""
    from metal_marlin.eval import perplexity

    for i in range(windows.shape[0]):
        r = perplexity(model, windows[i : i + 1], batch_size=1)
        yield {"window": i, "mean_nll": r.mean_nll, "tokens": r.n_predicted_tokens}


def pooled_perplexity(rows: Sequence[dict[str, float]]) -> float:
    """exp of the token-weighted mean NLL of per-window rows."""
    return math.exp(sum(r["mean_nll"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows))


def ppl_child(folder: str, window: int, n_windows: int) -> None:
    """In a child started with ``MM_DEVICE=cpu``: the same windows on MLX's CPU backend (set
    here too, whether or not the library reads MM_DEVICE yet), one JSON line per window."""
    from metal_marlin import _blas
    from metal_marlin.checkpoints.loader import load_model
    from metal_marlin.eval import evaluation_windows
    from metal_marlin.tokenizer import load_tokenizer

    mx.set_default_device(mx.cpu)
    windows, _ = evaluation_windows(load_tokenizer(folder), window, n_windows)
    print(json.dumps({"device": str(mx.default_device()), "blas": _blas.loaded_blas or "bundled reference BLAS"}), flush=True)
    for row in window_nlls(load_model(folder).model, windows):
        print(json.dumps(row), flush=True)


def cpu_perplexity(ctx: Context, folder: Path, model: Any, windows: np.ndarray) -> dict[str, Any]:
    """Perplexity on the CPU (child process, stopped after ``ppl_cpu_timeout_s`` or the budget:
    without OpenBLAS, MLX's CPU matmul is slow) and on this device, over the same windows."""
    s = ctx.settings
    limit = min(ctx.budget.timeout() or s.ppl_cpu_timeout_s, s.ppl_cpu_timeout_s)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ppl-child", str(folder), str(s.ppl_window), str(s.ppl_windows)]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env={**_child_env(), "MM_DEVICE": "cpu"})
        stdout = done.stdout
        if done.returncode != 0:
            out["error"] = done.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out["timed_out_after_s"] = limit
    out["seconds"] = time.perf_counter() - t0
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if lines:
        out.update(lines[0])
    rows = [r for r in lines if "window" in r]
    out["windows"] = len(rows)
    if not rows:
        return {"cpu": out}
    out["perplexity"] = pooled_perplexity(rows)
    here_rows = list(window_nlls(model, windows[: len(rows)]))
    here = {"perplexity": pooled_perplexity(here_rows), "windows": len(here_rows), "device": str(mx.default_device())}
    return {"cpu": out, "default_device_same_windows": here,
            "rel_diff": (here["perplexity"] - out["perplexity"]) / out["perplexity"]}


def section_ppl(ctx: Context, out: dict[str, Any]) -> None:
    """Our 4-bit SmolLM2's perplexity here, on the CPU, and at each activation dtype."""
    from metal_marlin.checkpoints.loader import load_model
    from metal_marlin.eval import evaluate_model, evaluation_windows, perplexity
    from metal_marlin.tokenizer import load_tokenizer

    s = ctx.settings
    folder = ensure_smollm_folder(ctx)
    out["model"] = {"folder": folder.name, "origin": ctx.smollm_folder_origin}
    log(f"  perplexity on {mx.default_device()}, {s.ppl_windows} windows of {s.ppl_window} (evaluate_model)")
    t0 = time.perf_counter()
    out["default_device"] = {**evaluate_model(str(folder), s.ppl_window, s.ppl_windows).as_dict(),
                             "device": str(mx.default_device()), "seconds": time.perf_counter() - t0}
    ctx.save()
    windows, source = evaluation_windows(load_tokenizer(str(folder)), s.ppl_window, s.ppl_windows)
    if ctx.budget.fits(60):
        log("  perplexity on the CPU (child process, MM_DEVICE=cpu), per window")
        out.update(cpu_perplexity(ctx, folder, load_model(folder).model, windows))
        ctx.save()
    else:
        out["cpu"] = {"skipped": "budget"}
    out["dtypes"] = {"note": "load_model(folder, dtype): float tensors (incl. float16 scales/biases) cast to the dtype"}
    for name, dtype in DTYPES.items():
        if not ctx.budget.fits(20):
            out["dtypes"][name] = {"skipped": "budget"}
            continue
        t0 = time.perf_counter()
        model = load_model(folder, dtype).model
        out["dtypes"][name] = {**perplexity(model, windows, source).as_dict(), "seconds": time.perf_counter() - t0}
        del model
        ctx.save()


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------
def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _engine_summary(prefix: str, sec: dict[str, Any], out: dict[str, float]) -> None:
    figures = (("prompt", "prompt_tok_s", "tok_s"), ("ttft", "ttft_s", "s"), ("decode_b1", "decode_tok_s", "tok_s"))
    for fig, key, unit in figures:
        for name, value in (sec.get(fig) or {}).items():
            if isinstance(value, dict) and "median" in value:
                out[f"{prefix}.{fig}.{name}_{unit}"] = value["median"].get(key)
    for n, level in (sec.get("aggregate") or {}).items():
        for name, value in level.items():
            if isinstance(value, dict) and "median" in value:
                out[f"{prefix}.aggregate.{n}.{name}_tok_s"] = value["median"].get("decode_tok_s")
                out[f"{prefix}.aggregate.{n}.{name}_e2e_tok_s"] = value["median"].get("e2e_tok_s")
    peaks = [r["peak_mb"] for fig in ("prompt", "ttft", "decode_b1") for v in (sec.get(fig) or {}).values()
             if isinstance(v, dict) for r in v.get("runs", [])]
    for level in (sec.get("aggregate") or {}).values():
        for v in level.values():
            if isinstance(v, dict):
                peaks += [r["peak_mb"] for r in v.get("runs", [])]
    if peaks:
        out[f"{prefix}.peak_memory_mb"] = max(peaks)
    warmups: dict[str, float] = {}
    for fig in ("prompt", "ttft", "decode_b1"):
        for name, v in (sec.get(fig) or {}).items():
            if isinstance(v, dict) and "warmup_s" in v:
                warmups[name] = max(warmups.get(name, 0.0), v["warmup_s"])
    for name, value in warmups.items():
        out[f"{prefix}.max_warmup_s.{name}"] = value


def summarize(report: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers, flat and explicitly named (missing figures are left out)."""
    out: dict[str, Any] = {}
    out["bandwidth.gb_s"] = _get(report, "bandwidth", "gb_s")
    sections = report.get("sections", {})
    for name in ("smollm", "llama8b"):
        if name in sections:
            _engine_summary(name, sections[name], out)
    bound = _get(sections, "llama8b", "bound") or {}
    out["llama8b.bound_tok_s"] = bound.get("bound_tok_s")
    for name in ("ours", "mlx_lm"):
        out[f"llama8b.decode_b1.{name}_fraction_of_bound"] = bound.get(f"{name}_fraction_of_bound")
    runs = _get(sections, "awq", "runs") or {}
    for name in ("ours", "mlx_lm"):
        out[f"awq.{name}_s"] = _get(runs, name, "time_s")
        out[f"awq.{name}_peak_memory_mb"] = _get(runs, name, "peak_memory_mb")
        out[f"awq.{name}_peak_rss_mb"] = _get(runs, name, "own_peak_rss_mb")
    for name in ("ours", "mlx_lm", "original"):
        out[f"awq.ppl_wikipedia.{name}"] = _get(runs, name, "perplexity_wikipedia")
        out[f"awq.ppl_kjv.{name}"] = _get(runs, name, "perplexity_kjv")
    for backend, result in (_get(sections, "awq", "block_search") or {}).items():
        out[f"awq.block8b.{backend}_s_per_block"] = result.get("median_s_per_block")
    for n, level in (_get(sections, "serve", "levels") or {}).items():
        for name in ("ours", "mlx_lm"):
            med = _get(level, name, "median") or {}
            out[f"serve.{n}.{name}_tok_s"] = med.get("output_tokens_per_s")
            out[f"serve.{n}.{name}_ttft_p50_s"] = med.get("ttft_p50_s")
            out[f"serve.{n}.{name}_ttft_p99_s"] = med.get("ttft_p99_s")
            out[f"serve.{n}.{name}_errors"] = med.get("errors")
    for n, g in (_get(sections, "serve", "gateway") or {}).items():
        out[f"serve.gateway_cost_pct.{n}"] = g.get("gateway_cost_pct")
    out["ppl.gpu"] = _get(sections, "ppl", "default_device", "perplexity")
    out["ppl.cpu"] = _get(sections, "ppl", "cpu", "perplexity")
    out["ppl.cpu_windows"] = _get(sections, "ppl", "cpu", "windows")
    out["ppl.gpu_same_windows"] = _get(sections, "ppl", "default_device_same_windows", "perplexity")
    out["ppl.rel_diff"] = _get(sections, "ppl", "rel_diff")
    for name in DTYPES:
        out[f"ppl.{name}"] = _get(sections, "ppl", "dtypes", name, "perplexity")
    return {k: v for k, v in out.items() if v is not None}


def print_summary(report: dict[str, Any]) -> None:
    print("\n=== summary ===", flush=True)
    for key, value in summarize(report).items():
        print(f"{key:<48} {value:.4g}" if isinstance(value, float) else f"{key:<48} {value}")
    for section, tb in report.get("errors", {}).items():
        print(f"ERROR in {section}: {tb.strip().splitlines()[-1]}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
RUNNERS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "smollm": section_smollm, "llama8b": section_llama8b, "awq": section_awq, "serve": section_serve, "ppl": section_ppl,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, run in this order; from {SECTIONS}")
    parser.add_argument("--out", default=str(HERE / "out" / "gpu.json"), help="the JSON report (rewritten after every figure)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: a CPU check of the whole script")
    parser.add_argument("--budget-s", type=float, default=None, help="wall seconds this command may take; what would not fit is skipped")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--smollm-model", default=None, help="4-bit SmolLM2 folder to use (made there when missing)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--concurrency", default=None, help="aggregate-decode levels, e.g. 1,8,32,128")
    parser.add_argument("--agg-tokens", type=int, default=None, help="tokens per sequence in the aggregate figure")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--ours-dtypes", default=None, help="smollm: our engine at these dtypes, first is 'ours' (float16,float32)")
    parser.add_argument("--awq-calibration", default=None, help="N x L calibration tokens of the awq section, e.g. 128x512")
    parser.add_argument("--awq-eval-windows", type=int, default=None)
    parser.add_argument("--awq-n-grid", type=int, default=None, help="scale-search grid of both quantizers (default 20)")
    parser.add_argument("--block-calibration", default=None, help="N x L random hidden states for the per-block search")
    parser.add_argument("--block-backends", default=None, help="compute backends of the per-block search (mlx,auto)")
    parser.add_argument("--serve-levels", default=None)
    parser.add_argument("--awq-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--block-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ppl-child", nargs=3, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.smoke() if args.smoke else Settings()
    overrides = {
        "repeats": args.repeats, "agg_tokens": args.agg_tokens, "decode_tokens": args.decode_tokens,
        "concurrency": _ints(args.concurrency) if args.concurrency else None,
        "ours_dtypes": tuple(args.ours_dtypes.split(",")) if args.ours_dtypes else None,
        "awq_calibration": _pair(args.awq_calibration) if args.awq_calibration else None,
        "awq_eval_windows": args.awq_eval_windows, "awq_n_grid": args.awq_n_grid,
        "block_calibration": _pair(args.block_calibration) if args.block_calibration else None,
        "block_backends": tuple(args.block_backends.split(",")) if args.block_backends else None,
        "serve_levels": _ints(args.serve_levels) if args.serve_levels else None,
    }
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.awq_child:
        n, length = settings.awq_calibration
        print(json.dumps(awq_child(args.awq_child, n, length, settings.awq_eval_windows, Path(args.workdir), settings.awq_n_grid), default=_json_default))
        return 0
    if args.block_child:
        block_child(args.block_child, settings)
        return 0
    if args.ppl_child:
        folder, window, n_windows = args.ppl_child
        ppl_child(folder, int(window), int(n_windows))
        return 0
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {SECTIONS}")
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mm-gpu-")) if own_workdir else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"machine": machine_info(sys.argv), "settings": dataclasses.asdict(settings), "bandwidth": {},
                            "sections": {}, "errors": {}}
    ctx = Context(args, settings, Budget(args.budget_s, settings.reserve_s), Report(Path(args.out), data), workdir)
    log(f"machine: {data['machine']['default_device']}, {data['machine']['nvidia_smi'] or data['machine']['device_info']}")
    try:
        try:
            data["bandwidth"] = measure_bandwidth(settings.bandwidth_bytes)
            log(f"bandwidth: {data['bandwidth']['gb_s']:.1f} GB/s")
        except Exception:  # noqa: BLE001
            data["errors"]["bandwidth"] = traceback.format_exc()
        ctx.save()
        for name in sections:
            if not ctx.budget.fits(30):
                data["sections"][name] = {"skipped": "budget"}
                ctx.save()
                continue
            log(f"section {name} ({ctx.budget.left():.0f} s of budget left)")
            out = data["sections"].setdefault(name, {})
            t0 = time.perf_counter()
            try:
                RUNNERS[name](ctx, out)
            except Exception:  # noqa: BLE001  (record, go on with the next section)
                data["errors"][name] = traceback.format_exc()
                log(f"section {name} FAILED: {data['errors'][name].strip().splitlines()[-1]}")
            out["section_s"] = time.perf_counter() - t0
            out["process_peak_rss_mb"] = peak_rss_mb()
            gc.collect()
            mx.clear_cache()
            ctx.save()
    finally:
        ctx.save()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(data)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
