"""Disk full, read-only or vanished output folders: one clear line, exit code 2, nothing lost.

The fuse runs here use the fake engine (tests/fake_fuser.py): what is under test is the runner,
the journal and their files. Faults are injected (ENOSPC from ``write``) everywhere, and also made
real with a small or read-only tmpfs where this machine allows mounting one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from disk_faults import FullDisk, resize, tmpfs
from fake_fuser import FakeFactory, fake_caption
from typer.testing import CliRunner

from capsfuse_lite.run import journal as journal_module
from capsfuse_lite.formats import base as format_base
from capsfuse_lite.formats import source as format_source
from capsfuse_lite.run import single as runner_module
from capsfuse_lite.cli import app
from capsfuse_lite.errors import DiskSpaceError, OutputWriteError
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.formats import read_all
from capsfuse_lite.run.single import FuseConfig, FuseRun, run_fuse
from capsfuse_lite.run.outputs import partial_path

MODEL = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"  # a real GGUF header


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def src(tmp_path, sample_rows) -> Path:
    """240 distinct rows (about 100 kB of journal)."""
    rows = [dict(r, laion_2b=f"{r['laion_2b']} ({k})") for k in range(6) for r in sample_rows][:240]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def expected_captions(src: Path) -> list[str]:
    return [fake_caption(r["laion_2b"], r["laion_coco"], 80)[0] for r in json.loads(src.read_text())]


def fuse_cli(src: Path, out: Path, *extra: str, factory=None, monkeypatch=None):
    """`capsfuse-lite fuse` through typer with the fake engine."""
    monkeypatch.setattr(runner_module, "default_fuser_factory", factory or FakeFactory())
    return CliRunner().invoke(app, ["fuse", str(src), "-o", str(out), "--model", str(MODEL), "--slots", "4", *extra])


def one_error_line(result) -> str:
    """The run ended with exit code 2 and one error line (after any progress lines), no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.output and [n for n, line in enumerate(lines) if "error" in line] == [len(lines) - 1], lines
    return lines[-1]


def test_disk_full_while_journaling_is_one_error_and_the_rerun_completes(tmp_path, src, monkeypatch):
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(journal_module, "open", FullDisk(30_000).open, raising=False)
    with pytest.raises(DiskSpaceError) as info:
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=FakeFactory())
    monkeypatch.undo()
    assert str(info.value).startswith(f"disk full while writing {journal_path(out)}")
    assert not out.exists() and not Path(f"{out}.journal.index.sqlite").exists()
    lines = journal_path(out).read_bytes().splitlines()
    assert 20 < len(lines) < 240  # the header and the rows written before the disk filled
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))
    factory = FakeFactory()
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=factory)
    assert summary.complete and summary.rows_resumed >= len(lines) - 2  # a torn last row may be redone
    assert [r["capsfusion"] for r in read_all(out)] == expected_captions(src)


def test_disk_full_while_writing_the_output_keeps_the_journal(tmp_path, src, monkeypatch):
    out = tmp_path / "out.json"
    full = FullDisk(20_000)
    for module in (format_base, format_source):  # the writers open files in base, the readers in source
        monkeypatch.setattr(module, "open", full.open, raising=False)
    with pytest.raises(DiskSpaceError, match=f"disk full while writing {partial_path(out)}.*rerun the same command"):
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=FakeFactory())
    monkeypatch.undo()
    assert not out.exists() and not partial_path(out).exists() and journal_path(out).exists()
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=FakeFactory(fail=True))
    assert summary.complete and summary.rows_resumed == 240  # nothing fused again
    assert [r["capsfusion"] for r in read_all(out)] == expected_captions(src)


def test_a_real_full_disk_through_the_cli(tmp_path, src, monkeypatch):
    with tmpfs("64k") as disk:
        out = disk / "out.jsonl"
        result = fuse_cli(src, out, monkeypatch=monkeypatch)
        line = one_error_line(result)
        assert line.startswith("error: disk full while writing") and str(disk) in line
        assert journal_path(out).exists() and not out.exists()
        assert sorted(p.name for p in disk.iterdir()) == ["out.jsonl.journal.jsonl"]  # no index, no temp files
        resize(disk, "8m")  # space freed: the same command finishes the run
        result = fuse_cli(src, out, monkeypatch=monkeypatch)
        assert result.exit_code == 0, result.output
        assert [r["capsfusion"] for r in read_all(out)] == expected_captions(src)


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, src, monkeypatch):
    with tmpfs("1m", read_only=True) as disk:
        result = fuse_cli(src, disk / "out.jsonl", factory=FakeFactory(fail=True), monkeypatch=monkeypatch)
        assert one_error_line(result) == f"error: cannot write {disk / 'out.jsonl'}: {disk} is read-only; choose another output folder"
        result = CliRunner().invoke(app, ["prompts", str(src), "-o", str(disk / "p.jsonl"), "--model", str(MODEL)])
        assert "read-only" in one_error_line(result)
    assert not (tmp_path / "cache" / "sha256").exists()  # the model was not even hashed


