"""`capsfuse-lite bench`: measure the engine against the usual alternatives on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import user_errors
from .errors import ConfigError, OutputExistsError

_AUTO = "auto"


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text}: give comma-separated integers, e.g. {option} 1,4,8") from None
    if not values:
        raise ConfigError(f"{option}: give at least one value")
    return values


def _choices(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{option} {text}: use one or more of {', '.join(allowed)} (comma-separated)")
    return list(dict.fromkeys(values))


def _devices(text: str) -> list[str]:
    from .llama import supports_gpu_offload

    if text == _AUTO:
        return ["gpu"] if supports_gpu_offload() else ["cpu"]
    devices = _choices("--device", text, ("cpu", "gpu"))
    if "gpu" in devices and not supports_gpu_offload():
        raise ConfigError("--device gpu: this llama-cpp-python build has no GPU offload; reinstall it with CUDA "
                          "(CMAKE_ARGS=\"-DGGML_CUDA=on -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL\" pip install --force-reinstall llama-cpp-python)")
    return devices


def _slots(text: str, devices: list[str]) -> list[int]:
    from .bench import DEFAULT_SLOTS

    if text == _AUTO:
        return sorted({s for d in devices for s in DEFAULT_SLOTS[d]})
    return _int_list("--slots", text)


def _baselines(text: str, hf_checkpoint: Path | None) -> list[str]:
    from .baselines import BASELINE_NAMES, HF_BASELINE, LOOP_BASELINE, hf_checkpoint_available

    if text == "none":
        return []
    if text == _AUTO:
        return [LOOP_BASELINE] + ([HF_BASELINE] if hf_checkpoint_available(hf_checkpoint) else [])
    return _choices("--baselines", text, BASELINE_NAMES)


def bench(
    model: Annotated[Path, typer.Option("--model", "-m", help="GGUF to benchmark (made by `capsfuse-lite convert`).")],
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Caption file (JSON/JSONL/CSV/Parquet with laion_2b and laion_coco); default: the bundled sample captions.")] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(help="CSV field separator: one character, or tab, comma, semicolon, pipe (default: comma).")] = None,
    rows: Annotated[int, typer.Option(help="Rows per timed pass; the input is repeated to reach it.")] = 48,
    slots: Annotated[str, typer.Option(help="Slot counts to measure, comma-separated; auto: 1,4,8,16 on a CPU, 1,8,16,32,64 with a GPU.")] = _AUTO,
    beams: Annotated[str, typer.Option(help="Beam counts to measure (1 = greedy), comma-separated.")] = "1,3",
    prefix_cache: Annotated[str, typer.Option("--prefix-cache", help="Shared prompt-prefix cache: on, off or on,off.")] = "on",
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Token budget per row for every system (default: the model's, upstream 80).")] = None,
    baselines: Annotated[str, typer.Option(help="auto (llama-cpp-python-loop, plus hf-upstream when --hf-checkpoint is given), none, or a comma-separated list.")] = _AUTO,
    hf_checkpoint: Annotated[Optional[Path], typer.Option(help="Hugging Face checkpoint folder the GGUF was converted from (for hf-upstream).")] = None,
    hf_dtype: Annotated[str, typer.Option(help="hf-upstream weights dtype: auto (bfloat16, as upstream), float32, bfloat16, float16.")] = _AUTO,
    device: Annotated[str, typer.Option("--device", help="auto (gpu when llama.cpp can offload, else cpu), cpu, gpu or cpu,gpu.")] = _AUTO,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for every system alike (default: all cores).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed passes per configuration (at least 2; medians are reported).")] = 2,
    warmup_rows: Annotated[Optional[int], typer.Option(help="Rows run before timing (default: one round of slots, at least 2).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Report JSON; a PNG plot is written next to it when matplotlib is installed.")] = Path("capsfuse-bench.json"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
) -> None:
    """Rows/s, tokens/s, first-result latency and peak memory per slot count, against the baselines."""
    from .cli import native_first

    native_first()
    with user_errors():
        from rich.console import Console

        from .bench import (BenchOptions, load_pairs, plot_report_subprocess, remember_recommendations, repeat_to,
                            run_bench, write_report)

        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; pass --force to overwrite it or -o another path")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads {threads}: give at least 1")
        devices = _devices(device)
        opts = BenchOptions(
            model=model,
            pairs=repeat_to(load_pairs(input, limit=rows, csv_delimiter=csv_delimiter), rows),
            slots=_slots(slots, devices),
            beams=_int_list("--beams", beams),
            prefix_cache=[v == "on" for v in _choices("--prefix-cache", prefix_cache, ("on", "off"))],
            max_new_tokens=max_new_tokens,
            baselines=_baselines(baselines, hf_checkpoint),
            hf_checkpoint=hf_checkpoint,
            hf_dtype=hf_dtype,
            devices=devices,
            repeats=repeats,
            warmup_rows=warmup_rows,
            input_label=str(input) if input else "sample captions",
        )
        if threads is not None:
            opts.n_threads = threads
        console = Console(stderr=True)
        with console.status("benchmarking") as status:
            report = run_bench(opts, progress=lambda text: status.update(f"benchmarking {text}"))
        write_report(report, output)
        Console().print(report_table(report))
        for rec in report["recommended_slots"]:
            console.print(f"recommended --slots for {rec['device']}, beams={rec['beams']}: [bold]{rec['slots']}[/] ({rec['reason']})")
        stored = remember_recommendations(report)
        if stored:
            console.print(f"remembered as this device's knee for --slots auto: {stored[0]}", highlight=False)
        png = plot_report_subprocess(output, output.with_suffix(".png"))
        console.print(f"report: {output}" + (f", plot: {png}" if png else " (pip install 'capsfuse-lite[plot]' for a plot)"))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_table(report: dict):
    """The report as a rich table: one line per configuration, ratios to each baseline."""
    from rich.table import Table

    from .baselines import BASELINE_NAMES

    results = report["results"]
    ratio_cols = [b for b in BASELINE_NAMES if any(b in r.get("ratios", {}) for r in results)]
    gpu = any(r.get("peak_gpu_mib") is not None for r in results)
    s = report["settings"]
    table = Table(title=f"{Path(report['model']['path']).name} ({report['model'].get('quant') or '?'}): "
                        f"{s['rows']} rows, max {s['max_new_tokens']} new tokens, {s['n_threads']} threads, "
                        f"median of {s['repeats']}")
    steps = any(r.get("host_ms_per_step") is not None for r in results)
    for col in ("configuration", "rows/s", "gen tok/s", "prompt tok/s", "first result s", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    if steps:
        table.add_column("host ms/step", justify="right")
        table.add_column("device ms/step", justify="right")
    if gpu:
        table.add_column("GPU MiB", justify="right")
    for b in ratio_cols:
        table.add_column(f"x {b}", justify="right")
    for r in results:
        if r["status"] != "ok":
            table.add_row(r["name"], f"[red]failed[/]: {r.get('error', '')}")
            continue
        cells = [r["name"], _fmt(r["rows_per_s"], ".2f"), _fmt(r["generated_tokens_per_s"], ".1f"),
                 _fmt(r["prompt_tokens_per_s"], ".0f"), _fmt(r["time_to_first_result_s"], ".2f"),
                 _fmt(r["peak_rss_mib"], ".0f")]
        if steps:
            cells += [_fmt(r.get("host_ms_per_step"), ".2f"), _fmt(r.get("device_ms_per_step"), ".2f")]
        if gpu:
            cells.append(_fmt(r.get("peak_gpu_mib"), ".0f"))
        cells += [_fmt(r["ratios"].get(b), ".2f") for b in ratio_cols]
        table.add_row(*cells)
    return table


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
