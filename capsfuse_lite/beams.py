"""Token search for one row: greedy and beam search, as pure bookkeeping over logits.

The engine owns the model and the KV cache; a search object only sees, at every step, one logits
row per running beam, and answers which (parent beam, token) pairs run on. The engine then forks
KV (``llama_memory_seq_cp``) so that new beam ``j`` holds parent ``parents[j]``'s history.

Greedy (``beams=1``): argmax of the logits, ties to the lowest token id, as
``generate(do_sample=False, num_beams=1)``.

Beam search reproduces ``generate(num_beams=N, do_sample=False, length_penalty=1.0,
early_stopping=False)`` for one unpadded row. Common to every transformers version:

- scores are ``log_softmax`` of the logits plus the running beam's summed log-probability; at the
  first step only beam 0 exists (transformers gives beams 1..N-1 a score of -1e9, which is the
  same thing);
- the best ``2N`` (beam, token) candidates are ranked by score; walking them in rank order, an
  EOS candidate ranked among the first ``N`` becomes a finished hypothesis (one ranked ``>= N``
  is skipped), every other candidate runs on until ``N`` beams run;
- at most ``N`` finished hypotheses are kept (the best); the answer is the best finished one,
  returned without its EOS.

The length normalisation and the stop heuristic changed between versions. ``length_offset``
selects which arithmetic is reproduced (``n`` = tokens generated so far, counting the token this
step picks; ``lp`` = length_penalty):

``length_offset = 0`` -- current transformers (vectorised ``_beam_search``, 4.4x-5.x):
  - a hypothesis finished by EOS at step ``n`` scores ``sum_logprobs / n**lp`` (its length counts
    the EOS; ``cur_len + 1 - decoder_prompt_len``);
  - at the step that reaches ``max_new_tokens`` every candidate ranked among the first ``N``
    (EOS or not) is finished with ``sum_logprobs / n**lp``;
  - after each step: stop once ``N`` hypotheses are finished and the best *running* beam's
    ``score / n**lp`` is not above the worst finished score.

``length_offset = P > 0`` -- transformers 4.28 (``BeamSearchScorer``/``BeamHypotheses``) with the
prompt occupying ``P`` positions of ``input_ids``. Upstream CapsFusion left-padded every prompt to
256 (``padding="max_length"``), so ``P = 256`` reproduces how CapsFusion-120M was generated:
  - a hypothesis finished by EOS at step ``n`` is ``input_ids`` *before* the EOS and scores
    ``sum_logprobs / (P + n - 1)**lp``;
  - after each step: stop once ``N`` hypotheses are finished and the best of all ``2N``
    candidates (EOS ones included) gives ``score / (P + n - 1)**lp <= worst finished``
    (``cur_len`` is read before the step's token is appended);
  - if ``max_new_tokens`` is reached without that stop, the ``N`` running beams are added with
    ``sum_logprobs / (P + n)**lp`` (``finalize`` sees the full sequence).

Ties between candidates of exactly equal score are ordered by (beam, token) index; torch.topk
does not promise an order there, so such rows may legitimately differ from transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (reference helper; the search uses :func:`top_candidates`)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_candidates(logits: np.ndarray, beam_logprobs: np.ndarray, k: int) -> list[tuple[float, int, int]]:
    """The ``k`` best (score, beam, token) continuations, best first, where
    ``score = beam_logprobs[beam] + log_softmax(logits[beam])[token]``; equal scores are ordered by
    beam then token. Only each row's log-normaliser is computed over the whole vocabulary."""
    logits = np.asarray(logits, dtype=np.float32)
    n_beams, vocab = logits.shape
    k_row = min(k, vocab)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = peak[:, 0].astype(np.float64) + np.log(np.exp(logits - peak).sum(axis=1, dtype=np.float64))
    # per row, the k_row largest logits; at the boundary, equal logits go to the lowest token ids
    kth = np.partition(logits, vocab - k_row, axis=1)[:, vocab - k_row]
    tokens = np.empty(n_beams * k_row, dtype=np.int64)
    for b in range(n_beams):
        above = np.flatnonzero(logits[b] > kth[b])
        tied = np.flatnonzero(logits[b] == kth[b])[: k_row - len(above)]
        tokens[b * k_row : (b + 1) * k_row] = np.concatenate((above, tied))
    beams = np.repeat(np.arange(n_beams), k_row)
    values = logits[beams, tokens].astype(np.float64) - log_norm[beams] + np.asarray(beam_logprobs, dtype=np.float64)[beams]
    order = np.lexsort((beams * vocab + tokens, -values))[:k]
    return [(float(values[i]), int(beams[i]), int(tokens[i])) for i in order]


@dataclass
class Hypothesis:
    score: float  # length-normalised
    tokens: list[int]  # generated tokens, EOS excluded
    finish_reason: str  # "eos" | "length"


@dataclass
class _Beam:
    tokens: list[int]
    logprob: float  # summed log-probability of the generated tokens


