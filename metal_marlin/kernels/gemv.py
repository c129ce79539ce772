"""Fused int4 matrix-vector kernel for decoding: ``y[M, N] = x[M, K] @ dequant(W)[N, K].T``.

Why our own: a decode step multiplies one row per sequence by every weight matrix, so its
speed is the speed at which the packed weights stream from memory. MLX's CUDA
``quantized_matmul`` reads them at 0.4-0.5 TB/s for one row on an H200 (4.8 TB/s): 15% of
the bound (``shared/gpu/README.md``). This kernel is written for that one job.

Layout: MLX's affine layout, which is our native format: ``W`` uint32 ``[N, K/8]`` packed
along K, nibble ``i`` of a word is element ``8*word + i``; ``scales``/``biases`` ``[N, K/G]``
in the activation dtype; ``w = scale*q + bias``.

Design (the same on CUDA and Metal):

* A *sub-warp* of ``LW`` lanes (8, 16 or 32: enough that every lane has work for short
  rows like SmolLM2's K=576) walks ``R`` output rows in 128-bit chunks (32 weights, one
  16-byte load per row), so a warp's loads are contiguous, R of them are in flight per
  lane, each chunk of ``x`` is loaded and converted once for the R rows, and every byte
  of ``W`` is read exactly once (R=1 on Metal). Matrices with few rows split each row over
  ``KS`` sub-warps (summed in shared memory) so that the grid still fills the GPU.
* The group's bias term needs only ``Σx``: ``Σ x*(s*q + b) = s*Σ x*q + b*Σ x``, so a
  weight costs one multiply-add.
* Nibbles become floats without int-to-float conversions (quarter rate on Hopper): the
  nibble is placed in the low mantissa byte of ``2**23`` (``0x4B0000qq`` is exactly
  ``2**23 + q``) by a byte permute, and ``2**23`` subtracted. Accumulation is float32.
* A lane-level reduction (shuffle xor within the sub-warp) ends each row.
* ``M`` (rows of ``x``, the sequences of a small decode batch) is a compile-time constant,
  so the weights are still read once for all ``M`` rows.

Beyond ``FUSED_MAX_ROWS`` rows the matrix-matrix kernels of MLX are the better tool and
:class:`~metal_marlin.models.layers.QuantizedLinear` uses them (with a 2-D input: a
``[B, 1, K]`` input makes MLX's CUDA kernel re-read the weights per row).

Safety: the first use per activation dtype runs a self-check against MLX's own
dequantize + matmul on small odd shapes (tails, every sub-warp width). A kernel that fails
to compile or to agree is disabled for the process with a warning, and MLX's kernel
serves instead; ``MM_FUSED_KERNELS=0`` disables the kernels outright.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import mlx.core as mx

log = logging.getLogger("metal_marlin.kernels")

FUSED_MAX_ROWS = 4
"""Most rows of ``x`` the fused kernel takes. Measured on an H200 (bench/gpu_kernels.py):
its cost grows with the rows (``x`` is re-read per row), while MLX's matrix-matrix kernel
costs the same from 8 rows on; between the two, rows are padded to 8 for MLX's kernel."""

MLX_MIN_ROWS = 8
"""MLX's CUDA kernel for fewer rows re-reads the weights per row; pad up to this many."""

FUSED_GROUP_SIZES = (32, 64, 128, 256)
FUSED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
THREADS_PER_BLOCK = 256
TARGET_THREADS = 132 * 2048
ROWS_PER_SUBWARP = 4
"""Rows per sub-warp of the CUDA kernel at one row of x (x is loaded once for them: fewer
instructions per weight). The self-check falls back to 1 if 4 disagrees."""
ENV_SWITCH = "MM_FUSED_KERNELS"

