"""Search bookkeeping without a model: greedy ties, candidate ranking, and the beam-search length
arithmetic of current transformers (length_offset=0) and of transformers 4.28 (length_offset=P)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capsfuse_lite.beams import BeamSearch, GreedySearch, log_softmax, top_candidates

EOS = 2
VOCAB = 6  # tokens 0, 1, 3, 4, 5 are words; 2 is EOS
X, Y, Z, W = 0, 1, 3, 4


def logits_from(probs: dict[int, float]) -> np.ndarray:
    """Logits whose softmax is ``probs`` (the rest of the mass spread over unlisted tokens)."""
    rest = [t for t in range(VOCAB) if t not in probs]
    left = 1.0 - sum(probs.values())
    p = np.array([probs.get(t, left / len(rest)) for t in range(VOCAB)])
    return np.log(p).astype(np.float32)


def run(search, table: dict[tuple, dict[int, float]]):
    """Drive ``search`` with next-token distributions looked up by each beam's tokens so far."""
    beams = [()]
    while True:
        logits = np.stack([logits_from(table[b]) for b in beams])
        parents = search.step(logits)
        if search.done:
            return search.result()
        beams = [tuple(b.tokens) for b in search.running]
        assert len(parents) == len(beams)


# Step 1 from the prompt: EOS 0.4, X 0.35, Y 0.15.  Step 2: after X, EOS 0.6 / Z 0.3; after Y, EOS 0.5 / W 0.4.
TABLE = {
    (): {EOS: 0.4, X: 0.35, Y: 0.15, Z: 0.06, W: 0.03},
    (X,): {EOS: 0.6, Z: 0.3, W: 0.05, X: 0.03, Y: 0.01},
    (Y,): {EOS: 0.5, W: 0.4, Z: 0.05, X: 0.03, Y: 0.01},
    (X, Z): {EOS: 0.9, X: 0.05, Y: 0.02, Z: 0.02, W: 0.005},
    (Y, W): {EOS: 0.9, X: 0.05, Y: 0.02, Z: 0.02, W: 0.005},
}


def test_current_transformers_arithmetic():
    """length_offset=0: an EOS hypothesis at step n is divided by n (the EOS counts); the search
    stops once the best running beam / n cannot beat the worst of N finished."""
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=0)
    best = run(search, TABLE)
    scores = sorted(h.score for h in search.finished)
    empty = math.log(0.4) / 1  # EOS at step 1: length 1
    x_eos = (math.log(0.35) + math.log(0.6)) / 2  # [X] + EOS at step 2: length 2
    assert scores == pytest.approx(sorted([empty, x_eos]), rel=1e-6)
    # step 2 ranks: X+EOS (0.21), X+Z (0.105), Y+EOS (0.075, rank 2 >= N: skipped), Y+W (0.06)
    assert search.n == 2  # stopped: best running (X,Z) log(0.105)/2 = -1.13 <= worst finished log(0.4) = -0.92
    assert (best.tokens, best.finish_reason) == ([X], "eos")
    assert best.score == pytest.approx(x_eos, rel=1e-6)


def test_transformers_4_28_arithmetic_with_padded_prompt():
    """length_offset=P: an EOS hypothesis is input_ids before the EOS, P + n - 1 long; the stop test
    divides the best of all 2N candidates by cur_len = P + n - 1. With P=10 the empty caption
    wins, as long left-padded prompts made upstream favour short outputs."""
    p = 10
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=p)
    best = run(search, TABLE)
    empty = math.log(0.4) / (p + 0)
    x_eos = (math.log(0.35) + math.log(0.6)) / (p + 1)
    assert sorted(h.score for h in search.finished) == pytest.approx(sorted([empty, x_eos]), rel=1e-6)
    assert search.n == 2  # best candidate X+EOS / (P + 1) equals the worst finished -> done
    assert (best.tokens, best.finish_reason) == ([], "eos")


