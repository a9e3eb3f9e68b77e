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

import datetime as _dt
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from capsfuse_lite import __version__, defaults
from capsfuse_lite.errors import ConfigError, InputFileError, OutputExistsError, write_error
from capsfuse_lite.files import remove_quietly, replace_atomically, unencodable_at, writable, write_json_atomic
from capsfuse_lite.run.journal import RESUME_HINT, Journal, journal_path
from capsfuse_lite.run.outputs import meta_path, partial_path
from capsfuse_lite.run.progress import Progress
from capsfuse_lite.formats import (Layout, RecordReader, detect_compression, detect_format, import_zstandard, open_reader, open_writer,
                      parse_csv_delimiter)

FINISH_COLUMN = "finish_reason"
STATUS_COLUMN = "status"
ERROR_COLUMN = "error"
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
RESERVED_COLUMNS = (FINISH_COLUMN, STATUS_COLUMN, ERROR_COLUMN)  # written by every run: not for --output-field


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shard I of N, counting from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N (shards are numbered 0 .. N-1)")
    return i, n


def parse_slots(text: str | int | None) -> int | str:
    """``--slots``: ``auto`` or a positive integer."""
    if text is None or text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--slots {text!r}: give a number of rows decoded at once, e.g. --slots 32, or auto") from None
    if value < 1:
        raise ConfigError(f"--slots must be at least 1, got {value}")
    return value


def caption_pair(row: dict, raw_field: str, synthetic_field: str) -> tuple[str, str, str | None]:
    """``(raw, synthetic, None)`` for a usable row, else ``("", "", reason)``."""
    values = []
    for name in (raw_field, synthetic_field):
        if name not in row:
            return "", "", f"missing field {name!r}"
        value = row[name]
        if value is None:
            return "", "", f"field {name!r} is null"
        if not isinstance(value, str):
            return "", "", f"field {name!r} is not a string ({type(value).__name__})"
        if not value.strip():
            return "", "", f"field {name!r} is empty"
        bad = unencodable_at(value)
        if bad is not None:
            return "", "", (f"field {name!r} is not valid Unicode text (a lone surrogate U+{ord(value[bad]):04X} "
                            f"at character {bad})")
        values.append(value)
    return values[0], values[1], None


def pair_key(raw: str, synthetic: str) -> bytes:
    """Dedupe and resume key of a caption pair: the engine sees both captions stripped. Defined for
    any text (lone surrogates included), so computing it can never stop a run."""
    text = f"{raw.strip()}\x00{synthetic.strip()}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def result_columns(output_field: str, entry: dict | None, reason: str | None) -> dict:
    """The columns a run adds to a row: from its journal ``entry``, or skipped with ``reason``."""
    if reason is None and entry is not None and entry.get("error"):
        reason = entry["error"]  # the engine could not fuse it (e.g. the tokenizer refused a caption)
    if reason is not None:
        return {output_field: None, FINISH_COLUMN: None, STATUS_COLUMN: STATUS_SKIPPED, ERROR_COLUMN: reason}
    return {output_field: entry["text"], FINISH_COLUMN: entry["finish_reason"], STATUS_COLUMN: STATUS_OK,
            ERROR_COLUMN: None}


