"""Past one machine, measured on one: a gateway fronting 1 and then 2 workers (separate
processes over loopback TCP, ``--worker URL``) on one PostgreSQL job store and one S3 API
server (moto) for results, as in ``tests/test_scale.py``.

For each worker count:

- **jobs per hour**: ``--jobs`` quantization jobs of the built-in SmolLM2-135M (``method:
  "rtn"``, 4-bit g64: a real model load, quantize, export and S3 publish per job, without
  AWQ's search), submitted at once; wall time from the first submission to the last success;
- **generation throughput**: ``--clients`` concurrent clients, each sending ``--requests``
  non-streamed ``/v1/completions`` of ``--max-tokens`` tokens (temperature 0, ``ignore_eos``)
  to the built-in model; completion tokens per second of wall time;
- **the gateway's added latency**: ``--probes`` sequential one-token requests through the
  gateway and the same requests straight to a worker's internal ``/generate``; the medians'
  difference is what the gateway (auth, validation, routing, relaying) adds per request.

Every worker runs with one BLAS thread. On a 2-core machine both workers are CPU-bound and
share the cores with the gateway, PostgreSQL and moto, so 2 workers cannot double anything:
the figures show correctness and overhead, not scaling. Run: ``python bench/scale.py``
(about 5 minutes on 2 cores); ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import _postgres  # noqa: E402  (the tests' throwaway PostgreSQL cluster)
import _s3  # noqa: E402  (the tests' moto server)
from _machine import describe_machine, repo_command  # noqa: E402
from _net import free_port  # noqa: E402
from test_scale import KEY, TOKEN, Proc  # noqa: E402

from worker.protocol import WORKER_TOKEN_HEADER  # noqa: E402

MODEL = "smollm2-135m-instruct"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_stack(n_workers: int, tmp: Path, database_url: str, s3_env: dict[str, str], bucket: str) -> tuple[Proc, list[Proc]]:
    env = {
        **os.environ, **s3_env,
        "MM_DATABASE_URL": database_url, "MM_RESULTS_URL": f"s3://{bucket}/bench", "MM_WORKER_TOKEN": TOKEN,
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MM_MAX_QUEUED_JOBS": "256", "MM_MAX_JOBS_PER_KEY": "256",
        "MM_MAX_INFLIGHT": "256",
    }
    workers = []
    for i in range(n_workers):
        port = free_port()
        cmd = [sys.executable, "-m", "worker", "--data-dir", str(tmp / f"w{n_workers}-{i}"), "--host", "127.0.0.1", "--port", str(port),
               "--memory-mb", "2048", "--log-level", "warning"]
        workers.append(Proc(f"worker{i}", cmd, env, tmp / f"w{n_workers}-{i}.log", port, headers={WORKER_TOKEN_HEADER: TOKEN}).start("/ready"))
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--data-dir", str(tmp / f"g{n_workers}"), "--api-key", KEY,
           "--log-level", "warning", *[a for w in workers for a in ("--worker", w.url)]]
    gateway = Proc("gateway", cmd, env, tmp / f"g{n_workers}.log", port).start("/health")
    return gateway, workers


def bench_jobs(http: httpx.Client, n_jobs: int) -> dict[str, Any]:
    spec = {"model": MODEL, "method": "rtn", "bits": 4, "group_size": 64, "n_samples": 2, "seq_len": 32}
    start = time.perf_counter()
    ids = []
    for _ in range(n_jobs):
        resp = http.post("/v1/quantization/jobs", json=spec)
        resp.raise_for_status()
        ids.append(resp.json()["id"])
    pending, statuses = set(ids), {}
    while pending:
        time.sleep(0.25)
        for job_id in list(pending):
            job = http.get(f"/v1/quantization/jobs/{job_id}").json()
            if job["status"] not in ("queued", "running"):
                statuses[job_id] = job["status"]
                pending.discard(job_id)
    wall = time.perf_counter() - start
    ok = sum(s == "succeeded" for s in statuses.values())
    return {"jobs": n_jobs, "succeeded": ok, "wall_s": round(wall, 1), "jobs_per_hour": round(3600 * ok / wall, 1)}


async def bench_generation(url: str, clients: int, requests_each: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "The history of the printing press", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    tokens, errors = 0, 0
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as http:
        await http.post("/v1/completions", json={**body, "max_tokens": 2})  # every worker loads the model on first use

        async def client() -> None:
            nonlocal tokens, errors
            for _ in range(requests_each):
                resp = await http.post("/v1/completions", json=body)
                if resp.status_code == 200:
                    tokens += resp.json()["usage"]["completion_tokens"]
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests_each, "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall, 1)}


def bench_overhead(gateway: Proc, worker: Proc, probes: int) -> dict[str, Any]:
    """Median wall time of a one-token request through the gateway and straight to the worker."""
    public = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    internal = {"model": MODEL, "prompt": "Hello", "params": {"temperature": 0, "max_tokens": 1}}
    times: dict[str, list[float]] = {"gateway": [], "worker": []}
    with httpx.Client(timeout=120) as http:
        for _ in range(2):  # warm both paths (model loaded, connections open)
            http.post(gateway.url + "/v1/completions", json=public, headers=AUTH).raise_for_status()
            http.post(worker.url + "/generate", json=internal, headers=worker.headers).raise_for_status()
        for _ in range(probes):
            for name, url, body, headers in (("gateway", gateway.url + "/v1/completions", public, AUTH),
                                              ("worker", worker.url + "/generate", internal, worker.headers)):
                t0 = time.perf_counter()
                resp = http.post(url, json=body, headers=headers)
                times[name].append(time.perf_counter() - t0)
                resp.raise_for_status()
    g, w = statistics.median(times["gateway"]), statistics.median(times["worker"])
    return {"probes": probes, "gateway_median_ms": round(1000 * g, 1), "worker_median_ms": round(1000 * w, 1), "added_ms": round(1000 * (g - w), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    pg = _postgres.start_server()
    s3 = _s3.start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="mm-scale-") as scratch:
            for n in [int(x) for x in args.workers.split(",")]:
                schema, url = pg.new_schema()
                gateway, workers = start_stack(n, Path(scratch), url, s3.env(), s3.new_bucket())
                try:
                    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=120) as http:
                        jobs = bench_jobs(http, args.jobs)
                    gen = asyncio.run(bench_generation(gateway.url, args.clients, args.requests, args.max_tokens))
                    over = bench_overhead(gateway, workers[0], args.probes)
                finally:
                    for p in [gateway, *workers]:
                        p.stop()
                    pg.drop_schema(schema)
                rows.append({"workers": n, "jobs": jobs, "generation": gen, "overhead": over})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        s3.stop()
        pg.stop()
    report = {"command": repo_command(sys.argv), "machine": describe_machine(), "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    print(f"\n{report['command']}\n{report['machine']}; load average before {report['load_before']}, after {report['load_after']}\n")
    print("| workers | jobs (rtn, SmolLM2) | jobs/hour | gen tokens/s (clients x requests) | gateway median | worker median | gateway adds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        j, g, o = r["jobs"], r["generation"], r["overhead"]
        print(f"| {r['workers']} | {j['succeeded']}/{j['jobs']} in {j['wall_s']} s | {j['jobs_per_hour']} | {g['tokens_per_s']} ({g['clients']} x {g['requests'] // g['clients']}, {g['errors']} errors) "
              f"| {o['gateway_median_ms']} ms | {o['worker_median_ms']} ms | {o['added_ms']} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
