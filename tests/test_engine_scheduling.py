"""Continuous batching: finished slots are refilled at once, input is read lazily, results come
back in input order (or as they finish), KV space is reserved for every beam and released (more
rows than fit in n_ctx at once), the shared prefix changes nothing, request_stop, stats, settings,
quantized KV caches and user errors.

Outputs are judged per row against current transformers (tests/fidelity.py: identical, or a
near-tie in the reference), whatever the slot count: llama.cpp's kernels are not batch-invariant,
so rows decoded beside others may resolve a near-tie differently than rows decoded alone."""

from __future__ import annotations

import collections
import logging

import pytest
from fidelity import check_rows, eos_variant
from test_engine_parity import EXACT, fuse_all, hf_references, logprob_noise, pairs_of, verdicts

from capsfuse_lite import Fuser, defaults
from capsfuse_lite.errors import ConfigError, ModelLoadError
from capsfuse_lite.engine.llama import supports_gpu_offload


@pytest.fixture(scope="module")
def eos_model(tiny_llama_dir, tmp_path_factory):
    return eos_variant(tiny_llama_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def eos_gguf(eos_model):
    return eos_model[1]


@pytest.fixture(scope="module")
def pairs(sample_rows):
    return pairs_of(sample_rows)


@pytest.fixture(scope="module")
def prompt_ids(eos_gguf, pairs):
    from capsfuse_lite.engine.fuser import PromptPreview

    with PromptPreview(eos_gguf) as preview:
        return [preview.build(*p).token_ids for p in pairs]


@pytest.fixture(scope="module")
def greedy_refs(eos_model, prompt_ids):
    return hf_references(eos_model[0], prompt_ids, beams=1)


@pytest.fixture(scope="module")
def beam_refs(eos_model, prompt_ids):
    return hf_references(eos_model[0], prompt_ids[:16], beams=3)


def check_greedy(label: str, refs, results) -> None:
    by_index = sorted(results, key=lambda r: r.index)
    assert [r.index for r in by_index] == list(range(len(by_index)))
    check_rows(label, verdicts(refs[: len(by_index)], by_index, beams=1))


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


def test_finished_slots_are_refilled_at_once_and_input_is_read_lazily(eos_gguf, pairs, greedy_refs):
    slots = 3
    with Fuser(eos_gguf, slots=slots, beams=1, **EXACT) as fuser:
        rec = Recorder(fuser, pairs)
        results = rec.run(ordered=False)
        counters = fuser._scheduler.counters
    assert sorted(r.index for r in results) == list(range(len(pairs)))
    check_greedy("greedy, 3 slots, unordered", greedy_refs, results)
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


def test_ordered_results_come_back_in_input_order(eos_gguf, pairs, greedy_refs):
    with Fuser(eos_gguf, slots=5, beams=1, **EXACT) as fuser:
        results = list(fuser.fuse(iter(pairs)))
    assert [r.index for r in results] == list(range(len(pairs)))
    check_greedy("greedy, 5 slots", greedy_refs, results)


def test_kv_space_is_released_when_n_ctx_holds_only_a_few_rows(eos_gguf, pairs, greedy_refs):
    slots, max_new = 8, EXACT["max_new_tokens"]
    with Fuser(eos_gguf, slots=slots, beams=1, **EXACT) as probe:
        prefix = probe.settings["prefix_tokens"]
        needs = [len(probe.build_prompt(*p).token_ids) for p in pairs]
    n_ctx = prefix + defaults.MAX_INPUT_TOKENS + max_new  # the smallest accepted: one worst-case row
    with Fuser(eos_gguf, slots=slots, beams=1, n_ctx=n_ctx, **EXACT) as fuser:
        results = list(fuser.fuse(pairs))
        capacity = fuser.settings["n_ctx"]
        counters = fuser._scheduler.counters
    check_greedy("greedy, 8 slots, small n_ctx", greedy_refs, results)
    assert 2 <= counters.max_active_rows < slots  # admission waited for KV space
    assert sum(n - prefix + max_new for n in needs) > 4 * capacity  # far more rows than fit at once


def test_beam_search_in_one_and_many_slots_matches_transformers(eos_gguf, pairs, beam_refs):
    beam = dict(EXACT, beams=3, length_offset=0)
    runs = {}
    for slots in (1, 4):
        with Fuser(eos_gguf, slots=slots, **beam) as fuser:
            runs[f"{slots} slots"] = list(fuser.fuse(pairs[:16]))
            assert fuser._scheduler.counters.max_active_rows == slots  # the default n_ctx fits every slot
    prefix = fuser.settings["prefix_tokens"]
    n_ctx = prefix + defaults.MAX_INPUT_TOKENS + 3 * EXACT["max_new_tokens"]
    with Fuser(eos_gguf, slots=4, n_ctx=n_ctx, **beam) as small:
        runs["4 slots, small n_ctx"] = list(small.fuse(pairs[:16]))
    for label, results in runs.items():
        check_rows(f"3 beams, length_offset=0, {label}", verdicts(beam_refs, results, beams=3), min_identical=15 / 16)


def test_kv_reservation_counts_every_beam(tiny_gguf_f32, tiny_llama_dir, pairs):
    """A row reserves its own prompt tokens plus beams x max_new_tokens KV cells: every beam may
    grow to max_new_tokens with its own history (beams share cells only while their histories
    agree). The random tiny model never emits EOS, so every beam runs to the end. With n_ctx just
    above one worst-case row, at most 2 rows of 3 beams may run at once; reserving max_new_tokens
    per row instead admits 4, which overflows the cache whenever their beams' histories diverge."""
    beams, max_new, slots = 3, EXACT["max_new_tokens"], 4
    rows = pairs[:8]
    with Fuser(tiny_gguf_f32, slots=1, beams=1, **EXACT) as probe:
        prefix = probe.settings["prefix_tokens"]
        prompts = [probe.build_prompt(*p) for p in rows]
    n_ctx = prefix + defaults.MAX_INPUT_TOKENS + beams * max_new  # the smallest accepted
    with Fuser(tiny_gguf_f32, slots=slots, n_ctx=n_ctx, **dict(EXACT, beams=beams, length_offset=0)) as fuser:
        results = list(fuser.fuse(rows))
        capacity = fuser.settings["n_ctx"]
        active = fuser._scheduler.counters.max_active_rows
        needs = [fuser._scheduler.row_need(p) for p in prompts]
    assert all(need >= len(p.token_ids) - prefix + beams * max_new for need, p in zip(needs, prompts))
    fit = (capacity - prefix) // min(len(p.token_ids) - prefix + beams * max_new for p in prompts)
    assert 1 <= active <= fit < slots
    assert all(r.finish_reason == "length" and len(r.token_ids) == max_new for r in results)
    refs = hf_references(tiny_llama_dir, [p.token_ids for p in prompts], beams=3)
    check_rows("3 beams, random tiny model, small n_ctx", verdicts(refs, results, beams=3), min_identical=7 / 8)


def test_shared_prefix_changes_nothing(tiny_gguf_f32, tiny_llama_dir, pairs):
    prompts, cached = fuse_all(tiny_gguf_f32, pairs[:12], slots=4, beams=1)
    _, plain = fuse_all(tiny_gguf_f32, pairs[:12], slots=4, beams=1, prefix_cache=False)
    refs = hf_references(tiny_llama_dir, [p.token_ids for p in prompts], beams=1)
    check_rows("greedy, prefix cache on", verdicts(refs, cached, beams=1))
    check_rows("greedy, prefix cache off", verdicts(refs, plain, beams=1))


def test_request_stop_returns_after_the_current_step_and_the_fuser_stays_usable(eos_gguf, pairs, greedy_refs):
    with Fuser(eos_gguf, slots=4, beams=1, **EXACT) as fuser:
        got = []
        for r in fuser.fuse(pairs, ordered=False):
            got.append(r)
            fuser.request_stop()
        assert 1 <= len(got) < len(pairs)
        again = list(fuser.fuse(pairs))
    check_greedy("greedy, 4 slots, after request_stop", greedy_refs, again)


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


# Measured on the head-size-32 model below, llama.cpp vs torch f32 log-probabilities of the 8 best
# tokens along greedy continuations: at most 8.9e-3 with a q8_0 KV cache, 2.6e-4 with f16.
KV_NOISE = {"f16": 5e-4, "q8_0": 1.25e-2}


@pytest.fixture(scope="module")
def head32(tmp_path_factory):
    from checkpoints import make_llama_checkpoint

    from capsfuse_lite.convert import convert_checkpoint

    base = tmp_path_factory.mktemp("head32")
    folder = make_llama_checkpoint(base / "ckpt", hidden=128, intermediate=344, heads=4, layout="safetensors")
    return folder, convert_checkpoint(folder, base / "head32.gguf", out_type="f32", progress=False)


@pytest.mark.parametrize("kv_type", ["q8_0", "f16"])
def test_quantized_kv_cache_agrees_with_transformers(head32, pairs, kv_type):
    """kv_type q8_0 needs flash attention and a head size that is a multiple of 32. The cache's
    rounding moves llama.cpp's log-probabilities by less than KV_NOISE (asserted here); a greedy
    decision compares two log-probabilities of one step, so a row may diverge from transformers
    only where transformers' margin between the two picks is below 2 x KV_NOISE. Measured on 32
    rows: q8_0 31 identical, 1 near-tie (margin 7.4e-3); f16 32/32."""
    folder, gguf = head32
    max_new, tie, rows = 16, 2 * KV_NOISE[kv_type], pairs[:32]
    with Fuser(gguf, slots=4, beams=1, max_new_tokens=max_new, kv_type=kv_type, flash_attn=True, n_threads=1) as fuser:
        prompts = [fuser.build_prompt(*p).token_ids for p in rows]
        results = list(fuser.fuse(rows))
    noise = logprob_noise(gguf, folder, [(p, r.token_ids) for p, r in zip(prompts[:4], results[:4])],
                          kv_type=kv_type, flash_attn=True)
    print(f"{kv_type} KV cache: max top-8 log-probability difference from torch f32 {noise:.2e}")
    assert noise < KV_NOISE[kv_type]
    refs = hf_references(folder, prompts, beams=1, max_new=max_new)
    check_rows(f"greedy, {kv_type} KV cache (tie {tie:g})", verdicts(refs, results, beams=1, tie=tie, max_new=max_new))


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
