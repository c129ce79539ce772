"""Continuous batching: many requests, one batched decode forward per step.

:class:`BatchScheduler` runs a background thread over one :class:`~.engine.Engine`. Each
iteration of its loop (:meth:`BatchScheduler.step`):

1. takes newly submitted requests into the waiting queue;
2. retires cancelled requests (waiting, prefilling or decoding): their final event has
   ``finish_reason="cancelled"`` and a decoding row's slot is freed in this same step. How
   many decode steps ran between ``cancel()`` and that retirement is kept in ``stats``
   (``cancel_lag_steps_max``, ``cancel_lag_steps_hist``; 0 or 1 by construction: a cancel
   that lands during a decode step waits for that step only);
3. admits waiting requests while fewer than ``max_batch_size`` are in flight, and prefills
   them one piece at a time, each request alone (``Engine.prefill_piece``), up to a budget
   of about ``prefill_chunk`` prompt tokens per step so that long prompts do not stall the
   sequences already decoding. A request whose prefill completes samples its first token
   from the prefill logits and joins the decode batch;
4. decodes every sequence in the batch with ONE forward of ``[B, 1]`` tokens and one
   batched :class:`~.sampling.Sampler` call; finished sequences leave the batch.

KV cache design: the decode batch keeps one :class:`BatchKVCache` per layer, ``[B, H, T,
D]`` with a single shared length ``T``. Rows are left-aligned to it: row ``r`` holds
``pad[r]`` zero slots and then its own keys, and the model is called with
``left_padding=pad`` (those slots are masked out and the row's RoPE positions start at its
first real token). A request is prefilled into its own ``KVCache`` and merged into the batch
when its prefill ends: if it is shorter than ``T`` it is left-padded, if longer every other
row is left-padded by the difference. When rows leave, the padding all remaining rows share
is cut off. Cost: a merge or a departure copies the batch cache once (not per step); a
step's attention also reads the padding slots (masked), which is small next to the weights.

Equality with the single-sequence path (:meth:`Engine.generate`): both prefill a request
alone with the same pieces, sample its first token from the same logits with the same
per-row PRNG stream (the seed), and decode with ``Engine.forward_last``. What can differ is
floating-point rounding in the decode forward, because the batch shape differs:

* on MLX's CPU backend the RoPE and ``quantized_matmul`` kernels compute each row
  independently of the others, and masked (padding) keys contribute exact zeros to
  attention; whether the longer, padded reduction rounds like the unpadded one depends on
  the CPU's vector code (an AVX2 EPYC: bit-identical; an AVX-512 Xeon: 1.2e-7 in the
  attention output). So with a fully quantized model (all linear layers, embedding and
  head 4-bit, as ``mlx.nn.quantize`` makes them) batched logprobs equal single-sequence ones
  bitwise or to a few 1e-5, and greedy and seeded tokens are equal (tested) — when the engine
  runs the int4 kernel for every row (``dense_cpu_weights=False``). By default the CPU engine serves batches of 2+ rows from
  float32 copies through ``sgemm`` (see ``cache_dense_cpu_weights``), and the next point
  applies to them.
* float (unquantized) matrices go through BLAS ``sgemm``, whose summation order depends
  on the number of rows (OpenBLAS, measured: up to ~5e-5 absolute on O(10) outputs). Logits
  then agree to ~1e-6 relative, not bitwise; greedy and seeded tokens are equal unless two
  candidates are that close, which the tests check does not happen on real prompts.
  Metal's kernels also switch with the row count, so on a Mac only this weaker statement
  holds.

Events reach consumers through :class:`RequestHandle`: :meth:`~RequestHandle.events`
(blocking iterator), :meth:`~RequestHandle.aevents` (asyncio iterator; the scheduler thread
hands events to the consumer's loop with ``loop.call_soon_threadsafe``) and
:meth:`~RequestHandle.result`. Leaving either iterator before the end cancels the request
(a client that disconnects frees its slot), unless ``cancel_on_exit=False``.

Errors: arguments are checked in :meth:`BatchScheduler.submit` (ValueError, as the engine
does). If a forward fails inside the loop, the requests it was computing end with
``finish_reason="error"`` and the message in ``StreamEvent.error``; the scheduler keeps
serving the others.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx

from metal_marlin.generate.engine import (
    Engine,
    EngineFinishReason,
    GenerationResult,
    SequenceState,
    StreamEvent,
)
from metal_marlin.generate.sampling import SamplingParams

__all__ = ["BatchKVCache", "BatchScheduler", "RequestHandle", "SchedulerClosed", "merge_stats"]

_ids = itertools.count(1)

#: Buckets of ``stats["cancel_lag_steps_hist"]``: decode steps between ``cancel()`` and the
#: retirement of the request (string keys, so the histogram is JSON as it is).
CANCEL_LAG_BUCKETS = ("0", "1", "2", ">2")
#: Keys of ``BatchScheduler.stats`` that are maxima, not sums (see :func:`merge_stats`).
_MAX_STATS = frozenset({"cancel_lag_steps_max"})


def _new_stats() -> dict[str, Any]:
    """Fresh counters of a :class:`BatchScheduler` (seconds and tokens; see its ``stats``)."""
    return {
        "steps": 0, "decode_steps": 0, "decode_tokens": 0, "decode_time": 0.0,
        "prefill_tokens": 0, "prefill_time": 0.0, "finished": 0, "cancelled": 0, "errors": 0,
        "cancel_lag_steps_max": 0, "cancel_lag_steps_hist": dict.fromkeys(CANCEL_LAG_BUCKETS, 0),
    }


def merge_stats(stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up several schedulers' ``stats`` (one per loaded model) into one plain dict.

    Counters and times add, ``cancel_lag_steps_max`` is the largest, the histogram adds per
    bucket. Always returns fresh dicts (never the schedulers' own, which their threads keep
    updating), with every key present even for no scheduler.
    """
    total = _new_stats()
    for one in stats:
        for key, value in list(one.items()):
            if isinstance(value, Mapping):
                bucket = total.setdefault(key, {})
                for k, v in list(value.items()):
                    bucket[k] = bucket.get(k, 0) + v
            elif key in _MAX_STATS:
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
    return total


