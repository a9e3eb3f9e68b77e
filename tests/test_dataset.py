"""Dataset mode on one machine (capsfuse_lite.run.dataset): shards found and written at their relative
paths, one engine stream across shards, skip-if-done, resume, failures that cost one shard, and a
thousand shards in bounded memory. The runner logic uses the fake engine; the CLI cases and the
kill -9 case use the tiny real model (--slots 1 where outputs of different schedules are compared:
see test_fuse_cli's module docstring)."""

from __future__ import annotations

import fcntl
import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from fake_fuser import FakeFactory, NoteRecorder
from markers import needs_pyarrow
from rich.console import Console
from typer.testing import CliRunner

from capsfuse_lite.cli import app
from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun
from capsfuse_lite.run.discovery import find_shards, output_name
from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.run.progress import LogProgress, print_summary
from capsfuse_lite.formats import Layout, detect_format, open_writer, read_all
from capsfuse_lite.run.single import FuseConfig, FuseRun, run_fuse
from capsfuse_lite.run.outputs import meta_path

MODEL = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"  # a real GGUF header (fake engine)
FAST = ("--max-new-tokens", "8", "--threads", "1", "--beams", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a caption file in the format (and compression) its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = Layout("json")
    for row in rows:
        layout.note_row(row)
    with open_writer(path, detect_format(path), layout) as writer:
        for row in rows:
            writer.write(row)
    return path


def distinct(rows: list[dict], n: int, tag: str = "") -> list[dict]:
    """``n`` rows with distinct caption pairs, built from ``rows``."""
    return [dict(rows[k % len(rows)], laion_2b=f"{rows[k % len(rows)]['laion_2b']} ({tag}{k})", n=k) for k in range(n)]


def run_dataset(inputs, output, factory=None, progress=None, **kw) -> tuple[DatasetRun, object]:
    kw.setdefault("slots", 4)
    cfg = DatasetConfig(input=inputs[0] if isinstance(inputs, list) else inputs,
                        inputs=inputs if isinstance(inputs, list) else None, output=output, model=MODEL, **kw)
    run = DatasetRun(cfg, progress=progress, fuser_factory=factory or FakeFactory())
    run.prepare()
    return run, run.execute()


def single_file(src: Path, out: Path, **kw) -> list[dict]:
    """What a single-file run makes of ``src`` (the fake engine is deterministic per caption pair)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=4, **kw), fuser_factory=FakeFactory())
    return read_all(out)


@pytest.fixture
def mixed(tmp_path, sample_rows):
    """A folder of shards in every format, nested, with files that are not shards beside them."""
    data = tmp_path / "data"
    shards = {
        "a.json": sample_rows[:9],
        "b.jsonl.gz": sample_rows[9:20],
        "sub/c.csv": sample_rows[20:26],
        "sub/deeper/d.jsonl": sample_rows[26:40],
        "e.json.zst": sample_rows[40:47],
    }
    for rel, rows in shards.items():
        write(data / rel, rows)
    (data / "README.md").write_text("not captions\n")
    write(data / ".hidden" / "x.jsonl", sample_rows[:2])  # hidden folders are not walked
    write(data / ".x.jsonl", sample_rows[:2])
    (data / "old.jsonl.meta.json").write_text("{}")  # capsfuse-lite's own files are never shards
    return data, shards


def test_each_shard_becomes_one_output_at_its_relative_path(tmp_path, mixed):
    data, shards = mixed
    factory = FakeFactory()
    stream = io.StringIO()
    run, summary = run_dataset(data, tmp_path / "out", factory, LogProgress(stream, interval=0.0))
    assert summary.complete and summary.shards_done == len(shards) and not summary.failed
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted([*shards, *(f"{rel}.meta.json" for rel in shards)])  # no journal or .partial left
    for rel in shards:
        assert read_all(tmp_path / "out" / rel) == single_file(data / rel, tmp_path / "single" / rel.replace("/", "_"))
        meta = json.loads(meta_path(tmp_path / "out" / rel).read_text())
        assert meta["input"]["path"] == str((data / rel).resolve()) and meta["counts"]["rows_total"] == len(shards[rel])
    assert (tmp_path / "out" / "b.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"  # compression kept
    # one model, one engine stream for the whole dataset
    assert len(factory.made) == 1 and factory.made[0].streams == 1
    assert summary.rows_total == sum(map(len, shards.values())) == summary.rows_fused
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fusing: 5 shards" and "shards 5/5" in lines[-1] and "47/47 rows" in lines[-1]
    console = Console(file=io.StringIO(), width=120)
    print_summary(summary, console)
    assert "5: 5 written, 0 already complete" in console.file.getvalue()


def test_rows_of_the_next_shard_fill_the_slots_before_a_shard_ends(tmp_path, sample_rows):
    """No drain at shard boundaries: with 8 slots and 5-row shards, the engine holds rows of two
    shards at once, and every shard is published as soon as its own rows are back."""
    for k in range(4):
        write(tmp_path / "data" / f"s{k}.jsonl", sample_rows[5 * k: 5 * k + 5])
    first_result = []
    factory = FakeFactory(on_result=lambda n: n == 1 and first_result.append(len(factory.made[0].seen)))
    run, summary = run_dataset(tmp_path / "data", tmp_path / "out", factory, slots=8)
    assert summary.complete and factory.made[0].streams == 1
    assert first_result == [8]  # rows 0-4 of s0 and 0-2 of s1 were in the engine together
    assert run.stream.max_open >= 2
    assert [pair[0] for pair in factory.seen] == [r["laion_2b"] for r in sample_rows[:20]]  # fed in input order


def test_output_format_and_collisions(tmp_path, sample_rows):
    assert output_name("a/b.csv.gz", "jsonl") == "a/b.jsonl.gz"
    assert output_name("a/b.jsonl.zst", "parquet") == "a/b.parquet"
    assert output_name("b.parquet", "json") == "b.json"
    assert output_name("b.parquet", None) == "b.parquet"
    write(tmp_path / "data" / "a.csv.gz", sample_rows[:3])
    write(tmp_path / "data" / "b.json", sample_rows[3:5])
    run, summary = run_dataset(tmp_path / "data", tmp_path / "out", output_format="jsonl")
    assert summary.complete
    assert read_all(tmp_path / "out" / "a.jsonl.gz") == single_file(tmp_path / "data" / "a.csv.gz", tmp_path / "a.jsonl.gz")
    assert len(read_all(tmp_path / "out" / "b.jsonl")) == 2
    write(tmp_path / "data" / "b.csv", sample_rows[:1])
    with pytest.raises(ConfigError, match=r"b.csv and .*b.json would both be written to .*out2/b.jsonl;"):
        find_shards([tmp_path / "data"], tmp_path / "out2", output_format="jsonl")


@needs_pyarrow
def test_parquet_shards_keep_their_format(tmp_path, sample_rows):
    write(tmp_path / "data" / "p" / "x.parquet", sample_rows[:6])
    run, summary = run_dataset(tmp_path / "data", tmp_path / "out")
    assert summary.complete
    assert read_all(tmp_path / "out" / "p" / "x.parquet") == single_file(tmp_path / "data" / "p" / "x.parquet",
                                                                       tmp_path / "x.parquet")


def test_globs_and_several_inputs_keep_paths_relative_to_their_root(tmp_path, sample_rows):
    data = tmp_path / "data"
    for rel in ("2024/a.jsonl", "2024/b.csv", "2025/c.jsonl", "2025/x/d.jsonl"):
        write(data / rel, sample_rows[:2])
    root, shards = find_shards([f"{data}/**/*.jsonl"], tmp_path / "out")
    assert root == data.absolute() and [s.rel for s in shards] == ["2024/a.jsonl", "2025/c.jsonl", "2025/x/d.jsonl"]
    root, shards = find_shards([data / "2024" / "a.jsonl", data / "2025" / "x" / "d.jsonl"], tmp_path / "out")
    assert [s.rel for s in shards] == ["2024/a.jsonl", "2025/x/d.jsonl"]  # shared root: data/
    root, shards = find_shards([f"{data}/2025/*.jsonl", data / "2025"], tmp_path / "out")
    assert [s.rel for s in shards] == ["c.jsonl", "x/d.jsonl"]  # a file named twice is one shard
    assert shards[0].output == tmp_path / "out" / "c.jsonl"
    with pytest.raises(InputFileError, match=r"no file matches"):
        find_shards([f"{data}/*.parquet"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match=r"no caption files found"):
        find_shards([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(InputFileError, match="no such file or folder"):
        find_shards([tmp_path / "missing"], tmp_path / "out")


def test_an_output_folder_inside_the_input_folder_is_never_read_as_input(tmp_path, sample_rows):
    write(tmp_path / "data" / "a.jsonl", sample_rows[:3])
    run_dataset(tmp_path / "data", tmp_path / "data" / "fused")
    root, shards = find_shards([tmp_path / "data"], tmp_path / "data" / "fused")
    assert [s.rel for s in shards] == ["a.jsonl"]
    with pytest.raises(ConfigError, match="must not be the input folder"):
        find_shards([tmp_path / "data"], tmp_path / "data")
    with pytest.raises(ConfigError, match="would be the input file itself"):
        find_shards([tmp_path / "data" / "a.jsonl"], tmp_path / "data")


def test_dataset_settings_that_cannot_work_are_refused(tmp_path, sample_rows):
    write(tmp_path / "data" / "a.jsonl", sample_rows[:3])
    with pytest.raises(ConfigError, match="--limit selects rows of one file"):
        DatasetConfig(input=tmp_path / "data", output=tmp_path / "out", limit=3)
    (tmp_path / "file.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is a file; a dataset's output is a folder"):
        run_dataset(tmp_path / "data", tmp_path / "file.jsonl")
    with pytest.raises(ConfigError, match="is written to a folder, one output file per input file"):
        run_dataset(tmp_path / "data", tmp_path / "merged.jsonl")  # several files are not concatenated
    assert not (tmp_path / "merged.jsonl").exists()


def test_finished_shards_are_skipped_and_other_outputs_are_not_overwritten(tmp_path, sample_rows):
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(3):
        write(data / f"s{k}.jsonl", sample_rows[10 * k: 10 * k + 10])
    run_dataset(data, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    run, summary = run_dataset(data, out, FakeFactory(fail=True))  # all done: the model is not even loaded
    assert summary.complete and summary.shards_skipped == 3 and summary.shards_done == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    write(data / "s3.jsonl", sample_rows[30:34])  # a new shard: only it is fused
    factory = FakeFactory()
    run, summary = run_dataset(data, out, factory)
    assert summary.shards_done == 1 and summary.shards_skipped == 3
    assert factory.seen == [(r["laion_2b"], r["laion_coco"]) for r in sample_rows[30:34]]

    (out / "s1.jsonl").write_text((out / "s1.jsonl").read_text()[:-50])  # damaged since it was written
    write(data / "s2.jsonl", sample_rows[20:29])  # input changed since its output was written
    (out / "s3.jsonl.meta.json").unlink()  # an output without its meta file
    run, summary = run_dataset(data, out, FakeFactory(fail=True))
    reasons = dict(summary.failed)
    assert set(reasons) == {"s1.jsonl", "s2.jsonl", "s3.jsonl"} and summary.shards_skipped == 1
    # the single-file rule and its messages (capsfuse_lite.run.outputs.finished_output)
    assert "changed since capsfuse-lite wrote it" in reasons["s1.jsonl"] and "--force" in reasons["s1.jsonl"]
    assert "made from other input data than" in reasons["s2.jsonl"]
    assert "(s3.jsonl.meta.json is missing)" in reasons["s3.jsonl"]
    run, summary = run_dataset(data, out, FakeFactory(fail=True), max_new_tokens=12)  # other settings: refused too
    assert "--max-new-tokens 80 -> 12" in dict(summary.failed)["s0.jsonl"]

    run, summary = run_dataset(data, out, force=True)
    assert summary.complete and summary.shards_done == 4
    assert read_all(out / "s2.jsonl") == single_file(data / "s2.jsonl", tmp_path / "s2.jsonl")


def test_a_journal_left_beside_a_finished_output_is_cleaned_up(tmp_path, sample_rows):
    """Killed after publishing a shard but before deleting its journal (the one its meta file names): the
    rerun skips the shard and deletes the journal, unless another run holds it (then that run's)."""
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(2):
        write(data / f"s{k}.jsonl", sample_rows[5 * k: 5 * k + 5])
    run_dataset(data, out)
    for k in range(2):
        run_id = json.loads(meta_path(out / f"s{k}.jsonl").read_text())["journal_run"]
        journal_path(out / f"s{k}.jsonl").write_text(json.dumps({"capsfuse_journal": 1, "run": run_id}) + "\n")
    holder = open(journal_path(out / "s1.jsonl"), "rb")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    try:
        run, summary = run_dataset(data, out, FakeFactory(fail=True))
    finally:
        holder.close()
    assert summary.shards_skipped == 1 and "in use by another capsfuse-lite run" in dict(summary.failed)["s1.jsonl"]
    assert not journal_path(out / "s0.jsonl").exists() and journal_path(out / "s1.jsonl").exists()


def test_a_malformed_shard_fails_alone(tmp_path, sample_rows):
    data = tmp_path / "data"
    write(data / "a.jsonl", sample_rows[:5])
    (data / "b.jsonl").write_text(json.dumps(sample_rows[5]) + "\n[1, 2]\n")
    write(data / "c.csv", sample_rows[6:12])
    (data / "d.csv").write_text("raw,synthetic\nx,y\n")  # no caption columns
    progress = NoteRecorder()
    run, summary = run_dataset(data, tmp_path / "out", progress=progress)
    assert not summary.complete and summary.shards_done == 2 and len(summary.failed) == 2
    reasons = dict(summary.failed)
    assert reasons["b.jsonl"] == f"{data / 'b.jsonl'}: line 2: expected a JSON object, found an array"
    assert "missing column(s) 'laion_2b', 'laion_coco'" in reasons["d.csv"]
    assert any(n.startswith("shard b.jsonl failed: ") for n in progress.notes)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl", "a.jsonl.meta.json", "c.csv",
                                                                      "c.csv.meta.json"]
    assert progress.total == 11 and progress.done == 11  # the failed shards left the row count


def test_a_stopped_run_keeps_journals_and_a_rerun_resumes_only_what_is_left(tmp_path, sample_rows):
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(4):
        write(data / f"s{k}.jsonl", distinct(sample_rows, 12, f"s{k}-"))
    whole = tmp_path / "whole"
    run_dataset(data, whole)

    cfg = DatasetConfig(input=data, output=out, model=MODEL, slots=4)
    run = DatasetRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 20 and run.request_stop()))
    run.prepare()
    summary = run.execute()
    assert not summary.complete and summary.shards_done >= 1 and summary.shards_left >= 1 and not summary.failed
    journals = sorted(p.name for p in out.glob("*.journal.jsonl"))
    assert journals and not list(out.glob("*.partial"))
    journaled = sum(len(p.read_text().splitlines()) - 1 for p in out.glob("*.journal.jsonl"))
    assert journaled > 0

    factory = FakeFactory()
    run, summary = run_dataset(data, out, factory)
    assert summary.complete and summary.shards_skipped >= 1 and summary.rows_resumed == journaled
    assert len(factory.seen) == 48 - 20  # nothing journaled is fused again
    for k in range(4):
        assert read_all(out / f"s{k}.jsonl") == read_all(whole / f"s{k}.jsonl")
    assert not list(out.glob("*.journal.jsonl"))


