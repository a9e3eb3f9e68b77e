"""How often does a row's text depend on how many rows share its decode steps? (README "Known limit")

llama.cpp's kernels are not batch-invariant: a row's logits can differ in the last bits depending on
which rows are decoded beside it. This script fuses the same rows at two slot counts (``--slots 1``:
every row decoded alone; ``--slots 8``: eight at a time), greedy and with beams, and for every row
whose text differs finds the first differing generated token and the *reference margin* there: the
row's prompt plus the tokens both runs agree on is evaluated alone (llama_cpp.Llama, one sequence,
the same GGUF and threads), and the margin is the gap between the two tokens the runs chose, in
logits (for greedy: the top-2 margin, since each run took its own argmax). A difference is explained
by a near-tie when that margin is below ``--tie`` (default 1e-3, the float noise between batch
compositions). With beams, the decision can also be the final ranking of two whole hypotheses of
equal length: their summed log-probabilities (scores before length normalisation) are compared the
same way, and the smaller of the two gaps counts. A beam difference that neither gap explains comes
from an earlier pruning step (a near-tie at the beam-width boundary), which this script does not
reconstruct.

    python benchmarks/batch_invariance.py --model tiny.gguf --rows 400 --max-new-tokens 32
    python benchmarks/batch_invariance.py --model capsfus-llama-cpu768-q8_0.gguf --rows 200

Rows are the 47 sample captions made distinct ("(copy k)" appended to the alt-text), as in the
tests. Prints one line per (beams) setting and writes the per-row details as JSON (``-o``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "capsfuse_lite" / "data" / "capsfusion_sample.json"


def sample_pairs(rows: int) -> list[tuple[str, str]]:
    base = json.loads(SAMPLE.read_text(encoding="utf-8"))
    return [(f"{r['laion_2b']} (copy {i // len(base)})", r["laion_coco"])
            for i, r in ((i, base[i % len(base)]) for i in range(rows))]


def fuse_all(model: Path, pairs, *, slots: int, beams: int, max_new_tokens: int, threads: int) -> list:
    from capsfuse_lite.engine.fuser import Fuser

    with Fuser(model, slots=slots, beams=beams, max_new_tokens=max_new_tokens, n_threads=threads) as fuser:
        return list(fuser.fuse(pairs))


def first_difference(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class Reference:
    """Logits of one sequence evaluated alone (llama_cpp.Llama), for the margin at a divergence."""

    def __init__(self, model: Path, threads: int):
        import llama_cpp

        from capsfuse_lite.engine.fuser import PromptPreview

        self.preview = PromptPreview(model)
        self.llm = llama_cpp.Llama(str(model), n_ctx=1024, n_batch=512, n_threads=threads, logits_all=True,
                                   verbose=False)

    def logits(self, tokens: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        return np.asarray(self.llm.scores[len(tokens) - 1], dtype=np.float64)

    def logprob_sum(self, pair: tuple[str, str], generated: list[int]) -> float:
        """Sum of the log-softmax scores of ``generated`` after the prompt: a beam's score before
        length normalisation (equal lengths: the ranking beam search uses)."""
        import numpy as np

        prompt = self.preview.build(*pair).token_ids
        self.llm.reset()
        self.llm.eval(prompt + generated)
        total = 0.0
        for k, token in enumerate(generated):
            row = np.asarray(self.llm.scores[len(prompt) + k - 1], dtype=np.float64)
            total += row[token] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        return float(total)

    def margin(self, pair: tuple[str, str], prefix: list[int], a: int | None, b: int | None) -> dict:
        """Top-2 margin after ``prompt + prefix``, and the gap between tokens ``a`` and ``b``."""
        import numpy as np

        logits = self.logits(self.preview.build(*pair).token_ids + prefix)
        top = np.sort(logits)[-2:]
        out = {"top2_margin": float(top[1] - top[0]), "argmax": int(np.argmax(logits))}
        if a is not None and b is not None:
            out["chosen_gap"] = float(abs(logits[a] - logits[b]))
        return out


def batch_noise(model: Path, pairs, *, width: int = 8, steps: int = 32, threads: int = 1) -> dict:
    """The logits of one sequence decoded alone vs beside ``width - 1`` others, step by step, with
    the same input tokens (the lone run's greedy choices are fed to both): how far batch composition
    moves a row's logits, and how large the top-2 margins are along the way."""
    import numpy as np

    from capsfuse_lite.engine.fuser import PromptPreview
    from capsfuse_lite.engine.llama import Batch, Context, Model

    preview = PromptPreview(model)
    prompts = [preview.build(*pair).token_ids for pair in pairs[:width]]
    preview.close()
    m = Model(model)
    try:
        def run(n_seq: int, forced: list[int] | None) -> tuple[list, list[int]]:
            ctx = Context(m, n_ctx=512 * n_seq, n_batch=512 * n_seq, n_seq_max=n_seq, n_threads=threads)
            batch = Batch(512 * n_seq)
            last = [batch.add_sequence(prompts[k], 0, k, True) for k in range(n_seq)]
            ctx.decode(batch)
            rows, chosen, pos = [], [], [len(p) for p in prompts[:n_seq]]
            for step in range(steps):
                logits = [np.array(ctx.logits(i), dtype=np.float64) for i in last]
                rows.append(logits[0])
                token0 = int(np.argmax(logits[0])) if forced is None else forced[step]
                chosen.append(token0)
                batch.clear()
                last = [batch.add(token0 if k == 0 else int(np.argmax(logits[k])), pos[k], k, True) for k in range(n_seq)]
                pos = [q + 1 for q in pos]
                ctx.decode(batch)
            ctx.close()
            batch.close()
            return rows, chosen

        alone, path = run(1, None)
        shared, _ = run(width, path)
    finally:
        m.close()
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(alone, shared)]
    margins = [float(np.diff(np.sort(a)[-2:])[0]) for a in alone]
    return {"width": width, "steps": steps, "max_abs_logit_diff": max(diffs),
            "median_abs_logit_diff": float(np.median(diffs)), "logit_std": float(np.mean([a.std() for a in alone])),
            "top2_margin_median": float(np.median(margins)), "top2_margin_min": min(margins),
            "argmax_flips": sum(int(np.argmax(a) != np.argmax(b)) for a, b in zip(alone, shared))}


