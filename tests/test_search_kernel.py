"""The vectorised search step (beams.row_top_k / merge_beams) against the per-row reference
(beams.top_candidates): same tokens in the same order, scores to float32 rounding, whatever the
logits look like (ties at the top-k boundary, a maximum in the unfolded tail, huge magnitudes,
tiny vocabularies, non-finite values) and whatever the thread count."""

from __future__ import annotations

import numpy as np
import pytest

from capsfuse_lite.engine.search import BeamSearch, RowTopK, merge_beams, row_top_k, top_candidates

VOCAB = 32001  # CapsFus-LLaMA's vocabulary: 500 classes of 64 plus one tail column


def adversarial_logits(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    x = (rng.normal(size=(rows, vocab)) * 3).astype(np.float32)
    x[0] = 0.0  # every token tied
    x[1, 10:30] = x[1].max() + 1  # a tie block across the top-k boundary
    x[2, -1] = x[2].max() + 5  # the best token in the tail past the folded columns
    x[3] *= 60  # magnitudes beyond exp's float32 range: the shifted normaliser
    x[4] -= 500
    x[5, ::7] = x[5].max() + 2  # many equal maxima spread over the classes
    x[6, [3 % vocab, 503 % vocab, 1003 % vocab]] = 50  # several top tokens in one class (vocab 32001)
    x[7] = np.round(x[7])  # coarse values: ties everywhere
    return x


@pytest.mark.parametrize("vocab", [VOCAB, 1000, 257, 40])
@pytest.mark.parametrize("k", [1, 2, 6, 10])
def test_row_top_k_equals_the_reference(vocab, k):
    rng = np.random.default_rng(vocab + k)
    x = adversarial_logits(rng, 24, vocab)
    tokens, values, log_norm = row_top_k(x, k)
    for r in range(len(x)):
        ref = top_candidates(x[r : r + 1], np.zeros(1), k)
        assert tokens[r].tolist() == [t for _, _, t in ref], f"row {r}"
        assert (values[r] - log_norm[r]).tolist() == pytest.approx([s for s, _, _ in ref], abs=2e-6, rel=1e-7)
        assert values[r].tolist() == x[r, tokens[r]].tolist()


def test_threads_and_chunks_do_not_change_results():
    rng = np.random.default_rng(7)
    x = adversarial_logits(rng, 70, VOCAB)  # several chunks of rows
    one = RowTopK(1)(x, 6)
    many = RowTopK(3)
    try:
        two = many(x, 6)
        again = many(x[:5], 6)  # fewer chunks than threads
    finally:
        many.close()
    for a, b in zip(one, two):
        assert np.array_equal(a, b)
    assert np.array_equal(again[0], one[0][:5])


def test_non_finite_logits_do_not_crash():
    x = np.zeros((3, VOCAB), dtype=np.float32)
    x[0, 5] = np.nan
    x[1, 9] = np.inf
    x[2, :] = -np.inf
    x[2, 4] = 0
    tokens, values, _ = row_top_k(x, 6)
    assert tokens.shape == (3, 6) and tokens[1, 0] == 9 and tokens[2, 0] == 4


def test_merge_beams_equals_the_reference_over_beams():
    rng = np.random.default_rng(3)
    rows, beams, k = 9, 3, 6
    x = adversarial_logits(rng, rows * beams, VOCAB)
    x[3:6] = x[3]  # three identical beams: score ties across beams go to the lower beam
    beam_lp = rng.normal(size=(rows, beams)) * 2
    beam_lp[1] = 0.0
    tokens, values, log_norm = row_top_k(x, k)
    scores, parents, toks = merge_beams(tokens.reshape(rows, beams, k), values.reshape(rows, beams, k),
                                        log_norm.reshape(rows, beams), beam_lp, k)
    for r in range(rows):
        ref = top_candidates(x[r * beams : (r + 1) * beams], beam_lp[r], k)
        assert list(zip(parents[r].tolist(), toks[r].tolist())) == [(b, t) for _, b, t in ref], f"row {r}"
        assert scores[r].tolist() == pytest.approx([s for s, _, _ in ref], abs=2e-6, rel=1e-7)


def test_advance_with_merged_candidates_equals_step():
    """A BeamSearch driven by the batched candidates makes the same decisions as one driven by
    step(logits) (the per-row reference), through EOS, finished hypotheses and the stop rule."""
    rng = np.random.default_rng(11)
    eos, beams, vocab = 2, 3, 300
    for offset in (0, 256):
        ref = BeamSearch(beams, eos, max_new_tokens=12, length_offset=offset)
        fast = BeamSearch(beams, eos, max_new_tokens=12, length_offset=offset)
        while not ref.done:
            x = (rng.normal(size=(len(ref.running), vocab)) * 2).astype(np.float32)
            x[:, eos] += 2.5  # EOS often in the top candidates
            want = ref.step(x)
            tokens, values, log_norm = row_top_k(x, 2 * beams)
            n = len(fast.running)
            scores, parents, toks = merge_beams(tokens.reshape(1, n, -1), values.reshape(1, n, -1),
                                                log_norm.reshape(1, n), np.array([fast.beam_logprobs()]), 2 * beams)
            got = fast.advance(list(zip(scores[0].tolist(), parents[0].tolist(), toks[0].tolist())))
            assert got == want and fast.done == ref.done
            assert [b.tokens for b in fast.running] == [b.tokens for b in ref.running]
        assert (fast.result().tokens, fast.result().finish_reason) == (ref.result().tokens, ref.result().finish_reason)
