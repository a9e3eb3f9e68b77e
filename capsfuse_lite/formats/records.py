"""Caption files: streaming readers and writers for JSON, JSONL, CSV and Parquet.

Readers yield ``(row_index, row_dict)`` in file order and hold one chunk (JSON), one line
(JSONL), one record (CSV) or one record batch (Parquet) at a time, so memory stays flat in the
number of rows. :meth:`RecordReader.scan` is the validation pass that runs before any model work:
it reads the whole file once, counts the rows, collects the columns (and, for JSON, their value
kinds so that a Parquet or CSV output gets a stable layout), and raises :class:`InputFileError`
naming the file, the line or row, and the problem. A malformed row is reported where it is
found, without reading on to the end of the file; a row over :data:`MAX_ROW_CHARS` (an unclosed
quote or bracket, in practice) is an error too, so memory stays bounded on any input.

The JSON reader does not ``json.load`` the file: upstream's format is one array of objects, and
a CapsFusion-120M export is gigabytes, so the array is decoded element by element with
``JSONDecoder.raw_decode`` over a sliding text buffer. A decode error that the end of the buffer
did not cause is reported at once; one that it did cause refills the buffer with at least as much
text again as the element already holds, so an element of n characters costs O(n) to decode.
A ``.json`` file that starts with ``{`` instead of ``[`` is read as a sequence of objects (JSON
Lines, or a single object: one row).

JSON, JSONL and CSV files may be gzip (``.gz``) or zstd (``.zst``, ``.zstd``) compressed, in and
out: the compression comes from the last extension (``rows.jsonl.gz``), or, for an input whose
name says nothing, from the file's first bytes. They are decompressed as a stream (never whole,
never to disk); a truncated or corrupt stream is an :class:`InputFileError` naming the line.
zstd needs the ``zstandard`` package (the ``zstd`` extra), imported only when a zstd file is used.
Parquet compresses its own pages: ``.parquet.gz`` is refused.

CSV files use ``,`` between fields unless a ``csv_delimiter`` is given (``parse_csv_delimiter``
accepts one character or the words tab, comma, semicolon, pipe). A CSV output uses the given
delimiter, else the CSV input's (``Layout.csv_delimiter``), else ``,``.

Parquet needs pyarrow (the ``parquet`` extra); it is imported only when a Parquet file is used.
"""

from __future__ import annotations

import abc

import base64
import codecs
import csv
import datetime as _dt
import decimal
import gzip
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from capsfuse_lite.errors import ConfigError, InputFileError

FORMATS = ("json", "jsonl", "csv", "parquet")
COMPRESSIONS = ("gzip", "zstd")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION_EXTENSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
_INSTALL_ZSTD = "pip install 'capsfuse-lite[zstd]' (or pip install zstandard)"

_CHUNK_BYTES = 1 << 20  # JSON: bytes read per refill of the text buffer (more for a long element)
_ZSTD_FEED_BYTES = 1 << 14  # zstd: compressed bytes decompressed at a time (bounds the output per step)
MAX_ROW_CHARS = 128 << 20  # one row (JSON element, JSONL line, CSV record) longer than this is an error
_PARQUET_BATCH_ROWS = 4096
_PARQUET_WRITE_ROWS = 16384
_WS = re.compile(r"[ \t\n\r]*")
_CUT_MARGIN = 16  # a decode error this close to the buffer end may be the end's fault (``tru|e``, ``\u00|e9``)

csv.field_size_limit(2**31 - 1)  # row size is bounded by MAX_ROW_CHARS instead


def split_compression(path: str | Path) -> tuple[Path, str | None]:
    """``(path without its compression extension, "gzip" | "zstd" | None)``: ``x.jsonl.gz`` -> ``(x.jsonl, "gzip")``."""
    path = Path(path)
    compression = _COMPRESSION_EXTENSIONS.get(path.suffix.lower())
    return (path.with_suffix("") if compression else path), compression


def detect_compression(path: str | Path) -> str | None:
    """The compression a file's name asks for: ``"gzip"`` (.gz), ``"zstd"`` (.zst, .zstd) or None."""
    return split_compression(path)[1]


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


