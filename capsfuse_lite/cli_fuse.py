"""`capsfuse-lite fuse` and `capsfuse-lite merge`: thin typer commands over runner and shards."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import defaults
from .records import csv_delimiter_name

EXIT_INTERRUPTED = 130
_LISTED = 50  # failed shards listed at the end of a dataset run


def _resume_command(cfg, resume: bool = True, inputs: list | None = None, extra: tuple = ()) -> str:
    """The command line that continues (or repeats) the run ``cfg`` (a dataset: ``inputs``, and
    ``extra`` options such as --ray)."""
    parts = ["capsfuse-lite", "fuse", *map(str, inputs or [cfg.input]), "-o", str(cfg.output), "--model", str(cfg.model)]
    options = [("--input-format", cfg.input_format, None), ("--output-format", cfg.output_format, None),
               ("--csv-delimiter", csv_delimiter_name(cfg.csv_delimiter) if cfg.csv_delimiter else None, None),
               ("--raw-field", cfg.raw_field, defaults.RAW_FIELD),
               ("--synthetic-field", cfg.synthetic_field, defaults.SYNTHETIC_FIELD),
               ("--output-field", cfg.output_field, defaults.OUTPUT_FIELD),
               ("--slots", cfg.slots, "auto"), ("--beams", cfg.beams, None), ("--max-new-tokens", cfg.max_new_tokens, None),
               ("--n-gpu-layers", cfg.n_gpu_layers, None), ("--ctx", cfg.n_ctx, None), ("--threads", cfg.n_threads, None),
               ("--limit", cfg.limit, None), ("--shard", f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else None, None)]
    for flag, value, default in options:
        if value is not None and value != default:
            parts += [flag, str(value)]
    parts += [str(x) for x in extra]
    if resume:
        parts.append("--resume")
    return shlex.join(parts)


class _StopOnSignal:
    """SIGINT/SIGTERM -> run.request_stop() (the run then saves the journal); a second signal aborts."""

    def __init__(self, run, notify):
        self.run = run
        self.notify = notify
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.run.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        try:
            self.notify("stopping after the current decode step (Ctrl-C again to abort) ...")
        except RuntimeError:  # the signal interrupted a write to the same stream
            pass

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def fuse(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT", help="Caption file: .json (array of objects, upstream's format), .jsonl, .csv or .parquet; the first three may be .gz or .zst compressed (rows.jsonl.gz). Or a dataset: a folder, a quoted glob ('data/**/*.parquet') or several files; each file then gives one output file under OUTPUT (a folder), at the same relative path.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (format from the extension); OUTPUT.meta.json is written beside it. For a dataset: the output folder.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF model. Default: CapsFus-LLaMA q4_k_m in ~/.cache/capsfuse-lite/, converted on first use.")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="Input format (json, jsonl, csv, parquet) instead of the extension.")] = None,
    output_format: Annotated[Optional[str], typer.Option(help="Output format instead of the extension.")] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(help="CSV field separator: one character, or tab, comma, semicolon, pipe (default: comma). A CSV output uses it too (default: the CSV input's).")] = None,
    raw_field: Annotated[str, typer.Option(help="Column with the raw alt-text (Sentence 1).")] = defaults.RAW_FIELD,
    synthetic_field: Annotated[str, typer.Option(help="Column with the synthetic caption (Sentence 2).")] = defaults.SYNTHETIC_FIELD,
    output_field: Annotated[str, typer.Option(help="Column for the fused caption (not finish_reason, status or error: those are written too).")] = defaults.OUTPUT_FIELD,
    slots: Annotated[str, typer.Option(help="Rows decoded at once (continuous batching): a number, or auto = the most that fit the GPU's free memory up to the throughput knee (CPU: 16 greedy, 8 with beams; `capsfuse-lite bench` measures and remembers your device's knee).")] = "auto",
    beams: Annotated[Optional[int], typer.Option(help="Beam width (1 = greedy). Default: the GGUF's capsfuse.num_beams (3).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Token limit per caption. Default: the GGUF's capsfuse.max_new_tokens (80).")] = None,
    n_gpu_layers: Annotated[Optional[int], typer.Option(help="Layers offloaded to the GPU. Default: all when a GPU is available.")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="KV cache size in tokens. Default: enough for all slots.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads. Default: llama.cpp's.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N input rows.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: only rows i with i mod N == I (merge the parts with `capsfuse-lite merge`). For a dataset: only files I, I+N, ... of its sorted file list (no merge needed).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the journal beside OUTPUT (rerunning the same command does too).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT and discard any journal (start over).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Convert the default model without asking.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Plain log lines instead of a progress bar.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Fuse a dataset on a Ray cluster: one worker per GPU (CPU-only: per --ray-cpus-per-worker cores), each loading the model once. Connects to the cluster `ray start` made on this machine (or RAY_ADDRESS), else starts a local one. Needs pip install 'capsfuse-lite[ray]'.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to connect to (HOST:PORT of `ray start --head`, or auto); implies --ray.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Ray workers (default: one per GPU of the cluster; CPU-only: its CPUs / --ray-cpus-per-worker).")] = None,
    ray_cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs reserved per Ray worker (default: 1 beside a GPU; CPU-only: the CPUs of the largest node); also its llama.cpp threads unless --threads is given.")] = None,
) -> None:
    """Fuse raw alt-texts and synthetic captions into CapsFusion captions, row by row."""
    from .cli import native_first, user_errors

    native_first()
    from .dataset import is_dataset
    from .models import resolve_model, terminal_confirm
    from .progress import make_progress
    from .runner import FuseConfig, FuseRun, parse_shard, parse_slots

    with user_errors():
        if ray or ray_address or is_dataset(inputs, output):
            settings = dict(
                model=None, input_format=input_format, output_format=output_format, csv_delimiter=csv_delimiter,
                raw_field=raw_field, synthetic_field=synthetic_field, output_field=output_field, slots=parse_slots(slots),
                beams=beams, max_new_tokens=max_new_tokens, n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_threads=threads,
                limit=limit, shard=parse_shard(shard) if shard else None, resume=resume, force=force)
            ray_options = None
            if ray or ray_address:
                from .cluster import RayOptions

                ray_options = RayOptions(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker)
            _fuse_dataset(inputs, output, settings, model, yes, quiet, ray_options)
            return
        input = inputs[0]
        cfg = FuseConfig(
            input=input, output=output, model=None, input_format=input_format, output_format=output_format,
            csv_delimiter=csv_delimiter,
            raw_field=raw_field, synthetic_field=synthetic_field, output_field=output_field, slots=parse_slots(slots),
            beams=beams, max_new_tokens=max_new_tokens, n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_threads=threads,
            limit=limit, shard=parse_shard(shard) if shard else None, resume=resume, force=force)
        progress = make_progress(quiet)
        run = FuseRun(cfg, progress=progress)
        run.prepare()  # a malformed input fails here, before any model work
        cfg.model = resolve_model(model, yes=yes, confirm=terminal_confirm())
        run.check_model()  # architecture, truncation, --max-new-tokens vs its context: before hashing it
        cfg.command = _resume_command(cfg, resume=False)
        how_to_resume = f"progress is saved in the journal; resume with:\n  {_resume_command(cfg)}"
        summary, stopper = _execute(run, progress, how_to_resume)
        if not summary.complete:
            _interrupted(stopper, how_to_resume)


def _execute(run, progress, how_to_resume: str):
    """``run.execute()`` with Ctrl-C / SIGTERM asking it to stop (a second Ctrl-C aborts); prints the
    summary. Returns (summary, the signal catcher)."""
    with _StopOnSignal(run, progress.note) as stopper:
        try:
            summary = run.execute()
        except KeyboardInterrupt:
            progress.close()
            typer.echo(f"aborted; {how_to_resume}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    from .progress import print_summary

    print_summary(summary)
    return summary, stopper


def _interrupted(stopper: _StopOnSignal, how_to_resume: str) -> None:
    typer.echo(f"interrupted; {how_to_resume}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED if stopper.signum != signal.SIGTERM else 128 + signal.SIGTERM)


def _fuse_dataset(inputs: list[Path], output: Path, settings: dict, model: Optional[Path], yes: bool, quiet: bool,
                  ray_options) -> None:
    """`fuse` over a dataset (a folder, glob or several files), on this machine or on Ray."""
    from .dataset import DatasetConfig, DatasetRun
    from .models import resolve_model, terminal_confirm
    from .progress import make_progress

    cfg = DatasetConfig(input=inputs[0], inputs=list(inputs), output=output, **settings)
    progress = make_progress(quiet)
    if ray_options is None:
        run = DatasetRun(cfg, progress=progress)
    else:
        from .cluster import RayDatasetRun

        run = RayDatasetRun(cfg, ray_options, progress=progress)
    shards = run.prepare()  # finds the shards (names and sizes only) and checks the output folder
    cfg.model = resolve_model(model, yes=yes, confirm=terminal_confirm())
    run.check_model()
    extra = ray_options.command_options() if ray_options is not None else ()
    cfg.command = _resume_command(cfg, resume=False, inputs=cfg.inputs, extra=extra)
    progress.note(f"{len(shards)} shard(s) under {run.root} -> {cfg.output}")
    how_to_resume = ("finished shards are kept and cut ones resume from their journals; rerun the same command:\n  "
                     + cfg.command)
    summary, stopper = _execute(run, progress, how_to_resume)
    if summary.failed:
        from .cli import error_line

        error_line(f"{len(summary.failed)} of {summary.shards_total} shards failed (the others are "
                   f"{'complete' if not summary.shards_left else 'complete or saved'}); fix them and rerun the same command:")
        for rel, reason in summary.failed[:_LISTED]:
            typer.echo(f"  {rel}: {reason}", err=True)
        if len(summary.failed) > _LISTED:
            typer.echo(f"  ... and {len(summary.failed) - _LISTED} more (each was named as it failed)", err=True)
        raise typer.Exit(2)
    if not summary.complete:
        _interrupted(stopper, how_to_resume)


def merge(
    parts: Annotated[list[Path], typer.Argument(help="Outputs of `fuse --shard I/N` for I = 0..N-1, each with the OUTPUT.meta.json fuse wrote beside it (any order: the meta files say which shard each is and how many rows it must hold).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Merged file, rows in input order (format from the extension).")],
    output_format: Annotated[Optional[str], typer.Option(help="Output format instead of the extension.")] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(help="CSV field separator: one character, or tab, comma, semicolon, pipe (default: comma). Give the one `fuse` used for CSV parts.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT.")] = False,
) -> None:
    """Concatenate shard outputs back into input order (refused unless they are provably all shards of one run, each complete and unchanged)."""
    from .cli import user_errors
    from .shards import merge_shards

    with user_errors():
        rows = merge_shards(parts, output, output_format=output_format, force=force, csv_delimiter=csv_delimiter)
        typer.echo(f"wrote {output} ({rows} rows from {len(parts)} parts)", err=True)


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
    app.command("merge")(merge)
