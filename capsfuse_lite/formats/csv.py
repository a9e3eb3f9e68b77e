"""CSV: reader (records numbered by line, bounded in length) and writer (the input's or the given delimiter)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from capsfuse_lite.formats import source as byte_source
from capsfuse_lite.formats.source import _Source, _utf8_problem
from capsfuse_lite.formats.base import Layout, RecordReader, _TextWriter, _dumps, _numbered_lines, csv_delimiter_name


csv.field_size_limit(2**31 - 1)  # row size is bounded by MAX_ROW_CHARS instead


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
            if at.chars > byte_source.MAX_ROW_CHARS:
                raise self.error(f"line {at.start}", f"row longer than {byte_source.MAX_ROW_CHARS:,} characters (an unclosed quote?)")
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
