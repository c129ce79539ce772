"""Soak run: many streaming chat clients for a long time against the real service.

What it shows (issue #13, point 2), on the built-in SmolLM2-135M-Instruct:

- no errors: every non-200 answer, SSE ``error`` event, stream that ends without ``[DONE]``
  and transport error counts, except the connections this bench closes on purpose;
- a disconnected client's generation stops within one decode step: every ``--disconnect-every``-th
  request closes its connection after a random number of content chunks, and the worker's
  scheduler counts, for each cancelled request, the decode steps it ran between ``cancel()``
  and freeing the row (``generation.cancel_lag_steps_hist`` / ``cancel_lag_steps_max`` in
  ``/health``; see :mod:`metal_marlin.generate.scheduler`);
- flat memory: the gateway's and the worker's RSS (``/proc/<pid>/status`` VmRSS; the worker's
  pid comes from ``/health``) every ``--sample-s`` seconds, plotted to ``--plot``; "flat" means
  the largest RSS after the warm-up (the first 20% of the run, at most 2 minutes) is within
  5% of the value at the end of the warm-up;
- client-side latency: time to first token and inter-token gaps (SSE content chunks) p50/p99,
  output tokens/s over the whole run, requests completed, disconnects done.

The service is ``python -m service`` on a free 127.0.0.1 port with a scratch data dir, started
and stopped with :class:`serve.Server` (its own process group: stopping it takes the worker
along). It is always stopped, also on Ctrl-C, SIGTERM or an exception, and the run is bounded:
clients start no request after ``--duration-s``, those in flight are abandoned (and counted as
errors) ``--margin-s`` later, and an alarm ends the whole bench past startup + duration + margin.

Run: ``python bench/soak.py`` (16 clients, 10 minutes, every 4th request disconnects, 64 max
tokens); writes ``bench/out/soak.json`` and ``docs/img/soak_rss.png``, prints the section that
:func:`render_markdown` renders for the results page. Exit status 0 when every criterion holds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from _machine import describe_machine, relative_args, repo_command  # noqa: E402
from serve import PROMPTS, Server, free_port, percentile, sse_events  # noqa: E402

from metal_marlin.assets import BUILTIN_MODEL_NAME  # noqa: E402

#: Largest RSS growth after the warm-up that still counts as flat (percent).
FLAT_PCT = 5.0
#: The supervisor refreshes the worker's readiness answer (and so ``/health``) this often.
HEALTH_REFRESH_S = 2.0


def read_rss_mb(pid: int | None) -> float | None:
    """Resident set size of ``pid`` in MiB from ``/proc/<pid>/status`` (None: gone or unknown)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Tally:
    """What the clients saw; one instance shared by every client task (one event loop)."""

    completed: int = 0
    disconnects: int = 0
    errors: int = 0
    error_messages: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    inflight: int = 0

    def error(self, message: str) -> None:
        self.errors += 1
        key = message[:200]
        self.error_messages[key] = self.error_messages.get(key, 0) + 1


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], stop_after: int | None, tally: Tally) -> None:
    """One streaming chat request; with ``stop_after``, close the connection after that many
    content chunks (a client going away mid-stream)."""
    start = time.perf_counter()
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    done = False
    tally.inflight += 1
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                tally.error(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for event in sse_events(resp):
                if event is None:
                    done = True
                    break
                if "error" in event:
                    tally.error(f"error event: {event['error']}")
                    return
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        (tally.ttft_s if last is None else tally.itl_s).append(now - (start if last is None else last))
                        last = now
                        chunks += 1
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
                if stop_after is not None and chunks >= stop_after:
                    break  # leaving ``client.stream`` unread closes the connection
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        tally.error(f"{type(exc).__name__}: {exc}")
        return
    finally:
        tally.inflight -= 1
    if done:
        tally.completed += 1
        tally.output_tokens += usage_tokens if usage_tokens is not None else chunks
    elif stop_after is not None and chunks >= stop_after:
        tally.disconnects += 1
        tally.output_tokens += chunks
    else:
        tally.error("stream ended without [DONE]")


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The request every client sends (greedy, as bench/serve.py, with the usage chunk)."""
    return {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }


async def health(http: httpx.AsyncClient) -> dict[str, Any]:
    """The ``worker`` section of ``/health`` (raises on anything but 200)."""
    resp = await http.get("/health")
    resp.raise_for_status()
    return resp.json()["worker"]


async def sample_loop(http: httpx.AsyncClient, gateway_pid: int, t0: float, samples: list[dict[str, Any]],
                      tally: Tally, every_s: float, stop: asyncio.Event) -> None:
    """Every ``every_s``: both RSS, the worker's pid and restarts, its generation counters."""
    while True:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 2), "gateway_rss_mb": read_rss_mb(gateway_pid)}
        try:
            worker = await health(http)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            tally.error(f"/health: {type(exc).__name__}: {exc}")
            worker = {}
        gen = worker.get("generation") or {}
        row.update(worker_pid=worker.get("pid"), worker_rss_mb=read_rss_mb(worker.get("pid")), restarts=worker.get("restarts"),
                   decode_tokens=gen.get("decode_tokens"), cancelled=gen.get("cancelled"))
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except asyncio.TimeoutError:
            pass


