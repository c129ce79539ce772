"""Gemma 3 270M through ``awq_quantize_model`` at 4 bits, group 64, given the GGUF's path,
then the ``generate`` and ``eval`` commands on the output.

The run is plain round-to-nearest (``method="rtn"``, 14 s here against 45 s for the AWQ run
of test_gemma3_pipeline.py): the same pipeline stages, packing, folder and loader at group
64; the AWQ search itself is architecture-independent and runs at group 64 on SmolLM2 in
test_pipeline.py and on Gemma at group 128. A module of its own, so the test processes run
it beside the g128 one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import require_gemma3
from metal_marlin.assets import GEMMA3_MODEL_NAME, builtin_model_path
from metal_marlin.cli import main as cli_main
from metal_marlin.generate.cli import run_generate
from metal_marlin.pipeline import awq_quantize_model
from test_gemma3_pipeline import EIFFEL, check_loads_and_answers, check_output_folder


@pytest.fixture(scope="module")
def gemma_g64(tmp_path_factory) -> Path:
    require_gemma3()
    out = tmp_path_factory.mktemp("gemma") / "gemma-w4g64"
    gguf = builtin_model_path(GEMMA3_MODEL_NAME)
    stats = awq_quantize_model(gguf, out, group_size=64, salient_ratio=0.0, n_samples=2, seq_len=32, n_grid=2, verbose=False, method="rtn")
    assert stats["model_path"] == str(gguf)
    return out


def test_group_64_writes_a_complete_folder_that_answers(gemma_g64) -> None:
    check_output_folder(gemma_g64, 64, method="rtn")
    check_loads_and_answers(gemma_g64)


def test_generate_and_eval_run_the_quantized_gemma(gemma_g64, capsys) -> None:
    out = io.StringIO()  # run_generate's default stream is bound at import: pass one explicitly
    assert run_generate(model=str(gemma_g64), prompt=EIFFEL, chat=False, max_tokens=2, temperature=0.0, top_p=1.0, seed=None, out=out) == 0
    assert "Paris" in out.getvalue()
    assert cli_main(["eval", "--model", str(gemma_g64), "--window", "32", "--max-windows", "1", "--batch-size", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # 31 predicted tokens after the window's <bos> (the float model measures ~17 on 128-token windows)
    assert 1.0 < result["perplexity"] < 200.0 and result["n_predicted_tokens"] == 31
