"""Continuous batching: finished slots are refilled at once, input is read lazily, results come
back in input order (or as they finish), KV space is released (more rows than fit in n_ctx at
once), the shared prefix changes nothing, request_stop, stats, settings and user errors."""

from __future__ import annotations

import collections
import logging

import pytest
from test_engine_parity import EXACT, eos_variant, fuse_all, pairs_of

from capsfuse_lite import Fuser, defaults
from capsfuse_lite.errors import ConfigError, ModelLoadError
from capsfuse_lite.llama import supports_gpu_offload


@pytest.fixture(scope="module")
def eos_gguf(tiny_llama_dir, tiny_gguf_f32, sample_rows, tmp_path_factory):
    return eos_variant(tiny_llama_dir, tiny_gguf_f32, sample_rows, tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def pairs(sample_rows):
    return pairs_of(sample_rows)


@pytest.fixture(scope="module")
def greedy_reference(eos_gguf, pairs):
    """One slot: rows strictly one after another."""
    return [r.token_ids for r in fuse_all(eos_gguf, pairs, slots=1, beams=1)[1]]


@pytest.fixture(scope="module")
def beam_reference(eos_gguf, pairs):
    return [r.token_ids for r in fuse_all(eos_gguf, pairs[:16], slots=1, beams=3)[1]]


class Recorder:
    """Feeds pairs to fuse() and logs ('pull', i, decode step) and ('done', i, decode step)."""

    def __init__(self, fuser: Fuser, pairs):
        self.fuser, self.pairs, self.events = fuser, pairs, []

    def step(self) -> int:
        return self.fuser._scheduler.counters.decode_calls

    def feed(self):
        for i, pair in enumerate(self.pairs):
            self.events.append(("pull", i, self.step()))
            yield pair

    def run(self, **kwargs):
        results = []
        for r in self.fuser.fuse(self.feed(), **kwargs):
            self.events.append(("done", r.index, self.step()))
            results.append(r)
        return results


def test_finished_slots_are_refilled_at_once_and_input_is_read_lazily(eos_gguf, pairs, greedy_reference):
    slots = 3
    with Fuser(eos_gguf, slots=slots, beams=1, **EXACT) as fuser:
        rec = Recorder(fuser, pairs)
        results = rec.run(ordered=False)
        counters = fuser._scheduler.counters
    assert sorted(r.index for r in results) == list(range(len(pairs)))
    assert {r.index: r.token_ids for r in results} == dict(enumerate(greedy_reference))
    lengths = collections.Counter(len(r.token_ids) for r in results)
    assert len(lengths) >= 4 and {r.finish_reason for r in results} == {"eos", "length"}
    assert counters.max_active_rows == slots
    # lazy: never more than `slots` rows pulled beyond those finished (+1 held while pulled)
    pulled = done = 0
    for kind, _, _ in rec.events:
        pulled += kind == "pull"
        done += kind == "done"
        assert pulled - done <= slots + 1
    # refill at once: every row that finished while input remained was replaced before the next
    # decode step, i.e. rows are pulled at exactly the steps where rows finished, as many
    finishes = collections.Counter(step for kind, _, step in rec.events if kind == "done")
    refills = collections.Counter(step for kind, i, step in rec.events if kind == "pull" and i >= slots)
    last_pull_step = max(refills)
    for step, n in finishes.items():
        if step < last_pull_step:
            assert refills[step] == n, f"step {step}: {n} rows finished, {refills[step]} pulled"
    assert set(refills) <= set(finishes)
    assert refills[last_pull_step] <= finishes[last_pull_step]


def test_ordered_results_come_back_in_input_order(eos_gguf, pairs, greedy_reference):
    with Fuser(eos_gguf, slots=5, beams=1, **EXACT) as fuser:
        results = list(fuser.fuse(iter(pairs)))
    assert [r.index for r in results] == list(range(len(pairs)))
    assert [r.token_ids for r in results] == greedy_reference


def test_kv_space_is_released_when_n_ctx_holds_only_a_few_rows(eos_gguf, pairs, greedy_reference):
    slots, max_new = 8, EXACT["max_new_tokens"]
    with Fuser(eos_gguf, slots=slots, beams=1, **EXACT) as probe:
        prefix = probe.settings["prefix_tokens"]
        needs = [len(probe.build_prompt(*p).token_ids) for p in pairs]
    n_ctx = prefix + defaults.MAX_INPUT_TOKENS + max_new  # the smallest accepted: one worst-case row
    with Fuser(eos_gguf, slots=slots, beams=1, n_ctx=n_ctx, **EXACT) as fuser:
        results = list(fuser.fuse(pairs))
        capacity = fuser.settings["n_ctx"]
        counters = fuser._scheduler.counters
    assert [r.token_ids for r in results] == greedy_reference
    assert 2 <= counters.max_active_rows < slots  # admission waited for KV space
    assert sum(n - prefix + max_new for n in needs) > 4 * capacity  # far more rows than fit at once


def test_beam_search_in_many_slots_equals_one_slot(eos_gguf, pairs, beam_reference):
    with Fuser(eos_gguf, slots=4, beams=3, **EXACT) as fuser:
        results = list(fuser.fuse(pairs[:16]))
        assert fuser._scheduler.counters.max_active_rows == 4  # the default n_ctx fits every slot
    assert [r.token_ids for r in results] == beam_reference
    prefix = fuser.settings["prefix_tokens"]
    n_ctx = prefix + defaults.MAX_INPUT_TOKENS + 3 * EXACT["max_new_tokens"]
    with Fuser(eos_gguf, slots=4, beams=3, n_ctx=n_ctx, **EXACT) as small:
        assert [r.token_ids for r in small.fuse(pairs[:16])] == beam_reference


def test_shared_prefix_changes_nothing(tiny_gguf_f32, pairs):
    _, cached = fuse_all(tiny_gguf_f32, pairs[:12], slots=4, beams=1)
    _, plain = fuse_all(tiny_gguf_f32, pairs[:12], slots=4, beams=1, prefix_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]


def test_request_stop_returns_after_the_current_step_and_the_fuser_stays_usable(eos_gguf, pairs, greedy_reference):
    with Fuser(eos_gguf, slots=4, beams=1, **EXACT) as fuser:
        got = []
        for r in fuser.fuse(pairs, ordered=False):
            got.append(r)
            fuser.request_stop()
        assert 1 <= len(got) < len(pairs)
        again = list(fuser.fuse(pairs))
    assert [r.token_ids for r in again] == greedy_reference


def test_stats_add_up(eos_gguf, pairs):
    with Fuser(eos_gguf, slots=4, beams=1, **EXACT) as fuser:
        results = list(fuser.fuse(pairs))
        stats = fuser.stats
        prefix = fuser.settings["prefix_tokens"]
    assert stats.rows == len(pairs)
    assert stats.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert stats.generated_tokens == sum(len(r.token_ids) for r in results)
    assert stats.elapsed_s > 0 and stats.rows_per_s > 0 and stats.generated_tokens_per_s > 0
    assert stats.prompt_tokens_per_s == pytest.approx(stats.prompt_tokens / stats.elapsed_s)
    # the ~{prefix}-token instruction prefix is evaluated once, not per row
    assert stats.evaluated_tokens < stats.prompt_tokens - (len(pairs) - 1) * prefix // 2 + stats.generated_tokens
    assert stats.decode_calls < stats.generated_tokens


def test_truncated_rows_are_flagged(tiny_gguf_f32):
    with Fuser(tiny_gguf_f32, slots=2, beams=1, max_new_tokens=3, n_threads=1) as fuser:
        short, long = fuser.fuse([("a dog", "A dog."), ("alt text " * 400, "A dog.")])
    assert not short.truncated and long.truncated and long.prompt_tokens <= defaults.MAX_INPUT_TOKENS


def test_settings_default_from_gguf_metadata(tiny_gguf_f32, caplog):
    from capsfuse_lite.convert import read_gguf_metadata

    meta = read_gguf_metadata(tiny_gguf_f32)
    with caplog.at_level(logging.WARNING, logger="capsfuse_lite"):
        with Fuser(tiny_gguf_f32, slots=2, n_threads=1) as fuser:
            settings, info = fuser.settings, fuser.model_info
    assert settings["beams"] == meta.get(defaults.KEY_NUM_BEAMS, defaults.NUM_BEAMS) == 3
    assert settings["max_new_tokens"] == meta.get(defaults.KEY_MAX_NEW_TOKENS, defaults.MAX_NEW_TOKENS)
    assert settings["length_offset"] == meta.get(defaults.KEY_LENGTH_OFFSET, defaults.LENGTH_OFFSET)
    assert settings["n_seq_max"] == 2 * 3 + 1
    # the shared prefix is held once; each slot reserves its own prompt tokens beyond it and 3 beams
    own_prompt = defaults.MAX_INPUT_TOKENS - (settings["prefix_tokens"] - 1)
    worst = settings["prefix_tokens"] + 2 * (own_prompt + 3 * settings["max_new_tokens"])
    assert worst <= settings["n_ctx"] < worst + 256  # padded to llama.cpp's 256-cell granularity
    assert settings["kv_unified"] is True  # beams fork by sharing cells
    assert info["file_type"] and info["file_size"] == tiny_gguf_f32.stat().st_size
    notices = [r for r in caplog.records if "no GPU support" in r.getMessage()]
    if supports_gpu_offload():
        assert settings["gpu"] and not notices
    else:
        assert not settings["gpu"] and settings["n_gpu_layers"] == 0 and len(notices) == 1


def test_quantized_kv_cache(tmp_path, pairs):
    """kv_type q8_0 (flash attention on) runs; it needs a head size that is a multiple of 32."""
    from checkpoints import make_llama_checkpoint

    from capsfuse_lite.convert import convert_checkpoint

    folder = make_llama_checkpoint(tmp_path / "head32", hidden=128, intermediate=344, heads=4, layout="safetensors")
    gguf = convert_checkpoint(folder, tmp_path / "head32.gguf", out_type="f32", progress=False)
    with Fuser(gguf, slots=4, beams=1, max_new_tokens=8, kv_type="q8_0", flash_attn=True, n_threads=1) as fuser:
        results = list(fuser.fuse(pairs[:6]))
    assert [r.index for r in results] == list(range(6))
    assert all(r.token_ids and r.finish_reason in ("eos", "length") for r in results)


def test_user_errors(tiny_gguf_f32, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Fuser(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="could not load"):
        Fuser(tmp_path / "junk.gguf")
    with pytest.raises(ConfigError, match="n_ctx=300 is too small"):
        Fuser(tiny_gguf_f32, slots=2, beams=1, max_new_tokens=40, n_ctx=300)
    with pytest.raises(ConfigError, match="n_batch"):
        Fuser(tiny_gguf_f32, slots=8, beams=3, n_batch=16)
    with pytest.raises(ConfigError, match="kv_type"):
        Fuser(tiny_gguf_f32, slots=1, beams=1, kv_type="f8")
    with pytest.raises(ConfigError, match="needs flash attention"):
        Fuser(tiny_gguf_f32, slots=1, beams=1, kv_type="q8_0", flash_attn=False)
    with pytest.raises(ConfigError, match="slots"):
        Fuser(tiny_gguf_f32, slots=0)
    with pytest.raises(ConfigError, match="exceed"):
        Fuser(tiny_gguf_f32, slots=100, beams=3)
    fuser = Fuser(tiny_gguf_f32, slots=1, beams=1, max_new_tokens=2, n_threads=1)
    with pytest.raises(TypeError, match="pair 1"):
        list(fuser.fuse([("a", "b"), ("only one",)]))
    assert [r.index for r in fuser.fuse([("a", "b")])] == [0]  # usable after the error
    fuser.close()
    fuser.close()
    with pytest.raises(ModelLoadError, match="closed"):
        list(fuser.fuse([("a", "b")]))
