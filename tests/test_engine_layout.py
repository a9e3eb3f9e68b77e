"""KV layouts and the engine's time accounting (capsfuse_lite.engine.plan, scheduler, FuserStats).

Per-sequence KV streams (the default for greedy) keep each row's attention to its own cells, so
with llama.cpp's non-flash attention kernels a row's logits do not depend on which rows share its
decode calls: greedy outputs are then identical, token for token, at any slot count (measured here
on the tiny model; flash attention on a CPU is not batch-invariant, and a trained model differs even without it:
docs/fidelity.md "Batch invariance")."""

from __future__ import annotations

import pytest

from capsfuse_lite import Fuser
from capsfuse_lite.errors import ConfigError

EXACT = dict(flash_attn=False, max_new_tokens=12, n_threads=1)


@pytest.fixture(scope="module")
def pairs(sample_rows):
    return [(r["laion_2b"], r["laion_coco"]) for r in sample_rows[:12]]


def fuse(gguf, pairs, **kw):
    with Fuser(gguf, **{**EXACT, **kw}) as fuser:
        results = list(fuser.fuse(pairs))
        return [r.token_ids for r in results], fuser.settings, fuser.stats


def test_streams_give_every_slot_count_the_same_greedy_tokens(tiny_gguf_q8, pairs):
    one, settings, _ = fuse(tiny_gguf_q8, pairs, slots=1, beams=1, kv_unified=False)
    many, settings_many, _ = fuse(tiny_gguf_q8, pairs, slots=5, beams=1, kv_unified=False)
    assert settings["kv_unified"] is False and settings_many["kv_unified"] is False
    assert settings_many["n_seq_max"] == 5 + 1 and settings_many["n_ctx"] == 6 * 512  # a 512-cell stream each
    assert many == one  # bit-exact: each row attends over its own stream only


def test_streams_place_the_shared_prefix_exactly(tiny_gguf_q8, pairs):
    """The prefix stream copied into a row's stream (then trimmed to the shared part) gives the same
    tokens as evaluating every row's whole prompt itself."""
    cached, _, _ = fuse(tiny_gguf_q8, pairs, slots=3, beams=1, kv_unified=False)
    uncached, _, _ = fuse(tiny_gguf_q8, pairs, slots=3, beams=1, kv_unified=False, prefix_cache=False)
    assert cached == uncached


def test_beam_search_needs_a_unified_cache(tiny_gguf_q8):
    with pytest.raises(ConfigError, match="beams=1"):
        Fuser(tiny_gguf_q8, slots=2, beams=3, kv_unified=False, n_threads=1)
    with Fuser(tiny_gguf_q8, slots=2, beams=3, n_threads=1) as fuser:
        assert fuser.settings["kv_unified"] is True


def test_host_and_device_time_add_up(tiny_gguf_q8, pairs):
    _, _, stats = fuse(tiny_gguf_q8, pairs, slots=4, beams=3)
    parts = stats.admit_s + stats.batch_s + stats.logits_s + stats.search_s + stats.kv_s
    assert stats.steps > 0 and stats.device_s > 0 and stats.host_s > 0
    assert parts <= stats.host_s * 1.001 + 1e-6  # the parts are inside the host time
    assert stats.host_s + stats.device_s <= stats.elapsed_s * 1.001 + 1e-6
    assert stats.decode_calls >= stats.steps  # plus the shared prefix's own decode
    assert stats.host_ms_per_step == pytest.approx(1e3 * stats.host_s / stats.steps)
    assert stats.kv_s > 0  # beams forked


def _recorded_batches(monkeypatch, gguf, pairs, **kw):
    """The sequence id of every token of every llama_decode call of a run."""
    from capsfuse_lite.engine.llama import Context

    calls: list[list[int]] = []
    decode = Context.decode

    def recording(self, batch):
        calls.append(batch.seq[: batch.n_tokens].tolist())
        return decode(self, batch)

    monkeypatch.setattr(Context, "decode", recording)
    tokens, _, _ = fuse(gguf, pairs, **kw)
    return tokens, calls


def _passes(seqs: list[int]) -> int:
    """Runs of consecutive increasing sequence ids among a batch's sequences in batch order: llama.cpp
    takes at least one micro-batch (a full pass over the weights) per run with per-sequence streams."""
    order = list(dict.fromkeys(seqs))
    return 1 + sum(1 for a, b in zip(order, order[1:]) if b != a + 1)


def test_streams_lay_out_every_step_in_sequence_order(monkeypatch, tiny_gguf_q8, pairs):
    """With a small n_batch, prompts take several steps, rows start and finish at different steps
    and refill slots out of order; every decode must still list its sequences in ascending id, each
    sequence's tokens together, so that a step with every slot busy is one run (one weight pass for
    every sequence's first token) instead of one per out-of-order row."""
    rows = pairs * 3
    reference, _ = _recorded_batches(monkeypatch, tiny_gguf_q8, rows, slots=1, beams=1, kv_unified=False)
    tokens, calls = _recorded_batches(monkeypatch, tiny_gguf_q8, rows, slots=6, beams=1, kv_unified=False, n_batch=64)
    assert tokens == reference  # the layout changes no output
    main = [seqs for seqs in calls if set(seqs) != {0}]  # not the shared prefix's own decodes
    for seqs in main:
        assert seqs == sorted(seqs), seqs
    busy = [seqs for seqs in main if len(set(seqs)) == 6]  # all six slots in the step
    assert len(busy) > 20
    assert all(_passes(seqs) == 1 for seqs in busy)


def test_greedy_uses_per_sequence_streams_on_a_cpu_too(tiny_gguf_q8):
    """Greedy picks streams on a CPU as on a GPU (measured 1.10x faster with rows of real lengths);
    beam search keeps the unified cache; a given n_ctx sizes a unified cache."""
    with Fuser(tiny_gguf_q8, slots=4, beams=1, n_threads=1) as fuser:
        assert fuser.settings["kv_unified"] is False and "streams" in fuser.slots_reason
    with Fuser(tiny_gguf_q8, slots=4, beams=1, n_threads=1, n_ctx=2048) as fuser:
        assert fuser.settings["kv_unified"] is True
