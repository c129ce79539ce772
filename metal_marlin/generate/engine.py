"""The inference engine: one loaded model, its tokenizer, and single-sequence generation.

:class:`Engine` turns a prompt (text, token ids or chat messages) into a stream of
:class:`StreamEvent` s, one per sampled token, ending with an event whose ``finished`` is
True. It owns the pieces the rest of :mod:`metal_marlin.generate` provides: the batched
:class:`~metal_marlin.generate.sampling.Sampler` (run here with one row), the per-sequence
:class:`~metal_marlin.generate.stopping.TokenStreamer` (UTF-8-safe text deltas, stop strings,
stop ids, ``max_tokens``) and the chat template.
:class:`~metal_marlin.generate.scheduler.BatchScheduler` serves many sequences with the same
engine; both paths share :meth:`Engine.prefill` and :meth:`Engine.forward_last`, so a
request computes the same numbers whichever path runs it (see the scheduler's docstring
for exactly what equality is guaranteed).

Prefill runs the prompt through the model in ``prefill_chunk``-token pieces (bounded
activation memory for long prompts; the KV cache carries the context between pieces). Only
the KV cache is evaluated for the intermediate pieces and only the last position goes
through the output head: the vocabulary projection of every prompt position would cost more
than the decoder itself on a 49k-token vocabulary.

A request must fit in the model's context: ``len(prompt) + max_tokens <=
context_length`` (``metadata["context_length"]``, else ``config.max_position_embeddings``),
as OpenAI-compatible servers check it. It is refused with a ``ValueError`` that gives the
numbers, before any compute.

On MLX's CPU backend the engine by default keeps a float32 copy of every quantized matrix
and multiplies with sgemm (``dense_cpu_weights``): MLX's CPU int4 kernel costs the same per
row at any batch size, which would make batched decoding no faster than sequential.

Every MLX call is made under :attr:`Engine.lock`, so the single-sequence API and a
scheduler thread may share one engine; they then take turns step by step.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx

from metal_marlin import device
from metal_marlin.generate.chat import encode_chat
from metal_marlin.generate.sampling import PendingSample, SampleOutput, Sampler, SamplingParams, SamplingState
from metal_marlin.generate.stopping import StreamDelta, TokenStreamer
from metal_marlin.models.layers import cache_dense_cpu_weights

if TYPE_CHECKING:
    from metal_marlin.tokenizer import Tokenizer

__all__ = ["Engine", "EngineFinishReason", "GenerationResult", "StreamEvent", "default_activation_dtype", "dense_cpu_weights_default"]

DENSE_CPU_WEIGHTS_ENV = "MM_DENSE_CPU_WEIGHTS"


def dense_cpu_weights_default() -> bool:
    """Whether engines keep float32 copies of quantized weights: on MLX's CPU backend,
    unless ``MM_DENSE_CPU_WEIGHTS=0`` (e.g. to serve more models in less memory, at the
    int4 kernel's speed). On Metal never: its int4 kernels are the fast path."""
    return not device.on_gpu() and os.environ.get(DENSE_CPU_WEIGHTS_ENV, "1") != "0"


DTYPE_ENV = "MM_DTYPE"
_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def default_activation_dtype() -> mx.Dtype:
    """The dtype engines compute in: ``MM_DTYPE`` if set, else float16 on a GPU, float32 on the CPU.

    Why: on a GPU the weights' bytes are the cost of a decode step and half-precision
    activations halve everything else; float16 rather than bfloat16 because our
    checkpoints store float16 scales (exact in float16, rounded in bfloat16) and its
    10-bit mantissa is the closer of the two to float32 (bench/gpu.py measures the
    perplexity of each against float32). On the CPU, MLX's float16 matmul is slow and
    inexact, so float32 stays."""
    name = os.environ.get(DTYPE_ENV)
    if name:
        if name not in _DTYPES:
            raise ValueError(f"{DTYPE_ENV} must be one of {sorted(_DTYPES)}, got {name!r}")
        return _DTYPES[name]
    return mx.float16 if device.on_gpu() else mx.float32

#: ``"stop"`` (EOS, stop token id or stop string), ``"length"`` (``max_tokens``),
#: ``"cancelled"`` (:meth:`RequestHandle.cancel` or scheduler shutdown), ``"error"`` (the
#: step computing this request failed; :attr:`StreamEvent.error` says why).
EngineFinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class StreamEvent:
    """One step of a generation: the text a sampled token released, and whether it ended.

    ``text`` may be empty (a token in the middle of a UTF-8 character or of a possible stop
    string). ``token_id`` is None only for an event that carries no token (the end of a
    ``max_tokens=0`` request, a cancellation or an error). ``logprob``/``top_logprobs`` are
    set when the request asked for ``logprobs`` (see :mod:`.sampling` for what they measure).
    The last event has ``finished=True`` and a ``finish_reason``; ``stop_reason`` then names
    the stop string or token id that matched, and the token counts are final.
    """

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: EngineFinishReason | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationResult:
    """A whole generation. ``token_ids`` are all sampled tokens (a final EOS or stop token
    included, as ``completion_tokens`` counts them); ``text`` ends before a stop string."""

    text: str
    token_ids: list[int]
    finish_reason: EngineFinishReason
    prompt_tokens: int
    completion_tokens: int
    #: Per sampled token, when the request asked for logprobs; else None.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: str | int | None = None
    #: The seed the sampler used (random when the request gave none), to reproduce it.
    seed: int | None = None
    error: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @classmethod
    def from_events(cls, events: Sequence[StreamEvent], seed: int | None = None) -> GenerationResult:
        """Assemble the result of a finished event stream."""
        if not events or not events[-1].finished:
            raise ValueError("the event stream has not finished")
        last = events[-1]
        tokens = [e.token_id for e in events if e.token_id is not None]
        with_lp = [e for e in events if e.token_id is not None]
        wants_lp = bool(with_lp) and all(e.logprob is not None for e in with_lp)
        return cls(
            text="".join(e.text for e in events),
            token_ids=tokens,
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            logprobs=[float(e.logprob) for e in with_lp] if wants_lp else None,  # type: ignore[arg-type]
            top_logprobs=[list(e.top_logprobs or []) for e in with_lp] if wants_lp else None,
            stop_reason=last.stop_reason,
            seed=seed,
            error=last.error,
        )


@dataclass
class SequenceState:
    """What one request carries between steps (shared by the engine and the scheduler).

    ``params.seed`` is always set (drawn at random when the request gave none), so the
    sampler state, which holds MLX arrays, can be made on first use under the engine lock,
    in whichever thread computes the request.
    """

    prompt_ids: list[int]
    params: SamplingParams
    streamer: TokenStreamer
    vocab_size: int
    sampling: SamplingState | None = None
    last_token: int | None = None

    @property
    def seed(self) -> int:
        return int(self.params.seed)  # type: ignore[arg-type]

    def sampling_state(self) -> SamplingState:
        if self.sampling is None:
            self.sampling = SamplingState(self.params, self.prompt_ids, self.vocab_size)
        return self.sampling

    def event(self, token: int, sample: SampleOutput, row: int, delta: StreamDelta) -> StreamEvent:
        """The event for ``token`` (row ``row`` of ``sample``) after the streamer took it."""
        s = self.streamer
        return StreamEvent(
            text=delta.text,
            token_id=token,
            logprob=sample.logprobs[row],
            top_logprobs=sample.top_logprobs[row],
            finished=delta.finished,
            finish_reason=delta.finish_reason,
            stop_reason=s.stop_reason if delta.finished else None,
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
        )

    def end_event(self, reason: EngineFinishReason, error: str | None = None) -> StreamEvent:
        """A token-less final event (``max_tokens=0``, cancellation, error)."""
        s = self.streamer
        return StreamEvent(
            text="",
            token_id=None,
            finished=True,
            finish_reason=reason,
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            error=error,
        )


class Engine:
    """A model ready to generate: ``Engine(model, tokenizer, metadata)`` or ``Engine.load(path)``.

    ``max_batch_size`` is the number of sequences a
    :class:`~metal_marlin.generate.scheduler.BatchScheduler` on this engine decodes
    together; ``prefill_chunk`` the prompt tokens per prefill forward.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        metadata: Mapping[str, Any] | None = None,
        *,
        max_batch_size: int = 16,
        prefill_chunk: int = 256,
        dense_cpu_weights: bool | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.config = getattr(model, "config", None)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.vocab_size = int(
            getattr(self.config, "vocab_size", None) or tokenizer.vocab_size
        )
        ctx = self.metadata.get("context_length") or getattr(
            self.config, "max_position_embeddings", None
        )
        if not ctx:
            raise ValueError("the model's context length is unknown (no metadata context_length "
                             "and no config max_position_embeddings)")
        #: Most tokens (prompt + completion) a request may span.
        self.context_length = int(ctx)
        # End-of-sequence ids the checkpoint declares (config.json / generation_config.json)
        # stop generation even when the tokenizer files name fewer.
        tokenizer.eos_token_ids.update(int(i) for i in self.metadata.get("eos_token_ids") or [])
        if tokenizer.chat_template is None and self.metadata.get("chat_template"):
            tokenizer.chat_template = self.metadata["chat_template"]
        self.sampler = Sampler()
        if dense_cpu_weights is None:
            dense_cpu_weights = dense_cpu_weights_default()
        #: Bytes of float32 weight copies kept for MLX's CPU backend (see
        #: :func:`metal_marlin.models.layers.cache_dense_cpu_weights`); 0 on Metal.
        self.dense_weight_bytes = cache_dense_cpu_weights(model) if dense_cpu_weights else 0
        #: Held around every MLX computation of this engine (see module docstring).
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: mx.Dtype | None = None, **kwargs: Any) -> Engine:
        """Load a model and its tokenizer.

        ``None`` is the built-in SmolLM2-135M-Instruct, a built-in model's name that model;
        otherwise a ``.gguf`` file, a Hugging Face folder, or an MLX-layout quantized folder
        (ours or mlx-lm's). ``dtype`` is the activation dtype (default
        :func:`default_activation_dtype`). ``kwargs`` go to the constructor. A path that does
        not exist raises ``FileNotFoundError`` naming it.
        """
        dtype = dtype if dtype is not None else default_activation_dtype()
        from metal_marlin.assets import resolve_model_path
        from metal_marlin.checkpoints.loader import load_builtin_model, load_model
        from metal_marlin.tokenizer import Tokenizer

        if path is None:
            model, _, metadata = load_builtin_model(dtype)
        else:
            p = resolve_model_path(Path(path).expanduser())
            if not p.exists():
                raise FileNotFoundError(f"model path {str(path)!r} does not exist")
            if p.is_dir() and not (p / "config.json").is_file():
                raise ValueError(f"model path {str(path)!r} is a folder without config.json; "
                                 "expected a Hugging Face / MLX model folder or a .gguf file")
            model, _, metadata = load_model(p, dtype)
        if metadata.get("format") == "gguf":
            fields = metadata.get("gguf_tokenizer")
            if fields:
                tokenizer = Tokenizer.from_gguf_metadata(fields, chat_template=metadata.get("chat_template"))
            else:
                tokenizer = Tokenizer.from_gguf(metadata["source"])
        else:
            tokenizer = Tokenizer.from_folder(metadata.get("source", path))
        return cls(model, tokenizer, metadata, **kwargs)

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: text is encoded (with BOS if the model wants it), ids checked."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence) or hasattr(prompt, "tolist"):
            raw = list(prompt.tolist() if hasattr(prompt, "tolist") else prompt)
            ids = []
            for t in raw:
                try:
                    if isinstance(t, bool):
                        raise TypeError
                    t = operator.index(t)
                except TypeError:
                    raise ValueError(f"prompt token ids must be integers, got {t!r}") from None
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {self.vocab_size})")
                ids.append(t)
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        return ids

    def encode_chat(self, messages: Any, **template_kwargs: Any) -> list[int]:
        """Prompt ids of chat ``messages`` rendered with the model's chat template."""
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True, **template_kwargs)

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """Validate ``params`` and the context budget; ValueError says what is wrong."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab_size)
        need = len(prompt_ids) + params.max_tokens
        if need > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                f"exceeds the model's context length of {self.context_length} tokens"
            )
        return params

    def new_sequence(self, prompt_ids: Sequence[int], params: SamplingParams | None) -> SequenceState:
        """Checked per-request state: sampler state (seed, penalties) and text streamer."""
        params = params if params is not None else SamplingParams()
        ids = list(prompt_ids)
        self.check_request(ids, params)
        if params.seed is None:  # fix it now: the caller may want to report it
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        return SequenceState(
            prompt_ids=ids,
            params=params,
            streamer=TokenStreamer(self.tokenizer, params, len(ids)),
            vocab_size=self.vocab_size,
        )

    # ------------------------------------------------------------------ model steps
    def make_cache(self) -> list[Any]:
        return self.model.make_cache()

    def forward_last(
        self, tokens: mx.array, cache: Sequence[Any], left_padding: Sequence[int] | None = None
    ) -> mx.array:
        """Float32 logits ``[B, V]`` of the last position of ``tokens [B, L]`` (lazy)."""
        model = self.model
        if hasattr(model, "lm_logits") and hasattr(model, "model"):
            h = model.model(tokens, cache, left_padding)
            return model.lm_logits(h[:, -1, :])
        kwargs = {} if left_padding is None else {"left_padding": left_padding}
        return model(tokens, cache, **kwargs)[:, -1, :].astype(mx.float32)

    def prefill_chunks(self, n: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each prefill piece of an ``n``-token prompt."""
        c = self.prefill_chunk
        return [(s, min(s + c, n)) for s in range(0, n, c)]

    def prefill_piece(
        self, prompt_ids: Sequence[int], start: int, end: int, cache: Sequence[Any]
    ) -> mx.array | None:
        """Run ``prompt_ids[start:end]`` into ``cache``; logits ``[1, V]`` if it is the last piece.

        Intermediate pieces evaluate only the cache (their outputs are never needed).
        """
        with self.lock:
            tokens = mx.array([list(prompt_ids[start:end])], dtype=mx.int32)
            if end < len(prompt_ids):
                model = self.model
                if hasattr(model, "model"):
                    model.model(tokens, cache)
                else:
                    model(tokens, cache)
                mx.eval([c.state for c in cache])
                return None
            logits = self.forward_last(tokens, cache)
            mx.eval(logits)
            return logits

    def prefill(self, prompt_ids: Sequence[int], cache: Sequence[Any]) -> mx.array:
        """Process the whole prompt into ``cache``; logits ``[1, V]`` of its last token."""
        logits = None
        for start, end in self.prefill_chunks(len(prompt_ids)):
            logits = self.prefill_piece(prompt_ids, start, end, cache)
        assert logits is not None
        return logits

    def sample(self, logits: mx.array, seqs: Sequence[SequenceState]) -> list[StreamEvent]:
        """Sample one token per row of ``logits`` for ``seqs`` and turn each into an event."""
        with self.lock:
            pending = self.sampler.draw(logits, [s.sampling_state() for s in seqs])
        return self.events(pending, seqs)

    def events(self, pending: PendingSample, seqs: Sequence[SequenceState]) -> list[StreamEvent]:
        """Resolve a drawn sample (waits for the device) and turn each row into an event."""
        with self.lock:
            out = pending.resolve()
        events = []
        for row, (seq, token) in enumerate(zip(seqs, out.tokens)):
            seq.last_token = token
            events.append(seq.event(token, out, row, seq.streamer.push(token)))
        return events

    # ------------------------------------------------------------------ single sequence
    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Generate for one prompt, yielding a :class:`StreamEvent` per sampled token.

        Arguments are checked now (ValueError), before the first ``next()``.
        """
        seq = self.new_sequence(self.encode(prompt), params)
        return self._run(seq)

    def _run(self, seq: SequenceState) -> Iterator[StreamEvent]:
        """Prefill, then decode one token per step, one step ahead of the host.

        Each step's token is fed (as a lazy array) into the next forward, which is handed
        to the device with ``mx.async_eval`` before the host reads the token, runs the
        streamer and yields: the host's work hides behind the device's. The forward after
        the last token is computed for nothing, a price of one step per request.
        """
        if seq.streamer.finished:  # max_tokens == 0: nothing to compute
            yield seq.end_event("length")
            return
        cache = self.make_cache()
        logits = self.prefill(seq.prompt_ids, cache)
        while True:
            with self.lock:
                pending = self.sampler.draw(logits, [seq.sampling_state()])
                logits = self.forward_last(pending.tokens.reshape(1, 1), cache)
                mx.async_eval(logits)
            (ev,) = self.events(pending, [seq])
            yield ev
            if ev.finished:
                return

    def warmup(self, batch_sizes: Sequence[int] = (1, 2, 3, 4, 8, 16), prompt_tokens: int = 16) -> float:
        """Run every kernel shape serving will use once, so no request waits on compilation.

        MLX's CUDA backend compiles each new kernel at its first use (tens of seconds for
        its quantized matmuls); the worker calls this before it reports ready. Covers a
        prefill piece and a decode step at each batch size (our fused kernel has one
        variant per row count up to 4; MLX's matmul one for 8 and more). Returns seconds.
        """
        t0 = time.perf_counter()
        with self.lock:
            for batch in sorted(set(int(b) for b in batch_sizes if 0 < b <= self.max_batch_size)):
                cache = self.make_cache()
                tokens = mx.zeros((batch, prompt_tokens), dtype=mx.int32)
                mx.eval(self.forward_last(tokens, cache))
                mx.eval(self.forward_last(tokens[:, :1], cache, left_padding=[0] * batch if batch > 1 else None))
            mx.eval(self.sampler.draw(mx.zeros((1, self.vocab_size)), [SamplingState(SamplingParams(), (), self.vocab_size)]).tokens)
        return time.perf_counter() - t0

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> GenerationResult:
        """Generate for one prompt and return the whole result."""
        seq = self.new_sequence(self.encode(prompt), params)
        events = list(self._run(seq))
        return GenerationResult.from_events(events, seed=seq.seed)

    def stream_chat(self, messages: Any, params: SamplingParams | None = None, **template_kwargs: Any) -> Iterator[StreamEvent]:
        """:meth:`stream` for chat messages (OpenAI shape), via the model's chat template."""
        return self.stream(self.encode_chat(messages, **template_kwargs), params)

    def chat(self, messages: Any, params: SamplingParams | None = None, **template_kwargs: Any) -> GenerationResult:
        """:meth:`generate` for chat messages (OpenAI shape), via the model's chat template."""
        return self.generate(self.encode_chat(messages, **template_kwargs), params)

    def __repr__(self) -> str:
        quant = self.metadata.get("quantization")
        return (
            f"Engine(source={self.metadata.get('source')!r}, quantization={quant}, "
            f"context_length={self.context_length}, max_batch_size={self.max_batch_size}, "
            f"prefill_chunk={self.prefill_chunk})"
        )