def test_4_28_finalize_at_max_length_counts_the_full_sequence():
    """Reaching max_new_tokens without the stop test: the N running beams are added with
    sum_logprobs / (P + n)."""
    p = 256
    table = {(): {X: 0.5, Y: 0.3, EOS: 0.01}, (X,): {Z: 0.6, W: 0.3, EOS: 0.01}, (Y,): {Z: 0.4, W: 0.35, EOS: 0.01}}
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=2, length_offset=p)
    best = run(search, table)
    assert search.n == 2 and not [h for h in search.finished if h.finish_reason == "eos"]
    xz = (math.log(0.5) + math.log(0.6)) / (p + 2)
    xw = (math.log(0.5) + math.log(0.3)) / (p + 2)
    assert sorted(h.score for h in search.finished) == pytest.approx(sorted([xz, xw]), rel=1e-6)
    assert (best.tokens, best.finish_reason) == ([X, Z], "length")


def test_current_last_step_finishes_top_n_candidates_by_n():
    table = {(): {X: 0.5, Y: 0.3, EOS: 0.01}, (X,): {EOS: 0.45, Z: 0.35}, (Y,): {Z: 0.5, W: 0.4, EOS: 0.01}}
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=2, length_offset=0)
    best = run(search, table)
    # last step ranks: X+EOS (0.225), X+Z (0.175), Y+Z (0.15), ...: only the top N=2 are finished, by n=2
    got = sorted((h.score, tuple(h.tokens), h.finish_reason) for h in search.finished)
    want = sorted([
        ((math.log(0.5) + math.log(0.45)) / 2, (X,), "eos"),
        ((math.log(0.5) + math.log(0.35)) / 2, (X, Z), "length"),
    ])
    assert [g[1:] for g in got] == [w[1:] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-6)
    assert best.tokens == [X]


def test_eos_ranked_below_num_beams_is_skipped():
    table = {(): {X: 0.5, Y: 0.3, EOS: 0.15}}
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=5, length_offset=0)
    parents = search.step(np.stack([logits_from(table[()])]))
    assert parents == [0, 0]
    assert search.finished == []  # EOS was rank 2 >= N
    assert [b.tokens for b in search.running] == [[X], [Y]]


def test_parents_point_at_the_beams_that_continue():
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=5, length_offset=0)
    search.step(np.stack([logits_from({X: 0.5, Y: 0.4})]))
    # beam 0 = [X] (0.5), beam 1 = [Y] (0.4); Y's continuation dominates both
    parents = search.step(np.stack([logits_from({Z: 0.2, W: 0.2}), logits_from({Z: 0.9, W: 0.05})]))
    assert parents == [1, 0]  # Y+Z (0.36), then X+Z (0.1, tied with X+W: lower token id first)
    assert [b.tokens for b in search.running] == [[Y, Z], [X, Z]]


def test_greedy_ties_go_to_the_lowest_id_and_eos_ends():
    search = GreedySearch(eos_id=EOS, max_new_tokens=5)
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, [4, 1, 5]] = 3.0
    assert search.step(logits) == [0] and search.tokens == [1]
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, EOS] = 1.0
    assert search.step(logits) == [] and search.done
    assert (search.result().tokens, search.result().finish_reason) == ([1], "eos")


def test_greedy_stops_at_max_new_tokens():
    search = GreedySearch(eos_id=EOS, max_new_tokens=2)
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, 3] = 1.0
    assert search.step(logits) == [0]
    assert search.step(logits) == []
    assert (search.result().tokens, search.result().finish_reason) == ([3, 3], "length")


def test_top_candidates_match_full_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    beam_scores = np.array([-0.5, -1.0, -3.0])
    got = top_candidates(logits, beam_scores, 6)
    full = log_softmax(logits) + beam_scores[:, None]
    flat = np.argsort(-full.reshape(-1), kind="stable")[:6]
    assert [(b, t) for _, b, t in got] == [(i // 50, i % 50) for i in flat]
    assert [s for s, _, _ in got] == pytest.approx(full.reshape(-1)[flat].tolist(), rel=1e-6)


def test_top_candidates_break_ties_by_beam_then_token():
    logits = np.zeros((2, 8), dtype=np.float32)
    got = top_candidates(logits, np.zeros(2), 4)
    assert [(b, t) for _, b, t in got] == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_invalid_beam_settings():
    with pytest.raises(ValueError):
        BeamSearch(num_beams=1, eos_id=EOS, max_new_tokens=5)
    with pytest.raises(ValueError):
        BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=5, length_offset=-1)
