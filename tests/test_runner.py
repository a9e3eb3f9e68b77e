"""The runner's own logic with a fake engine: order, dedupe, skips, resume, shards, limits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fake_fuser import FakeFactory, fake_caption
from rich.console import Console

from capsfuse_lite.errors import ConfigError, InputFileError, OutputExistsError
from capsfuse_lite.journal import journal_path
from capsfuse_lite.progress import LogProgress, Progress, print_summary
from capsfuse_lite.records import read_all
from capsfuse_lite.runner import FuseConfig, FuseRun, meta_path, parse_shard, run_fuse
from capsfuse_lite.shards import merge_shards

MODEL = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"  # a real GGUF header


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def rows(sample_rows):
    """The sample rows, a duplicate pair (one copy with extra whitespace), and four bad rows."""
    bad = [{"laion_2b": "only raw"}, {"laion_2b": None, "laion_coco": "x"},
           {"laion_2b": 7, "laion_coco": "x"}, {"laion_2b": "x", "laion_coco": "  "}]
    dupe = dict(sample_rows[3], laion_2b=f"  {sample_rows[3]['laion_2b']} ", id="dupe")
    return sample_rows[:20] + [bad[0], dict(sample_rows[0], id="same")] + bad[1:] + [dupe] + sample_rows[20:]


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def config(tmp_path, rows, out="out.jsonl", **kw) -> FuseConfig:
    src = tmp_path / "in.json"
    if not src.exists():
        write_json(src, rows)
    kw.setdefault("slots", 4)
    return FuseConfig(input=src, output=tmp_path / out, model=MODEL, **kw)


def expected(rows, max_new_tokens=80):
    out = []
    for row in rows:
        raw, syn = row.get("laion_2b"), row.get("laion_coco")
        if isinstance(raw, str) and isinstance(syn, str) and raw.strip() and syn.strip():
            text, reason = fake_caption(raw, syn, max_new_tokens)
            out.append({**row, "capsfusion": text, "finish_reason": reason, "status": "ok", "error": None})
        else:
            out.append({**row, "capsfusion": None, "finish_reason": None, "status": "skipped"})
    return out


def without_errors(rows):
    return [{k: v for k, v in r.items() if k != "error"} if r["status"] == "skipped" else r for r in rows]


@pytest.mark.parametrize("out", ["out.jsonl", "out.json", "out.parquet"])
def test_rows_come_back_in_input_order_with_columns_kept(tmp_path, rows, out):
    factory = FakeFactory()
    summary = run_fuse(config(tmp_path, rows, out), fuser_factory=factory)
    got, want = read_all(tmp_path / out), expected(rows)
    if out.endswith(".parquet"):  # one schema for all rows: absent keys are null, a mixed column is JSON text
        columns = list(got[0])
        want = [{c: json.dumps(r[c]) if c == "laion_2b" and isinstance(r.get(c), int) else r.get(c) for c in columns}
                for r in want]
        assert columns[-4:] == ["capsfusion", "finish_reason", "status", "error"]
    assert without_errors(got) == without_errors(want)
    assert summary.complete and summary.rows_total == len(rows) and summary.rows_skipped == 4
    assert factory.made[0].closed
    assert not journal_path(tmp_path / out).exists()
    assert not (tmp_path / f"{out}.partial").exists()


def test_bad_rows_are_skipped_with_reasons(tmp_path, rows):
    run_fuse(config(tmp_path, rows), fuser_factory=FakeFactory())
    reasons = [r["error"] for r in read_all(tmp_path / "out.jsonl") if r["status"] == "skipped"]
    assert reasons == ["missing field 'laion_coco'", "field 'laion_2b' is null",
                       "field 'laion_2b' is not a string (int)", "field 'laion_coco' is empty"]


def test_identical_pairs_are_fused_once(tmp_path, rows):
    factory = FakeFactory()
    summary = run_fuse(config(tmp_path, rows), fuser_factory=factory)
    good = [r for r in rows if r.get("laion_2b") not in (None, 7, "only raw", "x")]
    assert len(factory.seen) == len(good) - 2  # the exact copy and the whitespace variant
    assert summary.rows_fused == len(good) - 2 and summary.rows_reused == 2
    by_id = {r.get("id"): r for r in read_all(tmp_path / "out.jsonl")}
    assert by_id["dupe"]["capsfusion"] == fake_caption(rows[3]["laion_2b"], rows[3]["laion_coco"], 80)[0]


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, rows):
    whole = tmp_path / "whole"
    whole.mkdir()
    run_fuse(config(whole, rows), fuser_factory=FakeFactory())
    reference = read_all(whole / "out.jsonl")

    cfg = config(tmp_path, rows)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 12 and run.request_stop()))
    run.prepare()
    first = run.execute()
    assert not first.complete and not cfg.output.exists() and journal_path(cfg.output).exists()
    journaled = len(journal_path(cfg.output).read_text().splitlines()) - 1
    assert 12 <= journaled < len(rows)

    factory = FakeFactory()
    second = run_fuse(config(tmp_path, rows, resume=True), fuser_factory=factory)
    assert second.complete and second.rows_resumed == journaled
    assert read_all(cfg.output) == reference
    assert len(factory.seen) == 47 - 12  # 47 distinct pairs, 12 journaled: none is fused again
    meta = json.loads(meta_path(cfg.output).read_text())
    assert meta["counts"]["rows_total"] == len(rows) and meta["model"]["sha256"]


def test_torn_journal_from_a_kill_resumes_cleanly(tmp_path, rows):
    cfg = config(tmp_path, rows)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 20 and run.request_stop()))
    run.prepare()
    run.execute()
    jpath = journal_path(cfg.output)
    jpath.write_bytes(jpath.read_bytes()[:-25])  # the last line torn mid-write
    run_fuse(config(tmp_path, rows), fuser_factory=FakeFactory())  # same command, no --resume
    assert without_errors(read_all(cfg.output)) == without_errors(expected(rows))


def test_everything_journaled_skips_loading_the_model(tmp_path, rows, monkeypatch):
    cfg = config(tmp_path, rows)
    run = FuseRun(cfg, fuser_factory=FakeFactory())
    run.prepare()
    monkeypatch.setattr(FuseRun, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # interrupted while writing the output
        run.execute()
    monkeypatch.undo()
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))
    summary = run_fuse(config(tmp_path, rows), fuser_factory=FakeFactory(fail=True))
    assert summary.complete and summary.rows_fused == 0
    assert without_errors(read_all(cfg.output)) == without_errors(expected(rows))


@pytest.mark.parametrize("limit", [None, 23])
def test_shards_merge_into_the_full_result(tmp_path, rows, limit):
    full = tmp_path / "full"
    full.mkdir()
    run_fuse(config(full, rows, limit=limit), fuser_factory=FakeFactory())
    parts = []
    for i in (2, 0, 1):
        part = config(tmp_path, rows, f"part{i}.csv", limit=limit, shard=(i, 3))
        summary = run_fuse(part, fuser_factory=FakeFactory())
        assert summary.rows_total == len(range(i, limit or len(rows), 3))
        parts.append(part.output)
    assert merge_shards(parts, tmp_path / "merged.jsonl") == (limit or len(rows))
    merged = read_all(tmp_path / "merged.jsonl")
    as_csv = [{k: "" if v is None else str(v) for k, v in r.items()} for r in read_all(full / "out.jsonl")]
    assert merged == [{**r, **{k: r.get(k, "") for k in merged[0]}} for r in as_csv]
    meta = json.loads(meta_path(tmp_path / "merged.jsonl").read_text())
    assert meta["selection"]["shard"] is None and meta["counts"]["rows_total"] == (limit or len(rows))
    with pytest.raises(ConfigError, match="missing 0/3"):
        merge_shards(parts[:1] + parts[2:], tmp_path / "m2.jsonl")


def test_limit_and_reusing_a_journal_with_a_new_limit(tmp_path, rows):
    run_fuse(config(tmp_path, rows, limit=5), fuser_factory=FakeFactory())
    assert len(read_all(tmp_path / "out.jsonl")) == 5
    with pytest.raises(OutputExistsError, match="--force"):
        FuseRun(config(tmp_path, rows)).prepare()
    factory = FakeFactory()
    run_fuse(config(tmp_path, rows, force=True), fuser_factory=factory)
    assert len(read_all(tmp_path / "out.jsonl")) == len(rows) and len(factory.seen) > 40


def test_resume_with_other_settings_is_refused(tmp_path, rows):
    cfg = config(tmp_path, rows)
    run = FuseRun(cfg, fuser_factory=FakeFactory(on_result=lambda n: n == 5 and run.request_stop()))
    run.prepare()
    run.execute()
    with pytest.raises(ConfigError, match=r"max_new_tokens: 80 -> 12.*--force"):
        run_fuse(config(tmp_path, rows, max_new_tokens=12), fuser_factory=FakeFactory())
    summary = run_fuse(config(tmp_path, rows, max_new_tokens=12, force=True), fuser_factory=FakeFactory())
    assert summary.length_cut > 0 and summary.rows_resumed == 0


def test_malformed_input_fails_before_the_model_is_touched(tmp_path, rows):
    src = tmp_path / "in.jsonl"
    src.write_text('{"laion_2b": "a", "laion_coco": "b"}\n"just a string"\n')
    cfg = FuseConfig(input=src, output=tmp_path / "out.jsonl", model=MODEL)
    with pytest.raises(InputFileError, match=r"in.jsonl: line 2: expected a JSON object"):
        run_fuse(cfg, fuser_factory=FakeFactory(fail=True))
    assert list(tmp_path.iterdir()) == [src]


def test_config_errors(tmp_path, rows):
    with pytest.raises(ConfigError, match="contradict"):
        config(tmp_path, rows, resume=True, force=True)
    with pytest.raises(ConfigError, match="--slots must be at least 1"):
        config(tmp_path, rows, slots=0)
    with pytest.raises(ConfigError, match="must not be the input"):
        FuseRun(FuseConfig(input=tmp_path / "in.json", output=tmp_path / "in.json", force=True)).prepare()
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


class Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.notes = []

    def note(self, text):
        self.notes.append(text)


def test_an_existing_output_column_is_replaced_with_a_note(tmp_path, sample_rows):
    rows = [dict(r, capsfusion=r["capsfuion_official"]) for r in sample_rows[:5]]
    progress = Recorder()
    summary = run_fuse(config(tmp_path, rows), progress=progress, fuser_factory=FakeFactory())
    assert any("'capsfusion' are replaced" in n for n in progress.notes)
    assert progress.done == summary.rows_total == 5
    assert [r["capsfusion"] for r in read_all(tmp_path / "out.jsonl")] == [r["capsfusion"] for r in expected(sample_rows[:5])]


def test_plain_log_lines_and_summary_table(tmp_path, rows):
    stream = io.StringIO()
    progress = LogProgress(stream, interval=0.0)
    summary = run_fuse(config(tmp_path, rows, limit=10), progress=progress, fuser_factory=FakeFactory())
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fusing: 10 rows" and any("loading" in line for line in lines)
    assert lines[-2].startswith("fusing: 10/10 rows (100.0%), ") and "rows/s" in lines[-2] and "ETA 0:00" in lines[-2]
    console = Console(file=io.StringIO(), width=120)
    print_summary(summary, console)
    table = console.file.getvalue()
    for label in ("fused", "skipped", "truncated prompts", "cut at token limit", "wall time", "throughput", "beams=3"):
        assert label in table
