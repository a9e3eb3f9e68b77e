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

from capsfuse_lite import runner as runner_module
from capsfuse_lite.cli import app
from capsfuse_lite.errors import OutputExistsError
from capsfuse_lite.journal import journal_path
from capsfuse_lite.records import read_all
from capsfuse_lite.runner import FuseConfig, FuseRun, meta_path, run_fuse

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


def test_resume_finishes_an_interrupted_force_run_over_a_finished_output(done):
    """--force over a finished output, interrupted: the old output stays until the new run is done; the
    resume command it prints (--resume, no --force) continues that journal and then replaces OUTPUT;
    a plain rerun meanwhile says the journal is there."""
    src, out = done
    old = out.read_bytes()
    cfg = FuseConfig(input=src, output=out, model=MODEL, force=True, max_new_tokens=3, slots=1)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 2 and run.request_stop()))
    run.prepare()
    assert not run.execute().complete
    assert out.read_bytes() == old and journal_path(out).exists()

    plain = fuse_cli(src, out)  # the finished output is still complete for the old settings
    assert plain.exit_code == 0 and "--resume finishes that run" in plain.stderr
    refused = fuse_cli(src, out, "--max-new-tokens", "3")
    assert refused.exit_code == 2 and "--resume finishes that run" in refused.stderr

    resumed = run_fuse(FuseConfig(input=src, output=out, model=MODEL, resume=True, max_new_tokens=3, slots=1),
                       fuser_factory=FakeFactory())
    assert resumed.complete and resumed.rows_resumed == 2 and not journal_path(out).exists()
    assert all(len(r["capsfusion"].split()) <= 3 for r in read_all(out))


def test_a_resume_without_a_journal_does_not_overwrite_a_finished_output(done, monkeypatch):
    src, out = done
    with pytest.raises(OutputExistsError, match="made with other settings"):
        run_fuse(FuseConfig(input=src, output=out, model=MODEL, resume=True, max_new_tokens=3),
                 fuser_factory=FakeFactory())


# -- the summary of an interrupted run counts what was done (issue 11) ------------------------------

def test_an_interrupted_summary_says_how_many_rows_are_done_not_how_many_were_selected(tmp_path, sample_rows):
    from capsfuse_lite.progress import summary_rows

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
