"""Sampling parameters and the batched MLX sampler, checked against numpy math."""

from __future__ import annotations

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from metal_marlin.generate.sampling import Sampler, SamplingParams, SamplingState

V = 64
sampler = Sampler()


def _logits(batch: int = 1, seed: int = 0, vocab: int = V, scale: float = 2.0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((batch, vocab)) * scale).astype(np.float32))


def _draw(logits_row: np.ndarray, params: SamplingParams, n: int, seed0: int = 0) -> np.ndarray:
    """n independent draws: one row per seed, all in a single batched call."""
    states = [
        SamplingState(SamplingParams(**{**params.__dict__, "seed": seed0 + i})) for i in range(n)
    ]
    logits = mx.broadcast_to(mx.array(logits_row[None].astype(np.float32)), (n, logits_row.size))
    return np.array(sampler(logits, states).tokens)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax_and_reports_logprobs() -> None:
    logits = _logits(batch=3)
    states = [SamplingState(SamplingParams(temperature=0, logprobs=5)) for _ in range(3)]
    out = sampler(logits, states)
    ref = np.array(logits)
    assert out.tokens == ref.argmax(-1).tolist()
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    for r in range(3):
        assert out.logprobs[r] == pytest.approx(logp[r, out.tokens[r]], abs=1e-5)
        top = out.top_logprobs[r]
        assert [t for t, _ in top] == np.argsort(-logp[r])[:5].tolist()
        assert [lp for _, lp in top] == pytest.approx(np.sort(logp[r])[::-1][:5], abs=1e-5)
        assert states[r].output_tokens == [out.tokens[r]]


def test_logprobs_are_taken_before_temperature() -> None:
    logits = _logits()
    hot = sampler(logits, [SamplingState(SamplingParams(temperature=1.7, seed=3, logprobs=2))])
    cold = sampler(logits, [SamplingState(SamplingParams(temperature=0, logprobs=2))])
    assert [t for t, _ in hot.top_logprobs[0]] == [t for t, _ in cold.top_logprobs[0]]
    assert [lp for _, lp in hot.top_logprobs[0]] == pytest.approx([lp for _, lp in cold.top_logprobs[0]])
    logp = np.log(_softmax(np.array(logits[0])))
    assert hot.logprobs[0] == pytest.approx(logp[hot.tokens[0]], abs=1e-5)
    none = sampler(logits, [SamplingState(SamplingParams(temperature=0))])
    zero = sampler(logits, [SamplingState(SamplingParams(temperature=0, logprobs=0))])
    assert none.top_logprobs == [None] and zero.top_logprobs == [[]]


def _run(params: SamplingParams, logits: mx.array, steps: int) -> list[int]:
    state = SamplingState(params)
    for _ in range(steps):
        sampler(logits, [state])
    return state.output_tokens


def test_same_seed_same_sequence() -> None:
    logits = _logits(scale=0.5)  # flat enough that draws vary
    a = _run(SamplingParams(seed=1234), logits, 12)
    b = _run(SamplingParams(seed=1234), logits, 12)
    c = _run(SamplingParams(seed=4321), logits, 12)
    assert a == b
    assert a != c
    assert len(set(a)) > 3  # the key advances every step


def test_unseeded_rows_get_distinct_recorded_seeds() -> None:
    s1, s2 = SamplingState(SamplingParams()), SamplingState(SamplingParams())
    assert s1.seed != s2.seed
    logits = _logits(scale=0.5)
    replay = _run(SamplingParams(seed=s1.seed), logits, 6)
    for _ in range(6):
        sampler(logits, [s1])
    assert s1.output_tokens == replay


