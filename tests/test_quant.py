"""The one quantizer and packing routine: exact round trips, numpy == MLX, MLX reads our words."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metal_marlin.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantSpec,
    affine_params,
    dequantize_codes,
    fake_quantize,
    group_range,
    pack_codes,
    quantize_codes,
    quantize_tensor,
    to_mlx_scales_biases,
    unpack_codes,
)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
def test_pack_unpack_round_trip_is_exact(bits: int, group_size: int) -> None:
    rng = np.random.default_rng(bits * 1000 + group_size)
    codes = rng.integers(0, 1 << bits, size=(6, 2 * group_size), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint32
    assert packed.shape == (6, 2 * group_size * bits // 32)
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)
    packed_mx = pack_codes(mx.array(codes), bits, mx)
    np.testing.assert_array_equal(np.array(packed_mx), packed)
    np.testing.assert_array_equal(np.array(unpack_codes(packed_mx, bits, mx)), codes)


def test_pack_layout_is_little_endian_bitstream() -> None:
    codes = np.zeros((1, 32), dtype=np.uint8)
    codes[0, 0], codes[0, 1], codes[0, 7] = 0x1, 0x2, 0xF
    assert pack_codes(codes, 4)[0, 0] == 0x1 | (0x2 << 4) | (0xF << 28)
    # 3-bit: code 10 starts at bit 30 and straddles the first two words.
    codes3 = np.zeros((1, 32), dtype=np.uint8)
    codes3[0, 10] = 0b111
    words = pack_codes(codes3, 3)[0]
    assert words[0] == 0b11 << 30 and words[1] == 0b1


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_numpy_and_mlx_quantizers_agree_bit_for_bit(bits: int, group_size: int) -> None:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 3, size=(24, 1))).astype(np.float32)
    spec = QuantSpec(bits, group_size)
    ref = quantize_tensor(w, spec)
    got = quantize_tensor(mx.array(w), spec, mx)
    np.testing.assert_array_equal(np.array(got.packed), ref.packed)
    np.testing.assert_array_equal(np.array(got.scales), ref.scales)
    np.testing.assert_array_equal(np.array(got.zeros), ref.zeros)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_mlx_dequantize_reads_our_words(bits: int) -> None:
    """mx.dequantize on our packed codes with bias=-scale*zero gives our dequantization."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    spec = QuantSpec(bits, 64)
    qt = quantize_tensor(w, spec)
    scales, biases = to_mlx_scales_biases(qt.scales, qt.zeros.astype(np.float32), np.float32)
    theirs = mx.dequantize(mx.array(qt.packed), mx.array(scales), mx.array(biases), group_size=64, bits=bits)
    np.testing.assert_allclose(np.array(theirs), qt.dequantize(), rtol=0, atol=1e-6)


def test_scales_are_float16_exact_and_zero_points_integers() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32) + 0.3
    scale, zero = affine_params(w, QuantSpec(4, 32))
    np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
    np.testing.assert_array_equal(zero, np.round(zero))
    assert zero.min() >= 0 and zero.max() <= 15


def test_quantization_error_is_within_half_a_step() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    spec = QuantSpec(4, 32)
    scale, zero = affine_params(w, spec)
    deq = dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero, spec)
    step = np.repeat(scale, 32, axis=1)
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)


def test_all_zero_columns_are_exact() -> None:
    w = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    w[:, 5] = 0.0
    qt = quantize_tensor(w, QuantSpec(3, 32))
    assert np.all(qt.dequantize()[:, 5] == 0.0)


def test_bad_specs_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(5, 64)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 48)
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=576"):
        quantize_tensor(np.zeros((2, 576), np.float32), QuantSpec(4, 128))


def test_a_reused_group_range_gives_exactly_the_same_fake_quantization() -> None:
    """The clip search reduces each weight once and reuses the range for every ratio."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 128)) * rng.uniform(0.1, 3.0, 128)).astype(np.float32)
    spec = QuantSpec(3, 32)
    w_min, w_max = group_range(w, spec)
    assert w_min.shape == w_max.shape == (48, 4) and (w_min <= 0).all() and (w_max >= 0).all()
    for ratio in (1.0, 0.8, 0.55):
        assert np.array_equal(fake_quantize(w, spec, clip_ratio=ratio, w_range=(w_min, w_max)),
                              fake_quantize(w, spec, clip_ratio=ratio))
    assert not np.array_equal(fake_quantize(w, spec, clip_ratio=0.55), fake_quantize(w, spec, clip_ratio=1.0))
