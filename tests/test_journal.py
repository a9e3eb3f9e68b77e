"""The run journal: append, reopen, torn tails, fingerprints, locking, ordered results."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
from disk_faults import FullDisk

from capsfuse_lite.run import journal as journal_module
from capsfuse_lite.errors import ConfigError, DiskSpaceError
from capsfuse_lite.run.journal import Journal, fingerprint_diff, journal_path

FP = {"model_sha256": "abc", "beams": 3, "max_new_tokens": 80}


def entry(text):
    return {"text": text, "finish_reason": "eos", "prompt_tokens": 5, "generated_tokens": 2, "truncated": False}


def key(n: int) -> bytes:
    return bytes([n]) * 16


def test_journal_path_is_beside_the_output(tmp_path):
    assert journal_path(tmp_path / "out.parquet") == tmp_path / "out.parquet.journal.jsonl"


def test_record_reopen_lookup_and_ordered_results(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal.open(path, FP, total_rows=10) as j:
        for i in (7, 2, 5):
            j.record(i, key(i), entry(f"row {i}"))
        j.flush()
        assert j.is_done(7) and not j.is_done(3)
        assert j.lookup(key(2))["text"] == "row 2"  # visible before any commit
        assert j.rows_done == 3
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["fingerprint"] == FP and len(lines) == 4
    with Journal.open(path, FP, total_rows=10) as j:
        assert j.loaded == 3 and [i for i in range(10) if j.is_done(i)] == [2, 5, 7]
        assert j.lookup(key(5))["text"] == "row 5" and j.lookup(key(9)) is None
        j.record(0, None, entry("row 0"))
        assert [(i, e["text"]) for i, e in j.results()] == [(0, "row 0"), (2, "row 2"), (5, "row 5"), (7, "row 7")]
    assert not (tmp_path / "j.index.sqlite").exists()  # the index is disposable


def test_torn_last_line_is_cut_and_appends_stay_clean(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal.open(path, FP, total_rows=10) as j:
        j.record(1, key(1), entry("one"))
        j.record(2, key(2), entry("two"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # kill -9 in the middle of writing the last line
    with Journal.open(path, FP, total_rows=10) as j:
        assert j.loaded == 1 and j.is_done(1) and not j.is_done(2)
        assert j.torn_bytes > 0
        j.record(2, key(2), entry("two again"))
    with Journal.open(path, FP, total_rows=10) as j:
        assert [(i, e["text"]) for i, e in j.results()] == [(1, "one"), (2, "two again")]
        assert j.torn_bytes == 0 and j.dropped_lines == 0


def test_torn_header_starts_fresh_and_garbage_lines_are_dropped(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"capsfuse_jou')
    with Journal.open(path, FP, total_rows=10) as j:
        assert j.loaded == 0
        j.record(3, key(3), entry("three"))
    with open(path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"i": 99, "text": "out of range"}).encode() + b"\n")
        f.write(json.dumps({"i": 4, "h": None, **entry("four")}).encode() + b"\n")
    with Journal.open(path, FP, total_rows=10) as j:  # row 99: beyond the input's end now, ignored (kept)
        assert j.dropped_lines == 1 and [i for i, _ in j.results()] == [3, 4]
    with Journal.open(path, FP, total_rows=100) as j:  # the input grew again: row 99 is back
        assert [i for i, _ in j.results()] == [3, 4, 99]


def test_different_fingerprint_is_refused_with_the_difference_named(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal.open(path, FP, total_rows=10) as j:
        j.record(0, key(0), entry("zero"))
    with pytest.raises(ConfigError) as info:
        Journal.open(path, {**FP, "max_new_tokens": 16}, total_rows=10)
    assert "max_new_tokens: 80 -> 16" in str(info.value) and "--force" in str(info.value)
    assert fingerprint_diff({"a": 1}, {"a": 1, "b": 2}) == ["b: None -> 2"]


def test_not_a_journal_is_refused(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"something": "else"}\n')
    with pytest.raises(ConfigError, match="not a capsfuse-lite journal"):
        Journal.open(path, FP, total_rows=10)


def test_two_runs_cannot_share_a_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal.open(path, FP, total_rows=10):
        with pytest.raises(ConfigError, match="in use by another"):
            Journal.open(path, FP, total_rows=10)
    Journal.open(path, FP, total_rows=10).close()  # the lock goes with the first run


def test_remove_deletes_the_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal.open(path, FP, total_rows=10)
    j.record(0, key(0), entry("zero"))
    j.remove()
    assert not path.exists()


# -- locking, errors and text the journal must survive (issue 10) ----------------------------------


def test_discard_happens_only_under_the_lock(tmp_path):
    path = tmp_path / "j.jsonl"
    holder = Journal.open(path, FP, total_rows=10)
    holder.record(4, key(4), entry("four"))
    holder.flush()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="in use by another"):
        Journal.open(path, FP, total_rows=10, discard=True)  # what --force does
    assert path.read_bytes() == before
    holder.record(5, key(5), entry("five"))  # the first run keeps writing to the journal on disk
    holder.close()
    with Journal.open(path, FP, total_rows=10) as j:
        assert [i for i, _ in j.results()] == [4, 5]
    with Journal.open(path, FP, total_rows=10, discard=True) as j:
        assert j.loaded == 0 and list(j.results()) == []


HOLD = """
import sys, time
from capsfuse_lite.run.journal import Journal
j = Journal.open(sys.argv[1], {fp!r}, total_rows=10)
j.record(1, bytes(16), {{"text": "from the crashed run"}})
j.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_crashed_holder_releases_the_lock_and_its_rows_resume(tmp_path):
    path = tmp_path / "j.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(fp=FP), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="in use by another"):
            Journal.open(path, FP, total_rows=10)
    finally:
        proc.kill()  # kill -9: no clean-up, the kernel drops the flock
        proc.wait()
    with Journal.open(path, FP, total_rows=10) as j:
        assert [(i, e["text"]) for i, e in j.results()] == [(1, "from the crashed run")]


