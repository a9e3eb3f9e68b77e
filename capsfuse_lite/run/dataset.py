"""Dataset mode: a folder or glob of caption files, fused file by file into an output folder.

    run = DatasetRun(DatasetConfig(input="data/", output="fused/", model="m.gguf"))
    run.prepare()            # finds the shards (names and sizes only) and checks the output folder
    summary = run.execute()  # one engine for every shard; a DatasetSummary

**Shards** (found by :mod:`capsfuse_lite.run.discovery`). The input is a folder (every caption file below it: .json, .jsonl, .ndjson, .csv, .parquet,
.pq, the text formats optionally .gz/.zst compressed; with ``input_format`` every file), a glob
(``"data/**/*.parquet"``, quoted so that the shell leaves it alone; ``**`` spans folders) or several
files and folders (a glob the shell expanded). Hidden files and folders, capsfuse-lite's own
``.meta.json`` and journal files and everything under the output folder are never shards. Each shard's
path relative to the input root -- the folder, the glob's part before its first wildcard, or the folder
the given paths share -- is kept under the output folder, in the same format (``output_format``
replaces the format extension and keeps ``.gz``/``.zst`` for text formats). ``shard=(I, N)`` keeps
files ``I, I+N, ...`` of the sorted list: N independent processes (a SLURM array) split a dataset
without a merge step.

**Per shard**, everything a single-file run guarantees holds (:class:`~capsfuse_lite.run.single.FuseRun`
is the unit): journal beside the output, one run per output (lock), content-keyed resume, output
written to ``.partial`` and renamed, ``.meta.json``. On top:

- *Skip if done, continue if cut.* A shard whose output is complete by the rule of a single-file run
  (:func:`capsfuse_lite.run.outputs.finished_output`: input sha256, every setting that changes the
  output's bytes, output size) is skipped without being parsed. A journal beside an existing output
  is an interrupted run's, which the shard continues (:func:`capsfuse_lite.run.outputs.unfinished_journal`);
  a ``force`` run first leaves an empty journal beside every output it is to redo, so that when it is
  cut, the command it prints (without ``--force``) finishes its work. Any other existing output fails
  its shard, naming what differs: nothing is overwritten without ``force``.
- *One engine, slots kept full.* The model is loaded once (and only if some row needs it). One
  ``Fuser.fuse(ordered=False)`` stream takes the pending rows of shard after shard (:class:`ShardStream`),
  so the next shard's rows fill the slots while the last rows of the previous one finish. Each result
  goes to its shard's journal; a shard is written and published as soon as its last row is journaled.
- *Bounded.* A shard is opened (read through once to validate it, its journal locked) only when the
  stream is about to take its rows, and closed once published: the shards open at a time are those
  with rows in the engine (at most ``slots + 1``), whatever the number of shards.
- *A bad shard costs one shard.* A malformed file, an output that is not this run's, a journal of
  other settings or one in use by another process -- or any other failure while the shard is read,
  journaled or written, a bug included (:func:`failure_line`) -- fails that shard with one line; the
  other shards go on, and the run ends with exit code 2 listing them. A full disk stops the run (every
  later shard would fail too); journals keep what was done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

from capsfuse_lite.errors import CapsfuseError, ConfigError, DiskSpaceError
from capsfuse_lite.run.journal import journal_path, mark_replacing
from capsfuse_lite.run.progress import Progress
from capsfuse_lite.formats.base import _EXTENSIONS
from capsfuse_lite.formats import detect_compression, detect_format, import_pyarrow, import_zstandard, split_compression
from capsfuse_lite.run.discovery import Shard, find_shards
from capsfuse_lite.run.config import FuseConfig, check_writable_folder, fuser_kwargs, settings_fingerprint
from capsfuse_lite.run.rows import COUNTS, RowCounts
from capsfuse_lite.run.single import FuseRun, check_model_file, default_fuser_factory
from capsfuse_lite.run.outputs import meta_path

@dataclass
class DatasetConfig(FuseConfig):
    """:class:`~capsfuse_lite.run.config.FuseConfig` for a dataset: ``input`` is a folder or a glob (or
    ``inputs`` several files, folders and globs), ``output`` the output folder, ``shard=(I, N)``
    selects files I, I+N, ... of the sorted shard list, and ``limit`` is not available. Every other
    setting applies to each shard."""

    inputs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inputs = [str(p) for p in (self.inputs or [self.input])]
        super().__post_init__()
        if self.limit is not None:
            raise ConfigError("--limit selects rows of one file; in a dataset, choose files with a glob or --shard I/N")

    def file_config(self, shard: Shard) -> FuseConfig:
        """The single-file run of ``shard``."""
        values = {f.name: getattr(self, f.name) for f in fields(FuseConfig)}
        return FuseConfig(**{**values, "input": shard.input, "output": shard.output, "shard": None})


# -- one shard ---------------------------------------------------------------------------------------


def failure_line(error: BaseException) -> str:
    """One line for a shard that failed with ``error``: a user error's own message; anything else (a
    bug, or a library error the code does not foresee) named by its type, with the way to its traceback."""
    if isinstance(error, CapsfuseError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or 'a file'}: {error.strerror}" if error.filename else str(error.strerror)
    text = str(error).splitlines()[0] if str(error) else ""
    return (f"internal error ({type(error).__name__}{': ' + text if text else ''}); the other shards go on; "
            "--verbose prints its traceback (please report it)")


def failure_trace(error: BaseException) -> str | None:
    """The traceback of an ``error`` that is not a user error (printed with ``--verbose``), else None."""
    if isinstance(error, CapsfuseError) or (isinstance(error, OSError) and error.strerror):
        return None
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()


@dataclass
class ShardOutcome:
    """How one shard ended: ``done`` (written by this run), ``skipped`` (complete before),
    ``failed`` (``error`` says why) or ``interrupted`` (its journal keeps the rows done)."""

    rel: str
    status: str
    error: str | None = None
    rows: int = 0  # rows of the shard (0 when unknown)
    counts: dict = field(default_factory=dict)  # RunSummary counts of a done or interrupted shard
    fuse_s: float = 0.0
    model: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    worker: int | None = None  # on Ray: the pid of the worker process that ended it
    actor: str | None = None  # on Ray: the id of that worker's actor (the same after a restart)

    trace: str | None = None  # the traceback of a failure that is not a CapsfuseError (a bug), for --verbose

    @classmethod
    def failure(cls, rel: str, error: BaseException, rows: int = 0) -> "ShardOutcome":
        """Shard ``rel`` failed with ``error``: its one line (and, for an error that is not the user's, a
        traceback kept for ``--verbose``)."""
        return cls(rel, "failed", failure_line(error), rows, trace=failure_trace(error))

    @classmethod
    def of(cls, run: FuseRun, error: BaseException | None = None, status: str | None = None) -> "ShardOutcome":
        s = run.summary
        if error is not None:
            return cls.failure(run.label, error, s.rows_total if s else 0)
        status = status or ("done" if s.complete else "interrupted")
        counts = {k: getattr(s, k) for k in COUNTS}
        counts["skipped_reasons"] = dict(s.skipped_reasons)
        return cls(run.label, status, None, s.rows_total, counts, s.fuse_s, dict(s.model), dict(s.settings))


def finished_rows(shard: Shard, cfg: DatasetConfig, base: dict) -> int:
    """Rows of ``shard``'s existing output if it is complete for this run, by the rule a single-file
    run applies (:func:`capsfuse_lite.run.outputs.finished_output`: input sha256 and every setting that
    changes the output's bytes); else OutputExistsError saying what differs."""
    from capsfuse_lite.run.outputs import finished_output, read_meta

    finished_output(cfg.file_config(shard), output_format=detect_format(shard.output, cfg.output_format, role="output"),
                    input_format=detect_format(shard.input, cfg.input_format), model_sha256=base["model_sha256"])
    rows = ((read_meta(meta_path(shard.output)) or {}).get("output") or {}).get("rows")
    return rows if isinstance(rows, int) else 0


def finished_outcome(cfg: DatasetConfig, shard: Shard, base: dict) -> ShardOutcome | None:
    """``skipped`` if ``shard``'s output exists and is complete for this run, ``failed`` if it exists
    otherwise (without ``force``), None if the shard is to be fused: no output yet, ``force``, or the
    journal of an interrupted run beside the output (:func:`capsfuse_lite.run.outputs.unfinished_journal`;
    a journal left by the run that wrote the output is deleted)."""
    from capsfuse_lite.run.outputs import unfinished_journal

    if cfg.force or not shard.output.exists():
        return None
    try:
        if unfinished_journal(shard.output):
            return None
        rows = finished_rows(shard, cfg, base)
    except Exception as exc:  # noqa: BLE001 - any failure costs this shard only
        return ShardOutcome.failure(shard.rel, exc)
    return ShardOutcome(shard.rel, "skipped", rows=rows)


def open_shard(cfg: DatasetConfig, shard: Shard, base: dict, model_meta: dict, progress: Progress, *,
               lock_wait: float = 0.0) -> FuseRun | ShardOutcome:
    """``shard``'s run, read through and validated with its journal open (:meth:`FuseRun.begin`), or
    its outcome when it needs no engine work: ``skipped`` (a complete output) or ``failed``. A full
    disk is raised (it stops the whole run)."""
    settled = finished_outcome(cfg, shard, base)
    if settled is not None:
        return settled
    run = None
    try:
        shard.output.parent.mkdir(parents=True, exist_ok=True)
        run = FuseRun(cfg.file_config(shard), progress=progress)
        run.label, run.lock_wait = shard.rel, lock_wait
        run.assume_model(Path(cfg.model), model_meta)
        run.prepare()
        run.begin(model_sha256=base["model_sha256"])
        return run
    except DiskSpaceError:
        raise
    except OSError as exc:
        return ShardOutcome(shard.rel, "failed", f"{shard.input}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - a user error or a bug: either costs this shard only
        if run is not None and run.journal is not None:
            run.journal.close(quiet=True)
        return ShardOutcome.failure(shard.rel, exc)


# -- one engine stream over many shards --------------------------------------------------------------


class ShardStream:
    """Feeds the pending rows of shard after shard into one ``Fuser.fuse(ordered=False)`` stream and
    routes each result to its shard (see the module docstring).

    ``next_run()`` gives the next shard's begun :class:`FuseRun`, or None when there is none (now):
    the stream then ends once the rows in the engine are done. ``get_fuser()`` is called when the
    first row needs the model. ``on_done(run, error)`` is called once per shard the stream took: after
    its output is published (``error`` None, ``run.summary.complete``), when it failed (``error``),
    or, for shards cut by a stop, at the end (neither). Any error while a shard is read, journaled or
    written (a user error, or a bug) fails that shard only; a full disk, or an error of the engine
    itself, ends the stream: every open journal is closed and the error raised.
    """

    def __init__(self, next_run: Callable[[], FuseRun | None], get_fuser: Callable[[], Any],
                 on_done: Callable[[FuseRun, BaseException | None], None]):
        self.next_run, self.get_fuser, self.on_done = next_run, get_fuser, on_done
        self.open: list[FuseRun] = []  # shards taken and not yet published or failed
        self.max_open = 0
        self.fuser = None
        self._stop = False
        self._where: dict[int, tuple[FuseRun, int]] = {}  # stream position -> (shard run, its own position)

    def request_stop(self) -> None:
        self._stop = True
        if self.fuser is not None:
            self.fuser.request_stop()

    def run(self) -> None:
        pairs = self._feed()
        try:
            self._stream(pairs)
        except BaseException:
            pairs.close()
            for run in self.open:
                run.journal.close(quiet=True)
            self.open.clear()
            raise
        pairs.close()
        for run in list(self.open):  # cut by a stop (or an engine that returned early)
            self.open.remove(run)
            try:
                run.journal.close()
            except CapsfuseError as exc:
                self.on_done(run, exc)
                continue
            self.on_done(run, None)

    def _stream(self, pairs: Iterator[tuple[str, str]]) -> None:
        first = next(pairs, None)  # shards needing no engine work are finished on the way
        if first is None or self._stop:
            return
        self.fuser = self.get_fuser()
        if self._stop:
            return
        for result in self.fuser.fuse(chain([first], pairs), ordered=False):
            run, position = self._where.pop(result.index)
            if run not in self.open:
                continue  # its shard failed meanwhile
            try:
                run.take(position, result)
            except DiskSpaceError:
                raise
            except Exception as exc:  # noqa: BLE001 - costs this shard only
                self._fail(run, exc)
                continue
            if run.settled:
                self._finish(run)

    def _feed(self) -> Iterator[tuple[str, str]]:
        position = 0
        while not self._stop:
            run = self.next_run()
            if run is None:
                return
            self.open.append(run)
            self.max_open = max(self.max_open, len(self.open))
            try:
                for own, pair in enumerate(run.pending()):
                    self._where[position] = (run, own)
                    position += 1
                    yield pair
            except DiskSpaceError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. the file changed since it was validated
                if run in self.open:
                    self._fail(run, exc)
                continue
            if run.settled and run in self.open:
                self._finish(run)

    def _finish(self, run: FuseRun) -> None:
        try:
            run.finish(self.fuser)
        except DiskSpaceError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a value the output format cannot hold: this shard only
            self._fail(run, exc)
            return
        self.open.remove(run)
        run.journal.close()
        self.on_done(run, None)

    def _fail(self, run: FuseRun, error: BaseException) -> None:
        self.open.remove(run)
        run.journal.close(quiet=True)
        self.on_done(run, error)


# -- the whole dataset on this machine ---------------------------------------------------------------


@dataclass
class DatasetSummary(RowCounts):
    """A dataset run: shard outcomes, and the row counts of the shards it wrote or began (interrupted),
    plus ``rows_complete``, the rows of the shards complete before it: the same figures the progress
    display counts (failed shards are in neither)."""

    output: Path | None = None
    rows_complete: int = 0  # rows of the shards already complete before this run (skipped)
    shards_total: int = 0
    shards_done: int = 0  # written by this run
    shards_skipped: int = 0  # complete before this run
    shards_left: int = 0  # not finished (the run was interrupted; their journals keep the rows done)
    failed: list = field(default_factory=list)  # (relative path, reason) per failed shard
    workers: int = 1

    @property
    def complete(self) -> bool:
        return self.shards_done + self.shards_skipped == self.shards_total

    @property
    def shard_counts(self) -> str:
        parts = [f"{self.shards_done} written", f"{self.shards_skipped} already complete"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.shards_left:
            parts.append(f"{self.shards_left} left for a rerun")
        workers = f" on {self.workers} workers" if self.workers > 1 else ""
        return f"{self.shards_total}{workers}: " + ", ".join(parts)

    @property
    def rows_done(self) -> int:
        return self.rows_complete + super().rows_done

    def add(self, outcome: ShardOutcome) -> None:
        if outcome.status in ("done", "interrupted"):
            if outcome.status == "done":
                self.shards_done += 1
            else:
                self.shards_left += 1
            for key, value in outcome.counts.items():
                if key == "skipped_reasons":
                    for reason, rows in value.items():
                        self.skipped_reasons[reason] = self.skipped_reasons.get(reason, 0) + rows
                else:
                    setattr(self, key, getattr(self, key) + value)
            self.model = self.model or outcome.model
            self.settings = self.settings or outcome.settings
        elif outcome.status == "skipped":
            self.shards_skipped += 1
            self.rows_total += outcome.rows
            self.rows_complete += outcome.rows
        elif outcome.status == "failed":
            self.failed.append((outcome.rel, outcome.error))


class RowTally:
    """The dataset's row total for the progress display: counted for the shards read so far (and the
    ``open_rows`` / ``open_bytes`` of shards being read elsewhere), estimated from bytes for the rest."""

    def __init__(self, shards: list[Shard]):
        self.unknown_bytes = sum(s.size for s in shards)
        self.known_rows = self.known_bytes = 0

    def learn(self, shard: Shard, rows: int) -> None:
        self.unknown_bytes -= shard.size
        self.known_rows += rows
        self.known_bytes += shard.size

    def forget(self, shard: Shard, rows: int | None = None) -> None:
        """A failed shard leaves the total (``rows``: what :meth:`learn` counted for it, if it did)."""
        if rows is None:
            self.unknown_bytes -= shard.size
        else:
            self.known_rows -= rows
            self.known_bytes -= shard.size

    def total(self, open_rows: int = 0, open_bytes: int = 0) -> tuple[int, bool]:
        """(total rows, whether it is an estimate)."""
        rows, known, unknown = self.known_rows + open_rows, self.known_bytes + open_bytes, self.unknown_bytes - open_bytes
        if unknown <= 0 or not known:
            return rows, unknown > 0
        return rows + round(unknown * rows / known), True


class DatasetRun:
    """A dataset on this machine: one engine, shards streamed through it (see the module docstring)."""

    lock_wait = 0.0  # seconds to wait for a journal held by another process
    verbose = False  # print the traceback of a shard that failed on an error that is not the user's

    def __init__(self, config: DatasetConfig, *, progress: Progress | None = None,
                 fuser_factory: Callable[..., Any] | None = None):
        self.config = config
        self.progress = progress or Progress()
        self.fuser_factory = fuser_factory or default_fuser_factory
        self.root: Path | None = None
        self.shards: list[Shard] | None = None
        self.model_meta: dict = {}
        self.base: dict = {}
        self.stream: ShardStream | None = None
        self._stop = False

    def prepare(self) -> list[Shard]:
        """Find the shards, create the output folder, and check what would fail every shard alike
        (a missing Parquet or zstd package, an unwritable output folder) before any model work."""
        cfg = self.config
        if cfg.output.exists() and not cfg.output.is_dir():
            raise ConfigError(f"{cfg.output} is a file; a dataset's output is a folder (-o OUTPUT_DIR)")
        if not cfg.output.exists() and split_compression(cfg.output.name)[0].suffix.lower() in _EXTENSIONS:
            raise ConfigError(f"-o {cfg.output}: a dataset (a folder, a glob or several files) is written to a folder, "
                              "one output file per input file; name a folder (or fuse one file at a time)")
        if cfg.shard and len(cfg.inputs) == 1 and Path(cfg.inputs[0]).is_file():
            raise ConfigError(f"--shard {cfg.shard[0]}/{cfg.shard[1]} of one file splits its rows and writes one part "
                              f"file, but -o {cfg.output} is a folder; name the part's file (e.g. -o "
                              f"{cfg.output / ('part' + str(cfg.shard[0]) + '-' + Path(cfg.inputs[0]).name)})")
        self.root, shards = find_shards(cfg.inputs, cfg.output, input_format=cfg.input_format,
                                        output_format=cfg.output_format)
        if cfg.shard:
            shards = shards[cfg.shard[0]::cfg.shard[1]]
        try:
            cfg.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output folder {cfg.output}: {exc.strerror or exc}") from None
        check_writable_folder(cfg.output / "probe")
        names = [s.input.name for s in shards] + [s.output.name for s in shards]
        if any(n.lower().endswith((".parquet", ".pq")) for n in names) or cfg.input_format == "parquet":
            import_pyarrow()
        if any(detect_compression(n) == "zstd" for n in names):
            import_zstandard()
        self.shards = shards
        return shards

    def check_model(self) -> dict:
        if self.config.model is None:
            raise ConfigError("no model: pass --model FILE.gguf")
        self.model_meta = check_model_file(Path(self.config.model), self.config.max_new_tokens)
        return self.model_meta

    def fingerprint(self) -> dict:
        """The settings every shard's journal and meta file must match (model hashed once)."""
        from capsfuse_lite.models import file_sha256

        if not self.base:
            meta = self.model_meta or self.check_model()
            self.base = settings_fingerprint(self.config, meta, file_sha256(Path(self.config.model)))
        return self.base

    def request_stop(self) -> None:
        self._stop = True
        if self.stream is not None:
            self.stream.request_stop()

    def mark_forced(self) -> None:
        """``force``: put a placeholder journal beside every existing output this run is to redo, before
        any is redone, so that if the run is cut, every rerun (the printed command has no ``--force``)
        redoes those outputs instead of counting them complete or refusing them
        (:func:`~capsfuse_lite.run.journal.mark_replacing`)."""
        if not self.config.force:
            return
        for shard in self.shards:  # (a journal without an output: an older run's, perhaps of other settings)
            if shard.output.exists() or journal_path(shard.output).exists():
                mark_replacing(journal_path(shard.output))

    def note_failure(self, rel: str, outcome: ShardOutcome) -> None:
        self.progress.note(f"shard {rel} failed: {outcome.error}")
        if self.verbose and outcome.trace:
            self.progress.note(outcome.trace)

    def execute(self) -> DatasetSummary:
        cfg = self.config
        if self.shards is None:
            self.prepare()
        t0 = time.monotonic()
        base = self.fingerprint()
        self.mark_forced()
        summary = self.summary = DatasetSummary(output=cfg.output, shards_total=len(self.shards))
        tally = RowTally(self.shards)
        progress = self.progress
        progress.shards_total = len(self.shards)  # before start(): a log line names the shard count
        progress.start(0, 0)
        shards = iter(self.shards)
        by_run: dict[int, Shard] = {}
        fuser = None

        def show() -> None:
            progress.set_total(*tally.total())
            progress.set_shards(summary.shards_done + summary.shards_skipped, summary.shards_total, len(summary.failed))

        def outcome(shard: Shard, result: ShardOutcome) -> None:
            summary.add(result)
            if result.status == "skipped":
                tally.learn(shard, result.rows)
                progress.done += result.rows
            elif result.status == "failed":
                tally.forget(shard)
                self.note_failure(shard.rel, result)
            show()

        def next_run() -> FuseRun | None:
            while not self._stop:
                shard = next(shards, None)
                if shard is None:
                    return None
                got = open_shard(cfg, shard, base, self.model_meta, progress, lock_wait=self.lock_wait)
                if isinstance(got, ShardOutcome):
                    outcome(shard, got)
                    continue
                by_run[id(got)] = shard
                tally.learn(shard, got.layout.rows)
                progress.done += got.summary.rows_resumed
                show()
                return got
            return None

        def get_fuser():
            nonlocal fuser
            progress.note(f"loading {cfg.model} ...")
            fuser = self.fuser_factory(Path(cfg.model), **fuser_kwargs(cfg, base))
            progress.watch(getattr(fuser, "live", None))
            if getattr(fuser, "model_note", None):
                progress.note(fuser.model_note)
            reason = getattr(fuser, "slots_reason", None)
            if reason:
                progress.note(reason)
            return fuser

        def on_done(run: FuseRun, error: BaseException | None) -> None:
            shard = by_run.pop(id(run))
            if error is not None:  # a failed shard leaves the counts (as it leaves the summary's)
                tally.forget(shard, run.layout.rows)
                progress.done -= run.summary.rows_resumed + run.rows_counted
                progress.rows -= run.rows_counted
                progress.tokens -= run.summary.generated_tokens
            outcome(shard, ShardOutcome.of(run, error))

        self.stream = ShardStream(next_run, get_fuser, on_done)
        t_fuse = time.monotonic()
        try:
            self.stream.run()
        finally:
            summary.fuse_s = time.monotonic() - t_fuse
            if fuser is not None:
                summary.settings = {**summary.settings, **dict(getattr(fuser, "settings", None) or {})}
                fuser.close()
            progress.close()
        summary.shards_left += sum(1 for _ in shards)  # never reached: the run was stopped
        summary.wall_s = time.monotonic() - t0
        return summary
