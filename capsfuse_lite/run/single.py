"""A fuse run over a caption file: records + engine + journal, as a plain Python API.

    run = FuseRun(FuseConfig(input="in.parquet", output="out.parquet", model="m.gguf"))
    run.prepare()          # validation pass: malformed input fails here, before any model work
    summary = run.execute()  # journaled, resumable, deduplicated; writes OUTPUT + OUTPUT.meta.json

Row selection: ``limit`` keeps input rows ``0 .. limit-1``; ``shard=(I, N)`` keeps the rows
``i`` of those with ``i % N == I`` (:mod:`capsfuse_lite.run.merge` interleaves the parts back).

Rows are never a reason to stop: a row whose caption fields are missing, null, non-strings, empty
or not valid Unicode text (a lone surrogate, which JSON allows), or whose captions the tokenizer
refuses, is passed through with ``status: skipped`` and the reason in ``error``. Identical (raw,
synthetic) pairs, after stripping, go to the engine once; resumed runs reuse journaled results for
them too. The journal keys every row by its caption pair, so a resumed row counts as done only if
its captions are unchanged. The engine completes rows out of order; the journal records each with
its input index and the output is assembled in input order by streaming the input again, to
``OUTPUT.partial`` renamed onto OUTPUT at the end.

An OUTPUT that is already complete for the config (see :mod:`capsfuse_lite.run.outputs`) is left alone:
``prepare()`` sets ``already_done`` to the line saying so and ``execute()`` returns at once, without
touching the model.

Files are the user's: the model's header is checked (a LLaMA GGUF, complete, settings within its
trained context) before the model is hashed or the journal touched; the journal is locked before
it is read or discarded; a failed write (disk full, read-only or vanished folder) is one line naming
the file, with the journal kept for the resume.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from capsfuse_lite.errors import ConfigError, OutputExistsError
from capsfuse_lite.files import write_json_atomic
from capsfuse_lite.formats import Layout, RecordReader, detect_compression, detect_format, import_zstandard, open_reader
from capsfuse_lite.run.config import FuseConfig, check_writable_folder, fuser_kwargs, settings_fingerprint
from capsfuse_lite.run.journal import Journal, journal_path
from capsfuse_lite.run.outputs import meta_path
from capsfuse_lite.run.progress import Progress
from capsfuse_lite.run.publish import assemble, output_meta, publish
from capsfuse_lite.run.rows import RESERVED_COLUMNS, RunSummary, caption_pair, journal_entry, pair_key


def check_model_file(path: Path, max_new_tokens: int | None) -> dict:
    """Check a model from its header alone, before it is hashed or loaded: a complete LLaMA GGUF whose
    trained context holds the prompt budget plus ``max_new_tokens`` (None: the GGUF's default).
    Returns its :func:`~capsfuse_lite.models.gguf_defaults`."""
    from capsfuse_lite.models import check_gguf, gguf_defaults

    check_gguf(path)
    meta = gguf_defaults(path)
    max_new = max_new_tokens if max_new_tokens is not None else meta["max_new_tokens"]
    trained = meta["context_length"]
    if trained and meta["max_input_tokens"] + max_new > trained:
        raise ConfigError(
            f"max_new_tokens={max_new}: a {meta['max_input_tokens']}-token prompt plus {max_new} new tokens "
            f"exceeds the {trained} positions {path.name} was trained for; use at most "
            f"{max(trained - meta['max_input_tokens'], 0)} (--max-new-tokens)")
    return meta


def default_fuser_factory(model_path: Path, **kwargs):
    from capsfuse_lite.engine.fuser import Fuser

    return Fuser(model_path, **kwargs)


class FuseRun:
    """One run; see the module docstring. ``request_stop()`` may be called from a signal handler."""

    def __init__(self, config: FuseConfig, *, progress: Progress | None = None,
                 fuser_factory: Callable[..., Any] | None = None):
        self.config = config
        self.progress = progress or Progress()
        self.fuser_factory = fuser_factory or default_fuser_factory
        self.fuser = None
        self.layout: Layout | None = None
        self._reader: RecordReader | None = None
        self._stop = False
        self._inflight: dict[bytes, list[int]] = {}
        self._by_position: dict[int, bytes] = {}
        self._exhausted = False
        self.model_meta: dict = {}
        self._checked_model: Path | None = None
        self.input_bytes = 0
        self.already_done: str | None = None  # see prepare()
        self._replaces_output = False  # continuing an interrupted run (its journal) over an existing OUTPUT
        self.label = ""  # in a dataset: the shard's relative path, put before each note
        self.lock_wait = 0.0  # seconds to wait for a journal another process holds (see Journal.open)
        self.journal: Journal | None = None
        self.summary: RunSummary | None = None
        self.rows_counted = 0  # rows this run added to the progress (resumed rows not included)
        self._fingerprint: dict = {}
        self._t0 = time.monotonic()

    # -- phase 1: everything that can fail before model work --------------------------------

    def prepare(self) -> Layout | None:
        """Check input, output and options; returns the input's layout, or None when OUTPUT is already
        complete for this config (``already_done`` then holds the line saying so; see
        :func:`capsfuse_lite.run.outputs.finished_output`; ``config.model`` is the model asked for, None
        for the default). A missing output folder is created last, once the input has passed."""
        from capsfuse_lite.run.outputs import finished_output, unfinished_journal
        from capsfuse_lite.files import make_output_folder

        cfg = self.config
        self.output_format = detect_format(cfg.output, cfg.output_format, role="output")
        self._reader = open_reader(cfg.input, cfg.input_format, csv_delimiter=cfg.csv_delimiter)
        if cfg.output.resolve() == cfg.input.resolve():
            raise ConfigError(f"{cfg.output}: the output must not be the input file")
        if cfg.output.exists() and not cfg.force:
            if unfinished_journal(cfg.output):
                self._replaces_output = True  # continuing the interrupted run replaces OUTPUT
            else:
                self.already_done = finished_output(cfg, output_format=self.output_format,
                                                    input_format=self._reader.format)
                return None
        check_writable_folder(cfg.output)
        if self.output_format == "parquet":
            from capsfuse_lite.formats import import_pyarrow

            import_pyarrow()
        if detect_compression(cfg.output) == "zstd":
            import_zstandard()
        self.layout = self._reader.scan(required=(cfg.raw_field, cfg.synthetic_field))
        self.input_bytes = cfg.input.stat().st_size
        make_output_folder(cfg.output)
        return self.layout

    def check_model(self) -> dict:
        """Check ``config.model`` from its header alone, before it is hashed or loaded and before the
        journal is touched (see :func:`check_model_file`). Returns its
        :func:`~capsfuse_lite.models.gguf_defaults`."""
        cfg = self.config
        if cfg.model is None:
            raise ConfigError("no model: pass --model FILE.gguf")
        path = Path(cfg.model)
        if self._checked_model == path:
            return self.model_meta
        self.model_meta, self._checked_model = check_model_file(path, cfg.max_new_tokens), path
        return self.model_meta

    def assume_model(self, path: Path, meta: dict) -> None:
        """Take ``meta`` as :meth:`check_model`'s result for ``path`` (a dataset checks its model once)."""
        self.model_meta, self._checked_model = meta, Path(path)

    @property
    def selected(self) -> range:
        """Input row indexes in this run (limit and shard applied)."""
        cfg = self.config
        stop = self.layout.rows if cfg.limit is None else min(cfg.limit, self.layout.rows)
        first, step = cfg.shard or (0, 1)
        return range(first, stop, step)

    def fingerprint(self, model_path: Path, model_sha256: str | None = None) -> dict:
        """What must match for a journal to be resumed: model, decoding, fields. Row content is checked
        row by row (each journaled row carries its caption-pair key), so an input that gained, lost or
        changed rows since resumes the rows still the same and fuses the others.
        ``model_sha256``: the model's hash when the caller already has it (a dataset hashes it once)."""
        from capsfuse_lite.models import file_sha256

        meta = self.check_model()
        return settings_fingerprint(self.config, meta, model_sha256 or file_sha256(model_path))

    # -- phase 2: model work -----------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current decode step; the journal keeps every finished row."""
        self._stop = True
        if self.fuser is not None:
            self.fuser.request_stop()

    def execute(self) -> RunSummary:
        if self.layout is None and self.already_done is None:
            self.prepare()
        if self.already_done is not None:  # nothing to do: the model is not even looked at
            meta = json.loads(meta_path(self.config.output).read_text(encoding="utf-8"))
            rows = int((meta.get("output") or {}).get("rows") or 0)
            return RunSummary(output=self.config.output, complete=True, rows_total=rows, rows_resumed=rows,
                              already_done=self.already_done)
        summary = self.begin()
        with self.journal:
            t_fuse = time.monotonic()
            try:
                self._fuse_pending()
            finally:
                summary.fuse_s = time.monotonic() - t_fuse
                if self.fuser is not None:
                    self._collect_engine_info(summary, self.fuser)
                    self.fuser.close()
                    self.fuser = None
                self.progress.close()
            if self.settled:
                self.finish()
            else:
                self.journal.sync()
        summary.wall_s = time.monotonic() - self._t0
        return summary

    # The pieces of execute(), also used one shard at a time by capsfuse_lite.run.dataset, where one
    # engine stream serves many runs: begin() -> pending() / take() -> settled -> finish().

    def begin(self, model_sha256: str | None = None) -> RunSummary:
        """Open the journal (locked, loaded) and count what it already holds; ``self.summary``.
        The caller closes ``self.journal`` (``with run.journal:``), also after :meth:`finish`."""
        cfg = self.config
        if self.layout is None:
            self.prepare()
        if self.already_done is not None:
            raise OutputExistsError(f"{cfg.output} is already complete: nothing to begin")
        self._t0 = time.monotonic()
        self.check_model()
        model_path = Path(cfg.model)
        jpath = journal_path(cfg.output)
        if cfg.resume and not jpath.exists():
            self._note(f"no journal at {jpath}: starting from the first row")
        replaced = [c for c in (cfg.output_field, *RESERVED_COLUMNS) if c in self.layout.columns]
        if replaced:
            self._note(f"note: input column(s) {', '.join(map(repr, replaced))} are replaced in the output "
                       "(--output-field names the fused caption's column)")
        fingerprint = self._fingerprint = self.fingerprint(model_path, model_sha256)
        summary = self.summary = RunSummary(output=cfg.output, complete=False)
        selected = self.selected
        journal = self.journal = Journal.open(jpath, fingerprint, self.layout.rows, discard=cfg.force,
                                              lock_wait=self.lock_wait)
        try:
            if cfg.output.exists() and not cfg.force and not self._replaces_output:
                # another run finished it since prepare()
                raise OutputExistsError(f"{cfg.output} exists; pass --force to overwrite it (or choose another -o)")
            if journal.restarted:
                self._note(f"journal {jpath} held no rows; starting it over with the new settings "
                           f"({'; '.join(journal.restarted)})")
            summary.rows_total = len(selected)
            summary.rows_resumed = sum(1 for i in selected if journal.is_done(i))  # less rows whose captions changed
            if journal.torn_bytes or journal.dropped_lines:
                self._note(f"journal {jpath}: dropped a torn tail ({journal.torn_bytes} bytes) "
                           f"and {journal.dropped_lines} unreadable line(s); those rows are redone")
            summary.model = {"path": str(model_path.resolve()), "file": model_path.name, "size": model_path.stat().st_size,
                             "sha256": fingerprint["model_sha256"], "quant": self.model_meta.get("quant")}
            summary.settings = {"beams": fingerprint["beams"], "max_new_tokens": fingerprint["max_new_tokens"],
                                "length_offset": fingerprint["length_offset"], "slots": cfg.slots}
        except BaseException:
            journal.close(quiet=True)
            raise
        return summary

    def pending(self) -> Iterator[tuple[str, str]]:
        """Caption pairs for the engine, in input order (see :meth:`_pending`); the ``k``-th pair
        yielded is position ``k`` for :meth:`take`."""
        return self._pending(self.journal, self.summary)

    def take(self, position: int, result: Any) -> None:
        """Journal the engine's ``result`` for the ``position``-th pair of :meth:`pending` (and for
        the identical rows that waited for it)."""
        key = self._by_position.pop(position)
        rows = self._inflight.pop(key)
        entry = journal_entry(result)
        for i in rows:
            self.journal.record(i, key, entry)
        self.journal.flush()
        self._count(self.summary, entry, len(rows))
        self._advance(len(rows), entry["generated_tokens"])

    @property
    def settled(self) -> bool:
        """Every selected row is journaled (the pairs ran out and none is in the engine)."""
        return self._exhausted and not self._inflight

    def finish(self, fuser: Any = None) -> RunSummary:
        """Write OUTPUT from the journal (once :attr:`settled`), then its meta file; publish it and
        delete the journal. ``fuser``: the engine that fused the rows, for the meta file."""
        cfg, summary, journal = self.config, self.summary, self.journal
        if fuser is not None:
            self._collect_engine_info(summary, fuser)
        if not summary.fuse_s:
            summary.fuse_s = time.monotonic() - self._t0
        summary.complete = True
        journal.sync()  # durable before the output is built from it (and still in its place)
        if not self.label:
            self._note(f"writing {cfg.output} ...")
        self._assemble(journal, summary)
        summary.wall_s = time.monotonic() - self._t0
        meta = self._meta(summary, self._fingerprint)
        # OUTPUT first, then its meta file (which names this journal's run), then the journal: cut
        # anywhere in between, the journal is still beside OUTPUT and no meta file describes the new
        # OUTPUT, so a rerun continues the run (see capsfuse_lite.run.outputs.unfinished_journal).
        self._publish()
        write_json_atomic(meta_path(cfg.output), meta)
        journal.remove()
        return summary

    def _note(self, text: str) -> None:
        self.progress.note(f"{self.label}: {text}" if self.label else text)

    def _advance(self, rows: int, tokens: int = 0) -> None:
        self.rows_counted += rows
        self.progress.advance(rows, tokens)

    def _fuse_pending(self) -> None:
        cfg, summary = self.config, self.summary
        self.progress.start(summary.rows_total, summary.rows_resumed)
        pending = self.pending()
        first = next(pending, None)  # the model loads only if some row still needs it
        if first is None or self._stop:
            return
        self._note(f"loading {cfg.model} ...")
        self.fuser = self.fuser_factory(Path(cfg.model), **fuser_kwargs(cfg, self._fingerprint))
        self.progress.watch(getattr(self.fuser, "live", None))
        if getattr(self.fuser, "model_note", None):
            self._note(self.fuser.model_note)
        reason = getattr(self.fuser, "slots_reason", None)
        if reason:
            self._note(reason)
        if self._stop:  # Ctrl-C while the model loaded
            return
        for result in self.fuser.fuse(itertools.chain([first], pending), ordered=False):
            self.take(result.index, result)

    @staticmethod
    def _count(summary: RunSummary, entry: dict, rows: int) -> None:
        if entry.get("error"):
            summary.skip(entry["error"], rows)
            return
        summary.rows_fused += 1
        summary.rows_reused += rows - 1
        summary.prompt_tokens += entry["prompt_tokens"]
        summary.generated_tokens += entry["generated_tokens"]
        summary.truncated_prompts += bool(entry["truncated"])
        summary.length_cut += entry["finish_reason"] == "length"

    def _pending(self, journal: Journal, summary: RunSummary) -> Iterator[tuple[str, str]]:
        """Caption pairs for the engine, in input order: rows not done, not skipped, not duplicates.

        A row counts as done only if the journal holds it under its current caption-pair key; a row
        whose captions changed since it was journaled is fused again (its count moves from resumed
        back to pending)."""
        cfg = self.config
        selected = self.selected
        position = 0
        for i, row in self._reader.rows(columns=(cfg.raw_field, cfg.synthetic_field)):
            if self._stop:
                return
            if i >= selected.stop:
                break
            if i % selected.step != selected.start:
                continue
            raw, synthetic, reason = caption_pair(row, cfg.raw_field, cfg.synthetic_field)
            key = pair_key(raw, synthetic) if reason is None else None
            if journal.is_done(i):
                if key is not None and journal.done_key(i) == key:
                    continue
                summary.rows_resumed -= 1  # journaled for other captions: not done after all
                self.progress.done -= 1
                self.rows_counted -= 1
            if reason is not None:
                summary.skip(reason)
                self._advance(1)
                continue
            waiting = self._inflight.get(key)
            if waiting is not None:
                waiting.append(i)
                continue
            known = journal.lookup(key)
            if known is not None:
                entry = {k: v for k, v in known.items() if k not in ("i", "h")}
                journal.record(i, key, entry)
                if entry.get("error"):
                    summary.skip(entry["error"])
                else:
                    summary.rows_reused += 1
                self._advance(1)
                continue
            self._inflight[key] = [i]
            self._by_position[position] = key
            position += 1
            yield raw, synthetic
        if not self._stop:
            self._exhausted = True

    @staticmethod
    def _collect_engine_info(summary: RunSummary, fuser: Any) -> None:
        info = dict(getattr(fuser, "model_info", None) or {})
        settings = dict(getattr(fuser, "settings", None) or {})
        summary.model.update({k: v for k, v in info.items() if k not in summary.model or summary.model[k] is None})
        summary.settings.update(settings)


    # -- phase 3: the output (capsfuse_lite.run.publish) -------------------------------------

    def _assemble(self, journal: Journal, summary: RunSummary) -> None:
        assemble(self, journal, summary)

    def _publish(self) -> None:
        publish(self.config)

    def _meta(self, summary: RunSummary, fingerprint: dict) -> dict:
        return output_meta(self, summary, fingerprint)


def run_fuse(config: FuseConfig, *, progress: Progress | None = None,
             fuser_factory: Callable[..., Any] | None = None) -> RunSummary:
    """Validate, fuse and write in one call (``config.model`` must be a GGUF path)."""
    run = FuseRun(config, progress=progress, fuser_factory=fuser_factory)
    run.prepare()
    return run.execute()