def test_a_run_that_opened_a_journal_just_removed_takes_the_new_file(tmp_path, monkeypatch):
    """Race: run B opens the journal, run A finishes and removes it, then B gets the lock on the
    deleted file. B must notice and lock the file the path names now, or its rows vanish."""
    path = tmp_path / "j.jsonl"
    first = Journal.open(path, FP, total_rows=10)
    real_open = open

    def open_then_first_finishes(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if mode == "ab" and first._file is not None and not first._file.closed:
            first.remove()  # A completes between B's open() and B's flock()
        return handle

    monkeypatch.setattr(journal_module, "open", open_then_first_finishes, raising=False)
    second = Journal.open(path, FP, total_rows=10)
    monkeypatch.undo()
    second.record(2, key(2), entry("two"))
    second.close()
    assert path.exists() and len(path.read_text().splitlines()) == 2  # B's header and row are on disk


def test_a_journal_without_rows_takes_new_settings(tmp_path):
    path = tmp_path / "j.jsonl"
    Journal.open(path, FP, total_rows=10).close()  # e.g. the model failed to load: header only
    with Journal.open(path, {**FP, "model_sha256": "def"}, total_rows=10) as j:
        assert j.restarted == ["model_sha256: 'abc' -> 'def'"]
        j.record(0, key(0), entry("zero"))
    with pytest.raises(ConfigError, match="different settings"):  # now it holds a row: refused
        Journal.open(path, FP, total_rows=10)


def test_text_utf8_cannot_hold_is_journaled_as_escapes(tmp_path):
    path = tmp_path / "j.jsonl"
    odd = "lone \ud800 surrogate, NUL \x00, line\u2028separator, 😀"
    with Journal.open(path, FP, total_rows=10) as j:
        j.record(3, key(3), {**entry(odd), "error": "\udfff"})
        assert j.lookup(key(3))["text"] == odd
    path.read_bytes().decode("utf-8")  # the file stays valid UTF-8
    with Journal.open(path, FP, total_rows=10) as j:
        assert j.loaded == 1 and j.lookup(key(3))["text"] == odd and j.done_key(3) == key(3)


def test_disk_full_is_one_error_naming_the_journal_and_leaves_it_resumable(tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    monkeypatch.setattr(journal_module, "open", FullDisk(600).open, raising=False)
    with pytest.raises(DiskSpaceError) as info:
        with Journal.open(path, FP, total_rows=10) as j:
            for i in range(10):
                j.record(i, key(i), entry(f"row {i}" * 5))
                j.flush()
    monkeypatch.undo()
    assert str(info.value).startswith(f"disk full while writing {path}") and "rerun the same command" in str(info.value)
    assert not (tmp_path / "j.index.sqlite").exists()
    with Journal.open(path, FP, total_rows=10) as j:  # what was written is intact
        assert 0 < j.loaded < 10 and j.dropped_lines == 0


def test_a_failing_fsync_at_close_does_not_hide_the_first_error(tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    j = Journal.open(path, FP, total_rows=10)
    j.record(0, key(0), entry("zero"))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module.os, "fsync", no_space)
    with pytest.raises(KeyError, match="the first error"):
        with j:
            raise KeyError("the first error")
    assert j._file.closed and not (tmp_path / "j.index.sqlite").exists()
    j2 = Journal.open(path, FP, total_rows=10, fsync_interval=1e9)  # the lock went with the failed close
    with pytest.raises(DiskSpaceError, match="disk full while writing"):
        j2.close()  # a failure nothing else reports is raised


def test_remove_deletes_the_journal_while_still_holding_its_lock(tmp_path, monkeypatch):
    """Otherwise a run waiting on the file could lock it between unlock and delete, then write to a
    deleted file."""
    import fcntl
    from pathlib import Path

    path = tmp_path / "j.jsonl"
    j = Journal.open(path, FP, total_rows=10)
    seen = []
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self == path:
            with open(path, "ab") as other:
                try:
                    fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("unlocked")
                except BlockingIOError:
                    seen.append("locked")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    j.remove()
    assert seen == ["locked"] and not path.exists()