def test_batched_rows_equal_rows_sampled_alone() -> None:
    params = [
        SamplingParams(temperature=0),
        SamplingParams(seed=1, temperature=0.7, top_p=0.8),
        SamplingParams(seed=2, top_k=5, min_p=0.05, repetition_penalty=1.3),
        SamplingParams(seed=3, presence_penalty=1.0, frequency_penalty=0.5, logit_bias={7: 5.0}),
        SamplingParams(seed=4, temperature=1.3, logprobs=3),
    ]
    batch = [SamplingState(p, prompt_tokens=[1, 2, 3]) for p in params]
    alone = [SamplingState(p, prompt_tokens=[1, 2, 3]) for p in params]
    for step in range(6):
        logits = _logits(batch=len(params), seed=step, scale=1.0)
        out = sampler(logits, batch)
        for r, st in enumerate(alone):
            single = sampler(logits[r : r + 1], [st])
            assert single.tokens[0] == out.tokens[r]
            assert single.logprobs[0] == pytest.approx(out.logprobs[r], abs=1e-6)
    assert [s.output_tokens for s in batch] == [s.output_tokens for s in alone]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(batch=4, seed=5, scale=0.3)
    argmax = np.array(logits).argmax(-1).tolist()
    for p in (SamplingParams(top_k=1, temperature=1.5), SamplingParams(top_p=1e-6, temperature=1.5)):
        for seed in range(5):
            states = [SamplingState(SamplingParams(**{**p.__dict__, "seed": seed * 10 + r})) for r in range(4)]
            assert sampler(logits, states).tokens == argmax


PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS)


def test_min_p_filters_relative_to_the_best_token() -> None:
    # min_p=0.2 keeps p >= 0.2 * 0.5 = 0.1: tokens 0, 1, 2.
    tokens = _draw(LOGITS, SamplingParams(min_p=0.2), 600)
    counts = np.bincount(tokens, minlength=4)
    assert counts[3] == 0 and counts[:3].min() > 30


def test_top_p_and_top_k_truncate() -> None:
    # top_p=0.75: token 0 (mass before 0), token 1 (0.5 < 0.75), token 2 would start at 0.8.
    counts = np.bincount(_draw(LOGITS, SamplingParams(top_p=0.75), 800), minlength=4)
    assert counts[2] == counts[3] == 0
    assert counts[0] / 800 == pytest.approx(0.5 / 0.8, abs=0.06)
    counts = np.bincount(_draw(LOGITS, SamplingParams(top_k=2), 400, seed0=10_000), minlength=4)
    assert counts[2] == counts[3] == 0 and counts[1] > 50


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = np.array([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    n = 3000
    tokens = _draw(logits, SamplingParams(temperature=temperature), n, seed0=777)
    observed = np.bincount(tokens, minlength=logits.size)
    expected = _softmax(logits / temperature) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (chi2, observed, expected.round())  # df=5: P(chi2 > 25) ~ 1e-4


def test_penalties_change_exactly_the_penalised_logits() -> None:
    base = np.array([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]], dtype=np.float32)
    state = SamplingState(
        SamplingParams(
            repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 1.5, 5: -3.0}
        ),
        prompt_tokens=[0],
    )
    for t in (1, 1, 2):
        state.append(t)
    out = np.array(Sampler.process_logits(mx.array(base), [state]))[0]
    expected = base[0].copy()
    expected[4] += 1.5
    expected[5] -= 3.0
    expected[0] = 2.0 / 2.0  # seen in the prompt: repetition penalty only
    expected[1] = -1.0 * 2.0 - (0.25 * 2 + 0.5)  # generated twice
    expected[2] = 0.5 / 2.0 - (0.25 * 1 + 0.5)  # generated once
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert out[3] == base[0, 3]  # untouched tokens are bit-identical


def test_logit_bias_bans_and_forces() -> None:
    logits = _logits(seed=9)
    best = int(np.array(logits).argmax())
    banned = SamplingParams(temperature=0, logit_bias={best: -100})
    assert sampler(logits, [SamplingState(banned)]).tokens[0] != best
    tokens = _draw(np.array(logits[0]), SamplingParams(logit_bias={best: -100}), 300)
    assert best not in tokens.tolist()
    forced = _draw(np.array(logits[0]), SamplingParams(logit_bias={17: 100}), 50)
    assert set(forced.tolist()) == {17}


