"""Perplexity, quantization time and peak memory: original vs RTN vs mlx-lm AWQ vs ours.

Models: the two built-in ones, SmolLM2-135M-Instruct (Llama family) and Gemma 3 270M (their
reference weights are the dequantized GGUF files they ship as). Quantizers, at each (bits,
group) setting: plain round-to-nearest (``rtn``), mlx-lm's AWQ (``mlx-lm-awq``), ours
(``awq``) and ours with learned rounding (``awq+round``). Every quantizer of a model sees the
same calibration tokens (the built-in Wikipedia calibration split, tokenized by that model's
tokenizer) and every model is scored on the same windows of two texts: held-out Wikipedia
(in-domain) and the King James Bible (out-of-domain; never used for calibration), with the
standard error of each perplexity (windows are the samples). A setting whose group does not
divide a model's widths (SmolLM2: 576 is not a multiple of 128) is reported as skipped.

Each quantizer runs in its own child process, so its peak RSS (``ru_maxrss`` right after
quantization, before evaluation) and, on a GPU, its peak device memory are its own. Time is
the quantization loop only (model loading and saving excluded) for every quantizer.

mlx-lm's AWQ (``mlx_lm.quant.awq.awq_quantize``) is fed our calibration tokens through its
Python API (its own calibration download needs a hub). It always quantizes the embedding too;
we ask it for 8 bits, group 32 there, which is close to lossless, while ours and RTN keep the
tied embedding in float16.

``--calibration-sizes`` adds the calibration-size table (first model, 4-bit g64): ours
(``--calibration-quantizers``, default ``awq``) at each size, and mlx-lm's AWQ at
``--reference-calibration`` (16 x 512), the yardstick of the default.

Run: ``python bench/quality.py --json PATH`` (``--budget-s`` stops launching quantizers when the
time is up and records the rest as not run); ``bench/results.py --quality-only`` renders the
reports into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODELS = "smollm2-135m-instruct,gemma-3-270m"
SETTINGS = "4:64,4:128,3:64,2:64,2:32"
QUANTIZERS = ("rtn", "mlx-lm-awq", "awq", "awq+round")
CORPORA = ("wikipedia", "kjv")
CALIBRATION_SIZES = "8x256,32x512,128x512"
REFERENCE_CALIBRATION = "16x512"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_device_mb() -> float | None:
    """Peak memory MLX allocated on a GPU (None on the CPU, where RSS says it)."""
    import mlx.core as mx

    from metal_marlin import device

    if not device.on_gpu():
        return None
    return mx.get_peak_memory() / 2**20


def _size(text: str) -> tuple[int, int]:
    n, length = text.lower().split("x")
    return int(n), int(length)


def _float_folder(model_name: str, workdir: Path) -> Path:
    """The float reference model as a Hugging Face folder (what mlx-lm loads), made once per run.

    Written beside and renamed into place, so children running at the same time never read a
    half-written folder (the loser of a race drops its copy).
    """
    from mlx.utils import tree_flatten

    from metal_marlin.checkpoints.hf import save_hf_folder
    from metal_marlin.checkpoints.loader import load_model
    from metal_marlin.tokenizer import load_tokenizer

    base = workdir / f"{model_name}-float32"
    if not base.exists():
        loaded = load_model(model_name)
        tokenizer_dir = Path(tempfile.mkdtemp(dir=workdir))
        load_tokenizer(model_name).save(tokenizer_dir)
        extra = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir()}
        staging = Path(tempfile.mkdtemp(dir=workdir)) / base.name
        save_hf_folder(staging, dict(tree_flatten(loaded.model.parameters())), loaded.config.to_hf_dict(), extra_files=extra)
        try:
            staging.rename(base)
        except OSError:
            if not base.exists():
                raise
    return base


def run_one(
    model_name: str, variant: str, bits: int, group_size: int, n_samples: int, seq_len: int, max_windows: int,
    workdir: Path, rounding_steps: int = 200,
) -> dict[str, Any]:
    """One quantizer in this (child) process: quantize, note time and memory, then evaluate."""
    import metal_marlin  # noqa: F401  (OpenBLAS for MLX before mlx is used)
    import mlx.core as mx

    from metal_marlin.calibration import calibration_tokens
    from metal_marlin.checkpoints.loader import load_model, open_checkpoint
    from metal_marlin.eval import evaluation_windows, perplexity
    from metal_marlin.pipeline import awq_quantize_model
    from metal_marlin.tokenizer import load_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_name)
    result: dict[str, Any] = {
        "model": model_name, "variant": variant, "bits": bits, "group_size": group_size,
        "n_samples": n_samples, "seq_len": seq_len,
        **calibration_memory_mb(open_checkpoint(model_name).config, n_samples, seq_len),
    }
    if variant == "original":
        model = load_model(model_name).model
    elif variant in ("rtn", "awq", "awq+round"):
        out = workdir / f"{model_name}-{variant}-w{bits}g{group_size}-{n_samples}x{seq_len}"
        mx.reset_peak_memory()
        stats = awq_quantize_model(
            model_name, out, group_size=group_size, salient_ratio=0.0, verbose=False, bits=bits,
            n_samples=n_samples, seq_len=seq_len, method=variant, rounding_steps=rounding_steps,
        )
        result.update(
            time_s=stats["time_s"], peak_rss_mb=_peak_rss_mb(), peak_device_mb=_peak_device_mb(),
            bits_per_weight=stats["bits_per_weight"],
            blocks={k: stats[k] for k in ("blocks_awq", "blocks_rtn", "blocks_round")},
        )
        loaded = load_model(out)
        model = _dequantized_copy(loaded.model, loaded.config)
    elif variant == "mlx-lm-awq":
        import mlx_lm
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        base = _float_folder(model_name, workdir)
        their_model, _ = mlx_lm.load(str(base))
        tokens = mx.array(calibration_tokens(tokenizer, n_samples, seq_len))
        model_type = json.loads((base / "config.json").read_text())["model_type"]
        mx.reset_peak_memory()
        start = time.perf_counter()
        awq_quantize(their_model, tokens, AWQ_MODEL_CONFIGS[model_type], group_size=group_size, bits=bits, embed_group_size=32, embed_bits=8)
        mx.eval(their_model.parameters())
        result.update(
            time_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(), peak_device_mb=_peak_device_mb(),
            bits_per_weight=_mlx_lm_bits_per_weight(their_model),
        )
        model = _dequantized_copy(their_model, load_model(model_name).config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    for corpus in CORPORA:
        windows, _ = evaluation_windows(tokenizer, 512, max_windows, corpus=corpus)
        ppl = perplexity(model, windows)
        result[f"perplexity_{corpus}"] = ppl.perplexity
        result[f"se_{corpus}"] = ppl.standard_error
        result[f"eval_tokens_{corpus}"] = ppl.n_predicted_tokens
    return result


def calibration_memory_mb(config: Any, n_samples: int, seq_len: int) -> dict[str, float]:
    """What AWQ holds per block for a calibration size, float32, from the shapes (MiB).

    ``block_inputs_mb``: the block's input, ``tokens x hidden``. ``captured_inputs_mb``: the
    inputs of its linear groups that the search scores candidates on (q/k/v's and gate/up's,
    each shared, o_proj's ``heads x head_dim`` and down_proj's intermediate width).
    """
    tokens = n_samples * seq_len
    captured = 2 * config.hidden_size + config.num_attention_heads * config.head_dim + config.intermediate_size
    return {"block_inputs_mb": tokens * config.hidden_size * 4 / 2**20, "captured_inputs_mb": tokens * captured * 4 / 2**20}


def _mlx_lm_bits_per_weight(model: Any) -> float:
    """Storage bits per weight of mlx-lm's quantized decoder linears (its embedding excluded,
    as ours excludes the float16 embedding): codes + fp16 scale and bias per group."""
    n_weights = n_bits = 0
    for path, module in model.named_modules():
        if "scales" in module and ".layers." in f".{path}":
            n = module["weight"].size * 32 // module.bits
            n_weights += n
            n_bits += module["weight"].size * 32 + (module["scales"].size + module["biases"].size) * 16
    return n_bits / n_weights


def _dequantized_copy(quantized_model: Any, config: Any) -> Any:
    """Our float model holding a quantized model's dequantized weights: every row is evaluated so.

    ``quantized_matmul`` computes ``x @ dequantize(W).T``, so this is the same function, and it
    keeps int kernels out of the measurement: MLX's CPU int4 kernel is ~7x slower than sgemm for
    512-token windows, and on a GPU each new (bits, group) kernel compiles for ~45 s at first use.
    Dequantized in numpy from the stored codes, fp16 scales and biases.
    """
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from metal_marlin.checkpoints.loader import build_model
    from metal_marlin.quant import unpack_codes

    weights: dict[str, Any] = {}
    for path, module in quantized_model.named_modules():
        if "scales" in module:
            packed = np.array(module["weight"])
            scales, biases = (np.array(module[k].astype(mx.float32)) for k in ("scales", "biases"))
            codes = unpack_codes(packed, module.bits).astype(np.float32)
            out_features, in_features = codes.shape
            groups = codes.reshape(out_features, scales.shape[1], -1)
            dense = (groups * scales[..., None] + biases[..., None]).reshape(out_features, in_features)
            if "salient_indices" in module:
                dense[:, np.array(module["salient_indices"])] = np.array(module["salient_weight"].astype(mx.float32))
            weights[f"{path}.weight"] = dense
            if "bias" in module:
                weights[f"{path}.bias"] = module["bias"]
    for name, value in tree_flatten(quantized_model.parameters()):
        prefix = name.rsplit(".", 1)[0]
        if f"{prefix}.weight" not in weights and not name.endswith((".scales", ".biases", ".salient_indices", ".salient_weight")):
            weights[name] = value
    return build_model(config, weights)


def plan_jobs(models: list[str], settings: list[tuple[int, int]], quantizers: list[str]) -> tuple[list[tuple], list[dict]]:
    """(model, variant, bits, group) in run order, and the settings skipped per model.

    Quantizers alternate within each setting, so a slow drift of the machine touches them alike.
    """
    from metal_marlin.checkpoints.loader import open_checkpoint
    from metal_marlin.pipeline import validate_settings

    jobs: list[tuple] = []
    skipped: list[dict] = []
    for model_name in models:
        config = open_checkpoint(model_name).config
        jobs.append((model_name, "original", 16, 0))
        for bits, group in settings:
            try:
                validate_settings(config, bits, group, 0.0, "rms")
            except ValueError as exc:
                skipped.append({"model": model_name, "bits": bits, "group_size": group, "reason": str(exc)})
                continue
            jobs += [(model_name, q, bits, group) for q in quantizers]
    return jobs, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS, help="built-in model names, comma-separated")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=32, help="windows of 512 tokens per text")
    parser.add_argument("--settings", default=SETTINGS, help="bits:group pairs, comma-separated")
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS))
    parser.add_argument("--calibration-sizes", default="", help=f"e.g. {CALIBRATION_SIZES}: the calibration-size table ('' for none)")
    parser.add_argument("--calibration-quantizers", default="awq", help="ours in that table, comma-separated (awq, awq+round)")
    parser.add_argument("--reference-calibration", default=REFERENCE_CALIBRATION, help="mlx-lm AWQ's calibration in that table")
    parser.add_argument("--rounding-steps", type=int, default=200, help="awq+round's steps per block (its default: 200)")
    parser.add_argument("--budget-s", type=float, default=None, help="launch no quantizer after this many seconds")
    parser.add_argument("--parallel", type=int, default=1,
                        help="jobs outside the timed settings run this many at a time (their times are marked shared)")
    parser.add_argument("--timed-settings", default=None,
                        help="bits:group settings whose jobs run alone (default: the first of --settings)")
    parser.add_argument("--warm-timing", action="store_true",
                        help="at the end, run the timed setting's quantizers again, alone, with every kernel compiled "
                             "(on a GPU the first use of each kernel compiles it) and report those times apart")
    parser.add_argument("--json", default=None, help="also write the results here (rewritten after every job)")
    parser.add_argument("--run-one", nargs=4, metavar=("MODEL", "VARIANT", "BITS", "GROUP"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    if args.timed_settings is None:
        args.timed_settings = args.settings.split(",")[0]

    if args.run_one:
        model_name, variant, bits, group = args.run_one
        result = run_one(model_name, variant, int(bits), int(group), args.n_samples, args.seq_len, args.max_windows,
                         Path(args.workdir), args.rounding_steps)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import describe_machine, repo_command

    models = [m for m in args.models.split(",") if m]
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",") if item]
    jobs, skipped = plan_jobs(models, settings, [q for q in args.quantizers.split(",") if q])
    ours = [q for q in args.calibration_quantizers.split(",") if q]
    calibration = [(models[0], q, 4, 64, *_size(size)) for size in args.calibration_sizes.split(",") if size for q in ours]
    if calibration:
        calibration.append((models[0], "mlx-lm-awq", 4, 64, *_size(args.reference_calibration)))
    main_jobs = [(*job, args.n_samples, args.seq_len) for job in jobs]
    # A calibration-table entry at the main calibration is a row of the main table: run once.
    in_main_table = [job for job in calibration if job in main_jobs]
    extra = [job for job in calibration if job not in main_jobs]
    # The calibration table (first model, 4-bit g64) runs right after that model's first setting,
    # before the other settings: a run cut short by its budget keeps the table.
    first_setting = [job for job in main_jobs if job[0] == models[0] and job[1] != "original"][:1]
    insert_at = 0
    while insert_at < len(main_jobs) and (main_jobs[insert_at][0] == models[0]) and (
            main_jobs[insert_at][1] == "original" or main_jobs[insert_at][2:4] == first_setting[0][2:4]):
        insert_at += 1
    planned = main_jobs[:insert_at] + extra + main_jobs[insert_at:]
    is_calibration = [insert_at <= index < insert_at + len(extra) for index in range(len(planned))]

    timed_settings = {tuple(int(v) for v in item.split(":")) for item in args.timed_settings.split(",") if item}
    alone, together = split_phases(planned, is_calibration, timed_settings, args.parallel)

    results: list[dict[str, Any]] = []
    calibration_results: list[dict[str, Any]] = []
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "quality",
        "command": repo_command(sys.argv),
        "machine": describe_machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "calibration": f"{args.n_samples} x {args.seq_len} tokens of the Wikipedia calibration split",
        "eval_windows": args.max_windows,
        "rounding_steps": args.rounding_steps,
        "parallel": args.parallel,
        "skipped": skipped,
        "not_run": [],
        "failed": [],
        "planned": len(planned),
        "results": results,
        "calibration_sizes": calibration_results,
    }
    lock = threading.Lock()
    order = {job: i for i, job in enumerate(planned)}

    def time_left() -> float | None:
        return None if args.budget_s is None else args.budget_s - (time.time() - started)

    def save() -> None:
        with lock:
            results.sort(key=lambda r: order.get(_job_of(r), len(order)))
            report["wall_time_s"] = time.time() - started
            report["complete"] = not report["not_run"] and not report["failed"] and len(results) + len(calibration_results) == len(planned) + len(in_main_table)
            if args.json:  # after every job: a long run that dies keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=1, default=_json_default))

    def run_job(index: int, concurrent: int, workdir: str) -> None:
        job = planned[index]
        left = time_left()
        if left is not None and left < 10:
            with lock:
                report["not_run"].append(list(job))
            return
        outcome = run_child(job, workdir, args, left, concurrent)
        with lock:
            if outcome is None:
                report["not_run"].append(list(job))
            elif "error" in outcome:
                report["failed"].append({"job": list(job), "error": outcome["error"], "first_error": outcome["first_error"]})
            else:
                outcome["concurrent"] = concurrent
                (calibration_results if is_calibration[index] else results).append(outcome)
                if job in in_main_table:
                    calibration_results.append(outcome)
                print(json.dumps(outcome), file=sys.stderr, flush=True)
        save()

    with tempfile.TemporaryDirectory() as workdir:
        for index in alone:  # each alone on the machine: these times are the comparable ones
            run_job(index, 1, workdir)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(lambda index: run_job(index, args.parallel, workdir), together))
        if args.warm_timing:
            report["warm_timing"] = warm_timing = []
            for index in warm_timing_jobs(planned, is_calibration, timed_settings):
                left = time_left()
                if left is not None and left < 10:
                    break
                outcome = run_child(planned[index], workdir, args, left, 1)
                if outcome is not None and "error" not in outcome:
                    warm_timing.append(outcome)
                    save()
    save()
    print(render_report(report))


def _job_of(result: dict[str, Any]) -> tuple:
    return (result["model"], result["variant"], result["bits"], result["group_size"], result["n_samples"], result["seq_len"])


def _setting_of(result: dict[str, Any]) -> tuple:
    """A job without its quantizer: the rows a quantizer is compared with."""
    model, _variant, *setting = _job_of(result)
    return (model, *setting)


def split_phases(planned: list[tuple], is_calibration: list[bool], timed_settings: set[tuple[int, int]],
                 parallel: int) -> tuple[list[int], list[int]]:
    """Indices of the jobs run one at a time, and of those run ``parallel`` at a time.

    Quantization times compare only between quantizers that had the machine to themselves, so
    the originals, every job at a timed setting (``--timed-settings``, the first setting by
    default) and the calibration table run alone, first. With ``--parallel 1`` everything
    does. The rest only need their perplexity, which does not depend on what else runs: on a
    GPU with 16 cores several of them at a time shorten the run several-fold; their times are
    reported but marked as shared.
    """
    if parallel <= 1:
        return list(range(len(planned))), []
    alone, together = [], []
    for index, job in enumerate(planned):
        timed = job[1] == "original" or is_calibration[index] or _at_timed_setting(job, timed_settings)
        (alone if timed else together).append(index)
    return alone, together


def warm_timing_jobs(planned: list[tuple], is_calibration: list[bool], timed_settings: set[tuple[int, int]]) -> list[int]:
    """The quantizers of the main table at a timed setting: what ``--warm-timing`` runs again."""
    return [index for index, job in enumerate(planned)
            if job[1] != "original" and not is_calibration[index] and _at_timed_setting(job, timed_settings)]


def _at_timed_setting(job: tuple, timed_settings: set[tuple[int, int]]) -> bool:
    return (job[2], job[3]) in timed_settings


def run_child(job: tuple, workdir: str, args: argparse.Namespace, left: float | None,
              concurrent: int) -> dict[str, Any] | None:
    """One job in a child process: its result, ``{"error": ...}``, or None when the budget ran out.

    A job that fails is retried once without CUDA graphs and without compiled steps
    (``MLX_USE_CUDA_GRAPHS=0``, ``MM_COMPILE=0``): MLX 0.32's CUDA graph capture has failed on
    one mlx-lm job ("cuGraphAddKernelNode ... invalid argument"), and a retried row says so.
    """
    model_name, variant, bits, group, n, length = job
    cmd = [sys.executable, __file__, "--run-one", model_name, variant, str(bits), str(group), "--workdir", workdir,
           "--n-samples", str(n), "--seq-len", str(length), "--max-windows", str(args.max_windows),
           "--rounding-steps", str(args.rounding_steps)]
    env = dict(os.environ)
    if concurrent > 1:  # share the cores instead of each child starting one BLAS thread per core
        threads = str(max(1, (os.cpu_count() or 1) // concurrent))
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    first = _attempt(cmd, env, left)
    if first is None or "error" not in first:
        return first
    second = _attempt(cmd, {**env, **RETRY_ENV}, left)
    if second is None:
        return None
    if "error" in second:
        return {"error": second["error"], "first_error": first["error"]}
    return {**second, "retried_with": RETRY_ENV, "first_error": _last_line(first["error"])}


RETRY_ENV = {"MLX_USE_CUDA_GRAPHS": "0", "MM_COMPILE": "0"}


def _attempt(cmd: list[str], env: dict[str, str], left: float | None) -> dict[str, Any] | None:
    """The child's result, ``{"error": stderr}``, or None when it outran ``left`` seconds."""
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=left, env=env)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as exc:
        print(exc.stderr[-4000:], file=sys.stderr)
        return {"error": exc.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


# ---------------------------------------------------------------------------------- rendering
LABELS = {
    "original": "original (dequantized GGUF)",
    "rtn": "round-to-nearest",
    "mlx-lm-awq": "mlx-lm AWQ",
    "awq": "metal-marlin awq",
    "awq+round": "metal-marlin awq+round",
}


def _ppl(r: dict[str, Any], corpus: str) -> str:
    se = r.get(f"se_{corpus}")
    return f"{r[f'perplexity_{corpus}']:.3f} ± {se:.3f}" if se is not None else f"{r[f'perplexity_{corpus}']:.3f}"


def gap_closed(ppl_rtn: float, ppl_ours: float, ppl_original: float) -> float:
    """Fraction of the RTN -> original perplexity gap a quantizer closes (1 = lossless)."""
    return (ppl_rtn - ppl_ours) / (ppl_rtn - ppl_original)


def _time(r: dict[str, Any]) -> str:
    return f"{r['time_s']:.1f}" + ("\\*" if r.get("concurrent", 1) > 1 else "")


def _mib(r: dict[str, Any], key: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:.1f}" if r[key] < 10 else f"{r[key]:.0f}"


def _memory(r: dict[str, Any]) -> str:
    rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
    dev = f" / {r['peak_device_mb']:.0f}" if r.get("peak_device_mb") is not None else ""
    return rss + dev


def render_report(report: dict[str, Any]) -> str:
    """Markdown tables of a quality report (also used by bench/results.py)."""
    results = report["results"]
    on_device = any(r.get("peak_device_mb") is not None for r in results)
    memory_head = "peak RSS / GPU memory (MB)" if on_device else "peak RSS (MB)"
    lines: list[str] = []
    for model_name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model_name]
        original = next((r for r in rows if r["variant"] == "original"), None)
        tokens = rows[0]
        lines += [
            f"### {model_name}",
            "",
            f"calibration: {report['calibration']}; eval: {tokens['eval_tokens_wikipedia']} held-out Wikipedia tokens, "
            f"{tokens['eval_tokens_kjv']} King James Bible tokens (windows of 512); ± is the standard error.",
            "",
            f"| quantizer | bits | group | bits/weight | ppl Wikipedia | ppl KJV | gap closed Wikipedia | gap closed KJV | time (s) | {memory_head} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r["variant"] == "original":
                lines.append(f"| {LABELS['original']} | 16 | - | 16 | {_ppl(r, 'wikipedia')} | {_ppl(r, 'kjv')} | - | - | - | - |")
                continue
            rtn = next((x for x in rows if x["variant"] == "rtn" and x["bits"] == r["bits"] and x["group_size"] == r["group_size"]), None)
            gaps = []
            for corpus in CORPORA:
                if original is None or rtn is None or r["variant"] == "rtn":
                    gaps.append("-")
                else:
                    key = f"perplexity_{corpus}"
                    gaps.append(f"{100 * gap_closed(rtn[key], r[key], original[key]):.0f}%")
            lines.append(
                f"| {LABELS.get(r['variant'], r['variant'])} | {r['bits']} | {r['group_size']} | {r['bits_per_weight']:.2f} | "
                f"{_ppl(r, 'wikipedia')} | {_ppl(r, 'kjv')} | {gaps[0]} | {gaps[1]} | {_time(r)} | {_memory(r)} |"
            )
        lines.append("")
        for s in report.get("skipped", []):
            if s["model"] == model_name:
                lines += [f"{s['bits']}-bit group {s['group_size']} skipped: {s['reason']}", ""]
    concurrency = sorted({r["concurrent"] for r in results if r.get("concurrent", 1) > 1})
    if concurrency:
        lines += [f"\\* time measured while {', '.join(map(str, concurrency))} jobs shared the GPU and the cores "
                  "(`--parallel`): only unmarked times compare with each other; perplexity is unaffected.", ""]
    for r in results + report.get("calibration_sizes", []):
        if r.get("retried_with"):
            settings = " ".join(f"{k}={v}" for k, v in r["retried_with"].items())
            lines += [f"{r['model']} {LABELS.get(r['variant'], r['variant'])} w{r['bits']}g{r['group_size']} "
                      f"{r['n_samples']}x{r['seq_len']} failed once ({r['first_error']}) and was rerun with {settings}.", ""]
    if report.get("calibration_sizes"):
        lines += render_calibration_table(report["calibration_sizes"]) + [""]
    for failure in report.get("failed", []):
        m, v, b, g, n, length = failure["job"]
        reason = _last_line(failure["error"])
        if failure.get("first_error"):
            reason = f"{_last_line(failure['first_error'])}; rerun without CUDA graphs and compiled steps: {reason}"
        lines.append(f"Failed: {m} {v} w{b}g{g} {n}x{length}: {reason}")
    if report.get("not_run"):
        lines.append("Not run (time budget): " + "; ".join(f"{m} {v} w{b}g{g} {n}x{length}" for m, v, b, g, n, length in report["not_run"]))
    return "\n".join(lines).rstrip() + "\n"


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "no output"


def render_calibration_table(rows: list[dict[str, Any]]) -> list[str]:
    reference = next((r for r in rows if r["variant"] == "mlx-lm-awq"), None)
    lines = [
        f"### Calibration size ({rows[0]['model']}, 4-bit g64)",
        "",
        "| quantizer | calibration | ppl Wikipedia | ppl KJV | time (s) | time / mlx-lm AWQ at its calibration "
        "| one block's input, float32 (MiB) | its linears' inputs, float32 (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {q: i for i, q in enumerate(QUANTIZERS)}
    for r in sorted(rows, key=lambda r: (r["variant"] == "mlx-lm-awq", order.get(r["variant"], 9), r["n_samples"] * r["seq_len"])):
        ratio = f"{r['time_s'] / reference['time_s']:.2f}x" if reference and r is not reference else "-"
        lines.append(
            f"| {LABELS.get(r['variant'], r['variant'])} | {r['n_samples']} x {r['seq_len']} | {_ppl(r, 'wikipedia')} | "
            f"{_ppl(r, 'kjv')} | {_time(r)} | {ratio} | {_mib(r, 'block_inputs_mb')} | {_mib(r, 'captured_inputs_mb')} |"
        )
    return lines


def render_timing(rows: list[dict[str, Any]]) -> list[str]:
    """Timing rows as a table: each quantizer's time against mlx-lm AWQ's at the same model and setting."""
    lines = [
        "| model | quantizer | bits | group | calibration | time (s) | time / mlx-lm AWQ | peak RSS / GPU memory (MB) "
        "| ppl Wikipedia | ppl KJV |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    rows = [r for r in rows if r["variant"] != "original"]
    mlx_lm = {_setting_of(r): r for r in rows if r["variant"] == "mlx-lm-awq"}
    for r in rows:
        reference = mlx_lm.get(_setting_of(r))
        ratio = f"{r['time_s'] / reference['time_s']:.2f}x" if reference is not None and reference is not r else "-"
        lines.append(
            f"| {r['model']} | {LABELS.get(r['variant'], r['variant'])} | {r['bits']} | {r['group_size']} | "
            f"{r['n_samples']} x {r['seq_len']} | {_time(r)} | {ratio} | {_memory(r)} | {_ppl(r, 'wikipedia')} | {_ppl(r, 'kjv')} |"
        )
    return lines


if __name__ == "__main__":
    main()