_CUDA_HEADER = r"""
__device__ __forceinline__ void mm_load32(const float* p, float* f) {
  const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float4 a = v[i];
    f[4 * i] = a.x; f[4 * i + 1] = a.y; f[4 * i + 2] = a.z; f[4 * i + 3] = a.w;
  }
}
__device__ __forceinline__ float2 mm_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 mm_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
// 32 16-bit values (four 16-byte loads) as floats; H2 is the type's pair (__half2, __nv_bfloat162).
template <typename H2, typename H>
__device__ __forceinline__ void mm_load32_pairs(const H* p, float* f) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 a = v[i];
    const H2* h = reinterpret_cast<const H2*>(&a);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 t = mm_float2(h[j]);
      f[8 * i + 2 * j] = t.x; f[8 * i + 2 * j + 1] = t.y;
    }
  }
}
__device__ __forceinline__ void mm_load32(const __half* p, float* f) { mm_load32_pairs<__half2>(p, f); }
__device__ __forceinline__ void mm_load32(const __nv_bfloat16* p, float* f) { mm_load32_pairs<__nv_bfloat162>(p, f); }
// sum_i x[i] * q[i] over the 32 nibbles of one 128-bit chunk.
__device__ __forceinline__ float mm_dot32(const uint4& q, const float* xf) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  float d0 = 0.f, d1 = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = words[j] & 0x0F0F0F0Fu;         // nibbles 0, 2, 4, 6
    const uint32_t hi = (words[j] >> 4) & 0x0F0F0F0Fu;  // nibbles 1, 3, 5, 7
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float a = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540u + k)) - 8388608.0f;
      const float b = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540u + k)) - 8388608.0f;
      d0 = fmaf(xf[8 * j + 2 * k], a, d0);
      d1 = fmaf(xf[8 * j + 2 * k + 1], b, d1);
    }
  }
  return d0 + d1;
}
"""

_CUDA_SOURCE = r"""
  // R consecutive output rows per group of KS sub-warps of LW lanes (the KS split K):
  // each chunk of x is loaded and converted once for the R rows.
  const int tid = threadIdx.x;
  const int lane = tid % LW;
  const int sub = tid / LW;
  constexpr int SUBS = BLOCK / LW;
  const int row0 = (blockIdx.x * (SUBS / KS) + sub / KS) * R;
  const int ks = sub % KS;
  const int chunks = w0_shape[1] / 4;
  const int K = chunks * 32;
  const int groups = K / G;
  const int per_split = (chunks + KS - 1) / KS;
  const int c_begin = ks * per_split;
  const int c_end = min(c_begin + per_split, chunks);
  const int n_out = @NTOTAL@;
  const uint4* wrow[R];
  const T* srow[R];
  const T* brow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // rows may straddle two stacked matrices: select per row
    const int row = row0 + r;
    const uint32_t* w = w0;
    const T* scales = scales0;
    const T* biases = biases0;
    int local = row;
@SELECT@
    const size_t rr = (size_t)(row < n_out ? local : w0_shape[0] - 1);
    if (row >= n_out) { w = w0; scales = scales0; biases = biases0; }
    wrow[r] = reinterpret_cast<const uint4*>(w) + rr * chunks;
    srow[r] = scales + rr * groups;
    brow[r] = biases + rr * groups;
  }
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
#pragma unroll 2
  for (int c = c_begin + lane; c < c_end; c += LW) {
    uint4 q[R];
    float s[R], b[R];
    const int g = (c * 32) / G;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      q[r] = __ldg(wrow[r] + c);
      s[r] = static_cast<float>(srow[r][g]);
      b[r] = static_cast<float>(brow[r][g]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[32];
      mm_load32(x + (size_t)m * K + (size_t)c * 32, xf);
      float xs = 0.f;
#pragma unroll
      for (int i = 0; i < 32; ++i) xs += xf[i];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] += s[r] * mm_dot32(q[r], xf) + b[r] * xs;
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int off = LW / 2; off > 0; off >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], off);
  if constexpr (KS == 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (row0 + r < n_out) y[(size_t)m * n_out + row0 + r] = static_cast<T>(acc[m][r]);
    }
  } else {
    __shared__ float part[SUBS][M * R];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) part[sub][m * R + r] = acc[m][r];
    }
    __syncthreads();
    if (ks == 0 && lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float t = 0.f;
#pragma unroll
          for (int j = 0; j < KS; ++j) t += part[sub + j][m * R + r];
          if (row0 + r < n_out) y[(size_t)m * n_out + row0 + r] = static_cast<T>(t);
        }
    }
  }
"""

