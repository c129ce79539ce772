"""Generation speed of the engine on a 4-bit SmolLM2, against mlx-lm, and with batching.

In one run, on the same 4-bit model folder (the built-in SmolLM2 quantized with
``mlx.nn.quantize``, group 64, unless ``--model`` names a folder):

1. prompt (prefill) and decode tokens/s of ``Engine.stream`` vs ``mlx_lm.stream_generate``
   (what ``mlx_lm.generate`` runs), greedy, the engines alternated, median of ``--repeats``.
   On MLX's CPU backend ours runs in both modes: the default (float32 copies of the
   quantized matrices, sgemm) and the int4 kernel (``dense_cpu_weights=False``, what
   mlx-lm uses).
   Both are timed the same way from outside: prompt tokens/s = prompt length / time to
   the first token; decode tokens/s = (tokens - 1) / time from the first to the last token.
2. aggregate decode tokens/s of ``BatchScheduler`` at 1, 4 and 16 concurrent sequences
   (decode tokens / time spent in decode steps), plus end-to-end tokens/s including prefill,
   in each mode.
3. a profile of one decode step at batch 1 and 16, in each mode: where the time goes.

Run: ``python bench/generate.py`` (about 10 minutes on 2 CPU cores; ``--json PATH`` saves
the results, which ``bench/results.py`` renders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import metal_marlin  # noqa: F401  (first: gives MLX a fast BLAS on Linux)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from _machine import describe_machine, repo_command
from metal_marlin.assets import wikipedia_summaries_path
from metal_marlin.generate import SamplingParams
from metal_marlin.generate.engine import Engine
from metal_marlin.generate.scheduler import BatchScheduler


def quantized_builtin(folder: Path) -> Path:
    """The built-in SmolLM2 with every linear, the embedding and the tied head at 4 bits, g64."""
    from metal_marlin.checkpoints import load_builtin_model, save_hf_folder
    from metal_marlin.tokenizer import Tokenizer

    model, config, metadata = load_builtin_model()
    nn.quantize(model, group_size=64, bits=4)
    hf = config.to_hf_dict()
    hf["quantization"] = {"group_size": 64, "bits": 4}
    save_hf_folder(folder, dict(tree_flatten(model.parameters())), hf)
    Tokenizer.from_gguf_metadata(metadata["gguf_tokenizer"], chat_template=metadata["chat_template"]).save(folder)
    return folder


def wiki_texts(n: int) -> list[str]:
    with open(wikipedia_summaries_path(), encoding="utf-8") as f:
        data = json.load(f)
    texts = [v["extract"] for v in data.values() if len(v.get("extract", "")) > 400]
    return texts[:n]


def time_ours(engine: Engine, ids: list[int], n: int) -> tuple[float, float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    first = last = None
    count = 0
    for event in engine.stream(ids, params):
        last = time.perf_counter()
        first = first or last
        count += event.token_id is not None
    return len(ids) / (first - start), (count - 1) / (last - first), count


def time_mlx_lm(model, tokenizer, ids: list[int], n: int) -> tuple[float, float, int]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=n, sampler=make_sampler(temp=0.0)):
        last = time.perf_counter()
        first = first or last
        count += 1
    return len(ids) / (first - start), (count - 1) / (last - first), count


def concurrency_run(engine: Engine, prompts: list[list[int]], n_tokens: int) -> dict[str, float]:
    with BatchScheduler(engine, max_batch_size=len(prompts)) as sched:
        start = time.perf_counter()
        handles = [
            sched.submit(p, SamplingParams(temperature=0.7, seed=i, max_tokens=n_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        total = sum(h.result().completion_tokens for h in handles)
        wall = time.perf_counter() - start
        s = dict(sched.stats)
    return {
        "decode_tps": s["decode_tokens"] / s["decode_time"],
        "step_ms": 1e3 * s["decode_time"] / s["decode_steps"],
        "e2e_tps": total / wall,
        "prefill_tps": s["prefill_tokens"] / s["prefill_time"],
        "wall": wall,
    }


def _timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def profile_step(engine: Engine, batch: int, context: int = 64) -> list[tuple[str, float]]:
    """Milliseconds per part of one decode step at ``batch`` rows and ``context`` cached tokens."""
    model = engine.model
    layers = model.model.layers
    n_layers = len(layers)
    cache = engine.make_cache()
    cfg = model.config
    with engine.lock:
        for c in cache:  # random history: a real prefill of batch x context tokens takes minutes here
            kv = mx.random.normal((batch, cfg.num_key_value_heads, context, cfg.head_dim))
            c.update_and_fetch(kv, kv)
        mx.eval([c.state for c in cache])
        tok = mx.zeros((batch, 1), dtype=mx.int32)

        def forward():
            for c in cache:
                c.offset = context  # decode the same position again and again
            return engine.forward_last(tok, cache)

        step = _timed(forward)
        t = time.perf_counter()
        for _ in range(3):
            for c in cache:
                c.offset = context
            engine.forward_last(tok, cache)  # graph construction only, never evaluated
        build = (time.perf_counter() - t) / 3 * 1e3
        x = mx.random.normal((batch, 1, model.config.hidden_size))
        layer = layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        h_mlp = mx.random.normal((batch, 1, model.config.intermediate_size))
        parts = {
            "q/k/v/o projections": lambda: [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x)],
            "gate/up/down projections": lambda: [mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj(h_mlp)],
            "2 RMSNorms": lambda: [layer.input_layernorm(x), layer.post_attention_layernorm(x)],
        }
        per_layer = {name: _timed(fn, 5) for name, fn in parts.items()}
        q = mx.random.normal((batch, attn.n_heads, 1, attn.head_dim))
        k = mx.random.normal((batch, attn.n_kv_heads, context, attn.head_dim))
        per_layer["RoPE + attention (SDPA)"] = _timed(
            lambda: mx.fast.scaled_dot_product_attention(attn.rope(q, context), k, k, scale=attn.scale), 5
        )
        head = _timed(lambda: model.lm_logits(x[:, -1, :]), 5)
        logits = mx.random.normal((batch, engine.vocab_size))
        mx.eval(logits)
    from metal_marlin.generate.sampling import SamplingState

    states = [SamplingState(SamplingParams(temperature=0.0), [], engine.vocab_size) for _ in range(batch)]
    t = time.perf_counter()
    for _ in range(3):
        engine.sampler.sample(logits, states)
    sample = (time.perf_counter() - t) / 3 * 1e3
    rows = [("whole forward (evaluated)", step), ("  of which graph construction (Python)", build)]
    rows += [(f"  {name} x {n_layers} layers", ms * n_layers) for name, ms in per_layer.items()]
    rows += [("  output head (tied 4-bit embedding, 49152 x 576)", head), ("sampler (greedy argmax + host copy)", sample)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="quantized model folder (default: built-in SmolLM2 -> 4-bit g64)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--concurrency-prompt-tokens", type=int, default=12)
    parser.add_argument("--concurrency-tokens", type=int, default=8, help="tokens per sequence")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import mlx_lm

    started = time.time()
    machine = describe_machine()
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else quantized_builtin(Path(tmp) / "smollm2-q4-g64")
        # Modes of our engine: on the CPU backend, float32 copies (default) and the int4 kernel.
        modes = {"ours": Engine.load(folder)}
        if modes["ours"].dense_weight_bytes:
            modes["ours-int4-kernel"] = Engine.load(folder, dense_cpu_weights=False)
        their_model, their_tokenizer = mlx_lm.load(str(folder))
        engine = modes["ours"]
        print(f"model: {folder} ({engine.metadata.get('quantization')}); float32 copies: "
              f"{engine.dense_weight_bytes / 2**20:.0f} MiB")

        texts = wiki_texts(64)
        prompt = engine.tokenizer.encode(" ".join(texts))[: args.prompt_tokens]
        for e in modes.values():  # warm up every engine
            time_ours(e, prompt[:8], 2)
        time_mlx_lm(their_model, their_tokenizer, prompt[:8], 2)
        names = [*modes, "mlx_lm"]
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                if name == "mlx_lm":
                    results[name].append(time_mlx_lm(their_model, their_tokenizer, prompt, args.decode_tokens))
                else:
                    results[name].append(time_ours(modes[name], prompt, args.decode_tokens))
                print(f"  run {r + 1} {name}: prompt {results[name][-1][0]:.1f} tok/s, decode {results[name][-1][1]:.2f} tok/s "
                      f"({results[name][-1][2]} tokens)", flush=True)

        conc: dict[str, dict[int, dict[str, float]]] = {name: {} for name in modes}
        for c in (int(x) for x in args.concurrency.split(",")):
            prompts = [engine.tokenizer.encode(t)[: args.concurrency_prompt_tokens] for t in texts[:c]]
            for name, e in modes.items():
                conc[name][c] = concurrency_run(e, prompts, args.concurrency_tokens)
                print(f"  {name}, {c} concurrent: {conc[name][c]}", flush=True)

        profiles = {name: {b: profile_step(e, b) for b in (1, 16)} for name, e in modes.items()}

    report = {
        "benchmark": "generate",
        "command": repo_command(sys.argv),
        "machine": machine,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "model": "given folder" if args.model else "built-in SmolLM2-135M-Instruct, every linear + embedding 4-bit g64 (mlx.nn.quantize)",
        "settings": vars(args),
        "single": {
            name: {
                "prompt_tps": statistics.median(x[0] for x in runs),
                "decode_tps": statistics.median(x[1] for x in runs),
                "runs": runs,
            }
            for name, runs in results.items()
        },
        "concurrency": {name: {str(c): v for c, v in d.items()} for name, d in conc.items()},
        "profiles": {name: {str(b): rows for b, rows in d.items()} for name, d in profiles.items()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print()
    print(render_tables(report))
    sys.stdout.flush()


LABELS = {
    "ours": "metal-marlin `Engine.stream` (CPU: float32 copies)",
    "ours-int4-kernel": "metal-marlin `Engine.stream` (int4 kernel)",
    "mlx_lm": "`mlx_lm.stream_generate` (int4 kernel)",
}


def render_tables(report: dict) -> str:
    """Markdown tables of a generate report (also used by bench/results.py)."""
    s = report["settings"]
    lines = [
        f"Single sequence, {s['prompt_tokens']}-token prompt, {s['decode_tokens']} greedy tokens "
        f"(median of {s['repeats']}, engines alternated):",
        "",
        "| engine | prompt tokens/s | decode tokens/s |",
        "|---|---:|---:|",
    ]
    for name, r in report["single"].items():
        lines.append(f"| {LABELS.get(name, name)} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} |")
    lines += [
        "",
        f"Continuous batching (`BatchScheduler`), {s['concurrency_prompt_tokens']}-token prompts, "
        f"{s['concurrency_tokens']} sampled tokens each:",
        "",
        "| engine | concurrent sequences | aggregate decode tokens/s | x single | decode step ms | end-to-end tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, by_c in report["concurrency"].items():
        base = by_c[min(by_c, key=int)]["decode_tps"]
        for c, v in by_c.items():
            lines.append(f"| {LABELS.get(name, name)} | {c} | {v['decode_tps']:.2f} | {v['decode_tps'] / base:.1f} | "
                         f"{v['step_ms']:.0f} | {v['e2e_tps']:.2f} |")
    for name, by_b in report["profiles"].items():
        lines += ["", f"One decode step of {LABELS.get(name, name)}, 64 cached tokens (ms):", "",
                  "| part | batch " + " | batch ".join(by_b) + " |", "|---|" + "---:|" * len(by_b)]
        parts = [row[0] for row in next(iter(by_b.values()))]
        for i, part in enumerate(parts):
            lines.append(f"| {part} | " + " | ".join(f"{rows[i][1]:.1f}" for rows in by_b.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