def import_zstandard():
    """The ``zstandard`` module, or a ConfigError saying how to install it."""
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"zstd-compressed files need the zstandard package: {_INSTALL_ZSTD}") from None
    return zstandard


# ----------------------------------------------------------------------------------------------
# Compressed and plain input bytes


class _ReadError(Exception):
    """The input's bytes cannot be read (corrupt or truncated compressed data); the reader adds the line."""


class _ZstdStream(io.RawIOBase):
    """Decompressed bytes of a stream of zstd frames. Unlike ``zstandard``'s stream_reader, a frame cut
    off by the end of the file is an error, not a silent end of data."""

    def __init__(self, raw, zstandard):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressobj of the frame being read
        self._pending = b""  # compressed bytes after the last finished frame
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            data = self._pending or self._raw.read(_ZSTD_FEED_BYTES)
            self._pending = b""
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd data ends inside a frame")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._pending = self._frame.unused_data
                self._frame = None
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Source:
    """The bytes of an input file, decompressed on the fly (``read``, ``readline``); read problems
    raise :class:`_ReadError` with the reason, for the reader to place at a line."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._raw = open(path, "rb")
        except OSError as exc:
            raise InputFileError(f"{path}: cannot open the file ({exc.strerror or exc})") from None
        try:
            named = detect_compression(path)
            head = self._raw.peek(4)[:4]
            found = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
            if named and head and not found:
                raise InputFileError(f"{path}: line 1: not {named} data (the name ends in {path.suffix} but the file "
                                     "is not compressed that way): rename it")
            self.compression = found or named
            self._errors: tuple = (EOFError, zlib.error, OSError)
            if self.compression == "gzip":
                self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
            elif self.compression == "zstd":
                zstandard = import_zstandard()
                self._errors += (zstandard.ZstdError,)
                self._stream = io.BufferedReader(_ZstdStream(self._raw, zstandard), 1 << 16)
            else:
                self._stream = self._raw
        except BaseException:
            self._raw.close()
            raise

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, EOFError):
            return (f"the {self.compression} data ends early: the file is truncated "
                    "(an interrupted download or copy?)")
        if self.compression and not (isinstance(exc, OSError) and exc.errno is not None):
            return f"corrupt {self.compression} data ({exc})"
        return f"cannot read the file ({exc})"

    def read(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except self._errors as exc:
            raise _ReadError(self._reason(exc)) from None

    def readline(self, limit: int) -> bytes:
        try:
            return self._stream.readline(limit)
        except self._errors as exc:
            raise _ReadError(self._reason(exc)) from None

    def close(self) -> None:
        try:
            self._stream.close()
        except self._errors:  # an unfinished stream may complain on close; the data is not used
            pass
        finally:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_BOM = codecs.BOM_UTF8


def _utf8_problem(exc: UnicodeDecodeError, data: bytes, at_file_start: bool) -> str:
    """The reason for a UnicodeDecodeError, recognising UTF-16 files (Excel's "Unicode text")."""
    if at_file_start and data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "the file is UTF-16 text, not UTF-8: save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 IN > OUT)"
    return f"not valid UTF-8 ({exc.reason})"


# ----------------------------------------------------------------------------------------------
# Layout: what the validation pass learns about a file


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


def open_reader(path: str | Path, fmt: str | None = None, *, csv_delimiter: str | None = None) -> RecordReader:
    """A reader for ``path``; ``fmt`` overrides the extension (compression is still taken from the
    name or the first bytes). ``csv_delimiter``: see :func:`parse_csv_delimiter` (CSV only).
    Raises if the file is missing."""
    path = Path(path)
    fmt = detect_format(path, fmt, role="input")
    delimiter = parse_csv_delimiter(csv_delimiter)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a folder, not a caption file")
    if fmt == "csv":
        return CsvReader(path, delimiter)
    return {"json": JsonArrayReader, "jsonl": JsonlReader, "parquet": ParquetReader}[fmt](path)


class JsonArrayReader(RecordReader):
    """A JSON array of objects (upstream's ``example_data.json``), decoded element by element.

    A file starting with ``{`` is read as a sequence of objects separated by white space (JSON
    Lines saved as .json, or one object: one row)."""

    format = "json"

    def rows(self, columns=None):
        with _Source(self.path) as source:
            st = _TextBuffer(source, self)
            st.skip_ws()
            c = st.peek()
            if c == "{":
                yield from self._sequence(st)
            elif c == "[":
                yield from self._array(st)
            elif c == "":
                raise self.error("line 1", "the file is empty: expected a JSON array of objects ('['), found end of file")
            else:
                raise self.error(f"line {st.line_at()}", f"expected a JSON array of objects ('['), found {c!r}")

    def _array(self, st: "_TextBuffer") -> Iterator[tuple[int, dict]]:
        st.pos += 1
        st.skip_ws()
        if st.peek() == "]":
            st.pos += 1
            return self._expect_end(st)
        index = 0
        while True:
            if st.at_end():
                raise self.error(f"line {st.line_at()}", "unexpected end of file inside the array (truncated file?)")
            if st.peek() != "{":
                raise self.error(f"line {st.line_at()}, row {index}", f"array element is not an object (starts with {st.peek()!r})")
            yield index, self._decode(st, index)
            index += 1
            st.skip_ws()
            c = st.peek()
            if c == ",":
                st.pos += 1
                st.skip_ws()
                if st.peek() == "]":
                    raise self.error(f"line {st.line_at()}", "trailing comma before ']' (invalid JSON)")
            elif c == "]":
                st.pos += 1
                return self._expect_end(st)
            elif c == "":
                raise self.error(f"line {st.line_at()}", "unexpected end of file inside the array (truncated file?)")
            else:
                raise self.error(f"line {st.line_at()}, after row {index - 1}", f"expected ',' or ']', found {c!r}")

    def _sequence(self, st: "_TextBuffer") -> Iterator[tuple[int, dict]]:
        index = 0
        while True:
            yield index, self._decode(st, index)
            index += 1
            st.skip_ws()
            c = st.peek()
            if c == "":
                return
            if c != "{":
                raise self.error(f"line {st.line_at()}, after row {index - 1}",
                                 f"expected the next object, found {c!r} (a .json file is an array [{{...}}, {{...}}] "
                                 "or one object per line)")

    def _decode(self, st: "_TextBuffer", index: int) -> dict:
        """The object starting at ``st.pos`` (which is ``{``); moves ``st.pos`` past it."""
        while True:
            try:
                obj, st.pos = _DECODER.raw_decode(st.buf, st.pos)
                return obj
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(st.buf) - _CUT_MARGIN
                if st.eof or not cut:
                    problem = f"invalid JSON: {exc.msg}"
                    if st.eof and cut:
                        problem += " (the file ends inside this row: truncated file?)"
                    raise self.error(f"line {st.line_at(exc.pos)}, row {index}", problem) from None
                if len(st.buf) - st.pos > MAX_ROW_CHARS:
                    raise self.error(f"line {st.line_at()}, row {index}",
                                     f"row longer than {MAX_ROW_CHARS:,} characters (an unclosed quote or bracket?)")
                st.fill()

    def _expect_end(self, st: "_TextBuffer") -> None:
        st.skip_ws()
        if not st.at_end():
            raise self.error(f"line {st.line_at()}", f"unexpected data after the JSON array ({st.peek()!r})")


_DECODER = json.JSONDecoder()


class _TextBuffer:
    """A sliding window over the UTF-8 text of a :class:`_Source`, with absolute line numbers."""

    def __init__(self, source: _Source, reader: RecordReader):
        self.source = source
        self.reader = reader
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.started = False
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._line = 1  # line number of buf[self._line_pos]
        self._line_pos = 0

    def fill(self) -> None:
        """Drop the consumed text and append the next chunk: at least as much text as is kept, so
        that an element decoded again after each refill costs O(its length) in all."""
        self.line_at(self.pos)
        self.buf = self.buf[self.pos :]
        self._line_pos -= self.pos
        self.pos = 0
        try:
            data = self.source.read(max(_CHUNK_BYTES, len(self.buf)))
        except _ReadError as exc:
            raise self.reader.error(f"line {self.line_at(len(self.buf))}", str(exc)) from None
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            line = self.line_at(len(self.buf)) + exc.object[: exc.start].count(b"\n")
            problem = _utf8_problem(exc, exc.object, not self.started)
            raise self.reader.error(f"line {line}", problem) from None
        self.started = True
        if text:
            self.buf += text
        if not data:
            self.eof = True

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return
            self.fill()

    def peek(self) -> str:
        while self.pos >= len(self.buf) and not self.eof:
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
        with _Source(self.path) as source:
            for line_no, line in _numbered_lines(self, source):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as exc:
                    raise self.error(f"line {line_no}", _utf8_problem(exc, line, line_no == 1)) from None
                except json.JSONDecodeError as exc:
                    problem = f"invalid JSON: {exc.msg} (column {exc.colno})"
                    if not line.endswith(b"\n"):
                        problem += ("; it is the last line and has no line break: the file looks cut off "
                                    "(an interrupted write or copy?)")
                    raise self.error(f"line {line_no}", problem) from None
                if not isinstance(obj, dict):
                    raise self.error(f"line {line_no}", f"expected a JSON object, found {_json_type(obj)}")
                yield index, obj
                index += 1


def _numbered_lines(reader: RecordReader, source: _Source) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` with its line break, a leading BOM dropped; a line over MAX_ROW_CHARS
    bytes or unreadable (compressed) data is an error naming the line."""
    line_no = 0
    while True:
        try:
            line = source.readline(MAX_ROW_CHARS + 1)
        except _ReadError as exc:
            raise reader.error(f"line {line_no + 1}", str(exc)) from None
        if not line:
            return
        line_no += 1
        if line_no == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        if len(line) > MAX_ROW_CHARS:
            raise reader.error(f"line {line_no}", f"line longer than {MAX_ROW_CHARS:,} bytes (is this a {reader.format.upper()} file?)")
        yield line_no, line


class CsvReader(RecordReader):
    """A CSV sheet with a header row (RFC 4180 quoting); every value is a string."""

    format = "csv"

    def __init__(self, path: str | Path, delimiter: str = ","):
        super().__init__(path)
        self.delimiter = delimiter

    def _lines(self, source: _Source, at: "_CsvPosition") -> Iterator[str]:
        """Decoded lines (line breaks kept) for the csv module; a record over MAX_ROW_CHARS is an error."""
        for line_no, data in _numbered_lines(self, source):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.error(f"line {line_no}", _utf8_problem(exc, data, line_no == 1)) from None
            at.chars += len(line)
            if at.chars > MAX_ROW_CHARS:
                raise self.error(f"line {at.start}", f"row longer than {MAX_ROW_CHARS:,} characters (an unclosed quote?)")
            yield line

    def _reader(self, source: _Source, at: "_CsvPosition"):
        return csv.reader(self._lines(source, at), delimiter=self.delimiter, strict=True)

    def _read_header(self, reader) -> list[str]:
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise self.error("line 1", f"cannot read the header row ({exc})") from None
        if not header:
            raise self.error("line 1", "no header row (the first line must name the columns)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise self.error("line 1", f"duplicate column name(s) in the header: {', '.join(map(repr, dupes))}")
        return header

    def _records(self) -> Iterator[tuple[list[str], list[str]]]:
        """``(header, record)`` per non-empty record, checked against the header's width."""
        at = _CsvPosition()
        with _Source(self.path) as source:
            reader = self._reader(source, at)
            header = self._read_header(reader)
            width = len(header)
            index = 0
            while True:
                at.start, at.chars = reader.line_num + 1, 0
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise self.error(f"line {at.start}", f"malformed CSV ({exc})") from None
                if record:
                    if len(record) != width:
                        raise self.error(f"line {at.start}, row {index}", f"expected {width} fields (as in the header), found {len(record)}")
                    yield header, record
                    index += 1

    def header(self) -> list[str]:
        with _Source(self.path) as source:
            return self._read_header(self._reader(source, _CsvPosition()))

    def rows(self, columns=None):
        for index, (header, record) in enumerate(self._records()):
            yield index, dict(zip(header, record))

    def scan(self, required=()):
        header = self.header()
        missing = [name for name in required if name not in header]
        if missing:
            raise self.error("header", f"missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(header)}); "
                             + self._fields_hint(header))
        layout = Layout("csv", columns={h: "string" for h in header}, csv_delimiter=self.delimiter)
        for _ in self._records():
            layout.rows += 1
        return layout

    def _fields_hint(self, header: list[str]) -> str:
        """How to fix missing caption columns: another delimiter when the header is one column that holds one."""
        if len(header) == 1:
            counts = {d: header[0].count(d) for d in (",", ";", "\t", "|") if d != self.delimiter}
            best = max(counts, key=counts.get)
            if counts[best]:
                return (f"the header is one column holding {best!r}: the file looks {csv_delimiter_name(best)}-separated, "
                        f"pass --csv-delimiter {_shell_word(csv_delimiter_name(best))}")
        return "pass --raw-field/--synthetic-field to name the caption columns"


@dataclass
class _CsvPosition:
    start: int = 1  # line where the record being read starts
    chars: int = 0  # its characters so far


def _shell_word(text: str) -> str:
    return text if text.isalnum() else f"'{text}'"


class ParquetReader(RecordReader):
    """A Parquet file, streamed in record batches (row group by row group)."""

    format = "parquet"

    def _open(self):
        _, pq = import_pyarrow()
        try:
            # pre_buffer (pyarrow's default) would read every row group's pages up front: the whole file
            return pq.ParquetFile(self.path, pre_buffer=False)
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


class JsonArrayWriter(_TextWriter):
    def write(self, row):
        self.file.write(("[\n" if self.rows == 0 else ",\n") + _dumps(row))
        self.rows += 1

    def close(self):
        if not self.closed:
            self.file.write("[]\n" if self.rows == 0 else "\n]\n")
        self._finish()


class JsonlWriter(_TextWriter):
    def write(self, row):
        self.file.write(_dumps(row) + "\n")
        self.rows += 1

    def close(self):
        self._finish()


class CsvWriter(_TextWriter):
    def __init__(self, path, layout, compression=None, delimiter=","):
        super().__init__(path, layout, compression)
        self.columns = list(layout.columns)
        self.writer = csv.writer(self.file, delimiter=delimiter)
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


def open_writer(path: str | Path, fmt: str, layout: Layout, *, compression: str | None = "auto",
                csv_delimiter: str | None = None) -> RecordWriter:
    """A writer of ``fmt`` to ``path`` with the columns of ``layout`` (used by CSV and Parquet).

    ``compression``: ``"gzip"``, ``"zstd"``, None, or ``"auto"`` (from ``path``'s extension; pass it
    explicitly when writing to a temporary name such as ``out.jsonl.gz.partial``).
    ``csv_delimiter`` (CSV): default ``layout.csv_delimiter`` (a CSV input's), else ``,``."""
    if compression == "auto":
        compression = detect_compression(path)
    if fmt == "parquet":
        if compression:
            raise ConfigError(f"{path}: Parquet compresses its own pages; write it without {compression} compression")
        return ParquetWriter(path, layout)
    if fmt == "csv":
        delimiter = parse_csv_delimiter(csv_delimiter or layout.csv_delimiter)
        return CsvWriter(path, layout, compression, delimiter)
    return {"json": JsonArrayWriter, "jsonl": JsonlWriter}[fmt](path, layout, compression)


def read_all(path: str | Path, fmt: str | None = None, *, csv_delimiter: str | None = None) -> list[dict]:
    """Every row of a (small) file as a list: for tests and tools, not for large files."""
    return [row for _, row in open_reader(path, fmt, csv_delimiter=csv_delimiter).rows()]
