"""A complete output with its meta file means done (issue 11): a rerun, or --resume, exits 0 with one
line and computes nothing; what is not complete for this command is refused with what differs.

Runs use the fake engine (tests/fake_fuser.py) and the LLaMA vocabulary GGUF as the model file: a real
GGUF header, but no weights, so loading it for real would fail -- a rerun that is "done" must not try.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_fuser import FakeFactory
from typer.testing import CliRunner

from capsfuse_lite.run import single as runner_module
from capsfuse_lite.cli import app
from capsfuse_lite.errors import OutputExistsError
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.formats import read_all
from capsfuse_lite.run.single import FuseConfig, FuseRun, run_fuse
from capsfuse_lite.run.outputs import meta_path

MODEL = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def done(tmp_path, sample_rows):
    """in.json fused into out.jsonl (complete, with its meta file) by the fake engine."""
    src = tmp_path / "in.json"
    src.write_text(json.dumps(sample_rows[:6]), encoding="utf-8")
    summary = run_fuse(FuseConfig(input=src, output=tmp_path / "out.jsonl", model=MODEL, slots=2),
                       fuser_factory=FakeFactory())
    assert summary.complete
    return src, tmp_path / "out.jsonl"


def no_model_work(monkeypatch):
    """Make loading or resolving a model fail loudly: a finished output needs neither."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was touched for an output that is already complete")

    monkeypatch.setattr(runner_module, "default_fuser_factory", refuse)
    monkeypatch.setattr("capsfuse_lite.models.resolve_model", refuse)


def fuse_cli(src, out, *extra):
    return CliRunner().invoke(app, ["fuse", str(src), "-o", str(out), "--model", str(MODEL), *map(str, extra)])


def files(out: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.parent.iterdir() if p.name.startswith("out")}


@pytest.mark.parametrize("extra", [(), ("--resume",), ("--slots", "7", "-q"), ("--beams", "3")])
def test_rerunning_a_finished_command_exits_0_with_one_line_and_touches_nothing(done, monkeypatch, extra):
    src, out = done
    before = files(out)
    no_model_work(monkeypatch)
    result = fuse_cli(src, out, *extra)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"{out} is already complete (6 rows, made {json.loads(meta_path(out).read_text())['created']} with "
        f"{MODEL.name}): nothing to do; --force redoes it"]
    assert files(out) == before  # nothing rewritten, no journal left behind


def test_the_library_returns_a_done_summary_without_an_engine(done, monkeypatch):
    src, out = done
    no_model_work(monkeypatch)
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL))
    assert summary.complete and summary.already_done and summary.rows_total == 6 and summary.rows_this_run == 0


def test_an_input_with_the_same_content_but_a_new_mtime_is_still_done(done, monkeypatch):
    src, out = done
    os.utime(src, ns=(1, 1))  # copied or touched: the content decides, not the clock
    no_model_work(monkeypatch)
    assert fuse_cli(src, out).exit_code == 0


def test_force_still_redoes_a_finished_output(done):
    src, out = done
    first = meta_path(out).read_text()
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL, force=True), fuser_factory=FakeFactory())
    assert summary.complete and summary.already_done is None and summary.rows_fused == 6
    assert meta_path(out).read_text() != first


@pytest.mark.parametrize("change, message", [
    (lambda src, out: out.write_text(out.read_text() + "\n"), "changed since capsfuse-lite wrote it"),
    (lambda src, out: meta_path(out).unlink(), "is not a finished capsfuse-lite output (out.jsonl.meta.json is missing)"),
    (lambda src, out: meta_path(out).write_text("[1]"), "is not a capsfuse-lite meta file"),
    (lambda src, out: src.write_text(src.read_text().replace("a", "b", 1)), "made from other input data than"),
])
def test_an_output_that_is_not_complete_for_this_input_is_refused_with_the_reason(done, change, message):
    src, out = done
    change(src, out)
    before = out.read_bytes()
    result = fuse_cli(src, out)
    assert result.exit_code == 2
    assert message in result.stderr and "--force" in result.stderr and len(result.stderr.splitlines()) == 1
    assert out.read_bytes() == before


