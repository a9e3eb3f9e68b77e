"""How fast `capsfuse-lite bench-model` writes, against the disk's own speed, and its peak memory.

For each shape and type: ``capsfuse-lite bench-model`` in a fresh process (wall time from start
to exit, CPU time, peak RSS, file size), then the same number of random bytes written with plain
``write`` calls and fsync (the disk's speed for that file size, right after). Files are removed.
On a shared machine the wall times move with the other load; the CPU seconds say what the
writer itself costs.

    python benchmarks/bench_bench_model.py --workdir /tmp/bench_model [--shapes tiny,cpu768,13b] [--types q4_k_m]

Results are printed as a table and written to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_convert import run_measured


def plain_write(path: Path, nbytes: int, chunk: int = 32 << 20) -> float:
    """Seconds to write ``nbytes`` of random data (a 1 GiB pool read at shifting offsets) and fsync."""
    import numpy as np

    pool = np.random.default_rng(0).integers(0, 256, size=min(nbytes, 1 << 30) + chunk, dtype=np.uint8)
    start = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < nbytes:
            at = (written * 7919) % (len(pool) - chunk)
            n = min(chunk, nbytes - written)
            handle.write(memoryview(pool[at:at + n]))
            written += n
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def plain_write_in_child(path: Path, nbytes: int) -> float:
    """plain_write in a fresh process: this one stays small, so the next child's peak RSS (which
    Linux counts from the parent's size at fork) is its own."""
    code = f"from bench_bench_model import plain_write; print(plain_write(__import__('pathlib').Path({str(path)!r}), {nbytes}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_model"))
    parser.add_argument("--shapes", default="tiny,cpu768,13b")
    parser.add_argument("--types", default="q4_k_m")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in args.shapes.split(","):
        for out_type in args.types.split(","):
            out = args.workdir / f"{shape}-{out_type}.gguf"
            command = [sys.executable, "-m", "capsfuse_lite", "bench-model", "-o", str(out), "--shape", shape,
                       "--type", out_type, "--force", "--quiet"]
            seconds, rss, status, cpu = run_measured(command)
            if status != 0:
                raise SystemExit(f"bench-model {shape} {out_type} failed (exit {status})")
            size = out.stat().st_size
            out.unlink()
            disk_s = plain_write_in_child(args.workdir / "plain.bin", size)
            results.append({
                "shape": shape, "type": out_type, "file_bytes": size, "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2), "mb_per_s": round(size / seconds / 1e6, 1), "plain_write_seconds": round(disk_s, 2),
                "plain_write_mb_per_s": round(size / disk_s / 1e6, 1), "peak_rss_mb": round(rss / 2**20, 1),
            })
            print(json.dumps(results[-1]), flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'shape':>7} {'type':>7} {'file GB':>8} {'sec':>7} {'CPU s':>7} {'MB/s':>7} {'plain write s':>13} "
          f"{'MB/s':>7} {'peak RSS MB':>11}")
    for r in results:
        print(f"{r['shape']:>7} {r['type']:>7} {r['file_bytes'] / 1e9:>8.3f} {r['seconds']:>7} {r['cpu_seconds']:>7} "
              f"{r['mb_per_s']:>7} {r['plain_write_seconds']:>13} {r['plain_write_mb_per_s']:>7} {r['peak_rss_mb']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
