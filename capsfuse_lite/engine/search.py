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
    candidates (EOS ones included) gives ``score / (P + n)**lp <= worst finished``
    (``BeamSearchScorer.process`` adds 1 to ``cur_len`` before calling ``is_done``; found by the
    transformers 4.28.1 reference in tests/fixtures). 4.28.1 adds that 1 once per unfinished row
    of the batch, so in a batch the row at position j divides by ``P + n + j'`` (j' unfinished
    rows before it): a row's stopping step depended on its batch partners upstream. A row-by-row
    engine cannot copy that; this is the row on its own (no output of the reference data changes);
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
    beam then token. Per-row reference implementation: the engine uses :func:`row_top_k` on the
    whole decode step at once, then :func:`merge_beams`."""
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


# -- the whole decode step at once ---------------------------------------------------------------
#
# One decode step returns a (rows, vocab) float32 logits matrix (192 x 32001 at 64 slots x 3 beams).
# Per row the search needs its top-k logits (k = 2 x beams) in exact order (value descending, ties to
# the lowest token id) and its log-normaliser log(sum(exp(logits))). numpy has no fast top-k
# (np.argpartition costs ~10 ms on that matrix), so, reading the logits once, in cache-sized chunks
# of rows spread over worker threads:
#
# 1. e = exp(x) into a scratch buffer (shifted by the row's maximum for a row whose logits leave
#    float32's exp range), the log-normaliser from its row sum;
# 2. fold the first ``w * 2**j`` columns of e (``w = vocab >> j`` in [256, 512): all but < 2**j
#    columns) onto ``w`` columns with elementwise maxima: column c then holds the maximum of the
#    tokens congruent to c modulo w (exp is monotone: the classes are those of the logits);
# then once over all rows:
# 3. the k-th largest of those class maxima is a lower bound of the row's k-th largest value (they
#    are k distinct elements of the row), so every top-k token lies in a class whose maximum reaches
#    it, or in the few tail columns past the folded part;
# 4. only the members of those classes (about k x 64 values) and the tail are compared with the
#    bound (back in logit space, less a margin for exp/log rounding) and sorted exactly.
#
# Results equal :func:`top_candidates` (same tokens and order; log-normaliser to float32 rounding,
# as transformers' own float32 log_softmax).

_MIN_FOLD = 256
_CHUNK_ROWS = 16
_TINY = 1e-30  # a row sum of exp below this lost precision to underflow


def _fold_shape(vocab: int) -> tuple[int, int]:
    """(w, 2**j): the folded width and how many columns fold onto each (0, 0: too small to fold)."""
    times = 1
    while (vocab // (times * 2)) >= _MIN_FOLD:
        times *= 2
    return (vocab // times, times) if times > 1 else (0, 0)


def _reduce_chunk(x: np.ndarray, width: int, times: int, fold: np.ndarray, scratch: np.ndarray,
                  folded_out: np.ndarray, shift_out: np.ndarray, log_norm: np.ndarray) -> None:
    """The heavy, GIL-free part of :func:`row_top_k` for one chunk of rows, reading the logits once:
    ``e = exp(x - shift)`` into a cache-sized scratch buffer (``shift`` is 0 unless a row's logits
    leave float32's exp range, then its maximum), the log-normalisers from its row sums, and the
    class maxima of ``e`` (exp is monotone: they mark the same classes as those of ``x``)."""
    rows = x.shape[0]
    e = scratch[:rows]
    np.exp(x, out=e)
    sums = e.sum(axis=1)
    shift_out[:] = 0.0
    bad = ~(np.isfinite(sums) & (sums > _TINY))  # exp overflowed or underflowed
    for i in np.flatnonzero(bad):
        peak = x[i].max()
        shift_out[i] = peak
        np.subtract(x[i], peak, out=e[i])
        np.exp(e[i], out=e[i])
        sums[i] = e[i].sum()
    log_norm[:] = shift_out.astype(np.float64) + np.log(sums.astype(np.float64))
    span = width * times
    if span:
        half = span // 2
        f = np.maximum(e[:, :half], e[:, half:span], out=fold[:rows, :half])
        while f.shape[1] > width:
            half = f.shape[1] // 2
            f = np.maximum(f[:, :half], f[:, half:], out=f[:, :half])
        folded_out[:] = f


def _select(x: np.ndarray, k: int, width: int, times: int, folded: np.ndarray, shift: np.ndarray,
            tokens: np.ndarray, values: np.ndarray) -> bool:
    """Exact top-k of every row from the class maxima of exp(x - shift) (steps 2-3 above); False
    if some row lacks k candidates (non-finite logits: the caller then sorts fully).

    The bound in logit space is log(bound) + shift less a margin covering exp/log rounding, so
    every token at or above the k-th largest logit is a candidate; candidates are then ordered
    exactly by their logits (value descending, token ascending)."""
    rows = x.shape[0]
    span = width * times
    bound_e = np.partition(folded, width - k, axis=1)[:, width - k]
    r, c = np.nonzero(folded >= bound_e[:, None])
    with np.errstate(divide="ignore"):
        bound = np.log(bound_e.astype(np.float64)) + shift
    bound = (bound - 1e-4 * np.maximum(1.0, np.abs(bound))).astype(np.float32)  # exp/log rounding margin
    members = c[:, None] + width * np.arange(times)
    vals = x[r[:, None], members]
    hit_i, hit_j = np.nonzero(vals >= bound[r][:, None])
    cand_row, cand_tok, cand_val = r[hit_i], members[hit_i, hit_j], vals[hit_i, hit_j]
    tail = x[:, span:]
    if tail.shape[1]:
        tr, tc = np.nonzero(tail >= bound[:, None])
        cand_row = np.concatenate((cand_row, tr))
        cand_tok = np.concatenate((cand_tok, span + tc))
        cand_val = np.concatenate((cand_val, tail[tr, tc]))
    counts = np.bincount(cand_row, minlength=rows)
    if counts.min() < k:
        return False
    order = np.lexsort((cand_tok, -cand_val, cand_row))
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pick = order[first[:, None] + np.arange(k)]
    tokens[:] = cand_tok[pick]
    values[:] = cand_val[pick]
    return True


def _exact_top_k(x: np.ndarray, k: int, tokens: np.ndarray, values: np.ndarray) -> None:
    """Top-k by a full stable sort (small vocabularies, non-finite logits)."""
    keys = np.where(np.isnan(x), -np.inf, x)
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    tokens[:] = order
    values[:] = np.take_along_axis(x, order, axis=1)


class RowTopK:
    """Computes :func:`row_top_k` with reusable buffers and, for large steps, worker threads: the
    folds, exps and sums of row chunks run on several cores (numpy releases the GIL inside its array
    loops), the selection then runs once over all rows."""

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self._pool = None
        self._buffers: list[tuple[np.ndarray, np.ndarray]] = []  # (fold, exp scratch) per worker
        self._vocab = None

    def __call__(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, vocab = logits.shape
        k = min(k, vocab)
        tokens = np.empty((rows, k), dtype=np.int64)
        values = np.empty((rows, k), dtype=np.float32)
        log_norm = np.empty(rows, dtype=np.float64)
        if rows == 0:
            return tokens, values, log_norm
        width, times = _fold_shape(vocab)
        folded = np.empty((rows, max(width, 1)), dtype=np.float32)
        shift = np.empty(rows, dtype=np.float64)
        chunks = [(i, min(i + _CHUNK_ROWS, rows)) for i in range(0, rows, _CHUNK_ROWS)]
        workers = min(self.threads, len(chunks))
        if self._vocab != vocab:
            self._buffers, self._vocab = [], vocab
        while len(self._buffers) < workers:
            self._buffers.append((np.empty((_CHUNK_ROWS, max(vocab // 2, 1)), dtype=np.float32),
                                  np.empty((_CHUNK_ROWS, vocab), dtype=np.float32)))

        def run(worker: int) -> None:
            fold, scratch = self._buffers[worker]
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite logits: a broken model, not a crash
                for a, b in chunks[worker::workers]:
                    _reduce_chunk(logits[a:b], width, times, fold, scratch, folded[a:b], shift[a:b], log_norm[a:b])

        if workers <= 1:
            run(0)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="capsfuse-topk")
            futures = [self._pool.submit(run, w) for w in range(1, workers)]
            run(0)
            for f in futures:
                f.result()
        with np.errstate(invalid="ignore", over="ignore"):
            finite = bool(np.all(np.isfinite(log_norm)))
            if not (width and k <= width // 4 and finite and _select(logits, k, width, times, folded, shift, tokens, values)):
                _exact_top_k(logits, k, tokens, values)
        return tokens, values, log_norm

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def row_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (rows, vocab) float32 matrix: the ``k`` largest logits' token ids and values
    (value descending, equal values by lowest token id) and ``log(sum(exp(row)))`` (float64)."""
    return RowTopK()(np.asarray(logits, dtype=np.float32), k)


def merge_beams(tokens: np.ndarray, values: np.ndarray, log_norm: np.ndarray, beam_logprobs: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best continuations of each row over its beams: inputs are per (row, beam) --
    ``tokens``/``values`` (rows, beams, k') from :func:`row_top_k`, ``log_norm`` and
    ``beam_logprobs`` (rows, beams) -- outputs (rows, k) scores (float64), parent beams and tokens,
    best first, equal scores ordered by beam then token (as :func:`top_candidates`)."""
    rows, n_beams, k_row = tokens.shape
    scores = values.astype(np.float64) + (beam_logprobs - log_norm)[:, :, None]
    flat = scores.reshape(rows, n_beams * k_row)
    # a stable sort keeps the beam-major, then (value desc, token asc) order among equal scores
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(flat, order, axis=1), order // k_row,
            np.take_along_axis(tokens.reshape(rows, n_beams * k_row), order, axis=1))


def _end_tokens(eos) -> frozenset[int]:
    """The tokens that end a hypothesis: one EOS id, or a set of them (a model's end-of-generation
    tokens, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    return frozenset(int(t) for t in eos) if isinstance(eos, (set, frozenset, list, tuple)) else frozenset([int(eos)])


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

    def __init__(self, eos_id: int | frozenset[int], max_new_tokens: int):
        self.eos_id = eos_id
        self._eos = _end_tokens(eos_id)
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
        return self.advance(int(np.argmax(logits[0])))

    def advance(self, token: int) -> list[int]:
        """One step given the argmax token (the engine takes the argmax of all rows at once)."""
        if token in self._eos:
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
    eos_id: int | frozenset[int]  # the end token, or every token that ends generation (llama_vocab_is_eog)
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
        self._eos = _end_tokens(self.eos_id)

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
        beam_logprobs = np.array([b.logprob for b in self.running])
        return self.advance(top_candidates(logits, beam_logprobs, 2 * self.num_beams))

    def beam_logprobs(self) -> list[float]:
        return [b.logprob for b in self.running]

    def advance(self, candidates: list[tuple[float, int, int]]) -> list[int]:
        """One step given this row's ``2 x num_beams`` best (score, parent beam, token) candidates,
        best first (:func:`top_candidates`, or :func:`merge_beams` for many rows at once)."""
        if self.done:
            raise RuntimeError("step() on a finished beam search")
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
            stops = token in self._eos or last
            if stops:
                if rank < n_beams:
                    if token in self._eos:
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
            if token in self._eos:
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
        if len(self.finished) >= n_beams and self._worst_finished() >= self._norm(best, offset + self.n):
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