@pytest.mark.parametrize("extra, differs", [
    (("--beams", "1"), "--beams 3 -> 1"),
    (("--max-new-tokens", "9"), "--max-new-tokens 80 -> 9"),
    (("--limit", "4"), "--limit none -> 4"),
    (("--shard", "0/2"), "--shard none -> 0/2"),
    (("--output-field", "fused"), "--output-field capsfusion -> fused"),
    (("--raw-field", "laion_coco", "--synthetic-field", "laion_2b"), "--raw-field laion_2b -> laion_coco"),
    (("--output-format", "json"), "output format jsonl -> json"),
    (("--kv-type", "q8_0"), "--kv-type f16 -> q8_0"),  # a quantized KV cache changes the captions
])
def test_other_settings_are_refused_naming_what_differs(done, extra, differs):
    src, out = done
    result = fuse_cli(src, out, *extra)
    assert result.exit_code == 2 and "made with other settings" in result.stderr, result.output
    assert differs in result.stderr and "pass --force to redo it with these" in result.stderr


def test_another_model_file_is_a_difference(done, tmp_path):
    src, out = done
    other = tmp_path / "other.gguf"
    other.write_bytes(MODEL.read_bytes() + b"\0")
    result = CliRunner().invoke(app, ["fuse", str(src), "-o", str(out), "--model", str(other)])
    assert result.exit_code == 2 and f"model {MODEL.name} (sha256 " in result.stderr and "-> other.gguf" in result.stderr


def test_any_rerun_continues_an_interrupted_force_run_over_a_finished_output(done):
    """--force over a finished output, interrupted: the old output stays until the new run is done; a
    journal beside an output is an interrupted run's, so the printed command (--resume, no --force) and
    the same command without --resume both continue it and then replace OUTPUT; a command with other
    settings is refused by the journal, naming them (issue 16)."""
    src, out = done
    old = out.read_bytes()
    cfg = FuseConfig(input=src, output=out, model=MODEL, force=True, max_new_tokens=3, slots=1)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 2 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete
    assert out.read_bytes() == old and journal_path(out).exists()

    refused = fuse_cli(src, out)  # the old settings: the journal is the other run's
    assert refused.exit_code == 2 and "belongs to a run with different settings" in refused.stderr
    assert "max_new_tokens: 3 -> 80" in refused.stderr and out.read_bytes() == old

    for extra in ((), ("--resume",)):
        factory = FakeFactory()
        cfg = FuseConfig(input=src, output=out, model=MODEL, max_new_tokens=3, slots=1, resume=bool(extra))
        resumed = run_fuse(cfg, fuser_factory=factory)
        assert resumed.complete and resumed.rows_resumed == 2 and len(factory.seen) == 4
        assert not journal_path(out).exists()
        assert all(len(r["capsfusion"].split()) <= 3 for r in read_all(out))
        assert fuse_cli(src, out, "--max-new-tokens", 3).exit_code == 0  # and now it is complete
        run = FuseRun(FuseConfig(input=src, output=out, model=MODEL, force=True, max_new_tokens=3, slots=1),
                      fuser_factory=FakeFactory(on_result=lambda n: n == 2 and run.request_stop()))
        run.prepare()
        assert not run.execute().complete  # cut again, for the second way of continuing


class Killed(BaseException):
    """A kill -9 at a chosen point (nothing after it runs; no handler cleans up)."""


@pytest.mark.parametrize("cut", ["output renamed", "meta renamed", "journal deleted"])
def test_a_run_killed_while_publishing_is_finished_by_the_same_command(done, monkeypatch, cut):
    """The output is renamed into place before its meta file, and the journal deleted last: killed
    between any two steps, rerunning the command gives the new output with a meta file describing it,
    and then "already complete" with no journal left (issue 16: meta written before the output was
    renamed; a journal left beside a finished output made every rerun point at --resume forever)."""
    from capsfuse_lite.run import journal as journal_module
    from capsfuse_lite import files as files_module
    from capsfuse_lite.run import publish as runner_mod

    src, out = done
    real_replace = runner_mod.replace_atomically
    renames = []

    def replace(tmp, final):
        real_replace(tmp, final)
        renames.append(Path(final).name)
        if (cut == "output renamed" and Path(final) == out) or (cut == "meta renamed" and Path(final) == meta_path(out)):
            raise Killed

    def remove(self):
        raise Killed

    monkeypatch.setattr(runner_mod, "replace_atomically", replace)  # the output
    monkeypatch.setattr(files_module, "replace_atomically", replace)  # the meta file (write_json_atomic)
    if cut == "journal deleted":
        monkeypatch.setattr(journal_module.Journal, "remove", remove)
    with pytest.raises(Killed):
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=2, max_new_tokens=3, force=True),
                 fuser_factory=FakeFactory())
    monkeypatch.undo()
    assert journal_path(out).exists()

    again = fuse_cli(src, out, "--max-new-tokens", 3)  # the command, without --force
    assert again.exit_code == 0, again.output
    meta = json.loads(meta_path(out).read_text())
    assert meta["settings"]["max_new_tokens"] == 3 and meta["output"]["bytes"] == out.stat().st_size
    assert all(len(r["capsfusion"].split()) <= 3 for r in read_all(out))
    assert not journal_path(out).exists()
    final = fuse_cli(src, out, "--max-new-tokens", 3)
    assert final.exit_code == 0 and final.stderr.startswith(f"{out} is already complete") and "journal" not in final.stderr


