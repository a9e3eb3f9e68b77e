"""Fidelity helpers shared by the parity tests and tests/reference/make_hf428_reference.py.

The EOS variant
    ``make_eos_variant`` copies the tiny upstream-layout checkpoint (tests/checkpoints.py, seed 0)
    and sets the LM-head row of EOS to ``STOP_SCALE`` x the row of ``STOP_TOKEN``: wherever that
    token would win, EOS wins instead, so rows end by EOS at mixed lengths. ``STOP_TOKEN`` is fixed
    (not recomputed per run) so that the variant is reproducible from the checkpoint builder alone;
    it is the token that greedy decoding of the base checkpoint first produces at the most varied
    positions (>= 2) over the 47 sample prompts, 40 new tokens (``stop_token``; the greedy parity
    test re-derives it).

Traces
    A reference run is stored as a *trace*: for every search step, for every running beam (in the
    reference's beam order), the ``TOP_K`` best next tokens and their log-probabilities
    (``log_softmax`` of the logits; greedy: one beam). ``TOP_K = 2N + 1`` for N = 3 beams is all a
    beam-search step can look at: the 2N best candidates over all beams plus the next one. A trace
    can be replayed through :class:`capsfuse_lite.engine.search.BeamSearch` / ``GreedySearch`` (their
    public constructor and ``step``/``result``) by rebuilding logits whose ``log_softmax`` gives
    exactly the stored values for the stored tokens and spreads the remaining probability mass
    evenly over other columns (each then below every stored token, so no search decision
    changes).

The parity rule (per row, never a percentage alone)
    A row passes when our output is identical to the reference's, or when it diverges where the
    reference itself was within ``TIE`` of deciding otherwise:

    - greedy: at the first position where our tokens (EOS included when a row ends by EOS) differ
      from the reference's, the reference's log-probability of its own pick minus that of ours is
      below ``TIE``;
    - beam search: a step of the reference's search is *fragile*: moving the log-probability of
      one of the 2N + 1 best candidates of that step by +-``TIE`` (rest of the step unchanged)
      changes which beams run on, which hypotheses are finished, which one wins or whether the
      search stops. Only steps up to the first step ``k`` at which our answer's first ``k`` tokens
      are not among the reference's running beams count (both searches hold the same beams until
      they diverge, and our answer was one of our running beams at every step before it
      finished, so they diverged at step ``k`` at the latest). If our answer was a reference beam
      at every step, the searches differed in which finished hypothesis wins or when they stop:
      every step counts, and so does a winner within ``TIE`` (normalised score gap times its
      length) of another finished hypothesis.

    A beam-search row can meet a decision that close somewhere in 80 steps fairly often (15 and
    18 of the 47 rows of the 4.28 reference, base and EOS models), so beam-search checks also
    require a share of identical rows (measured: all).

    ``TIE`` = 2e-3. Measured: llama.cpp (f32 GGUF, f32 KV cache, flash attention off) and torch
    (f32) log-probabilities of the 8 best tokens differ by at most 6.4e-6 to 9.4e-6 per step on the
    tiny model (``test_engine_parity.test_logprob_noise_is_below_the_tie_budget`` asserts
    < ``NOISE_PER_STEP`` = 1.25e-5); transformers 4.28's logits with prompts left-padded to 256
    differ from unpadded ones by at most 1.05e-5 (recorded in the 4.28 fixture, asserted there).
    A beam's summed log-probability over 80 steps can then drift by up to 80 x 1.25e-5 = 1e-3,
    and two candidates can move apart by twice that: 2e-3.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS = 2
STOP_TOKEN = 16214
STOP_SCALE = 1.5
TIE = 2e-3
NOISE_PER_STEP = 1.25e-5  # bound asserted on the measured llama.cpp-vs-torch log-probability noise
TOP_K = 7
VOCAB = 32001  # LLaMA-2's 32000 pieces + [PAD]
REFERENCE_428 = Path(__file__).resolve().parent / "fixtures" / "hf428_reference.json.gz"


# -- the tiny EOS variant -------------------------------------------------------------------------


def make_eos_variant(base_dir: Path, out_dir: Path, token: int = STOP_TOKEN, scale: float = STOP_SCALE) -> Path:
    """Copy of an upstream-layout checkpoint whose LM-head row for EOS is ``scale`` x the row of
    ``token``: wherever ``token`` would win, EOS wins instead."""
    import torch

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp)
    index = json.loads((tmp / "pytorch_model.bin.index.json").read_text())
    shard = tmp / index["weight_map"]["lm_head.weight"]
    state = torch.load(shard, weights_only=True)
    state["lm_head.weight"][EOS] = state["lm_head.weight"][token] * scale
    torch.save(state, shard)
    tmp.rename(out_dir)
    return out_dir


def eos_variant(tiny_llama_dir: Path, base: Path) -> tuple[Path, Path]:
    """(checkpoint folder, f32 GGUF) of the EOS variant, built once under ``base``."""
    from capsfuse_lite.convert import convert_checkpoint

    folder = make_eos_variant(tiny_llama_dir, Path(base) / "tiny_eos")
    gguf = Path(base) / "tiny-eos-f32.gguf"
    if not gguf.exists():
        convert_checkpoint(folder, gguf, out_type="f32", progress=False)
    return folder, gguf


def stop_token(token_lists: list[list[int]]) -> int:
    """The token first produced at the most varied positions (>= 2) across rows (ties: lowest id)."""
    first_at: dict[int, set[int]] = {}
    for tokens in token_lists:
        seen: set[int] = set()
        for i, t in enumerate(tokens):
            if i >= 2 and t not in seen:
                seen.add(t)
                first_at.setdefault(t, set()).add(i)
    return max(first_at, key=lambda t: (len(first_at[t]), -t))


# -- weight fingerprints --------------------------------------------------------------------------

_PROBES = 4


def weight_fingerprint(folder: Path) -> dict[str, list]:
    """Per tensor of a ``.bin`` checkpoint folder: shape, float64 sum, sum of squares and ``_PROBES``
    values at fixed positions. Any change of the builder (seed, scale, shape, order of draws) moves
    these far beyond float noise; a last-bit difference of ``torch.randn`` between CPUs does not."""
    import torch

    state = {}
    for shard in sorted(Path(folder).glob("pytorch_model*.bin")):
        state.update(torch.load(shard, weights_only=True))
    out = {}
    for name in sorted(state):
        t = state[name].detach().to(torch.float64).reshape(-1)
        idx = [int(i * (t.numel() - 1) / max(1, _PROBES - 1)) for i in range(_PROBES)]
        out[name] = [list(state[name].shape), float(t.sum()), float((t * t).sum()), [float(t[i]) for i in idx]]
    return out


def fingerprint_mismatches(got: dict, want: dict) -> list[str]:
    """Names whose fingerprints differ: missing, another shape, a sum off by more than 1e-5 of the
    tensor's norm, a sum of squares or a probe value off by more than 1e-6 relative."""
    bad = sorted(set(got) ^ set(want))
    for name in sorted(set(got) & set(want)):
        (g_shape, g_sum, g_sq, g_probes), (w_shape, w_sum, w_sq, w_probes) = got[name], want[name]
        if (g_shape != w_shape or abs(g_sum - w_sum) > 1e-5 * math.sqrt(w_sq) or abs(g_sq - w_sq) > 1e-6 * w_sq
                or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(g_probes, w_probes))):
            bad.append(name)
    return bad


