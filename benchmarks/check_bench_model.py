"""Check that a bench model does equal work: no row ever stops at EOS, greedy or beam search.

Runs the sample captions (default: all 47) through :class:`capsfuse_lite.Fuser` greedy and with 3
beams for the full token budget (default 80, upstream's) and fails unless every row generated
exactly that many tokens; then greedy-decodes ``--probe-rows`` rows step by step and reports how
far EOS stayed below the 2 x beams best tokens (:func:`capsfuse_lite.bench.model.probe_eos`).

    python benchmarks/check_bench_model.py MODEL.gguf [--rows 47] [--max-new-tokens 80] [--beams 1,3]

Prints one JSON line per check and exits 1 if any row finished early or a logit was not finite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from capsfuse_lite import Fuser
    from capsfuse_lite.bench.measure import sample_captions_path
    from capsfuse_lite.bench.model import probe_eos

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--rows", type=int, default=47)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--beams", default="1,3")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--probe-rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=None, help="default: all when llama.cpp can offload")
    args = parser.parse_args(argv)

    rows = json.loads(sample_captions_path().read_text(encoding="utf-8"))[: args.rows]
    pairs = [(r["laion_2b"], r["laion_coco"]) for r in rows]
    ok = True
    for beams in (int(b) for b in args.beams.split(",")):
        started = time.perf_counter()
        with Fuser(args.model, slots=args.slots, beams=beams, max_new_tokens=args.max_new_tokens,
                   n_threads=args.threads, n_gpu_layers=args.n_gpu_layers) as fuser:
            results = list(fuser.fuse(pairs))
        lengths = [len(r.token_ids) for r in results]
        early = [r.index for r in results if r.finish_reason != "length" or len(r.token_ids) != args.max_new_tokens]
        ok &= not early
        print(json.dumps({"check": "fuse", "model": str(args.model), "beams": beams, "rows": len(results),
                          "max_new_tokens": args.max_new_tokens, "min_tokens": min(lengths), "max_tokens": max(lengths),
                          "rows_ending_early": early, "distinct_outputs": len({r.text for r in results}),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    if args.probe_rows:
        probe = probe_eos(args.model, pairs[: args.probe_rows], args.max_new_tokens, n_threads=args.threads,
                          n_gpu_layers=args.n_gpu_layers if args.n_gpu_layers is not None else -1)
        ok &= probe.finite and probe.max_abs_eos_logit == 0.0
        print(json.dumps({"check": "probe", **{k: (round(v, 3) if isinstance(v, float) else v)
                                                for k, v in vars(probe).items()}}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
