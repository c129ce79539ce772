"""bench/gpu.py's pure helpers, and that its random int4 Llama is the same model in ours and mlx-lm."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fig(ours: float, theirs: float, key: str) -> dict:
    return {
        "ours": {"warmup_s": 30.0, "runs": [{key: ours, "peak_mb": 10.0}], "median": {key: ours}},
        "mlx_lm": {"warmup_s": 20.0, "runs": [{key: theirs, "peak_mb": 12.0}], "median": {key: theirs}},
    }


def test_summary_names_the_headline_numbers(gpu):
    llama = {
        "prompt": _fig(1000.0, 900.0, "prompt_tok_s"),
        "ttft": _fig(0.1, 0.2, "ttft_s"),
        "decode_b1": _fig(200.0, 180.0, "decode_tok_s"),
        "aggregate": {"128": {"what": "x", **_fig(5000.0, 4000.0, "decode_tok_s")}, "8": {"skipped": "budget"}},
        "weights": {"total_bytes": 4e9},
    }
    report = {"bandwidth": {"gb_s": 4000.0}, "sections": {"llama8b": llama}}
    llama["bound"] = gpu.bandwidth_bound(report["bandwidth"], llama)
    report["sections"]["awq"] = {"runs": {"ours": {"time_s": 60.0, "perplexity_wikipedia": 15.0},
                                          "mlx_lm": {"time_s": 90.0}}}
    report["sections"]["ppl"] = {"default_device": {"perplexity": 15.0}, "cpu": {"perplexity": 15.0}, "rel_diff": 0.0}
    report["sections"]["serve"] = {"gateway": {"16": {"gateway_cost_pct": 5.0}}}
    summary = gpu.summarize(report)
    assert summary["llama8b.decode_b1.ours_tok_s"] == 200.0
    assert summary["llama8b.decode_b1.mlx_lm_tok_s"] == 180.0
    assert summary["llama8b.bound_tok_s"] == pytest.approx(1000.0)
    assert summary["llama8b.decode_b1.ours_fraction_of_bound"] == pytest.approx(0.2)
    assert summary["llama8b.aggregate.128.ours_tok_s"] == 5000.0
    assert "llama8b.aggregate.8.ours_tok_s" not in summary  # skipped figures are left out
    assert summary["llama8b.peak_memory_mb"] == 12.0
    assert summary["llama8b.max_warmup_s.ours"] == 30.0
    assert summary["awq.ours_s"] == 60.0 and summary["awq.mlx_lm_s"] == 90.0
    assert summary["ppl.gpu"] == summary["ppl.cpu"] == 15.0 and summary["ppl.rel_diff"] == 0.0
    assert summary["serve.gateway_cost_pct.16"] == 5.0


def test_alternate_flips_the_order_and_reports_medians(gpu):
    calls: list[str] = []

    def make(name: str, value: float):
        def fn():
            calls.append(name)
            return {"x": value}
        return fn

    out = gpu.alternate({"a": make("a", 1.0), "b": make("b", 2.0)}, 3, gpu.Budget(None, 0.0), memory=False)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # two warm-ups, then a b / b a / a b
    assert out["a"]["median"]["x"] == 1.0 and len(out["b"]["runs"]) == 3


def test_report_is_strict_json(gpu, tmp_path):
    report = gpu.Report(tmp_path / "r.json", {"machine": {}, "bandwidth": {"gb_s": math.nan}, "sections": {}})
    report.save()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["bandwidth"]["gb_s"] is None and "summary" in data


def test_relative_argv_keeps_no_absolute_path(gpu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["bench/gpu.py", "--out", str(tmp_path / "a" / "r.json"), "--workdir=/elsewhere/w", "--smoke"]
    assert gpu.relative_argv(argv) == ["bench/gpu.py", "--out", "a/r.json", "--workdir=<abs>/w", "--smoke"]


def test_random_int4_llama_is_the_same_model_in_mlx_lm(gpu):
    from mlx.utils import tree_flatten

    config = gpu.llama_config("tiny")
    ours = gpu.random_quantized_llama(config)
    theirs = gpu.mlx_lm_llama(config, dict(tree_flatten(ours.parameters())))
    check = gpu.logits_diff(ours, theirs, list(range(1, 9)))
    assert check["finite"] and check["max_abs_diff"] < 1e-2 and check["argmax_agree"] == 1.0
    sizes = gpu.decode_weight_bytes(ours)
    assert sizes["embedding_row_bytes"] == (256 * 4 // 8) + 2 * (256 // 64) * 2  # codes + fp16 scale, bias


def test_merging_reports_keeps_measured_sections_over_later_skips():
    """Reports from several device commands: a later command that skipped a section does not
    erase an earlier measurement, a later measurement replaces an earlier one and its error."""
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    results = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(results)
        first = {"machine": {"command": "a"}, "sections": {"smollm": {"section_s": 1.0}, "awq": {"skipped": "budget"},
                                                          "serve": {"levels": {}}},
                 "errors": {"serve": "NameError: x"}}
        second = {"machine": {"command": "b"}, "sections": {"smollm": {"skipped": "budget"}, "awq": {"runs": {}},
                                                           "serve": {"levels": {"1": {}}}}, "errors": {}}
        merged = results.merge_gpu([first, second])
    finally:
        sys.path.remove(str(BENCH))
    assert merged["sections"]["smollm"] == {"section_s": 1.0}
    assert merged["sections"]["awq"] == {"runs": {}}
    assert merged["sections"]["serve"] == {"levels": {"1": {}}}
    assert merged["errors"] == {}
    assert merged["commands"] == ["a", "b"]