class SchedulerClosed(RuntimeError):
    """``submit`` after ``shutdown``."""


class BatchKVCache:
    """One layer's keys/values for the decode batch: ``[B, H, capacity, D]``, shared length.

    Has the interface the model uses (``offset``, ``update_and_fetch``, ``state``); the
    per-row left padding lives in the scheduler's batch, which passes it to the model.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: int, step: int = 256) -> None:
        self.keys = keys
        self.values = values
        self.offset = offset
        self.step = step

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.offset, self.offset + keys.shape[2]
        if end > self.capacity:
            grow = -(-(end - self.capacity) // self.step) * self.step
            self.keys = _pad_time(self.keys, 0, grow)
            self.values = _pad_time(self.values, 0, grow)
        self.keys[:, :, start:end, :] = keys
        self.values[:, :, start:end, :] = values
        self.offset = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _pad_time(x: mx.array, before: int, after: int) -> mx.array:
    """Zero-pad the time axis (2) of ``[B, H, T, D]``."""
    if before == 0 and after == 0:
        return x
    return mx.pad(x, [(0, 0), (0, 0), (before, after), (0, 0)])


class _DecodeBatch:
    """The sequences being decoded, their left padding and the batched per-layer caches."""

    def __init__(self, step: int = 256) -> None:
        self.step = step
        self.rows: list[_Request] = []
        self.pads: list[int] = []
        self.caches: list[BatchKVCache] = []
        #: Logits ``[B, V]`` of the next step, computed ahead (see ``BatchScheduler._decode``):
        #: the caches then already hold the token they came from.
        self.ahead: mx.array | None = None

    def drop_ahead(self) -> None:
        """Forget the step computed ahead and the token it appended to every cache."""
        if self.ahead is not None:
            for c in self.caches:
                c.offset -= 1
            self.ahead = None

    @property
    def offset(self) -> int:
        """Shared length of the rows (padding included)."""
        return self.caches[0].offset if self.caches else 0

    def __len__(self) -> int:
        return len(self.rows)

    def _capacity(self, length: int) -> int:
        return -(-(length + 1) // self.step) * self.step  # room for the next token

    def add(self, req: _Request, row_cache: Sequence[Any]) -> None:
        """Merge a prefilled request (its own per-layer caches) into the batch."""
        self.drop_ahead()  # the new row has no logits ahead: recompute the step for all rows
        length = row_cache[0].offset
        if not self.rows:
            cap = self._capacity(length)
            self.caches = []
            for c in row_cache:
                k, v = c.state
                self.caches.append(BatchKVCache(_pad_time(k, 0, cap - length), _pad_time(v, 0, cap - length), length, self.step))
            self.rows, self.pads = [req], [0]
        else:
            new_t = max(self.offset, length)
            shift, pad = new_t - self.offset, new_t - length
            cap = self._capacity(new_t)
            for bc, c in zip(self.caches, row_cache):
                k_old, v_old = bc.state
                k_new, v_new = c.state
                bc.keys = mx.concatenate([_pad_time(k_old, shift, cap - new_t), _pad_time(k_new, pad, cap - new_t)])
                bc.values = mx.concatenate([_pad_time(v_old, shift, cap - new_t), _pad_time(v_new, pad, cap - new_t)])
                bc.offset = new_t
            self.pads = [p + shift for p in self.pads] + [pad]
            self.rows.append(req)
        mx.eval([(c.keys, c.values) for c in self.caches])

    def remove(self, indices: Sequence[int]) -> None:
        """Drop rows; cut the left padding every remaining row shares."""
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.rows, self.pads, self.caches, self.ahead = [], [], [], None
            return
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        cut = min(self.pads)
        idx = mx.array(keep, dtype=mx.int32)
        if self.ahead is not None:
            self.ahead = self.ahead[idx]
        for bc in self.caches:
            bc.keys = bc.keys[idx][:, :, cut:, :]
            bc.values = bc.values[idx][:, :, cut:, :]
            bc.offset -= cut
        self.pads = [p - cut for p in self.pads]
        mx.eval([(c.keys, c.values) for c in self.caches])


class _Request:
    """Scheduler-side state of one request."""

    def __init__(self, seq: SequenceState, handle: RequestHandle) -> None:
        self.seq = seq
        self.handle = handle
        self.cache: list[Any] | None = None  # own KV cache while prefilling
        self.pieces = deque()  # remaining prefill pieces [start, end)


class RequestHandle:
    """A submitted request: its events, its result, and :meth:`cancel`.

    Thread-safe. Every consumer sees every event from the first (events are kept), so
    :meth:`result` works after iterating, and late subscribers miss nothing.
    """

    def __init__(
        self, request_id: str, prompt_tokens: int, seed: int, wake: threading.Condition,
        decode_steps: Callable[[], int] = lambda: 0,
    ) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        #: The sampler seed (random when the request gave none).
        self.seed = seed
        self._wake = wake
        #: The scheduler's decode-step counter, read when cancellation is asked.
        self._decode_steps = decode_steps
        #: That counter's value at the first cancellation request (None: never asked), so
        #: the scheduler can tell how many decode steps the request outlived it by.
        self.cancel_step: int | None = None
        self._cond = threading.Condition()
        self._events: list[StreamEvent] = []
        self._sinks: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancel = False
        self.submitted_at = time.monotonic()

    # ---- producer side (scheduler thread)
    def _emit(self, event: StreamEvent) -> None:
        with self._cond:
            if self._events and self._events[-1].finished:
                return
            self._events.append(event)
            self._cond.notify_all()
            for loop, queue in self._sinks:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:  # the consumer's loop is closed; nobody is listening
                    self._request_cancel()

    def _request_cancel(self) -> None:
        """Flag the request (caller holds ``_cond``); the first request's step is kept."""
        if not self._cancel:
            # the step first: once ``_cancel`` is seen the scheduler thread may retire the row
            self.cancel_step = self._decode_steps()
            self._cancel = True

    # ---- consumer side
    def cancel(self) -> None:
        """Stop at the scheduler's next step (final event: ``finish_reason="cancelled"``)."""
        with self._cond:
            if self.finished:
                return
            self._request_cancel()
        with self._wake:
            self._wake.notify_all()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel

    @property
    def finished(self) -> bool:
        return bool(self._events) and self._events[-1].finished

    @property
    def finish_reason(self) -> EngineFinishReason | None:
        return self._events[-1].finish_reason if self.finished else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or ``timeout`` seconds); returns whether it finished."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def events(self, *, cancel_on_exit: bool = True, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator over the events, ending after the finished one.

        ``timeout`` bounds each wait for the next event (TimeoutError).
        """
        i = 0
        try:
            while True:
                with self._cond:
                    if not self._cond.wait_for(lambda: len(self._events) > i, timeout):
                        raise TimeoutError(f"no event from request {self.id} within {timeout} s")
                    event = self._events[i]
                i += 1
                yield event
                if event.finished:
                    return
        finally:
            if cancel_on_exit and not self.finished:
                self.cancel()

    async def aevents(self, *, cancel_on_exit: bool = True) -> AsyncIterator[StreamEvent]:
        """Async iterator over the events (for asyncio servers), ending after the finished one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        sink = (loop, queue)
        with self._cond:
            backlog = list(self._events)
            self._sinks.append(sink)
        try:
            for event in backlog:
                yield event
                if event.finished:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.finished:
                    return
        finally:
            with self._cond:
                if sink in self._sinks:
                    self._sinks.remove(sink)
            if cancel_on_exit and not self.finished:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end and return the whole generation (TimeoutError after ``timeout``)."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        with self._cond:
            return GenerationResult.from_events(self._events, seed=self.seed)

    def __repr__(self) -> str:
        state = self.finish_reason or ("cancelling" if self._cancel else "running")
        return f"RequestHandle({self.id}, {state}, {len(self._events)} events)"