async def settled_generation(http: httpx.AsyncClient, timeout_s: float = 30.0) -> dict[str, Any]:
    """The worker's section of ``/health`` once it is idle and the supervisor has probed it
    since (so cancellations are retired and counted)."""
    deadline = time.monotonic() + timeout_s
    worker = await health(http)
    while worker.get("active_requests") and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        worker = await health(http)
    await asyncio.sleep(HEALTH_REFRESH_S + 0.5)
    return await health(http)


async def soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, run the clients and the sampler for ``args.duration_s``, collect the figures."""
    assert server.proc is not None
    tally = Tally()
    timeout = httpx.Timeout(args.request_timeout_s, connect=10)
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client, \
            httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        warm = Tally()  # loads the model into the worker before the clock starts
        await one_request(client, server.url, chat_body(server.model, PROMPTS[0], 4), None, warm)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.error_messages}")
        before = await settled_generation(http)
        rng = random.Random(args.seed)
        numbers = itertools.count()
        samples: list[dict[str, Any]] = []
        stop = asyncio.Event()
        t0 = time.monotonic()
        deadline = t0 + args.duration_s

        async def client_loop() -> None:
            while time.monotonic() < deadline:
                n = next(numbers)
                disconnect = args.disconnect_every > 0 and n % args.disconnect_every == args.disconnect_every - 1
                stop_after = rng.randint(1, max(1, args.max_tokens - 1)) if disconnect else None
                body = chat_body(server.model, PROMPTS[n % len(PROMPTS)], args.max_tokens)
                await one_request(client, server.url, body, stop_after, tally)

        sampler = asyncio.create_task(sample_loop(http, server.proc.pid, t0, samples, tally, args.sample_s, stop))
        clients = [asyncio.create_task(client_loop()) for _ in range(args.clients)]
        _, late = await asyncio.wait(clients, timeout=args.duration_s + args.margin_s)
        if late:  # the hard stop: a request that has not ended by now is a failure
            tally.error(f"hard stop: {tally.inflight} request(s) still running {args.margin_s:.0f} s after the end")
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for task in clients:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # a bug in this bench, not a service error
        wall = time.monotonic() - t0
        stop.set()
        await sampler
        after = await settled_generation(http)
        samples.append({"t_s": round(time.monotonic() - t0, 2), "gateway_rss_mb": read_rss_mb(server.proc.pid),
                        "worker_pid": after.get("pid"), "worker_rss_mb": read_rss_mb(after.get("pid")),
                        "restarts": after.get("restarts"), "decode_tokens": (after.get("generation") or {}).get("decode_tokens"),
                        "cancelled": (after.get("generation") or {}).get("cancelled"), "idle": True})
    return {"tally": tally, "wall_s": wall, "samples": samples, "before": before, "after": after}


def flatness(samples: list[dict[str, Any]], key: str, warmup_s: float) -> dict[str, Any]:
    """RSS at the end of the warm-up (first sample at or after it), the largest after it, the
    last one, and whether the largest is within :data:`FLAT_PCT` of the first."""
    after = [s for s in samples if s["t_s"] >= warmup_s and s.get(key) is not None]
    if not after:
        return {"warmup_end_mb": None, "max_after_warmup_mb": None, "end_mb": None, "max_growth_pct": None, "flat": None}
    base = after[0][key]
    peak = max(s[key] for s in after)
    growth = 100.0 * (peak - base) / base
    return {"warmup_end_mb": round(base, 1), "max_after_warmup_mb": round(peak, 1), "end_mb": round(after[-1][key], 1),
            "max_growth_pct": round(growth, 2), "flat": growth <= FLAT_PCT}


def generation_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The worker's scheduler counters over the soak (the warm-up cancels nothing, so the lag
    histogram and maximum are the soak's own)."""
    b, a = before.get("generation") or {}, after.get("generation") or {}
    counts = ("cancelled", "finished", "errors", "decode_steps", "decode_tokens", "prefill_tokens")
    return {
        **{k: (a.get(k) or 0) - (b.get(k) or 0) for k in counts},
        "cancel_lag_steps_max": a.get("cancel_lag_steps_max"),
        "cancel_lag_steps_hist": a.get("cancel_lag_steps_hist"),
        "cancel_lag_measured": sum((a.get("cancel_lag_steps_hist") or {}).values()) - sum((b.get("cancel_lag_steps_hist") or {}).values()),
    }