def load_reference_428(path: Path = REFERENCE_428) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


# -- traces ---------------------------------------------------------------------------------------


def top_entries(logprobs: np.ndarray, k: int = TOP_K) -> list[tuple[list[int], list[float]]]:
    """One ``(ids, logprobs)`` pair per row of ``logprobs`` (n_beams, vocab): its ``k`` best tokens,
    best first (equal values: lowest id first)."""
    rows = []
    for row in np.asarray(logprobs, dtype=np.float64):
        part = np.argpartition(-row, k)[: k + 1]
        ids = part[np.lexsort((part, -row[part]))][:k]
        rows.append(([int(i) for i in ids], [float(row[i]) for i in ids]))
    return rows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Columns:
    """Compact logits columns for replaying one trace: every token the trace names keeps its order
    (so ties still go to the lowest id), followed by filler columns that carry the remaining
    probability mass. Replays then cost O(tokens named) per step instead of O(vocabulary)."""

    def __init__(self, trace: list):
        self.ids = sorted({t for step in trace for ids, _ in step for t in ids} | {EOS})
        self.col = {t: i for i, t in enumerate(self.ids)}
        self.eos = self.col[EOS]

    def logits(self, step: list, bump: tuple[int, int, float] | None = None) -> np.ndarray:
        """Logits whose ``log_softmax`` gives each stored token its stored log-probability
        (``bump = (beam, k, delta)`` adds ``delta`` to one of them); every other column gets an equal
        share of the remaining mass, below the row's last stored token."""
        rows = []
        for b, (ids, lps) in enumerate(step):
            lps = np.array(lps, dtype=np.float64)
            if bump is not None and bump[0] == b:
                lps[bump[1]] += bump[2]
            rest = max(1.0 - float(np.exp(lps).sum()), 0.0)
            floor = float(lps.min())
            n_other = len(self.ids) - len(ids)
            # the true vocabulary always has room (VOCAB - k others, each at most the k-th value)
            n_fill = max(n_other, min(max(1024, int(rest / math.exp(floor)) + 2), VOCAB - len(ids)))
            fill = min(math.log(rest / n_fill), floor - 1e-7) if rest > 0 else floor - 30.0
            row = np.full(len(self.ids) + n_fill - n_other, fill)
            row[[self.col[t] for t in ids]] = lps
            rows.append(row)
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), -np.inf, dtype=np.float32)
        for b, row in enumerate(rows):
            out[b, : len(row)] = row
        return out

    def tokens(self, cols: list[int]) -> list[int]:
        return [self.ids[c] for c in cols]