class BatchScheduler:
    """Serve many requests on one engine with continuous batching (see module docstring).

    ``start=False`` runs no thread: call :meth:`step` yourself (deterministic tests,
    benchmarks). ``max_batch_size``/``prefill_budget`` default to the engine's
    ``max_batch_size``/``prefill_chunk``. Use as a context manager or call :meth:`shutdown`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int | None = None,
        prefill_budget: int | None = None,
        start: bool = True,
    ) -> None:
        self.engine = engine
        self.max_batch_size = int(max_batch_size or engine.max_batch_size)
        self.prefill_budget = int(prefill_budget or engine.prefill_chunk)
        if self.max_batch_size < 1 or self.prefill_budget < 1:
            raise ValueError("max_batch_size and prefill_budget must be >= 1")
        self._wake = threading.Condition()
        self._incoming: deque[_Request] = deque()
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._batch = _DecodeBatch()
        self._closing = False
        self._drain = False
        self._step_lock = threading.Lock()
        #: Counters for metrics and benchmarks (seconds and tokens). ``cancelled``: requests
        #: that ended cancelled (by ``cancel()`` or by a shutdown); ``cancel_lag_steps_hist``:
        #: for each one that ``cancel()`` asked for, the decode steps run between the call and
        #: its retirement, bucketed as :data:`CANCEL_LAG_BUCKETS`; ``cancel_lag_steps_max``:
        #: the largest of those lags. Sum schedulers' stats with :func:`merge_stats`.
        self.stats: dict[str, Any] = _new_stats()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="metal-marlin-scheduler", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: str | Sequence[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; arguments are checked here (ValueError), not in the loop."""
        seq = self.engine.new_sequence(self.engine.encode(prompt_ids), params)
        handle = RequestHandle(f"req-{next(_ids)}", len(seq.prompt_ids), seq.seed, self._wake,
                               decode_steps=lambda: self.stats["decode_steps"])
        req = _Request(seq, handle)
        with self._wake:
            if self._closing:
                raise SchedulerClosed("the scheduler has been shut down")
            self._incoming.append(req)
            self._wake.notify_all()
        return handle

    @property
    def num_active(self) -> int:
        """Sequences in the decode batch."""
        return len(self._batch)

    @property
    def num_waiting(self) -> int:
        """Requests not decoding yet (queued or prefilling)."""
        return len(self._incoming) + len(self._waiting) + len(self._prefilling)

    def shutdown(self, *, wait: bool = True, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the loop. ``drain`` lets queued and running requests finish first; otherwise
        they end with ``finish_reason="cancelled"``. Idempotent."""
        with self._wake:
            self._closing = True
            self._drain = self._drain or drain
            self._wake.notify_all()
        if self._thread is None:
            if drain:
                while self._has_work():
                    self.step()
            self._cancel_everything()
        elif wait and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ the loop
    def _has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._prefilling or self._batch.rows)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._has_work() and not self._closing:
                    self._wake.wait()
                if self._closing and not (self._drain and self._has_work()):
                    break
            try:
                self.step()
            except Exception as exc:  # a bug outside a forward: fail everything, keep serving
                self._fail(list(self._batch.rows) + list(self._prefilling), exc)
                self._batch = _DecodeBatch()
                self._prefilling.clear()
        self._cancel_everything()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until nothing is left (only without a thread); returns the steps taken."""
        if self._thread is not None:
            raise RuntimeError("run_until_idle is for schedulers created with start=False")
        n = 0
        while self._has_work() and (max_steps is None or n < max_steps):
            self.step()
            n += 1
        return n

    def step(self) -> None:
        """One iteration: admit, reap cancellations, prefill within budget, decode once."""
        with self._step_lock:
            with self._wake:
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            self.stats["steps"] += 1
            self._reap_cancelled()
            self._prefill_some()
            if self._batch.rows:
                self._decode()

    def _finish(self, req: _Request, event: StreamEvent) -> None:
        req.handle._emit(event)
        key = {"cancelled": "cancelled", "error": "errors"}.get(event.finish_reason or "", "finished")
        self.stats[key] += 1
        if event.finish_reason == "cancelled" and req.handle.cancel_step is not None:
            self._record_cancel_lag(self.stats["decode_steps"] - req.handle.cancel_step)

    def _record_cancel_lag(self, lag: int) -> None:
        """Count one cancellation that took ``lag`` decode steps to take effect."""
        self.stats["cancel_lag_steps_max"] = max(self.stats["cancel_lag_steps_max"], lag)
        bucket = str(lag) if lag < len(CANCEL_LAG_BUCKETS) - 1 else CANCEL_LAG_BUCKETS[-1]
        self.stats["cancel_lag_steps_hist"][bucket] += 1

    def _reap_cancelled(self) -> None:
        for queue in (self._waiting, self._prefilling):
            for req in [r for r in queue if r.handle.cancel_requested]:
                queue.remove(req)
                self._finish(req, req.seq.end_event("cancelled"))
        gone = [i for i, r in enumerate(self._batch.rows) if r.handle.cancel_requested]
        if gone:
            rows = [self._batch.rows[i] for i in gone]
            self._batch.remove(gone)
            for req in rows:
                self._finish(req, req.seq.end_event("cancelled"))

    def _prefill_some(self) -> None:
        engine = self.engine
        spent = 0
        while spent < self.prefill_budget:
            if not self._prefilling:
                if not self._waiting or len(self._batch) + len(self._prefilling) >= self.max_batch_size:
                    return
                req = self._waiting.popleft()
                if req.seq.streamer.finished:  # max_tokens == 0
                    self._finish(req, req.seq.end_event("length"))
                    continue
                req.cache = engine.make_cache()
                req.pieces = deque(engine.prefill_chunks(len(req.seq.prompt_ids)))
                self._prefilling.append(req)
            req = self._prefilling[0]
            start, end = req.pieces.popleft()
            t0 = time.perf_counter()
            try:
                logits = engine.prefill_piece(req.seq.prompt_ids, start, end, req.cache)
                if logits is not None:
                    (event,) = engine.sample(logits, [req.seq])
            except Exception as exc:
                self._prefilling.popleft()
                self._fail([req], exc)
                continue
            finally:
                self.stats["prefill_time"] += time.perf_counter() - t0
            self.stats["prefill_tokens"] += end - start
            spent += end - start
            if logits is None:
                continue
            self._prefilling.popleft()
            if event.finished:
                self._finish(req, event)
                continue
            req.handle._emit(event)
            try:
                with engine.lock:
                    self._batch.add(req, req.cache)
            except Exception as exc:
                self._fail([req], exc)
            req.cache = None

    def _decode(self) -> None:
        """One batched decode step, computed one step ahead of the host when it can be.

        The sampled tokens (lazy) feed the next step's forward, which goes to the device
        with ``mx.async_eval`` before the host reads them, so building the next graph and
        streaming the events overlap the device's work. A step computed ahead is kept when
        rows leave (its rows are selected) and recomputed when a row joins.
        """
        engine, batch = self.engine, self._batch
        rows = list(batch.rows)
        t0 = time.perf_counter()
        try:
            with engine.lock:
                logits = batch.ahead
                if logits is None:
                    tokens = mx.array([[r.seq.last_token] for r in rows], dtype=mx.int32)
                    logits = engine.forward_last(tokens, batch.caches, left_padding=list(batch.pads))
                batch.ahead = None
                pending = engine.sampler.draw(logits, [r.seq.sampling_state() for r in rows])
                if not self._admission_pending():
                    batch.ahead = engine.forward_last(pending.tokens[:, None], batch.caches, left_padding=list(batch.pads))
                    mx.async_eval(batch.ahead)
            events = engine.events(pending, [r.seq for r in rows])
        except Exception as exc:
            self._batch = _DecodeBatch()
            self._fail(rows, exc)
            return
        finally:
            self.stats["decode_time"] += time.perf_counter() - t0
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(rows)
        done = []
        for i, (req, event) in enumerate(zip(rows, events)):
            if event.finished:
                done.append(i)
                self._finish(req, event)
            else:
                req.handle._emit(event)
        if done:
            with engine.lock:
                batch.remove(done)

    def _admission_pending(self) -> bool:
        """Whether a request may join the batch next step (a step computed ahead would be redone)."""
        if len(self._batch) + len(self._prefilling) >= self.max_batch_size:
            return False
        return bool(self._incoming or self._waiting or self._prefilling)

    def _fail(self, reqs: Sequence[_Request], exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for req in reqs:
            if not req.handle.finished:
                self._finish(req, req.seq.end_event("error", message))

    def _cancel_everything(self) -> None:
        with self._wake:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for req in [*self._waiting, *self._prefilling, *self._batch.rows]:
            if not req.handle.finished:
                self._finish(req, req.seq.end_event("cancelled"))
        self._waiting.clear()
        self._prefilling.clear()
        self._batch = _DecodeBatch()
