"""Caption files: streaming readers and writers for JSON, JSONL, CSV and Parquet.

Readers yield ``(row_index, row_dict)`` in file order and hold one chunk (JSON), one line
(JSONL), one record (CSV) or one record batch (Parquet) at a time, so memory stays flat in the
number of rows. :meth:`RecordReader.scan` is the validation pass that runs before any model work:
it reads the whole file once, counts the rows, collects the columns (and, for JSON, their value
kinds so that a Parquet or CSV output gets a stable layout), and raises :class:`InputFileError`
naming the file, the line or row, and the problem.

The JSON reader does not ``json.load`` the file: upstream's format is one array of objects, and
a CapsFusion-120M export is gigabytes, so the array is decoded element by element with
``JSONDecoder.raw_decode`` over a sliding text buffer.

Parquet needs pyarrow (the ``parquet`` extra); it is imported only when a Parquet file is used.
"""

from __future__ import annotations

import abc

import base64
import csv
import datetime as _dt
import decimal
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ConfigError, InputFileError

FORMATS = ("json", "jsonl", "csv", "parquet")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

_CHUNK_CHARS = 1 << 20
_PARQUET_BATCH_ROWS = 4096
_PARQUET_WRITE_ROWS = 16384
_WS = re.compile(r"[ \t\n\r]*")

csv.field_size_limit(2**31 - 1)


def detect_format(path: str | Path, explicit: str | None = None, *, role: str = "input") -> str:
    """The file format from ``explicit`` (``--input-format``/``--output-format``) or the extension."""
    if explicit:
        fmt = explicit.lower().lstrip(".")
        if fmt == "ndjson":
            fmt = "jsonl"
        if fmt not in FORMATS:
            raise ConfigError(f"unknown {role} format {explicit!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"{path}: cannot tell the {role} format from the extension {suffix or '(none)'!r}; "
            f"use .json, .jsonl, .csv or .parquet, or pass --{role}-format"
        )
    return _EXTENSIONS[suffix]


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


# ----------------------------------------------------------------------------------------------
# Layout: what the validation pass learns about a file


