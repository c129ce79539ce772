"""Time ``awq_quantize`` on one 4096x4096 matrix with 2048 calibration tokens.

Compares the numpy and MLX compute backends (alternated, median of ``--repeats``) and
reports the output error of AWQ against plain round-to-nearest (RTN) on the same inputs,
with and without salient channels. Run: ``python bench/awq_matrix.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from metal_marlin import awq_quantize
from metal_marlin.quant import QuantSpec, fake_quantize

from _machine import describe_machine


def outlier_problem(size: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed weights/activations with 1% of input channels 20-100x larger (as in LLMs)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(size, size)) * 0.02).astype(np.float32)
    x = rng.standard_t(5, size=(tokens, size)).astype(np.float32)
    channels = rng.choice(size, size=size // 100, replace=False)
    x[:, channels] *= rng.uniform(20, 100, size=len(channels)).astype(np.float32)
    return w, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    w, x = outlier_problem(args.size, args.tokens)
    print(f"machine: {describe_machine()}")
    print(f"matrix {args.size}x{args.size}, {args.tokens} tokens, 4 bits, group {args.group_size}")

    start = time.perf_counter()
    w_rtn = fake_quantize(np.ascontiguousarray(w.T), QuantSpec(4, args.group_size)).T
    rtn_time = time.perf_counter() - start
    rtn_error = float(np.mean((x @ (w_rtn - w)) ** 2))
    print(f"round-to-nearest: {rtn_time:.2f} s, output MSE {rtn_error:.4g}")

    times: dict[str, list[float]] = {"numpy": [], "mlx": []}
    results = {}
    for _ in range(args.repeats):
        for backend in ("numpy", "mlx"):  # alternate so drift hits both alike
            start = time.perf_counter()
            results[backend] = awq_quantize(w, x, group_size=args.group_size, salient_ratio=0.0, compute_backend=backend)
            times[backend].append(time.perf_counter() - start)
    for backend, result in results.items():
        print(
            f"awq_quantize[{backend}] salient 0: median {statistics.median(times[backend]):.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in times[backend])}), alpha {result.alpha:.2f}, "
            f"output MSE {result.output_error:.4g} = {result.output_error / rtn_error:.3f} x RTN"
        )
    salient = awq_quantize(w, x, group_size=args.group_size, salient_ratio=0.01, compute_backend="numpy")
    print(
        f"awq_quantize[numpy] salient 0.01: output MSE {salient.output_error:.4g} = "
        f"{salient.output_error / rtn_error:.3f} x RTN, {salient.bits_per_weight:.3f} bits/weight"
    )


if __name__ == "__main__":
    main()
