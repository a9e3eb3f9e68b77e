"""`capsfuse-lite bench`: the engine against the usual alternatives, on the user's machine.

One process run measures every configuration side by side on the same rows, so ratios stay
meaningful on a busy machine. Each configuration is loaded, warmed up on a few rows, then timed
over all rows ``repeats`` (>= 2) times; the report gives the medians. Peak memory is taken per
configuration: the kernel's high-water mark (VmHWM) is reset before each one and a sampling
thread records VmRSS (and GPU memory via nvidia-smi when layers are offloaded).

Library entry points: :class:`BenchOptions`, :func:`run_bench` (returns the report dict written
as JSON), :func:`recommend_slots`, :func:`write_report`, :func:`plot_report`.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from capsfuse_lite import __version__, defaults
from capsfuse_lite.bench.baselines import HF_BASELINE, HF_BATCH_SIZE, HF_NUM_BEAMS, LOOP_BASELINE, HFUpstreamBaseline, LlamaLoopBaseline, Pair, RowFigures
from capsfuse_lite.errors import CapsfuseError, ConfigError, InputFileError
from capsfuse_lite.machine import CpuLoadMeter, PeakMemory, default_threads, machine_info

ENGINE = "capsfuse-lite"
GPU_ALL_LAYERS = -1  # "all layers" for both the engine and llama_cpp.Llama
MIN_REPEATS = 2
# Slot counts measured when none are given: a GPU keeps gaining far past a CPU's 16.
DEFAULT_SLOTS = {"cpu": (1, 4, 8, 16), "gpu": (8, 16, 32, 64, 96, 128)}
# Recommended slots: the fewest whose rows/s is within this fraction of the best measured.
SLOTS_GAIN_THRESHOLD = 0.05


@dataclass(frozen=True)
class ConfigSpec:
    """One measured system: the engine at some slots/beams/prefix cache, or a baseline."""

    system: str  # ENGINE, LOOP_BASELINE or HF_BASELINE
    device: str  # "cpu" or "gpu"
    slots: int | None = None
    beams: int = 1
    prefix_cache: bool | None = None

    @property
    def name(self) -> str:
        if self.system != ENGINE:
            return f"{self.device} {self.system}"
        cache = "on" if self.prefix_cache else "off"
        return f"{self.device} slots={self.slots} beams={self.beams} cache={cache}"


@dataclass
class BenchOptions:
    model: Path
    pairs: list[Pair]
    slots: list[int] = field(default_factory=lambda: list(DEFAULT_SLOTS["cpu"]))
    beams: list[int] = field(default_factory=lambda: [1, 3])
    prefix_cache: list[bool] = field(default_factory=lambda: [True])
    max_new_tokens: int | None = None  # None: the GGUF's capsfuse.max_new_tokens (upstream 80)
    baselines: list[str] = field(default_factory=lambda: [LOOP_BASELINE])
    hf_checkpoint: Path | None = None
    hf_dtype: str = "auto"
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    n_threads: int = field(default_factory=default_threads)
    repeats: int = MIN_REPEATS
    warmup_rows: int | None = None  # None: one full round of slots (at least 2 rows)
    input_label: str = "sample captions"

    def validate(self) -> None:
        if not self.pairs:
            raise ConfigError("the benchmark needs at least one row; check --input and --rows")
        if self.repeats < MIN_REPEATS:
            raise ConfigError(f"--repeats {self.repeats}: each configuration is measured at least {MIN_REPEATS} times")
        for name, values in (("--slots", self.slots), ("--beams", self.beams)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"{name}: give positive integers, e.g. {name} 1,4,8")
        unknown = set(self.baselines) - {LOOP_BASELINE, HF_BASELINE}
        if unknown:
            raise ConfigError(f"--baselines {','.join(sorted(unknown))}: known baselines are {LOOP_BASELINE}, {HF_BASELINE}")
        if HF_BASELINE in self.baselines and self.hf_checkpoint is None:
            raise ConfigError(f"the {HF_BASELINE} baseline needs --hf-checkpoint FOLDER (the HF checkpoint the GGUF came from)")
        if self.n_threads < 1:
            raise ConfigError(f"--threads {self.n_threads}: give at least 1")


def plan_configs(opts: BenchOptions) -> list[ConfigSpec]:
    """Per device: the loop baseline, the engine grid, then hf-upstream (all in one process run).

    hf-upstream goes last because importing torch leaves hundreds of MiB resident (its
    libraries and allocator caches), which would otherwise count in the next peaks.
    """
    plan: list[ConfigSpec] = []
    for device in opts.devices:
        if LOOP_BASELINE in opts.baselines:
            plan.append(ConfigSpec(LOOP_BASELINE, device))
        for beams in opts.beams:
            for cache in opts.prefix_cache:
                for slots in sorted(opts.slots):
                    plan.append(ConfigSpec(ENGINE, device, slots=slots, beams=beams, prefix_cache=cache))
        if HF_BASELINE in opts.baselines:
            plan.append(ConfigSpec(HF_BASELINE, device, beams=HF_NUM_BEAMS))
    return plan


SAMPLE_FILE = "capsfusion_sample.json"


def sample_captions_path() -> Path:
    """The 47 upstream sample rows (CapsFusion's example_data.json), shipped as package data."""
    path = defaults.PACKAGE_DATA / SAMPLE_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: the sample captions are missing from this installation; pass --input FILE")
    return path


def repeat_to(pairs: list[Pair], rows: int | None) -> list[Pair]:
    """The first ``rows`` rows of ``pairs`` repeated as often as needed (all once when None)."""
    if not pairs:
        raise ConfigError("the input has no rows")
    if rows is None:
        return list(pairs)
    if rows < 1:
        raise ConfigError(f"--rows {rows}: give at least 1")
    return [pairs[i % len(pairs)] for i in range(rows)]


def load_pairs(path: str | Path | None = None, *, limit: int | None = None, csv_delimiter: str | None = None,
               input_format: str | None = None) -> list[Pair]:
    """(raw, synthetic) caption pairs of a caption file (the sample captions when ``path`` is None).

    Rows without both caption fields are skipped; ``limit`` stops reading early.
    """
    from capsfuse_lite.formats import open_reader

    path = Path(path) if path is not None else sample_captions_path()
    raw_f, syn_f = defaults.RAW_FIELD, defaults.SYNTHETIC_FIELD
    pairs: list[Pair] = []
    for _, row in open_reader(path, input_format, csv_delimiter=csv_delimiter).rows(columns=[raw_f, syn_f]):
        raw, syn = row.get(raw_f), row.get(syn_f)
        if isinstance(raw, str) and isinstance(syn, str):
            pairs.append((raw, syn))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise InputFileError(f"{path}: no row has both {raw_f!r} and {syn_f!r} as text")
    return pairs


class FuserRunner:
    """The engine under test, in the runner shape of :mod:`capsfuse_lite.bench.baselines`."""

    def __init__(self, model: Path, spec: ConfigSpec, *, max_new_tokens: int, n_threads: int) -> None:
        self.model, self.spec = model, spec
        self.max_new_tokens, self.n_threads = max_new_tokens, n_threads
        self._fuser = None

    def load(self) -> None:
        from capsfuse_lite.engine.fuser import Fuser

        self._fuser = Fuser(
            self.model,
            slots=self.spec.slots,
            beams=self.spec.beams,
            max_new_tokens=self.max_new_tokens,
            n_gpu_layers=GPU_ALL_LAYERS if self.spec.device == "gpu" else 0,
            n_threads=self.n_threads,
            prefix_cache=bool(self.spec.prefix_cache),
        )

    def run(self, pairs: Iterable[Pair]) -> Iterator[RowFigures]:
        for res in self._fuser.fuse(pairs, ordered=True):
            yield RowFigures(res.prompt_tokens, len(res.token_ids))

    def step_counters(self) -> dict:
        """Decode steps, host and device seconds so far, and the host time's parts (see FuserStats)."""
        st = self._fuser.stats
        return {name: getattr(st, name) for name in STEP_FIELDS}

    def describe(self) -> dict:
        return dict(self._fuser.settings) if self._fuser is not None else {}

    def close(self) -> None:
        if self._fuser is not None:
            self._fuser.close()
            self._fuser = None


def make_runner(opts: BenchOptions, spec: ConfigSpec, max_new_tokens: int):
    if spec.system == ENGINE:
        return FuserRunner(opts.model, spec, max_new_tokens=max_new_tokens, n_threads=opts.n_threads)
    if spec.system == LOOP_BASELINE:
        return LlamaLoopBaseline(
            opts.model,
            max_new_tokens=max_new_tokens,
            n_threads=opts.n_threads,
            n_gpu_layers=GPU_ALL_LAYERS if spec.device == "gpu" else 0,
        )
    return HFUpstreamBaseline(
        opts.hf_checkpoint, max_new_tokens=max_new_tokens, n_threads=opts.n_threads,
        device=spec.device, dtype=opts.hf_dtype,
    )


@dataclass
class RunFigures:
    """One timed pass over all rows."""

    elapsed_s: float
    first_result_s: float
    rows: int
    prompt_tokens: int
    generated_tokens: int
    foreign_cpu_load: float | None = None  # cores other processes kept busy meanwhile
    steps: dict | None = None  # engine only: decode steps, host/device seconds and host parts of the pass


def time_run(runner, pairs: list[Pair]) -> RunFigures:
    """Run all rows once; the clock covers the whole iterator, first result included."""
    rows = prompt = generated = 0
    first = None
    counters = getattr(runner, "step_counters", None)
    before = counters() if counters else None
    with CpuLoadMeter() as load:
        start = time.perf_counter()
        for fig in runner.run(pairs):
            if first is None:
                first = time.perf_counter() - start
            rows += 1
            prompt += fig.prompt_tokens
            generated += fig.generated_tokens
        elapsed = time.perf_counter() - start
    figures = RunFigures(elapsed, first if first is not None else elapsed, rows, prompt, generated, load.foreign_load)
    if before is not None:
        after = counters()
        figures.steps = {name: after[name] - before[name] for name in STEP_FIELDS}
    return figures


def summarize(runs: list[RunFigures]) -> dict:
    """Medians over the repeats; every rate is a median count over the median elapsed time."""
    med = statistics.median
    elapsed = med(r.elapsed_s for r in runs)
    rows = med(r.rows for r in runs)
    prompt = med(r.prompt_tokens for r in runs)
    generated = med(r.generated_tokens for r in runs)
    return {
        "elapsed_s": elapsed,
        "rows": rows,
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "rows_per_s": rows / elapsed,
        "generated_tokens_per_s": generated / elapsed,
        "prompt_tokens_per_s": prompt / elapsed,
        "time_to_first_result_s": med(r.first_result_s for r in runs),
        **_step_figures(runs),
    }


STEP_FIELDS = ("steps", "host_s", "device_s", "admit_s", "batch_s", "logits_s", "search_s", "kv_s", "step_passes")
_TIME_FIELDS = STEP_FIELDS[1:-1]


def _step_figures(runs: list[RunFigures]) -> dict:
    """Engine runs: host and device milliseconds per decode step, the host time's parts, and weight
    passes (llama.cpp micro-batches) per step (medians over the runs)."""
    if not runs or any(not r.steps or not r.steps["steps"] for r in runs):
        return {}
    med = statistics.median
    out = {"steps": med(r.steps["steps"] for r in runs)}
    for name in _TIME_FIELDS:
        out[f"{name[:-2]}_ms_per_step"] = med(1e3 * r.steps[name] / r.steps["steps"] for r in runs)
    out["passes_per_step"] = med(r.steps["step_passes"] / r.steps["steps"] for r in runs)
    out["host_share"] = med(r.steps["host_s"] / (r.steps["host_s"] + r.steps["device_s"]) for r in runs)
    return out


def default_warmup_rows(spec: ConfigSpec) -> int:
    """One full round of work: every slot busy once (a whole batch for hf-upstream), at least 2 rows."""
    if spec.system == HF_BASELINE:
        return HF_BATCH_SIZE
    return max(2, spec.slots or 1)


def measure_config(opts: BenchOptions, spec: ConfigSpec, max_new_tokens: int) -> dict:
    """Load, warm up and time one configuration; its memory peaks are its own."""
    result: dict = {"name": spec.name, **asdict(spec), "status": "ok"}
    gc.collect()
    runner = make_runner(opts, spec, max_new_tokens)
    with PeakMemory(gpu=spec.device == "gpu") as mem, CpuLoadMeter() as load:
        try:
            t0 = time.perf_counter()
            runner.load()
            result["load_s"] = time.perf_counter() - t0
            warm = opts.warmup_rows if opts.warmup_rows is not None else default_warmup_rows(spec)
            warm_pairs = opts.pairs[: max(1, min(warm, len(opts.pairs)))]
            result["warmup_rows"] = len(warm_pairs)
            for _ in runner.run(warm_pairs):
                pass
            runs = [time_run(runner, opts.pairs) for _ in range(opts.repeats)]
            result["settings"] = runner.describe()
        except (CapsfuseError, MemoryError, RuntimeError) as exc:
            # Out of memory (a context that does not fit, a failed llama_decode, CUDA OOM in
            # torch) ends this configuration only; the report says which and why.
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            runs = []
        finally:
            runner.close()
    result["runs"] = [asdict(r) for r in runs]
    if runs:
        result.update(summarize(runs))
    result.update(mem.figures())
    result["foreign_cpu_load"] = load.foreign_load
    return result


def add_ratios(results: list[dict]) -> None:
    """ratios[<baseline>] = rows/s of a configuration over the baseline's rows/s, only between equal
    decoding settings: same device and same beam count (the loop baseline is greedy, hf-upstream
    runs 3 beams), so no ratio mixes greedy with beam-search work."""
    base = [r for r in results if r["system"] != ENGINE and r["status"] == "ok"]
    for r in results:
        r["ratios"] = {}
        if r["status"] != "ok":
            continue
        for b in base:
            if b["device"] == r["device"] and b["beams"] == r["beams"] and b["system"] != r["system"]:
                r["ratios"][b["system"]] = r["rows_per_s"] / b["rows_per_s"]


def recommend_slots(results: list[dict], threshold: float = SLOTS_GAIN_THRESHOLD) -> list[dict]:
    """Per device and beam count: the slot count where throughput stops rising.

    Among the slot counts measured (prefix cache on when it was measured) up to the first one
    that failed (memory ran out), the recommendation is the smallest whose rows/s is within
    ``threshold`` of the best: more slots past it cost memory and first-result latency for
    less than ``threshold`` more throughput. The smallest-within-threshold rule (rather than
    stopping at the first step that does not rise) matters on CPUs, where llama.cpp's
    matrix kernels can make 2-6 sequences no faster than 1 while 8 and 16 are.
    """
    recs = []
    engine = [r for r in results if r["system"] == ENGINE]
    for device in sorted({r["device"] for r in engine}):
        for beams in sorted({r["beams"] for r in engine if r["device"] == device}):
            group = [r for r in engine if r["device"] == device and r["beams"] == beams]
            cache = any(r["prefix_cache"] for r in group)
            group = sorted((r for r in group if r["prefix_cache"] == cache), key=lambda r: r["slots"])
            usable, failed = [], None
            for r in group:
                if r["status"] != "ok":
                    failed = r
                    break
                usable.append(r)
            if not usable:
                continue
            best = max(r["rows_per_s"] for r in usable)
            pick = next(r for r in usable if r["rows_per_s"] >= best * (1 - threshold))
            if failed is not None:
                reason = f"slots={failed['slots']} failed: {failed.get('error', '')}"
            elif pick is usable[-1]:
                reason = "fastest of the slot counts measured; try more slots"
            else:
                reason = f"more slots add less than {threshold:.0%} rows/s"
            recs.append({
                "device": device, "beams": beams, "prefix_cache": cache, "slots": pick["slots"],
                "rows_per_s": pick["rows_per_s"], "reason": reason,
                # a knee to remember for --slots auto: throughput levelled off (seen over at least
                # three slot counts) or memory ran out
                "remember": (pick is not usable[-1] and len(usable) >= 3) or failed is not None,
            })
    return recs


def resolve_max_new_tokens(model: Path, requested: int | None) -> int:
    """The bench's token budget: the option, else the GGUF's capsfuse.max_new_tokens (upstream 80)."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--max-new-tokens {requested}: give at least 1")
        return requested
    from capsfuse_lite.models import gguf_defaults

    return gguf_defaults(model)["max_new_tokens"]


def _model_info(model: Path) -> dict:
    from capsfuse_lite.models import gguf_defaults

    return {"path": str(model), "size_bytes": model.stat().st_size, "quant": gguf_defaults(model)["quant"]}


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Measure every configuration of ``opts`` and return the report (see benchmarks/README.md)."""
    opts.validate()
    if not Path(opts.model).is_file():
        raise ConfigError(f"--model {opts.model}: no such file; give a GGUF made by `capsfuse-lite convert`")
    max_new = resolve_max_new_tokens(Path(opts.model), opts.max_new_tokens)
    report: dict = {
        "capsfuse_lite_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": _model_info(Path(opts.model)),
        "settings": {
            "input": opts.input_label, "rows": len(opts.pairs), "max_new_tokens": max_new,
            "n_threads": opts.n_threads, "repeats": opts.repeats, "warmup_rows": opts.warmup_rows,
            "slots": sorted(opts.slots), "beams": opts.beams, "prefix_cache": opts.prefix_cache,
            "devices": opts.devices, "baselines": opts.baselines,
        },
        "machine": machine_info(),
        "load_average_start": list(os.getloadavg()),
    }
    results = []
    plan = plan_configs(opts)
    for i, spec in enumerate(plan, 1):
        if progress:
            progress(f"[{i}/{len(plan)}] {spec.name}")
        results.append(measure_config(opts, spec, max_new))
    add_ratios(results)
    report["load_average_end"] = list(os.getloadavg())
    report["results"] = results
    report["recommended_slots"] = recommend_slots(results)
    report["foreign_load_warning"] = mark_foreign_load(report)
    engine_info = next((r.get("settings") for r in results if r["system"] == ENGINE and r.get("settings")), None)
    if engine_info:
        report["engine_settings_example"] = engine_info
    report["machine"]["platform"] = platform.platform()
    report["devices"] = _device_names(opts.devices)
    return report


FOREIGN_LOAD_CORES = 0.25  # other processes' load (cores) from which figures are marked ...
FOREIGN_LOAD_SHARE = 0.05  # ... when it is also this share of the machine's logical CPUs


def foreign_load(result: dict) -> float | None:
    """The most cores other processes kept busy during a configuration: its timed passes and the
    whole configuration (load, warm-up, passes); None where it could not be measured."""
    values = [run.get("foreign_cpu_load") for run in result.get("runs") or []] + [result.get("foreign_cpu_load")]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def foreign_load_limit(cpus: int | None) -> float:
    """Foreign load (cores) from which a configuration's figures are marked as disturbed."""
    return max(FOREIGN_LOAD_CORES, FOREIGN_LOAD_SHARE * (cpus or 1))


def mark_foreign_load(report: dict) -> str | None:
    """Mark every configuration other processes disturbed (``foreign_load_disturbed``) and return
    the warning the command prints (None on a quiet machine): on a busy machine two identical runs
    measured x1.37 and x1.04 over the same baseline (issue 17)."""
    cpus = (report.get("machine") or {}).get("logical_cpus")
    limit = foreign_load_limit(cpus)
    results = report.get("results") or []
    hit = []
    for r in results:
        load = foreign_load(r)
        r["foreign_load_disturbed"] = load is not None and load >= limit
        if r["foreign_load_disturbed"]:
            hit.append(load)
    if not hit:
        return None
    of = f" of {cpus}" if cpus else ""
    return (f"other processes kept up to {max(hit):.2f}{of} cores busy during {len(hit)} of {len(results)} "
            f"configurations (marked * in the table): their figures and ratios are not reliable; rerun on an idle machine")


def _device_names(kinds: list[str]) -> dict:
    """The name ``--slots auto`` knows each measured device by (see plan.choose_slots)."""
    names = {}
    if "cpu" in kinds:
        names["cpu"] = "CPU"
    if "gpu" in kinds:
        from capsfuse_lite.engine.fuser import _gpu_memory

        gpu = _gpu_memory()
        if gpu:
            names["gpu"] = gpu["description"]
    return names


def write_report(report: dict, path: str | Path) -> Path:
    from capsfuse_lite.files import write_json_atomic

    path = Path(path)
    write_json_atomic(path, report)
    return path


def remember_recommendations(report: dict) -> list[Path]:
    """Store each recommended slot count as this device's throughput knee for the model's shape, so
    that ``--slots auto`` uses it (see :mod:`capsfuse_lite.engine.plan`)."""
    from capsfuse_lite.engine.plan import ModelShape, remember_knee

    shape = ModelShape.from_gguf(report["model"]["path"])
    stored = []
    for rec in report.get("recommended_slots", []):
        device = report.get("devices", {}).get(rec["device"])
        if device and rec.get("remember", True):
            path = remember_knee(device, shape, rec["beams"], rec["slots"])
            if path is not None:
                stored.append(path)
    return stored


def plot_report_subprocess(report_path: str | Path, png: str | Path) -> Path | None:
    """:func:`plot_report` in a fresh Python process, so that matplotlib's C++ libraries never share a
    process with llama.cpp's (a CUDA build with a private libstdc++ crashed when matplotlib came
    after it); None when matplotlib is not installed or the plot failed."""
    import subprocess
    import sys

    code = ("import json, sys; from capsfuse_lite.bench.measure import plot_report; "
            "r = plot_report(json.load(open(sys.argv[1])), sys.argv[2]); sys.exit(0 if r else 3)")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(report_path), str(png)], capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(png) if done.returncode == 0 and Path(png).is_file() else None


