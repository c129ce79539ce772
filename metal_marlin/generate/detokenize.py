"""Token-by-token detokenization that never splits a UTF-8 character.

A byte-level BPE token is a run of bytes, and an emoji or CJK character is often split across
two or three tokens. Decoding each token alone would send U+FFFD replacement characters to the
client, and re-decoding the whole sequence every step costs O(n) per token.

:class:`StreamingDetokenizer` keeps two offsets into the ids: ``prefix`` (start of a small
window of already-emitted tokens, kept so decoders that treat the first token specially, such
as SentencePiece's leading-space rule, see context) and ``read`` (end of what has been
emitted). Each step decodes only ``ids[prefix:]``; text past the decoded prefix is new. If it
ends in U+FFFD the last character is incomplete, so nothing is emitted until more bytes arrive.
Window boundaries only move to points where decoding ended on a complete character, so the
concatenated deltas equal ``tokenizer.decode(ids)``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StreamingDetokenizer:
    """Feed ids with :meth:`push`, emit the returned deltas, then :meth:`finalize`."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this were emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._text_parts)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (often "" mid-character)."""
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(self._prefix_text) or window.endswith(_REPLACEMENT):
            return ""
        delta = window[len(self._prefix_text) :]
        # Slide the window: the just-emitted tokens become the context of the next step.
        self._prefix = self._read
        self._read = len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        self._text_parts.append(delta)
        return delta

    def finalize(self) -> str:
        """End of stream: return whatever was held back (incomplete bytes become U+FFFD)."""
        window = self._decode(self.ids[self._prefix :])
        delta = window[len(self._prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        if delta:
            self._text_parts.append(delta)
        return delta
