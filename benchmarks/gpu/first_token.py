"""Is the first generated token's logit vector batch-dependent? (issue 15, item 1)

For a few sample rows, the logits after the whole prompt (BOS + the row's tokens, as the engine
feeds them) evaluated alone in a context vs in ONE decode together with the prompts of N-1 other
rows (each its own sequence), under several llama.cpp settings: per-sequence KV streams vs one
unified cache, n_ubatch 512 vs a smaller one, flash attention on vs off. Prints, per setting, the
largest |logit difference| over the rows, whether the argmax (the greedy first token) moved, and
the smallest top-1/top-2 margin among the rows alone. Kernel noise shows as a small difference
that depends on the setting; a defect (wrong positions, cells from another row) as a large one.

With ``--steps K`` the rows then decode K tokens, fed the same tokens alone and among the others
(one token per sequence per decode, as greedy steps do): the same comparison for decode steps.

    python benchmarks/gpu/first_token.py MODEL --seqs 64 --rows 4 --steps 8 --out first_token.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capsfuse_lite.engine.fuser import prompt_builder  # first: loads llama.cpp before numpy
from capsfuse_lite.bench.measure import load_pairs
from capsfuse_lite.engine.llama import Batch, Context, Model
from capsfuse_lite.models import gguf_defaults

import numpy as np  # noqa: E402


def logits_of(ctx: Context, prompts: list[list[int]], which: list[int], steps: int = 0,
              forced: dict[int, list[int]] | None = None) -> tuple[dict[int, list[np.ndarray]], dict[int, list[int]]]:
    """Decode ``prompts[i]`` as sequence i for each i in ``which`` (one batch), then ``steps`` decode
    steps of one token per sequence (all sequences in one batch per step): the token of ``forced[i]``
    where given (so a row is fed the same tokens alone and among others), else the greedy one.
    Returns, per sequence, the logits after the prompt and after each step, and the tokens fed."""
    forced = forced or {}
    ctx.clear()
    logits: dict[int, list[np.ndarray]] = {i: [] for i in which}
    fed: dict[int, list[int]] = {i: [] for i in which}
    with Batch(max(ctx.n_batch, len(which))) as batch:
        last = {i: batch.add_sequence(prompts[i], 0, i, logits_last=True) for i in which}
        for step in range(steps + 1):
            ctx.decode(batch)
            ctx.synchronize()
            for i, index in last.items():
                logits[i].append(ctx.logits(index).astype(np.float64))
            if step == steps:
                break
            batch.clear()
            for i in which:
                token = forced[i][step] if i in forced else int(logits[i][-1].argmax())
                fed[i].append(token)
                last[i] = batch.add(token, len(prompts[i]) + step, i, True)
    return logits, fed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--small-ubatch", type=int, default=64)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=0,
                        help="also compare the logits of this many decode steps (one token per sequence per step)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {"model": str(args.model), "seqs": args.seqs, "rows": args.rows, "settings": []}
    with Model(args.model, n_gpu_layers=args.n_gpu_layers) as model:
        builder = prompt_builder(model, gguf_defaults(model.path))
        pairs = load_pairs()
        prompts = [builder.build(*pairs[i % len(pairs)]).token_ids for i in range(args.seqs)]
        total = sum(len(p) for p in prompts)
        targets = list(range(0, args.seqs, max(1, args.seqs // args.rows)))[: args.rows]
        for unified in (False, True):
            for ubatch in (512, args.small_ubatch):
                for flash in (True, False):
                    name = f"{'unified' if unified else 'streams'} ubatch={ubatch} flash_attn={'on' if flash else 'off'}"
                    try:
                        ctx = Context(model, n_ctx=args.seqs * 512, n_batch=total, n_ubatch=ubatch, n_seq_max=args.seqs,
                                      kv_unified=unified, flash_attn=flash)
                    except Exception as exc:  # a setting this build/device refuses
                        print(f"{name}: not run ({exc})", flush=True)
                        continue
                    with ctx:
                        alone, fed = {}, {}
                        for t in targets:
                            got, tokens = logits_of(ctx, prompts, [t], args.steps)
                            alone.update(got)
                            fed.update(tokens)
                        among, _ = logits_of(ctx, prompts, list(range(args.seqs)), args.steps, forced=fed)
                    first = [alone[t][0] for t in targets]
                    diff = max(float(np.abs(alone[t][0] - among[t][0]).max()) for t in targets)
                    moved = sum(int(alone[t][0].argmax() != among[t][0].argmax()) for t in targets)
                    margin = min(float(np.diff(np.sort(x)[-2:])[0]) for x in first)
                    entry = {"setting": name, "max_abs_diff": diff, "argmax_moved": moved, "min_margin_alone": margin}
                    line = (f"{name}: alone vs among {args.seqs}: max |dlogit| {diff:.3g}, first token moved on "
                            f"{moved}/{len(targets)} rows (smallest margin alone {margin:.3g})")
                    if args.steps:
                        step_diff = max(float(np.abs(a - b).max()) for t in targets
                                        for a, b in zip(alone[t][1:], among[t][1:]))
                        step_moved = sum(int(a.argmax() != b.argmax()) for t in targets
                                         for a, b in zip(alone[t][1:], among[t][1:]))
                        entry.update(steps=args.steps, step_max_abs_diff=step_diff, step_argmax_moved=step_moved)
                        line += (f"; {args.steps} decode steps: max |dlogit| {step_diff:.3g}, argmax moved at "
                                 f"{step_moved}/{args.steps * len(targets)} steps")
                    report["settings"].append(entry)
                    print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