_METAL_HEADER = r"""
// sum_i x[i] * q[i] over the 32 nibbles of one 128-bit chunk (see the CUDA twin).
inline float mm_dot32(uint4 q, thread const float* xf) {
  float d0 = 0.f, d1 = 0.f;
  for (int j = 0; j < 4; ++j) {
    const uint wd = q[j];
    for (int k = 0; k < 4; ++k) {
      const float a = as_type<float>(0x4B000000u | ((wd >> (8 * k)) & 0xFu)) - 8388608.0f;
      const float b = as_type<float>(0x4B000000u | ((wd >> (8 * k + 4)) & 0xFu)) - 8388608.0f;
      d0 = fma(xf[8 * j + 2 * k], a, d0);
      d1 = fma(xf[8 * j + 2 * k + 1], b, d1);
    }
  }
  return d0 + d1;
}
"""

_METAL_SOURCE = r"""
  const int tid = int(thread_position_in_threadgroup.x);
  const int lane = tid % LW;
  const int sub = tid / LW;
  constexpr int SUBS = BLOCK / LW;
  const int row = int(threadgroup_position_in_grid.x) * (SUBS / KS) + sub / KS;
  const int ks = sub % KS;
  const int chunks = int(w0_shape[1]) / 4;
  const int K = chunks * 32;
  const int groups = K / G;
  const int per_split = (chunks + KS - 1) / KS;
  const int c_begin = ks * per_split;
  const int c_end = min(c_begin + per_split, chunks);
  const device uint32_t* w = w0;
  const device T* scales = scales0;
  const device T* biases = biases0;
  int local = row;
@SELECT@
  const int n_out = @NTOTAL@;
  const size_t rr = (size_t)(row < n_out ? local : int(w0_shape[0]) - 1);
  if (row >= n_out) { w = w0; scales = scales0; biases = biases0; }
  const device uint4* wrow = (const device uint4*)w + rr * chunks;
  float acc[M];
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int c = c_begin + lane; c < c_end; c += LW) {
    const uint4 q = wrow[c];
    const int g = (c * 32) / G;
    const float s = float(scales[rr * groups + g]);
    const float b = float(biases[rr * groups + g]);
    for (int m = 0; m < M; ++m) {
      float xf[32];
      float xs = 0.f;
      for (int i = 0; i < 32; ++i) {
        xf[i] = float(x[(size_t)m * K + (size_t)c * 32 + i]);
        xs += xf[i];
      }
      acc[m] += s * mm_dot32(q, xf) + b * xs;
    }
  }
  for (int m = 0; m < M; ++m)
    for (ushort off = LW / 2; off > 0; off >>= 1) acc[m] += simd_shuffle_xor(acc[m], off);
  threadgroup float part[SUBS][M];
  if (lane == 0)
    for (int m = 0; m < M; ++m) part[sub][m] = acc[m];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (ks == 0 && lane == 0 && row < n_out) {
    for (int m = 0; m < M; ++m) {
      float t = 0.f;
      for (int j = 0; j < KS; ++j) t += part[sub + j][m];
      y[(size_t)m * n_out + row] = T(t);
    }
  }
"""

MAX_MATRICES = 3
"""Most matrices one launch computes (q/k/v of attention; gate/up of the MLP)."""


def _input_names(n_mats: int) -> list[str]:
    return ["x"] + [f"{name}{i}" for i in range(n_mats) for name in ("w", "scales", "biases")]


