"""Where rows come from: files and their gzip/zstd compression, read as byte streams, and UTF-8 problems named by line."""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from pathlib import Path

from capsfuse_lite.errors import ConfigError, InputFileError


COMPRESSIONS = ("gzip", "zstd")
_COMPRESSION_EXTENSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
_INSTALL_ZSTD = "pip install 'capsfuse-lite[zstd]' (or pip install zstandard)"
_CHUNK_BYTES = 1 << 20  # JSON (formats.json): bytes read per refill of the text buffer (more for a long element)
_ZSTD_FEED_BYTES = 1 << 14  # zstd: compressed bytes decompressed at a time (bounds the output per step)
MAX_ROW_CHARS = 128 << 20  # one row (JSON element, JSONL line, CSV record) longer than this is an error


def split_compression(path: str | Path) -> tuple[Path, str | None]:
    """``(path without its compression extension, "gzip" | "zstd" | None)``: ``x.jsonl.gz`` -> ``(x.jsonl, "gzip")``."""
    path = Path(path)
    compression = _COMPRESSION_EXTENSIONS.get(path.suffix.lower())
    return (path.with_suffix("") if compression else path), compression


def detect_compression(path: str | Path) -> str | None:
    """The compression a file's name asks for: ``"gzip"`` (.gz), ``"zstd"`` (.zst, .zstd) or None."""
    return split_compression(path)[1]


def import_zstandard():
    """The ``zstandard`` module, or a ConfigError saying how to install it."""
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"zstd-compressed files need the zstandard package: {_INSTALL_ZSTD}") from None
    return zstandard


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
