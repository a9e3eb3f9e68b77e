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

from pathlib import Path

from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.formats.json import JsonArrayReader, JsonArrayWriter, JsonlReader, JsonlWriter
from capsfuse_lite.formats.csv import CsvReader, CsvWriter
from capsfuse_lite.formats.parquet import ParquetReader, ParquetWriter
from capsfuse_lite.formats.base import (FORMATS, Layout, RecordReader, RecordWriter, csv_delimiter_name, detect_format,  # noqa: F401
                                          import_pyarrow, json_default, merge_kinds, parse_csv_delimiter, value_kind)
from capsfuse_lite.formats.source import (COMPRESSIONS, MAX_ROW_CHARS, detect_compression, import_zstandard,  # noqa: F401
                                          split_compression)

__all__ = ["COMPRESSIONS", "FORMATS", "Layout", "MAX_ROW_CHARS", "RecordReader", "RecordWriter", "csv_delimiter_name", "detect_compression", "detect_format", "import_pyarrow", "import_zstandard", "json_default", "merge_kinds", "open_reader", "open_writer", "parse_csv_delimiter", "read_all", "split_compression", "value_kind"]


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
