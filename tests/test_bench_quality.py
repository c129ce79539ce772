"""bench/quality.py's scheduling and report: which jobs share the machine, and how that shows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PLANNED = [
    ("smol", "original", 16, 0, 32, 512),
    ("smol", "rtn", 4, 64, 32, 512),
    ("smol", "awq", 4, 64, 32, 512),
    ("smol", "awq", 4, 64, 128, 512),  # calibration table
    ("smol", "rtn", 3, 64, 32, 512),
    ("smol", "awq", 3, 64, 32, 512),
    ("gemma", "original", 16, 0, 32, 512),
    ("gemma", "awq", 4, 64, 32, 512),
    ("gemma", "awq", 2, 32, 32, 512),
]
CALIBRATION = [index == 3 for index in range(len(PLANNED))]


def test_timed_settings_originals_and_the_calibration_table_run_alone(quality):
    alone, together = quality.split_phases(PLANNED, CALIBRATION, {(4, 64)}, parallel=4)
    assert alone == [0, 1, 2, 3, 6, 7]
    assert together == [4, 5, 8]


def test_parallel_one_runs_everything_alone_in_plan_order(quality):
    alone, together = quality.split_phases(PLANNED, CALIBRATION, {(4, 64)}, parallel=1)
    assert alone == list(range(len(PLANNED))) and together == []


def test_warm_timing_reruns_only_the_main_table_at_timed_settings(quality):
    # the same jobs whether the run was parallel or not: no originals, no calibration-table rows
    assert quality.warm_timing_jobs(PLANNED, CALIBRATION, {(4, 64)}) == [1, 2, 7]
    assert quality.warm_timing_jobs(PLANNED, CALIBRATION, {(2, 32), (3, 64)}) == [4, 5, 8]


def _row(variant: str, bits: int, ppl: float, time_s: float | None = None, concurrent: int = 1, **extra) -> dict:
    row = {"model": "smol", "variant": variant, "bits": bits, "group_size": 64, "n_samples": 32, "seq_len": 512,
           "perplexity_wikipedia": ppl, "perplexity_kjv": ppl, "se_wikipedia": 0.1, "se_kjv": 0.1,
           "eval_tokens_wikipedia": 16352, "eval_tokens_kjv": 16352, "bits_per_weight": bits + 0.5,
           "concurrent": concurrent, **extra}
    if time_s is not None:
        row["time_s"] = time_s
    return row


def test_shared_times_are_marked_and_retried_rows_named(quality):
    report = {
        "calibration": "32 x 512 tokens", "skipped": [], "failed": [], "not_run": [], "calibration_sizes": [],
        "results": [
            _row("original", 16, 10.0),
            _row("rtn", 4, 20.0, 5.0),
            _row("awq", 4, 12.0, 6.0),
            _row("rtn", 3, 40.0, 7.0, concurrent=4),
            _row("mlx-lm-awq", 3, 30.0, 8.0, concurrent=4, retried_with={"MLX_USE_CUDA_GRAPHS": "0"},
                 first_error="RuntimeError: cuGraphAddKernelNode failed"),
        ],
    }
    text = quality.render_report(report)
    lines = {line.split(" | ")[0] + line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 6.0 |" in lines["| metal-marlin awq4"]  # gap closed (20-12)/(20-10) = 80%
    assert "| 80% | 80% |" in lines["| metal-marlin awq4"]
    assert "| 7.0\\* |" in lines["| round-to-nearest3"] and "| 8.0\\* |" in lines["| mlx-lm AWQ3"]
    assert "while 4 jobs shared the GPU" in text
    assert "failed once (RuntimeError: cuGraphAddKernelNode failed) and was rerun with MLX_USE_CUDA_GRAPHS=0" in text


def test_a_report_without_shared_jobs_has_no_footnote(quality):
    report = {"calibration": "32 x 512 tokens", "skipped": [], "failed": [], "not_run": [], "calibration_sizes": [],
              "results": [_row("original", 16, 10.0), _row("rtn", 4, 20.0, 5.0)]}
    text = quality.render_report(report)
    assert "shared the GPU" not in text and "\\*" not in text


def test_the_calibration_table_gives_time_against_mlx_lm_and_the_block_inputs(quality):
    rows = [
        _row("awq", 4, 12.0, 6.0, n_samples=8, seq_len=256, block_inputs_mb=4.5, captured_inputs_mb=25.5),
        _row("awq", 4, 11.0, 30.0, n_samples=128, seq_len=512, block_inputs_mb=144.0, captured_inputs_mb=816.0),
        _row("mlx-lm-awq", 4, 13.0, 20.0, n_samples=16, seq_len=512),
    ]
    lines = quality.render_calibration_table(rows)
    body = [line for line in lines if line.startswith("| metal") or line.startswith("| mlx")]
    assert body[0].startswith("| metal-marlin awq | 8 x 256 |") and body[0].endswith("| 6.0 | 0.30x | 4.5 | 26 |")
    assert body[1].endswith("| 30.0 | 1.50x | 144 | 816 |")
    assert body[2].startswith("| mlx-lm AWQ | 16 x 512 |") and body[2].endswith("| 20.0 | - | - | - |")


def test_a_job_that_failed_twice_names_both_errors(quality):
    report = {"calibration": "32 x 512 tokens", "skipped": [], "not_run": [], "calibration_sizes": [],
              "results": [_row("original", 16, 10.0)],
              "failed": [{"job": ["smol", "mlx-lm-awq", 4, 128, 32, 512], "error": "Traceback\nRuntimeError: second",
                          "first_error": "Traceback\nRuntimeError: first"}]}
    text = quality.render_report(report)
    assert ("Failed: smol mlx-lm-awq w4g128 32x512: RuntimeError: first; rerun without CUDA graphs and compiled steps: "
            "RuntimeError: second") in text


def test_calibration_memory_counts_the_block_input_and_its_linears_inputs(quality):
    from metal_marlin.checkpoints.loader import open_checkpoint

    smol = quality.calibration_memory_mb(open_checkpoint("smollm2-135m-instruct").config, 32, 512)
    assert smol["block_inputs_mb"] == 32 * 512 * 576 * 4 / 2**20 == 36.0
    # q/k/v and gate/up inputs (576 each), o_proj's 9 x 64, down_proj's 1536
    assert smol["captured_inputs_mb"] == 32 * 512 * (576 + 576 + 576 + 1536) * 4 / 2**20 == 204.0
    gemma = quality.calibration_memory_mb(open_checkpoint("gemma-3-270m").config, 128, 512)
    assert gemma["captured_inputs_mb"] == 128 * 512 * (640 + 640 + 4 * 256 + 2048) * 4 / 2**20 == 1088.0


def test_the_timing_table_compares_each_quantizer_with_mlx_lm_at_its_own_setting(quality):
    rows = [
        _row("original", 16, 10.0),
        _row("mlx-lm-awq", 4, 13.0, 12.0),
        _row("awq", 4, 12.0, 3.0),
        _row("awq+round", 4, 11.0, 60.0),
        _row("mlx-lm-awq", 3, 30.0, 20.0),
        _row("awq", 3, 25.0, 5.0),
    ]
    body = [line for line in quality.render_timing(rows) if line.startswith("| smol")]
    assert len(body) == 5  # the original has no time
    assert "| 3.0 | 0.25x |" in body[1] and "| 60.0 | 5.00x |" in body[2] and "| 5.0 | 0.25x |" in body[4]
    assert "| 12.0 | - |" in body[0]
