"""The fused int4 kernel and the GPU path of QuantizedLinear.

On the CPU (CI) these check the dispatch rules and, with the GPU path forced, that
flattening a decode batch to 2-D changes no number. The kernel itself runs only where MLX
has a CUDA or Metal GPU: those tests skip elsewhere and were run on the lent H200.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from metal_marlin import device
from metal_marlin.kernels import gemv
from metal_marlin.models.layers import QuantizedLinear

ON_GPU_KERNELS = gemv.gpu_kernel_backend() is not None
needs_gpu = pytest.mark.skipif(not ON_GPU_KERNELS, reason="the fused kernel runs only on a CUDA or Metal GPU")


def _layer(in_dims: int, out_dims: int, group: int, dtype: mx.Dtype = mx.float32, seed: int = 0) -> QuantizedLinear:
    mx.random.seed(seed)
    linear = nn.Linear(in_dims, out_dims, bias=False)
    layer = QuantizedLinear.from_linear(linear, group_size=group, bits=4) if group <= 128 else None
    if layer is None:  # group 256 is ours, not mx.quantize's: build it by hand
        layer = QuantizedLinear(in_dims, out_dims, group_size=group, bits=4, dtype=dtype)
        layer.weight = gemv.random_words((out_dims, in_dims // 8))
        layer.scales = mx.random.uniform(0.01, 0.02, (out_dims, in_dims // group)).astype(dtype)
        layer.biases = (-8 * layer.scales).astype(dtype)
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    return layer


def test_fused_kernel_is_off_on_the_cpu():
    assert mx.default_device().type == mx.DeviceType.cpu or ON_GPU_KERNELS
    if not ON_GPU_KERNELS:
        assert gemv.fused_int4_available(mx.float16) is False
        with pytest.raises(RuntimeError, match="CUDA or Metal"):
            gemv.int4_gemv(mx.zeros((1, 64)), mx.zeros((8, 8), dtype=mx.uint32), mx.zeros((8, 1)), mx.zeros((8, 1)), 64)


def test_supported_shapes():
    assert gemv.int4_gemv_supported(1, 4096, 4, 64, mx.float16)
    assert gemv.int4_gemv_supported(4, 576, 4, 64, mx.bfloat16)
    assert gemv.int4_gemv_supported(2, 1024, 4, 256, mx.float32)
    assert not gemv.int4_gemv_supported(5, 4096, 4, 64, mx.float16)  # past FUSED_MAX_ROWS: MLX's matmul
    assert not gemv.int4_gemv_supported(1, 4096, 3, 64, mx.float16)  # 4 bits only
    assert not gemv.int4_gemv_supported(1, 4096, 4, 64, mx.int32)


def test_launch_shape_gives_every_lane_work_and_covers_every_row():
    # SmolLM2's K=576 has 18 chunks of 32 weights: 8-lane sub-warps; 8B's 4096 has 128: full warps.
    assert gemv.launch_shape(1, 576, 576)[0] == 8
    assert gemv.launch_shape(1, 1536, 576)[0] == 16
    assert gemv.launch_shape(1, 4096, 14336)[:2] == (32, 1)  # enough rows to fill the GPU
    assert gemv.launch_shape(1, 4096, 1024)[:2] == (32, 4)  # k/v: each row split over 4 warps
    for rows, k, n in ((1, 576, 37), (4, 4096, 1024), (3, 14336, 4097), (1, 4096, 128256)):
        lw, ks, threads = gemv.launch_shape(rows, k, n)
        assert threads % gemv.THREADS_PER_BLOCK == 0
        rows_per_block = gemv.THREADS_PER_BLOCK // lw // ks
        assert threads // gemv.THREADS_PER_BLOCK * rows_per_block >= n  # every output row
        assert threads // gemv.THREADS_PER_BLOCK * rows_per_block - n < rows_per_block  # one partial block at most
        assert (k // 32) // ks >= lw  # every lane of a split has a chunk


def test_unpack_reference_equals_mlx_dequantize():
    w = gemv.random_words((24, 64))
    scales = mx.random.uniform(0.01, 0.02, (24, 8))
    biases = -8 * scales
    assert mx.allclose(gemv.unpack_reference(w, scales, biases, 64), mx.dequantize(w, scales, biases, group_size=64, bits=4))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("group", [64, 256])
def test_gpu_path_flattens_decode_batches_without_changing_results(monkeypatch, group, rows):
    layer = _layer(512, 96, group)
    x = mx.random.normal((rows, 1, 512))
    want = layer(x)
    monkeypatch.setattr(device, "on_gpu", lambda: True)  # the GPU path, computed by the CPU
    got = layer(x)
    assert got.shape == (rows, 1, 96)
    assert mx.array_equal(got, want)


@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_kernel_agrees_with_mlx(dtype):
    assert gemv.self_check(dtype) <= gemv._TOLERANCE[dtype]
    assert gemv.fused_int4_available(dtype)


@needs_gpu
@pytest.mark.parametrize("rows,group", [(1, 64), (2, 128), (4, 32), (1, 256), (5, 64), (9, 64)])
def test_quantized_linear_on_the_gpu_matches_dequantized_matmul(rows, group):
    layer = _layer(1536, 200, group, mx.float16, seed=rows)
    x = mx.random.normal((rows, 1, 1536)).astype(mx.float16)
    got = layer(x).astype(mx.float32)
    want = x.astype(mx.float32) @ layer.dequantized_weight().T
    scale = float(mx.max(mx.abs(want)).item())
    assert float(mx.max(mx.abs(got - want)).item()) / scale < 4e-3


@needs_gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_stacked_projection_equals_separate_layers(rows):
    from metal_marlin.models.layers import project_stacked

    layers = [_layer(1024, n, 64, mx.float16, seed=n) for n in (256, 64, 64)]
    x = mx.random.normal((rows, 1, 1024)).astype(mx.float16)
    stacked = project_stacked(x, layers)
    for layer, got in zip(layers, stacked):
        want = x.astype(mx.float32) @ layer.dequantized_weight().T
        assert got.shape == (rows, 1, layer.output_dims)
        assert float(mx.max(mx.abs(got.astype(mx.float32) - want)).item()) / float(mx.max(mx.abs(want)).item()) < 4e-3


def test_stacked_projection_falls_back_where_the_kernel_does_not_run(monkeypatch):
    from metal_marlin.models.layers import project_stacked

    layers = [_layer(512, n, 64, seed=n) for n in (96, 32)]
    x = mx.random.normal((2, 1, 512))
    want = [layer(x) for layer in layers]
    monkeypatch.setattr(device, "on_gpu", lambda: True)  # no kernel on the CPU: separate products
    for got, ref in zip(project_stacked(x, layers), want):
        assert mx.array_equal(got, ref)
