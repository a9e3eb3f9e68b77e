"""Continuous batching over one llama.cpp context: slots, the shared prefix, KV bookkeeping.

Sequence ids: with the prefix cache on, sequence 0 holds the instruction prefix (evaluated once);
slot ``s`` owns the ``beams`` sequence ids ``base + s*beams ... base + s*beams + beams - 1``.

Every ``llama_decode`` packs, in this order:

1. one token per running beam of every row that is generating (logits requested for each);
2. prompt chunks of rows still being prefilled, oldest admission first, until the batch holds
   ``n_batch`` tokens; logits are requested only for a prompt's last token.

A row is admitted into a free slot when the KV cache can hold its worst case: its own prompt
tokens (those after the part shared with the prefix) plus ``beams * max_new_tokens`` generated
cells. The shared part is copied from sequence 0 with ``llama_memory_seq_cp`` (positions
``[0, lcp)``, where ``lcp`` is the longest common prefix of the prefix's ids and the row's full
tokenization, so the model sees exactly the full prompt's ids). When a row finishes, its slot's
sequences are removed (``llama_memory_seq_rm``), its reservation released, and the slot refilled
in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .beams import BeamSearch, GreedySearch, Hypothesis
from .errors import ConfigError
from .llama import Batch, Context
from .prompts import Prompt, common_prefix_length

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
    max_active_rows: int = 0


@dataclass
class Scheduler:
    ctx: Context
    batch: Batch
    slots: int
    beams: int
    max_new_tokens: int
    length_offset: int
    eos_id: int
    prefix_ids: list[int] | None  # None: prefix cache off
    counters: SchedulerCounters = field(default_factory=SchedulerCounters)

    def __post_init__(self) -> None:
        base = 1 if self.prefix_ids is not None else 0
        self.slot_seqs = [[base + s * self.beams + b for b in range(self.beams)] for s in range(self.slots)]
        if self.batch.capacity < self.slots * self.beams:
            raise ConfigError(
                f"n_batch={self.batch.capacity} cannot hold one token for each of slots x beams = "
                f"{self.slots * self.beams} sequences; raise n_batch or lower slots"
            )

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
        ctx, batch = self.ctx, self.batch
        reserved = self.prefix_len()
        if self.prefix_ids:
            for start in range(0, len(self.prefix_ids), batch.capacity):
                batch.clear()
                chunk = self.prefix_ids[start : start + batch.capacity]
                batch.add_sequence(chunk, start, PREFIX_SEQ, logits_last=False)
                self._decode()
        free_slots = deque(range(self.slots))
        active: list[_Row] = []  # admission order
        waiting: tuple[int, Prompt] | None = None
        exhausted = False
        while True:
            # admit rows while a slot and KV space are free
            while free_slots and not exhausted:
                if waiting is None:
                    waiting = next(prompts, None)
                    if waiting is None:
                        exhausted = True
                        break
                index, prompt = waiting
                need = self.row_need(prompt)
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
            self.counters.max_active_rows = max(self.counters.max_active_rows, len(active))

            # one decode step
            samplers = self._fill_batch(active)
            self._decode()
            finished: list[_Row] = []
            for row, start, count in samplers:
                logits = np.stack([ctx.logits(start + i) for i in range(count)])
                parents = row.search.step(logits)
                if row.search.done:
                    finished.append(row)
                else:
                    self._fork(row, parents)
            for row in finished:
                for seq in self.slot_seqs[row.slot]:
                    ctx.seq_rm(seq)
                active.remove(row)
                free_slots.append(row.slot)
                reserved -= row.reserved
                yield Finished(row.index, row.prompt, row.search.result())
            if should_stop():
                return

    def _decode(self) -> None:
        self.ctx.decode(self.batch)
        self.counters.decode_calls += 1
        self.counters.evaluated_tokens += self.batch.n_tokens

    def _admit(self, index: int, prompt: Prompt, slot: int, need: int) -> _Row:
        seq0 = self.slot_seqs[slot][0]
        shared = self.shared_len(prompt)
        if shared > 0:
            self.ctx.seq_cp(PREFIX_SEQ, seq0, 0, shared)
        return _Row(index, prompt, slot, self._new_search(), [seq0], shared, need)

    def _fill_batch(self, active: list[_Row]) -> list[tuple[_Row, int, int]]:
        """Fill the batch; returns (row, first batch index, number of logits rows) to sample."""
        batch = self.batch
        batch.clear()
        samplers = []
        for row in active:
            if row.prefilling:
                continue
            pos = row.prompt_len + row.search.n_generated - 1
            start = batch.n_tokens
            for seq, token in zip(row.beam_seqs, row.search.last_tokens()):
                batch.add(token, pos, (seq,), True)
            samplers.append((row, start, len(row.beam_seqs)))
        for row in active:
            if not row.prefilling:
                continue
            if batch.free == 0:
                break
            ids = row.prompt.token_ids
            chunk = min(row.prompt_len - row.n_prefilled, batch.free)
            completes = row.n_prefilled + chunk == row.prompt_len
            last = batch.add_sequence(ids[row.n_prefilled : row.n_prefilled + chunk], row.n_prefilled, row.beam_seqs[0], completes)
            row.n_prefilled += chunk
            if completes:
                samplers.append((row, last, 1))
        return samplers

    def _fork(self, row: _Row, parents: list[int]) -> None:
        """Give new beam ``j`` the KV history of old beam ``parents[j]``: the first child of a parent
        keeps the parent's sequence, other children get a free sequence of the slot holding a copy
        (``llama_memory_seq_cp``; cells are shared, nothing is re-evaluated). Sequences of beams that
        have no child are emptied."""
        old = row.beam_seqs
        new: list[int | None] = [None] * len(parents)
        claimed: set[int] = set()
        for j, p in enumerate(parents):
            if old[p] not in claimed:
                claimed.add(old[p])
                new[j] = old[p]
        spare = [s for s in self.slot_seqs[row.slot] if s not in claimed]
        for j, p in enumerate(parents):
            if new[j] is None:
                dst = spare.pop(0)
                self.ctx.seq_rm(dst)
                self.ctx.seq_cp(old[p], dst)
                new[j] = dst
        for s in spare:
            if s in old:
                self.ctx.seq_rm(s)
        row.beam_seqs = new