def test_a_journal_beside_a_finished_output_that_another_run_holds_is_left_alone(done):
    """The cleanup of a finished run's own journal never deletes a journal another process holds."""
    import fcntl

    src, out = done
    meta = json.loads(meta_path(out).read_text())
    journal_path(out).write_text(json.dumps({"capsfuse_journal": 1, "fingerprint": {}, "run": meta["journal_run"]}) + "\n")
    with open(journal_path(out), "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        busy = fuse_cli(src, out)
    assert busy.exit_code == 2 and "in use by another capsfuse-lite run" in busy.stderr
    assert journal_path(out).exists()
    assert fuse_cli(src, out).exit_code == 0 and not journal_path(out).exists()


def test_a_resume_without_a_journal_does_not_overwrite_a_finished_output(done, monkeypatch):
    src, out = done
    with pytest.raises(OutputExistsError, match="made with other settings"):
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, resume=True, max_new_tokens=3),
                 fuser_factory=FakeFactory())


# -- the summary of an interrupted run counts what was done (issue 11) ------------------------------

def test_an_interrupted_summary_says_how_many_rows_are_done_not_how_many_were_selected(tmp_path, sample_rows):
    from capsfuse_lite.run.progress import summary_rows

    src = tmp_path / "in.json"
    src.write_text(json.dumps(sample_rows), encoding="utf-8")
    cfg = FuseConfig(input=src, output=tmp_path / "out.jsonl", model=MODEL, slots=2)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 5 and run.request_stop()))
    run.prepare()
    summary = run.execute()
    assert not summary.complete and summary.rows_this_run == 5
    shown = dict(summary_rows(summary))
    assert shown["rows"] == f"5 of {len(sample_rows)} done (5 in this run, 0 from the journal); {len(sample_rows) - 5} left"
    assert "not written yet" in shown["output"]

    resumed = run_fuse(FuseConfig(input=src, output=tmp_path / "out.jsonl", model=MODEL, slots=2),
                       fuser_factory=FakeFactory())
    shown = dict(summary_rows(resumed))
    assert shown["rows"] == f"{len(sample_rows)}: {len(sample_rows) - 5} done in this run, 5 from the journal"
    assert shown["output"] == str(tmp_path / "out.jsonl")


# -- output folders: created when missing, only after the input passed ------------------------------

def test_fuse_creates_a_missing_output_folder_once_the_input_has_passed(tmp_path, sample_rows):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(sample_rows[:3]), encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    result = fuse_cli(bad, tmp_path / "new" / "deeper" / "out.jsonl")
    assert result.exit_code == 2 and not (tmp_path / "new").exists()  # a failed check leaves nothing behind
    summary = run_fuse(FuseConfig(input=src, output=tmp_path / "new" / "deeper" / "out.jsonl", model=MODEL),
                       fuser_factory=FakeFactory())
    assert summary.complete and len(read_all(tmp_path / "new" / "deeper" / "out.jsonl")) == 3


def test_prompts_and_merge_create_a_missing_output_folder_too(tmp_path, sample_rows):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(sample_rows[:4]), encoding="utf-8")
    result = CliRunner().invoke(app, ["prompts", str(src), "-o", str(tmp_path / "p" / "prompts.jsonl"), "-m", str(MODEL)])
    assert result.exit_code == 0, result.output
    assert len(read_all(tmp_path / "p" / "prompts.jsonl")) == 4
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.jsonl")
        run_fuse(FuseConfig(input=src, output=parts[-1], model=MODEL, shard=(i, 2)), fuser_factory=FakeFactory())
    result = CliRunner().invoke(app, ["merge", *map(str, parts), "-o", str(tmp_path / "m" / "all.jsonl")])
    assert result.exit_code == 0, result.output
    assert [r["laion_2b"] for r in read_all(tmp_path / "m" / "all.jsonl")] == [r["laion_2b"] for r in sample_rows[:4]]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, sample_rows):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(sample_rows[:2]), encoding="utf-8")
    (tmp_path / "file").write_text("x")
    result = fuse_cli(src, tmp_path / "file" / "sub" / "out.jsonl")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr


# -- one rule for "complete", in a single-file run and for each shard of a dataset (issue 16) -------

