"""The row model every format shares: format names, the output :class:`Layout` (columns and value kinds), the reader/writer base classes, CSV delimiters and JSON values."""

from __future__ import annotations

import abc
import base64
import datetime as _dt
import decimal
import gzip
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.formats import source as byte_source
from capsfuse_lite.formats.source import COMPRESSIONS, _BOM, _ReadError, _Source, import_zstandard, split_compression


FORMATS = ("json", "jsonl", "csv", "parquet")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: str | Path, explicit: str | None = None, *, role: str = "input") -> str:
    """The file format from ``explicit`` (``--input-format``/``--output-format``) or the extension.

    A compression extension is looked through (``x.jsonl.gz`` is jsonl) and combines with
    ``explicit`` (``--input-format jsonl`` on ``x.txt.gz``); compressed Parquet is refused."""
    inner, compression = split_compression(path)
    if explicit:
        fmt = explicit.lower().lstrip(".")
        if fmt == "ndjson":
            fmt = "jsonl"
        if fmt not in FORMATS:
            raise ConfigError(f"unknown {role} format {explicit!r}: use one of {', '.join(FORMATS)}")
    else:
        suffix = inner.suffix.lower()
        if suffix not in _EXTENSIONS:
            raise ConfigError(
                f"{path}: cannot tell the {role} format from the extension {suffix or '(none)'!r}; use .json, "
                f".jsonl, .csv or .parquet (the first three optionally .gz or .zst compressed), or pass --{role}-format"
            )
        fmt = _EXTENSIONS[suffix]
    if fmt == "parquet" and compression:
        fix = "decompress it first" if role == "input" else f"write {inner.name} instead"
        raise ConfigError(f"{path}: a {compression}-compressed Parquet file is not supported (Parquet compresses "
                          f"its own pages): {fix}")
    return fmt


_DELIMITER_WORDS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def parse_csv_delimiter(text: str | None) -> str:
    """The CSV field separator for ``--csv-delimiter``: one character, or tab, comma, semicolon, pipe
    (``\\t`` as typed in a shell means tab too); None -> ``,``."""
    if text is None:
        return ","
    delimiter = _DELIMITER_WORDS.get(text.lower(), text) if len(text) > 1 else text
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ConfigError(f"--csv-delimiter {text!r}: give one character other than a quote or a line break "
                          "(e.g. --csv-delimiter ';') or one of tab, comma, semicolon, pipe")
    return delimiter


def csv_delimiter_name(delimiter: str) -> str:
    """How to write ``delimiter`` on a command line (``tab`` for a tab, ``comma`` for ``,``)."""
    return {"\t": "tab", " ": "space", ",": "comma"}.get(delimiter, delimiter)


def import_pyarrow():
    """``(pyarrow, pyarrow.parquet)``, or a ConfigError saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "Parquet files need pyarrow: pip install 'capsfuse-lite[parquet]' (or pip install pyarrow)"
        ) from None
    return pyarrow, pyarrow.parquet


_INT64 = range(-(1 << 63), 1 << 63)


def value_kind(value: Any) -> str:
    """The JSON kind of a value: string, int, float, bool, null or json (objects, arrays, other). An
    integer beyond 64 bits (JSON allows any) is ``json``: a Parquet output holds its column as text."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if value in _INT64 else "json"
    if isinstance(value, float):
        return "float"
    return "json"


def merge_kinds(a: str | None, b: str) -> str:
    """The column kind able to hold values of kinds ``a`` and ``b`` (``json`` holds anything)."""
    if a is None or a == "null" or a == b:
        return b
    if b == "null":
        return a
    if {a, b} == {"int", "float"}:
        return "float"
    return "json"


@dataclass
class Layout:
    """Rows, columns and column kinds of a file (or of several, merged)."""

    format: str
    rows: int = 0
    columns: dict[str, str] = field(default_factory=dict)  # name -> kind, in first-seen order
    arrow_schema: Any = None  # Parquet inputs: the file's pyarrow schema
    csv_delimiter: str | None = None  # CSV inputs: their field separator (a CSV output's default)

    def note_row(self, row: dict) -> None:
        cols = self.columns
        for key, value in row.items():
            kind = value_kind(value)
            old = cols.get(key)
            if old != kind:
                cols[key] = merge_kinds(old, kind)

    def with_columns(self, extra: dict[str, str]) -> "Layout":
        """A copy with ``extra`` columns appended (replacing same-named input columns)."""
        cols = {k: v for k, v in self.columns.items() if k not in extra}
        cols.update(extra)
        schema = self.arrow_schema
        if schema is not None:
            pa, _ = import_pyarrow()
            kept = [f for f in schema if f.name not in extra]
            schema = pa.schema(kept + [pa.field(name, _arrow_types(pa)[kind]) for name, kind in extra.items()])
        return Layout(self.format, self.rows, cols, schema, self.csv_delimiter)


