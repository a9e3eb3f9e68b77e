"""Progress reporting and the end-of-run summary, kept apart from the scheduler and the IO.

The runner calls a :class:`Progress` object: ``start(total, done)`` once, ``advance(rows,
tokens)`` as rows finish, ``note(text)`` for one-off messages, ``close()`` at the end. A dataset
run also calls ``set_total(total, estimated)`` as it learns the row counts of its shards (until
every shard was read, the total is estimated from their sizes), ``set_shards(done, total, failed)``
and, on Ray, ``update(done, rows, tokens)`` with the figures polled from its workers.
:class:`RichProgress` draws a bar on a terminal (rows done/total, rows/s, generated tokens/s,
ETA, elapsed time); :class:`LogProgress` writes a plain line every ``interval`` seconds (no
terminal, or ``--quiet``). :func:`print_summary` renders a finished (or interrupted) run as a
table. Notes and the summary carry paths and user data, so they are printed as plain text (never
as rich markup).
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import IO, Any


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress sink that shows nothing; the base of the others."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.rows = 0  # rows finished by this process (rates exclude resumed rows)
        self.tokens = 0
        self.t0 = time.monotonic()
        self.estimated = False  # the total is an estimate (a dataset whose shards were not all read yet)
        self.shards_total = self.shards_done = self.shards_failed = 0  # dataset runs only
        self.live = None  # () -> (rows in flight, tokens generated) of the engine, once it runs (watch)
        self._live_t0 = self.t0

    def start(self, total: int, done: int = 0, description: str = "fusing") -> None:
        self.total, self.done, self.description = total, done, description
        self.t0 = time.monotonic()

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.done += rows
        self.rows += rows
        self.tokens += tokens
        self._refresh()

    def set_total(self, total: int, estimated: bool = False) -> None:
        self.total, self.estimated = total, estimated
        self._refresh()

    def set_shards(self, done: int, total: int, failed: int = 0) -> None:
        self.shards_done, self.shards_total, self.shards_failed = done, total, failed
        self._refresh()

    def update(self, done: int, rows: int, tokens: int) -> None:
        """Absolute figures (rows done in all, rows and tokens finished by this run)."""
        self.done, self.rows, self.tokens = done, rows, tokens
        self._refresh()

    def shards_text(self) -> str:
        """``"shards 3/8 (1 failed)"``, or "" outside dataset runs."""
        if not self.shards_total:
            return ""
        failed = f" ({self.shards_failed} failed)" if self.shards_failed else ""
        return f"shards {self.shards_done}/{self.shards_total}{failed}"

    def watch(self, live) -> None:
        """Follow the engine's live figures (:meth:`capsfuse_lite.engine.fuser.Fuser.live`): until a row
        finishes, the display shows rows in flight and generated tokens/s from them instead of
        ``0.00 rows/s`` (rows of a 3-beam 13B model take tens of seconds)."""
        self.live, self._live_t0 = live, time.monotonic()
        self._refresh()

    def rates_text(self) -> str:
        """The rates a display shows: rows/s of finished rows (while none has finished: the rows in
        flight) and generated tokens/s. Once the engine runs, tokens/s counts every generated token
        since it started, rows in flight included (finished rows' tokens alone made it drop from 7
        to 1 tok/s when the first 3-beam row of a 6-row run finished)."""
        return " ".join(self.rates())  # as short before the first row as after: not cut on 80 columns

    def rates(self) -> tuple[str, str]:
        """``(rows part, tokens part)`` of :meth:`rates_text`, e.g. ``("16 in flight", "32 tok/s")``."""
        live = None
        if self.live is not None:
            try:
                live = self.live()
            except Exception:  # noqa: BLE001 - a display must never stop the run
                live = None
        if live is None:
            return f"{self.rows_per_s:.2f} rows/s", f"{self.tokens_per_s:.0f} tok/s"
        in_flight, tokens = live
        rate = tokens / max(time.monotonic() - self._live_t0, 1e-9)
        rows = f"{in_flight} in flight" if self.rows == 0 else f"{self.rows_per_s:.2f} rows/s"
        return rows, f"{rate:.0f} tok/s"

    def note(self, text: str) -> None:
        """A one-off message (model loading, warnings)."""

    def close(self) -> None:
        """Stop drawing (the summary is printed separately)."""

    def _refresh(self) -> None:
        pass

    # rates over this process's run
    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-9)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        rate = self.rows_per_s
        return left / rate if rate > 0 else None


class LogProgress(Progress):
    """Plain log lines every ``interval`` seconds, for logs and ``--quiet``: also while no row finishes
    (a clock thread; a 3-beam 13B row takes minutes on a CPU), with the engine's live figures (rows in
    flight, tok/s) until the first row is done."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 30.0) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._clock: threading.Thread | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, total, done=0, description="fusing"):
        super().start(total, done, description)
        self._last = time.monotonic()
        resumed = f" ({done} already done)" if done else ""
        if self.shards_total:
            self._print(f"{description}: {self.shards_total} shards")
        else:
            self._print(f"{description}: {total} rows{resumed}")
        if self.interval > 0 and self._clock is None:
            self._closed.clear()
            self._clock = threading.Thread(target=LogProgress._tick, args=(weakref.ref(self), self._closed),
                                           name="capsfuse-progress", daemon=True)
            self._clock.start()

    @staticmethod
    def _tick(ref: "weakref.ref[LogProgress]", closed: threading.Event) -> None:
        """The clock: a line every interval until closed, the display is dropped, or its stream is gone
        (a run that ended without closing it must not print forever)."""
        while True:
            progress = ref()
            if progress is None:
                return
            wait = progress.interval / 4
            del progress
            if closed.wait(wait):
                return
            progress = ref()
            if progress is None:
                return
            try:
                progress._refresh()
            except (OSError, ValueError):  # the stream was closed under it
                return
            finally:
                del progress

    def _refresh(self):
        with self._lock:
            now = time.monotonic()
            if now - self._last >= self.interval and not self._closed.is_set():
                self._last = now
                self._print(self.line())

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        shards = self.shards_text()
        rows, tokens = self.rates()
        return (f"{self.description}: {self.done}/{'~' if self.estimated else ''}{self.total} rows ({pct:.1f}%), "
                + (f"{shards}, " if shards else "")
                + f"{rows}, {tokens}, ETA {format_duration(self.eta_s)}, "
                + f"elapsed {format_duration(self.elapsed)}")

    def note(self, text):
        self._print(text)

    def close(self):
        self._closed.set()
        clock, self._clock = self._clock, None
        if clock is not None and clock is not threading.current_thread():
            clock.join(timeout=1.0)
        if self.rows:
            self._print(self.line())


