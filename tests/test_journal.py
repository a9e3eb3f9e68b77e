"""The run journal: append, reopen, torn tails, fingerprints, locking, ordered results."""

from __future__ import annotations

import json

import pytest

from capsfuse_lite.errors import ConfigError
from capsfuse_lite.journal import Journal, fingerprint_diff, journal_path

FP = {"model_sha256": "abc", "beams": 3, "max_new_tokens": 80, "input_rows": 10}


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
    with Journal.open(path, FP, total_rows=10) as j:
        assert j.dropped_lines == 2 and [i for i, _ in j.results()] == [3, 4]


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