class GreedySearch:
    """Argmax decoding of one row (one beam)."""

    num_beams = 1

    def __init__(self, eos_id: int, max_new_tokens: int):
        self.eos_id = int(eos_id)
        self.max_new_tokens = int(max_new_tokens)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    def last_tokens(self) -> list[int]:
        return [self.tokens[-1]]

    def step(self, logits: np.ndarray) -> list[int]:
        """``logits``: (1, vocab). Returns the parent of each running beam ([0] or [] when done)."""
        token = int(np.argmax(logits[0]))
        if token == self.eos_id:
            self.finish_reason = "eos"
            return []
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
            return []
        return [0]

    def result(self) -> Hypothesis:
        return Hypothesis(0.0, list(self.tokens), self.finish_reason or "length")


@dataclass
class BeamSearch:
    """Beam search over one row; see the module docstring for the exact semantics."""

    num_beams: int
    eos_id: int
    max_new_tokens: int
    length_offset: int = 256
    length_penalty: float = 1.0
    running: list[_Beam] = field(default_factory=lambda: [_Beam([], 0.0)])
    finished: list[Hypothesis] = field(default_factory=list)
    n: int = 0  # tokens generated per running beam
    done: bool = False

    def __post_init__(self) -> None:
        if self.num_beams < 2:
            raise ValueError("beam search needs at least 2 beams; use GreedySearch for 1")
        if self.length_offset < 0:
            raise ValueError("length_offset must be >= 0")

    @property
    def n_generated(self) -> int:
        return self.n

    def last_tokens(self) -> list[int]:
        return [b.tokens[-1] for b in self.running]

    def _norm(self, logprob: float, length: int) -> float:
        return logprob / (length**self.length_penalty)

    def _add(self, hyp: Hypothesis) -> None:
        """Keep the best ``num_beams`` finished hypotheses; a new one must beat the worst kept
        (strictly) once the list is full, as ``BeamHypotheses.add``."""
        if len(self.finished) < self.num_beams:
            self.finished.append(hyp)
            return
        worst = min(range(len(self.finished)), key=lambda i: (self.finished[i].score, i))
        if hyp.score > self.finished[worst].score:
            del self.finished[worst]
            self.finished.append(hyp)

    def _worst_finished(self) -> float:
        return min(h.score for h in self.finished)

    def step(self, logits: np.ndarray) -> list[int]:
        """``logits``: (n_running, vocab), one row per running beam in order. Advances one token and
        returns, for each new running beam, the index of its parent ([] once done)."""
        if self.done:
            raise RuntimeError("step() on a finished beam search")
        n_beams = self.num_beams
        candidates = top_candidates(logits, np.array([b.logprob for b in self.running]), 2 * n_beams)
        self.n += 1
        if self.length_offset == 0:
            parents = self._step_current(candidates)
        else:
            parents = self._step_v428(candidates)
        return [] if self.done else parents

    def _step_current(self, candidates: list[tuple[float, int, int]]) -> list[int]:
        n_beams, n = self.num_beams, self.n
        last = n >= self.max_new_tokens
        new_running: list[_Beam] = []
        parents: list[int] = []
        stopped_all = True
        for rank, (score, parent, token) in enumerate(candidates):
            beam = self.running[parent]
            stops = token == self.eos_id or last
            if stops:
                if rank < n_beams:
                    if token == self.eos_id:
                        self._add(Hypothesis(self._norm(score, n), list(beam.tokens), "eos"))
                    else:
                        self._add(Hypothesis(self._norm(score, n), beam.tokens + [token], "length"))
                continue
            stopped_all = False
            if len(new_running) < n_beams:
                new_running.append(_Beam(beam.tokens + [token], score))
                parents.append(parent)
        if last or stopped_all or len(new_running) < n_beams:
            self.done = True
            return []
        self.running = new_running
        if len(self.finished) >= n_beams and not self._norm(new_running[0].logprob, n) > self._worst_finished():
            self.done = True
        return parents

    def _step_v428(self, candidates: list[tuple[float, int, int]]) -> list[int]:
        n_beams, offset = self.num_beams, self.length_offset
        n_before = self.n - 1
        new_running: list[_Beam] = []
        parents: list[int] = []
        for rank, (score, parent, token) in enumerate(candidates):
            beam = self.running[parent]
            if token == self.eos_id:
                if rank >= n_beams:
                    continue
                self._add(Hypothesis(self._norm(score, offset + n_before), list(beam.tokens), "eos"))
            else:
                new_running.append(_Beam(beam.tokens + [token], score))
                parents.append(parent)
            if len(new_running) == n_beams:
                break
        if len(new_running) < n_beams:
            raise RuntimeError("fewer running beams than num_beams: more than N EOS candidates in the top 2N")
        self.running = new_running
        best = candidates[0][0]
        if len(self.finished) >= n_beams and self._worst_finished() >= self._norm(best, offset + n_before):
            self.done = True
        elif self.n >= self.max_new_tokens:
            for beam in self.running:
                self._add(Hypothesis(self._norm(beam.logprob, offset + self.n), list(beam.tokens), "length"))
            self.done = True
        return parents

    def result(self) -> Hypothesis:
        """The best finished hypothesis (ties: the one finished last, as 4.28's sort-and-pop)."""
        if not self.finished:
            raise RuntimeError("beam search finished without any hypothesis")
        best = 0
        for i, h in enumerate(self.finished):
            if h.score >= self.finished[best].score:
                best = i
        return self.finished[best]
