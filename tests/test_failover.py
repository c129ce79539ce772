"""A worker killed under load, with real parts: one gateway, two workers (separate processes over
loopback TCP, each decoding one sequence at a time: ``MM_MAX_BATCH_SIZE=1``), the built-in
SmolLM2, a SQLite job store (no jobs run here).

Two long streams start, one on each worker (least loaded first); a third, short request then
waits on one of them behind its stream. That worker (A) is SIGKILLed: the stream it was
decoding ends with an OpenAI-shaped ``worker_unavailable`` error event, the waiting request had
produced nothing yet and moves to the other worker (B), where it completes, as does B's stream.
Which worker the third request lands on is a tie (both have one request), so A is named after
the fact: the worker with two requests in flight.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _net import free_port
from test_scale import AUTH, KEY, TOKEN, Proc

from metal_marlin.assets import BUILTIN_MODEL_NAME, builtin_model_installed
from worker.protocol import WORKER_TOKEN_HEADER

pytestmark = pytest.mark.skipif(not builtin_model_installed(BUILTIN_MODEL_NAME), reason="the built-in model is not installed")

LONG = 64  # tokens of each stream: still decoding when the kill comes (about 5 in)


class Stream(threading.Thread):
    """A streamed completion read in a thread: its SSE events, in order."""

    def __init__(self, url: str, prompt: str) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt = url, prompt
        self.events: list[Any] = []
        self.first_token = threading.Event()

    def run(self) -> None:
        body = {"model": BUILTIN_MODEL_NAME, "prompt": self.prompt, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=AUTH, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    if self.events[-1] != "[DONE]" and self.events[-1].get("choices"):
                        self.first_token.set()
        self.first_token.set()


def _active(worker: Proc) -> int:
    return httpx.get(worker.url + "/ready", headers=worker.headers, timeout=5).json()["active_requests"]


def test_a_killed_worker_fails_its_stream_and_moves_its_waiting_request(tmp_path: Path) -> None:
    import openai

    env = {**os.environ, "MM_WORKER_TOKEN": TOKEN, "MM_MAX_BATCH_SIZE": "1",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MM_WORKER_THREADS": "1"}
    workers = [
        Proc(f"worker{i}", [sys.executable, "-m", "worker", "--data-dir", str(tmp_path / f"worker{i}"), "--host", "127.0.0.1",
                            "--port", str(port), "--memory-mb", "1024", "--log-level", "warning"],
             env, tmp_path / f"worker{i}.log", port, headers={WORKER_TOKEN_HEADER: TOKEN})
        for i, port in enumerate((free_port(), free_port()))
    ]
    gport = free_port()
    gateway = Proc("gateway", [sys.executable, "-m", "service", "--port", str(gport), "--data-dir", str(tmp_path / "gateway"),
                               "--api-key", KEY, "--log-level", "warning", *[a for w in workers for a in ("--worker", w.url)]],
                   env, tmp_path / "gateway.log", gport)
    try:
        for w in workers:
            w.start("/ready")
        # load the model on both (routing prefers a worker that has it), then let the gateway see that
        warm = {"model": BUILTIN_MODEL_NAME, "prompt": "Hi", "params": {"max_tokens": 1}}
        for w in workers:
            assert httpx.post(w.url + "/generate", json=warm, headers=w.headers, timeout=60).status_code == 200
        gateway.start("/health")
        deadline = time.monotonic() + 15
        while not all(BUILTIN_MODEL_NAME in w["loaded_models"] for w in httpx.get(gateway.url + "/health").json()["workers"]):
            assert time.monotonic() < deadline, "the gateway never saw the model loaded on both workers"
            time.sleep(0.2)

        streams = [Stream(gateway.url, "Once upon a time"), Stream(gateway.url, "The capital of France is")]
        for s in streams:  # the second goes to the other worker: the gateway counts the first's
            s.start()
            assert s.first_token.wait(60), "a stream produced no token"
        assert [_active(w) for w in workers] == [1, 1]

        waiting: dict[str, Any] = {}

        def third() -> None:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            try:
                waiting["out"] = client.completions.create(model=BUILTIN_MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
            except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                waiting["error"] = exc

        t3 = threading.Thread(target=third, daemon=True)
        t3.start()
        deadline = time.monotonic() + 10
        while 2 not in (active := [_active(w) for w in workers]):
            assert time.monotonic() < deadline, f"the third request never queued on a worker: {active}"
            time.sleep(0.05)
        a = active.index(2)
        victim, doomed, survivor = workers[a], streams[a], streams[1 - a]
        assert not doomed.events or doomed.events[-1] != "[DONE]", "the stream on A ended before the kill; raise LONG"
        assert t3.is_alive() and not waiting, waiting
        victim.stop(signal.SIGKILL)

        for s in streams:
            s.join(120)
        t3.join(120)
        last = doomed.events[-1]
        assert isinstance(last, dict) and last["error"]["code"] == "worker_unavailable", doomed.events[-3:]
        assert "stopped during generation" in last["error"]["message"] and last["error"]["type"]
        assert survivor.events[-1] == "[DONE]", survivor.events[-3:]
        assert "".join(e["choices"][0]["text"] for e in survivor.events[:-1] if e.get("choices")).strip()
        assert "error" not in waiting, waiting.get("error")
        out = waiting["out"]
        assert out.choices[0].text.strip() and out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
        health = httpx.get(gateway.url + "/health").json()
        assert {w["url"]: w["ready"] for w in health["workers"]} == {victim.url: False, workers[1 - a].url: True}
    finally:
        for p in (gateway, *workers):
            p.stop()