def _arrow_types(pa):
    return {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "null": pa.string(), "json": pa.string()}


class RecordReader(abc.ABC):
    """Streaming reader of one caption file; see :func:`open_reader`."""

    format = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @abc.abstractmethod
    def rows(self, columns: Iterable[str] | None = None) -> Iterator[tuple[int, dict]]:
        """Yield ``(row_index, row)`` in file order. ``columns`` is a hint (Parquet reads only those)."""

    def scan(self, required: Iterable[str] = ()) -> Layout:
        """Validation pass: read everything, return the :class:`Layout`, raise InputFileError on a
        malformed file or when no row has a ``required`` field."""
        layout = Layout(self.format)
        for _, row in self.rows():
            layout.note_row(row)
            layout.rows += 1
        self._check_required(layout, required)
        return layout

    def _check_required(self, layout: Layout, required: Iterable[str]) -> None:
        missing = [name for name in required if name not in layout.columns]
        if missing and layout.rows:
            have = ", ".join(list(layout.columns)[:12]) or "(none)"
            raise InputFileError(
                f"{self.path}: no row has the field(s) {', '.join(map(repr, missing))} (columns: {have}); "
                "pass --raw-field/--synthetic-field to name the caption columns"
            )

    def error(self, where: str, problem: str) -> InputFileError:
        return InputFileError(f"{self.path}: {where}: {problem}")


def _numbered_lines(reader: RecordReader, source: _Source) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` with its line break, a leading BOM dropped; a line over MAX_ROW_CHARS
    bytes or unreadable (compressed) data is an error naming the line."""
    line_no = 0
    while True:
        try:
            line = source.readline(byte_source.MAX_ROW_CHARS + 1)
        except _ReadError as exc:
            raise reader.error(f"line {line_no + 1}", str(exc)) from None
        if not line:
            return
        line_no += 1
        if line_no == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        if len(line) > byte_source.MAX_ROW_CHARS:
            raise reader.error(f"line {line_no}", f"line longer than {byte_source.MAX_ROW_CHARS:,} bytes (is this a {reader.format.upper()} file?)")
        yield line_no, line


def _json_type(obj: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def json_default(value: Any) -> Any:
    """JSON encoding of the non-JSON values a Parquet file can hold."""
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _dumps(row: Any) -> str:
    """``row`` as JSON text; NaN and infinite floats (which Parquet and CSV hold, JSON does not) as null."""
    try:
        return json.dumps(row, ensure_ascii=False, default=json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(row), ensure_ascii=False, default=json_default, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None, inside dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RecordWriter(abc.ABC):
    """Streaming writer; ``write(row)`` per row in order, then ``close()`` (flushes and fsyncs)."""

    def __init__(self, path: str | Path, layout: Layout):
        self.path = Path(path)
        self.layout = layout
        self.rows = 0

    @abc.abstractmethod
    def write(self, row: dict) -> None:
        """Append one row (rows arrive in output order)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the file: flush, fsync, release resources (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _TextWriter(RecordWriter):
    def __init__(self, path, layout, compression=None):
        super().__init__(path, layout)
        self._raw = open(self.path, "wb")
        try:
            if compression == "gzip":
                self._compressor = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=6, mtime=0)
            elif compression == "zstd":
                self._compressor = import_zstandard().ZstdCompressor(level=3, write_checksum=True).stream_writer(self._raw, closefd=False)
            elif compression is None:
                self._compressor = None
            else:
                raise ConfigError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
        except BaseException:
            self._raw.close()
            raise
        self.file = io.TextIOWrapper(self._compressor or self._raw, encoding="utf-8", newline="")
        self.closed = False

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.file.flush()
        if self._compressor is not None:
            self._compressor.close()  # writes the end of the stream; the file stays open
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
