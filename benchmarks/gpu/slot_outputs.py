"""Token ids of the sample rows at several slot counts, with whatever capsfuse_lite is importable
(so the same script runs a commit from before the per-sequence-stream work: put that tree's folder
first on PYTHONPATH). Only the API every version has is used: Fuser(model, slots=, beams=,
max_new_tokens=) and fuse(pairs) -> token_ids; ``--kv-unified`` and ``--flash-attn`` are passed only
when given.

    python benchmarks/gpu/slot_outputs.py MODEL --slots 1,64 --beams 1 --max-new-tokens 80 --rows 24 --out a.json

Then ``--compare a.json [b.json ...]`` prints, per file and configuration, how many rows equal the
one-slot run, and where the others first differ; with MODEL and ``--margins`` (greedy, CPU), the
one-slot token's logit lead over the other run's token there, from the prompt evaluated alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import llama_cpp.llama_cpp  # noqa: F401  (first: an old engine may import numpy before llama.cpp)

import capsfuse_lite  # noqa: E402
from capsfuse_lite import Fuser  # noqa: E402


def sample_pairs(rows: int) -> list[tuple[str, str]]:
    data = json.loads((Path(capsfuse_lite.__file__).parent / "data" / "capsfusion_sample.json").read_text())
    pairs = [(r["laion_2b"], r["laion_coco"]) for r in data]
    return pairs[:rows]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def margins_at(model_path: Path, pairs: list[tuple[str, str]], rows: list[tuple[int, list[int], list[int]]],
               extra: dict) -> list[dict]:
    """For each ``(row, one_slot_ids, other_ids)`` that differ: the prompt and the one-slot tokens before
    the first difference, evaluated alone in one decode (this tree's engine, the run's settings); the
    logit of the one-slot token minus that of the other run's token there, and the top-1/top-2 margin.
    A difference where these are ~1e-3 is float noise; one where they are large points at a defect."""
    import numpy as np

    from capsfuse_lite.engine.fuser import prompt_builder
    from capsfuse_lite.engine.llama import Batch, Context, Model
    from capsfuse_lite.models import gguf_defaults

    found = []
    with Model(model_path, n_gpu_layers=0) as model:
        builder = prompt_builder(model, gguf_defaults(model.path))
        for row, a, b in rows:
            d = first_difference(a, b)
            if d >= min(len(a), len(b)):  # one run stopped earlier (an end token the other did not pick)
                found.append({"row": row, "token": d, "note": "one run ended first"})
                continue
            ids = builder.build(*pairs[row]).token_ids + a[:d]
            with Context(model, n_ctx=len(ids) + 16, n_batch=len(ids), n_ubatch=len(ids), n_seq_max=1,
                         flash_attn=extra.get("flash_attn")) as ctx, Batch(len(ids)) as batch:
                last = batch.add_sequence(ids, 0, 0, logits_last=True)
                ctx.decode(batch)
                ctx.synchronize()
                logits = ctx.logits(last).astype(np.float64)
            top = np.sort(logits)[-2:]
            found.append({"row": row, "token": d, "one_slot_minus_other": float(logits[a[d]] - logits[b[d]]),
                          "top2_margin": float(top[1] - top[0]), "one_slot_is_argmax": int(logits.argmax()) == a[d]})
    return found


def compare(paths: list[Path], model: Path | None = None) -> None:
    for path in paths:
        report = json.loads(path.read_text())
        for key, runs in report["runs"].items():
            one = runs.get("1")
            if one is None:
                continue
            for slots, outs in runs.items():
                if slots == "1":
                    continue
                differ = sorted(first_difference(a, b) for a, b in zip(one, outs) if a != b)
                print(f"{report['label']} {key} slots={slots}: {len(one) - len(differ)}/{len(one)} rows equal slots=1"
                      + (f"; first differences at tokens {differ}" if differ else ""), flush=True)
                if model is not None and key.startswith("beams=1") and differ:
                    pairs = sample_pairs(report["rows"])
                    rows = [(i, a, b) for i, (a, b) in enumerate(zip(one, outs)) if a != b]
                    for m in margins_at(model, pairs, rows, report.get("extra", {})):
                        print("   ", json.dumps(m), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--slots", default="1,64")
    parser.add_argument("--beams", default="1")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--kv-unified", choices=["true", "false"])
    parser.add_argument("--flash-attn", choices=["true", "false"])
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path, nargs="+")
    parser.add_argument("--margins", action="store_true",
                        help="with --compare and MODEL (greedy runs): the one-slot logits at each first difference")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare, args.model if args.margins else None)
        return
    pairs = sample_pairs(args.rows)
    extra = {} if args.kv_unified is None else {"kv_unified": args.kv_unified == "true"}
    if args.flash_attn is not None:  # not every version has it: passed only when given
        extra["flash_attn"] = args.flash_attn == "true"
    report = {"label": args.label or capsfuse_lite.__file__, "model": str(args.model), "rows": len(pairs),
              "max_new_tokens": args.max_new_tokens, "extra": extra, "runs": {}}
    for beams in (int(b) for b in args.beams.split(",")):
        runs = report["runs"].setdefault(f"beams={beams}" + "".join(f" {k}={v}" for k, v in extra.items()), {})
        for slots in (int(s) for s in args.slots.split(",")):
            started = time.perf_counter()
            with Fuser(args.model, slots=slots, beams=beams, max_new_tokens=args.max_new_tokens, **extra) as fuser:
                runs[str(slots)] = [r.token_ids for r in fuser.fuse(pairs)]
            print(f"{report['label']} beams={beams} slots={slots} {extra}: {time.perf_counter() - started:.1f} s", flush=True)
            if args.out:
                args.out.write_text(json.dumps(report))
    if args.out:
        compare([args.out])


if __name__ == "__main__":
    main()