def new_search(beams: int, max_new_tokens: int, length_offset: int = 0, eos: int = EOS):
    from capsfuse_lite.engine.search import BeamSearch, GreedySearch

    if beams == 1:
        return GreedySearch(eos, max_new_tokens)
    return BeamSearch(beams, eos, max_new_tokens, length_offset)


def _outcome(search) -> tuple:
    if not hasattr(search, "finished"):  # greedy
        return (search.done, tuple(search.tokens))
    running = tuple(sorted(tuple(b.tokens) for b in search.running)) if not search.done else ()
    finished = tuple(sorted((tuple(h.tokens), h.finish_reason) for h in search.finished))
    winner = tuple(search.result().tokens) if search.done else ()
    return (search.done, running, finished, winner)


@dataclass
class Replay:
    tokens: list[int] | None  # the search's answer (None: not done when the trace ran out)
    finish_reason: str | None
    steps: int  # trace steps consumed
    scores: list[float]  # normalised scores of the kept hypotheses (beam search)


def replay(trace: list, beams: int, max_new_tokens: int, length_offset: int = 0) -> Replay:
    """Drive a fresh GreedySearch/BeamSearch with the trace's log-probabilities until it is done."""
    cols = _Columns(trace)
    search = new_search(beams, max_new_tokens, length_offset, cols.eos)
    used = 0
    for step in trace:
        if search.done:
            break
        search.step(cols.logits(step))
        used += 1
    if not search.done:
        return Replay(None, None, used, [])
    best = search.result()
    scores = sorted(h.score for h in getattr(search, "finished", []))
    return Replay(cols.tokens(best.tokens), best.finish_reason, used, scores)


def _finish_len(hyp, length_offset: int) -> int:
    return length_offset + len(hyp.tokens) + 1


def fragile_step(trace: list, beams: int, max_new_tokens: int, length_offset: int = 0, tie: float = TIE,
                 ours: list[int] | None = None) -> int | None:
    """The first step (1-based) of a trace whose outcome changes when one of its 2N + 1 best
    candidates moves by +-``tie``; ``len(trace) + 1`` when only the choice among the finished
    hypotheses is that close; None when the reference search came within ``tie`` of no other
    decision (see the module docstring).

    With ``ours`` (the tokens another search answered), only steps up to the first step ``k`` at
    which ``ours[:k]`` is not among the reference's running beams count: until both searches
    diverge their beams are the same, and ours was a running beam at every step before it
    finished, so the searches diverged at step ``k`` at the latest."""
    from capsfuse_lite.engine.search import top_candidates

    cols = _Columns(trace)
    limit = None
    if ours is not None:
        search = new_search(beams, max_new_tokens, length_offset, cols.eos)
        for s, step in enumerate(trace, 1):
            if search.done:
                break
            search.step(cols.logits(step))
            if s <= len(ours) and not search.done:
                if tuple(ours[:s]) not in {tuple(cols.tokens(b.tokens)) for b in search.running}:
                    limit = s
                    break
    search = new_search(beams, max_new_tokens, length_offset, cols.eos)
    for s, step in enumerate(trace, 1):
        if search.done or (limit is not None and s > limit):
            break
        logits = cols.logits(step)
        base = copy.deepcopy(search)
        base.step(logits)
        want = _outcome(base)
        prior = np.array([b.logprob for b in search.running]) if hasattr(search, "running") else np.zeros(1)
        for _, beam, col in top_candidates(logits, prior, 2 * beams + 1):
            k = step[beam][0].index(cols.ids[col])
            for delta in (tie, -tie):
                alt = copy.deepcopy(search)
                alt.step(cols.logits(step, (beam, k, delta)))
                if _outcome(alt) != want:
                    return s
        search = base
    if limit is None and hasattr(search, "finished") and search.done and len(search.finished) > 1:
        best = search.result()
        for h in search.finished:
            if h is not best and (best.score - h.score) * _finish_len(best, length_offset) < tie:
                return len(trace) + 1
    return None