def plot_rss(samples: list[dict[str, Any]], warmup_s: float, path: Path, title: str) -> None:
    """Each process's RSS over time in its own panel (the gateway is ~15x smaller than the
    worker: on one axis its growth would not show), the warm-up's end and the +5% line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True)
    for ax, (key, label, color) in zip(axes, (("worker_rss_mb", "worker", "tab:blue"), ("gateway_rss_mb", "gateway", "tab:orange"))):
        pts = [(s["t_s"], s[key]) for s in samples if s.get(key) is not None]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", color=color, label=f"{label} RSS")
        base = flatness(samples, key, warmup_s)["warmup_end_mb"]
        if base is not None:
            ax.axhline(base * (1 + FLAT_PCT / 100), color=color, linestyle=":", linewidth=1, label=f"end of warm-up +{FLAT_PCT:.0f}%")
        ax.axvline(warmup_s, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, 1.1 * (max([v for _, v in pts] + [base * (1 + FLAT_PCT / 100) if base else 0]) or 1))
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("time since start of the soak (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(args: argparse.Namespace, machine: str, started: float, result: dict[str, Any], warmup_s: float) -> dict[str, Any]:
    tally: Tally = result["tally"]
    samples = result["samples"]
    gen = generation_figures(result["before"], result["after"])
    rss = {who: flatness(samples, f"{who}_rss_mb", warmup_s) for who in ("gateway", "worker")}
    restarts = (result["after"].get("restarts") or 0) - (result["before"].get("restarts") or 0)
    pids = {s.get("worker_pid") for s in samples if s.get("worker_pid") is not None}
    checks = {
        "no_errors": tally.errors == 0,
        # the lag is measured for every cancellation, and disconnects did cause some
        "cancel_within_one_step": (gen["cancelled"] > 0 or args.disconnect_every == 0)
        and gen["cancel_lag_measured"] == gen["cancelled"] and (gen["cancel_lag_steps_max"] or 0) <= 1,
        "gateway_rss_flat": bool(rss["gateway"]["flat"]),
        "worker_rss_flat": bool(rss["worker"]["flat"]),
        "no_worker_restart": restarts == 0 and len(pids) <= 1,
    }
    return {
        "command": repo_command(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine,
        "settings": {
            "model": BUILTIN_MODEL_NAME, "clients": args.clients, "duration_s": args.duration_s,
            "disconnect_every": args.disconnect_every, "max_tokens": args.max_tokens, "temperature": 0.0,
            "seed": args.seed, "sample_s": args.sample_s, "warmup_s": warmup_s, "margin_s": args.margin_s,
            "request_timeout_s": args.request_timeout_s, "flat_pct": FLAT_PCT,
            "plot": relative_args([str(Path(args.plot).resolve())])[0],  # no path of this machine in the report
        },
        "figures": {
            "wall_s": round(result["wall_s"], 1),
            "requests_completed": tally.completed, "disconnects": tally.disconnects, "errors": tally.errors,
            "error_messages": dict(sorted(tally.error_messages.items(), key=lambda kv: -kv[1])[:10]),
            "ttft_p50_s": percentile(tally.ttft_s, 50), "ttft_p99_s": percentile(tally.ttft_s, 99),
            "itl_p50_s": percentile(tally.itl_s, 50), "itl_p99_s": percentile(tally.itl_s, 99),
            "output_tokens": tally.output_tokens,
            "output_tokens_per_s": tally.output_tokens / result["wall_s"] if result["wall_s"] > 0 else None,
            "worker_restarts": restarts,
        },
        "generation": gen,
        "rss": rss,
        "checks": checks,
        "passed": all(checks.values()),
        "samples": samples,
    }


def _f(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _plot_link(plot: str) -> str:
    """The plot as the results page (``docs/``) links it: ``img/<name>`` when it lives in docs/img."""
    path = Path(plot)
    return f"img/{path.name}" if path.parent.name == "img" and path.parent.parent.name == "docs" else plot


def render_markdown(report: dict[str, Any]) -> str:
    """A short section for the results page: the figures, memory flatness and the plot link."""
    s, f, g, rss = report["settings"], report["figures"], report["generation"], report["rss"]
    hist = g.get("cancel_lag_steps_hist") or {}
    hist_text = " / ".join(str(hist.get(k, 0)) for k in ("0", "1", "2", ">2"))
    lines = [
        f"### Soak: {s['clients']} streaming chat clients for {s['duration_s']:.0f} s",
        "",
        f"Every {s['disconnect_every']}th request disconnects after a random number of tokens; {s['max_tokens']} max tokens, "
        f"temperature 0, {s['model']}. Machine: {report['machine']}. Command: `{report['command']}`.",
        "",
        "| requests completed | disconnects | errors | TTFT p50 / p99 s | inter-token p50 / p99 ms | output tok/s | "
        "cancellations | cancel lag max (decode steps) | lag histogram 0 / 1 / 2 / >2 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {f['requests_completed']} | {f['disconnects']} | {f['errors']} | {_f(f['ttft_p50_s'])} / {_f(f['ttft_p99_s'])} | "
        f"{_f(f['itl_p50_s'], 0, 1e3)} / {_f(f['itl_p99_s'], 0, 1e3)} | {_f(f['output_tokens_per_s'], 1)} | "
        f"{g['cancelled']} | {g.get('cancel_lag_steps_max', '-')} | {hist_text} |",
        "",
        f"| process | RSS at end of warm-up ({s['warmup_s']:.0f} s) MiB | max after MiB | at end MiB | growth % | flat (within {s['flat_pct']:.0f}%) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for who in ("gateway", "worker"):
        r = rss[who]
        flat = "-" if r["flat"] is None else ("yes" if r["flat"] else "**no**")
        lines.append(f"| {who} | {_f(r['warmup_end_mb'], 1)} | {_f(r['max_after_warmup_mb'], 1)} | {_f(r['end_mb'], 1)} | "
                     f"{_f(r['max_growth_pct'])} | {flat} |")
    failed = [k for k, ok in report["checks"].items() if not ok]
    lines += ["", "All checks hold." if not failed else f"Checks that do not hold: {', '.join(failed)}.", "",
              f"![gateway and worker RSS during the soak]({_plot_link(s['plot'])})"]
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM/SIGALRM as exceptions, so ``finally`` stops the server on every way out."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--disconnect-every", type=int, default=4, help="every k-th request closes its connection mid-stream (0: none)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling interval")
    parser.add_argument("--seed", type=int, default=0, help="seeds where the disconnecting requests stop")
    parser.add_argument("--margin-s", type=float, default=60.0, help="requests still running this long after the end are abandoned")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="longest wait for a byte of an answer")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", default=str(HERE / "out" / "soak.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "soak_rss.png"))
    args = parser.parse_args()
    if args.clients < 1 or args.duration_s <= 0 or args.max_tokens < 1:
        parser.error("--clients, --duration-s and --max-tokens must be positive")
    warmup_s = min(120.0, 0.2 * args.duration_s)
    started = time.time()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(int(args.startup_timeout_s + args.duration_s + args.margin_s + 120))

    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="mm-bench-soak-"))
    env = {k: v for k, v in os.environ.items() if k not in ("MM_API_KEY", "MM_WORKER_URL")}
    port = free_port()
    server = Server("metal-marlin", [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                     "--data-dir", str(scratch / "data"), "--log-level", "warning"],
                    port, BUILTIN_MODEL_NAME, scratch / "service.log", env, "/health")
    try:
        server.start()
        server.wait_ready(args.startup_timeout_s)
        print(f"service ready on {server.url}; {args.clients} clients for {args.duration_s:.0f} s", flush=True)
        result = asyncio.run(soak(server, args))
    except BaseException:
        try:
            print(f"service log (tail):\n{(scratch / 'service.log').read_text(errors='replace')[-3000:]}", file=sys.stderr)
        except OSError:
            pass
        raise
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        signal.alarm(0)

    report = build_report(args, machine, started, result, warmup_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_rss(result["samples"], warmup_s, Path(args.plot),
             f"{args.clients} streaming clients, {args.duration_s:.0f} s, every {args.disconnect_every}th disconnects")
    print()
    print(render_markdown(report))
    print(f"\nwrote {out} and {args.plot}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