class RichProgress(Progress):
    """A rich progress bar on the terminal (stderr)."""

    def __init__(self, console: Any = None) -> None:
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self._bar = None
        self._task = None

    def start(self, total, done=0, description="fusing"):
        super().start(total, done, description)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        progress = self

        class RatesColumn(ProgressColumn):  # drawn at every refresh (10/s), also during a decode
            def __init__(self):
                from rich.table import Column

                super().__init__(table_column=Column(no_wrap=True))  # a narrow terminal shortens the bar, not this

            def render(self, task):
                return Text(progress.rates_text())

        self._bar = Bar(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[shards]}"),
            RatesColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=done, eta="?",
                                        shards=self.shards_text())

    def _refresh(self):
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total, shards=self.shards_text(),
                             eta=format_duration(self.eta_s))

    def note(self, text):
        self.console.print(text, highlight=False, markup=False)

    def close(self):
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
            self._bar = None


def make_progress(quiet: bool = False, stream: IO[str] | None = None, interval: float = 30.0) -> Progress:
    """A bar when ``stream`` (default stderr) is a terminal and not ``quiet``, else log lines."""
    stream = stream or sys.stderr
    if not quiet and stream.isatty():
        return RichProgress()
    return LogProgress(stream, interval=interval)


def summary_rows(summary: Any) -> list[tuple[str, str]]:
    """(label, value) pairs describing a run summary (``runner.RunSummary``, or a dataset's
    ``dataset.DatasetSummary``): the counts the progress display showed and the meta file records
    (see ``runner.RowCounts``). Truncated prompts and rows cut at the token limit are of the whole
    output when the run completed, of this process's rows when interrupted."""
    s = summary
    shards = getattr(s, "shard_counts", None)  # a dataset run (capsfuse_lite.run.dataset.DatasetSummary)
    earlier = f", {s.rows_complete} in shards already complete" if shards else ""
    sources = f"in this run, {s.rows_resumed} from {'journals' if shards else 'the journal'}{earlier}"
    scope = "" if s.complete else " of the rows done in this run"
    if s.complete:
        output, counted = str(s.output), f"{s.rows_total}: {s.rows_this_run} done {sources}"
    else:
        sources = f"{s.rows_this_run} {sources}"
        output = str(s.output) if shards else f"{s.output} (not written yet: the run was interrupted)"
        counted = f"{s.rows_done} of {s.rows_total} done ({sources}); {s.rows_total - s.rows_done} left"
        if shards:
            counted += " in the shards begun"
    rows = [
        ("output", output),
        ("rows", counted),
        ("done in this run", f"{s.rows_fused} fused by the model, {s.rows_reused} copied from an identical caption "
                             f"pair, {s.rows_skipped} skipped"),
        ("skipped", skipped_text(s, shards)),
        ("truncated prompts", f"{s.truncated_prompts}{scope}"),
        ("cut at token limit", f"{s.length_cut}{scope}"),
    ]
    rows += [
        ("wall time", format_duration(s.wall_s)),
        ("throughput", f"{s.rows_per_s:.2f} rows/s, {s.generated_tokens_per_s:.1f} generated tok/s"),
    ]
    if shards:
        rows.insert(1, ("shards", shards))
    model = s.model or {}
    if model:
        rows.append(("model", f"{model.get('file')} ({model.get('quant') or '?'}, sha256 {str(model.get('sha256'))[:12]}…)"))
    st = s.settings or {}
    if st:
        keys = ("beams", "max_new_tokens", "slots", "n_ctx", "n_gpu_layers", "length_offset")
        rows.append(("decoding", ", ".join(f"{k}={st[k]}" for k in keys if st.get(k) is not None)))
    return rows


def skipped_text(s: Any, dataset: Any = None) -> str:
    """Skipped rows by reason, pointing to the ``error`` column: ``3 (field 'laion_2b' is null: 2; the
    tokenizer refused a caption: 1); each one's error column says why``."""
    reasons = s.skipped_reasons or {}
    total = sum(reasons.values())
    where = ("in the shards written or begun by this run" if dataset else
             "in the output" if s.complete else "by this run")
    if not total:
        return f"0 {where}"
    parts = "; ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} {where} ({parts}); each skipped row's error column says why"


def print_summary(summary: Any, console: Any = None) -> None:
    """Print the summary table (to stderr unless a console is given), every cell as plain text."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=True, highlight=False)
    title = "capsfuse-lite fuse" + ("" if summary.complete else " (incomplete)" if getattr(summary, "shard_counts", None)
                                    else " (interrupted)")
    table = Table(title=Text(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(summary):
        table.add_row(Text(label), Text(value))
    console.print(table)
