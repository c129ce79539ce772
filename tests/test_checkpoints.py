"""Checkpoint reading/writing: GGUF (real and synthetic), HF folders, sharding, quantized."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin.checkpoints import hf as hf_module
from metal_marlin.checkpoints import load_model, read_hf_weights, save_hf_folder
from metal_marlin.models import QuantizedLinear
from reference_llama import reference_forward, rel_err

TOKENS = [3, 77, 12, 101, 5, 64, 9, 33, 120, 1]
# "The capital of France is Paris. It is known for the Eiffel Tower and" (SmolLM2 vocab)
PROMPT = [504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 1343, 327, 260, 414, 627, 299, 18669]
PARIS = 7042


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (per head, the two
    rotary halves interleaved), written here from its definition."""
    head_dim = w.shape[0] // n_head
    return (
        w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def model_logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens])))[0]


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# --- the real GGUF ----------------------------------------------------------------------

def test_builtin_gguf_config_and_metadata(smollm2):
    _, config, meta = smollm2
    assert config.num_hidden_layers == 30
    assert (config.hidden_size, config.intermediate_size) == (576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 100000.0
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert meta["format"] == "gguf" and meta["quantization"] is None
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["context_length"]) == (1, 2, 8192)
    assert "<|im_start|>" in meta["chat_template"]
    tok = meta["gguf_tokenizer"]
    assert tok["model"] == "gpt2" and len(tok["tokens"]) == 49152
    assert tok["tokens"][PARIS] == "ĠParis"
    assert "lm_head" not in smollm2.model
    w = smollm2.model.model.embed_tokens.weight
    assert w.shape == (49152, 576) and w.dtype == mx.float32


def test_wrong_qk_permutation_breaks_the_real_model(smollm2):
    """The un-permuted weights give a sensible model; llama.cpp's row order does not."""
    model, config, _ = smollm2
    cfg = config.to_hf_dict()
    ours = dict(tree_flatten(model.parameters()))
    raw = dict(ours)  # llama.cpp's layout, recovered by re-applying its permutation
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        raw[p + "q_proj.weight"] = llama_cpp_permute(np.array(ours[p + "q_proj.weight"]), 9)
        raw[p + "k_proj.weight"] = llama_cpp_permute(np.array(ours[p + "k_proj.weight"]), 3)

    def nll(weights) -> tuple[float, np.ndarray]:
        logits = reference_forward(cfg, weights, PROMPT)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return float(-np.mean(logp[np.arange(len(PROMPT) - 1), PROMPT[1:]])), logits

    good, good_logits = nll(ours)
    bad, bad_logits = nll(raw)
    # q.k is invariant to permuting q and k alike, so llama.cpp's order only breaks the
    # RoPE pairing: the logits change completely and the text becomes less likely
    # (measured: NLL 3.84 vs 4.45 nats/token, logits differ by ~99% of their scale).
    assert good_logits[4].argmax() == PARIS
    assert rel_err(bad_logits, good_logits) > 0.3
    assert bad > good + 0.3, (good, bad)


# --- synthetic GGUF files ---------------------------------------------------------------

