"""Outputs at many slots equal outputs at one slot (issue 8: "greedy and beam outputs at many slots
equal those at one slot on the GPU"), on the 47 sample captions, greedy and 3 beams.

    python benchmarks/gpu/parity.py MODEL.gguf --slots 64 --out parity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capsfuse_lite import Fuser  # first: loads llama.cpp before numpy
from capsfuse_lite.bench import load_pairs


def run(model: Path, slots: int, beams: int, pairs: list, max_new: int) -> list[list[int]]:
    with Fuser(model, slots=slots, beams=beams, max_new_tokens=max_new) as fuser:
        return [r.token_ids for r in fuser.fuse(pairs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    pairs = load_pairs()
    report = {"model": str(args.model), "rows": len(pairs), "slots": args.slots}
    for beams in (1, 3):
        one = run(args.model, 1, beams, pairs, args.max_new_tokens)
        many = run(args.model, args.slots, beams, pairs, args.max_new_tokens)
        differ = [i for i, (a, b) in enumerate(zip(one, many)) if a != b]
        report[f"beams={beams}"] = {"identical": len(pairs) - len(differ), "differ": differ}
        print(f"beams={beams}: slots={args.slots} equals slots=1 on {len(pairs) - len(differ)}/{len(pairs)} rows")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
