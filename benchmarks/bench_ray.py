"""Dataset mode throughput: the plain single-process run against Ray with 1 and 2 workers.

The same shards (8 by default) are fused three ways, each timed from "model loaded" to "last shard
published" (model loading and Ray's start-up are not counted):

- ``plain``:  ``DatasetRun``, one process, one engine stream, ``--threads 1``;
- ``ray-1``:  ``RayDatasetRun`` with one worker (1 CPU, 1 llama.cpp thread);
- ``ray-2``:  two workers of 1 CPU / 1 thread each.

Targets on a 2-core CPU: ray-2 >= 1.7 x ray-1, and ray-1 within 10 % of plain. Each configuration
runs ``--repeats`` times (in turn, so that a noisy stretch hits all of them) and the median pass is
reported, with ``foreign_cpu_load``: the cores that processes other than this one and its children
(the Ray workers, raylet, GCS) kept busy during the pass. Figures taken with a foreign load above
~0.2 cores are not comparable (see benchmarks/README.md).

    python benchmarks/bench_ray.py                                  # builds the cpu768 model if needed
    python benchmarks/bench_ray.py --model M.gguf --rows 24 --max-new-tokens 32 -o report.json

Needs the ``test`` extra (torch and transformers build the model; Ray runs the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from capsfuse_lite.engine import llama  # noqa: E402,F401  (llama.cpp before numpy)
from capsfuse_lite.machine import _busy_cpu_s, machine_info  # noqa: E402


class TreeLoadMeter:
    """Cores kept busy by processes outside this process tree while the block runs. The tree (this
    process and, with ``children``, its descendants: Ray's raylet, GCS and workers) is sampled every
    ``interval`` s from a thread, so the CPU of a child that ends meanwhile is counted up to its last
    sample. Without ``children`` (the plain run) nothing is sampled meanwhile: a thread scanning
    /proc in the process that fuses would slow it down."""

    def __init__(self, children: bool = True, interval: float = 1.0):
        self.children, self.interval = children, interval
        self.foreign_load: float | None = None
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        if not self.children:
            t = os.times()
            self._first.setdefault(0, t.user + t.system)
            self._last[0] = t.user + t.system
            return
        for pid, cpu in _tree_cpu(os.getpid()).items():
            self._first.setdefault(pid, cpu)
            self._last[pid] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "TreeLoadMeter":
        self._busy0, self._t0 = _busy_cpu_s(), time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self.children:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self.children:
            self._thread.join()
        busy, wall = _busy_cpu_s(), time.monotonic() - self._t0
        if self._busy0 is None or busy is None or wall <= 0:
            return
        own = sum(self._last[pid] - self._first[pid] for pid in self._last)
        self.foreign_load = round(max(0.0, (busy - self._busy0 - own) / wall), 2)


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and its descendants, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def make_shards(folder: Path, shards: int, rows: int) -> int:
    """``shards`` JSONL files of ``rows`` distinct caption pairs (the sample captions, numbered)."""
    sample = json.loads((REPO / "tests" / "fixtures" / "capsfusion_sample.json").read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = []
        for r in range(rows):
            row = sample[(s * rows + r) % len(sample)]
            lines.append(json.dumps(dict(row, laion_2b=f"{row['laion_2b']} ({s}.{r})")))
        (folder / f"shard-{s:02d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return shards * rows


def settings(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, beams=args.beams, slots=args.slots, n_threads=1)


def plain_pass(args, data: Path, out: Path) -> dict:
    from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun
    from capsfuse_lite.run.single import default_fuser_factory

    loaded = {}

    def factory(path, **kwargs):
        fuser = default_fuser_factory(path, **kwargs)
        loaded["t"] = time.monotonic()
        return fuser

    run = DatasetRun(DatasetConfig(input=data, output=out, model=args.model, **settings(args)), fuser_factory=factory)
    run.prepare()
    run.check_model()
    run.fingerprint()  # hashed before the clock starts
    with TreeLoadMeter(children=False) as meter:
        summary = run.execute()
        end = time.monotonic()
    return {"rows": summary.rows_total, "seconds": end - loaded["t"], "foreign_cpu_load": meter.foreign_load,
            "complete": summary.complete}


def ray_pass(args, data: Path, out: Path, workers: int) -> dict:
    from capsfuse_lite.run.cluster import RayDatasetRun, RayOptions
    from capsfuse_lite.run.dataset import DatasetConfig

    run = RayDatasetRun(DatasetConfig(input=data, output=out, model=args.model, **settings(args)),
                        RayOptions(workers=workers, cpus_per_worker=1))
    run.prepare()
    run.check_model()
    run.fingerprint()
    with TreeLoadMeter() as meter:
        summary = run.execute()
    return {"rows": summary.rows_total, "seconds": summary.fuse_s, "foreign_cpu_load": meter.foreign_load,
            "complete": summary.complete}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: build the cpu768 q8_0 bench model)")
    parser.add_argument("--models-dir", type=Path, default=Path("/work/bench-models"))
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=24, help="rows per shard")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, help="write the report as JSON")
    args = parser.parse_args(argv)
    if args.model is None:
        from make_bench_model import build

        args.models_dir.mkdir(parents=True, exist_ok=True)
        args.model = build(args.models_dir)[1]
    os.environ.setdefault("CAPSFUSE_LITE_CACHE", str(Path(tempfile.gettempdir()) / "capsfuse-bench-cache"))

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        total = make_shards(work / "data", args.shards, args.rows)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        configs = {"plain": lambda out: plain_pass(args, work / "data", out),
                   "ray-1": lambda out: ray_pass(args, work / "data", out, 1),
                   "ray-2": lambda out: ray_pass(args, work / "data", out, 2)}
        passes: dict[str, list] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name, run in configs.items():
                out = work / f"out-{name}-{repeat}"
                result = run(out)
                assert result["complete"] and result["rows"] == total, result
                result["rows_per_s"] = round(total / result["seconds"], 3)
                passes[name].append(result)
                print(f"{name} pass {repeat + 1}: {result['rows_per_s']:.2f} rows/s "
                      f"({result['seconds']:.1f} s, foreign CPU load {result['foreign_cpu_load']})", flush=True)
                shutil.rmtree(out)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(p["rows_per_s"] for p in runs) for name, runs in passes.items()}
    report = {
        "model": str(args.model), "shards": args.shards, "rows_per_shard": args.rows, "rows": total,
        "max_new_tokens": args.max_new_tokens, "beams": args.beams, "slots": args.slots, "threads_per_worker": 1,
        "rows_per_s": median, "passes": passes,
        "ratios": {"ray-2 / ray-1": round(median["ray-2"] / median["ray-1"], 3),
                   "ray-1 / plain": round(median["ray-1"] / median["plain"], 3)},
        "targets": {"ray-2 / ray-1": ">= 1.7", "ray-1 / plain": ">= 0.9"},
        "machine": machine_info(),
    }
    print(f"\n{'configuration':<14}{'rows/s':>9}  foreign CPU load per pass")
    for name, runs in passes.items():
        print(f"{name:<14}{median[name]:>9.2f}  {[p['foreign_cpu_load'] for p in runs]}")
    for ratio, value in report["ratios"].items():
        print(f"{ratio}: {value:.2f} (target {report['targets'][ratio]})")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