def plot_layout(report: dict) -> dict:
    """What :func:`plot_report` draws, without matplotlib: ``series`` (label -> sorted (slots,
    rows/s) of the engine), ``baselines`` (label naming the system and its rows/s, rows/s), the
    y-axis from 0 to ``y_top`` (a y-axis from the lowest point made x1.04 look like x1.8) and the
    ``title``. Configurations other processes disturbed are marked * (:func:`mark_foreign_load`)."""
    results = [r for r in report["results"] if r["status"] == "ok"]
    star = lambda r: " *" if r.get("foreign_load_disturbed") else ""  # noqa: E731
    series: dict[str, list[tuple[int, float]]] = {}
    disturbed: set[str] = set()
    for r in results:
        if r["system"] == ENGINE:
            key = f"{r['device']} beams={r['beams']} cache={'on' if r['prefix_cache'] else 'off'}"
            series.setdefault(key, []).append((r["slots"], r["rows_per_s"]))
            if r.get("foreign_load_disturbed"):
                disturbed.add(key)
    series = {key + (" *" if key in disturbed else ""): sorted(pts) for key, pts in sorted(series.items())}
    baselines = [(f"{r['name']}: {r['rows_per_s']:.2f} rows/s{star(r)}", r["rows_per_s"]) for r in results if r["system"] != ENGINE]
    values = [v for pts in series.values() for _, v in pts] + [v for _, v in baselines]
    s = report["settings"]
    title = f"{Path(report['model']['path']).name}: {s['rows']} rows, {s['max_new_tokens']} new tokens"
    if report.get("foreign_load_warning"):
        title += "\n* measured while other processes kept cores busy: not reliable"
    return {"series": series, "baselines": baselines, "y_top": 1.1 * max(values) if values else 1.0, "title": title}


def plot_report(report: dict, path: str | Path) -> Path | None:
    """Rows/s against slots per device/beams/cache, baselines as dashed lines; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layout = plot_layout(report)
    series = layout["series"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    for i, (label, value) in enumerate(layout["baselines"]):
        color = f"C{(len(series) + i) % 10}"
        ax.axhline(value, linestyle="--", color=color, label=label)
        ax.annotate(label, xy=(0.99, value), xycoords=("axes fraction", "data"), xytext=(0, -2),
                    textcoords="offset points", fontsize=8, color=color, ha="right", va="top")
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("slots (sequences decoded together)")
    ax.set_ylabel("rows/s")
    ax.set_ylim(bottom=0, top=layout["y_top"])
    ax.set_title(layout["title"], fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
