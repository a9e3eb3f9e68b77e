"""The run journal: an append-only record of finished rows beside the output.

``OUTPUT.journal.jsonl`` starts with a header line holding the run's fingerprint (model sha256,
decoding settings, caption fields) and a random run id (the meta file of the output assembled from
the journal records it, so a journal left beside its own finished output is told apart from one of
an interrupted run); every later line is one finished row with its
input index and the key of its caption pair (``h``: a hash of both captions), so a resumed run
reuses a row only if its captions are unchanged. Lines are flushed to the OS as they are written (a
``kill -9`` loses nothing written) and fsynced every few seconds and on close (a power cut loses
seconds). A torn last line from a crash is cut off when the journal is reopened; a resume with a
different fingerprint is refused with the differing settings named, unless the journal holds no
rows yet (a run that failed before its first row, e.g. on a wrong ``--model``, or the placeholder an
interrupted ``--force`` dataset run leaves beside outputs it had still to redo, see
:func:`mark_replacing`): then it starts over. The input's row count is not part of the fingerprint:
rows appended to (or removed from) the input since are fused (or dropped), the others resumed; rows
journaled beyond the input's current end are ignored.

One run per journal: the file is locked (``flock``) for the whole run, before anything in it is read
or discarded (``discard=True``, i.e. ``--force``, truncates it only under the lock). A crashed
run's lock goes with its process. Every few seconds the journal checks that its path still names the
file it writes, so a folder deleted or renamed during the run stops the run with one clear line.
Write failures (disk full, read-only or vanished folder) become :class:`~capsfuse_lite.errors.
CapsfuseError` s naming the file; the journal written so far stays valid for a resume.

Lookups use a disposable SQLite index (``OUTPUT.journal.index.sqlite``) rebuilt from the journal at
every open and deleted on close, so memory stays flat in the number of rows: rows done (a bitmap,
one bit per input row), results by caption-pair key (dedupe across the whole run, resumes included)
and all results in input order (final assembly). The JSONL file stays the only thing that must
survive.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from capsfuse_lite.errors import CapsfuseError, ConfigError, OutputWriteError, write_error
from capsfuse_lite.files import fsync_dir

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


RESUME_HINT = "the journal keeps every row fused so far: rerun the same command to continue"
_LOCK_ATTEMPTS = 20
_LOCK_POLL_S = 0.5


class JournalBusyError(ConfigError):
    """Another process holds the journal's lock (one run per output file)."""


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def json_line(obj: Any) -> bytes:
    """``obj`` as one UTF-8 JSON line; text that UTF-8 cannot hold (a lone surrogate, which JSON
    input may carry) is written as ``\\uXXXX`` escapes instead of failing."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii")


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints (``key: old -> new``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


class Journal:
    """Finished rows of one run; see the module docstring. Use :meth:`open`."""

    def __init__(self, path: Path, fingerprint: dict, total_rows: int, *, fsync_interval: float = 5.0,
                 lock_wait: float = 0.0):
        self.path = path
        self.lock_wait = lock_wait
        self.fingerprint = _normalise(fingerprint)
        self.total_rows = total_rows
        self.fsync_interval = fsync_interval
        self.loaded = 0  # rows found in the journal when it was opened
        self.recorded = 0  # rows appended by this process
        self.dropped_lines = 0  # unreadable lines skipped while loading
        self.torn_bytes = 0  # bytes of a torn last line cut off while loading
        self.restarted: list[str] = []  # settings that changed in a journal that held no rows (started over)
        self.run_id: str | None = None  # the header's run id (see the module docstring)
        self._done = bytearray((total_rows + 7) // 8)
        self._file = None
        self._db = None
        self._dir_fd: int | None = None  # the journal's folder, to delete the index even if the folder is renamed
        self._last_sync = time.monotonic()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, total_rows: int, *, fsync_interval: float = 5.0,
             discard: bool = False, lock_wait: float = 0.0) -> "Journal":
        """Open (resume) or create the journal at ``path``; ``discard`` empties it first (``--force``).

        Raises JournalBusyError if another process holds it (after waiting up to ``lock_wait``
        seconds for it to let go: a crashed run's lock on a network filesystem outlives it for a
        while), ConfigError if it holds rows made with another fingerprint, and a CapsfuseError
        naming the file if it cannot be written.
        """
        journal = cls(Path(path), fingerprint, total_rows, fsync_interval=fsync_interval, lock_wait=lock_wait)
        journal._open(discard)
        return journal

    @contextlib.contextmanager
    def _writing(self, path: Path | None = None) -> Iterator[None]:
        """OSError / sqlite3.Error -> one user-facing line naming ``path`` (default: the journal)."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise write_error(exc, path or self.path, RESUME_HINT) from None

    def _open(self, discard: bool) -> None:
        with self._writing():
            self._lock()
        try:
            with self._writing(_index_path(self.path)):
                self._open_index()
            with self._writing():
                if discard or not self._load():
                    self._write_header()
        except BaseException:
            self.close(quiet=True)
            raise

    def _lock(self) -> None:
        """Open the journal file and hold an exclusive lock on it for the whole run.

        The lock is taken on the file the path names *after* locking: a run that finishes removes
        its journal while still holding the lock, so a run that opened the old file just before
        finds it gone and opens the new one instead of writing to a deleted file.
        """
        deadline = time.monotonic() + self.lock_wait
        for _ in range(_LOCK_ATTEMPTS):
            self._file = open(self.path, "ab")
            if fcntl is None:  # pragma: no cover - Windows: no advisory locks
                return
            while True:
                try:
                    fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() < deadline:
                        time.sleep(_LOCK_POLL_S)
                        continue
                    self._file.close()
                    self._file = None
                    raise JournalBusyError(f"{self.path} is in use by another capsfuse-lite run (one run per output "
                                           "file); wait for it to finish or stop it first") from None
            if self._in_place():
                if os.unlink in os.supports_dir_fd:
                    self._dir_fd = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                return
            self._file.close()  # the holder removed it between our open and our lock: take the new file
            self._file = None
        raise ConfigError(f"{self.path} keeps being replaced by another capsfuse-lite run; one run per output file")

    def _in_place(self) -> bool:
        """Whether the journal path still names the file this process has open."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        own = os.fstat(self._file.fileno())
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

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
        self.run_id = uuid.uuid4().hex
        self._file.write(json_line(_header(self.fingerprint, self.run_id)))
        self.sync()
        fsync_dir(self.path.parent)

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
            old = header.get("fingerprint") if isinstance(header.get("fingerprint"), dict) else {}
            old = {k: v for k, v in old.items() if k != "input_rows"}  # recorded by earlier versions
            if old != self.fingerprint:
                if not any(self._parse(line) is not None for line in f):
                    # No row was ever journaled (e.g. the model failed to load, or a placeholder of an
                    # interrupted --force run): nothing to keep.
                    self.restarted = fingerprint_diff(old, self.fingerprint) if old else []
                    return False
                diff = "; ".join(fingerprint_diff(old, self.fingerprint))
                raise ConfigError(
                    f"{self.path} belongs to a run with different settings ({diff}); "
                    "rerun with the same settings to resume, or pass --force to discard it and start over"
                )
            self.run_id = header.get("run") if isinstance(header.get("run"), str) else None
            good_end = f.tell()
            for line in f:
                entry = self._parse(line)
                if entry is None:
                    if line.endswith(b"\n"):
                        self.dropped_lines += 1
                    continue
                good_end = f.tell()
                if entry["i"] >= self.total_rows:
                    continue  # a row beyond the input's end now (rows were removed from it)
                batch.append((entry["i"], _key(entry.get("h")), line.decode("utf-8")))
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
        if not isinstance(entry, dict) or not isinstance(entry.get("i"), int) or entry["i"] < 0:
            return None
        return entry

    def _index_batch(self, batch: list) -> None:
        if not batch:
            return
        with self._writing(_index_path(self.path)):
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", batch)
        for i, _, _ in batch:
            byte = self._done[i >> 3]
            if not byte & (1 << (i & 7)):
                self._done[i >> 3] = byte | (1 << (i & 7))
                self.loaded += 1

    # -- use ---------------------------------------------------------------------------------

    def is_done(self, index: int) -> bool:
        """Whether row ``index`` has a journaled result (for any captions; see :meth:`done_key`)."""
        return bool(self._done[index >> 3] & (1 << (index & 7)))

    def done_key(self, index: int) -> bytes | None:
        """The caption-pair key row ``index`` was journaled with (None if not done or keyless)."""
        if not self.is_done(index):
            return None
        with self._writing(_index_path(self.path)):
            row = self._db.execute("SELECT h FROM results WHERE i = ?", (index,)).fetchone()
        return row[0] if row else None

    def lookup(self, key: bytes) -> dict | None:
        """A journaled result for the caption-pair ``key`` (any row), or None."""
        with self._writing(_index_path(self.path)):
            row = self._db.execute("SELECT data FROM results WHERE h = ? LIMIT 1", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def record(self, index: int, key: bytes | None, result: dict) -> None:
        """Append row ``index``'s result (fields beyond ``i``/``h`` are the caller's)."""
        line = json_line({"i": index, "h": key.hex() if key else None, **result})
        with self._writing():
            self._file.write(line)
        with self._writing(_index_path(self.path)):
            self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (index, key, line.decode("utf-8")))
        if not self.is_done(index):
            self._done[index >> 3] |= 1 << (index & 7)
            self.recorded += 1

    def flush(self) -> None:
        """Hand buffered lines to the OS; fsync if the last fsync is older than the interval."""
        with self._writing():
            self._file.flush()
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """Make every recorded line durable, then check the journal was not deleted or moved."""
        with self._writing():
            self._file.flush()
            os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()
        if not self._in_place():
            raise OutputWriteError(
                f"{self.path} was deleted or moved during the run (was its folder renamed or removed?); "
                "put it back and rerun the same command to continue from it, or rerun to start over")

    def results(self) -> Iterator[tuple[int, dict]]:
        """All journaled rows as ``(index, entry)`` in increasing index order (streamed)."""
        with self._writing(_index_path(self.path)):
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            rows = self._db.execute("SELECT i, data FROM results ORDER BY i")
        while True:
            with self._writing(_index_path(self.path)):
                chunk = rows.fetchmany(1000)
            if not chunk:
                return
            for i, data in chunk:
                yield i, json.loads(data)

    @property
    def rows_done(self) -> int:
        return self.loaded + self.recorded

    def close(self, *, quiet: bool = False) -> None:
        """Sync and unlock the journal, delete the index. Errors are raised unless ``quiet`` (set
        while another error is on its way out, which must not be hidden)."""
        error: CapsfuseError | None = None
        if self._file is not None and not self._file.closed:
            try:
                self.sync()
            except CapsfuseError as exc:
                error = exc
            try:
                self._file.close()  # releases the lock (also when the buffered flush fails again)
            except OSError as exc:
                error = error or write_error(exc, self.path, RESUME_HINT)
        self._close_index()
        if error is not None and not quiet:
            raise error

    def _close_index(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:  # pragma: no cover
                pass
            self._db = None
            with contextlib.suppress(OSError):
                if self._dir_fd is not None:  # found even if the folder was renamed meanwhile
                    os.unlink(_index_path(self.path).name, dir_fd=self._dir_fd)
                else:
                    _index_path(self.path).unlink(missing_ok=True)
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def remove(self) -> None:
        """Delete the journal (after the output is complete), then unlock it: deleting while still
        locked means no other run can lock the deleted file."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._close_index()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(quiet=exc_type is not None)


