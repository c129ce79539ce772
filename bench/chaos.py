"""Chaos run: SIGKILL the worker (and sometimes the gateway) in the middle of quantization jobs.

    python bench/chaos.py                      # 20 rounds, bounded by --budget-s
    python bench/chaos.py --rounds 3 --budget-s 300 --out /tmp/chaos.json   # a quick look

Loopback only. One service (gateway + its worker) on a scratch data directory; each round
submits a quantization job of the built-in SmolLM2 (small calibration: the point is the
faults, not the quality) and kills at a moment picked for that round:

- ``calibration``: while the job loads the model and its calibration data;
- ``search``: after a random block of the AWQ search;
- ``writing``: after the last block, while the result is being written and published
  (a random delay of 0 to 0.4 s after the ``writing`` event).

Every fourth round kills the gateway too (both SIGKILL, worker first), then starts the
service again on the same data directory, as a supervisor (launchd, systemd) would. Every
fifth round is relentless: it kills again at each new attempt of the job, so the retry cap
is reached and the job must end ``failed`` with the crash's code.

After each round it checks, and the report records per round:

- **health**: ``/health`` answers (any status) within 5 s of the kill;
- **no job lost**: the job ends ``succeeded`` (after the retry the policy allows:
  ``MM_JOB_MAX_ATTEMPTS``, 3 starts) or ``failed`` with a stated error code;
- **the client is told**: a client following the job's SSE event stream (reconnecting with
  ``Last-Event-ID`` when the gateway went away) saw a ``requeued`` or ``failed`` event that
  carries the crash's code, and the final status event;
- **no partial result is visible**: every result folder under ``<data>/jobs/`` belongs to a
  succeeded job and passes the SHA-256 checksums recorded before it became visible
  (:func:`jobstore.layout.verify_result`), and the API's ``result_files`` carry the same sums.

It writes one JSON report (``--out``) with the machine, the command and every round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _machine import describe_machine, repo_command  # noqa: E402
from serve import Server, free_port  # noqa: E402

from jobstore.layout import CHECKSUMS_FILE, verify_result  # noqa: E402

JOB = {"n_samples": 2, "seq_len": 32, "n_grid": 2}  # about 30 blocks of real AWQ search, quickly
STAGES = ("calibration", "search", "writing")
HEALTH_DEADLINE_S = 5.0
WRITING_DELAY_MAX_S = 0.4  # writing and publishing SmolLM2's result takes about half a second here
TERMINAL = {"succeeded", "failed", "cancelled"}


class EventFollower(threading.Thread):
    """A client following one job's SSE events, resuming with Last-Event-ID after a break."""

    def __init__(self, url: str, job_id: str, deadline: float) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id, self.deadline = url, job_id, deadline
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0
        self.done = False

    def run(self) -> None:
        last_id: str | None = None
        while not self.done and time.monotonic() < self.deadline:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                with httpx.stream("GET", f"{self.url}/v1/quantization/jobs/{self.job_id}/events", headers=headers,
                                  params={"stream": "true"}, timeout=httpx.Timeout(30, connect=2)) as resp:
                    if resp.status_code != 200:
                        raise httpx.HTTPError(f"HTTP {resp.status_code}")
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            payload = line[len("data: "):]
                            if payload == "[DONE]":
                                self.done = True
                                return
                            event = json.loads(payload)
                            self.events.append(event)
                            last_id = event["id"]
            except (httpx.HTTPError, OSError, ValueError):
                pass
            self.reconnects += 1
            time.sleep(0.3)