def journal_entry(result: Any) -> dict:
    """What the journal keeps of an engine result (``FuseResult``)."""
    error = getattr(result, "error", None)
    if error:
        return {"text": None, "finish_reason": None, "error": str(error), "prompt_tokens": 0,
                "generated_tokens": 0, "truncated": False}
    return {"text": result.text, "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "generated_tokens": len(result.token_ids), "truncated": bool(result.truncated)}


def check_writable_folder(output: Path) -> None:
    """Fail now, with one line, if ``output`` cannot be created (read-only folder, no permission),
    instead of after the model work; a missing folder is fine (see :mod:`capsfuse_lite.run.outputs`)."""
    from capsfuse_lite.files import check_output_folder

    check_output_folder(output)


@dataclass
class FuseConfig:
    input: str | Path
    output: str | Path
    model: str | Path | None = None  # a GGUF path (see models.resolve_model)
    input_format: str | None = None
    output_format: str | None = None
    csv_delimiter: str | None = None  # CSV input, and CSV output (default: the CSV input's, else ",")
    raw_field: str = defaults.RAW_FIELD
    synthetic_field: str = defaults.SYNTHETIC_FIELD
    output_field: str = defaults.OUTPUT_FIELD
    slots: int | str = "auto"  # rows decoded at once, or "auto" (see capsfuse_lite.engine.plan)
    beams: int | None = None
    max_new_tokens: int | None = None
    n_gpu_layers: int | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    kv_type: str | None = None  # the engine's KV cache element type (f16 by default)
    chat_template: str = "none"  # "auto": the prompt inside the GGUF's own chat template (defaults.CHAT_TEMPLATES)
    limit: int | None = None
    shard: tuple[int, int] | None = None
    resume: bool = False
    force: bool = False
    command: str | None = None  # the command line, recorded in the meta file

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        if self.kv_type is not None:
            from capsfuse_lite.engine.plan import KV_TYPE_BYTES

            if self.kv_type not in KV_TYPE_BYTES:
                raise ConfigError(f"--kv-type {self.kv_type}: use one of {', '.join(KV_TYPE_BYTES)}")
        self.slots = parse_slots(self.slots)
        if self.chat_template not in defaults.CHAT_TEMPLATES:
            raise ConfigError(f"--chat-template {self.chat_template}: use none (the prompt as it is; CapsFus-LLaMA's) "
                              "or auto (the GGUF's own chat template around it)")
        flags = {"beams": "--beams", "max_new_tokens": "--max-new-tokens", "n_ctx": "--ctx",
                 "n_threads": "--threads"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be 0 or more, got {self.limit}")
        if self.resume and self.force:
            raise ConfigError("--resume and --force contradict each other (--force discards the journal and starts over)")
        if self.csv_delimiter is not None:
            self.csv_delimiter = parse_csv_delimiter(self.csv_delimiter)
        if len({self.raw_field, self.synthetic_field}) < 2:
            raise ConfigError("--raw-field and --synthetic-field name the same column")
        if not self.output_field:
            raise ConfigError("--output-field must name a column")
        if self.output_field in RESERVED_COLUMNS:
            raise ConfigError(f"--output-field {self.output_field!r} is reserved: every run writes its own "
                              f"{', '.join(RESERVED_COLUMNS)} columns beside the fused caption; choose another name")
        if self.output_field in (self.raw_field, self.synthetic_field):
            raise ConfigError(f"--output-field {self.output_field!r} is an input caption column: the fused caption "
                              "would overwrite it; choose another name")


def skip_reason_kind(reason: str) -> str:
    """A skipped row's ``error`` without its particulars, to count rows by reason: ``field 'x' is not a
    string (int)`` -> ``field 'x' is not a string``."""
    return reason.split(" (", 1)[0]


@dataclass
class RowCounts:
    """Row and token counts and timing of a run: one file (RunSummary) or a dataset. The one set of
    counts the progress display, the summary and the meta file all show.

    Every selected row done so far is counted once, by how it got done: ``rows_resumed`` (found in the
    journal at start, whatever its status), or by this process: ``rows_skipped`` (unusable captions, or
    refused by the tokenizer), ``rows_fused`` (by the model) or ``rows_reused`` (an identical pair's
    result). ``rows_total - rows_done`` rows are left. ``skipped_reasons`` counts the rows whose status
    is ``skipped`` by reason (their ``error`` column, particulars left out): of the whole output once it
    is written, else of this process's skipped rows."""

    rows_total: int = 0  # rows selected by limit/shard
    rows_resumed: int = 0  # found done in the journal at start
    rows_fused: int = 0  # generated by the model in this process
    rows_reused: int = 0  # filled from an identical pair (in flight or journaled)
    rows_skipped: int = 0  # skipped by this process
    skipped_reasons: dict = field(default_factory=dict)
    truncated_prompts: int = 0
    length_cut: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    fuse_s: float = 0.0
    model: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def rows_this_run(self) -> int:
        """Rows finished by this process (fused, reused or skipped), resumed rows not counted."""
        return self.rows_fused + self.rows_reused + self.rows_skipped

    @property
    def rows_done(self) -> int:
        return self.rows_resumed + self.rows_this_run

    @property
    def rows_per_s(self) -> float:
        """Rows finished by this process per second, skipped rows included (as the progress display)."""
        return self.rows_this_run / self.fuse_s if self.fuse_s > 0 else 0.0

    def skip(self, reason: str, rows: int = 1) -> None:
        """``rows`` rows skipped by this process for ``reason``."""
        self.rows_skipped += rows
        self.count_reason(reason, rows)

    def count_reason(self, reason: str, rows: int = 1) -> None:
        kind = skip_reason_kind(reason)
        self.skipped_reasons[kind] = self.skipped_reasons.get(kind, 0) + rows

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.fuse_s if self.fuse_s > 0 else 0.0


COUNTS = ("rows_total", "rows_resumed", "rows_fused", "rows_reused", "rows_skipped", "truncated_prompts", "length_cut",
          "prompt_tokens", "generated_tokens")


def skipped_section(counts: RowCounts) -> dict:
    """The meta file's ``skipped``: rows of the output whose status is ``skipped``, by reason."""
    return {"rows": sum(counts.skipped_reasons.values()), "by_reason": dict(sorted(counts.skipped_reasons.items())),
            "why": f"each skipped row's {ERROR_COLUMN!r} column"}


@dataclass
class RunSummary(RowCounts):
    output: Path | None = None
    complete: bool = False
    already_done: str | None = None  # OUTPUT was already complete for this config: the line saying so


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


def settings_fingerprint(cfg: FuseConfig, meta: dict, model_sha256: str) -> dict:
    """The part of a journal's fingerprint that every file of a run shares: model, decoding, fields."""
    return {
        "model_sha256": model_sha256,
        "beams": cfg.beams if cfg.beams is not None else meta["num_beams"],
        "max_new_tokens": cfg.max_new_tokens if cfg.max_new_tokens is not None else meta["max_new_tokens"],
        "length_offset": meta["length_offset"],
        "max_input_tokens": meta["max_input_tokens"],
        "prompt_template": _template_sha256(cfg, meta),
        "raw_field": cfg.raw_field,
        "synthetic_field": cfg.synthetic_field,
    }


def _template_sha256(cfg: FuseConfig, meta: dict) -> str:
    """The prompt template's sha256 as the model sees it (inside its chat template with
    ``--chat-template auto``): a resume or rerun with the other choice is another prompt."""
    if cfg.chat_template == "none":
        return meta["prompt_template_sha256"]
    from capsfuse_lite.engine.fuser import effective_template_sha256

    return effective_template_sha256(meta, cfg.chat_template, str(cfg.model))


def fuser_kwargs(cfg: FuseConfig, fingerprint: dict) -> dict:
    """Keyword arguments for the engine (``Fuser``) of a run with ``cfg`` and ``fingerprint``."""
    kwargs = {k: getattr(cfg, k) for k in ("slots", "n_gpu_layers", "n_ctx", "n_threads", "kv_type")}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["beams"] = fingerprint["beams"]
    kwargs["max_new_tokens"] = fingerprint["max_new_tokens"]
    if cfg.chat_template != "none":
        kwargs["chat_template"] = cfg.chat_template
    return kwargs


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

    # -- phase 3: the output -----------------------------------------------------------------

    def _assemble(self, journal: Journal, summary: RunSummary) -> None:
        """Stream the input again, join the journaled results by index, write OUTPUT.partial."""
        cfg = self.config
        added = {cfg.output_field: "string", FINISH_COLUMN: "string", STATUS_COLUMN: "string", ERROR_COLUMN: "string"}
        selected = self.selected
        tmp = partial_path(cfg.output)
        results = journal.results()
        current = next(results, None)
        summary.truncated_prompts = summary.length_cut = 0  # of the whole output, resumed rows included
        summary.skipped_reasons = {}
        try:
            with open_writer(tmp, self.output_format, self.layout.with_columns(added),
                             compression=detect_compression(cfg.output), csv_delimiter=cfg.csv_delimiter) as writer:
                for i, row in self._reader.rows():
                    if i >= selected.stop:
                        break
                    if i % selected.step != selected.start:
                        continue
                    while current is not None and current[0] < i:
                        current = next(results, None)
                    raw, synthetic, reason = caption_pair(row, cfg.raw_field, cfg.synthetic_field)
                    entry = None
                    if reason is None:
                        if current is None or current[0] != i or current[1].get("h") != pair_key(raw, synthetic).hex():
                            raise InputFileError(f"{cfg.input}: row {i} has no journaled result for its current captions "
                                                 "(did the input change during the run?); rerun to fuse it")
                        entry = current[1]
                    out = result_columns(cfg.output_field, entry, reason)
                    if out[STATUS_COLUMN] == STATUS_SKIPPED:
                        summary.count_reason(out[ERROR_COLUMN])
                    else:
                        summary.truncated_prompts += bool(entry.get("truncated"))
                        summary.length_cut += entry["finish_reason"] == "length"
                    row = {k: v for k, v in row.items() if k not in out}
                    row.update(out)
                    writer.write(writable(row))
        except OSError as exc:
            remove_quietly(tmp)
            raise write_error(exc, tmp, RESUME_HINT) from None
        except BaseException:
            remove_quietly(tmp)
            raise

    def _publish(self) -> None:
        """Rename the finished OUTPUT.partial onto OUTPUT (durably)."""
        cfg = self.config
        try:
            replace_atomically(partial_path(cfg.output), cfg.output)
        except OSError as exc:
            raise write_error(exc, cfg.output, RESUME_HINT) from None

    def _meta(self, summary: RunSummary, fingerprint: dict) -> dict:
        """The meta file of the OUTPUT.partial just assembled."""
        from capsfuse_lite.models import file_sha256

        cfg = self.config
        try:
            output_bytes = partial_path(cfg.output).stat().st_size
        except OSError as exc:
            raise write_error(exc, partial_path(cfg.output), RESUME_HINT) from None
        meta = {
            "capsfuse_lite": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command,
            "input": {"path": str(cfg.input.resolve()), "format": self.layout.format, "rows": self.layout.rows,
                      "bytes": self.input_bytes, "sha256": file_sha256(cfg.input)},
            "csv_delimiter": cfg.csv_delimiter or ",",
            "output": {"path": str(cfg.output.resolve()), "format": self.output_format, "rows": summary.rows_total,
                       "bytes": output_bytes},
            "fields": {"raw": cfg.raw_field, "synthetic": cfg.synthetic_field, "output": cfg.output_field},
            "selection": {"limit": cfg.limit, "shard": f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else None},
            "model": summary.model,
            "settings": {**summary.settings, "max_input_tokens": fingerprint["max_input_tokens"],
                         "prompt_template_sha256": fingerprint["prompt_template"]},
            "counts": {k: getattr(summary, k) for k in ("rows_total", "rows_fused", "rows_reused", "rows_resumed",
                                                        "rows_skipped", "truncated_prompts", "length_cut")},
            "skipped": skipped_section(summary),
            "timing": {"wall_s": round(summary.wall_s, 3), "fuse_s": round(summary.fuse_s, 3),
                       "rows_per_s": round(summary.rows_per_s, 4),
                       "generated_tokens_per_s": round(summary.generated_tokens_per_s, 2)},
            "journal_run": self.journal.run_id,
        }
        return meta


def run_fuse(config: FuseConfig, *, progress: Progress | None = None,
             fuser_factory: Callable[..., Any] | None = None) -> RunSummary:
    """Validate, fuse and write in one call (``config.model`` must be a GGUF path)."""
    run = FuseRun(config, progress=progress, fuser_factory=fuser_factory)
    run.prepare()
    return run.execute()


def summary_dict(summary: RunSummary) -> dict:
    out = asdict(summary)
    out["output"] = str(summary.output)
    out["rows_per_s"] = summary.rows_per_s
    out["generated_tokens_per_s"] = summary.generated_tokens_per_s
    return out
