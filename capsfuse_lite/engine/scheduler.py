"""Continuous batching over one llama.cpp context: slots, the shared prefix, KV bookkeeping.

Sequence ids: with the prefix cache on, sequence 0 holds the instruction prefix (evaluated once);
slot ``s`` owns the ``beams`` sequence ids ``base + s*beams ... base + s*beams + beams - 1``. The KV
cache is unified (one cache shared by all sequences; beam search) or made of one stream per
sequence (greedy; see :mod:`capsfuse_lite.engine.plan`).

Every ``llama_decode`` packs, in this order:

1. one token per running beam of every row that is generating (logits requested for each);
2. prompt chunks of rows still being prefilled, oldest admission first, until the batch holds
   ``n_batch`` tokens; logits are requested only for a prompt's last token.

With per-sequence streams the same tokens are laid out in ascending sequence id instead (each
sequence's tokens together). llama.cpp splits a batch for a
multi-stream cache into micro-batches of *consecutive, increasing* sequence ids, each holding the
same number of tokens per sequence (``split_equal`` with ``sequential=true``), and every
micro-batch is a full pass over the weights. In admission order, once rows finish at different
steps, a decode step of N rows broke into up to N such passes; in sequence order a step whose slots
are all busy is one pass for its first token of every sequence (prompt chunks still add passes for
their remaining tokens).

A row is admitted into a free slot when the KV cache can hold its worst case: its own prompt
tokens (those after the part shared with the prefix) plus ``beams * max_new_tokens`` generated
cells. The shared part is copied from sequence 0 with ``llama_memory_seq_cp`` (positions
``[0, lcp)``, where ``lcp`` is the longest common prefix of the prefix's ids and the row's full
tokenization, so the model sees exactly the full prompt's ids). When a row finishes, its slot's
sequences are removed (``llama_memory_seq_rm``), its reservation released, and the slot refilled
in the same step.

After a decode, the whole step is searched at once: one (outputs, vocab) logits view, the argmax of
every row (greedy) or every beam's top ``2 x beams`` tokens and log-normaliser in a few vectorised
passes (:class:`~capsfuse_lite.engine.search.RowTopK`, on worker threads for large steps), candidates merged
per row (:func:`~capsfuse_lite.engine.search.merge_beams`); only the small per-row bookkeeping (finished
hypotheses, stop rules) is Python. Beam forks copy KV membership only from the position where the
two beams' histories diverge.

Time is split into ``device_s`` (inside ``llama_decode`` and waiting for its results) and
``host_s`` (everything else the scheduler does between decodes: search, KV bookkeeping, batch
filling, admitting and tokenizing rows). On a GPU, host time is time the GPU waits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from capsfuse_lite.engine.search import BeamSearch, GreedySearch, Hypothesis, RowTopK, merge_beams
from capsfuse_lite.errors import ConfigError
from capsfuse_lite.engine.llama import Batch, Context
from capsfuse_lite.machine import ThreadGovernor
from capsfuse_lite.engine.prompts import Prompt, common_prefix_length
from capsfuse_lite.engine.ubatch import count_passes

PREFIX_SEQ = 0


@dataclass
class Finished:
    """A row the scheduler is done with."""

    index: int
    prompt: Prompt
    hypothesis: Hypothesis


@dataclass
class _Row:
    index: int
    prompt: Prompt
    slot: int
    search: GreedySearch | BeamSearch
    beam_seqs: list[int]  # sequence id of each running beam, in beam order
    n_prefilled: int  # prompt tokens already in the KV cache for this row
    reserved: int  # KV cells reserved for this row

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < self.prompt_len


@dataclass
class SchedulerCounters:
    decode_calls: int = 0
    evaluated_tokens: int = 0  # tokens passed to llama_decode (prefix, prompt chunks, beams)
    passes: int = 0  # micro-batches llama.cpp split the decodes into, each a pass over the weights
    step_passes: int = 0  # the same, main-loop steps only (the prefix's own decodes not included)
    max_active_rows: int = 0
    steps: int = 0  # decode steps of the main loop (the prefix's own decodes not included)
    device_s: float = 0.0  # inside llama_decode + waiting for its results
    host_s: float = 0.0  # the rest of the main loop (search, KV bookkeeping, batching, admission)
    # host_s broken down (the remainder is loop overhead):
    admit_s: float = 0.0  # pulling rows, building and tokenizing prompts, placing the prefix
    batch_s: float = 0.0  # filling the next batch
    logits_s: float = 0.0  # argmax / top-k and log-normalisers over the step's logits
    search_s: float = 0.0  # per-row search bookkeeping (finished hypotheses, stop rules)
    kv_s: float = 0.0  # beam forks and freeing finished rows' sequences


@dataclass
class Scheduler:
    ctx: Context
    batch: Batch
    slots: int
    beams: int
    max_new_tokens: int
    length_offset: int
    eos_id: int | frozenset[int]  # the model's end-of-generation tokens (Vocab.eog_ids)
    prefix_ids: list[int] | None  # None: prefix cache off
    host_threads: int = 1  # threads for the vectorised search of large steps
    streams: bool = False  # one KV stream per sequence (greedy), else one unified cache
    governor: ThreadGovernor | None = None  # CPU runs: llama.cpp threads follow the free cores
    counters: SchedulerCounters = field(default_factory=SchedulerCounters)

    def __post_init__(self) -> None:
        base = 1 if self.prefix_ids is not None else 0
        self.slot_seqs = [[base + s * self.beams + b for b in range(self.beams)] for s in range(self.slots)]
        if self.streams and self.beams != 1:
            raise ConfigError("per-sequence KV streams need beams=1 (beam forks share cells in one cache)")
        if self.batch.capacity < self.slots * self.beams:
            raise ConfigError(
                f"n_batch={self.batch.capacity} cannot hold one token for each of slots x beams = "
                f"{self.slots * self.beams} sequences; raise n_batch or lower slots"
            )
        self._top_k = RowTopK(self.host_threads)
        self.active_rows: list[_Row] = []  # the rows of the running step (read by progress displays)

    def close(self) -> None:
        self._top_k.close()

    # -- sizing -------------------------------------------------------------------------------

    def prefix_len(self) -> int:
        return len(self.prefix_ids) if self.prefix_ids is not None else 0

    def shared_len(self, prompt: Prompt) -> int:
        """Prompt tokens taken from the prefix sequence (at least one token is left to evaluate)."""
        if self.prefix_ids is None:
            return 0
        return min(common_prefix_length(self.prefix_ids, prompt.token_ids), len(prompt.token_ids) - 1)

    def row_need(self, prompt: Prompt) -> int:
        """KV cells a row may occupy beyond the shared prefix."""
        return len(prompt.token_ids) - self.shared_len(prompt) + self.beams * self.max_new_tokens

    def _new_search(self) -> GreedySearch | BeamSearch:
        if self.beams == 1:
            return GreedySearch(self.eos_id, self.max_new_tokens)
        return BeamSearch(self.beams, self.eos_id, self.max_new_tokens, self.length_offset)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, prompts: Iterator[tuple[int, Prompt]], should_stop: Callable[[], bool]) -> Iterator[Finished]:
        """Fuse every (index, prompt) of ``prompts`` (pulled one at a time, only when a slot and KV
        space are free); yields rows as they finish. Returns early, after the current decode step,
        once ``should_stop()`` is true. The KV cache is cleared on entry and on exit."""
        ctx = self.ctx
        ctx.clear()
        try:
            yield from self._run(prompts, should_stop)
        finally:
            if ctx._handle is not None:
                ctx.clear()

    def _run(self, prompts: Iterator[tuple[int, Prompt]], should_stop: Callable[[], bool]) -> Iterator[Finished]:
        ctx, batch, counters = self.ctx, self.batch, self.counters
        reserved = self.prefix_len()
        if self.prefix_ids:
            for start in range(0, len(self.prefix_ids), batch.capacity):
                batch.clear()
                chunk = self.prefix_ids[start : start + batch.capacity]
                batch.add_sequence(chunk, start, PREFIX_SEQ, logits_last=False)
                self._decode()
        free_slots = deque(range(self.slots))
        active: list[_Row] = []  # admission order
        self.active_rows = active
        waiting: tuple[int, Prompt] | None = None
        exhausted = False
        clock = time.perf_counter
        while True:
            step_start = clock()
            # admit rows while a slot and KV space are free
            while free_slots and not exhausted:
                if waiting is None:
                    waiting = next(prompts, None)
                    if waiting is None:
                        exhausted = True
                        break
                index, prompt = waiting
                need = 0 if self.streams else self.row_need(prompt)  # a stream holds any one row
                if reserved + need > ctx.n_ctx:
                    if not active:
                        raise ConfigError(
                            f"n_ctx={ctx.n_ctx} cannot hold row {index}: it needs {need} KV cells besides the "
                            f"{self.prefix_len()}-token shared prefix; raise n_ctx"
                        )
                    break
                waiting = None
                active.append(self._admit(index, prompt, free_slots.popleft(), need))
                reserved += need
            if not active:
                return
            counters.max_active_rows = max(counters.max_active_rows, len(active))

            # one decode step
            t_fill = clock()
            counters.admit_s += t_fill - step_start
            generating, completing, order = self._fill_batch(active)
            counters.batch_s += clock() - t_fill
            device = self._decode(step=True)
            finished = self._search(generating, completing, ctx.outputs(batch.n_outputs), order)
            t_free = clock()
            for row in finished:
                for seq in self.slot_seqs[row.slot]:
                    ctx.seq_rm(seq)
                active.remove(row)
                free_slots.append(row.slot)
                reserved -= row.reserved
            if self.governor is not None:
                threads = self.governor.poll()
                if threads is not None:
                    ctx.set_threads(threads)
            counters.kv_s += clock() - t_free
            counters.steps += 1
            counters.host_s += clock() - step_start - device
            for row in finished:
                yield Finished(row.index, row.prompt, row.search.result())
            if should_stop():
                return

    def _decode(self, step: bool = False) -> float:
        """Evaluate the batch and wait for its results; returns the seconds that took."""
        batch, counters = self.batch, self.counters
        passes = count_passes(batch.seq[: batch.n_tokens], self.ctx.n_ubatch, self.streams)
        started = time.perf_counter()
        self.ctx.decode(batch)
        self.ctx.synchronize()
        elapsed = time.perf_counter() - started
        counters.device_s += elapsed
        counters.decode_calls += 1
        counters.evaluated_tokens += batch.n_tokens
        counters.passes += passes
        if step:
            counters.step_passes += passes
        return elapsed

    def _admit(self, index: int, prompt: Prompt, slot: int, need: int) -> _Row:
        seq0 = self.slot_seqs[slot][0]
        shared = self.shared_len(prompt)
        if shared > 0 and self.streams:
            # across streams llama.cpp copies whole streams (on the device, at the next decode); the
            # prefix stream holds only the prefix, of which the row keeps its shared part
            self.ctx.seq_cp(PREFIX_SEQ, seq0)
            if shared < self.prefix_len():
                self.ctx.seq_rm(seq0, shared, -1)
        elif shared > 0:
            self.ctx.seq_cp(PREFIX_SEQ, seq0, 0, shared)
        return _Row(index, prompt, slot, self._new_search(), [seq0], shared, need)

    def _fill_batch(self, active: list[_Row]) -> tuple[list[_Row], list[_Row], np.ndarray | None]:
        """Fill the batch: one token per running beam of every generating row, then prompt chunks
        of prefilling rows, oldest admission first, in what the generating rows leave free. Laid out
        generating rows first, then prompt chunks, in admission order (unified cache), or row by row
        in ascending sequence id (per-sequence streams). Returns the generating rows, the rows whose
        prompt completes in this step, and ``order``: for each of ``generating + completing``, the
        index of its (first) logits row, or None when the outputs are already in that order."""
        batch = self.batch
        batch.clear()
        last = {id(row): row.search.last_tokens() for row in active if not row.prefilling}
        budget = batch.capacity - sum(len(tokens) for tokens in last.values())
        chunks: dict[int, int] = {}
        for row in active:
            if row.prefilling and budget > 0:
                chunks[id(row)] = chunk = min(row.prompt_len - row.n_prefilled, budget)
                budget -= chunk
        generating = [row for row in active if id(row) in last]
        if self.streams:
            layout = sorted((row for row in active if id(row) in last or id(row) in chunks), key=lambda r: r.slot)
        else:
            layout = generating + [row for row in active if id(row) in chunks]
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outputs: list[int] = []
        completing: list[_Row] = []
        output_of: dict[int, int] = {}  # id(row) -> index of its first logits row in the step's outputs
        n_out = 0
        for row in layout:
            if id(row) in last:
                new = last[id(row)]
                tokens += new
                positions += [row.prompt_len + row.search.n_generated - 1] * len(new)
                seqs += row.beam_seqs
                outputs += [1] * len(new)
                output_of[id(row)] = n_out
                n_out += len(new)
                continue
            start, chunk = row.n_prefilled, chunks[id(row)]
            tokens += row.prompt.token_ids[start : start + chunk]
            positions += range(start, start + chunk)
            seqs += [row.beam_seqs[0]] * chunk
            row.n_prefilled += chunk
            completes = not row.prefilling
            outputs += [0] * (chunk - 1) + [int(completes)]
            if completes:
                completing.append(row)
                output_of[id(row)] = n_out
                n_out += 1
        batch.add_tokens(tokens, positions, seqs, outputs)
        if not self.streams:
            return generating, completing, None
        return generating, completing, np.array([output_of[id(row)] for row in generating + completing], dtype=np.intp)

    def _search(self, generating: list[_Row], completing: list[_Row], logits: np.ndarray,
                order: np.ndarray | None = None) -> list[_Row]:
        """Advance every row by one token from the step's logits (row ``order[i]`` for the i-th of
        ``generating + completing``, else in that order); fork KV for beams; returns the rows that
        finished."""
        finished: list[_Row] = []
        counters, clock = self.counters, time.perf_counter
        t0 = clock()
        if self.beams == 1:
            best = logits.argmax(axis=1)
            tokens = (best if order is None else best[order]).tolist()
            t1 = clock()
            for row, token in zip(generating + completing, tokens):
                row.search.advance(token)
                if row.search.done:
                    finished.append(row)
            counters.logits_s += t1 - t0
            counters.search_s += clock() - t1
            return finished
        k = 2 * self.beams
        top_tokens, top_values, log_norm = self._top_k(logits, k)
        t1 = clock()
        counters.logits_s += t1 - t0
        kv = 0.0
        advances: list[tuple[_Row, list]] = []
        n_gen = len(generating) * self.beams
        if generating:
            beam_lp = np.array([row.search.beam_logprobs() for row in generating], dtype=np.float64)
            shape = (len(generating), self.beams)
            scores, parents, tokens = merge_beams(top_tokens[:n_gen].reshape(*shape, -1), top_values[:n_gen].reshape(*shape, -1),
                                                  log_norm[:n_gen].reshape(shape), beam_lp, k)
            for row, s, p, t in zip(generating, scores.tolist(), parents.tolist(), tokens.tolist()):
                advances.append((row, list(zip(s, p, t))))
        if completing:
            scores = top_values[n_gen:].astype(np.float64) - log_norm[n_gen:, None]
            for row, s, t in zip(completing, scores.tolist(), top_tokens[n_gen:].tolist()):
                advances.append((row, list(zip(s, [0] * len(s), t))))
        for row, candidates in advances:
            before = [beam.tokens for beam in row.search.running]
            parents = row.search.advance(candidates)
            if row.search.done:
                finished.append(row)
            else:
                t_fork = clock()
                self._fork(row, parents, before)
                kv += clock() - t_fork
        counters.kv_s += kv
        counters.search_s += clock() - t1 - kv
        return finished

    def _fork(self, row: _Row, parents: list[int], histories_before: list[list[int]]) -> None:
        """Give new beam ``j`` the KV history of old beam ``parents[j]``: the first child of a parent
        keeps the parent's sequence, other children get a free sequence of the slot holding a copy
        (``llama_memory_seq_cp``; cells are shared, nothing is re-evaluated). Sequences of beams that
        have no child are emptied. A sequence that held another beam's history keeps the cells the
        two histories share (positions before they diverge) and exchanges only the rest."""
        old = row.beam_seqs
        if parents == list(range(len(old))):
            return
        new: list[int | None] = [None] * len(parents)
        claimed: set[int] = set()
        for j, p in enumerate(parents):
            if old[p] not in claimed:
                claimed.add(old[p])
                new[j] = old[p]
        histories = dict(zip(old, histories_before))  # every token of an old beam is in its KV
        spare = [s for s in self.slot_seqs[row.slot] if s not in claimed]
        ctx = self.ctx
        for j, p in enumerate(parents):
            if new[j] is None:
                dst, src = spare.pop(0), old[p]
                if dst in histories:  # a beam without children: keep the shared history
                    start = row.prompt_len + common_prefix_length(histories[dst], histories[src])
                    ctx.seq_rm(dst, start, -1)
                    ctx.seq_cp(src, dst, start, -1)
                else:  # an unused sequence of the slot: empty
                    ctx.seq_cp(src, dst)
                new[j] = dst
        for s in spare:
            if s in histories:
                ctx.seq_rm(s)
        row.beam_seqs = new
