"""Perplexity, quantization time and peak memory: original vs RTN vs mlx-lm AWQ vs ours.

All quantizers see the same calibration tokens (the built-in Wikipedia calibration split,
tokenized by our SmolLM2 tokenizer) and every model is scored on the same held-out windows.
Each quantizer runs in its own child process, so its peak RSS (``ru_maxrss`` right after
quantization, before evaluation) is its own. Time is the quantization loop only (model
loading and saving excluded) for every quantizer.

mlx-lm's AWQ (``mlx_lm.quant.awq.awq_quantize``) is fed our calibration tokens through its
Python API (its own calibration download needs a hub). It always quantizes the embedding
too; we ask it for 8 bits, group 32 there, which is close to lossless, while ours and RTN
keep the tied embedding in float16.

Run: ``python bench/quality.py`` (prints a markdown table; ``--json PATH`` saves results).
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

SETTINGS = ((4, 64), (3, 64))
QUANTIZERS = ("rtn", "mlx-lm-awq", "ours")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _windows(max_windows: int) -> Any:
    from metal_marlin.eval import evaluation_windows
    from metal_marlin.tokenizer import load_tokenizer

    windows, _ = evaluation_windows(load_tokenizer(None), 512, max_windows)
    return windows


def run_one(variant: str, bits: int, group_size: int, n_samples: int, seq_len: int, max_windows: int, workdir: Path) -> dict[str, Any]:
    """One quantizer in this (child) process: quantize, note time and RSS, then evaluate."""
    import metal_marlin  # noqa: F401  (OpenBLAS for MLX before mlx is used)
    import mlx.core as mx

    from metal_marlin.calibration import calibration_tokens
    from metal_marlin.checkpoints.loader import load_builtin_model, load_model
    from metal_marlin.eval import perplexity
    from metal_marlin.pipeline import awq_quantize_model
    from metal_marlin.tokenizer import load_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"variant": variant, "bits": bits, "group_size": group_size}
    if variant == "original":
        model = load_builtin_model().model
    elif variant in ("rtn", "ours"):
        out = workdir / f"{variant}-w{bits}g{group_size}"
        stats = awq_quantize_model(
            None, out, group_size=group_size, salient_ratio=0.0, verbose=False, bits=bits,
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
        result.update(time_s=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb())
        model = _dequantized_copy(model, load_builtin_model().config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    ppl = perplexity(model, _windows(max_windows))
    result.update(perplexity=ppl.perplexity, eval_tokens=ppl.n_predicted_tokens)
    return result


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
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--run-one", nargs=3, metavar=("VARIANT", "BITS", "GROUP"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_one:
        variant, bits, group = args.run_one
        print(json.dumps(run_one(variant, int(bits), int(group), args.n_samples, args.seq_len, args.max_windows, Path(args.workdir))))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import describe_machine

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        jobs = [("original", 16, 0)] + [(q, b, g) for b, g in SETTINGS for q in QUANTIZERS]
        for variant, bits, group in jobs:  # quantizers alternate within each setting
            cmd = [sys.executable, __file__, "--run-one", variant, str(bits), str(group), "--workdir", workdir,
                   "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    print(f"machine: {describe_machine()}")
    print(f"calibration: {args.n_samples} x {args.seq_len} Wikipedia tokens; eval: {results[0]['eval_tokens']} held-out tokens ({args.max_windows} windows of 512)\n")
    print("| model | bits | group | perplexity | quantization time (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        bits = "16" if r["variant"] == "original" else r["bits"]
        group = "-" if r["variant"] == "original" else r["group_size"]
        t = f"{r['time_s']:.1f}" if "time_s" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(f"| {r['variant']} | {bits} | {group} | {r['perplexity']:.3f} | {t} | {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