def _specialise(source: str, n_mats: int, cuda: bool) -> str:
    """Fill in the row -> matrix selection for ``n_mats`` stacked matrices."""
    shape = (lambda i: f"w{i}_shape[0]") if cuda else (lambda i: f"int(w{i}_shape[0])")
    select, offset = [], shape(0)
    for i in range(1, n_mats):
        select.append(
            f"  if (row >= {offset}) {{ w = w{i}; scales = scales{i}; biases = biases{i}; local = row - ({offset}); }}"
        )
        offset = f"{offset} + {shape(i)}"
    return source.replace("@SELECT@", "\n".join(select)).replace("@NTOTAL@", offset)


def gpu_kernel_backend() -> str | None:
    """``"cuda"``/``"metal"`` when MLX computes on such a GPU now, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@lru_cache(maxsize=None)
def _kernel(backend: str, n_mats: int):
    """The kernel object for ``n_mats`` stacked matrices (MLX compiles each template instance on first use)."""
    names = _input_names(n_mats)
    if backend == "cuda":
        return mx.fast.cuda_kernel(
            name=f"mm_int4_gemv{n_mats}", input_names=names, output_names=["y"],
            source=_specialise(_CUDA_SOURCE, n_mats, cuda=True), header=_CUDA_HEADER,
        )
    return mx.fast.metal_kernel(
        name=f"mm_int4_gemv{n_mats}", input_names=names, output_names=["y"],
        source=_specialise(_METAL_SOURCE, n_mats, cuda=False), header=_METAL_HEADER,
    )


def rows_per_subwarp(rows: int, backend: str) -> int:
    """R of the CUDA kernel for ``rows`` rows of x: each row of x costs registers per R
    (ptxas: 128 registers for R=4 at one row, 250 at three), so 4 at one row, 2 beyond.
    The Metal kernel owns one row per sub-warp."""
    if backend != "cuda":
        return 1
    return ROWS_PER_SUBWARP if rows == 1 else min(2, ROWS_PER_SUBWARP)


def launch_shape(rows: int, in_features: int, out_features: int, rows_per_subwarp: int = 1) -> tuple[int, int, int]:
    """``(LW, KS, threads)``: lanes per sub-warp, sub-warps per output row, grid in threads.

    Memory bandwidth needs many loads in flight: about ``TARGET_THREADS`` threads (132
    SMs x 2048 on an H200) each with a few 16-byte loads. LW is the widest sub-warp whose
    lanes all get a chunk (K/32 chunks per row); a short matrix (few rows N) splits each
    row over KS sub-warps (summed in shared memory) until the grid is that large, as long
    as every lane keeps at least one chunk. A sub-warp owns ``rows_per_subwarp`` rows.
    ``rows`` (of ``x``) does not change the shape.
    """
    chunks = in_features // 32
    lw = 32 if chunks >= 64 else 16 if chunks >= 24 else 8
    units = -(-out_features // rows_per_subwarp)
    ks = 1
    while ks < THREADS_PER_BLOCK // lw and units * lw * ks < TARGET_THREADS and chunks // (2 * ks) >= lw:
        ks *= 2
    rows_per_block = THREADS_PER_BLOCK // lw // ks
    blocks = -(-units // rows_per_block)
    return lw, ks, blocks * THREADS_PER_BLOCK


def int4_gemv_supported(rows: int, in_features: int, bits: int, group_size: int, dtype: mx.Dtype) -> bool:
    """Whether the kernel computes this product (else MLX's kernels do)."""
    return (
        bits == 4
        and 1 <= rows <= FUSED_MAX_ROWS
        and group_size in FUSED_GROUP_SIZES
        and in_features % group_size == 0
        and in_features % 32 == 0
        and dtype in FUSED_DTYPES
    )


def int4_gemv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """``x [M, K] @ dequant(w, scales, biases).T`` -> ``[M, N]`` in ``x.dtype`` on the GPU.

    The caller checks :func:`int4_gemv_supported` and :func:`fused_int4_available`.
    Scales and biases are used in ``x.dtype`` (MLX's convention).
    """
    return int4_gemv_stacked(x, [(w, scales, biases)], group_size)


def int4_gemv_stacked(
    x: mx.array, matrices: list[tuple[mx.array, mx.array, mx.array]], group_size: int
) -> mx.array:
    """``x @ [W_0; W_1; ...].T`` in one launch -> ``[M, sum N_i]`` (split it by the ``N_i``).

    For projections that read the same input (q/k/v, gate/up): one kernel and one graph
    node instead of three, and no copy of the weights to stack them.
    """
    backend = gpu_kernel_backend()
    if backend is None:
        raise RuntimeError("int4_gemv runs on a CUDA or Metal GPU only")
    if not 1 <= len(matrices) <= MAX_MATRICES:
        raise ValueError(f"int4_gemv_stacked takes 1 to {MAX_MATRICES} matrices, got {len(matrices)}")
    rows, k = x.shape
    inputs, n = [x], 0
    for w, scales, biases in matrices:
        if w.shape[1] * 8 != k:
            raise ValueError(f"int4_gemv: x has {k} columns, a packed weight holds {w.shape[1] * 8}")
        if scales.dtype != x.dtype:
            scales, biases = scales.astype(x.dtype), biases.astype(x.dtype)
        inputs += [w, scales, biases]
        n += w.shape[0]
    r = rows_per_subwarp(rows, backend)
    lw, ks, threads = launch_shape(rows, k, n, r)
    template = [("T", x.dtype), ("M", rows), ("G", group_size), ("LW", lw), ("KS", ks), ("BLOCK", THREADS_PER_BLOCK)]
    if backend == "cuda":
        template.append(("R", r))
    (y,) = _kernel(backend, len(matrices))(
        inputs=inputs,
        template=template,
        grid=(threads, 1, 1),
        threadgroup=(THREADS_PER_BLOCK, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[x.dtype],
    )
    return y


def random_words(shape: tuple[int, ...], key: mx.array | None = None) -> mx.array:
    """Uniformly random uint32 words (every nibble 0..15): packed codes for tests and benchmarks."""
    halves = mx.random.randint(0, 1 << 16, (2, *shape), key=key).astype(mx.uint32)
    return halves[0] * (1 << 16) + halves[1]


def unpack_reference(w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """``[N, K]`` float32 weights from MLX's 4-bit layout with plain shifts and masks.

    Independent of ``mx.dequantize`` on purpose: the self-check must not trust the
    backend it is checking against.
    """
    n, words = w.shape
    shifts = mx.arange(8, dtype=mx.uint32) * 4
    codes = ((w[:, :, None] >> shifts) & 0xF).reshape(n, words * 8).astype(mx.float32)
    s = mx.repeat(scales.astype(mx.float32), group_size, axis=1)
    b = mx.repeat(biases.astype(mx.float32), group_size, axis=1)
    return codes * s + b


def _reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    return x.astype(mx.float32) @ unpack_reference(w, scales, biases, group_size).T


def self_check(dtype: mx.Dtype, details: list[dict] | None = None) -> float:
    """Largest relative error of the kernel against an independent dequantize + matmul.

    Shapes cover every sub-warp width (K/32 = 8, 18, 48, 96, 128, 448 chunks), row tails
    (N not a multiple of the rows per block), split rows, 1 to 4 rows of ``x``, group
    sizes 32-256 and three stacked matrices. ``details``, if given, receives one entry per
    case (with MLX's own ``quantized_matmul`` error for comparison).
    """
    key = mx.random.key(7)
    worst = 0.0
    cases = []
    for rows, k, n, group in ((1, 256, 37, 64), (3, 1536, 50, 128), (1, 3072, 19, 256), (4, 4096, 64, 32), (2, 576, 41, 64), (1, 14336, 24, 64)):
        kx, kw, ks, key = mx.random.split(key, 4)
        x = mx.random.normal((rows, k), key=kx).astype(dtype)
        w = random_words((n, k // 8), key=kw)
        scales = (mx.random.uniform(0.01, 0.02, (n, k // group), key=ks)).astype(dtype)
        biases = (-8 * scales.astype(mx.float32)).astype(dtype)
        cases.append((x, [(w, scales, biases)], group))
    # Three stacked matrices of different heights (q/k/v-like), rows of x 1 and 3.
    for rows, k, heights in ((1, 512, (40, 8, 24)), (3, 1024, (16, 33, 5))):
        kx, key = mx.random.split(key)
        x = mx.random.normal((rows, k), key=kx).astype(dtype)
        mats = []
        for h in heights:
            kw, ks, key = mx.random.split(key, 3)
            scales = mx.random.uniform(0.01, 0.02, (h, k // 64), key=ks).astype(dtype)
            mats.append((random_words((h, k // 8), key=kw), scales, (-8 * scales.astype(mx.float32)).astype(dtype)))
        cases.append((x, mats, 64))
    for x, mats, group in cases:
        got = int4_gemv_stacked(x, mats, group).astype(mx.float32)
        want = mx.concatenate([_reference(x, *m, group) for m in mats], axis=1)
        error = _relative_error(got, want)
        worst = max(worst, error)
        if details is not None:
            w, scales, biases = mats[0]
            mlx = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=min(group, 128), bits=4) if group <= 128 else None
            details.append({
                "rows": x.shape[0], "K": x.shape[1], "N": [m[0].shape[0] for m in mats], "group": group,
                "launch": launch_shape(x.shape[0], x.shape[1], sum(m[0].shape[0] for m in mats), rows_per_subwarp(x.shape[0], "cuda")),
                "rows_per_subwarp": rows_per_subwarp(x.shape[0], "cuda"),
                "error": error,
                "mlx_quantized_matmul_error": None if mlx is None else _relative_error(mlx.astype(mx.float32), _reference(x, w, scales, biases, group)),
            })
    return worst


def _relative_error(got: mx.array, want: mx.array) -> float:
    scale = float(mx.max(mx.abs(want)).item()) or 1.0
    return float(mx.max(mx.abs(got - want)).item()) / scale


_TOLERANCE = {mx.float32: 1e-3, mx.float16: 4e-3, mx.bfloat16: 2e-2}  # float32: the reference matmul runs in TF32 on CUDA (3e-4 measured)
_checked: dict[tuple[str, mx.Dtype], bool] = {}
_enabled = os.environ.get(ENV_SWITCH, "1") != "0"


def set_fused_kernels(enabled: bool) -> bool:
    """Turn the fused kernels on or off for this process (benchmarks compare both);
    returns the previous setting. The default comes from ``MM_FUSED_KERNELS``."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def fused_int4_available(dtype: mx.Dtype) -> bool:
    """Whether the fused kernel serves ``dtype`` activations on the current device.

    False on the CPU, when switched off (``MM_FUSED_KERNELS=0``, :func:`set_fused_kernels`), or when the self-check (run once per
    backend and dtype) failed to compile or to agree with MLX.
    """
    if not _enabled or dtype not in FUSED_DTYPES:
        return False
    backend = gpu_kernel_backend()
    if backend is None:
        return False
    key = (backend, dtype)
    if key not in _checked:
        _checked[key] = _passes_self_check(backend, dtype)
        if not _checked[key] and ROWS_PER_SUBWARP > 1 and backend == "cuda":
            log.warning("retrying the fused int4 kernel with one row per sub-warp")
            _set_rows_per_subwarp(1)
            _checked[key] = _passes_self_check(backend, dtype)
    return _checked[key]


def _set_rows_per_subwarp(rows: int) -> None:
    global ROWS_PER_SUBWARP
    ROWS_PER_SUBWARP = rows


def _passes_self_check(backend: str, dtype: mx.Dtype) -> bool:
    try:
        error = self_check(dtype)
    except Exception as exc:  # compile failure on an untested toolchain: fall back, say why
        log.warning("fused int4 kernel (%s, %s, R=%d) unavailable: %s", backend, dtype, ROWS_PER_SUBWARP, exc)
        return False
    if error > _TOLERANCE[dtype]:
        log.warning("fused int4 kernel (%s, %s, R=%d) disagrees with the reference (rel. error %.2e)", backend, dtype, ROWS_PER_SUBWARP, error)
        return False
    return True
