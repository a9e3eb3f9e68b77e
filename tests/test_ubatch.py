"""Weight passes (llama.cpp micro-batches) per decode: capsfuse_lite.engine.ubatch replays llama.cpp's split
rules, checked here against the ubatches llama.cpp really computes (Context(count_ubatches=True)
observes one tensor of every computed graph) on hand-made and random batch layouts, and the
engine's FuserStats.passes against the ubatches of a whole fuse() run."""

from __future__ import annotations

import functools
import random

import pytest

from capsfuse_lite.engine import fuser as engine
from capsfuse_lite.engine.llama import Batch, Context, Model
from capsfuse_lite.engine.ubatch import count_passes, split_equal_sequential

N_SEQ = 8
N_UBATCH = 16


@pytest.fixture(scope="module")
def model(tiny_gguf_q8):
    with Model(tiny_gguf_q8) as m:
        yield m


def _measure(model, unified: bool, layouts: list[list[tuple[int, int]]]) -> list[tuple[list[int], list[int]]]:
    """For each layout (a batch of (sequence id, tokens) runs in batch order): the batch's sequence
    ids per token and the token counts of the ubatches llama.cpp computed for it."""
    out = []
    with Context(model, n_ctx=N_SEQ * 256, n_batch=64, n_ubatch=N_UBATCH, n_seq_max=N_SEQ, n_threads=1,
                 kv_unified=unified, count_ubatches=True) as ctx, Batch(64) as batch:
        pos = [0] * N_SEQ
        for layout in layouts:
            batch.clear()
            for seq, n in layout:
                batch.add_sequence([5] * n, pos[seq], seq, logits_last=True)
                pos[seq] += n
            ctx.ubatches.clear()
            ctx.decode(batch)
            out.append((batch.seq[: batch.n_tokens].tolist(), list(ctx.ubatches)))
    return out


HAND = [
    [(s, 1) for s in range(N_SEQ)],  # one token per sequence, ascending ids: one pass
    [(s, 1) for s in (3, 0, 7, 6, 5, 1, 4, 2)],  # admission order: a run per ascending streak
    [(0, 1), (1, 1), (2, 9), (3, 1)],  # a prompt chunk among generating rows: 1 + its rest
    [(0, 9), (1, 9), (2, 9)],  # equal chunks of consecutive rows share passes: 3 x 5, then 3 x 4
    [(0, 5), (1, 3), (2, 5)],  # unequal chunks: the shortest ends the first pass, then a run each
    [(0, 1), (2, 1), (4, 1)],  # gaps in the ids: a pass per sequence
    [(1, 40)],  # one long chunk: ceil(40 / 16) passes
]


@pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])
def test_passes_match_the_ubatches_llama_cpp_computes(model, unified):
    rng = random.Random(7)
    layouts = list(HAND)
    for _ in range(25):
        seqs = rng.sample(range(N_SEQ), rng.randint(1, N_SEQ))
        if rng.random() < 0.5:
            seqs.sort()
        layouts.append([(s, rng.choice([1, 1, 2, 5, 12])) for s in seqs])
    for seq_ids, ubatches in _measure(model, unified, layouts):
        assert count_passes(seq_ids, N_UBATCH, streams=not unified) == len(ubatches), seq_ids
        if not unified:  # the shapes too: sequences x tokens per sequence of every ubatch, in order
            assert [n * per for _, n, per in split_equal_sequential(seq_ids, N_UBATCH)] == ubatches, seq_ids


def test_the_hand_made_layouts_split_as_documented(model):
    measured = [len(u) for _, u in _measure(model, False, HAND)]
    assert measured == [1, 5, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("kv_unified", [False, True], ids=["streams", "unified"])
def test_fuser_stats_count_every_weight_pass(tiny_gguf_q8, sample_rows, monkeypatch, kv_unified):
    monkeypatch.setattr(engine, "Context", functools.partial(Context, count_ubatches=True))
    pairs = [(r["laion_2b"], r["laion_coco"]) for r in sample_rows[:10]]
    with engine.Fuser(tiny_gguf_q8, slots=4, beams=1, max_new_tokens=6, n_threads=1, n_batch=64,
                      kv_unified=kv_unified) as fuser:
        list(fuser.fuse(pairs))
        stats, measured = fuser.stats, len(fuser._ctx.ubatches)
    assert stats.passes == measured
    assert stats.step_passes < stats.passes  # the shared prefix's own decodes are not steps
    assert stats.passes_per_step == pytest.approx(stats.step_passes / stats.steps)
    # streams: prompt chunks among generating rows add passes; unified: 64-token batches, one each
    assert stats.passes_per_step > 1 if not kv_unified else stats.passes == stats.decode_calls

