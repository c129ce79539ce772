#!/usr/bin/env python3
"""Smoke-test a running metal-marlin service with httpx.

    python scripts/smoke.py --base-url http://127.0.0.1:8000 [--api-key KEY]

Checks, in order: /health, /v1/models, a short completion, a streamed chat completion
(SSE, with the usage chunk and [DONE]), then a tiny quantization job of the built-in model
followed through its live events stream to success, its result downloaded and verified as
safetensors (header parsed with the ``safetensors`` package), a completion from it, and the
job deleted. The checks are functions that tests call too (tests/test_service_e2e.py). Exits 0 when everything passed, 1 otherwise.
``--skip-job`` leaves out the quantization part (about a minute on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def check_models(client: httpx.Client) -> list[str]:
    models = expect(client.get("/v1/models"))
    ids = [m["id"] for m in models["data"]]
    check(BUILTIN in ids, f"{BUILTIN} not in {ids}")
    return ids


def check_completion(client: httpx.Client, model: str = BUILTIN) -> str:
    comp = expect(client.post("/v1/completions", json={"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}))
    check(comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] >= 1, f"bad completion: {comp}")
    return comp["choices"][0]["text"]


def sse_lines(resp: httpx.Response) -> Iterator[tuple[str | None, Any]]:
    """``(event id, data)`` of an SSE response as it arrives; data is JSON or '[DONE]'."""
    event_id = None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            event_id = line[len("id: "):]
        elif line.startswith("data: "):
            payload = line[len("data: "):]
            yield event_id, payload if payload == "[DONE]" else json.loads(payload)
            event_id = None


def check_streamed_chat(client: httpx.Client, model: str = BUILTIN) -> tuple[str, int]:
    body = {
        "model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        check(resp.status_code == 200, f"stream answered {resp.status_code}")
        check(resp.headers.get("content-type", "").startswith("text/event-stream"), "not an SSE response")
        events = [data for _, data in sse_lines(resp)]
    check(bool(events) and events[-1] == "[DONE]", "stream did not end with [DONE]")
    check(all("error" not in e for e in events if isinstance(e, dict)), f"error in stream: {events}")
    usage = events[-2]
    check(usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1, f"no usage chunk: {usage}")
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"])
    return content, len(events)


def follow_job(client: httpx.Client, job_id: str, timeout_s: float, on_event: Callable[[dict[str, Any]], None] | None = None) -> list[tuple[float, dict[str, Any]]]:
    """Follow a job's live events (SSE) until its final event and ``[DONE]``; resumes after the
    last event if the server ends the stream early. Returns ``(arrival time, event)`` pairs."""
    deadline = time.monotonic() + timeout_s
    seen: list[tuple[float, dict[str, Any]]] = []
    while True:
        check(time.monotonic() < deadline, f"job {job_id} did not finish within {timeout_s:.0f} s")
        params: dict[str, str] = {"stream": "true"}
        if seen:
            params["after"] = seen[-1][1]["id"]
        with client.stream("GET", f"/v1/quantization/jobs/{job_id}/events", params=params, timeout=httpx.Timeout(60, read=60)) as resp:
            check(resp.status_code == 200, f"events stream answered {resp.status_code}")
            for _, data in sse_lines(resp):
                if data == "[DONE]":
                    return seen
                check("error" not in data, f"error in the events stream: {data}")
                seen.append((time.monotonic(), data))
                if on_event is not None:
                    on_event(data)
                check(time.monotonic() < deadline, f"job {job_id} did not finish within {timeout_s:.0f} s")


def run_job(client: httpx.Client, body: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], list[tuple[float, dict[str, Any]]]]:
    """Submit a job, follow its events to the end; the final job and the events."""
    job = expect(client.post("/v1/quantization/jobs", json=body, headers={"Idempotency-Key": f"smoke-{time.time_ns()}"}))
    events = follow_job(client, job["id"], timeout_s)
    job = expect(client.get(f"/v1/quantization/jobs/{job['id']}"))
    check(job["status"] == "succeeded", f"job {job['id']} ended {job['status']}: {job.get('error')}")
    check(events and events[-1][1]["type"] == "succeeded", f"the events did not end with 'succeeded': {[e['type'] for _, e in events][-3:]}")
    return job, events


def check_result(client: httpx.Client, job: dict[str, Any]) -> tuple[int, int]:
    """Download the job's model.safetensors and check it: size, header, quantization tensors."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        with client.stream("GET", f"/v1/quantization/jobs/{job['id']}/result") as resp:
            check(resp.status_code == 200, f"result answered {resp.status_code}")
            with open(path, "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        expected = {f["filename"]: f["bytes"] for f in job["result_files"]}["model.safetensors"]
        check(path.stat().st_size == expected, f"downloaded {path.stat().st_size} bytes, expected {expected}")
        with safe_open(str(path), framework="numpy") as st:
            keys = list(st.keys())
            packed = [k for k in keys if k.endswith(".weight") and st.get_slice(k).get_dtype() == "U32"]
        check(any(k.endswith(".scales") for k in keys), "no quantization scales in the safetensors file")
        check(bool(packed), "no packed uint32 weights in the safetensors file")
    return expected, len(keys)


def run(base_url: str, api_key: str | None, skip_job: bool, health_timeout: float, job_timeout: float) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=300) as client:
        step("health")
        health = wait_healthy(client, health_timeout)
        print(f"ok (worker pid {health.get('worker', {}).get('pid')})")

        step("models")
        print(f"ok ({len(check_models(client))} models)")

        step("completion")
        print(f"ok ({check_completion(client)!r})")

        step("streamed chat completion")
        content, n_events = check_streamed_chat(client)
        print(f"ok ({content!r}, {n_events} events)")

        if skip_job:
            return

        step("quantization job (following its live events)")
        job, events = run_job(client, TINY_JOB, job_timeout)
        print(f"ok ({job['id']}, {len(events)} events, {job['stats'].get('bits_per_weight', 0):.3f} bits/weight)")

        step("result download")
        size, n_tensors = check_result(client, job)
        print(f"ok ({size} bytes, {n_tensors} tensors)")

        step("completion from the quantized model")
        print(f"ok ({check_completion(client, job['id'])!r})")

        step("delete job")
        expect(client.delete(f"/v1/quantization/jobs/{job['id']}"))
        expect(client.get(f"/v1/quantization/jobs/{job['id']}"), 404)
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
