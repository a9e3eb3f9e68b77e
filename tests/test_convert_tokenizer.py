"""Tokenizer parity: the converted vocabulary tokenizes like llama.cpp's vectors and sentencepiece."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsfuse_lite.convert.spm import CONTROL, load_sentencepiece

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEPARATOR = "\n__ggml_vocab_test__\n"


def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    inputs = (FIXTURES / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    outputs = (FIXTURES / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    if inputs[-1] == "":  # the file ends with a separator
        inputs.pop()
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, outputs[: len(inputs)])]


@pytest.fixture(scope="module")
def vocab_llm(tiny_gguf_f32):
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny_gguf_f32), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def sp(sp_model_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))


def tokenize(llm, text: str, add_bos: bool = False) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


def test_llama_cpp_test_vectors(vocab_llm):
    vectors = llama_cpp_vectors()
    assert len(vectors) > 40
    mismatches = [(text, expected) for text, expected in vectors if tokenize(vocab_llm, text) != expected]
    assert mismatches == []


def test_sample_captions_match_sentencepiece(vocab_llm, sp, sample_rows):
    captions = [value for row in sample_rows for value in row.values() if isinstance(value, str)]
    assert len(captions) >= 3 * 47 - 5
    for caption in captions:
        assert tokenize(vocab_llm, caption, add_bos=True) == [sp.bos_id(), *sp.encode(caption)], caption


def test_vocabulary_layout_and_specials(vocab_llm, tiny_gguf_f32):
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(vocab_llm.model)
    assert vocab_llm.n_vocab() == 32001
    assert vocab_llm.detokenize([32000], special=True) == b"[PAD]"
    assert llama_cpp.llama_vocab_get_attr(vocab, 32000) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert (vocab_llm.token_bos(), vocab_llm.token_eos()) == (1, 2)
    assert llama_cpp.llama_vocab_pad(vocab) == 32000
    assert llama_cpp.llama_vocab_get_add_bos(vocab)


def test_detokenize_roundtrip(vocab_llm, sample_rows):
    text = sample_rows[0]["laion_2b"]
    ids = tokenize(vocab_llm, text)
    assert vocab_llm.detokenize(ids).decode("utf-8").strip() == text


def test_protobuf_reader_matches_sentencepiece(sp_model_path, sp):
    model = load_sentencepiece(sp_model_path)
    assert len(model) == sp.get_piece_size() == 32000
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert model.model_type == "bpe" and model.byte_fallback and model.add_dummy_prefix
    for i in range(0, 32000, 7):
        assert model.pieces[i] == sp.id_to_piece(i)
        assert model.scores[i] == pytest.approx(sp.get_score(i))
        assert (model.types[i] == CONTROL) == sp.is_control(i)
        assert (model.types[i] == 6) == sp.is_byte(i)