def test_shard_i_of_n_splits_the_files_between_processes(tmp_path, sample_rows):
    data = tmp_path / "data"
    for k in range(5):
        write(data / f"s{k}.jsonl", sample_rows[k: k + 2])
    for i in range(2):
        run, summary = run_dataset(data, tmp_path / "out", shard=(i, 2))
        assert summary.shards_total == len(range(i, 5, 2)) and summary.complete
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == [f"s{k}.jsonl" for k in range(5)]


def test_a_thousand_small_shards_are_opened_a_few_at_a_time(tmp_path, sample_rows, monkeypatch):
    """Shards are validated, locked and held only while their rows are in the engine: the open
    shards, live FuseRun objects and file descriptors stay bounded by the slots, not the shard count."""
    data = tmp_path / "data"
    data.mkdir()
    for k in range(1000):
        row = sample_rows[k % len(sample_rows)]
        (data / f"{k:04d}.jsonl").write_text(json.dumps(dict(row, laion_2b=f"{row['laion_2b']} {k}")) + "\n"
                                            + json.dumps(dict(row, laion_2b=f"{row['laion_2b']} {k}b")) + "\n")
    live: weakref.WeakSet = weakref.WeakSet()
    init = FuseRun.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live.add(self)

    fds, alive = [], []

    def sample(n):
        if n % 50 == 0:
            fds.append(len(os.listdir("/proc/self/fd")))
            gc.collect()
            alive.append(len(live))

    baseline = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(FuseRun, "__init__", tracked)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 7 per shard: durability is not what this test is about
    run, summary = run_dataset(data, tmp_path / "out", FakeFactory(on_result=sample), slots=8)
    assert summary.complete and summary.shards_done == 1000 and summary.rows_total == 2000
    assert run.stream.max_open <= 8 + 1
    assert len(alive) == 40 and max(alive) <= 8 + 2
    assert max(fds) - baseline <= 40  # a journal, its index and a reader per open shard at most
    assert len(list((tmp_path / "out").glob("*.jsonl"))) == 1000