def _dataset(data: Path, out: Path, factory=None, **kw):
    from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun

    run = DatasetRun(DatasetConfig(input=data, output=out, model=MODEL, slots=2, **kw),
                     fuser_factory=factory or FakeFactory())
    run.prepare()
    return run.execute()


def _csv(path: Path, rows: list[dict], delimiter: str) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["laion_2b", "laion_coco"])
        for row in rows:
            writer.writerow([row["laion_2b"], row["laion_coco"]])
    return path


@pytest.mark.parametrize("mode", ["file", "dataset"])
def test_another_csv_delimiter_is_a_difference(tmp_path, sample_rows, mode):
    """A CSV output written with ';' is not complete for a command asking for '|' (same input bytes,
    same everything else): the delimiter changes every output byte."""
    data = tmp_path / "data"
    src = _csv(data / "in.csv", sample_rows[:4], ";")
    if mode == "file":
        out = tmp_path / "out.csv"
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, csv_delimiter=";"), fuser_factory=FakeFactory())
        assert fuse_cli(src, out, "--csv-delimiter", ";").exit_code == 0
        result = fuse_cli(src, out, "--csv-delimiter", "|")
        assert result.exit_code == 2 and "--csv-delimiter ';' -> '|'" in result.stderr, result.output
    else:
        out = tmp_path / "out"
        assert _dataset(data, out, csv_delimiter=";").complete
        assert _dataset(data, out, FakeFactory(fail=True), csv_delimiter=";").shards_skipped == 1
        summary = _dataset(data, out, FakeFactory(fail=True), csv_delimiter="|")
        assert "--csv-delimiter ';' -> '|'" in dict(summary.failed)["in.csv"]


def test_a_shard_edited_without_changing_its_size_is_not_complete(tmp_path, sample_rows):
    """Dataset mode compares the input's sha256, as a single-file run does, not its size: an edit that
    keeps the size (sed 's/alloy wheel/alloy WHEEL/') fails the shard until --force redoes it."""
    data, out = tmp_path / "data", tmp_path / "out"
    src = data / "a.jsonl"
    data.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:3]), encoding="utf-8")
    assert _dataset(data, out).complete
    text = src.read_text(encoding="utf-8")
    word = sample_rows[1]["laion_coco"].split()[0]
    edited = text.replace(word, word.upper() if word.upper() != word else word.lower(), 1)
    assert edited != text and len(edited) == len(text)
    src.write_text(edited, encoding="utf-8")
    summary = _dataset(data, out, FakeFactory(fail=True))
    assert not summary.complete and "made from other input data than" in dict(summary.failed)["a.jsonl"]
    summary = _dataset(data, out, force=True)
    assert summary.complete and [r["laion_coco"] for r in read_all(out / "a.jsonl")] == \
        [json.loads(line)["laion_coco"] for line in edited.splitlines()]