def _job(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    try:
        resp = http.get(f"/v1/quantization/jobs/{job_id}")
        return resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _wait_for_moment(http: httpx.Client, job_id: str, stage: str, rng: random.Random, timeout_s: float) -> dict[str, Any]:
    """Poll the job until the round's moment to kill; returns what the job showed then."""
    target_block = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _job(http, job_id)
        progress = (job or {}).get("progress") or {}
        if job is not None and job["status"] in TERMINAL:
            return {"missed": True, "status": job["status"]}
        if job is not None and job["status"] == "running":
            if stage == "calibration" and progress.get("stage") == "loading":
                time.sleep(rng.uniform(0.0, 1.5))
                return progress
            if stage == "search" and progress.get("stage") == "quantizing":
                n = int(progress.get("n_blocks") or 0)
                if target_block is None and n:
                    target_block = rng.randint(2, max(2, n - 3))
                if target_block is not None and progress.get("block", 0) >= target_block:
                    return progress
            if stage == "writing" and progress.get("stage") == "writing":
                time.sleep(rng.uniform(0.0, WRITING_DELAY_MAX_S))
                return progress
        time.sleep(0.05)
    return {"missed": True, "status": "timeout"}


def _first_answer_s(url: str, since: float, limit_s: float = 30.0) -> float | None:
    """Seconds from ``since`` until ``/health`` answers at all (200 or 503)."""
    while time.monotonic() - since < limit_s:
        try:
            httpx.get(f"{url}/health", timeout=1.0)
            return time.monotonic() - since
        except httpx.HTTPError:
            time.sleep(0.05)
    return None


def _wait_new_worker(url: str, old_pid: int, since: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` until ``/health`` is 200 with a worker other than ``old_pid``."""
    while time.monotonic() - since < timeout_s:
        try:
            resp = httpx.get(f"{url}/health", timeout=1.0)
            if resp.status_code == 200 and resp.json()["worker"]["pid"] != old_pid:
                return round(time.monotonic() - since, 2)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.1)
    return None


def _check_visible_results(data_dir: Path, http: httpx.Client) -> list[str]:
    """Every visible result folder belongs to a succeeded job and passes its checksums."""
    problems = []
    jobs = data_dir / "jobs"
    for folder in sorted(jobs.glob("qjob-*")) if jobs.is_dir() else []:
        job = _job(http, folder.name)
        if job is None or job["status"] != "succeeded":
            problems.append(f"{folder.name}: visible, but the job is {job and job['status']}")
            continue
        problems += [f"{folder.name}: {p}" for p in verify_result(folder)]
        recorded = json.loads((folder / CHECKSUMS_FILE).read_text())["files"]
        for f in job["result_files"]:
            if f.get("sha256") != recorded.get(f["filename"]):
                problems.append(f"{folder.name}: API sha256 of {f['filename']} differs from the recorded one")
    return problems


def _kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_round(index: int, server: Server, http: httpx.Client, data_dir: Path, rng: random.Random, *,
              kill_gateway: bool, relentless: bool, job_timeout_s: float) -> dict[str, Any]:
    """One job, killed at the round's moment; ``relentless``: killed again at every new
    attempt, so the retry cap is reached and the job must fail with a stated code."""
    stage = STAGES[index % len(STAGES)]
    out: dict[str, Any] = {"round": index + 1, "stage": stage, "killed": "worker+gateway" if kill_gateway else "worker",
                           "relentless": relentless}
    job_id = http.post("/v1/quantization/jobs", json=JOB).json()["id"]
    out["job"] = job_id
    follower = EventFollower(server.url, job_id, time.monotonic() + job_timeout_s)
    follower.start()
    answers: list[float | None] = []
    readies: list[float | None] = []
    kills = 0
    while True:
        moment = _wait_for_moment(http, job_id, stage, rng, timeout_s=job_timeout_s / 2)
        if kills == 0:
            out["at"] = {k: moment[k] for k in ("stage", "block", "n_blocks", "missed", "status") if k in moment}
        if moment.get("missed"):
            break
        worker_pid = http.get("/health").json()["worker"]["pid"]
        killed_at = time.monotonic()
        _kill(worker_pid)
        if kill_gateway:
            assert server.proc is not None
            _kill(server.proc.pid)
            server.proc.wait()
            server.start()
        kills += 1
        answers.append(_first_answer_s(server.url, killed_at))
        readies.append(_wait_new_worker(server.url, worker_pid, killed_at, timeout_s=180))
        if not relentless:
            break
    out["kills"] = kills
    out["health_answer_s"] = None if None in answers or not answers else round(max(answers), 3)
    out["ready_s"] = None if None in readies or not readies else max(readies)
    deadline = time.monotonic() + job_timeout_s
    job = _job(http, job_id)
    while time.monotonic() < deadline and (job is None or job["status"] not in TERMINAL):
        time.sleep(0.5)
        job = _job(http, job_id)
    follower.join(timeout=max(1.0, deadline - time.monotonic()))
    follower.done = True
    out["status"] = job["status"] if job else "unknown"
    out["error_code"] = ((job or {}).get("error") or {}).get("code")
    events = follower.events
    out["attempts"] = sum(1 for e in events if e["type"] == "started")
    told = [e for e in events if e["type"] in ("requeued", "failed") and (e.get("data") or {}).get("code")]
    out["client_told"] = [f"{e['type']}:{e['data']['code']}" for e in told]
    out["stream_reconnects"] = follower.reconnects
    out["stream_saw_end"] = bool(events) and events[-1]["type"] in TERMINAL
    out["visible_result_problems"] = _check_visible_results(data_dir, http)
    health_ok = bool(answers) and out["health_answer_s"] is not None and out["health_answer_s"] <= HEALTH_DEADLINE_S
    settled = out["status"] == "succeeded" or (out["status"] == "failed" and bool(out["error_code"]))
    # a job the kill reached (it had to start again, or it failed) must have told its client;
    # one that had already been published before the kill landed has nothing to tell
    affected = out["attempts"] > 1 or out["status"] == "failed"
    out["ok"] = bool((health_ok or not kills) and settled and (told or not affected) and out["stream_saw_end"]
                     and not out["visible_result_problems"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=1500, help="stop starting rounds after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gateway-every", type=int, default=4, help="kill the gateway too in every k-th round")
    parser.add_argument("--relentless-every", type=int, default=5,
                        help="in every k-th round kill again at each new attempt, until the retry cap fails the job")
    parser.add_argument("--job-timeout-s", type=float, default=300)
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "chaos.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data directory")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    scratch = Path(tempfile.mkdtemp(prefix="mm-chaos-"))
    data_dir = scratch / "data"
    port = free_port()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MM_WORKER_THREADS="1")
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    server = Server("metal-marlin", cmd, port, "", scratch / "service.log", env, "/health")
    started = time.monotonic()
    rounds: list[dict[str, Any]] = []
    server.start()
    try:
        server.wait_ready(300)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(args.rounds):
                if time.monotonic() - started > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s used: stopping after {i} rounds", flush=True)
                    break
                kill_gateway = args.gateway_every > 0 and (i + 1) % args.gateway_every == 0
                relentless = args.relentless_every > 0 and (i + 1) % args.relentless_every == 0
                result = run_round(i, server, http, data_dir, rng, kill_gateway=kill_gateway, relentless=relentless,
                                   job_timeout_s=args.job_timeout_s)
                rounds.append(result)
                print(json.dumps(result), flush=True)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "bench": "chaos",
        "machine": describe_machine(),
        "command": repo_command(sys.argv),
        "started": started_at,
        "settings": {"job": JOB, "rounds": args.rounds, "seed": args.seed, "gateway_every": args.gateway_every, "relentless_every": args.relentless_every,
                     "max_attempts": int(os.environ.get("MM_JOB_MAX_ATTEMPTS", "3")), "health_deadline_s": HEALTH_DEADLINE_S},
        "wall_s": round(time.monotonic() - started, 1),
        "rounds": rounds,
        "summary": summarize(rounds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"]))
    print(f"wrote {args.out}")
    return 0 if rounds and all(r["ok"] for r in rounds) else 1


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    answers = [r["health_answer_s"] for r in rounds if r["health_answer_s"] is not None]
    return {
        "rounds": len(rounds),
        "ok": sum(r["ok"] for r in rounds),
        "succeeded": sum(r["status"] == "succeeded" for r in rounds),
        "succeeded_after_retry": sum(r["status"] == "succeeded" and r["attempts"] > 1 for r in rounds),
        "failed_with_code": sum(r["status"] == "failed" and bool(r["error_code"]) for r in rounds),
        "lost": sum(r["status"] not in TERMINAL for r in rounds),
        "visible_partial_results": sum(len(r["visible_result_problems"]) for r in rounds),
        "health_answer_max_s": round(max(answers), 2) if answers else None,
    }


def _f(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The results page's section: one row per round, then the summary."""
    lines = [
        "| round | killed | at | kills | attempts | outcome | client told | /health answered (s) | new worker ready (s) | visible results ok |",
        "|---:|---|---|---:|---:|---|---|---:|---:|---|",
    ]
    for r in report["rounds"]:
        at = r["at"]
        where = f"{r['stage']}" + (f" (block {at['block']}/{at['n_blocks']})" if "block" in at and r["stage"] == "search" else "")
        if at.get("missed"):
            where += " (missed: job already ended)"
        outcome = r["status"] + (f" `{r['error_code']}`" if r["error_code"] else "")
        told = ", ".join(f"`{t}`" for t in r["client_told"]) or "-"
        answer = f"{r['health_answer_s']:.2f}" if r["health_answer_s"] is not None else "none"
        lines.append(f"| {r['round']} | {r['killed']} | {where} | {r['kills']} | {r['attempts']} | {outcome} | {told} | {answer} | {_f(r['ready_s'])} | "
                     f"{'yes' if not r['visible_result_problems'] else 'NO: ' + '; '.join(r['visible_result_problems'])} |")
    s = report["summary"]
    untouched = s["succeeded"] - s["succeeded_after_retry"]
    lines += ["", f"{s['ok']} of {s['rounds']} rounds passed every check; {s['succeeded']} jobs succeeded, "
              f"{s['succeeded_after_retry']} of them after a retry"
              + (f" ({untouched} had been published before the kill landed)" if untouched else "") + ", "
              f"{s['failed_with_code']} failed with a stated code, {s['lost']} lost, {s['visible_partial_results']} partial or "
              f"unverifiable results visible; `/health` answered at most {s['health_answer_max_s']} s after a kill."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
