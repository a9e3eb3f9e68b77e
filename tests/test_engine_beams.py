"""Search bookkeeping without a model: greedy ties, candidate ranking, and the beam-search length
arithmetic of current transformers (length_offset=0) and of transformers 4.28 (length_offset=P)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capsfuse_lite.engine.search import BeamSearch, GreedySearch, log_softmax, top_candidates

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
    """Drive ``search`` with next-token distributions looked up by each beam's tokens so far
    (every prefix the search reaches must be in ``table``)."""
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
    (X, Z, X): {X: 0.5}, (X, Z, Y): {X: 0.5}, (Y, W, X): {X: 0.5},  # reached only by the stop test's step
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
    divides the best of all 2N candidates by P + n (4.28.1's BeamSearchScorer.process adds 1 to
    cur_len = input_ids.shape[-1] before is_done, for the first row of a batch). With P=10 the empty
    caption wins, as long left-padded prompts made upstream favour short outputs."""
    p = 10
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=p)
    best = run(search, TABLE)
    empty = math.log(0.4) / (p + 0)
    x_eos = (math.log(0.35) + math.log(0.6)) / (p + 1)
    assert sorted(h.score for h in search.finished) == pytest.approx(sorted([empty, x_eos]), rel=1e-6)
    # step 2: best candidate X+EOS: log(0.21) / (P + 2) = -0.130 > worst finished -0.142 -> go on;
    # step 3: X,Z+EOS and Y,W+EOS score below the worst finished (not kept); best log(0.0945) / (P + 3)
    # = -0.182 <= -0.142 -> done
    assert search.n == 3
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


@pytest.mark.parametrize("offset", [0, 256])
def test_eos_ranked_below_num_beams_is_skipped(offset):
    """Walking the 2N candidates in rank order, an EOS ranked >= N does not finish a hypothesis,
    even while fewer than N beams have been collected. Step 2 ranks: X+EOS (0.2, finished), X+Z
    (0.19), Y+EOS (0.16, rank 2: skipped), Y+W (0.14)."""
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=5, length_offset=offset)
    assert search.step(np.stack([logits_from({X: 0.5, Y: 0.4, EOS: 0.05})])) == [0, 0]
    assert search.finished == []  # EOS was rank 2 >= N
    parents = search.step(np.stack([logits_from({EOS: 0.4, Z: 0.38}), logits_from({EOS: 0.4, W: 0.35})]))
    assert parents == [0, 1]
    assert [h.tokens for h in search.finished] == [[X]]
    assert [b.tokens for b in search.running] == [[X, Z], [Y, W]]


# Step 1: EOS finishes the empty caption A; X carries on. Step 2: X+EOS is the best candidate and
# finishes B (the worst of N=2); X+Z runs on. Steps 3-4: X,Z,W then EOS, almost surely: a caption
# that beats A, found only if the search did not stop at step 2.
def _late_winner(p_empty: float, p_x: float, p_x_eos: float, p_x_z: float) -> dict:
    return {
        (): {EOS: p_empty, X: p_x, Y: 0.99 - p_empty - p_x},
        (X,): {EOS: p_x_eos, Z: p_x_z, W: 0.99 - p_x_eos - p_x_z},
        (Y,): {Z: 0.5, W: 0.3, EOS: 0.1},
        (X, Z): {W: 0.99, EOS: 0.002},
        (X, W): {Z: 0.5, EOS: 0.3},
        (Y, Z): {Z: 0.5, EOS: 0.3},
        (X, Z, W): {EOS: 0.99},
        (X, W, Z): {EOS: 0.5, X: 0.3},
        (Y, Z, Z): {EOS: 0.5, X: 0.3},
    }


def test_4_28_stop_test_divides_by_cur_len_after_the_step():
    """4.28.1 stops when worst finished >= best candidate / (P + n), n counting this step's token.
    Here at step 2 the best candidate X+EOS / (P + 2) = -0.1055 > B = X+EOS / (P + 1) = -0.1151, so
    4.28 goes on and finds X,Z,W (-0.1023 > A = -0.1050); dividing by P + n - 1 would stop at
    step 2 (equal) and answer the empty caption."""
    p = 10
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=4, length_offset=p)
    best = run(search, _late_winner(0.35, 0.6, 0.47, 0.45))
    a = math.log(0.35) / p
    xzw = math.log(0.6 * 0.45 * 0.99 * 0.99) / (p + 3)
    assert (best.tokens, best.finish_reason, search.n) == ([X, Z, W], "eos", 4)
    assert sorted(h.score for h in search.finished) == pytest.approx(sorted([a, xzw]), rel=1e-6)


