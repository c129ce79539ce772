"""The single-sequence engine on the real SmolLM2: correctness against an independent float64
forward and against mlx-lm, streaming text, stop strings, limits, chat, the CLI entry point."""

from __future__ import annotations

import io

import metal_marlin  # noqa: F401  (first: gives MLX a fast BLAS, see metal_marlin._blas)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin.checkpoints import build_model, save_hf_folder
from metal_marlin.generate import SamplingParams
from metal_marlin.generate.engine import Engine, GenerationResult
from metal_marlin.tokenizer import Tokenizer
from reference_llama import reference_forward

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


def builtin_tokenizer(metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata["gguf_tokenizer"], chat_template=metadata["chat_template"])


def quantized_copy(loaded, group_size: int = 64, bits: int = 4):
    """A 4-bit copy (all linears, embedding and tied head) of a loaded model; original untouched."""
    model, config, _ = loaded
    copy = build_model(config, dict(tree_flatten(model.parameters())))
    nn.quantize(copy, group_size=group_size, bits=bits)
    mx.eval(copy.parameters())
    return copy


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine(smollm2.model, builtin_tokenizer(smollm2.metadata), smollm2.metadata)


@pytest.fixture(scope="module")
def q_folder(smollm2, tmp_path_factory):
    """The built-in model quantized to 4 bits (g64), saved as an MLX-layout folder."""
    model = quantized_copy(smollm2)
    config = smollm2.config.to_hf_dict()
    config["quantization"] = {"group_size": 64, "bits": 4}
    folder = save_hf_folder(tmp_path_factory.mktemp("engine") / "smollm2-q4", dict(tree_flatten(model.parameters())), config)
    builtin_tokenizer(smollm2.metadata).save(folder)
    return folder


def test_greedy_tokens_equal_float64_reference(engine, smollm2):
    """Teacher forcing: each generated token is the float64 reference's argmax after the
    tokens before it, so the whole greedy continuation is the reference's."""
    weights = {k: np.array(v) for k, v in tree_flatten(smollm2.model.parameters())}
    config = smollm2.config.to_hf_dict()
    margins = []
    for text in PROMPTS:
        prompt = engine.encode(text)
        result = engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
        assert len(result.token_ids) == 8 and result.finish_reason == "length"
        ref = reference_forward(config, weights, prompt + result.token_ids[:-1])[len(prompt) - 1 :]
        assert result.token_ids == ref.argmax(-1).tolist(), text
        top2 = np.sort(ref, axis=-1)[:, -2:]
        margins.append(float((top2[:, 1] - top2[:, 0]).min()))
    # Not a near-tie anywhere: the agreement is not luck of rounding.
    assert min(margins) > 1e-3, margins


def test_quantized_greedy_equals_mlx_lm(q_folder):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.sample_utils import make_sampler

    ours = Engine.load(q_folder)
    assert ours.metadata["quantization"] == {"group_size": 64, "bits": 4}
    theirs, their_tokenizer = mlx_lm.load(str(q_folder))
    for text in PROMPTS[:2]:
        prompt = ours.encode(text)
        result = ours.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))
        expected = [
            r.token
            for r in mlx_lm.stream_generate(theirs, their_tokenizer, prompt, max_tokens=6, sampler=make_sampler(temp=0.0))
        ]
        assert result.token_ids == expected, text


