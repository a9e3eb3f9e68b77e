"""The runner's own logic with a fake engine: order, dedupe, skips, resume, shards, limits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fake_fuser import FakeFactory, NoteRecorder, fake_caption
from markers import needs_pyarrow
from rich.console import Console

from capsfuse_lite.errors import ConfigError, InputFileError, OutputExistsError
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.run.progress import LogProgress, print_summary
from capsfuse_lite.formats import read_all
from capsfuse_lite.run.config import parse_shard
from capsfuse_lite.run.single import FuseConfig, FuseRun, run_fuse
from capsfuse_lite.run.outputs import meta_path
from capsfuse_lite.run.merge import merge_shards

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
    return FuseConfig(input=src, output=tmp_path / out, **{"model": MODEL, **kw})


def interrupted(tmp_path, rows, after: int, out="out.jsonl", **kw) -> FuseRun:
    """A run stopped (as by Ctrl-C) once the engine returned ``after`` results: its journal is left."""
    run = FuseRun(config(tmp_path, rows, out, **kw),
                  fuser_factory=FakeFactory(on_result=lambda n: n == after and run.request_stop()))
    run.prepare()
    run.execute()
    return run


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


@pytest.mark.parametrize("out", ["out.jsonl", "out.json", pytest.param("out.parquet", marks=needs_pyarrow)])
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
    cfg = interrupted(tmp_path, rows, 20).config
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
    interrupted(tmp_path, rows, 5)
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


def test_an_existing_output_column_is_replaced_with_a_note(tmp_path, sample_rows):
    rows = [dict(r, capsfusion=r["capsfuion_official"]) for r in sample_rows[:5]]
    progress = NoteRecorder()
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


# -- data safety (issue 10) ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["status", "error", "finish_reason", "laion_2b", "laion_coco", ""])
def test_output_field_may_not_overwrite_a_column_the_run_writes_or_reads(tmp_path, rows, name):
    with pytest.raises(ConfigError, match="--output-field"):
        config(tmp_path, rows, output_field=name)


def test_reserved_output_field_is_refused_by_the_cli_before_any_work(tmp_path, rows):
    from typer.testing import CliRunner

    from capsfuse_lite.cli import app

    src = write_json(tmp_path / "in.json", rows)
    result = CliRunner().invoke(app, ["fuse", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(MODEL),
                                      "--output-field", "status"])
    assert result.exit_code == 2 and "reserved" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "in.json"] or sorted(
        p.name for p in tmp_path.iterdir()) == ["in.json"]


def test_rows_the_engine_refuses_are_skipped_with_the_reason_and_never_refused_again(tmp_path, sample_rows):
    from fake_fuser import REFUSED

    rows = [dict(r) for r in sample_rows[:8]]
    rows[2]["laion_2b"] = f"text {REFUSED}"
    rows[6] = dict(rows[2], id="copy")  # the same pair: reused from the first, not sent again
    factory = FakeFactory()
    summary = run_fuse(config(tmp_path, rows), fuser_factory=factory)
    got = read_all(tmp_path / "out.jsonl")
    assert [r["status"] for r in got] == ["ok", "ok", "skipped", "ok", "ok", "ok", "skipped", "ok"]
    assert got[2]["error"] == got[6]["error"] == "the tokenizer refused a caption (fake)"
    assert got[2]["capsfusion"] is None and got[2]["finish_reason"] is None
    assert summary.rows_skipped == 2 and summary.rows_fused == 6
    assert sum(REFUSED in raw for raw, _ in factory.seen) == 1
    assert json.loads(meta_path(tmp_path / "out.jsonl").read_text())["counts"]["rows_skipped"] == 2


def test_a_caption_edited_in_place_is_fused_again_on_resume(tmp_path, rows):
    cfg = interrupted(tmp_path, rows, 30).config
    journaled = {json.loads(line)["i"] for line in journal_path(cfg.output).read_text().splitlines()[1:]}
    k = min(journaled)
    old = rows[k]["laion_2b"]
    new = old[::-1] if old[::-1] != old else old.upper()  # same length, same byte size
    assert len(new.encode()) == len(old.encode()) and new != old
    edited = [dict(r) for r in rows]
    edited[k]["laion_2b"] = new
    text = cfg.input.read_text(encoding="utf-8")
    cfg.input.write_text(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1], 1), encoding="utf-8")
    assert len(cfg.input.read_text(encoding="utf-8")) == len(text)

    factory = FakeFactory()
    summary = run_fuse(config(tmp_path, edited), fuser_factory=factory)
    got = read_all(cfg.output)
    assert got[k]["capsfusion"] == fake_caption(new, rows[k]["laion_coco"], 80)[0]
    assert without_errors(got) == without_errors(expected(edited))
    assert (new, rows[k]["laion_coco"]) in factory.seen
    assert summary.rows_resumed == len(journaled) - 1


def test_a_failed_model_load_does_not_block_the_corrected_model(tmp_path, rows):
    from capsfuse_lite.errors import ModelLoadError

    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(MODEL.read_bytes() + b"\0" * 64)  # another file (another sha256), header still valid

    def failing(model_path, **kwargs):
        raise ModelLoadError(f"llama.cpp could not load {model_path}")

    with pytest.raises(ModelLoadError):
        run_fuse(config(tmp_path, rows, model=wrong), fuser_factory=failing)
    assert journal_path(tmp_path / "out.jsonl").exists()  # created, but it holds no rows
    progress = NoteRecorder()
    summary = run_fuse(config(tmp_path, rows), progress=progress, fuser_factory=FakeFactory())
    assert summary.complete and without_errors(read_all(tmp_path / "out.jsonl")) == without_errors(expected(rows))
    assert any("held no rows" in n and "model_sha256" in n for n in progress.notes)


def test_force_is_refused_while_another_run_holds_the_journal(tmp_path, rows):
    from capsfuse_lite.run.journal import Journal

    run = interrupted(tmp_path, rows, 5)
    cfg = run.config
    jpath = journal_path(cfg.output)
    before = jpath.read_bytes()
    holder = Journal.open(jpath, run.fingerprint(MODEL), run.layout.rows)  # a first run still writing
    try:
        for kw in ({"force": True}, {"resume": True}, {}):
            with pytest.raises(ConfigError, match="in use by another capsfuse-lite run"):
                run_fuse(config(tmp_path, rows, **kw), fuser_factory=FakeFactory(fail=True))
        assert jpath.read_bytes() == before  # --force discarded nothing
    finally:
        holder.close()
    summary = run_fuse(config(tmp_path, rows, force=True), fuser_factory=FakeFactory())
    assert summary.complete and summary.rows_resumed == 0


def test_an_output_finished_by_another_run_meanwhile_is_not_overwritten(tmp_path, rows, monkeypatch):
    late = FuseRun(config(tmp_path, rows), fuser_factory=FakeFactory())
    late.prepare()  # checks that the output does not exist yet ...
    run_fuse(config(tmp_path, rows), fuser_factory=FakeFactory())  # ... then another run writes it
    finished = (tmp_path / "out.jsonl").read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        late.execute()
    assert (tmp_path / "out.jsonl").read_bytes() == finished


def test_settings_beyond_the_model_context_are_refused_before_hashing_or_journaling(tmp_path, rows):
    with pytest.raises(ConfigError, match=r"max_new_tokens=100000: .*4096 positions .*at most 3840"):
        run_fuse(config(tmp_path, rows, max_new_tokens=100_000), fuser_factory=FakeFactory(fail=True))
    assert not journal_path(tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "cache" / "sha256").exists()  # the model was not hashed


# -- merge: only parts provably complete, disjoint and ordered --------------------------------------


@pytest.fixture
def shard_parts(tmp_path, rows):
    parts = []
    for i in range(3):
        cfg = config(tmp_path, rows, f"part{i}.jsonl", shard=(i, 3))
        run_fuse(cfg, fuser_factory=FakeFactory())
        parts.append(cfg.output)
    return parts


def test_merge_orders_parts_by_their_meta_whatever_the_argument_order(tmp_path, rows, shard_parts):
    assert merge_shards(shard_parts[::-1], tmp_path / "m.jsonl") == len(rows)
    assert without_errors(read_all(tmp_path / "m.jsonl")) == without_errors(expected(rows))


def test_merge_refuses_parts_without_meta(tmp_path, rows, shard_parts):
    for part in shard_parts:
        meta_path(part).unlink()
    with pytest.raises(InputFileError, match=r"no meta file beside .*part0.jsonl.*which shard"):
        merge_shards(shard_parts, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_merge_refuses_a_repeated_part(tmp_path, rows, shard_parts):
    with pytest.raises(ConfigError, match="given twice"):
        merge_shards(shard_parts + shard_parts[:1], tmp_path / "m.jsonl")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(shard_parts[1].read_bytes())
    meta_path(copy).write_bytes(meta_path(shard_parts[1]).read_bytes())
    with pytest.raises(ConfigError, match="repeated 1/3"):
        merge_shards([shard_parts[0], shard_parts[1], copy], tmp_path / "m.jsonl")


def test_merge_refuses_a_part_that_changed_or_is_short(tmp_path, rows, shard_parts):
    lines = shard_parts[1].read_text().splitlines(keepends=True)
    shard_parts[1].write_text("".join(lines[:-1]))  # a row lost (e.g. a truncated copy)
    with pytest.raises(InputFileError, match=r"part1.jsonl: \d+ rows .*meta file says"):
        merge_shards(shard_parts, tmp_path / "m.jsonl")
    shard_parts[1].write_text("".join(lines))
    meta = json.loads(meta_path(shard_parts[2]).read_text())
    meta["output"]["rows"] -= 1
    meta_path(shard_parts[2]).write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match=r"shard 2/3 of \d+ input rows should hold"):
        merge_shards(shard_parts, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_an_input_edited_during_the_run_is_not_paired_with_stale_results(tmp_path, sample_rows):
    rows = sample_rows[:10]
    cfg = config(tmp_path, rows)
    text = cfg.input.read_text(encoding="utf-8")
    old = rows[0]["laion_2b"]

    def edit(n):  # the engine is past row 0: change its caption in place before the output is built
        if n == 9:
            cfg.input.write_text(text.replace(old, old.upper(), 1), encoding="utf-8")

    with pytest.raises(InputFileError, match=r"row 0 has no journaled result for its current captions"):
        run_fuse(cfg, fuser_factory=FakeFactory(on_result=edit))
    assert not cfg.output.exists() and journal_path(cfg.output).exists()
    summary = run_fuse(config(tmp_path, rows), fuser_factory=FakeFactory())  # rerun: row 0 is fused again
    assert summary.rows_resumed == 9
    assert read_all(cfg.output)[0]["capsfusion"] == fake_caption(old.upper(), rows[0]["laion_coco"], 80)[0]
