"""Stop strings, UTF-8-safe streaming detokenization and the per-sequence token streamer."""

from __future__ import annotations

import pytest

from metal_marlin.assets import builtin_model_path
from metal_marlin.generate.detokenize import StreamingDetokenizer
from metal_marlin.generate.sampling import SamplingParams
from metal_marlin.generate.stopping import StopStringMatcher, TokenStreamer
from metal_marlin.tokenizer import Tokenizer

UNICODE_TEXTS = [
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 ❤️ end",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Ελληνικά, русский, עברית, العربية, हिन्दी — “quotes” … €100",
    "𝕄𝕒𝕥𝕙 ∑∫√∞ ≠ ≤ 🧪🧬 🤖\n\tmixed 42 digits 3.14",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(builtin_model_path())


# ---------------------------------------------------------------- stop strings


def feed(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out = []
    for d in deltas:
        res = matcher.push(d)
        out.append(res.text)
        if res.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_spanning_deltas_is_never_emitted() -> None:
    m = StopStringMatcher(["</answer>"])
    out, stopped = feed(m, ["The result", " is 4.</", "ans", "wer> trailing"])
    assert stopped and m.matched == "</answer>"
    assert out == ["The result", " is 4.", "", ""]
    assert "".join(out) == "The result is 4."


def test_held_prefix_is_released_when_it_stops_matching() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("abc ST").text == "abc "
    assert m.pending == "ST"
    assert m.push("O").text == ""
    assert m.push("RM").text == "STORM"
    assert m.push("ST").text == ""
    assert m.flush() == "ST"  # end of stream without a stop: nothing is lost


def test_earliest_stop_wins_and_stop_at_start() -> None:
    m = StopStringMatcher(["world", "lo w"])
    res = m.push("hello world")
    assert res.stopped and res.text == "hel" and res.stop == "lo w"
    m2 = StopStringMatcher(["\n\n", "\n"])
    res = m2.push("\n\nrest")
    assert res.stopped and res.text == "" and res.stop == "\n\n"
    assert m2.push("more").text == ""  # stays stopped


def test_no_stop_strings_pass_everything_through() -> None:
    m = StopStringMatcher([])
    assert [m.push(d).text for d in ["a", "b"]] == ["a", "b"] and m.flush() == ""


def test_overlapping_prefixes() -> None:
    m = StopStringMatcher(["aab"])
    out, stopped = feed(m, ["a", "a", "a", "b", "c"])
    assert stopped and "".join(out) == "a"


# ---------------------------------------------------------------- detokenizer


class CountingTokenizer:
    """Records how many ids each decode call sees (to check the window stays small)."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_never_splits_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = StreamingDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finalize())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tok.decode(ids) == detok.text
    assert any(d == "" for d in deltas[:-1])  # something really was held back


def test_partial_character_is_held_then_flushed(tok: Tokenizer) -> None:
    ids = tok.encode("🧪")
    assert len(ids) >= 2
    detok = StreamingDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    tail = detok.finalize()  # stream cut mid-character
    assert tail == tok.decode(ids[:1]) and "\ufffd" in tail


def test_decode_window_stays_small(tok: Tokenizer) -> None:
    text = " ".join(UNICODE_TEXTS) * 4
    ids = tok.encode(text)
    counting = CountingTokenizer(tok)
    detok = StreamingDetokenizer(counting)
    out = "".join(detok.push(i) for i in ids) + detok.finalize()
    assert out == text
    assert len(ids) > 300 and max(counting.sizes) <= 8


def test_special_tokens_skipped_by_default(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    detok = StreamingDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) + detok.finalize() == "assistant\nHi"
    keep = StreamingDetokenizer(tok, skip_special_tokens=False)
    assert "".join(keep.push(i) for i in ids) + keep.finalize() == "<|im_start|>assistant\nHi<|im_end|>"


# ---------------------------------------------------------------- token streamer


def stream(tok: Tokenizer, ids: list[int], params: SamplingParams, prompt_tokens: int = 7):
    s = TokenStreamer(tok, params, prompt_tokens=prompt_tokens)
    deltas = []
    for i in ids:
        text, finished, reason = s.push(i)
        deltas.append(text)
        if finished:
            break
    return s, deltas


def test_stop_string_across_tokens_with_real_tokenizer(tok: Tokenizer) -> None:
    text = "The answer is 42. END OF ANSWER and more text"
    ids = tok.encode(text)
    stop = "END OF"
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[7:12] == [" END", " OF", " AN", "SW", "ER"]  # the stop string spans tokens
    s, deltas = stream(tok, ids, SamplingParams(stop=[stop, "never"], max_tokens=100))
    assert s.finish_reason == "stop" and s.stop_reason == stop
    assert "".join(deltas) == s.text == "The answer is 42. "
    assert all("END" not in d for d in deltas)
    assert s.completion_tokens == 9  # stopped on the token that completed " OF"

    # A stop string that starts and ends inside tokens: the emitted text ends mid-token.
    s, deltas = stream(tok, ids, SamplingParams(stop=["NSWE"], max_tokens=100))
    assert s.text == "".join(deltas) == "The answer is 42. END OF A" and s.completion_tokens == 12


def test_eos_stops_without_text_unless_ignored(tok: Tokenizer) -> None:
    ids = [*tok.encode("Hi 🙂"), 2, *tok.encode(" after")]
    s, deltas = stream(tok, ids, SamplingParams(max_tokens=50))
    assert (s.finish_reason, s.stop_reason, s.text) == ("stop", 2, "Hi 🙂")
    n = len(tok.encode("Hi 🙂")) + 1  # the EOS token counts as generated
    assert s.usage == {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
    with pytest.raises(RuntimeError, match="finished"):
        s.push(5)

    s, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids), ignore_eos=True))
    assert s.finish_reason == "length" and s.text == "Hi 🙂 after"


def test_stop_token_ids(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    s, _ = stream(tok, ids, SamplingParams(stop_token_ids=[ids[1]], max_tokens=50))
    assert (s.text, s.finish_reason, s.stop_reason, s.completion_tokens) == ("one", "stop", ids[1], 2)


def test_length_flushes_held_text(tok: Tokenizer) -> None:
    ids = tok.encode("abc xy")
    s, deltas = stream(tok, ids, SamplingParams(stop=["xyz"], max_tokens=len(ids)))
    assert s.finish_reason == "length" and s.stop_reason is None
    assert deltas[-1].endswith("xy") and s.text == "abc xy"


def test_length_mid_character_matches_decode(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🧪")
    s, deltas = stream(tok, ids, SamplingParams(max_tokens=len(ids) - 1))
    assert s.finish_reason == "length"
    assert s.text == tok.decode(ids[:-1])


def test_max_tokens_zero_is_finished_before_start(tok: Tokenizer) -> None:
    s = TokenStreamer(tok, SamplingParams(max_tokens=0), prompt_tokens=3)
    assert s.finished and s.finish_reason == "length"
    assert s.usage == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_close_releases_pending_text(tok: Tokenizer) -> None:
    s = TokenStreamer(tok, SamplingParams(stop=["STOP"], max_tokens=100))
    for i in tok.encode("go ST"):
        s.push(i)
    assert s.text == "go "
    text, finished, reason = s.close()
    assert (text, finished, reason) == ("ST", True, "length") and s.text == "go ST"
