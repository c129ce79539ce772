"""The seed API, with real AWQ underneath: statistics, salient channels, search, errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metal_marlin import (
    AWQResult,
    awq_dequantize,
    awq_quantize,
    compute_activation_stats,
    find_salient_weights,
)
from metal_marlin.quant import QuantSpec, fake_quantize


def outlier_problem(in_features: int = 512, out_features: int = 256, tokens: int = 1024, seed: int = 0):
    """Heavy-tailed weights and activations with a few input channels 20-100x larger.

    This is the structure AWQ exploits in real LLMs: a handful of activation channels carry
    most of the output, so their weights deserve finer quantization.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(in_features, out_features)) * 0.02).astype(np.float32)
    x = rng.standard_t(5, size=(tokens, in_features)).astype(np.float32)
    channels = rng.choice(in_features, size=max(1, in_features // 100), replace=False)
    x[:, channels] *= rng.uniform(20, 100, size=len(channels)).astype(np.float32)
    return w, x


def output_mse(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.mean((x.astype(np.float64) @ (w_hat - w).astype(np.float64)) ** 2))


def rtn(w_in_out: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    return fake_quantize(np.ascontiguousarray(w_in_out.T), QuantSpec(bits, group_size)).T


# ---------------------------------------------------------------- statistics


def test_activation_stats_match_hand_computed_values() -> None:
    x = np.array([[1.0, -2.0, 0.0], [-3.0, 2.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(compute_activation_stats(x, "mean"), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(compute_activation_stats(x, "max"), [3.0, 2.0, 4.0])
    np.testing.assert_allclose(compute_activation_stats(x, "rms"), [np.sqrt(5), 2.0, np.sqrt(8)], rtol=1e-6)
    batched = np.stack([x, x * 2])  # [batch, seq, in]
    np.testing.assert_allclose(compute_activation_stats(batched, "max"), [6.0, 4.0, 8.0])
    np.testing.assert_allclose(compute_activation_stats(batched, "mean"), [3.0, 3.0, 3.0])
    assert compute_activation_stats(x).dtype == np.float32


def test_salient_channels_rank_activation_times_weight_magnitude() -> None:
    w = np.ones((6, 4), dtype=np.float32)
    w[2] *= 10.0  # large weights, small activation
    stats = np.array([1, 1, 0.5, 30, 1, 2], dtype=np.float32)
    idx, importance = find_salient_weights(w, stats, salient_ratio=0.34)  # round(2.04) = 2
    np.testing.assert_array_equal(idx, [3, 2])
    np.testing.assert_allclose(importance, [30.0, 5.0])
    idx0, imp0 = find_salient_weights(w, stats, salient_ratio=0.0)
    assert idx0.size == 0 and imp0.size == 0
    assert find_salient_weights(w, stats, salient_ratio=0.01)[0].tolist() == [3]  # at least one


# ---------------------------------------------------------------- quality


def test_awq_beats_round_to_nearest_by_at_least_30_percent_and_salient_helps() -> None:
    w, x = outlier_problem()
    rtn_error = output_mse(x, w, rtn(w, 4, 128))
    plain = awq_quantize(w, x, group_size=128, salient_ratio=0.0, compute_backend="numpy")
    salient = awq_quantize(w, x, group_size=128, salient_ratio=0.01, compute_backend="numpy")
    plain_error = output_mse(x, w, awq_dequantize(plain.Q, plain.scales, plain.zeros, plain.q_scale, plain.meta))
    salient_error = output_mse(x, w, awq_dequantize(salient.Q, salient.scales, salient.zeros, salient.q_scale, salient.meta))
    assert plain_error <= 0.7 * rtn_error, (plain_error, rtn_error)
    assert salient_error < plain_error, (salient_error, plain_error)
    # The reported errors are those of what is stored.
    assert plain.output_error == pytest.approx(plain_error, rel=1e-3)
    assert plain.rtn_output_error == pytest.approx(rtn_error, rel=1e-3)
    assert plain.alpha > 0  # the search moved away from plain rounding
    assert salient.bits_per_weight > plain.bits_per_weight == pytest.approx(4.25)


def test_search_never_loses_to_round_to_nearest_on_calibration_data() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    x = rng.standard_normal((300, 256)).astype(np.float32)  # no outliers: little to gain
    result = awq_quantize(w, x, group_size=64, salient_ratio=0.0, compute_backend="numpy")
    assert result.output_error <= result.rtn_output_error * (1 + 1e-5)
    assert len(result.search_losses) == 20 and result.search_losses[0] == pytest.approx(result.rtn_output_error, rel=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, 32), (8, 256), (4, 256)])
def test_dequantize_matches_the_fake_quantized_reference(bits: int, group_size: int) -> None:
    w, x = outlier_problem(in_features=512, out_features=64, tokens=256, seed=bits)
    r = awq_quantize(w, x, group_size=group_size, salient_ratio=0.01, bits=bits, compute_backend="numpy")
    s = np.asarray(r.q_scale)
    keep = np.ones(512, dtype=np.float32)
    keep[r.salient_indices] = 0
    scaled = np.ascontiguousarray((w * (s * keep)[:, None]).T)
    reference = (fake_quantize(scaled, QuantSpec(bits, group_size), clip_ratio=np.asarray(r.clip_ratios)) / s[None, :]).T
    reference[r.salient_indices] = w[r.salient_indices].astype(np.float16).astype(np.float32)
    got = awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, r.meta)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6)
    assert got.shape == (512, 64)
    assert r.Q.shape == (64, 512 * bits // 32) and r.Q.dtype == np.uint32
    assert r.scales.dtype == np.float16 and r.zeros.dtype == np.uint8


def test_numpy_and_mlx_compute_backends_agree() -> None:
    w, x = outlier_problem(in_features=256, out_features=64, tokens=256, seed=9)
    a = awq_quantize(w, x, group_size=64, compute_backend="numpy")
    b = awq_quantize(w, x, group_size=64, compute_backend="mlx")
    assert a.alpha == b.alpha
    np.testing.assert_allclose(np.asarray(a.q_scale), np.asarray(b.q_scale), rtol=1e-5)
    same_words = np.mean(np.asarray(a.Q) == np.asarray(b.Q))
    assert same_words > 0.999  # float32 reductions may flip a rare clip-ratio tie
    assert b.output_error == pytest.approx(a.output_error, rel=1e-3)


def test_output_backends() -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=64)
    r = awq_quantize(w, x, group_size=64, output_backend="mlx")
    assert isinstance(r.Q, mx.array) and isinstance(r.q_scale, mx.array)
    deq = awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, r.meta, output_backend="mlx")
    assert isinstance(deq, mx.array) and deq.shape == (128, 32)
    as_f16 = awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, r.meta, weights_dtype=np.float16)
    assert as_f16.dtype == np.float16
    try:
        import torch
    except ImportError:
        with pytest.raises(ImportError, match="pip install torch"):
            awq_quantize(w, x, group_size=64, output_backend="torch")
    else:
        t = awq_quantize(w, x, group_size=64, output_backend="torch")
        assert isinstance(t.Q, torch.Tensor)


def test_seed_style_meta_without_salient_channels() -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=64)
    r = awq_quantize(w, x, group_size=64, salient_ratio=0.0)
    meta = {"in_features": 128, "out_features": 32, "group_size": 64, "quant_type": "awq_int4"}
    np.testing.assert_array_equal(
        awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, meta),
        awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, r.meta),
    )


