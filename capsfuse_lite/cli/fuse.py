"""`capsfuse-lite fuse` and `capsfuse-lite merge`: thin typer commands over :mod:`capsfuse_lite.run`."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from capsfuse_lite import defaults
from capsfuse_lite.cli.common import (HELP_CHAT_TEMPLATE, HELP_FORCE, HELP_INPUT_FORMAT, HELP_OUTPUT_FORMAT, HELP_QUIET, HELP_RAW_FIELD,
                         HELP_SYNTHETIC_FIELD, HELP_VERBOSE, help_threads)
from capsfuse_lite.engine.plan import DEFAULT_KNEE
from capsfuse_lite.formats import csv_delimiter_name, parse_csv_delimiter

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM
_LISTED = 50  # failed shards listed at the end of a dataset run
_NOT_REPEATED = ("inputs", "output", "model", "force", "resume", "yes")  # placed first, or meaningless on a resume


def _given_options(ctx: typer.Context) -> list[str]:
    """The options the user gave on the command line (not defaults), as command-line words, in the
    order the command defines them; INPUT, -o, --model, --force, --resume and --yes are left out."""
    words: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in _NOT_REPEATED or source is None or source.name.startswith("DEFAULT"):
            continue
        value = ctx.params.get(param.name)
        names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
        if getattr(param, "is_flag", False) and isinstance(value, bool):
            secondary = [o for o in getattr(param, "secondary_opts", ()) if o.startswith("--")]
            if value or secondary:
                words.append(names[0] if value else secondary[0])
            continue
        if value is None:
            continue
        if param.name == "csv_delimiter":
            value = csv_delimiter_name(parse_csv_delimiter(value))
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [names[0], str(item)]
    return words


def _resume_command(cfg, options: list[str], resume: bool = True, inputs: list | None = None) -> str:
    """The command line that continues (``resume``) or repeats the run ``cfg`` (a dataset: ``inputs``):
    every option the user gave (``options``, see :func:`_given_options`) and the model file in use."""
    parts = ["capsfuse-lite", "fuse", *map(str, inputs or [cfg.input]), "-o", str(cfg.output), "--model", str(cfg.model),
             *options]
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


def _default_model_help() -> str:
    from capsfuse_lite.cli.common import help_path
    from capsfuse_lite.models import default_model_path

    return (f"GGUF file made by `capsfuse-lite convert`. Default: CapsFus-LLaMA q4_k_m at "
            f"{help_path(default_model_path())}, converted from the Hugging Face hub on first use, after asking "
            "(--yes skips the question).")


def _slots_help() -> str:
    return ("Rows decoded at once (continuous batching): a number, or auto. auto: on a GPU, the most rows whose "
            f"KV cache fits its free memory, up to {DEFAULT_KNEE[('gpu', 1)]} greedy or "
            f"{DEFAULT_KNEE[('gpu', 'beams')]} with beams; on a CPU, {DEFAULT_KNEE[('cpu', 1)]} greedy or "
            f"{DEFAULT_KNEE[('cpu', 'beams')]} with beams; once `capsfuse-lite bench` has run on this device, "
            "the slot count it recommended replaces those limits.")


INPUT_HELP = ("Caption file: .json (an array of objects, upstream's format), .jsonl, .csv or .parquet; "
              ".json, .jsonl and .csv may be gzip or zstd compressed (rows.jsonl.gz, rows.csv.zst). Or a dataset: "
              "a folder, a quoted glob ('data/**/*.parquet') or several files; each file then gives one output file "
              "under OUTPUT (a folder), at the same relative path.")


def fuse(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help=INPUT_HELP, show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="OUTPUT", help="File to write; its extension sets the format, as for INPUT (compression included). OUTPUT.meta.json is written beside it and a missing folder is created. An OUTPUT already complete for this command is left as is (exit code 0). For a dataset: the output folder (complete shards are skipped).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", metavar="MODEL", help=_default_model_help(), show_default=False)] = None,
    input_format: Annotated[Optional[str], typer.Option(metavar="FORMAT", help=HELP_INPUT_FORMAT)] = None,
    output_format: Annotated[Optional[str], typer.Option(metavar="FORMAT", help=HELP_OUTPUT_FORMAT)] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(metavar="CHAR", help="CSV field separator: one character, or tab, comma, semicolon, pipe; a CSV OUTPUT uses it too.  [default: comma]")] = None,
    raw_field: Annotated[str, typer.Option(metavar="NAME", help=HELP_RAW_FIELD)] = defaults.RAW_FIELD,
    synthetic_field: Annotated[str, typer.Option(metavar="NAME", help=HELP_SYNTHETIC_FIELD)] = defaults.SYNTHETIC_FIELD,
    output_field: Annotated[str, typer.Option(metavar="NAME", help="Column for the fused caption. Columns finish_reason, status and error are added too, so those names are taken.")] = defaults.OUTPUT_FIELD,
    slots: Annotated[str, typer.Option(metavar="N", help=_slots_help())] = "auto",
    beams: Annotated[Optional[int], typer.Option(metavar="N", help="Beams per row; 1 = greedy.  [default: the model's capsfuse.num_beams: 3, upstream's]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(metavar="N", help="Most tokens generated per caption.  [default: the model's capsfuse.max_new_tokens: 80, upstream's]")] = None,
    n_gpu_layers: Annotated[Optional[int], typer.Option(metavar="N", help="Layers offloaded to the GPU (0: CPU only).  [default: all when llama.cpp is built with GPU support, else 0]")] = None,
    chat_template: Annotated[str, typer.Option("--chat-template", metavar="MODE", help=HELP_CHAT_TEMPLATE)] = "none",
    kv_type: Annotated[Optional[str], typer.Option("--kv-type", metavar="TYPE", help="KV cache element type: f16, q8_0 (half the memory, so more slots fit; needs flash attention), f32, bf16, q4_0.  [default: f16]")] = None,
    ctx_size: Annotated[Optional[int], typer.Option("--ctx", metavar="N", help="KV cache size in tokens.  [default: enough for every slot's longest prompt and all its beams]")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help=f"CPU threads for llama.cpp.  {help_threads()}")] = None,
    limit: Annotated[Optional[int], typer.Option(metavar="N", help="Only the first N input rows.")] = None,
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help="Only input rows i with i mod N = I (0 <= I < N): one shard per GPU or machine; `capsfuse-lite merge` joins the parts in input order. For a dataset: only files I, I+N, ... of its sorted file list (no merge needed).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT's journal (a plain rerun does too, also of an interrupted --force run over an existing OUTPUT); without a journal, an OUTPUT that is not complete for this command is refused.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over: overwrite OUTPUT and discard its journal.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Convert the default model without asking (no --model given, not converted yet).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=HELP_QUIET)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help=HELP_VERBOSE)] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Fuse a dataset on a Ray cluster: one worker per GPU (CPU-only: per --ray-cpus-per-worker cores), each loading the model once. Connects to the cluster `ray start` made on this machine (or RAY_ADDRESS), else starts a local one. Needs pip install 'capsfuse-lite[ray]'.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="Ray cluster to connect to (HOST:PORT of `ray start --head`, or auto); implies --ray.")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(metavar="N", help="Ray workers.  [default: one per GPU of the cluster; CPU-only: its CPUs / --ray-cpus-per-worker]")] = None,
    ray_cpus_per_worker: Annotated[Optional[float], typer.Option(metavar="N", help="CPUs reserved per Ray worker, also its llama.cpp threads unless --threads is given.  [default: 1 beside a GPU; CPU-only: the CPUs of the largest node]")] = None,
) -> None:
    """Fuse each row's two captions into one caption.

    Every input row gets a CapsFusion caption (column --output-field), in input order, every input
    column kept. Rows are journaled as they finish: after a crash or Ctrl-C, the same command (or --resume)
    continues where it stopped. Exit codes: 0 done (also when OUTPUT was already complete),
    2 a problem with the input or options, 130 Ctrl-C, 143 SIGTERM (journal saved), 1 a bug.
    """
    from capsfuse_lite.cli.common import native_first, user_errors, verbose_llama

    native_first()
    verbose_llama(verbose)
    from capsfuse_lite.run.discovery import is_dataset
    from capsfuse_lite.models import resolve_model, terminal_confirm
    from capsfuse_lite.run.progress import make_progress
    from capsfuse_lite.run.config import FuseConfig, parse_shard, parse_slots
    from capsfuse_lite.run.single import FuseRun

    with user_errors():
        options = _given_options(ctx)
        if ray or ray_address or is_dataset(inputs, output):
            settings = dict(
                model=None, input_format=input_format, output_format=output_format, csv_delimiter=csv_delimiter,
                raw_field=raw_field, synthetic_field=synthetic_field, output_field=output_field, slots=parse_slots(slots),
                beams=beams, max_new_tokens=max_new_tokens, n_gpu_layers=n_gpu_layers, kv_type=kv_type, n_ctx=ctx_size, n_threads=threads,
                chat_template=chat_template, limit=limit, shard=parse_shard(shard) if shard else None, resume=resume, force=force)
            ray_options = None
            if ray or ray_address:
                from capsfuse_lite.run.cluster import RayOptions

                ray_options = RayOptions(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker)
            _fuse_dataset(inputs, output, settings, model, yes, quiet, ray_options, options, verbose)
            return
        input = inputs[0]
        cfg = FuseConfig(
            input=input, output=output, model=model, input_format=input_format, output_format=output_format,
            csv_delimiter=csv_delimiter,
            raw_field=raw_field, synthetic_field=synthetic_field, output_field=output_field, slots=parse_slots(slots),
            beams=beams, max_new_tokens=max_new_tokens, n_gpu_layers=n_gpu_layers, kv_type=kv_type, n_ctx=ctx_size, n_threads=threads,
            chat_template=chat_template, limit=limit, shard=parse_shard(shard) if shard else None, resume=resume, force=force)
        progress = make_progress(quiet)
        run = FuseRun(cfg, progress=progress)
        run.prepare()  # a malformed input fails here, before any model work
        if run.already_done is not None:  # OUTPUT is complete for this command: nothing to do
            typer.echo(run.already_done, err=True)
            return
        cfg.model = resolve_model(model, yes=yes, confirm=terminal_confirm())
        run.check_model()  # architecture, truncation, --max-new-tokens vs its context: before hashing it
        cfg.command = _resume_command(cfg, options, resume=False)
        how_to_resume = f"progress is saved in the journal; resume with:\n  {_resume_command(cfg, options)}"
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
    from capsfuse_lite.run.progress import print_summary

    print_summary(summary)
    return summary, stopper


def _interrupted(stopper: _StopOnSignal, how_to_resume: str) -> None:
    typer.echo(f"interrupted; {how_to_resume}", err=True)
    raise typer.Exit(EXIT_INTERRUPTED if stopper.signum != signal.SIGTERM else EXIT_TERMINATED)


def _fuse_dataset(inputs: list[Path], output: Path, settings: dict, model: Optional[Path], yes: bool, quiet: bool,
                  ray_options, options: list[str], verbose: bool = False) -> None:
    """`fuse` over a dataset (a folder, glob or several files), on this machine or on Ray."""
    from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun
    from capsfuse_lite.models import resolve_model, terminal_confirm
    from capsfuse_lite.run.progress import make_progress

    cfg = DatasetConfig(input=inputs[0], inputs=list(inputs), output=output, **settings)
    progress = make_progress(quiet)
    if ray_options is None:
        run = DatasetRun(cfg, progress=progress)
    else:
        from capsfuse_lite.run.cluster import RayDatasetRun

        run = RayDatasetRun(cfg, ray_options, progress=progress)
    run.verbose = verbose  # a shard that fails on a bug: its traceback
    shards = run.prepare()  # finds the shards (names and sizes only) and checks the output folder
    cfg.model = resolve_model(model, yes=yes, confirm=terminal_confirm())
    run.check_model()
    cfg.command = _resume_command(cfg, options, resume=False, inputs=cfg.inputs)
    progress.note(f"{len(shards)} shard(s) under {run.root} -> {cfg.output}")
    how_to_resume = ("finished shards are kept and cut ones resume from their journals; rerun the same command:\n  "
                     + cfg.command)
    summary, stopper = _execute(run, progress, how_to_resume)
    if summary.failed:
        from capsfuse_lite.cli.common import error_line

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
    parts: Annotated[list[Path], typer.Argument(metavar="PART...", help="Outputs of `capsfuse-lite fuse --shard I/N` for I = 0 .. N-1, in any order, each with the OUTPUT.meta.json fuse wrote beside it (it says which shard the part is and how many rows it must hold).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="OUTPUT", help="Merged file, rows in input order; its extension sets the format (compression included). A missing folder is created.")],
    output_format: Annotated[Optional[str], typer.Option(metavar="FORMAT", help=HELP_OUTPUT_FORMAT)] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(metavar="CHAR", help="CSV field separator of CSV parts (the one fuse used) and of a CSV OUTPUT: one character, or tab, comma, semicolon, pipe.  [default: comma]")] = None,
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
) -> None:
    """Join shard outputs back into input order.

    Refused, with nothing written, unless the parts are provably all shards of one run, each
    complete and unchanged since fuse wrote it.
    """
    from capsfuse_lite.cli.common import user_errors
    from capsfuse_lite.run.merge import merge_shards

    with user_errors():
        rows = merge_shards(parts, output, output_format=output_format, force=force, csv_delimiter=csv_delimiter)
        typer.echo(f"wrote {output} ({rows} rows from {len(parts)} parts)", err=True)


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
    app.command("merge")(merge)
