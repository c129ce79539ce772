"""Perplexity, quantization time and peak memory: original vs RTN vs mlx-lm AWQ vs ours.

All quantizers see the same calibration tokens (the built-in Wikipedia calibration split,
tokenized by our SmolLM2 tokenizer) and every model is scored on the same windows of two
texts: held-out Wikipedia (in-domain) and the King James Bible (out-of-domain; never used
for calibration). Besides the three quantizers at each (bits, group) setting, ours also runs
with fp16 salient channels (``--salient-ratios``, at the first setting) to trace perplexity against bits/weight.
A setting whose group does not divide the model's widths (SmolLM2: 576 is not a multiple of
128) is reported as skipped, not silently changed.
Each quantizer runs in its own child process, so its peak RSS (``ru_maxrss`` right after
quantization, before evaluation) is its own. Time is the quantization loop only (model
loading and saving excluded) for every quantizer.

mlx-lm's AWQ (``mlx_lm.quant.awq.awq_quantize``) is fed our calibration tokens through its
Python API (its own calibration download needs a hub). It always quantizes the embedding
too; we ask it for 8 bits, group 32 there, which is close to lossless, while ours and RTN
keep the tied embedding in float16.

Run: ``python bench/quality.py`` (prints a markdown table; ``--json PATH`` saves results,
which ``bench/results.py`` renders into docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SETTINGS = "4:64,4:128,3:64"
SALIENT_RATIOS = "0.005,0.01,0.02"
QUANTIZERS = ("rtn", "mlx-lm-awq", "ours")
CORPORA = ("wikipedia", "kjv")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _windows(max_windows: int, corpus: str) -> Any:
    from metal_marlin.eval import evaluation_windows
    from metal_marlin.tokenizer import load_tokenizer

    windows, _ = evaluation_windows(load_tokenizer(None), 512, max_windows, corpus=corpus)
    return windows


def run_one(
    variant: str, bits: int, group_size: int, n_samples: int, seq_len: int, max_windows: int, workdir: Path,
    salient_ratio: float = 0.0,
) -> dict[str, Any]:
    """One quantizer in this (child) process: quantize, note time and RSS, then evaluate."""
    import metal_marlin  # noqa: F401  (OpenBLAS for MLX before mlx is used)
    import mlx.core as mx

    from metal_marlin.calibration import calibration_tokens
    from metal_marlin.checkpoints.loader import load_builtin_model, load_model
    from metal_marlin.eval import perplexity
    from metal_marlin.pipeline import awq_quantize_model
    from metal_marlin.tokenizer import load_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"variant": variant, "bits": bits, "group_size": group_size, "salient_ratio": salient_ratio}
    if variant == "original":
        model = load_builtin_model().model
    elif variant in ("rtn", "ours"):
        out = workdir / f"{variant}-w{bits}g{group_size}s{salient_ratio}"
        stats = awq_quantize_model(
            None, out, group_size=group_size, salient_ratio=salient_ratio, verbose=False, bits=bits,
            n_samples=n_samples, seq_len=seq_len, method="rtn" if variant == "rtn" else "awq",
        )
        result.update(time_s=stats["time_s"], peak_rss_mb=_peak_rss_mb(), bits_per_weight=stats["bits_per_weight"])
        model = load_model(out).model
    elif variant == "mlx-lm-awq":
        import mlx_lm
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        from metal_marlin.checkpoints.hf import save_hf_folder
        from mlx.utils import tree_flatten

        base = workdir / "base-float32"
        if not base.exists():
            loaded = load_builtin_model()
            tokenizer_dir = Path(tempfile.mkdtemp(dir=workdir))
            load_tokenizer(None).save(tokenizer_dir)
            extra = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir()}
            save_hf_folder(base, dict(tree_flatten(loaded.model.parameters())), loaded.config.to_hf_dict(), extra_files=extra)
            del loaded
        model, _ = mlx_lm.load(str(base))
        tokens = mx.array(calibration_tokens(load_tokenizer(None), n_samples, seq_len))
        start = time.perf_counter()
        awq_quantize(model, tokens, AWQ_MODEL_CONFIGS["llama"], group_size=group_size, bits=bits, embed_group_size=32, embed_bits=8)
        mx.eval(model.parameters())
        result.update(time_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(), bits_per_weight=_mlx_lm_bits_per_weight(model))
        model = _dequantized_copy(model, load_builtin_model().config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    for corpus in CORPORA:
        ppl = perplexity(model, _windows(max_windows, corpus))
        result[f"perplexity_{corpus}"] = ppl.perplexity
        result[f"eval_tokens_{corpus}"] = ppl.n_predicted_tokens
    return result


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


def _dequantized_copy(mlx_lm_model: Any, config: Any) -> Any:
    """Our float model holding mlx-lm's dequantized weights, for a fast CPU evaluation.

    ``quantized_matmul`` computes ``x @ dequantize(W).T``, so this is the same function;
    MLX's CPU int4 kernel is just ~7x slower than sgemm for 512-token windows.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from metal_marlin.checkpoints.loader import build_model

    weights: dict[str, Any] = {}
    for path, module in mlx_lm_model.named_modules():
        if "scales" in module:
            weights[f"{path}.weight"] = mx.dequantize(
                module["weight"], module["scales"], module.get("biases"), group_size=module.group_size, bits=module.bits
            )
            if "bias" in module:
                weights[f"{path}.bias"] = module["bias"]
    for name, value in tree_flatten(mlx_lm_model.parameters()):
        prefix = name.rsplit(".", 1)[0]
        if f"{prefix}.weight" not in weights and not name.endswith((".scales", ".biases")):
            weights[name] = value
    return build_model(config, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--settings", default=SETTINGS, help="bits:group pairs, comma-separated")
    parser.add_argument("--salient-ratios", default=SALIENT_RATIOS,
                        help="extra runs of ours with fp16 salient channels at each setting ('' for none)")
    parser.add_argument("--no-original", action="store_true", help="skip the unquantized model's row (another run has it)")
    parser.add_argument("--json", default=None, help="also write the results here (rewritten after every job)")
    parser.add_argument("--run-one", nargs=4, metavar=("VARIANT", "BITS", "GROUP", "SALIENT"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_one:
        variant, bits, group, salient = args.run_one
        result = run_one(variant, int(bits), int(group), args.n_samples, args.seq_len, args.max_windows, Path(args.workdir), float(salient))
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import describe_machine, repo_command

    from metal_marlin.checkpoints.loader import load_builtin_model
    from metal_marlin.pipeline import validate_settings

    config = load_builtin_model().config
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",") if item]
    salient_ratios = [float(v) for v in args.salient_ratios.split(",") if v]
    jobs: list[tuple[str, int, int, float]] = [] if args.no_original else [("original", 16, 0, 0.0)]
    skipped = []
    for bits, group in settings:
        try:
            validate_settings(config, bits, group, 0.0, "rms")
        except ValueError as exc:
            skipped.append({"bits": bits, "group_size": group, "reason": str(exc)})
            continue
        jobs += [(q, bits, group, 0.0) for q in QUANTIZERS]  # quantizers alternate within each setting
        if not any(v == "ours" for v, *_ in jobs[: -len(QUANTIZERS)]):  # the sweep runs at the first valid setting
            jobs += [("ours", bits, group, r) for r in salient_ratios]

    results: list[dict[str, Any]] = []
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "quality",
        "command": repo_command(sys.argv),
        "machine": describe_machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "calibration": f"{args.n_samples} x {args.seq_len} tokens of the Wikipedia calibration split",
        "skipped": skipped,
        "planned": len(jobs),
        "results": results,
    }
    with tempfile.TemporaryDirectory() as workdir:
        for variant, bits, group, salient in jobs:
            cmd = [sys.executable, __file__, "--run-one", variant, str(bits), str(group), str(salient), "--workdir", workdir,
                   "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            report["eval_tokens"] = {c: results[-1][f"eval_tokens_{c}"] for c in CORPORA}
            report["wall_time_s"] = time.time() - started
            report["complete"] = len(results) == len(jobs)
            if args.json:  # after every job: a long run that dies keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=1))

    print(render_table(report))


def render_table(report: dict[str, Any]) -> str:
    """The markdown table of a quality report (also used by bench/results.py)."""
    lines = [
        f"machine: {report['machine']}",
        f"calibration: {report['calibration']}; eval: {report['eval_tokens']['wikipedia']} held-out Wikipedia tokens, "
        f"{report['eval_tokens']['kjv']} King James Bible tokens (windows of 512)",
        "",
        "| model | bits | group | salient | bits/weight | ppl Wikipedia | ppl KJV | quantization time (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        original = r["variant"] == "original"
        bits = "16" if original else r["bits"]
        group = "-" if original else r["group_size"]
        salient = "-" if r["variant"] != "ours" else f"{r['salient_ratio']:g}"
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "16"
        t = f"{r['time_s']:.1f}" if "time_s" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(
            f"| {r['variant']} | {bits} | {group} | {salient} | {bpw} | {r['perplexity_wikipedia']:.3f} | "
            f"{r['perplexity_kjv']:.3f} | {t} | {rss} |"
        )
    for s in report.get("skipped", []):
        lines.append(f"\n{s['bits']}-bit group {s['group_size']} skipped: {s['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
