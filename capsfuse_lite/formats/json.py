"""JSON (one array of objects, decoded element by element over a sliding buffer) and JSON Lines: readers and writers."""

from __future__ import annotations

import codecs
import json
import re
from typing import Iterator

from capsfuse_lite.formats import source as byte_source
from capsfuse_lite.formats.source import _ReadError, _Source, _utf8_problem
from capsfuse_lite.formats.base import RecordReader, _TextWriter, _dumps, _json_type, _numbered_lines


_WS = re.compile(r"[ \t\n\r]*")
_CUT_MARGIN = 16  # a decode error this close to the buffer end may be the end's fault (``tru|e``, ``\u00|e9``)


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
                if len(st.buf) - st.pos > byte_source.MAX_ROW_CHARS:
                    raise self.error(f"line {st.line_at()}, row {index}",
                                     f"row longer than {byte_source.MAX_ROW_CHARS:,} characters (an unclosed quote or bracket?)")
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
            data = self.source.read(max(byte_source._CHUNK_BYTES, len(self.buf)))
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
