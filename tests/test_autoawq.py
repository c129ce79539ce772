"""AutoAWQ GEMM interop: nibble order, exact round trips, mlx-lm reads our export, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import metal_marlin  # noqa: F401  (first: gives MLX a fast BLAS, see metal_marlin._blas)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin.checkpoints import load_model, read_hf_weights, save_hf_folder
from metal_marlin.checkpoints.autoawq import (
    awq_linear_to_native,
    export_autoawq,
    import_autoawq,
    native_linear_to_awq,
    pack_awq,
    unpack_awq,
)
from metal_marlin.cli import main as cli_main
from metal_marlin.generate import SamplingParams
from metal_marlin.generate.engine import Engine
from metal_marlin.quant import QuantSpec, quantize_tensor, to_mlx_scales_biases

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
TOKENS = [3, 77, 12, 101, 5, 64, 9, 33, 120, 1]


def same_tensors(a: dict, b: dict) -> None:
    """Equal names, dtypes, shapes and bytes (so -0.0 vs 0.0 or a flipped bit fails)."""
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = np.array(a[name]), np.array(b[name])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


# ---------------------------------------------------------------- packing


def test_pack_uses_autoawq_nibble_order() -> None:
    # Column c holds c + 1. AutoAWQ puts columns 0,2,4,6,1,3,5,7 into nibbles 0..7, so the
    # word read from its high nibble down is 8,6,4,2,7,5,3,1 (sequential order would give
    # 0x87654321, MLX's order the same).
    values = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0]], dtype=np.uint8)
    packed = pack_awq(values)
    assert packed.dtype == np.int32 and packed.shape == (2, 1)
    assert packed.view(np.uint32)[:, 0].tolist() == [0x86427531, 0x0000000F]
    assert np.array_equal(unpack_awq(np.array([[0x86427531 - (1 << 32)]], dtype=np.int32)), values[:1])

    rng = np.random.default_rng(0)
    many = rng.integers(0, 16, size=(5, 64), dtype=np.uint8)
    assert np.array_equal(unpack_awq(pack_awq(many)), many)
    with pytest.raises(ValueError, match="columns"):
        pack_awq(many[:, :12])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_awq(many.astype(np.int32) + 1)


def awq_reference_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """AutoAWQ's documented GEMM meaning, element by element: ``[in, out]`` float32."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    words, zwords = qweight.view(np.uint32), qzeros.view(np.uint32)
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    group = n_in // scales.shape[0]
    out = np.zeros((n_in, n_out), np.float32)
    for i in range(n_in):
        for o in range(n_out):
            k = order.index(o % 8)
            q = (int(words[i, o // 8]) >> (4 * k)) & 15
            z = (int(zwords[i // group, o // 8]) >> (4 * k)) & 15
            out[i, o] = np.float32(q - z) * np.float32(scales[i // group, o])
    return out


def test_one_layer_means_the_same_and_round_trips_exactly() -> None:
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    qt = quantize_tensor(w, QuantSpec(bits=4, group_size=32))
    scales, biases = to_mlx_scales_biases(qt.scales, qt.zeros.astype(np.float32))
    awq = native_linear_to_awq(qt.packed, scales, biases)
    assert awq["qweight"].shape == (64, 2) and awq["qzeros"].shape == (2, 2)
    assert awq["scales"].shape == (2, 16) and awq["scales"].dtype == np.float16
    expected = qt.dequantize()  # [out, in]
    np.testing.assert_array_equal(awq_reference_dequantize(awq["qweight"], awq["qzeros"], awq["scales"]).T, expected)
    back = awq_linear_to_native(awq["qweight"], awq["qzeros"], awq["scales"])
    same_tensors(back, {"weight": qt.packed, "scales": scales, "biases": biases})


# ---------------------------------------------------------------- tiny checkpoints


def tiny_native(make_tiny, bits: int = 4, salient: bool = False, model_type: str = "qwen2"):
    """A tiny native folder's (config, tensors), quantized with our quantizer (group 32):
    every block linear but layer 1's gate_proj and, untied, lm_head too; q/k/v biases."""
    cfg, weights = make_tiny(model_type, tie=False)
    stored = {}
    for name, w in weights.items():
        prefix = name[: -len(".weight")]
        quantize = name.endswith("proj.weight") or name == "lm_head.weight"
        if quantize and prefix != "model.layers.1.mlp.gate_proj":
            qt = quantize_tensor(w, QuantSpec(bits=bits, group_size=32))
            scales, biases = to_mlx_scales_biases(qt.scales, qt.zeros.astype(np.float32))
            stored.update({name: qt.packed, f"{prefix}.scales": scales, f"{prefix}.biases": biases})
        else:
            stored[name] = w.astype(np.float16)
    cfg["quantization"] = {"group_size": 32, "bits": bits}
    cfg["metal_marlin"] = {"salient_channels": salient, "salient_ratio": 0.01 if salient else 0.0}
    if salient:
        p = "model.layers.0.mlp.down_proj"
        stored[p + ".salient_indices"] = np.array([3, 40], dtype=np.int32)
        stored[p + ".salient_weight"] = np.ones((64, 2), np.float16)
    return cfg, stored


TOKENIZER_FILES = {"tokenizer.json": '{"fake": true}', "generation_config.json": '{"eos_token_id": 2}'}


def test_tiny_model_round_trip_layout_and_logits(tmp_path: Path, make_tiny) -> None:
    cfg, stored = tiny_native(make_tiny)
    native = save_hf_folder(tmp_path / "native", stored, cfg, extra_files=TOKENIZER_FILES)
    awq = export_autoawq(native, tmp_path / "awq")
    config = json.loads((awq / "config.json").read_text())
    assert "quantization" not in config
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["model.layers.1.mlp.gate_proj"],
    }
    assert {p.name for p in awq.iterdir()} == {"config.json", "model.safetensors", *TOKENIZER_FILES}
    assert (awq / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]
    tensors = read_hf_weights(awq)
    q = "model.layers.0.self_attn.q_proj"
    assert (tensors[q + ".qweight"].dtype, tensors[q + ".qweight"].shape) == (mx.int32, (64, 8))
    assert (tensors[q + ".qzeros"].dtype, tensors[q + ".qzeros"].shape) == (mx.int32, (2, 8))
    assert (tensors[q + ".scales"].dtype, tensors[q + ".scales"].shape) == (mx.float16, (2, 64))
    assert tensors[q + ".bias"].dtype == mx.float16 and q + ".weight" not in tensors
    assert tensors["model.layers.1.mlp.gate_proj.weight"].dtype == mx.float16
    # AutoAWQ keeps lm_head in float16: ours is dequantized on export
    head = tensors["lm_head.weight"]
    assert head.dtype == mx.float16 and head.shape == (128, 64)
    np.testing.assert_allclose(np.array(head, np.float32), np.array(mx.dequantize(
        *(mx.array(stored["lm_head" + s]) for s in (".weight", ".scales", ".biases")), group_size=32, bits=4)),
        rtol=1e-3, atol=1e-3)

    back = read_hf_weights(import_autoawq(awq, tmp_path / "back"))
    expected = {k: v for k, v in stored.items() if not k.startswith("lm_head.")}
    same_tensors({k: v for k, v in back.items() if k != "lm_head.weight"}, expected)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4}

    ours, _, meta = load_model(native)
    theirs, _, awq_meta = load_model(awq)  # converted in memory
    assert awq_meta["quantization"] == meta["quantization"] == {"group_size": 32, "bits": 4}
    a, b = np.array(ours(mx.array([TOKENS]))), np.array(theirs(mx.array([TOKENS])))
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-3 * np.abs(a).max())


def test_refusals_name_the_problem(tmp_path: Path, make_tiny) -> None:
    def folder(name: str, **kwargs) -> Path:
        cfg, stored = tiny_native(make_tiny, **kwargs)
        return save_hf_folder(tmp_path / name, stored, cfg)

    with pytest.raises(ValueError, match="salient channels .*salient_ratio=0.01.*--salient-ratio 0"):
        export_autoawq(folder("salient", salient=True), tmp_path / "o1")
    with pytest.raises(ValueError, match="4-bit only; this model is quantized to 3 bits"):
        export_autoawq(folder("three", bits=3), tmp_path / "o2")
    # mx.quantize's biases are float minimums, not -scale * integer zero
    cfg, weights = make_tiny()
    stored = {}
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            q, s, b = mx.quantize(mx.array(w), group_size=32, bits=4)
            stored.update({name: q, name.replace(".weight", ".scales"): s, name.replace(".weight", ".biases"): b})
        else:
            stored[name] = w
    mlx_folder = save_hf_folder(tmp_path / "mlx", stored, {**cfg, "quantization": {"group_size": 32, "bits": 4}})
    with pytest.raises(ValueError, match="not -scale \\* integer zero point"):
        export_autoawq(mlx_folder, tmp_path / "o3")
    float_folder = save_hf_folder(tmp_path / "float", weights, cfg)
    with pytest.raises(ValueError, match="not a quantized MLX-layout model"):
        export_autoawq(float_folder, tmp_path / "o4")
    with pytest.raises(ValueError, match="not an AutoAWQ checkpoint"):
        import_autoawq(float_folder, tmp_path / "o5")
    awq = export_autoawq(folder("plain"), tmp_path / "awq")
    with pytest.raises(ValueError, match="already an AutoAWQ checkpoint"):
        export_autoawq(awq, tmp_path / "o6")
    with pytest.raises(ValueError, match="already exists"):
        import_autoawq(awq, float_folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_autoawq(tmp_path / "missing", tmp_path / "o7")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]  # nothing half-written
    # the loader refuses AutoAWQ layouts other than GEMM
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GEMM only"):
        load_model(awq)


def test_cli_export_errors_are_one_line(tmp_path: Path, make_tiny, capsys) -> None:
    cfg, stored = tiny_native(make_tiny, salient=True)
    salient = save_hf_folder(tmp_path / "salient", stored, cfg)
    cfg, stored = tiny_native(make_tiny, bits=3)
    three = save_hf_folder(tmp_path / "three", stored, cfg)
    cases = [(tmp_path / "missing", "autoawq", "does not exist"), (salient, "autoawq", "salient channels"),
             (three, "autoawq", "4-bit only"), (three, "native", "not an AutoAWQ checkpoint")]
    for model, fmt, message in cases:
        assert cli_main(["export", "--model", str(model), "--output", str(tmp_path / "out"), "--format", fmt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("metal-marlin: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def awq_dir(quantized_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("awq") / "smollm2-awq"
    assert cli_main(["export", "--model", str(quantized_dir), "--output", str(out), "--format", "autoawq"]) == 0
    return out


def test_smollm2_round_trip_is_bit_exact(quantized_dir: Path, awq_dir: Path, tmp_path: Path) -> None:
    tensors = read_hf_weights(awq_dir)
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[q + ".qweight"].shape == (576, 72) and tensors[q + ".qweight"].dtype == mx.int32
    assert tensors[q + ".qzeros"].shape == (9, 72) and tensors[q + ".scales"].shape == (9, 576)
    assert tensors["model.embed_tokens.weight"].dtype == mx.float16 and "lm_head.weight" not in tensors
    assert sum(k.endswith(".qweight") for k in tensors) == 30 * 7
    config = json.loads((awq_dir / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 64 and config["quantization_config"]["modules_to_not_convert"] == []
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in awq_dir.iterdir()}

    back = tmp_path / "native"
    assert cli_main(["export", "--model", str(awq_dir), "--output", str(back), "--format", "native"]) == 0
    same_tensors(read_hf_weights(back), read_hf_weights(quantized_dir))
    original = json.loads((quantized_dir / "config.json").read_text())
    restored = json.loads((back / "config.json").read_text())
    for key in ("quantization", "quantization_config", "metal_marlin", "num_hidden_layers"):
        assert restored[key] == original[key], key


@pytest.fixture(scope="module")
def native_greedy(quantized_dir: Path) -> tuple[Engine, dict[str, list[int]]]:
    """Our engine on the native folder, and its greedy 16 tokens per prompt."""
    engine = Engine.load(quantized_dir)
    params = SamplingParams(max_tokens=16, **GREEDY)
    return engine, {text: engine.generate(text, params).token_ids for text in PROMPTS}


def test_mlx_lm_reads_our_export_like_our_native_model(quantized_dir: Path, awq_dir: Path, native_greedy) -> None:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    theirs, their_tokenizer = mlx_lm.load(str(awq_dir))  # mlx-lm's own AutoAWQ reader
    reference, _ = mlx_lm.load(str(quantized_dir))
    same_tensors(dict(tree_flatten(theirs.parameters())), dict(tree_flatten(reference.parameters())))
    del reference
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the stored float16; compare like with like
    engine, expected = native_greedy
    for text in PROMPTS:
        prompt = engine.encode(text)
        got = [r.token for r in mlx_lm.stream_generate(theirs, their_tokenizer, prompt, max_tokens=16, sampler=make_sampler(temp=0.0))]
        assert got == expected[text], text


def test_imported_autoawq_generates_like_native(awq_dir: Path, native_greedy) -> None:
    native, expected = native_greedy
    imported = Engine.load(awq_dir)
    assert imported.metadata["quantization"] == native.metadata["quantization"] == {"group_size": 64, "bits": 4}
    same_tensors(dict(tree_flatten(imported.model.parameters())), dict(tree_flatten(native.model.parameters())))
    params = SamplingParams(max_tokens=16, **GREEDY)
    for text in PROMPTS:
        assert imported.generate(text, params).token_ids == expected[text], text