def test_chat_capital_of_france_mentions_paris(engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = engine.chat(messages, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.stop_reason in engine.tokenizer.eos_token_ids
    assert result.prompt_tokens == len(engine.encode_chat(messages))
    assert result.completion_tokens == len(result.token_ids)
    streamed = list(engine.stream_chat(messages, SamplingParams(temperature=0.0, max_tokens=24)))
    assert "".join(e.text for e in streamed) == result.text
    assert [e.finished for e in streamed] == [False] * (len(streamed) - 1) + [True]


def test_utf8_characters_split_across_tokens_stream_whole(engine):
    params = SamplingParams(max_tokens=9, logprobs=2, **GREEDY)
    events = list(engine.stream("Repeat after me: 日本語 日本語 日本語 😀😀😀", params))
    tokens = [e.token_id for e in events]
    # The emoji is three byte-level tokens: alone, the pieces are not valid UTF-8...
    assert any("\ufffd" in engine.tokenizer.decode([t]) for t in tokens)
    # ...but the stream never shows a broken character, and adds up to the decoded tokens.
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == engine.tokenizer.decode(tokens) and "😀" in "".join(e.text for e in events)
    assert any(e.text == "" for e in events[:-1])
    # logprobs: the chosen token's and the top 2, best first, the chosen one among them (greedy)
    for e in events:
        assert e.logprob is not None and e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0][0] == e.token_id and e.top_logprobs[0][1] == pytest.approx(e.logprob)


def test_stop_string_spanning_tokens_is_not_emitted(engine):
    prompt = "The capital of France is"
    free = engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    # A stop string that begins inside one token and ends inside the next.
    pieces = [engine.tokenizer.decode([t]) for t in free.token_ids]
    assert pieces[:2] == [" Paris", "."], pieces
    stop = "ris."
    result = engine.generate(prompt, SamplingParams(max_tokens=8, stop=[stop], **GREEDY))
    assert result.text == " Pa" and result.finish_reason == "stop" and result.stop_reason == stop
    assert result.token_ids == free.token_ids[:2]
    events = list(engine.stream(prompt, SamplingParams(max_tokens=8, stop=[stop], **GREEDY)))
    assert all("ri" not in e.text for e in events) and "".join(e.text for e in events) == " Pa"


def test_chunked_prefill_equals_one_piece(engine, smollm2):
    prompt = engine.encode("The quick brown fox jumps over the lazy dog. The capital of France is")
    small = Engine(smollm2.model, engine.tokenizer, smollm2.metadata, prefill_chunk=5)
    assert small.prefill_chunks(len(prompt))[:2] == [(0, 5), (5, 10)]
    params = SamplingParams(max_tokens=4, logprobs=0, **GREEDY)
    a, b = engine.generate(prompt, params), small.generate(prompt, params)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_seeded_sampling_is_reproducible(engine):
    params = dict(temperature=1.0, top_p=0.9, max_tokens=4, ignore_eos=True)
    a = engine.generate("Once upon a time", SamplingParams(seed=1234, **params))
    b = engine.generate("Once upon a time", SamplingParams(seed=1234, **params))
    assert a.token_ids == b.token_ids and a.seed == b.seed == 1234
    unseeded = engine.generate("Once upon a time", SamplingParams(**params))
    assert isinstance(unseeded.seed, int)


def test_max_tokens_zero_and_one(engine):
    (event,) = list(engine.stream("Hello", SamplingParams(max_tokens=0)))
    assert event.finished and event.finish_reason == "length" and event.token_id is None
    result = engine.generate("Hello", SamplingParams(max_tokens=1, **GREEDY))
    assert len(result.token_ids) == 1 and result.finish_reason == "length"
    assert isinstance(result, GenerationResult) and result.usage["total_tokens"] == result.prompt_tokens + 1


@pytest.mark.parametrize(
    "params, needle",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
    ],
)
def test_bad_parameters_raise_naming_them(engine, params, needle):
    with pytest.raises(ValueError, match=needle):
        engine.stream("Hello", SamplingParams(**params))  # raised at the call, not on next()


def test_bad_prompts_and_context_length(engine):
    ctx = engine.context_length
    assert ctx == 8192
    with pytest.raises(ValueError, match=rf"\(8190 tokens\) \+ max_tokens \(16\) = 8206 exceeds .* {ctx}"):
        engine.generate([1] * (ctx - 2), SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="empty"):
        engine.generate("", SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(engine.model, engine.tokenizer, engine.metadata, prefill_chunk=0)


def test_unknown_model_path_raises_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Engine.load(missing)
    with pytest.raises(ValueError, match="without config.json"):
        Engine.load(tmp_path)


def test_cli_run_generate_streams_text(q_folder):
    from metal_marlin.generate.cli import run_generate

    out = io.StringIO()
    status = run_generate(str(q_folder), "The capital of France is", False, 3, 0.0, 1.0, None, out=out)
    expected = Engine.load(q_folder).generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=3))
    assert status == 0 and out.getvalue() == expected.text + "\n"
    with pytest.raises(ValueError, match="top_p"):
        run_generate(str(q_folder), "Hi", True, 3, 0.0, 2.0, None, out=out)
    with pytest.raises(FileNotFoundError, match="missing-model"):
        run_generate("/nonexistent/missing-model", "Hi", False, 3, 0.0, 1.0, None, out=out)
