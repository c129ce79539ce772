"""Serving benchmark: N concurrent streaming chat clients against our service and mlx_lm.server.

In one run, on the same 4-bit model folder:

- ours: ``metal-marlin serve --data-dir D --port P`` (the README's main command; the
  service supervises its worker). The folder is registered in the scratch data dir ``D`` as
  a succeeded quantization job (exactly what a finished job leaves: its row in
  ``jobs.sqlite3`` and its files in ``jobs/<id>/``), so the service serves it under that id.
- theirs: ``python -m mlx_lm.server --model FOLDER --port Q`` (mlx-lm's OpenAI-compatible
  server, continuous batching). On Linux it gets the same BLAS that ``metal_marlin``
  interposes for MLX (``LD_PRELOAD``), so both run the same math libraries. mlx-lm computes
  in the dtype the folder stores (float16 here), and MLX's x86 CPU backend has no fast
  float16 matmul (4 tokens took minutes in a first attempt), while our engine loads float32.
  So when MLX runs on the CPU, mlx_lm.server gets a float32 copy of the same folder: every
  float16 tensor widened exactly, the packed 4-bit codes untouched (``--mlx-lm-dtype``).

The model is ``--model PATH``, or the built-in SmolLM2-135M-Instruct quantized once with
``metal-marlin quantize --group-size 64 --salient-ratio 0`` into ``bench/out/serve-model``
(pure int4 in MLX layout, which mlx-lm loads; reused by later runs).

For each concurrency level (default 1, 4, 16) the two servers take turns (the order
alternates from level to level); each of N clients sends ``--requests`` streaming
``/v1/chat/completions`` requests one after another (fixed prompts, temperature 0,
``max_tokens`` 64, ``stream_options.include_usage``). Measured per level: time to first
token (first non-empty content delta) p50/p99, aggregate output tokens/s (completion tokens
from the usage chunks / wall time from the first request to the last answer), errors
(non-200, error events, streams without ``[DONE]``). Both servers run side by side, the idle
one idle; one short warm-up request each before measuring.

Run: ``python bench/serve.py`` (about 10 minutes on 2 CPU cores, plus a one-off
quantization when ``bench/out/serve-model`` does not exist yet); more with
``--concurrency 1,4,16,32 --requests 2 --max-tokens 128``. Writes ``bench/out/serve.json``
(``--json``) and prints a markdown table; ``bench/results.py`` renders the same report with
:func:`render_table` and plots :func:`series_for_plot`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from _machine import describe_machine, repo_command  # noqa: E402

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle step by step.",
    "Give me advice for learning to play the guitar.",
    "Why is the sky blue? Explain it simply.",
    "Write a poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Describe a typical day in ancient Rome.",
    "What should I pack for a week of hiking?",
    "Explain the difference between weather and climate.",
    "Tell me about the history of the bicycle.",
    "How does a computer store numbers?",
    "Write a letter to a friend who moved abroad.",
    "What makes a good cup of coffee?",
    "Explain photosynthesis to a ten-year-old.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ---------------------------------------------------------------------------------------
# The model and the two servers
# ---------------------------------------------------------------------------------------
def ensure_model(path: Path, python: str) -> Path:
    if (path / "model.safetensors").is_file():
        return path
    print(f"quantizing the built-in SmolLM2 into {path} (metal-marlin quantize) ...", flush=True)
    cli = Path(python).with_name("metal-marlin")
    cmd = [str(cli), "quantize", "--output-path", str(path), "--group-size", "64", "--salient-ratio", "0",
           "--n-samples", "16", "--seq-len", "256", "--quiet"]
    subprocess.run(cmd, check=True)
    return path


def register_as_job(data_dir: Path, folder: Path) -> str:
    """Make ``folder`` a succeeded job of the scratch data dir (row + ``jobs/<id>/``)."""
    from jobstore import open_store
    from jobstore.layout import result_dir, result_summary

    config = json.loads((folder / "config.json").read_text())
    quant = config.get("quantization") or {}
    stats_path = folder / "quant_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    hp = {
        "bits": int(quant.get("bits", 4)), "group_size": int(quant.get("group_size", 64)),
        "salient_ratio": float(stats.get("salient_ratio", 0.0)), "activation_method": str(stats.get("activation_method", "rms")),
        "n_samples": 0, "seq_len": 0, "n_grid": int(stats.get("n_grid", 0)), "duo_scaling": bool(stats.get("duo_scaling", False)),
    }
    store = open_store(data_dir)
    job, _ = store.create_job({"model": {"source": "path", "path": str(folder)}, "calibration": {"source": "builtin"}, "hyperparameters": hp})
    store.claim("bench")
    target = result_dir(data_dir, job.id)
    shutil.copytree(folder, target)
    store.finish(job.id, "bench", "succeeded", result=result_summary(target), message="registered by bench/serve.py")
    store.close()
    return job.id


def float32_copy(folder: Path, target: Path) -> Path:
    """``folder`` with its float16 tensors widened to float32 (exact); packed codes and every
    other file unchanged."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as st:
            metadata = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        widened = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()}
        save_file(widened, str(target / path.name), metadata=metadata)
    return target


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model: str, log_path: Path, env: dict[str, str], ready_path: str) -> None:
        self.name, self.cmd, self.port, self.model = name, cmd, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log_path, self.env, self.ready_path = log_path, env, ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s: {self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the worker goes too
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------
async def sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON events of an OpenAI-style SSE stream, then None for its ``[DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        yield json.loads(payload)


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = None
    chunks = 0
    done = False
    try:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}", "start": start, "end": time.perf_counter()}
            async for event in sse_events(resp):
                if event is None:
                    done = True
                    break
                if "error" in event:
                    return {"error": f"error event: {event['error']}", "start": start, "end": time.perf_counter()}
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "start": start, "end": time.perf_counter()}
    end = time.perf_counter()
    if not done:
        return {"error": "stream ended without [DONE]", "start": start, "end": end}
    return {"ttft": ttft, "tokens": tokens if tokens is not None else chunks, "usage": tokens is not None, "start": start, "end": end}