def test_logit_bias_json_keys_and_single_stop_string_are_normalised() -> None:
    p = SamplingParams(logit_bias={"50": -100, "7": 2}, stop="END")
    assert p.logit_bias == {50: -100, 7: 2} and p.stop == ["END"]
    assert p.validate(vocab_size=64) is p


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": "7"}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"),
        ({"logit_bias": {64: 1}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [99]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_params_raise_naming_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        SamplingParams(**kwargs).validate(vocab_size=V)
    with pytest.raises(ValueError):
        SamplingState(SamplingParams(**kwargs), vocab_size=V)


def test_boundary_values_are_valid() -> None:
    SamplingParams(
        temperature=2.0, top_p=1.0, top_k=0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
        logit_bias={0: -100, 63: 100}, max_tokens=0, logprobs=20, seed=-5,
    ).validate(vocab_size=V)
    SamplingState(SamplingParams(seed=2**70))  # any int seed maps into the 64-bit key space


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        sampler(_logits(batch=2), [SamplingState(SamplingParams())])
    with pytest.raises(ValueError, match="batch, vocab"):
        sampler(mx.zeros((V,)), [SamplingState(SamplingParams())])


def test_importing_params_does_not_import_mlx() -> None:
    code = (
        "import sys; from metal_marlin.generate import SamplingParams, TokenStreamer;"
        "SamplingParams(temperature=0.5).validate(); assert 'mlx' not in sys.modules, 'mlx imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _nucleus(logits: np.ndarray, top_p: float = 1.0, top_k: int = 0) -> dict[int, float]:
    """numpy reference: token -> probability after top_k then top_p, renormalised."""
    order = np.argsort(-logits, kind="stable")
    p = _softmax(logits)[order]
    if top_k:
        p = p[:top_k] / p[:top_k].sum()
    before = np.cumsum(p) - p
    n = max(1, int((before < top_p).sum()))
    kept = p[:n] / p[:n].sum()
    return dict(zip(order[:n].tolist(), kept.tolist()))


# A few clear favourites, then a long flat tail: 8 candidates hold ~96% of the mass.
PEAKED = np.concatenate([[4.0, 3.5, 3.2, 3.0, 2.5, 2.0, 1.8, 1.5], np.linspace(-2.0, -3.0, 56)])
FLAT = np.linspace(0.3, 0.0, 64)  # the top 8 hold ~14%: top_p needs a full sort


@pytest.mark.parametrize(
    ("logits", "top_p", "top_k"),
    [(PEAKED, 0.9, 0), (PEAKED, 1.0, 5), (PEAKED, 0.8, 6), (FLAT, 0.95, 0), (FLAT, 0.5, 40)],
)
def test_candidate_ranking_matches_full_sort_distribution(logits, top_p, top_k) -> None:
    small = Sampler(candidates=8)  # V=64: exercises both the candidate path and its fallback
    ref = _nucleus(logits, top_p, top_k)
    n = 2000
    states = [SamplingState(SamplingParams(top_p=top_p, top_k=top_k, seed=50_000 + i)) for i in range(n)]
    logits_b = mx.broadcast_to(mx.array(logits[None].astype(np.float32)), (n, logits.size))
    tokens = small(logits_b, states).tokens
    assert set(tokens) <= set(ref)
    observed = np.array([tokens.count(t) for t in ref])
    expected = np.array(list(ref.values())) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = max(len(ref) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)
    if logits is FLAT and top_k == 0:
        assert max(tokens) > 8  # came from beyond the candidates: the full sort ran


def test_rows_keep_their_tokens_whatever_path_the_batch_takes() -> None:
    small = Sampler(candidates=8)
    params = [
        SamplingParams(seed=1, top_p=0.9),  # peaked row: candidates suffice
        SamplingParams(seed=2, top_p=0.95),  # flat row: falls back to the full sort
        SamplingParams(seed=3, top_k=20, top_p=0.9),  # top_k beyond the candidates
        SamplingParams(seed=4, min_p=0.1),
        SamplingParams(temperature=0),
    ]
    rows = np.stack([PEAKED, FLAT, FLAT, PEAKED, FLAT]).astype(np.float32)
    batch = [SamplingState(p) for p in params]
    alone = [SamplingState(p) for p in params]
    for step in range(8):
        logits = mx.array(np.roll(rows, step, axis=1))
        out = small(logits, batch)
        for r, st in enumerate(alone):
            assert small(logits[r : r + 1], [st]).tokens[0] == out.tokens[r], (step, r)
    assert len(set(batch[1].output_tokens)) > 3