# -- the CLI with the real tiny model ------------------------------------------------------------------


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_cli_dataset_with_a_malformed_shard_exits_2_listing_it(tmp_path, tiny_gguf_f32, sample_rows):
    data = tmp_path / "data"
    write(data / "a.jsonl", sample_rows[:4])
    write(data / "sub" / "b.csv", sample_rows[4:8])
    (data / "c.jsonl").write_text(json.dumps(sample_rows[8]) + "\n{broken\n")
    one = ("--model", tiny_gguf_f32, *FAST, "--slots", "1")
    result = cli("fuse", data, "-o", tmp_path / "out", *one)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 of 3 shards failed (the others are complete); fix them and rerun the same command:"]
    assert f"  c.jsonl: {data / 'c.jsonl'}: line 2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr and "3: 2 written" in result.stderr
    for rel in ("a.jsonl", "sub/b.csv"):  # each equals its own single-file run
        alone = tmp_path / "alone" / rel
        alone.parent.mkdir(parents=True, exist_ok=True)
        assert cli("fuse", data / rel, "-o", alone, *one).exit_code == 0
        assert read_all(tmp_path / "out" / rel) == read_all(alone)
    (data / "c.jsonl").write_text(json.dumps(sample_rows[8]) + "\n")  # fixed: the rerun fuses only it
    result = cli("fuse", data, "-o", tmp_path / "out", *one)
    assert result.exit_code == 0, result.output
    assert "3: 1 written, 2 already complete" in result.stderr