def test_inputs_are_not_modified_and_float16_inputs_work() -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=64)
    w16, x16 = w.astype(np.float16), x.astype(np.float16)
    w_copy, x_copy = w16.copy(), x16.copy()
    r = awq_quantize(w16, x16.reshape(4, 16, 128), group_size=32, salient_ratio=0.02)
    np.testing.assert_array_equal(w16, w_copy)
    np.testing.assert_array_equal(x16, x_copy)
    assert isinstance(r, AWQResult) and np.asarray(r.q_scale).dtype == np.float32


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"group_size": 96}, ValueError, "group_size"),
        ({"group_size": 256}, ValueError, "group_size=256 does not divide in_features=128"),
        ({"activation_method": "median"}, ValueError, "activation_method.*median"),
        ({"output_backend": "jax"}, ValueError, "output_backend.*jax"),
        ({"bits": 5}, ValueError, "bits.*5"),
        ({"salient_ratio": 0.5}, ValueError, "salient_ratio.*0.5"),
        ({"salient_ratio": -0.1}, ValueError, "salient_ratio"),
        ({"salient_ratio": "1%"}, TypeError, "salient_ratio"),
        ({"compute_backend": "cuda"}, ValueError, "compute_backend.*cuda"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, exc, pattern) -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=16)
    with pytest.raises(exc, match=pattern):
        awq_quantize(w, x, **{"group_size": 64, **kwargs})


def test_bad_arrays_are_rejected_with_their_names() -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=16)
    with pytest.raises(ValueError, match="activations last dim 64 does not match weights in_features 128"):
        awq_quantize(w, x[:, :64], group_size=64)
    bad_w = w.copy()
    bad_w[3, 3] = np.nan
    with pytest.raises(ValueError, match="weights contains 1 NaN or Inf"):
        awq_quantize(bad_w, x, group_size=64)
    bad_x = x.copy()
    bad_x[0, 0] = np.inf
    with pytest.raises(ValueError, match="activations contains 1 NaN or Inf"):
        awq_quantize(w, bad_x, group_size=64)
    with pytest.raises(ValueError, match="activations is empty"):
        awq_quantize(w, np.zeros((0, 128), np.float32), group_size=64)
    with pytest.raises(ValueError, match="weights must be a non-empty 2-D"):
        awq_quantize(w[0], x, group_size=64)
    with pytest.raises(TypeError, match="weights must be a numeric array"):
        awq_quantize(np.array([["a"] * 4] * 64, dtype=object), x, group_size=64)
    with pytest.raises(ValueError, match="activation_stats has 3 channels"):
        find_salient_weights(w, np.ones(3), 0.01)
    with pytest.raises(ValueError, match="method.*bogus"):
        compute_activation_stats(x, "bogus")  # type: ignore[arg-type]


def test_dequantize_rejects_inconsistent_inputs() -> None:
    w, x = outlier_problem(in_features=128, out_features=32, tokens=16)
    r = awq_quantize(w, x, group_size=64, salient_ratio=0.0)
    with pytest.raises(ValueError, match="packed has shape"):
        awq_dequantize(r.Q[:, :-1], r.scales, r.zeros, r.q_scale, r.meta)
    with pytest.raises(ValueError, match="q_scale has 127 entries"):
        awq_dequantize(r.Q, r.scales, r.zeros, np.asarray(r.q_scale)[:-1], r.meta)
    with pytest.raises(ValueError, match="meta is missing"):
        awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, {"group_size": 64})
    with pytest.raises(ValueError, match="quant_type"):
        meta = {k: v for k, v in r.meta.items() if k != "bits"}
        awq_dequantize(r.Q, r.scales, r.zeros, r.q_scale, {**meta, "quant_type": "fp8"})
