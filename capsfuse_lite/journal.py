"""The run journal: an append-only record of finished rows beside the output.

``OUTPUT.journal.jsonl`` starts with a header line holding the run's fingerprint (model sha256,
decoding settings, caption fields, input size and row count); every later line is one finished
row with its input index. Lines are flushed to the OS as they are written (a ``kill -9`` loses
nothing written) and fsynced every few seconds and on close (a power cut loses seconds). A torn
last line from a crash is cut off when the journal is reopened; a resume with a different
fingerprint is refused with the differing settings named.

Lookups use a disposable SQLite index (``OUTPUT.journal.index.sqlite``) rebuilt from the journal at
every open, so memory stays flat in the number of rows: rows done (a bitmap, one bit per input
row), results by caption-pair key (dedupe across the whole run, resumes included) and all
results in input order (final assembly). The JSONL file stays the only thing that must survive.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError

JOURNAL_VERSION = 1
_LOAD_BATCH = 10_000

try:  # advisory lock so two runs never append to one journal
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def journal_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".journal.jsonl")


def _index_path(journal: Path) -> Path:
    return journal.with_name(journal.name[: -len(".jsonl")] + ".index.sqlite")


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints (``key: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


class Journal:
    """Finished rows of one run; see the module docstring. Use :meth:`open`."""

    def __init__(self, path: Path, fingerprint: dict, total_rows: int, *, fsync_interval: float = 5.0):
        self.path = path
        self.fingerprint = _normalise(fingerprint)
        self.total_rows = total_rows
        self.fsync_interval = fsync_interval
        self.loaded = 0  # rows found in the journal when it was opened
        self.recorded = 0  # rows appended by this process
        self.dropped_lines = 0  # unreadable lines skipped while loading
        self.torn_bytes = 0  # bytes of a torn last line cut off while loading
        self._done = bytearray((total_rows + 7) // 8)
        self._file = None
        self._db = None
        self._last_sync = time.monotonic()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, total_rows: int, *, fsync_interval: float = 5.0) -> "Journal":
        """Open (resume) or create the journal at ``path``.

        Raises ConfigError if another process holds it or it was made with another fingerprint.
        """
        journal = cls(Path(path), fingerprint, total_rows, fsync_interval=fsync_interval)
        journal._open()
        return journal

    def _open(self) -> None:
        self._file = open(self.path, "ab")
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise ConfigError(f"{self.path} is in use by another capsfuse-lite run (one run per output file)") from None
        try:
            self._open_index()
            if not self._load():
                self._write_header()
        except BaseException:
            self.close()
            raise

    def _open_index(self) -> None:
        index = _index_path(self.path)
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(index) + suffix).unlink(missing_ok=True)
        self._db = sqlite3.connect(index, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("CREATE TABLE results (i INTEGER PRIMARY KEY, h BLOB, data TEXT NOT NULL)")
        self._db.execute("CREATE INDEX results_h ON results (h)")
        self._db.execute("BEGIN")

    def _write_header(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        header = {"capsfuse_journal": JOURNAL_VERSION, "fingerprint": self.fingerprint,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self._file.write((json.dumps(header, ensure_ascii=False) + "\n").encode("utf-8"))
        self.sync()
        _fsync_dir(self.path.parent)

    def _load(self) -> bool:
        """Read an existing journal into the index; False if there is none (or only a torn header)."""
        good_end = 0
        batch = []
        with open(self.path, "rb") as f:
            first = f.readline()
            if not first.endswith(b"\n"):
                return False  # empty, or the header itself was torn: nothing was ever journaled
            try:
                header = json.loads(first)
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("capsfuse_journal") != JOURNAL_VERSION:
                raise ConfigError(f"{self.path} is not a capsfuse-lite journal (version {JOURNAL_VERSION}); move it away or pass --force")
            old = header.get("fingerprint") or {}
            if old != self.fingerprint:
                diff = "; ".join(fingerprint_diff(old, self.fingerprint))
                raise ConfigError(
                    f"{self.path} belongs to a run with different settings ({diff}); "
                    "rerun with the same settings to resume, or pass --force to discard it and start over"
                )
            good_end = f.tell()
            for line in f:
                entry = self._parse(line)
                if entry is None:
                    if line.endswith(b"\n"):
                        self.dropped_lines += 1
                    continue
                batch.append((entry["i"], bytes.fromhex(entry["h"]) if entry.get("h") else None, line.decode("utf-8")))
                good_end = f.tell()
                if len(batch) >= _LOAD_BATCH:
                    self._index_batch(batch)
                    batch = []
            size = f.tell()
        self._index_batch(batch)
        if size > good_end:  # a torn (or garbled) tail from a crash: cut it so appends start clean
            self.torn_bytes = size - good_end
            self._file.truncate(good_end)
        return True

    def _parse(self, line: bytes) -> dict | None:
        if not line.endswith(b"\n"):
            return None
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("i"), int) or not 0 <= entry["i"] < self.total_rows:
            return None
        return entry

    def _index_batch(self, batch: list) -> None:
        if not batch:
            return
        self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", batch)
        for i, _, _ in batch:
            byte = self._done[i >> 3]
            if not byte & (1 << (i & 7)):
                self._done[i >> 3] = byte | (1 << (i & 7))
                self.loaded += 1

    # -- use ---------------------------------------------------------------------------------

    def is_done(self, index: int) -> bool:
        return bool(self._done[index >> 3] & (1 << (index & 7)))

    def lookup(self, key: bytes) -> dict | None:
        """A journaled result for the caption-pair ``key`` (any row), or None."""
        row = self._db.execute("SELECT data FROM results WHERE h = ? LIMIT 1", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def record(self, index: int, key: bytes | None, result: dict) -> None:
        """Append row ``index``'s result (fields beyond ``i``/``h`` are the caller's)."""
        entry = {"i": index, "h": key.hex() if key else None, **result}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (index, key, line))
        if not self.is_done(index):
            self._done[index >> 3] |= 1 << (index & 7)
            self.recorded += 1

    def flush(self) -> None:
        """Hand buffered lines to the OS; fsync if the last fsync is older than the interval."""
        self._file.flush()
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def results(self) -> Iterator[tuple[int, dict]]:
        """All journaled rows as ``(index, entry)`` in increasing index order (streamed)."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        for i, data in self._db.execute("SELECT i, data FROM results ORDER BY i"):
            yield i, json.loads(data)

    @property
    def rows_done(self) -> int:
        return self.loaded + self.recorded

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self.sync()
            self._file.close()  # releases the lock
        if self._db is not None:
            self._db.close()
            self._db = None
            _index_path(self.path).unlink(missing_ok=True)

    def remove(self) -> None:
        """Close and delete the journal (after the output is complete)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def replace_atomically(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file onto its final name and make the rename durable."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)