def test_an_unwritable_folder_is_refused_before_any_work_injected(tmp_path, src, monkeypatch):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(OutputWriteError, match=f"cannot write {tmp_path / 'out.jsonl'}: {tmp_path} is read-only"):
        FuseRun(FuseConfig(input=src, output=tmp_path / "out.jsonl", model=MODEL)).prepare()


@pytest.mark.parametrize("action", ["rename", "delete"])
def test_output_folder_renamed_or_deleted_during_the_run(tmp_path, src, action):
    folder = tmp_path / "results"
    folder.mkdir()
    out = folder / "out.jsonl"

    def vandal(n):
        if n == 40:
            if action == "rename":
                os.rename(folder, tmp_path / "moved")
            else:
                shutil.rmtree(folder)

    with pytest.raises(OutputWriteError) as info:
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=FakeFactory(on_result=vandal))
    assert str(info.value).startswith(f"{journal_path(out)} was deleted or moved during the run")
    if action == "delete":
        assert not folder.exists()
        return
    moved = tmp_path / "moved"
    assert sorted(p.name for p in moved.iterdir()) == ["out.jsonl.journal.jsonl"]  # the index went too
    os.rename(moved, folder)  # put back: the journal resumes
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4), fuser_factory=FakeFactory())
    assert summary.complete and summary.rows_resumed >= 40
    assert [r["capsfusion"] for r in read_all(out)] == expected_captions(src)


def test_write_errors_name_the_file(tmp_path):
    import errno
    import sqlite3

    from capsfuse_lite.errors import write_error

    f = tmp_path / "x.jsonl"
    assert str(write_error(OSError(errno.ENOSPC, "No space"), f, "hint")) == f"disk full while writing {f}; free some space; hint"
    assert isinstance(write_error(sqlite3.OperationalError("database or disk is full"), f), DiskSpaceError)
    assert "permission denied" in str(write_error(PermissionError(errno.EACCES, "Permission denied"), f))
    gone = tmp_path / "gone" / "x.jsonl"
    assert "no longer exists" in str(write_error(FileNotFoundError(errno.ENOENT, "No such file"), gone))
    assert "deleted or renamed" in str(write_error(sqlite3.OperationalError("attempt to write a readonly database"), gone))


class FsyncLog:
    """Records fsyncs (by inode) and renames, to check that every published file was fsynced before
    its rename and its folder after it."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino))
            return real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            self.events.append(("replace", os.stat(src).st_ino, Path(dst)))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def check_published(self, path: Path) -> None:
        renames = [k for k, e in enumerate(self.events) if e[0] == "replace" and e[2] == path]
        assert renames, f"{path} was not published by a rename"
        k = renames[-1]
        inode = self.events[k][1]
        assert ("fsync", inode) in self.events[:k], f"{path}: data not fsynced before the rename"
        assert ("fsync", os.stat(path.parent).st_ino) in self.events[k + 1:], f"{path}: folder not fsynced after the rename"


def test_every_published_file_is_fsynced_then_its_folder(tmp_path, src, monkeypatch, tiny_llama_dir):
    log = FsyncLog(monkeypatch)
    out = tmp_path / "out.csv"
    run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4, limit=5), fuser_factory=FakeFactory())
    log.check_published(out)
    log.check_published(Path(f"{out}.meta.json"))
    result = CliRunner().invoke(app, ["prompts", str(src), "-o", str(tmp_path / "p.jsonl"), "--model", str(MODEL),
                                      "--limit", "3"])
    assert result.exit_code == 0, result.output
    log.check_published(tmp_path / "p.jsonl")
    from capsfuse_lite.convert import convert_checkpoint

    gguf = convert_checkpoint(tiny_llama_dir, tmp_path / "tiny-q4_0.gguf", out_type="q4_0", progress=False)
    log.check_published(gguf)  # through llama.cpp's quantizer, which does not fsync itself