def greedy_margin(trace: list, reference: list[int], ours: list[int]) -> float:
    """Greedy rows (token lists with EOS appended when a row ended by EOS): at the first position
    where they differ, the reference's log-probability of its pick minus that of ours (ours not
    among the stored tokens: at least the gap to the last stored one). 0.0 for a shorter row that
    is a prefix of the other (cannot happen for greedy)."""
    for i, (r, o) in enumerate(zip(reference, ours)):
        if r != o:
            ids, lps = trace[i][0]
            return lps[ids.index(r)] - (lps[ids.index(o)] if o in ids else lps[-1])
    return 0.0


# -- references and verdicts ----------------------------------------------------------------------


@dataclass
class Reference:
    """A reference row: generated ids (EOS stripped), finish reason and the search trace."""

    tokens: list[int]
    finish_reason: str
    trace: list


def hf_reference(model, prompt_ids: list[int], beams: int, max_new_tokens: int) -> Reference:
    """Current transformers' ``generate`` on one unpadded row (greedy, or beam search with
    ``length_penalty=1.0, early_stopping=False``) with its trace (``output_scores``)."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, num_beams=beams,
            do_sample=False, length_penalty=1.0, early_stopping=False, eos_token_id=EOS, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )
    generated = out.sequences[0, ids.shape[1]:].tolist()
    finish = "eos" if EOS in generated else "length"
    if finish == "eos":
        generated = generated[: generated.index(EOS)]
    trace = []
    for t, scores in enumerate(out.scores):
        rows = log_softmax(scores.float().numpy())  # greedy: raw logits; beams: log-probabilities already
        trace.append(top_entries(rows[:1] if t == 0 else rows))
    return Reference(generated, finish, trace)


@dataclass
class Verdict:
    kind: str  # "identical" | "near-tie" | "coupled" | "MISMATCH"
    detail: str = ""


def judge(ref: Reference, tokens: list[int], finish_reason: str, beams: int, max_new_tokens: int,
          length_offset: int = 0, tie: float = TIE) -> Verdict:
    """The per-row parity rule of the module docstring."""
    if list(tokens) == ref.tokens and finish_reason == ref.finish_reason:
        return Verdict("identical")
    if beams == 1:
        margin = greedy_margin(ref.trace, ref.tokens + [EOS] * (ref.finish_reason == "eos"),
                               list(tokens) + [EOS] * (finish_reason == "eos"))
        if margin < tie:
            return Verdict("near-tie", f"margin {margin:.1e} at the first differing token")
        return Verdict("MISMATCH", f"reference margin {margin:.3g} >= {tie:g} at the first differing token")
    step = fragile_step(ref.trace, beams, max_new_tokens, length_offset, tie, ours=list(tokens))
    if step is not None:
        return Verdict("near-tie", f"reference search within {tie:g} of another decision at step {step}")
    return Verdict("MISMATCH", f"no reference decision within {tie:g}")


def check_rows(label: str, verdicts: list[Verdict], min_identical: float | None = None) -> dict[str, int]:
    """Print the agreement of ``verdicts`` (one per row) and assert the per-row rule (and, when
    given, the share of identical rows)."""
    counts = {kind: sum(v.kind == kind for v in verdicts) for kind in ("identical", "near-tie", "coupled", "MISMATCH")}
    notes = [f"row {i}: {v.kind} ({v.detail})" for i, v in enumerate(verdicts) if v.kind != "identical"]
    print(f"{label}: {counts['identical']}/{len(verdicts)} identical, {counts['near-tie']} near-tie, "
          f"{counts['coupled']} batch-coupled, {counts['MISMATCH']} mismatched" + "".join(f"\n  {n}" for n in notes))
    bad = [n for n in notes if "MISMATCH" in n]
    assert not bad, f"{label}: rows differ without a near-tie in the reference:\n" + "\n".join(bad)
    if min_identical is not None:
        assert counts["identical"] >= min_identical * len(verdicts), f"{label}: {counts}"
    return counts

