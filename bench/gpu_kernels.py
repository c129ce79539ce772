"""The fused int4 kernel against MLX's ``quantized_matmul``, and where a decode step's time goes.

Run on the GPU (`scripts/device_setup.sh` says how to get MLX there)::

    python bench/gpu_kernels.py --out $OUT/kernels.json

1. Agreement of the fused kernel with MLX (relative error, per activation dtype).
2. Per weight shape of Llama-3-8B and SmolLM2 and per row count M: microseconds and
   effective weight bandwidth of the fused kernel, of MLX with a 2-D input ``[M, K]`` and
   with the 3-D input ``[M, 1, K]`` a decode batch passes; alternated, medians.
3. Device copy bandwidth (bytes read + written), the ceiling for (2).
4. One decode step of a random-weight 8B-shaped model at batch 1/16/128, fused kernels on
   and off: Python graph-building time alone, and the whole step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_gpu, describe_machine, repo_command  # noqa: E402
from _models import llama_config, quantized_weight_bytes, random_quantized_llama  # noqa: E402

from metal_marlin.kernels import gemv  # noqa: E402

SHAPES = {  # (K, N): in, out
    "8b.q_o": (4096, 4096), "8b.k_v": (4096, 1024), "8b.gate_up": (4096, 14336),
    "8b.down": (14336, 4096), "8b.lm_head": (4096, 128256),
    "smollm.q_o": (576, 576), "smollm.k_v": (576, 192), "smollm.gate_up": (576, 1536), "smollm.down": (1536, 576),
}


def timed(fn: Callable[[], Any], repeats: int, inner: int) -> float:
    """Median seconds of one call of ``fn`` (``inner`` calls evaluated together)."""
    mx.eval(fn())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(inner)])
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    x = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    t = timed(lambda: x * 1.5, repeats, 4)
    return {"bytes": nbytes, "seconds": t, "bytes_per_s": 2 * nbytes / t}


def microbench(dtype: mx.Dtype, rows_list: list[int], repeats: int, inner: int = 20) -> list[dict[str, Any]]:
    """GPU time per product: ``inner`` products on distinct inputs, replayed by ``mx.compile``
    (so the figure is the device's time, not Python's cost of building the graph)."""
    out = []
    for name, (k, n) in SHAPES.items():
        w = gemv.random_words((n, k // 8))
        scales = mx.random.uniform(0.001, 0.002, (n, k // 64)).astype(dtype)
        biases = -7.5 * scales
        mx.eval(w, scales, biases)
        wbytes = w.nbytes + scales.nbytes + biases.nbytes
        for rows in rows_list:
            xs = [mx.random.normal((rows, k)).astype(dtype) for _ in range(inner)]
            mx.eval(xs)
            ops = {
                "mlx_2d": lambda x: mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4),
                "mlx_3d": lambda x: mx.quantized_matmul(x[:, None, :], w, scales, biases, transpose=True, group_size=64, bits=4),
            }
            if gemv.int4_gemv_supported(rows, k, 4, 64, dtype):
                ops["fused"] = lambda x: gemv.int4_gemv(x, w, scales, biases, 64)
            variants = {v: mx.compile(lambda xs, op=op: [op(x) for x in xs]) for v, op in ops.items()}
            times: dict[str, list[float]] = {v: [] for v in variants}
            for fn in variants.values():
                mx.eval(fn(xs))  # trace, compile the kernels
            for _ in range(repeats):  # alternate the variants
                for v, fn in variants.items():
                    t0 = time.perf_counter()
                    mx.eval(fn(xs))
                    times[v].append((time.perf_counter() - t0) / inner)
            row = {"shape": name, "K": k, "N": n, "rows": rows, "weight_bytes": wbytes}
            for v, ts in times.items():
                t = statistics.median(ts)
                row[f"{v}_us"] = t * 1e6
                row[f"{v}_GBps"] = wbytes / t / 1e9
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def decode_step_profile(cfg_overrides: dict[str, Any], batches: list[int], repeats: int) -> dict[str, Any]:
    """Graph-building and whole-step time of one decode step, fused kernels on and off."""
    cfg = llama_config(**cfg_overrides)
    t0 = time.perf_counter()
    model = random_quantized_llama(cfg, mx.float16)
    result: dict[str, Any] = {"build_s": time.perf_counter() - t0, **quantized_weight_bytes(model), "steps": [],
                              "compiled_per_setting": True}
    for batch in batches:
        cache = model.make_cache()
        prompt = mx.random.randint(0, cfg.vocab_size, (batch, 64))
        mx.eval(model(prompt, cache))
        tokens = mx.random.randint(0, cfg.vocab_size, (batch, 1))
        for fused in (True, False):
            gemv.set_fused_kernels(fused)
            for layer in model.layers:  # compiled decode blocks are traced per setting
                layer._compiled = None

            def step() -> mx.array:
                logits = model(tokens, cache)
                for c in cache:
                    c.trim(1)
                return logits

            mx.eval(step())  # warm-up (kernel compilation)
            build, whole = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                logits = step()
                t1 = time.perf_counter()
                mx.eval(logits)
                t2 = time.perf_counter()
                build.append(t1 - t0)
                whole.append(t2 - t0)
            row = {"batch": batch, "fused": fused, "graph_build_ms": statistics.median(build) * 1e3,
                   "step_ms": statistics.median(whole) * 1e3}
            row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)
            row.update(decode_parts(model, batch, repeats))
            result["steps"].append(row)
            print(json.dumps(row), flush=True)
        gemv.set_fused_kernels(True)
    return result


def decode_parts(model: Any, batch: int, repeats: int) -> dict[str, float]:
    """Milliseconds of each kind of work in one decode step, each timed on its own graph.

    The parts are the step's operations on inputs of the right shapes (32 layers' worth),
    so their sum approximates the step minus what overlaps; they say what dominates.
    """
    from metal_marlin.models.layers import project_stacked

    cfg = model.config
    layers = model.layers
    h = mx.random.normal((batch, 1, cfg.hidden_size)).astype(mx.float16)
    inner = mx.random.normal((batch, 1, cfg.intermediate_size)).astype(mx.float16)
    ctx = mx.random.normal((batch, 1, cfg.num_attention_heads * cfg.head_dim)).astype(mx.float16)
    caches = model.make_cache()
    prompt = mx.random.randint(0, cfg.vocab_size, (batch, 64))
    mx.eval(model(prompt, caches))

    def matmuls() -> list[mx.array]:
        out = []
        for layer in layers:
            out += project_stacked(h, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
            out.append(layer.self_attn.o_proj(ctx))
            out += project_stacked(h, (layer.mlp.gate_proj, layer.mlp.up_proj))
            out.append(layer.mlp.down_proj(inner))
        return out

    def head() -> mx.array:
        return model.lm_logits(h[:, -1, :])

    def attention() -> list[mx.array]:
        out = []
        for layer, cache in zip(layers, caches):
            attn = layer.self_attn
            width = attn.n_heads * attn.head_dim
            q = h[..., :width].reshape(batch, 1, attn.n_heads, attn.head_dim).transpose(0, 2, 1, 3)
            k = q[:, : attn.n_kv_heads]
            q, k = attn.rope(q, cache.offset), attn.rope(k, cache.offset)
            keys, values = cache.update_and_fetch(k, k)
            out.append(mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask="causal"))
        for cache in caches:
            cache.trim(1)
        return out

    def norms_elementwise() -> list[mx.array]:
        out = []
        for layer in layers:
            a = layer.input_layernorm(h)
            b = layer.post_attention_layernorm(h + a)
            out.append(nn_silu(inner) * inner + 0)
            out.append(b + a)
        return out

    parts = {"matmuls_x_layers": matmuls, "output_head": head, "rope_cache_sdpa_x_layers": attention, "norms_elementwise_x_layers": norms_elementwise}
    result = {}
    for name, fn in parts.items():
        result[f"{name}_ms"] = timed(fn, repeats, 1) * 1e3
    return result


def nn_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shapes", default=None, help="prefix of the weight shapes to measure (e.g. 8b.)")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": describe_machine(), "gpu": describe_gpu(), "command": repo_command(sys.argv)}

    def save() -> None:
        Path(args.out).write_text(json.dumps(report, indent=1))

    report["self_check"] = {}
    for d in gemv.FUSED_DTYPES:
        cases: list[dict] = []
        try:
            report["self_check"][str(d)] = {"worst": gemv.self_check(d, cases), "cases": cases}
        except Exception as exc:  # a compile error must not cost the rest of the run
            report["self_check"][str(d)] = {"error": repr(exc), "cases": cases}
        print(str(d), json.dumps(report["self_check"][str(d)]), flush=True)
    report["bandwidth"] = bandwidth(2 << 30, args.repeats)
    print(report["bandwidth"], flush=True)
    save()
    rows = [int(r) for r in args.rows.split(",")]
    if args.shapes:
        for name in [n for n in SHAPES if not n.startswith(args.shapes)]:
            del SHAPES[name]
    report["microbench"] = {}
    for dtype in (mx.float16,):  # the engines' dtype on a GPU
        report["microbench"][str(dtype)] = microbench(dtype, rows, args.repeats)
        save()
    report["decode_step"] = decode_step_profile({"num_hidden_layers": args.layers}, [int(b) for b in args.batches.split(",")], args.repeats)
    save()


if __name__ == "__main__":
    main()
