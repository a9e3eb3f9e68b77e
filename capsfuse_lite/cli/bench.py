"""`capsfuse-lite bench`: measure the engine against the usual alternatives on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capsfuse_lite.cli.common import HELP_CSV_DELIMITER, HELP_FORCE, HELP_INPUT_FORMAT, HELP_VERBOSE, help_threads, user_errors
from capsfuse_lite.errors import ConfigError, OutputExistsError

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
    from capsfuse_lite.engine.llama import supports_gpu_offload

    if text == _AUTO:
        return ["gpu"] if supports_gpu_offload() else ["cpu"]
    devices = _choices("--device", text, ("cpu", "gpu"))
    if "gpu" in devices and not supports_gpu_offload():
        raise ConfigError("--device gpu: this llama-cpp-python build has no GPU offload; rebuild it with CUDA: "
                          "`CMAKE_ARGS=\"-DGGML_CUDA=on -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL\" "
                          "pip install --force-reinstall --no-cache-dir \"llama-cpp-python>=0.3.36,<0.3.37\"`")
    return devices


def _slots(text: str, devices: list[str]) -> list[int]:
    from capsfuse_lite.bench.measure import DEFAULT_SLOTS

    if text == _AUTO:
        return sorted({s for d in devices for s in DEFAULT_SLOTS[d]})
    return _int_list("--slots", text)


def _baselines(text: str, hf_checkpoint: Path | None) -> list[str]:
    from capsfuse_lite.bench.baselines import BASELINE_NAMES, HF_BASELINE, LOOP_BASELINE, hf_checkpoint_available

    if text == "none":
        return []
    if text == _AUTO:
        return [LOOP_BASELINE] + ([HF_BASELINE] if hf_checkpoint_available(hf_checkpoint) else [])
    return _choices("--baselines", text, BASELINE_NAMES)


def _slots_help() -> str:
    from capsfuse_lite.bench.measure import DEFAULT_SLOTS

    return ("Slot counts to measure, comma-separated, or auto: "
            f"{','.join(map(str, DEFAULT_SLOTS['cpu']))} on a CPU, {','.join(map(str, DEFAULT_SLOTS['gpu']))} on a GPU.")


def bench(
    model: Annotated[Path, typer.Option("--model", "-m", metavar="MODEL", help="GGUF to measure (made by `capsfuse-lite convert`).")],
    input: Annotated[Optional[Path], typer.Option("--input", "-i", metavar="INPUT", help="Caption file, as for fuse (laion_2b and laion_coco columns).  [default: the 47 sample captions shipped with capsfuse-lite]")] = None,
    input_format: Annotated[Optional[str], typer.Option(metavar="FORMAT", help=HELP_INPUT_FORMAT)] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(metavar="CHAR", help=HELP_CSV_DELIMITER)] = None,
    rows: Annotated[int, typer.Option(metavar="N", help="Rows per timed pass; the input's rows are repeated to reach it.")] = 48,
    slots: Annotated[str, typer.Option(metavar="LIST", help=_slots_help())] = _AUTO,
    beams: Annotated[str, typer.Option(metavar="LIST", help="Beam counts to measure, comma-separated (1 = greedy).")] = "1,3",
    prefix_cache: Annotated[str, typer.Option("--prefix-cache", metavar="on|off|on,off", help="Measure with the shared prompt-prefix cache on, off, or both.")] = "on",
    max_new_tokens: Annotated[Optional[int], typer.Option(metavar="N", help="Tokens generated per row, for every system alike.  [default: the model's capsfuse.max_new_tokens: 80, upstream's]")] = None,
    baselines: Annotated[str, typer.Option(metavar="LIST", help="Systems to compare against: auto (llama-cpp-python-loop, plus hf-upstream when --hf-checkpoint is given), none, or a comma-separated list of those two.")] = _AUTO,
    hf_checkpoint: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="The Hugging Face checkpoint folder MODEL was converted from, for the hf-upstream baseline (needs torch and transformers).")] = None,
    hf_dtype: Annotated[str, typer.Option(metavar="DTYPE", help="hf-upstream weights: auto (bfloat16, as upstream), float32, bfloat16 or float16.")] = _AUTO,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (gpu when this llama.cpp build can offload, else cpu), cpu, gpu or cpu,gpu.")] = _AUTO,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help=f"CPU threads, for every system alike.  {help_threads()}")] = None,
    repeats: Annotated[int, typer.Option(metavar="N", help="Timed passes per configuration (at least 2); medians are reported.")] = 2,
    warmup_rows: Annotated[Optional[int], typer.Option(metavar="N", help="Rows run before timing each configuration.  [default: one row per slot, at least 2; a batch of 4 for hf-upstream]")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTPUT", help="Report JSON to write (with a PNG plot beside it when matplotlib is installed); a missing folder is created.")] = Path("capsfuse-bench.json"),
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One log line per configuration instead of a status line (the default when stderr is not a terminal).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help=HELP_VERBOSE)] = False,
) -> None:
    """Measure rows/s and memory per slot count.

    Runs the same rows through the engine at each slot count, greedy and with beams, and through
    the baselines, in one process; prints a table, writes the report and recommends --slots.
    """
    from capsfuse_lite.cli.common import native_first, plain, stderr_console, verbose_llama

    native_first()
    verbose_llama(verbose)
    with user_errors():
        from rich.console import Console

        from capsfuse_lite.bench.measure import (BenchOptions, load_pairs, plot_report_subprocess, remember_recommendations, repeat_to,
                            run_bench, write_report)
        from capsfuse_lite.files import check_output_folder, make_output_folder

        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; pass --force to overwrite it (or choose another -o)")
        check_output_folder(output)
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads {threads}: give at least 1")
        devices = _devices(device)
        opts = BenchOptions(
            model=model,
            pairs=repeat_to(load_pairs(input, limit=rows, csv_delimiter=csv_delimiter, input_format=input_format), rows),
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
        make_output_folder(output)
        console = stderr_console()
        if quiet or not console.is_terminal:
            report = run_bench(opts, progress=lambda text: console.print(plain(f"benchmarking {text}")))
        else:
            with console.status(plain("benchmarking")) as status:
                report = run_bench(opts, progress=lambda text: status.update(plain(f"benchmarking {text}")))
        write_report(report, output)
        print_report_table(report, Console(highlight=False))
        if report.get("foreign_load_warning"):
            console.print(plain("warning:", " ", report["foreign_load_warning"], style="bold yellow"))
        for rec in report["recommended_slots"]:
            console.print(plain(f"recommended --slots for {rec['device']}, beams={rec['beams']}: {rec['slots']} ({rec['reason']})"))
        stored = remember_recommendations(report)
        if stored:
            console.print(plain(f"remembered as this device's knee for --slots auto: {stored[0]}"))
        png = plot_report_subprocess(output, output.with_suffix(".png"))
        console.print(plain(f"report: {output}" + (f", plot: {png}" if png else " (pip install 'capsfuse-lite[plot]' for a plot)")))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report_table(report: dict, console) -> None:
    """Print :func:`report_table` on ``console`` without cutting a figure: a log or a pipe gets the
    table at its natural width; a terminal too narrow for every figure gets lines it wraps."""
    table = report_table(report)
    need = console.measure(table, options=console.options.update_width(1000))
    console.width = max(console.width, need.minimum if console.is_terminal else need.maximum)
    console.print(table)


def report_table(report: dict):
    """The report as a rich table: one line per configuration, ratios to each baseline."""
    from rich.table import Table

    from capsfuse_lite.bench.baselines import BASELINE_NAMES
    from capsfuse_lite.cli.common import plain

    results = report["results"]
    ratio_cols = [b for b in BASELINE_NAMES if any(b in r.get("ratios", {}) for r in results)]
    gpu = any(r.get("peak_gpu_mib") is not None for r in results)
    s = report["settings"]
    table = Table(title=plain(f"{Path(report['model']['path']).name} ({report['model'].get('quant') or '?'}): "
                              f"{s['rows']} rows, max {s['max_new_tokens']} new tokens, {s['n_threads']} threads, "
                              f"median of {s['repeats']}"))
    steps = any(r.get("host_ms_per_step") is not None for r in results)
    names = ["configuration", "rows/s", "gen tok/s", "prompt tok/s", "first result s", "peak RSS MiB"]
    names += ["host ms/step", "device ms/step", "passes/step"] if steps else []
    names += ["GPU MiB"] if gpu else []
    names += [f"x {b}" for b in ratio_cols]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([plain(r["name"]), plain("failed", f": {r.get('error', '')}", style="red")])
            continue
        name = r["name"] + (" *" if r.get("foreign_load_disturbed") else "")
        cells = [name, _fmt(r["rows_per_s"], ".2f"), _fmt(r["generated_tokens_per_s"], ".1f"),
                 _fmt(r["prompt_tokens_per_s"], ".0f"), _fmt(r["time_to_first_result_s"], ".2f"),
                 _fmt(r["peak_rss_mib"], ".0f")]
        if steps:
            cells += [_fmt(r.get("host_ms_per_step"), ".2f"), _fmt(r.get("device_ms_per_step"), ".2f"),
                      _fmt(r.get("passes_per_step"), ".2f")]
        if gpu:
            cells.append(_fmt(r.get("peak_gpu_mib"), ".0f"))
        cells += [_fmt(r["ratios"].get(b), ".2f") for b in ratio_cols]
        rows.append([plain(c) for c in cells])
    for k, name in enumerate(names):  # values are never cut: a narrow terminal wraps headers, not figures
        widest = max([len(row[k]) for row in rows if len(row) == len(names)] or [0])
        table.add_column(name, justify="left" if k == 0 else "right", no_wrap=k == 0, min_width=widest)
    for row in rows:
        table.add_row(*row)
    if report.get("foreign_load_warning"):
        table.caption = plain("* measured while other processes kept cores busy (report: foreign_cpu_load)")
    return table


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