def test_4_28_stop_test_uses_the_best_of_all_candidates_eos_included():
    """The stop test's best score is the best of the 2N candidates, EOS ones included
    (``next_scores.max()``), not the best beam that runs on. At step 2 the best candidate is X+EOS:
    / (P + 2) = -0.0987 > worst finished B = -0.1077, so 4.28 goes on (to X,Z,W = -0.1023 > A =
    -0.1036); the best running beam X+Z / (P + 2) = -0.1091 would have stopped it."""
    p = 10
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=4, length_offset=p)
    best = run(search, _late_winner(0.355, 0.6, 0.51, 0.45))
    assert (best.tokens, best.finish_reason, search.n) == ([X, Z, W], "eos", 4)


@pytest.mark.parametrize("offset", [0, 256])
def test_stop_test_on_equal_scores(offset):
    """With length_penalty=0 scores are plain sums, so equal scores are exact. At step 2, X+EOS
    (finished, the worst kept) ties X+Z (EOS has the lower id, so it ranks first). 4.28
    (offset 256) stops when worst >= best candidate (X+EOS itself): equal, done. Current
    transformers (offset 0) goes on while best running beam > worst: X+Z equals it, done."""
    table = {
        (): {EOS: 0.5, X: 0.3, Y: 0.15},
        (X,): {EOS: 0.4, Z: 0.4}, (Y,): {W: 0.4, EOS: 0.3},
        (X, Z): {EOS: 0.5}, (Y, W): {EOS: 0.5}, (X, Z, X): {EOS: 0.5}, (X, Z, Y): {EOS: 0.5},
    }
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=offset, length_penalty=0.0)
    best = run(search, table)
    assert search.n == 2
    assert sorted(h.score for h in search.finished) == pytest.approx(sorted([math.log(0.5), math.log(0.12)]))
    assert best.tokens == []


def test_4_28_equal_scores_the_hypothesis_finished_last_wins():
    """4.28 sorts the kept hypotheses by score (stable) and pops the last: of equal scores, the one
    added last wins. X and Y tie at step 1; X+EOS and Y+EOS tie at step 2 (beam 0 first)."""
    table = {
        (): {X: 0.45, Y: 0.45, EOS: 0.05},
        (X,): {EOS: 0.6, Z: 0.3}, (Y,): {EOS: 0.6, W: 0.3},
        (X, Z): {EOS: 0.9}, (Y, W): {EOS: 0.9},
        (X, Z, Y): {X: 0.5}, (X, Z, X): {X: 0.5}, (X, Z, Z): {X: 0.5}, (Y, W, X): {X: 0.5},
    }
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=256)
    best = run(search, table)
    scores = [h.score for h in search.finished]
    assert [h.tokens for h in search.finished] == [[X], [Y]] and scores[0] == scores[1]
    assert best.tokens == [Y]


def test_4_28_a_new_hypothesis_must_beat_the_worst_kept_strictly():
    """BeamHypotheses.add keeps a new hypothesis in a full list only if it scores above the worst:
    Y+EOS ties X+EOS (added just before, the worst) and is not kept."""
    table = {
        (): {EOS: 0.5, X: 0.2, Y: 0.2},
        (X,): {EOS: 0.5, Z: 0.3}, (Y,): {EOS: 0.5, W: 0.3},
        (X, Z): {EOS: 0.9}, (Y, W): {EOS: 0.9},
        (X, Z, X): {X: 0.5}, (X, Z, Y): {X: 0.5}, (X, Z, Z): {X: 0.5}, (Y, W, X): {X: 0.5},
    }
    search = BeamSearch(num_beams=2, eos_id=EOS, max_new_tokens=10, length_offset=256)
    best = run(search, table)
    assert sorted(h.tokens for h in search.finished) == [[], [X]]
    assert best.tokens == []


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