def value_kind(value: Any) -> str:
    """The JSON kind of a value: string, int, float, bool, null or json (objects, arrays, other)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
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
        return Layout(self.format, self.rows, cols, schema)


def _arrow_types(pa):
    return {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "null": pa.string(), "json": pa.string()}


# ----------------------------------------------------------------------------------------------
# Readers


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


def open_reader(path: str | Path, fmt: str | None = None) -> RecordReader:
    """A reader for ``path``; ``fmt`` overrides the extension. Raises if the file is missing."""
    path = Path(path)
    fmt = detect_format(path, fmt, role="input")
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a folder, not a caption file")
    return {"json": JsonArrayReader, "jsonl": JsonlReader, "csv": CsvReader, "parquet": ParquetReader}[fmt](path)


class JsonArrayReader(RecordReader):
    """A JSON array of objects (upstream's ``example_data.json``), decoded element by element."""

    format = "json"

    def rows(self, columns=None):
        for index, _line, obj in self._elements():
            yield index, obj

    def _elements(self) -> Iterator[tuple[int, int, dict]]:
        decoder = json.JSONDecoder()
        st = _TextBuffer(self.path)
        st.skip_ws()
        if st.peek() != "[":
            found = "end of file" if st.at_end() else repr(st.peek())
            raise self.error(f"line {st.line_at()}", f"expected a JSON array of objects ('['), found {found}")
        st.pos += 1
        st.skip_ws()
        if st.peek() == "]":
            st.pos += 1
            self._expect_end(st)
            return
        index = 0
        while True:
            if st.at_end():
                raise self.error(f"line {st.line_at()}", "unexpected end of file inside the array (truncated file?)")
            if st.peek() != "{":
                raise self.error(f"line {st.line_at()}, row {index}", f"array element is not an object (starts with {st.peek()!r})")
            line = st.line_at()
            while True:
                try:
                    obj, end = decoder.raw_decode(st.buf, st.pos)
                    break
                except json.JSONDecodeError as exc:
                    if st.eof:
                        raise self.error(f"line {st.line_at(exc.pos)}, row {index}", f"invalid JSON: {exc.msg}") from None
                    st.fill()
            yield index, line, obj
            index += 1
            st.pos = end
            st.skip_ws()
            c = st.peek()
            if c == ",":
                st.pos += 1
                st.skip_ws()
                if st.peek() == "]":
                    raise self.error(f"line {st.line_at()}", "trailing comma before ']' (invalid JSON)")
            elif c == "]":
                st.pos += 1
                self._expect_end(st)
                return
            elif c == "":
                raise self.error(f"line {st.line_at()}", "unexpected end of file inside the array (truncated file?)")
            else:
                raise self.error(f"line {st.line_at()}, after row {index - 1}", f"expected ',' or ']', found {c!r}")

    def _expect_end(self, st: "_TextBuffer") -> None:
        st.skip_ws()
        if not st.at_end():
            raise self.error(f"line {st.line_at()}", f"unexpected data after the JSON array ({st.peek()!r})")


class _TextBuffer:
    """A sliding window over a UTF-8 text file with absolute line numbers."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, encoding="utf-8-sig", newline="")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._line = 1  # line number of buf[self._line_pos]
        self._line_pos = 0

    def fill(self) -> None:
        """Drop the consumed text and append the next chunk."""
        self.line_at(self.pos)
        self.buf = self.buf[self.pos :]
        self._line_pos -= self.pos
        self.pos = 0
        try:
            chunk = self.file.read(_CHUNK_CHARS)
        except UnicodeDecodeError as exc:
            raise InputFileError(f"{self.path}: line {self.line_at(len(self.buf))}: not valid UTF-8 ({exc.reason})") from None
        if chunk:
            self.buf += chunk
        else:
            self.eof = True
            self.file.close()

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return
            self.fill()

    def peek(self) -> str:
        if self.pos >= len(self.buf) and not self.eof:
            self.fill()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def at_end(self) -> bool:
        return self.peek() == ""

    def line_at(self, pos: int | None = None) -> int:
        pos = self.pos if pos is None else pos
        if pos >= self._line_pos:
            self._line += self.buf.count("\n", self._line_pos, pos)
            self._line_pos = pos
            return self._line
        return self._line - self.buf.count("\n", pos, self._line_pos)


class JsonlReader(RecordReader):
    """One JSON object per line; blank lines are ignored."""

    format = "jsonl"

    def rows(self, columns=None):
        index = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as exc:
                    raise self.error(f"line {line_no}", f"not valid UTF-8 ({exc.reason})") from None
                except json.JSONDecodeError as exc:
                    raise self.error(f"line {line_no}", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise self.error(f"line {line_no}", f"expected a JSON object, found {_json_type(obj)}")
                yield index, obj
                index += 1


class CsvReader(RecordReader):
    """A CSV sheet with a header row (RFC 4180 quoting); every value is a string."""

    format = "csv"

    def header(self) -> list[str]:
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            return self._read_header(csv.reader(f, strict=True))

    def _read_header(self, reader) -> list[str]:
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise self.error("line 1", f"cannot read the header row ({exc})") from None
        if not header:
            raise self.error("line 1", "no header row (the first line must name the columns)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise self.error("line 1", f"duplicate column name(s) in the header: {', '.join(map(repr, dupes))}")
        return header

    def rows(self, columns=None):
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            header = self._read_header(reader)
            width = len(header)
            index = 0
            start = reader.line_num + 1
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise self.error(f"line {start}", f"malformed CSV ({exc})") from None
                except UnicodeDecodeError as exc:
                    raise self.error(f"line {start}", f"not valid UTF-8 ({exc.reason})") from None
                if record:
                    if len(record) != width:
                        raise self.error(f"line {start}, row {index}", f"expected {width} fields (as in the header), found {len(record)}")
                    yield index, dict(zip(header, record))
                    index += 1
                start = reader.line_num + 1

    def scan(self, required=()):
        header = self.header()
        missing = [name for name in required if name not in header]
        if missing:
            raise self.error("header", f"missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(header)}); "
                             "pass --raw-field/--synthetic-field to name the caption columns")
        layout = Layout("csv", columns={h: "string" for h in header})
        for _ in self.rows():
            layout.rows += 1
        return layout


class ParquetReader(RecordReader):
    """A Parquet file, streamed in record batches (row group by row group)."""

    format = "parquet"

    def _open(self):
        _, pq = import_pyarrow()
        try:
            return pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
            raise self.error("cannot open", f"not a readable Parquet file ({exc})") from None

    def rows(self, columns=None):
        pf = self._open()
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names] if columns is not None else None
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=cols):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
        except InputFileError:
            raise
        except Exception as exc:
            raise self.error(f"row {index}", f"cannot read the Parquet data ({exc})") from None

    def scan(self, required=()):
        pf = self._open()
        schema = pf.schema_arrow
        missing = [name for name in required if name not in schema.names]
        if missing:
            raise self.error("schema", f"missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
                             "pass --raw-field/--synthetic-field to name the caption columns")
        pa, _ = import_pyarrow()
        kinds = {}
        for f in schema:
            t = f.type
            kinds[f.name] = ("string" if pa.types.is_string(t) or pa.types.is_large_string(t) else
                             "bool" if pa.types.is_boolean(t) else
                             "int" if pa.types.is_integer(t) else
                             "float" if pa.types.is_floating(t) else "json")
        return Layout("parquet", pf.metadata.num_rows, kinds, schema)


def _json_type(obj: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


# ----------------------------------------------------------------------------------------------
# Writers


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
    return json.dumps(row, ensure_ascii=False, default=json_default)


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
    def __init__(self, path, layout):
        super().__init__(path, layout)
        self.file = open(self.path, "w", encoding="utf-8", newline="")

    def _finish(self) -> None:
        if self.file.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class JsonArrayWriter(_TextWriter):
    def write(self, row):
        self.file.write(("[\n" if self.rows == 0 else ",\n") + _dumps(row))
        self.rows += 1

    def close(self):
        if not self.file.closed:
            self.file.write("[]\n" if self.rows == 0 else "\n]\n")
        self._finish()


class JsonlWriter(_TextWriter):
    def write(self, row):
        self.file.write(_dumps(row) + "\n")
        self.rows += 1

    def close(self):
        self._finish()


class CsvWriter(_TextWriter):
    def __init__(self, path, layout):
        super().__init__(path, layout)
        self.columns = list(layout.columns)
        self.writer = csv.writer(self.file)
        self.writer.writerow(self.columns)

    def write(self, row):
        self.writer.writerow([_csv_value(row.get(c)) for c in self.columns])
        self.rows += 1

    def close(self):
        self._finish()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return _dumps(value)
    return str(value)


class ParquetWriter(RecordWriter):
    def __init__(self, path, layout):
        super().__init__(path, layout)
        self.pa, pq = import_pyarrow()
        if layout.arrow_schema is not None:
            self.schema = layout.arrow_schema
            self.json_columns = []
        else:
            kinds = _arrow_types(self.pa)
            self.schema = self.pa.schema([self.pa.field(name, kinds[kind]) for name, kind in layout.columns.items()])
            self.json_columns = [name for name, kind in layout.columns.items() if kind == "json"]
        self.writer = pq.ParquetWriter(str(self.path), self.schema)
        self.pending: list[dict] = []

    def write(self, row):
        for name in self.json_columns:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                row = {**row, name: _dumps(value)}
        self.pending.append(row)
        self.rows += 1
        if len(self.pending) >= _PARQUET_WRITE_ROWS:
            self._flush()

    def _flush(self):
        if self.pending:
            self.writer.write_table(self.pa.Table.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self):
        if self.writer is None:
            return
        self._flush()
        self.writer.close()
        self.writer = None
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


def open_writer(path: str | Path, fmt: str, layout: Layout) -> RecordWriter:
    """A writer of ``fmt`` to ``path`` with the columns of ``layout`` (used by CSV and Parquet)."""
    return {"json": JsonArrayWriter, "jsonl": JsonlWriter, "csv": CsvWriter, "parquet": ParquetWriter}[fmt](path, layout)


def read_all(path: str | Path, fmt: str | None = None) -> list[dict]:
    """Every row of a (small) file as a list: for tests and tools, not for large files."""
    return [row for _, row in open_reader(path, fmt).rows()]