_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_TO_GGUF[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[hf]


def write_gguf(path: Path, cfg: dict, weights: dict, *, arch: str = "llama",
               types: dict | None = None) -> None:
    """A llama.cpp-style GGUF: llama.* metadata, permuted q/k, optional per-tensor types."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    for name, value in weights.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, cfg["num_key_value_heads"])
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(gguf_name(name), value)
        elif isinstance(qtype, type):  # a numpy dtype, e.g. np.float16 / np.int32
            w.add_tensor(gguf_name(name), value.astype(qtype))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_synthetic_gguf_round_trip_recovers_hf_weights(tmp_path, make_tiny):
    cfg, weights = make_tiny(tie=False)
    q8 = gguf.GGMLQuantizationType.Q8_0
    types = {"model.embed_tokens.weight": q8, "model.layers.1.self_attn.v_proj.weight": np.float16}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, weights, types=types)
    model, config, meta = load_model(path)
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    assert meta["chat_template"] == "{{ messages }}" and meta["eos_token_ids"] == [2]
    loaded = params(model)
    assert set(loaded) == set(weights)
    expected = dict(weights)
    expected["model.embed_tokens.weight"] = gguf.quants.dequantize(
        gguf.quants.quantize(weights["model.embed_tokens.weight"], q8), q8)
    expected["model.layers.1.self_attn.v_proj.weight"] = (
        weights["model.layers.1.self_attn.v_proj.weight"].astype(np.float16).astype(np.float32))
    for name, value in expected.items():  # q/k included: un-permuted exactly
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert rel_err(model_logits(model, TOKENS), reference_forward(cfg, expected, TOKENS)) < 1e-5


def test_gguf_unsupported_architecture_raises_naming_it(tmp_path, make_tiny):
    cfg, weights = make_tiny()
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, cfg, weights, arch="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        load_model(path)


def test_gguf_unsupported_tensor_type_raises_naming_it(tmp_path, make_tiny):
    cfg, weights = make_tiny()
    path = tmp_path / "int.gguf"
    write_gguf(path, cfg, weights, types={"model.layers.0.mlp.up_proj.weight": np.int32})
    with pytest.raises(ValueError, match="I32"):
        load_model(path)


# --- Hugging Face folders ---------------------------------------------------------------

@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("qwen2", True),
                                            ("qwen3", False)])
def test_hf_folder_round_trip_matches_reference(tmp_path, make_tiny, model_type, tie):
    cfg, weights = make_tiny(model_type, tie=tie, eos_token_id=[2, 5], bos_token_id=1)
    extra = {"tokenizer_config.json": json.dumps({"chat_template": "T"})}
    folder = save_hf_folder(tmp_path / "m", weights, cfg, extra_files=extra)
    model, config, meta = load_model(folder)
    assert (meta["format"], meta["quantization"], meta["chat_template"]) == ("hf", None, "T")
    assert meta["eos_token_ids"] == [2, 5] and meta["bos_token_id"] == 1
    assert config.model_type == model_type
    loaded = params(model)
    assert set(loaded) == set(weights)
    if model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in loaded
    assert rel_err(model_logits(model, TOKENS), reference_forward(cfg, weights, TOKENS)) < 1e-5


def write_hf_shards(folder: Path, cfg: dict, tensors: dict) -> None:
    """Two shards plus an index, as Hugging Face writes large models."""
    folder.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        mx.save_safetensors(str(folder / file), {k: mx.array(tensors[k]) for k in keys})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))


def test_sharded_safetensors_with_index(tmp_path, make_tiny):
    cfg, weights = make_tiny(tie=False)
    folder = tmp_path / "sharded"
    write_hf_shards(folder, cfg, weights)
    model, _, _ = load_model(folder)
    assert rel_err(model_logits(model, TOKENS), reference_forward(cfg, weights, TOKENS)) < 1e-5
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        load_model(folder)


def test_bfloat16_folder_loads_as_float32(tmp_path, make_tiny):
    cfg, weights = make_tiny()
    bf16 = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}
    model, _, _ = load_model(save_hf_folder(tmp_path / "bf16", bf16, cfg))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    rounded = {k: np.array(v.astype(mx.float32)) for k, v in bf16.items()}
    assert rel_err(model_logits(model, TOKENS), reference_forward(cfg, rounded, TOKENS)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(mx.float16, 5e-3), (mx.bfloat16, 2e-2)])
def test_half_precision_load_keeps_float32_logits(tmp_path, make_tiny, dtype, tol):
    cfg, weights = make_tiny()
    model, _, _ = load_model(save_hf_folder(tmp_path / "m", weights, cfg), dtype=dtype)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    logits = model(mx.array([TOKENS]))
    assert logits.dtype == mx.float32
    assert rel_err(np.array(logits)[0], reference_forward(cfg, weights, TOKENS)) < tol


def test_missing_tensor_and_unsupported_architecture_raise(tmp_path, make_tiny):
    cfg, weights = make_tiny()
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="down_proj"):
        load_model(save_hf_folder(tmp_path / "missing", weights, cfg))
    cfg, weights = make_tiny(model_type="phi3")
    with pytest.raises(ValueError, match="phi3"):
        load_model(save_hf_folder(tmp_path / "phi3", weights, cfg))
    cfg, weights = make_tiny(quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="gptq"):
        load_model(save_hf_folder(tmp_path / "gptq", weights, cfg))


def test_save_is_atomic_and_overwrites_in_place(tmp_path, make_tiny, monkeypatch):
    cfg, weights = make_tiny()
    dest = tmp_path / "out"
    save_hf_folder(dest, weights, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((dest / "config.json").read_text()) == cfg
    # rewriting an existing folder replaces files and leaves no temp names
    _, new_weights = make_tiny(seed=1)
    save_hf_folder(dest, new_weights, cfg)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(
        np.array(read_hf_weights(dest)["model.norm.weight"]), new_weights["model.norm.weight"])
    # a failure while writing a new folder leaves nothing behind
    def broken(path, obj):
        raise OSError("disk full")
    monkeypatch.setattr(hf_module, "_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(tmp_path / "never", weights, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- quantized (MLX layout) folders -----------------------------------------------------

def quantized_checkpoint(make_tiny, group: int, bits: int, salient: bool, embed: bool = False):
    """Tiny model with every block linear (and optionally the tied embedding) quantized by
    mx.quantize, norms float, plus optionally a salient side matrix on one layer.
    Returns (cfg, stored tensors, effective float weights)."""
    cfg, weights = make_tiny(tie=True, intermediate_size=128)
    stored, effective = {}, {}
    for name, w in weights.items():
        if (name.startswith("model.layers.") and name.endswith("proj.weight")) or (
            embed and name == "model.embed_tokens.weight"
        ):
            prefix = name[: -len(".weight")]
            q, s, b = mx.quantize(mx.array(w), group_size=group, bits=bits)
            stored.update({name: q, prefix + ".scales": s, prefix + ".biases": b})
            effective[name] = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits))
        else:
            stored[name] = mx.array(w)
            effective[name] = w
    if salient:
        p = "model.layers.0.mlp.down_proj"
        idx = np.array([1, 30, 31, 90], dtype=np.int32)
        ws = np.random.default_rng(7).standard_normal((64, 4)).astype(np.float16)
        stored[p + ".salient_indices"], stored[p + ".salient_weight"] = mx.array(idx), mx.array(ws)
        effective[p + ".weight"] = effective[p + ".weight"].copy()
        effective[p + ".weight"][:, idx] += ws.astype(np.float32)
    cfg["quantization"] = {"group_size": group, "bits": bits}
    return cfg, stored, effective


def test_quantized_folder_with_salient_matches_reference(tmp_path, make_tiny):
    cfg, stored, effective = quantized_checkpoint(make_tiny, 32, 4, salient=True)
    model, _, meta = load_model(save_hf_folder(tmp_path / "q", stored, cfg))
    assert meta["quantization"] == {"group_size": 32, "bits": 4} and meta["salient_layers"] == 1
    layer0 = model.model.layers[0]
    assert isinstance(layer0.self_attn.q_proj, QuantizedLinear)
    assert "salient_weight" in layer0.mlp.down_proj and "salient_weight" not in layer0.mlp.up_proj
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert set(params(model)) == set(stored)  # saved names round trip
    ref = reference_forward(cfg, effective, TOKENS)
    assert rel_err(model_logits(model, TOKENS), ref) < 1e-5
    # the salient tensors are really used
    plain = dict(effective)
    plain["model.layers.0.mlp.down_proj.weight"] = np.array(mx.dequantize(
        *(stored["model.layers.0.mlp.down_proj" + s] for s in (".weight", ".scales", ".biases")),
        group_size=32, bits=4))
    assert rel_err(reference_forward(cfg, plain, TOKENS), ref) > 1e-3


def test_quantized_folder_opens_identically_in_mlx_lm(tmp_path, make_tiny):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    cfg, stored, effective = quantized_checkpoint(make_tiny, 64, 4, salient=False, embed=True)
    folder = save_hf_folder(tmp_path / "q", stored, cfg)
    ours, _, _ = load_model(folder)
    assert isinstance(ours.model.embed_tokens, nn.QuantizedEmbedding)
    assert rel_err(model_logits(ours, TOKENS), reference_forward(cfg, effective, TOKENS)) < 1e-5
    theirs, _ = mlx_lm_load_model(folder)
    np.testing.assert_allclose(model_logits(ours, TOKENS), np.array(theirs(mx.array([TOKENS])))[0],
                               rtol=0, atol=1e-4)


def test_quantized_shape_mismatch_with_config_raises(tmp_path, make_tiny):
    cfg, stored, _ = quantized_checkpoint(make_tiny, 32, 4, salient=False)
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    with pytest.raises(ValueError, match="group_size"):
        load_model(save_hf_folder(tmp_path / "q", stored, cfg))


# --- lazy checkpoints: one tensor at a time -----------------------------------------------

def test_lazy_gguf_returns_exactly_what_read_gguf_returns():
    from metal_marlin.assets import builtin_model_path
    from metal_marlin.checkpoints import GGUFCheckpoint, read_gguf

    config, weights, metadata = read_gguf(builtin_model_path())
    lazy = GGUFCheckpoint(builtin_model_path())
    assert lazy.config == config and lazy.metadata == metadata
    assert lazy.names == list(weights) and len(weights) == 272
    for name in reversed(lazy.names):  # any order, each read on its own
        value = lazy.tensor(name)
        assert value.dtype == weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    # dequantized a few rows at a time, the values are gguf's whole-tensor ones
    raw = {t.name: t for t in gguf.GGUFReader(builtin_model_path()).tensors}
    for gguf_tensor, name in (("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
                              ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight")):  # Q4_1
        whole = gguf.quants.dequantize(raw[gguf_tensor].data, raw[gguf_tensor].tensor_type)
        np.testing.assert_array_equal(weights[name], whole, err_msg=name)


def test_lazy_hf_folder_matches_read_hf_weights_bfloat16_included(tmp_path, make_tiny):
    from metal_marlin.checkpoints import SafetensorsFolder

    cfg, weights = make_tiny(tie=False)
    tensors = {k: mx.array(v) for k, v in weights.items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(mx.bfloat16)
    tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"].astype(mx.float16)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.arange(8, dtype=mx.float32)  # sanitize drops it
    write_hf_shards(tmp_path / "m", cfg, tensors)
    eager = read_hf_weights(tmp_path / "m")
    lazy = SafetensorsFolder(tmp_path / "m")
    assert lazy.names == list(eager) and set(eager) == set(tensors)
    for name in lazy.names:
        for _ in range(2):  # asking again gives a fresh array with the same contents
            value = lazy.tensor(name)
            assert value.dtype == eager[name].dtype == tensors[name].dtype, name
            assert mx.array_equal(value, eager[name]).item(), name
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        SafetensorsFolder(tmp_path / "m")


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_lazily_built_model_loads_block_by_block_to_the_eager_model(tmp_path, make_tiny, kind):
    from metal_marlin.checkpoints import build_model_lazily, open_checkpoint

    cfg, weights = make_tiny(tie=kind == "gguf")
    if kind == "hf":  # bfloat16 and an unused HF tensor, both handled like build_model does
        bf16 = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}
        bf16["model.layers.1.self_attn.rotary_emb.inv_freq"] = mx.arange(8, dtype=mx.float32)
        path = save_hf_folder(tmp_path / "m", bf16, cfg)
    else:
        path = tmp_path / "m.gguf"
        write_gguf(path, cfg, weights)
    eager = load_model(path)
    checkpoint = open_checkpoint(path)
    assert checkpoint.config == eager.config and checkpoint.metadata == eager.metadata
    model, load_block = build_model_lazily(checkpoint)
    outside = params(model)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_array_equal(outside[name], params(eager.model)[name])
    for i in range(cfg["num_hidden_layers"]):
        load_block(i)
    lazy = params(model)
    assert set(lazy) == set(params(eager.model))
    for name, value in params(eager.model).items():
        assert lazy[name].dtype == value.dtype == np.float32, name
        np.testing.assert_array_equal(lazy[name], value, err_msg=name)


def test_lazily_built_model_allocates_only_what_is_loaded():
    """Constructor arrays are lazy: an unloaded block costs nothing until ``load_block``."""
    import gc

    from metal_marlin.checkpoints import LazyCheckpoint, build_model_lazily
    from metal_marlin.models.llama import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=256,
                         tie_word_embeddings=True)
    shapes = {k: v.shape for k, v in tree_flatten(LlamaModel(config).parameters())}

    class Zeros:  # a checkpoint source that makes each tensor when asked
        names = list(shapes)

        def tensor(self, name):
            return np.zeros(shapes[name], np.float32)

    block_bytes = 4 * sum(np.prod(s) for k, s in shapes.items() if k.startswith("model.layers.0."))
    assert block_bytes > 12e6  # 3.1M parameters: six blocks would be 75 MB
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    model, load_block = build_model_lazily(LazyCheckpoint(config, {}, Zeros()))
    assert mx.get_active_memory() - before < 1e6  # the 0.5 MB embedding and the norm
    load_block(0)
    grown = mx.get_active_memory() - before
    assert block_bytes <= grown < block_bytes + 1e6
    del model, load_block


def test_open_checkpoint_refuses_quantized_folders(tmp_path, make_tiny):
    from metal_marlin.checkpoints import open_checkpoint

    cfg, stored, _ = quantized_checkpoint(make_tiny, 32, 4, salient=False)
    with pytest.raises(ValueError, match="already quantized"):
        open_checkpoint(save_hf_folder(tmp_path / "q", stored, cfg))