async def run_level(server: Server, clients: int, requests: int, max_tokens: int, timeout_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:

        async def worker(i: int) -> list[dict[str, Any]]:
            return [await one_request(client, server, PROMPTS[(i + r * clients) % len(PROMPTS)], max_tokens) for r in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "server": server.name, "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "tokens_from_usage": all(r["usage"] for r in ok),
    }


def mlx_lm_server(folder: Path, scratch: Path, env: dict[str, str], python: str, *, float32: bool) -> Server:
    """``mlx_lm.server`` on 127.0.0.1 for ``folder`` (not started). ``float32``: on a float32
    copy (MLX's x86 CPU backend has no fast float16 matmul), with the BLAS metal_marlin
    interposes when it loaded one; on a GPU the folder as stored."""
    from metal_marlin import _blas

    folder = float32_copy(folder, scratch / "model-float32") if float32 else folder
    their_env = dict(env)
    if _blas.loaded_blas:
        their_env["LD_PRELOAD"] = _blas.loaded_blas
    port = free_port()
    return Server("mlx_lm.server", [python, "-m", "mlx_lm.server", "--model", str(folder), "--host", "127.0.0.1",
                                    "--port", str(port), "--log-level", "WARNING"],
                  port, "default_model", scratch / "mlx_lm.log", their_env, "/health")


def start_all(servers: list[Server], timeout: float = 300) -> list[Server]:
    """Start every server, then wait until each answers its health check."""
    for server in servers:
        server.start()
    for server in servers:
        server.wait_ready(timeout)
    return servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="4-bit MLX-layout model folder (default: quantize the built-in SmolLM2)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=1, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    parser.add_argument("--mlx-lm-dtype", choices=("auto", "stored", "float32"), default="auto",
                        help="what mlx_lm.server loads: the folder as stored, or a float32 copy (auto: float32 when MLX runs on the CPU)")
    parser.add_argument("--json", default=str(HERE / "out" / "serve.json"), help="where to write the report")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    python = sys.executable
    started = time.time()

    from metal_marlin import _blas

    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    folder = Path(args.model).resolve() if args.model else ensure_model(HERE / "out" / "serve-model", python)
    scratch = Path(tempfile.mkdtemp(prefix="mm-bench-serve-"))
    servers: list[Server] = []
    their_dtype = args.mlx_lm_dtype
    try:
        data_dir = scratch / "data"
        job_id = register_as_job(data_dir, folder)
        env = dict(os.environ)
        env.pop("MM_API_KEY", None)
        ours_port = free_port()
        ours = Server("metal-marlin serve", [str(Path(python).with_name("metal-marlin")), "serve", "--data-dir", str(data_dir), "--port", str(ours_port)],
                      ours_port, job_id, scratch / "ours.log", env, "/health")
        import mlx.core as mx

        their_dtype = args.mlx_lm_dtype
        if their_dtype == "auto":
            their_dtype = "float32" if mx.default_device() == mx.cpu else "stored"
        theirs = mlx_lm_server(folder, scratch, env, python, float32=their_dtype == "float32")
        servers = start_all([ours, theirs])
        for s in servers:  # warm-up: loads the model into our worker, compiles kernels in both
            warm = asyncio.run(run_level(s, 1, 1, 4, args.timeout))
            if warm["errors"]:
                raise RuntimeError(f"{s.name} warm-up failed: {warm['error_messages']}")
        print(f"model: {folder} (ours: job {job_id}); both servers ready", flush=True)

        rows = []
        for i, clients in enumerate(levels):
            order = servers if i % 2 == 0 else servers[::-1]
            for s in order:
                row = asyncio.run(run_level(s, clients, args.requests, args.max_tokens, args.timeout))
                rows.append(row)
                print(f"  {clients:>3} clients  {s.name:<18} ttft p50 {row['ttft_p50_s'] or float('nan'):.2f} s  p99 {row['ttft_p99_s'] or float('nan'):.2f} s  "
                      f"{row['output_tokens_per_s'] or 0:.2f} tok/s  ({row['output_tokens']} tokens, {row['wall_s']:.0f} s, {row['errors']} errors)", flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "command": repo_command(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine, "model": str(folder), "max_tokens": args.max_tokens, "requests_per_client": args.requests,
        "temperature": 0.0, "mlx_lm_ld_preload": _blas.loaded_blas, "mlx_lm_weights": their_dtype, "rows": rows,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n### Streaming chat clients, {args.max_tokens} max tokens, temperature 0, {args.requests} request(s) per client\n")
    print(f"Machine: {machine}.\n")
    print(render_table(report))
    verdict = target_verdict(report)
    if verdict:
        print(f"\n{verdict}")
    print(f"wrote {out}")
    return 0


OURS = "metal-marlin serve"
THEIRS = "mlx_lm.server"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(report: dict[str, Any]) -> str:
    """The report as a markdown table, ours first at each level."""
    lines = [
        "| clients | server | TTFT p50 s | TTFT p99 s | output tok/s (aggregate) | output tokens | wall s | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["clients"], r["server"] != OURS)):
        lines.append(
            f"| {r['clients']} | {r['server']} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} | "
            f"{_fmt(r['output_tokens_per_s'])} | {r['output_tokens']} | {r['wall_s']:.0f} | {r['errors']} |"
        )
    return "\n".join(lines)


def series_for_plot(report: dict[str, Any]) -> list[tuple[str, list[int], list[float]]]:
    """``(label, clients, aggregate output tokens/s)`` per server."""
    out = []
    for server in (OURS, THEIRS):
        rows = sorted((r for r in report["rows"] if r["server"] == server and r["output_tokens_per_s"]), key=lambda r: r["clients"])
        out.append((server, [r["clients"] for r in rows], [r["output_tokens_per_s"] for r in rows]))
    return out


def target_verdict(report: dict[str, Any]) -> str | None:
    """At the highest level: ours >= 2x mlx_lm.server's throughput, lower TTFT p99, no errors?"""
    top = max(r["clients"] for r in report["rows"])
    mine = next(r for r in report["rows"] if r["clients"] == top and r["server"] == OURS)
    peer = next(r for r in report["rows"] if r["clients"] == top and r["server"] == THEIRS)
    if not (mine["output_tokens_per_s"] and peer["output_tokens_per_s"]) or mine["ttft_p99_s"] is None or peer["ttft_p99_s"] is None:
        return None
    ratio = mine["output_tokens_per_s"] / peer["output_tokens_per_s"]
    holds = ratio >= 2 and mine["ttft_p99_s"] < peer["ttft_p99_s"] and mine["errors"] == peer["errors"] == 0
    return (f"At {top} clients: throughput ours/mlx_lm.server = {ratio:.2f}x, TTFT p99 {mine['ttft_p99_s']:.2f} s vs "
            f"{peer['ttft_p99_s']:.2f} s, errors {mine['errors']} vs {peer['errors']}: the target (>= 2x, lower p99, no errors) "
            f"{'holds' if holds else 'does not hold'}.")


if __name__ == "__main__":
    sys.exit(main())
