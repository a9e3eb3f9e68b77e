"""Fuser outputs against transformers' generate on the same tiny checkpoint (f32 GGUF, f32 KV
cache, flash attention off so that llama.cpp's logits agree to ~1e-6):

- greedy on the random tiny model (it rarely emits EOS: every row runs to max_new_tokens);
- greedy and 3-beam search (length_offset=0 = current transformers) on a variant whose EOS row of
  the LM head copies (x1.05) the row of a token the model produces at varied positions, so rows
  end by EOS at mixed lengths and beam search meets finished hypotheses and early stops.

The EOS-variant helpers are imported by test_engine_scheduling.py.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest

from capsfuse_lite import defaults

MAX_NEW = 40
EOS = 2
# one thread: llama.cpp's spinning thread barriers slow down badly on a shared, oversubscribed CPU
EXACT = dict(kv_type="f32", flash_attn=False, max_new_tokens=MAX_NEW, n_threads=1)


def pairs_of(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r[defaults.RAW_FIELD], r[defaults.SYNTHETIC_FIELD]) for r in rows]


def fuse_all(gguf: Path, pairs, **settings):
    from capsfuse_lite import Fuser

    with Fuser(gguf, **{**EXACT, **settings}) as fuser:
        prompts = [fuser.build_prompt(*p) for p in pairs]
        results = list(fuser.fuse(pairs))
    return prompts, results


def hf_generate(model, prompt_ids: list[int], beams: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, num_beams=beams, do_sample=False,
            length_penalty=1.0, early_stopping=False, eos_token_id=EOS, pad_token_id=0,
        )
    generated = out[0, ids.shape[1]:].tolist()
    return generated[: generated.index(EOS)] if EOS in generated else generated


def agreement(model, prompts, results, beams: int) -> float:
    same = sum(hf_generate(model, p.token_ids, beams) == r.token_ids for p, r in zip(prompts, results))
    return same / len(results)


def stop_token(results) -> int:
    """A token that the model first produces at the most varied positions (>= 2) across rows."""
    first_at = collections.defaultdict(set)
    for r in results:
        seen = set()
        for i, t in enumerate(r.token_ids):
            if i >= 2 and t not in seen:
                seen.add(t)
                first_at[t].add(i)
    return max(first_at, key=lambda t: (len(first_at[t]), -t))


def make_eos_variant(base_dir: Path, out_dir: Path, token: int, scale: float = 1.5) -> Path:
    """Copy of an upstream-layout checkpoint whose LM-head row for EOS is ``scale`` x the row of
    ``token``: wherever ``token`` would win, EOS wins instead."""
    import torch

    if (out_dir / "config.json").exists():
        return out_dir
    shutil.copytree(base_dir, out_dir)
    index = json.loads((out_dir / "pytorch_model.bin.index.json").read_text())
    shard = out_dir / index["weight_map"]["lm_head.weight"]
    state = torch.load(shard, weights_only=True)
    state["lm_head.weight"][EOS] = state["lm_head.weight"][token] * scale
    torch.save(state, shard)
    return out_dir


def eos_variant(tiny_llama_dir: Path, tiny_gguf_f32: Path, sample_rows, base: Path) -> tuple[Path, Path]:
    """(checkpoint folder, f32 GGUF) of the EOS variant, built once under ``base``."""
    from capsfuse_lite.convert import convert_checkpoint

    gguf = base / "tiny-eos-f32.gguf"
    if not gguf.exists():
        _, results = fuse_all(tiny_gguf_f32, pairs_of(sample_rows), slots=8, beams=1)
        folder = make_eos_variant(tiny_llama_dir, base / "tiny_eos", stop_token(results))
        convert_checkpoint(folder, gguf, out_type="f32", progress=False)
    return base / "tiny_eos", gguf


@pytest.fixture(scope="module")
def eos_model(tiny_llama_dir, tiny_gguf_f32, sample_rows, tmp_path_factory):
    return eos_variant(tiny_llama_dir, tiny_gguf_f32, sample_rows, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_eos_model(eos_model):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(eos_model[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sp(sp_model_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))


def test_greedy_matches_transformers_and_slots_do_not_change_outputs(tiny_gguf_f32, hf_tiny_model, sample_rows, sp):
    pairs = pairs_of(sample_rows)
    prompts, batched = fuse_all(tiny_gguf_f32, pairs, slots=8, beams=1)
    _, single = fuse_all(tiny_gguf_f32, pairs, slots=1, beams=1)
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.index for r in batched] == list(range(len(pairs)))
    assert all(r.finish_reason == "length" and len(r.token_ids) == MAX_NEW for r in batched)
    share = agreement(hf_tiny_model, prompts, batched, beams=1)
    print(f"greedy parity (random tiny model): {share:.1%}")
    assert share >= 0.95
    for r in batched:
        if max(r.token_ids) < sp.get_piece_size():  # [PAD] has no sentencepiece piece
            assert r.text == sp.decode(r.token_ids).strip()


def test_greedy_with_eos_matches_transformers(eos_model, hf_eos_model, sample_rows):
    prompts, results = fuse_all(eos_model[1], pairs_of(sample_rows), slots=8, beams=1)
    reasons = collections.Counter(r.finish_reason for r in results)
    assert reasons["eos"] >= 3 and reasons["length"] >= 3
    assert all(len(r.token_ids) == MAX_NEW for r in results if r.finish_reason == "length")
    share = agreement(hf_eos_model, prompts, results, beams=1)
    print(f"greedy parity (EOS variant): {share:.1%}")
    assert share >= 0.95


def test_beam_search_matches_transformers(eos_model, hf_eos_model, sample_rows):
    prompts, results = fuse_all(eos_model[1], pairs_of(sample_rows), slots=4, beams=3, length_offset=0)
    reasons = collections.Counter(r.finish_reason for r in results)
    assert reasons["eos"] >= 3 and reasons["length"] >= 3
    share = agreement(hf_eos_model, prompts, results, beams=3)
    print(f"beam parity (3 beams, length_offset=0): {share:.1%}")
    assert share >= 0.90


def test_upstream_length_offset_changes_what_wins(eos_model, sample_rows):
    """length_offset=256 (transformers 4.28 with prompts padded to 256) divides by ~256 + n, so
    long and short hypotheses score alike and some rows pick a different caption than with 0."""
    pairs = pairs_of(sample_rows[:16])
    _, current = fuse_all(eos_model[1], pairs, slots=4, beams=3, length_offset=0)
    _, upstream = fuse_all(eos_model[1], pairs, slots=4, beams=3, length_offset=256)
    assert any(a.token_ids != b.token_ids for a, b in zip(current, upstream))
