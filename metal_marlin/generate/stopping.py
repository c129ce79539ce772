"""Stop strings over a stream of text deltas.

A stop string can arrive split across several tokens ("<|", "end", "|>"), so text that might
be the beginning of a stop string cannot be sent to the client yet: if the stop string then
completes, the client must never have seen any of it. :class:`StopStringMatcher` holds back
exactly the longest suffix that is still a prefix of some stop string and releases it as soon
as it can no longer match.

:class:`TokenStreamer` is the per-sequence end of generation: it turns sampled token ids into
text deltas (through :class:`~metal_marlin.generate.detokenize.StreamingDetokenizer`) and
decides when the sequence is finished and why (OpenAI's ``finish_reason``): ``"stop"`` for a
stop string, a stop token id or EOS, ``"length"`` for ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

from metal_marlin.generate.detokenize import StreamingDetokenizer

if TYPE_CHECKING:
    from metal_marlin.generate.sampling import SamplingParams
    from metal_marlin.tokenizer import Tokenizer

__all__ = ["FinishReason", "StopMatch", "StopStringMatcher", "StreamDelta", "TokenStreamer"]

FinishReason = Literal["stop", "length"]


class StopMatch(NamedTuple):
    """Result of feeding one delta: text safe to emit and whether a stop string completed."""

    text: str
    stopped: bool
    stop: str | None = None


class StopStringMatcher:
    """Feed text deltas with :meth:`push`; emit what it returns; call :meth:`flush` at the end."""

    def __init__(self, stop: Iterable[str] = ()) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in dict.fromkeys(stop) if s)
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        #: The stop string that ended the stream, once one has.
        self.matched: str | None = None

    @property
    def pending(self) -> str:
        """Text held back because it may be the start of a stop string."""
        return self._pending

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, delta: str) -> StopMatch:
        """Add ``delta``; return the text that can be emitted now.

        On a match the returned text is everything before the stop string (which is dropped
        along with anything after it) and ``stopped`` is True. The earliest match in the text
        wins; at equal positions the longer stop string does.
        """
        if self.matched is not None:
            return StopMatch("", True, self.matched)
        if not self.stops:
            return StopMatch(delta, False)
        text = self._pending + delta
        # Only a match overlapping the new delta is possible: pending alone matched nothing.
        search_from = max(0, len(self._pending) - self._max_hold)
        best: tuple[int, int, str] | None = None
        for s in self.stops:
            i = text.find(s, search_from)
            if i >= 0 and (best is None or (i, -len(s)) < (best[0], best[1])):
                best = (i, -len(s), s)
        if best is not None:
            self.matched = best[2]
            self._pending = ""
            return StopMatch(text[: best[0]], True, self.matched)
        hold = self._held_suffix_length(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return StopMatch(text[: len(text) - hold], False)

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        if self.matched is not None:
            return ""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = min(self._max_hold, len(text))
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


class StreamDelta(NamedTuple):
    """What one token adds to the response: unpacks as ``(text, finished, finish_reason)``."""

    text: str
    finished: bool
    finish_reason: FinishReason | None


class TokenStreamer:
    """Per-sequence text stream and stop conditions for one generation.

    Stop token ids (``params.stop_token_ids`` and, unless ``ignore_eos``, the tokenizer's EOS
    ids) end the sequence without adding their text; a stop string ends it with the text
    before the match. Either way ``finish_reason`` is ``"stop"`` and :attr:`stop_reason` says
    which (the string or the token id, as vLLM reports it). Reaching ``max_tokens`` gives
    ``"length"``. Everything still held back (partial characters or a partial stop string that
    never completed) is released with the final delta.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        prompt_tokens: int = 0,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self.params = params
        self.detokenizer = StreamingDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(tokenizer.eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self._parts: list[str] = []
        if params.max_tokens == 0:  # nothing may be generated (e.g. echo-only scoring)
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The response text emitted so far."""
        return "".join(self._parts)

    @property
    def usage(self) -> dict[str, int]:
        """OpenAI ``usage``: every sampled token counts, including a final stop/EOS token."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def push(self, token_id: int) -> StreamDelta:
        """Account for one sampled token and return the text it releases."""
        if self.finished:
            raise RuntimeError(f"sequence already finished ({self.finish_reason}); no more tokens")
        token_id = int(token_id)
        self.completion_tokens += 1
        if token_id in self.stop_token_ids:
            text, stop = self._drain()
            return self._finish(text, "stop", stop if stop is not None else token_id)
        out = self.matcher.push(self.detokenizer.push(token_id))
        if out.stopped:
            return self._finish(out.text, "stop", out.stop)
        if self.completion_tokens >= self.params.max_tokens:
            text, stop = self._drain()
            if stop is not None:
                return self._finish(out.text + text, "stop", stop)
            return self._finish(out.text + text, "length", None)
        return self._emit(out.text, None)

    def close(self, reason: FinishReason = "length") -> StreamDelta:
        """End the sequence from outside (context window full, engine shutdown): flush all."""
        if self.finished:
            return StreamDelta("", True, self.finish_reason)
        text, stop = self._drain()
        if stop is not None:
            return self._finish(text, "stop", stop)
        return self._finish(text, reason, None)

    def _drain(self) -> tuple[str, str | None]:
        """Flush detokenizer then matcher: (text, stop string if the flushed bytes completed one)."""
        out = self.matcher.push(self.detokenizer.finalize())
        if out.stopped:
            return out.text, out.stop
        return out.text + self.matcher.flush(), None

    def _finish(self, text: str, reason: FinishReason, stop_reason: str | int | None) -> StreamDelta:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        return self._emit(text, reason)

    def _emit(self, text: str, reason: FinishReason | None) -> StreamDelta:
        if text:
            self._parts.append(text)
        return StreamDelta(text, reason is not None, reason)
