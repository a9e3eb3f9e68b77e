"""No caption stops a run: adversarial captions through the real engine (tiny GGUF), end to end.

Every row must come out either fused (``status: ok``) or skipped with a reason, the output file
must be written in every format, and the journal (interrupted and resumed) must hold such rows
safely. Row-level failures that used to crash a run (a lone surrogate, valid in JSON, raised
UnicodeEncodeError while hashing the pair, and every ``--resume`` crashed again at the same row)
are covered here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from markers import needs_pyarrow
from typer.testing import CliRunner

from capsfuse_lite.cli import app
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.run.progress import Progress
from capsfuse_lite.formats import read_all
from capsfuse_lite.run.single import FuseConfig, FuseRun, run_fuse

SYNTHETIC = "a photo of a red bicycle leaning against a wall"
# Caption text -> what must happen to a row carrying it: "ok" (fused) or the start of the skip reason.
ADVERSARIAL = {
    "lone high surrogate \ud800 in text": "field {field!r} is not valid Unicode text (a lone surrogate U+D800",
    "\udfff": "field {field!r} is not valid Unicode text (a lone surrogate U+DFFF",
    "nul \x00 inside": "ok",
    "x" * 100_000: "ok",
    "long words " * 10_000: "ok",
    " \t\n\r\u3000 ": "field {field!r} is empty",
    "control \x01\x02\x1b[31m\x7f\x85 chars": "ok",
    "</s>": "ok",
    "<s> [PAD] <unk> </s> [PAD]": "ok",
    "مرحبا بالعالم — ‏שלום‎": "ok",
    "\u202eevil\u202c override": "ok",
    "emoji 😀👍🏽🏳️‍🌈": "ok",
    "combining e\u0301\u0308\u0323 a\u20dd": "ok",
    "\ufeff\ufffe\uffff noncharacters \U0010ffff": "ok",
}


def adversarial_rows() -> list[dict]:
    rows = []
    for k, text in enumerate(ADVERSARIAL):
        rows.append({"id": f"raw{k}", "laion_2b": text, "laion_coco": SYNTHETIC})
        rows.append({"id": f"syn{k}", "laion_2b": "vintage bike", "laion_coco": text})
    rows.append({"id": "both", "laion_2b": "\udfff", "laion_coco": "lone high surrogate \ud800 in text"})
    rows.append({"id": "odd column \ud800", "laion_2b": "plain raw caption", "laion_coco": SYNTHETIC, "extra": ["\udc80"]})
    return rows


def expected_outcome(row: dict) -> str:
    for field in ("laion_2b", "laion_coco"):
        outcome = ADVERSARIAL.get(row[field])
        if outcome not in (None, "ok"):
            return outcome.format(field=field)
    return "ok"


def write_json(path: Path, rows: list[dict]) -> Path:
    # ensure_ascii keeps lone surrogates as \ud800 escapes: valid JSON that Python reads back as is
    path.write_text(json.dumps(rows, ensure_ascii=True), encoding="ascii")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


def check_rows(got: list[dict], rows: list[dict]) -> None:
    assert len(got) == len(rows)
    for out, row in zip(got, rows):
        want = expected_outcome(row)
        if want == "ok":
            assert out["status"] == "ok" and out["error"] in (None, ""), (row["id"], out["error"])
            assert out["finish_reason"] in ("eos", "length") and isinstance(out["capsfusion"], str)
        else:
            assert out["status"] == "skipped" and out["error"].startswith(want), (row["id"], out["error"])
            assert out["capsfusion"] in (None, "") and out["finish_reason"] in (None, "")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", pytest.param("parquet", marks=needs_pyarrow)])
def test_adversarial_captions_are_fused_or_skipped_never_fatal(tmp_path, tiny_gguf_q8, fmt):
    rows = adversarial_rows()
    src = write_json(tmp_path / "in.json", rows)
    out = tmp_path / f"out.{fmt}"
    cfg = FuseConfig(input=src, output=out, model=tiny_gguf_q8, slots=6, beams=1, max_new_tokens=3, n_threads=1)
    summary = run_fuse(cfg)
    assert summary.complete and summary.rows_total == len(rows)
    assert summary.rows_skipped == sum(expected_outcome(r) != "ok" for r in rows)
    got = read_all(out)
    check_rows(got, rows)
    # Text UTF-8 cannot hold is written as U+FFFD; the other columns come through unchanged.
    assert got[-1]["id"] == "odd column \ufffd" and got[0]["id"] == "raw0"
    if fmt in ("json", "jsonl"):
        assert got[-1]["extra"] == ["\ufffd"]
        assert [r["laion_2b"] for r in got[4:8]] == [r["laion_2b"] for r in rows[4:8]]  # NUL, 100k chars intact
    assert not journal_path(out).exists()


def test_cli_run_with_adversarial_rows_exits_0_and_resumes_through_them(tmp_path, tiny_gguf_q8):
    rows = adversarial_rows()
    src = write_json(tmp_path / "in.jsonl", [])
    src.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows), encoding="ascii")
    out = tmp_path / "out.jsonl"
    args = ["fuse", src, "-o", out, "--model", tiny_gguf_q8, "--beams", "1", "--max-new-tokens", "3",
            "--threads", "1", "--slots", "2", "--quiet"]
    # An interrupted run first: the journal then holds skipped and fused rows of this input.
    cfg = FuseConfig(input=src, output=out, model=tiny_gguf_q8, slots=2, beams=1, max_new_tokens=3, n_threads=1)

    class StopHalfway(Progress):
        def advance(self, rows, tokens=0):
            super().advance(rows, tokens)
            if self.done >= len(rows_) // 2:
                run.request_stop()

    rows_ = rows
    run = FuseRun(cfg, progress=StopHalfway())
    run.prepare()
    first = run.execute()
    assert not first.complete and journal_path(out).exists()
    journaled = [json.loads(line) for line in journal_path(out).read_text(encoding="utf-8").split("\n")[:-1][1:]]
    assert len(journaled) >= 8
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--resume"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    check_rows(read_all(out), rows)


def test_prompts_skips_the_rows_fuse_skips(tmp_path, tiny_gguf_q8):
    rows = adversarial_rows()
    src = write_json(tmp_path / "in.json", rows)
    out = tmp_path / "prompts.jsonl"
    result = CliRunner().invoke(app, ["prompts", str(src), "-o", str(out), "--model", str(tiny_gguf_q8)])
    assert result.exit_code == 0, (result.output, result.exception)
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["row"] for r in got] == list(range(len(rows)))
    for record, row in zip(got, rows):
        want = expected_outcome(row)
        if want == "ok":
            assert record["n_tokens"] <= 256 and record["token_ids"][0] == 1
        else:
            assert record["skipped"].startswith(want)


def test_the_pair_key_is_defined_for_any_text():
    from capsfuse_lite.run.rows import pair_key

    assert pair_key(" \ud800 ", "x") == pair_key("\ud800", "x") != pair_key("\udfff", "x")
