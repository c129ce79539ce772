"""Gemma 3's SentencePiece-BPE tokenizer rebuilt from its GGUF metadata, its chat template
and end-of-turn token, and the SentencePiece path on a synthetic vocabulary."""

from __future__ import annotations

import json
import re

import pytest

from metal_marlin.assets import GEMMA3_MODEL_NAME, builtin_model_path, wikipedia_summaries_path
from metal_marlin.generate.chat import GEMMA_TEMPLATE, apply_chat_template, encode_chat
from metal_marlin.tokenizer import Tokenizer, read_gguf_metadata, spm_merges

FRANCE = "The capital of France is Paris."
# Ids of FRANCE in the Gemma 3 vocabulary: the GGUF's own pieces (``▁The`` is not one, the
# text has no leading space), checked against SentencePiece itself below.
FRANCE_IDS = [818, 5279, 529, 7001, 563, 9079, 236761]


@pytest.fixture(scope="module")
def tok(gemma3_tokenizer) -> Tokenizer:
    return gemma3_tokenizer


@pytest.fixture(scope="module")
def metadata() -> dict:
    return read_gguf_metadata(builtin_model_path(GEMMA3_MODEL_NAME))


@pytest.fixture(scope="module")
def articles() -> list[str]:
    data = json.loads(wikipedia_summaries_path().read_text(encoding="utf-8"))
    return [v["extract"] for v in list(data.values())[:150]]


def test_gguf_declares_a_sentencepiece_vocabulary(metadata) -> None:
    assert metadata["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in metadata
    assert len(metadata["tokenizer.ggml.tokens"]) == len(metadata["tokenizer.ggml.scores"]) == 262144
    assert metadata["tokenizer.ggml.add_bos_token"] is True and metadata["tokenizer.ggml.add_space_prefix"] is False
    assert "tokenizer.chat_template" not in metadata  # the file has none: Gemma's format is ours


def test_special_tokens_and_known_ids(tok: Tokenizer, metadata) -> None:
    tokens = metadata["tokenizer.ggml.tokens"]
    for name, i in {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}.items():
        assert tok.token_to_id(name) == i and tokens[i] == name
        assert tok.encode(name, add_special_tokens=False) == [i]  # matched whole in text
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (2, 1, 3, 0)
    assert tok.eos_token_ids == {1, 106} and tok.add_bos_token and len(tok) == 262144
    assert {105, 106, 1, 2} <= tok.all_special_ids and 107 not in tok.all_special_ids  # "\n" is user-defined text
    assert tok.encode(FRANCE, add_special_tokens=False) == FRANCE_IDS
    assert tok.encode(FRANCE) == [2, *FRANCE_IDS]
    assert tok.encode("a\n\nb", add_special_tokens=False)[1] == 108  # newline runs are single pieces
    assert tok.encode("a  b", add_special_tokens=False) == [236746, 138, 236763]  # so are space runs


def test_round_trip_on_wikipedia(tok: Tokenizer, articles) -> None:
    ids = tok.encode_batch(articles, add_special_tokens=False)
    assert [tok.decode(i) for i in ids] == articles
    words = sum(len(a.split()) for a in articles)
    assert 1.0 < sum(map(len, ids)) / words < 1.6  # a real subword vocabulary, not characters


def test_byte_fallback_for_characters_outside_the_vocabulary(tok: Tokenizer) -> None:
    vocab = tok.backend.get_vocab()
    rare = next(c for c in map(chr, range(0x20000, 0x20400)) if c not in vocab)
    ids = tok.encode(f"x{rare}y", add_special_tokens=False)
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[1:5] == [f"<0x{b:02X}>" for b in rare.encode("utf-8")]
    assert tok.decode(ids) == f"x{rare}y"


def test_merges_follow_sentencepiece(tok: Tokenizer, articles) -> None:
    """SentencePiece itself, given the GGUF's pieces, scores and types, tokenizes like us.

    Runs of spaces are left out: Gemma's vocabulary has them as user-defined pieces stored
    with literal spaces, which llama.cpp and Hugging Face match whole in the raw text (as we
    do, see above) while a bare SentencePiece model escapes the spaces first.
    """
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    md = read_gguf_metadata(builtin_model_path(GEMMA3_MODEL_NAME))
    proto = pb.ModelProto()
    for piece, score, kind in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"]):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 3, 2, 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    texts = [re.sub(" {2,}", " ", a) for a in articles]
    texts += ["naïve café 東京 😀 ＡＢＣ", "12345 3.14159", "Hello world!\nNew line\ttab"]
    ours = tok.encode_batch(texts, add_special_tokens=False)
    assert ours == [sp.encode(t) for t in texts]
    assert sp.encode(FRANCE) == FRANCE_IDS


def test_gemma_chat_template_and_end_of_turn(tok: Tokenizer) -> None:
    assert tok.chat_template == GEMMA_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    assert apply_chat_template(tok, messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])
    assert ids == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]  # one <bos>; "user", "model"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\nmodel\n"


def test_saved_folder_keeps_the_end_of_turn_id(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 2, "eos_token_id": [1, 106]}
    again = Tokenizer.from_folder(tmp_path)
    assert again.eos_token_ids == {1, 106} and again.chat_template == GEMMA_TEMPLATE
    assert again.encode(FRANCE) == [2, *FRANCE_IDS] and again.encode("a  b\n\n<end_of_turn>") == tok.encode("a  b\n\n<end_of_turn>")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(FRANCE)["input_ids"] == [2, *FRANCE_IDS]
    assert hf.decode([2, *FRANCE_IDS], skip_special_tokens=True) == FRANCE


# ---------------------------------------------------------------- synthetic SentencePiece


def _tiny_spm(add_space_prefix: bool) -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "▁world", "ld", "orld"]
    types = [2, 3, 3, 6] + [1] * (len(pieces) - 4)
    scores = [0.0, 0.0, 0.0, 0.0] + [-float(i) for i in range(len(pieces) - 4)]
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.ggml.add_bos_token": True,
    })


def test_spm_merges_rank_by_the_joined_pieces_score() -> None:
    pieces = ["a", "b", "c", "ab", "bc", "abc"]
    merges = spm_merges(pieces, [0, 0, 0, -2.0, -1.0, -3.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_spm_space_prefix_and_unknown_characters() -> None:
    prefixed, plain = _tiny_spm(True), _tiny_spm(False)
    ids = prefixed.encode("hello world")
    assert [prefixed.id_to_token(i) for i in ids] == ["<s>", "▁hello", "▁world"]
    assert prefixed.decode(ids, skip_special_tokens=True) == "hello world"
    assert [plain.id_to_token(i) for i in plain.encode("hello world", add_special_tokens=False)] == ["hello", "▁world"]
    assert [plain.id_to_token(i) for i in plain.encode("A", add_special_tokens=False)] == ["<0x41>"]  # byte fallback
    assert plain.encode("z", add_special_tokens=False) == [0]  # neither piece nor byte: <unk>
    assert plain.chat_template is None and plain.eos_token_ids == {2}