@contextlib.contextmanager
def _unless_held(path: Path, mode: str) -> Iterator[Any]:
    """The journal at ``path`` opened with ``mode`` and locked, or None if it cannot be opened or another
    process holds it (a run in progress owns it)."""
    try:
        f = open(path, mode)
    except OSError:
        yield None
        return
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield None
                return
        yield f


def remove_leftover(path: str | Path) -> bool:
    """Delete the journal at ``path`` (and its index) unless a process holds it: for a journal left
    beside an output that is complete (a run killed after publishing the output, before deleting the
    journal). True if it was removed."""
    path = Path(path)
    with _unless_held(path, "rb") as f:
        if f is None:
            return False
        try:
            path.unlink()
            _index_path(path).unlink(missing_ok=True)
        except OSError:
            return False
    return True


def _header(fingerprint: dict, run_id: str) -> dict:
    return {"capsfuse_journal": JOURNAL_VERSION, "fingerprint": fingerprint, "run": run_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def journal_run_id(path: str | Path) -> str | None:
    """The run id in the header of the journal at ``path`` (None: missing, unreadable or none)."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    run = header.get("run") if isinstance(header, dict) else None
    return run if isinstance(run, str) else None


def mark_replacing(path: str | Path) -> bool:
    """Leave a placeholder journal (a header without fingerprint or rows) at ``path``: the output beside
    it is to be redone by a ``--force`` run that has not reached it yet, so that if that run is cut, the
    output counts as an interrupted run's (any rerun redoes it) and not as complete. An existing journal
    is emptied the same way (as ``--force`` would), unless another process holds it. True if written."""
    path = Path(path)
    with _unless_held(path, "ab") as f:
        if f is None:
            return False
        try:
            f.truncate(0)
            f.write(json_line(_header({}, uuid.uuid4().hex)))
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise write_error(exc, path) from None
    return True


def _key(hexdigest: Any) -> bytes | None:
    try:
        return bytes.fromhex(hexdigest) if isinstance(hexdigest, str) and hexdigest else None
    except ValueError:
        return None


