"""Token ids of the sample rows at several slot counts, with whatever capsfuse_lite is importable
(so the same script runs a commit from before the per-sequence-stream work: put that tree's folder
first on PYTHONPATH). Only the API every version has is used: Fuser(model, slots=, beams=,
max_new_tokens=) and fuse(pairs) -> token_ids; ``--kv-unified`` is passed only when given.

    python benchmarks/gpu/slot_outputs.py MODEL --slots 1,64 --beams 1 --max-new-tokens 80 --rows 24 --out a.json

Then ``--compare a.json [b.json ...]`` prints, per file and configuration, how many rows equal the
one-slot run, and where the others first differ.
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


def compare(paths: list[Path]) -> None:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--slots", default="1,64")
    parser.add_argument("--beams", default="1")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--kv-unified", choices=["true", "false"])
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return
    pairs = sample_pairs(args.rows)
    extra = {} if args.kv_unified is None else {"kv_unified": args.kv_unified == "true"}
    report = {"label": args.label or capsfuse_lite.__file__, "model": str(args.model), "rows": len(pairs),
              "max_new_tokens": args.max_new_tokens, "extra": extra, "runs": {}}
    for beams in (int(b) for b in args.beams.split(",")):
        runs = report["runs"].setdefault(f"beams={beams}" + (f" kv_unified={args.kv_unified}" if extra else ""), {})
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
