"""Conversion throughput vs. a plain copy of the same bytes, and peak memory, for two checkpoint sizes.

Builds random fp32 LLaMA checkpoints in the upstream layout (.bin shards + index, 4.28 config,
vocab 32001) of about 0.3 GB and 1.2 GB (hidden 1024, 1 and 19 layers; the largest tensor is the
32001 x 1024 embedding, 131 MB), then for each output type converts in a fresh process and reports
wall time, throughput (source bytes / s), the same bytes copied with ``shutil.copyfile``, and the
converter process's peak RSS against the budget ``2 x largest tensor + 0.5 GB``.

    python benchmarks/bench_convert.py --workdir /tmp/bench_convert [--sizes 0.3,1.2] [--types f32,f16,q8_0,q4_k_m]

Needs the test extras (torch, transformers) to build the checkpoints; the conversion runs without
them. Results are printed as a table and written to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, HEADS = 1024, 2752, 16
LAYERS_FOR_SIZE = {0.3: 1, 1.2: 19}  # fp32: 65.5M embedding+head params + 12.6M per layer


def build(folder: Path, layers: int) -> None:
    if (folder / "config.json").exists():
        return
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from checkpoints import make_llama_checkpoint\n"
        f"make_llama_checkpoint({str(folder)!r}, hidden={HIDDEN}, intermediate={INTERMEDIATE}, layers={layers}, heads={HEADS})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("pytorch_model*.bin"))


def run_measured(args: list[str]) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS bytes, exit status, CPU seconds) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def plain_copy(files: list[Path], dest: Path) -> float:
    dest.mkdir(exist_ok=True)
    start = time.perf_counter()
    for path in files:
        shutil.copyfile(path, dest / path.name)
        with open(dest / path.name, "rb+") as handle:
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    shutil.rmtree(dest)
    return elapsed


def convert(folder: Path, out: Path, out_type: str) -> tuple[float, int]:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from capsfuse_lite.convert import convert_checkpoint\n"
        f"convert_checkpoint({str(folder)!r}, {str(out)!r}, out_type={out_type!r}, force=True, progress=False)\n"
    )
    seconds, rss, status, _cpu = run_measured([sys.executable, "-c", code])
    if status != 0:
        raise SystemExit(f"conversion to {out_type} failed (exit {status})")
    return seconds, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--sizes", default="0.3,1.2")
    parser.add_argument("--types", default="f32,f16,q8_0,q4_k_m")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    largest = 32001 * HIDDEN * 4
    budget = 2 * largest + 512 * 2**20
    results = []
    for size in (float(s) for s in args.sizes.split(",")):
        folder = args.workdir / f"ckpt-{size}gb"
        build(folder, LAYERS_FOR_SIZE[size])
        files = weight_files(folder)
        source_bytes = sum(p.stat().st_size for p in files)
        for path in files:  # warm the page cache so copy and conversion read alike
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass
        copy_s = plain_copy(files, args.workdir / "copy")
        for out_type in args.types.split(","):
            out = args.workdir / f"out-{size}gb-{out_type}.gguf"
            seconds, rss = convert(folder, out, out_type)
            results.append({
                "size_gb": round(source_bytes / 1e9, 3), "type": out_type, "seconds": round(seconds, 2),
                "mb_per_s": round(source_bytes / seconds / 1e6, 1), "copy_mb_per_s": round(source_bytes / copy_s / 1e6, 1),
                "peak_rss_mb": round(rss / 2**20, 1), "budget_mb": round(budget / 2**20, 1),
                "largest_tensor_mb": round(largest / 2**20, 1), "within_budget": rss <= budget,
                "output_mb": round(out.stat().st_size / 2**20, 1),
            })
            out.unlink()
            print(json.dumps(results[-1]), flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'size':>6} {'type':>7} {'sec':>7} {'MB/s':>7} {'copy MB/s':>9} {'peak RSS MB':>11} {'budget MB':>9}")
    for r in results:
        print(f"{r['size_gb']:>6} {r['type']:>7} {r['seconds']:>7} {r['mb_per_s']:>7} {r['copy_mb_per_s']:>9} "
              f"{r['peak_rss_mb']:>11} {r['budget_mb']:>9}")
    return 0 if all(r["within_budget"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