def start(args: list, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, CAPSFUSE_LITE_CACHE=str(cwd / "cache"))
    return subprocess.Popen([sys.executable, "-m", "capsfuse_lite", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_shard_then_the_same_command_resumes_it(tmp_path, tiny_gguf_f32, sample_rows):
    data = tmp_path / "data"
    for k in range(3):
        write(data / f"s{k}.jsonl", distinct(sample_rows, 40, f"s{k}-"))
    args = ["fuse", data, "-o", tmp_path / "out", "--model", tiny_gguf_f32, *FAST, "--slots", "1", "--quiet"]
    whole = cli("fuse", data, "-o", tmp_path / "whole", "--model", tiny_gguf_f32, *FAST, "--slots", "1", "--quiet")
    assert whole.exit_code == 0, whole.output

    proc = start(args, tmp_path)
    cut = tmp_path / "out" / "s1.jsonl"
    deadline = time.monotonic() + 120
    while not (journal_path(cut).exists() and journal_path(cut).read_bytes().count(b"\n") > 10):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach s1.jsonl"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (tmp_path / "out" / "s0.jsonl").exists() and not cut.exists()
    done_before = (tmp_path / "out" / "s0.jsonl").stat().st_mtime_ns
    journaled = journal_path(cut).read_bytes().count(b"\n") - 1

    resumed = start(args, tmp_path)  # the same command
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    for k in range(3):
        assert read_all(tmp_path / "out" / f"s{k}.jsonl") == read_all(tmp_path / "whole" / f"s{k}.jsonl")
    assert (tmp_path / "out" / "s0.jsonl").stat().st_mtime_ns == done_before  # skipped, not redone
    assert json.loads(meta_path(cut).read_text())["counts"]["rows_resumed"] >= journaled >= 10
    assert not list((tmp_path / "out").glob("*.journal.jsonl"))


# -- issue 16 -------------------------------------------------------------------------------------------

def test_an_output_folder_inside_the_input_is_found_through_links_and_dots(tmp_path, sample_rows):
    """`ln -s data link; fuse link -o data/fused` and `-o data/../data/out`: the output folder is inside
    the input however the paths are spelled, so a rerun never reads the previous outputs as shards."""
    for data in (tmp_path / "data", tmp_path / "data2"):
        write(data / "a.jsonl", sample_rows[:3])
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for inputs, output in ((tmp_path / "link", tmp_path / "data" / "fused"),
                           (tmp_path / "data2", tmp_path / "data2" / ".." / "data2" / "out")):
        for _ in range(2):
            run, summary = run_dataset(inputs, output)
            assert summary.complete and summary.shards_total == 1, [s.rel for s in run.shards]
        assert sorted(p.name for p in Path(output).iterdir()) == ["a.jsonl", "a.jsonl.meta.json"]


def test_a_linked_subfolder_is_walked_once_and_a_link_loop_ends(tmp_path, sample_rows):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write(data / "a.jsonl", sample_rows[:2])
    write(elsewhere / "b.jsonl", sample_rows[2:4])
    (data / "more").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(elsewhere)  # a link back up: walked once
    root, shards = find_shards([data], tmp_path / "out")
    assert [s.rel for s in shards] == ["a.jsonl", "more/b.jsonl"]
    run, summary = run_dataset(data, tmp_path / "out")
    assert summary.complete and read_all(tmp_path / "out" / "more" / "b.jsonl")[0]["laion_2b"] == sample_rows[2]["laion_2b"]


def test_shard_of_one_file_into_an_existing_folder_is_refused(tmp_path, sample_rows):
    """`fuse data.jsonl -o parts/ --shard 1/2` with parts/ existing: rows of one file, not files of a
    dataset; refused with the fix instead of "0 shard(s)" and exit 0."""
    src = write(tmp_path / "data.jsonl", sample_rows[:4])
    (tmp_path / "parts").mkdir()
    result = CliRunner().invoke(app, ["fuse", str(src), "-o", str(tmp_path / "parts"), "--shard", "1/2",
                                      "--model", str(MODEL)])
    assert result.exit_code == 2 and "--shard 1/2 of one file splits its rows" in result.stderr, result.output
    assert list((tmp_path / "parts").iterdir()) == []


def test_an_interrupted_force_run_is_continued_by_the_printed_command(tmp_path, sample_rows):
    """Ctrl-C during `--force` over a finished dataset with other settings: the printed command (no
    --force) keeps the shards the forced run wrote, resumes the cut one and redoes the ones it had not
    reached, instead of failing them as another run's outputs; nothing is fused twice."""
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(4):
        write(data / f"s{k}.jsonl", distinct(sample_rows, 6, f"s{k}-"))
    run_dataset(data, out)
    cfg = DatasetConfig(input=data, output=out, model=MODEL, slots=2, force=True, max_new_tokens=3)
    run = DatasetRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 9 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete

    for rerun in ({}, {"resume": True}):
        factory = FakeFactory()
        run, summary = run_dataset(data, out, factory, max_new_tokens=3, **rerun)
        assert summary.complete and not summary.failed, summary.failed
        assert len(factory.seen) == (24 - 9 if not rerun else 0)  # what the forced run journaled is kept
        assert not list(out.glob("*.journal.jsonl"))
        for k in range(4):
            assert all(len(r["capsfusion"].split()) <= 3 for r in read_all(out / f"s{k}.jsonl"))


def test_any_failure_inside_a_shard_costs_that_shard_only(tmp_path, sample_rows, monkeypatch):
    """A bug or an unforeseen library error while one shard is written fails that shard with one line;
    the other shards are written; --verbose adds the traceback."""
    data = tmp_path / "data"
    for k in range(3):
        write(data / f"s{k}.jsonl", sample_rows[4 * k: 4 * k + 4])
    real = FuseRun._assemble

    def assemble(self, journal, summary):
        if self.label == "s1.jsonl":
            raise OverflowError("int too big to convert")
        return real(self, journal, summary)

    monkeypatch.setattr(FuseRun, "_assemble", assemble)
    for verbose in (False, True):
        progress = NoteRecorder()
        cfg = DatasetConfig(input=data, output=tmp_path / f"out{verbose}", model=MODEL, slots=4)
        run = DatasetRun(cfg, progress=progress, fuser_factory=FakeFactory())
        run.verbose = verbose
        run.prepare()
        summary = run.execute()
        assert summary.shards_done == 2 and [rel for rel, _ in summary.failed] == ["s1.jsonl"]
        assert progress.rows == summary.rows_this_run == 8 and progress.done == summary.rows_done  # s1 left both
        reason = dict(summary.failed)["s1.jsonl"]
        assert reason.startswith("internal error (OverflowError: int too big to convert)") and "\n" not in reason
        traces = [n for n in progress.notes if n.startswith("Traceback")]
        assert len(traces) == (1 if verbose else 0) and (not verbose or "in assemble" in traces[0])
        assert sorted(p.name for p in cfg.output.iterdir() if not p.name.endswith(".journal.jsonl")) == [
            "s0.jsonl", "s0.jsonl.meta.json", "s2.jsonl", "s2.jsonl.meta.json"]


@needs_pyarrow
def test_an_integer_beyond_int64_reaches_a_parquet_output_as_text(tmp_path, sample_rows):
    """JSON allows any integer; Parquet's int64 does not: such a column is written as text (JSON), like
    nested values, instead of an OverflowError after all the model work."""
    data = tmp_path / "data"
    (data).mkdir()
    rows = [dict(sample_rows[0], id=1), dict(sample_rows[1], id=10 ** 30), dict(sample_rows[2], id=None)]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(data / "b.jsonl", sample_rows[3:5])
    run, summary = run_dataset(data, tmp_path / "out", output_format="parquet")
    assert summary.complete and not summary.failed
    assert [r["id"] for r in read_all(tmp_path / "out" / "a.parquet")] == ["1", str(10 ** 30), None]


def test_results_of_a_shard_that_failed_meanwhile_are_dropped(tmp_path, sample_rows, monkeypatch):
    """A shard fails (here: its journal refuses a row) while more of its rows are in the engine: their
    results, arriving later, are dropped, not journaled into the closed journal; the other shards are
    written and the failed one is reported once."""
    data = tmp_path / "data"
    for k in range(3):
        write(data / f"s{k}.jsonl", distinct(sample_rows, 10, f"s{k}-"))
    real = FuseRun.take
    taken = []

    def take(self, position, result):
        taken.append(self.label)
        if self.label == "s1.jsonl":
            raise InputFileError(f"{self.label}: refused (test)")
        return real(self, position, result)

    monkeypatch.setattr(FuseRun, "take", take)
    progress = NoteRecorder()
    run, summary = run_dataset(data, tmp_path / "out", progress=progress, slots=6)
    assert taken.count("s1.jsonl") == 1  # its other rows' results never reached it
    assert summary.shards_done == 2 and summary.failed == [("s1.jsonl", "s1.jsonl: refused (test)")]
    assert [n for n in progress.notes if "failed" in n] == ["shard s1.jsonl failed: s1.jsonl: refused (test)"]
    for k in (0, 2):
        assert len(read_all(tmp_path / "out" / f"s{k}.jsonl")) == 10


def test_a_force_run_also_takes_over_a_journal_without_an_output(tmp_path, sample_rows):
    """A shard with only a journal of an older, other-settings run (cut before it published): a
    `--force` run cut before reaching that shard leaves a placeholder there too, so the printed
    command (no --force) fuses the shard anew instead of refusing the older journal's settings."""
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(4):
        write(data / f"s{k}.jsonl", distinct(sample_rows, 6, f"s{k}-"))
    older = DatasetConfig(input=data, output=out, model=MODEL, slots=1, max_new_tokens=5)
    run = DatasetRun(older, fuser_factory=FakeFactory(on_result=lambda n: n == 20 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete
    assert not (out / "s3.jsonl").exists() and journal_path(out / "s3.jsonl").exists()

    forced = DatasetConfig(input=data, output=out, model=MODEL, slots=1, force=True, max_new_tokens=3)
    run = DatasetRun(forced, fuser_factory=FakeFactory(on_result=lambda n: n == 2 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete

    factory = FakeFactory()
    run, summary = run_dataset(data, out, factory, max_new_tokens=3, slots=1)
    assert summary.complete and not summary.failed, summary.failed
    assert len(factory.seen) == 24 - 2  # the forced run's two rows kept, s3 fused anew
    for k in range(4):
        assert all(len(r["capsfusion"].split()) <= 3 for r in read_all(out / f"s{k}.jsonl"))
