"""How many micro-batches (weight passes) llama.cpp splits one ``llama_decode`` batch into.

llama.cpp 0.3.36's KV cache (``llama_kv_cache::init_batch``) splits a batch into micro-batches
(ubatches) before computing it, and every ubatch is a full pass over the weights:

- one unified cache (``n_stream == 1``): ``split_simple``, consecutive runs of ``n_ubatch`` tokens
  in batch order, so ``ceil(n_tokens / n_ubatch)`` passes;
- one stream per sequence: ``split_equal(n_ubatch, sequential=true)``. Each ubatch starts at the
  first unused token in batch order; scanning on in batch order, it takes the sequence of every
  unused token whose id is the last taken id + 1 (a run of consecutive, increasing ids, at most
  ``n_ubatch + 1`` of them); then every sequence of the run contributes the same number of its next
  unused tokens: the fewest any of them has left, and at most ``max(1, n_ubatch // run length)``.

:func:`count_passes` replays those rules on the batch's sequence ids (one id per token, as this
engine's batches have) without touching llama.cpp; ``tests/test_ubatch.py`` checks it against the
ubatches llama.cpp really computes (:class:`~capsfuse_lite.engine.llama.Context`'s ``count_ubatches``).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import numpy as np


def count_passes(seq_ids: Sequence[int] | np.ndarray, n_ubatch: int, streams: bool) -> int:
    """Ubatches llama.cpp computes for a batch whose i-th token belongs to ``seq_ids[i]``."""
    n = len(seq_ids)
    if n == 0:
        return 0
    if not streams:
        return -(-n // n_ubatch)
    return len(split_equal_sequential(seq_ids, n_ubatch))


def split_equal_sequential(seq_ids: Sequence[int] | np.ndarray, n_ubatch: int) -> list[tuple[int, int, int]]:
    """The ubatches of ``split_equal(n_ubatch, sequential=true)`` as (first sequence id, sequences,
    tokens per sequence), in the order llama.cpp computes them."""
    seq = np.asarray(seq_ids, dtype=np.int64)
    n = len(seq)
    order = np.argsort(seq, kind="stable")  # token indices grouped by sequence, batch order within
    ids, starts, counts = np.unique(seq[order], return_index=True, return_counts=True)
    tokens = {int(s): order[a : a + c].tolist() for s, a, c in zip(ids, starts, counts)}
    taken = dict.fromkeys(tokens, 0)  # per sequence: its first `taken` tokens are used
    used = np.zeros(n, dtype=bool)
    first = 0  # every token before `first` is used
    out: list[tuple[int, int, int]] = []
    while True:
        while first < n and used[first]:
            first += 1
        if first >= n:
            return out
        s0 = int(seq[first])
        run = [s0]
        at = first
        while len(run) <= n_ubatch:
            nxt = run[-1] + 1
            idx = tokens.get(nxt)
            if idx is None or taken[nxt] >= len(idx):
                break
            # its first unused token after the one that added the previous sequence
            k = max(taken[nxt], bisect_right(idx, at))
            if k >= len(idx):
                break
            at = idx[k]
            run.append(nxt)
        per = min(min(len(tokens[s]) - taken[s] for s in run), max(1, n_ubatch // len(run)))
        for s in run:
            for i in tokens[s][taken[s] : taken[s] + per]:
                used[i] = True
            taken[s] += per
        out.append((s0, len(run), per))