def test_rows_appended_after_an_interrupted_run_are_fused_and_the_others_resumed(tmp_path, sample_rows):
    """The journal is keyed by row content, not by the input's row count: one row appended to the input
    of an interrupted run is fused with the rows left, the journaled rows are not fused again."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [dict(r, laion_2b=f"{r['laion_2b']} ({k})") for k, r in enumerate(sample_rows[:20])]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = FuseRun(FuseConfig(input=src, output=out, model=MODEL, slots=2),
                  fuser_factory=FakeFactory(on_result=lambda n: n == 8 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete
    with open(src, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(sample_rows[30], laion_2b="one more row")) + "\n")
    factory = FakeFactory()
    summary = run_fuse(FuseConfig(input=src, output=out, model=MODEL, slots=2, resume=True), fuser_factory=factory)
    assert summary.complete and summary.rows_total == 21 and summary.rows_resumed == 8
    assert len(factory.seen) == 13 and ("one more row", sample_rows[30]["laion_coco"]) in factory.seen
    assert len(read_all(out)) == 21


# -- one set of counts for the progress display, the summary and the meta file (issue 17, items 4, 6) --

def _rows_with_bad_ones(sample_rows, n: int) -> list[dict]:
    """``n`` distinct rows; some with a null or missing caption, some the (fake) tokenizer refuses."""
    from fake_fuser import REFUSED

    rows = [dict(sample_rows[k % len(sample_rows)], laion_2b=f"{sample_rows[k % len(sample_rows)]['laion_2b']} ({k})")
            for k in range(n)]
    for k in range(0, n, 7):
        rows[k]["laion_2b"] = None
    for k in range(3, n, 9):
        rows[k]["laion_coco"] = f"{REFUSED} {k}"
    rows[5].pop("laion_coco")
    return rows


def _same_counts(progress, summary, meta=None) -> None:
    assert progress.done == summary.rows_done
    assert progress.rows == summary.rows_this_run == summary.rows_fused + summary.rows_reused + summary.rows_skipped
    assert progress.tokens == summary.generated_tokens
    assert summary.rows_per_s == pytest.approx(summary.rows_this_run / summary.fuse_s)  # skipped rows in both rates
    if meta is not None:
        for key, value in meta["counts"].items():
            assert getattr(summary, key) == value, key
        assert meta["skipped"]["by_reason"] == summary.skipped_reasons
        assert meta["skipped"]["rows"] == sum(summary.skipped_reasons.values())


def test_the_bar_the_summary_and_the_meta_file_show_the_same_counts(tmp_path, sample_rows):
    from fake_fuser import NoteRecorder

    from capsfuse_lite.run.progress import summary_rows

    rows = _rows_with_bad_ones(sample_rows, 40)
    src, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    src.write_text(json.dumps(rows), encoding="utf-8")
    progress = NoteRecorder()
    run = FuseRun(FuseConfig(input=src, output=out, model=MODEL, slots=2), progress=progress,
                  fuser_factory=FakeFactory(on_result=lambda n: n == 12 and run.request_stop()))
    run.prepare()
    cut = run.execute()
    assert not cut.complete and cut.rows_skipped > 0
    _same_counts(progress, cut)

    progress = NoteRecorder()
    run = FuseRun(FuseConfig(input=src, output=out, model=MODEL, slots=2), progress=progress, fuser_factory=FakeFactory())
    run.prepare()
    summary = run.execute()
    assert summary.complete and summary.rows_done == summary.rows_total == 40 and summary.rows_resumed > 0
    meta = json.loads(meta_path(out).read_text())
    _same_counts(progress, summary, meta)
    written = [r for r in read_all(out) if r["status"] == "skipped"]
    assert meta["skipped"]["rows"] == len(written) and meta["skipped"]["why"] == "each skipped row's 'error' column"
    assert meta["skipped"]["by_reason"] == {"field 'laion_2b' is null": 6, "missing field 'laion_coco'": 1,
                                            "the tokenizer refused a caption": 4}
    shown = dict(summary_rows(summary))
    assert shown["skipped"] == ("11 in the output (field 'laion_2b' is null: 6; the tokenizer refused a caption: 4; "
                                "missing field 'laion_coco': 1); each skipped row's error column says why")
    assert shown["done in this run"] == (f"{summary.rows_fused} fused by the model, {summary.rows_reused} copied from "
                                         f"an identical caption pair, {summary.rows_skipped} skipped")


def test_a_dataset_summary_counts_what_its_bar_counted(tmp_path, sample_rows):
    """A stopped dataset run: the rows of the shards it began are in its summary as in its bar (they were
    not: "4/9 rows" in the bar, 3 in the summary); its rerun's counts add up to the shards' meta files."""
    from fake_fuser import NoteRecorder

    from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    rows = _rows_with_bad_ones(sample_rows, 45)
    for k in range(3):
        (data / f"s{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15 * k: 15 * k + 15]))
    progress = NoteRecorder()
    cfg = DatasetConfig(input=data, output=out, model=MODEL, slots=4)
    run = DatasetRun(cfg, progress=progress, fuser_factory=FakeFactory(on_result=lambda n: n == 14 and run.request_stop()))
    run.prepare()
    cut = run.execute()
    assert not cut.complete and cut.shards_left >= 1
    _same_counts(progress, cut)
    written_before = {k for k in range(3) if (out / f"s{k}.jsonl").exists()}

    progress = NoteRecorder()
    run = DatasetRun(DatasetConfig(input=data, output=out, model=MODEL, slots=4), progress=progress,
                     fuser_factory=FakeFactory())
    run.prepare()
    summary = run.execute()
    assert summary.complete and summary.rows_done == summary.rows_total == 45
    _same_counts(progress, summary)
    metas = {k: json.loads(meta_path(out / f"s{k}.jsonl").read_text()) for k in range(3)}
    before = [k for k in range(3) if k in written_before]
    assert summary.shards_skipped == len(before) and summary.rows_complete == sum(metas[k]["counts"]["rows_total"]
                                                                                  for k in before)
    for key in ("rows_total", "rows_fused", "rows_reused", "rows_skipped", "rows_resumed", "length_cut"):
        assert getattr(summary, key) - (summary.rows_complete if key == "rows_total" else 0) == sum(
            metas[k]["counts"][key] for k in range(3) if k not in before), key
