#!/usr/bin/env python3
"""Smoke-test a running metal-marlin service with httpx.

    python scripts/smoke.py --base-url http://127.0.0.1:8000 [--api-key KEY]

Checks, in order: /health, /v1/models, a short completion, a streamed chat completion
(SSE, with the usage chunk and [DONE]), then a tiny quantization job of the built-in model
to success, its result downloaded and verified as safetensors (header parsed with the
``safetensors`` package), and the job deleted. Exits 0 when everything passed, 1 otherwise.
``--skip-job`` leaves out the quantization part (about a minute on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BUILTIN = "smollm2-135m-instruct"
TINY_JOB = {"n_samples": 2, "seq_len": 32, "n_grid": 2, "group_size": 64}


class SmokeFailure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def expect(resp: httpx.Response, status: int = 200) -> Any:
    if resp.status_code != status:
        raise SmokeFailure(f"{resp.request.method} {resp.request.url.path}: expected {status}, got {resp.status_code}: {resp.text[:500]}")
    return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp


def step(name: str) -> None:
    print(f"- {name} ...", end=" ", flush=True)


def wait_healthy(client: httpx.Client, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            resp = client.get("/health")
            if resp.status_code == 200:
                return resp.json()
            last = resp.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(1)
    raise SmokeFailure(f"/health not 200 within {timeout_s:.0f} s: {last}")


def run(base_url: str, api_key: str | None, skip_job: bool, health_timeout: float, job_timeout: float) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=300) as client:
        step("health")
        health = wait_healthy(client, health_timeout)
        print(f"ok (worker pid {health.get('worker', {}).get('pid')})")

        step("models")
        models = expect(client.get("/v1/models"))
        ids = [m["id"] for m in models["data"]]
        check(BUILTIN in ids, f"{BUILTIN} not in {ids}")
        print(f"ok ({len(ids)} models)")

        step("completion")
        comp = expect(client.post("/v1/completions", json={"model": BUILTIN, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
        text = comp["choices"][0]["text"]
        check(comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] >= 1, f"bad completion: {comp}")
        print(f"ok ({text!r})")

        step("streamed chat completion")
        body = {
            "model": BUILTIN, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        }
        events: list[Any] = []
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            check(resp.status_code == 200, f"stream answered {resp.status_code}")
            check(resp.headers.get("content-type", "").startswith("text/event-stream"), "not an SSE response")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
        check(bool(events) and events[-1] == "[DONE]", "stream did not end with [DONE]")
        check(all("error" not in e for e in events if isinstance(e, dict)), f"error in stream: {events}")
        usage = events[-2]
        check(usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1, f"no usage chunk: {usage}")
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"])
        print(f"ok ({content!r}, {len(events)} events)")

        if skip_job:
            return

        step("quantization job")
        job = expect(client.post("/v1/quantization/jobs", json=TINY_JOB, headers={"Idempotency-Key": f"smoke-{time.time_ns()}"}))
        job_id = job["id"]
        deadline = time.monotonic() + job_timeout
        while job["status"] in ("queued", "running"):
            check(time.monotonic() < deadline, f"job {job_id} still {job['status']} after {job_timeout:.0f} s")
            time.sleep(2)
            job = expect(client.get(f"/v1/quantization/jobs/{job_id}"))
        check(job["status"] == "succeeded", f"job {job_id} ended {job['status']}: {job.get('error')}")
        print(f"ok ({job_id}, {job['stats'].get('bits_per_weight', 0):.3f} bits/weight)")

        step("result download")
        from safetensors import safe_open

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            with client.stream("GET", f"/v1/quantization/jobs/{job_id}/result") as resp:
                check(resp.status_code == 200, f"result answered {resp.status_code}")
                with open(path, "wb") as fh:
                    for chunk in resp.iter_bytes():
                        fh.write(chunk)
            expected = {f["filename"]: f["bytes"] for f in job["result_files"]}["model.safetensors"]
            check(path.stat().st_size == expected, f"downloaded {path.stat().st_size} bytes, expected {expected}")
            with safe_open(str(path), framework="numpy") as st:
                keys = list(st.keys())
            check(any(k.endswith(".scales") for k in keys), "no quantization scales in the safetensors file")
        print(f"ok ({expected} bytes, {len(keys)} tensors)")

        step("completion from the quantized model")
        comp = expect(client.post("/v1/completions", json={"model": job_id, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}))
        print(f"ok ({comp['choices'][0]['text']!r})")

        step("delete job")
        expect(client.delete(f"/v1/quantization/jobs/{job_id}"))
        expect(client.get(f"/v1/quantization/jobs/{job_id}"), 404)
        print("ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--skip-job", action="store_true", help="leave out the quantization job")
    parser.add_argument("--health-timeout", type=float, default=120.0)
    parser.add_argument("--job-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    try:
        run(args.base_url.rstrip("/"), args.api_key, args.skip_job, args.health_timeout, args.job_timeout)
    except (SmokeFailure, httpx.HTTPError) as exc:
        print(f"FAILED\nsmoke: {exc}", file=sys.stderr)
        return 1
    print("smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