def compare(model: Path, pairs, *, beams: int, slots: tuple[int, int], max_new_tokens: int, threads: int,
            tie: float, reference: Reference) -> dict:
    runs, seconds = [], []
    for s in slots:
        t0 = time.monotonic()
        runs.append(fuse_all(model, pairs, slots=s, beams=beams, max_new_tokens=max_new_tokens, threads=threads))
        seconds.append(round(time.monotonic() - t0, 1))
    rows = []
    for i, (x, y) in enumerate(zip(*runs)):
        if x.token_ids == y.token_ids:
            continue
        at = first_difference(x.token_ids, y.token_ids)
        a = x.token_ids[at] if at < len(x.token_ids) else None
        b = y.token_ids[at] if at < len(y.token_ids) else None
        m = reference.margin(pairs[i], x.token_ids[:at], a, b)
        gap = m.get("chosen_gap", m["top2_margin"])
        if beams > 1:  # the decision is the ranking of whole hypotheses: compare their scores alone
            m["score_gap"] = abs(reference.logprob_sum(pairs[i], x.token_ids) - reference.logprob_sum(pairs[i], y.token_ids))
            gap = min(gap, m["score_gap"]) if len(x.token_ids) == len(y.token_ids) else gap
        rows.append({"row": i, "first_diff_token": at, **m, "near_tie": gap < tie,
                     f"tokens_slots{slots[0]}": x.token_ids, f"tokens_slots{slots[1]}": y.token_ids})
    return {"beams": beams, "slots": list(slots), "rows": len(pairs), "differ": len(rows),
            "near_ties": sum(r["near_tie"] for r in rows), "seconds": seconds, "details": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--beams", default="1,3", help="comma-separated beam counts")
    ap.add_argument("--slots", default="1,8", help="the two slot counts compared")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tie", type=float, default=1e-3, help="margin (logits) below which a choice is a near-tie")
    ap.add_argument("--noise-only", action="store_true", help="only measure how far batch composition moves logits")
    ap.add_argument("-o", "--output", type=Path, help="per-row details as JSON")
    args = ap.parse_args(argv)
    slots = tuple(int(s) for s in args.slots.split(","))
    pairs = sample_pairs(args.rows)
    noise = batch_noise(args.model, pairs, width=slots[1], steps=args.max_new_tokens, threads=args.threads)
    print(f"batch noise, one row alone vs beside {noise['width'] - 1} others over {noise['steps']} steps: logits move "
          f"by up to {noise['max_abs_logit_diff']:.2e} (median {noise['median_abs_logit_diff']:.2e}; logits' std "
          f"{noise['logit_std']:.2f}); top-2 margin median {noise['top2_margin_median']:.3f}, smallest "
          f"{noise['top2_margin_min']:.2e}; argmax flips {noise['argmax_flips']}", flush=True)
    if args.noise_only:
        return 0
    reference = Reference(args.model, args.threads)
    report = {"model": str(args.model), "max_new_tokens": args.max_new_tokens, "tie": args.tie, "noise": noise,
              "results": []}
    for beams in (int(b) for b in args.beams.split(",")):
        result = compare(args.model, pairs, beams=beams, slots=slots, max_new_tokens=args.max_new_tokens,
                         threads=args.threads, tie=args.tie, reference=reference)
        report["results"].append(result)
        margins = sorted(min(r.get("chosen_gap", r["top2_margin"]), r.get("score_gap", 1e9)) for r in result["details"])
        print(f"beams={beams}: {result['differ']}/{result['rows']} rows differ between --slots {slots[0]} and "
              f"--slots {slots[1]}; {result['near_ties']} of them at a near-tie (margin < {args.tie:g}); "
              f"largest margin {margins[-1] if margins else 0:.2e}; runs took {result['seconds']} s", flush=True)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
