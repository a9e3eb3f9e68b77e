"""`capsfuse-lite bench` on the tiny fixture model: the report's figures agree with each other.

No timing thresholds here (speed claims live in benchmarks/); these tests check that every rate
is the count over the time it was measured in, ratios come from the figures, memory peaks are
attributed per configuration and the command writes what it says.
"""

from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

from capsfuse_lite.bench import measure as bench
from capsfuse_lite.bench.baselines import HF_BASELINE, LOOP_BASELINE, HFUpstreamBaseline, LlamaLoopBaseline
from capsfuse_lite.bench.measure import ENGINE, BenchOptions, recommend_slots, repeat_to, run_bench, summarize
from capsfuse_lite.cli import app
from capsfuse_lite.errors import ConfigError

MAX_NEW = 4


@pytest.fixture(scope="module")
def pairs(sample_rows):
    return repeat_to([(r["laion_2b"], r["laion_coco"]) for r in sample_rows[:5]], 6)


@pytest.fixture(scope="module")
def report(tiny_gguf_q8, pairs):
    opts = BenchOptions(model=tiny_gguf_q8, pairs=pairs, slots=[1, 2], beams=[1], max_new_tokens=MAX_NEW,
                        baselines=[LOOP_BASELINE], n_threads=2, repeats=2, warmup_rows=1)
    return run_bench(opts)


def test_report_rates_are_counts_over_median_time(report, pairs):
    results = report["results"]
    assert [r["name"] for r in results] == [
        f"cpu {LOOP_BASELINE}", "cpu slots=1 beams=1 cache=on", "cpu slots=2 beams=1 cache=on"]
    for r in results:
        assert r["status"] == "ok" and len(r["runs"]) == 2
        assert all(run["rows"] == len(pairs) for run in r["runs"])
        assert r["elapsed_s"] == pytest.approx(statistics.median(run["elapsed_s"] for run in r["runs"]))
        assert r["rows_per_s"] == pytest.approx(r["rows"] / r["elapsed_s"])
        assert r["generated_tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["elapsed_s"])
        assert r["prompt_tokens_per_s"] == pytest.approx(r["prompt_tokens"] / r["elapsed_s"])
        assert 0 < r["time_to_first_result_s"] <= max(run["elapsed_s"] for run in r["runs"])
        assert 0 < r["generated_tokens"] <= MAX_NEW * len(pairs)
        assert r["peak_rss_mib"] >= r["rss_at_start_mib"] > 0 and r["peak_rss_scope"] == "configuration"
        assert r["warmup_rows"] == 1


def test_engine_passes_per_step_come_from_the_runs(report):
    for r in report["results"][1:]:  # the engine's: weight passes per decode step, medians over runs
        per_run = [run["steps"]["step_passes"] / run["steps"]["steps"] for run in r["runs"]]
        assert r["passes_per_step"] == pytest.approx(statistics.median(per_run)) and r["passes_per_step"] >= 1
    assert "passes_per_step" not in report["results"][0]  # the loop baseline has no steps


def test_every_system_reads_the_same_prompts(report):
    prompt_tokens = {r["prompt_tokens"] for r in report["results"]}
    assert len(prompt_tokens) == 1, "engine and baseline must be given identical prompts"


def test_ratios_come_from_the_figures(report):
    loop, *engine = report["results"]
    assert loop["ratios"] == {}
    for r in engine:
        assert r["ratios"][LOOP_BASELINE] == pytest.approx(r["rows_per_s"] / loop["rows_per_s"])
    rec = report["recommended_slots"]
    assert [(x["device"], x["beams"]) for x in rec] == [("cpu", 1)] and rec[0]["slots"] in (1, 2)
    assert report["settings"]["max_new_tokens"] == MAX_NEW and report["settings"]["rows"] == 6
    json.dumps(report)  # plain JSON all the way down


def _fake(slots, rate, status="ok", beams=1, cache=True, device="cpu"):
    return {"system": ENGINE, "device": device, "slots": slots, "beams": beams, "prefix_cache": cache,
            "status": status, "rows_per_s": rate, "error": "out of memory"}


def test_recommend_slots_picks_where_throughput_stops_rising():
    rising_then_flat = [_fake(1, 1.0), _fake(4, 3.0), _fake(8, 4.0), _fake(16, 4.1), _fake(32, 3.9)]
    (rec,) = recommend_slots(rising_then_flat)
    assert rec["slots"] == 8 and "less than 5%" in rec["reason"]
    dip_then_rise = [_fake(1, 8.3), _fake(4, 8.2), _fake(8, 12.8), _fake(16, 16.4)]  # CPU kernels
    (rec,) = recommend_slots(dip_then_rise)
    assert rec["slots"] == 16 and "try more slots" in rec["reason"]
    oom = [_fake(1, 1.0), _fake(8, 4.0), _fake(16, 0.0, status="failed"), _fake(32, 9.0)]
    (rec,) = recommend_slots(oom)
    assert rec["slots"] == 8 and "failed" in rec["reason"]
    cache_off_ignored = [_fake(1, 1.0), _fake(8, 2.0), _fake(8, 9.0, cache=False)]
    assert recommend_slots(cache_off_ignored)[0]["slots"] == 8
    per_beams = recommend_slots([_fake(1, 1.0), _fake(4, 2.0), _fake(1, 0.5, beams=3), _fake(4, 0.51, beams=3)])
    assert [(r["beams"], r["slots"]) for r in per_beams] == [(1, 4), (3, 1)]


def test_summarize_takes_medians():
    runs = [bench.RunFigures(2.0, 0.5, 10, 100, 40), bench.RunFigures(4.0, 0.7, 10, 100, 40),
            bench.RunFigures(3.0, 0.6, 10, 100, 40)]
    s = summarize(runs)
    assert s["elapsed_s"] == 3.0 and s["rows_per_s"] == pytest.approx(10 / 3)
    assert s["time_to_first_result_s"] == 0.6


def test_options_are_checked(tiny_gguf_q8, pairs):
    with pytest.raises(ConfigError, match="at least 2"):
        BenchOptions(model=tiny_gguf_q8, pairs=pairs, repeats=1).validate()
    with pytest.raises(ConfigError, match="--hf-checkpoint"):
        BenchOptions(model=tiny_gguf_q8, pairs=pairs, baselines=[HF_BASELINE]).validate()
    with pytest.raises(ConfigError, match="--slots"):
        BenchOptions(model=tiny_gguf_q8, pairs=pairs, slots=[0]).validate()


def test_hf_upstream_and_loop_see_the_same_rows(tiny_llama_dir, tiny_gguf_f32, pairs):
    hf = HFUpstreamBaseline(tiny_llama_dir, max_new_tokens=3, n_threads=2, dtype="float32")
    loop = LlamaLoopBaseline(tiny_gguf_f32, max_new_tokens=3, n_threads=2)
    try:
        hf.load()
        loop.load()
        hf_rows, loop_rows = list(hf.run(pairs[:5])), list(loop.run(pairs[:5]))  # 5 = a full and a partial batch
    finally:
        hf.close()
        loop.close()
    assert [r.prompt_tokens for r in hf_rows] == [r.prompt_tokens for r in loop_rows]
    assert all(1 <= r.generated_tokens <= 3 for r in hf_rows + loop_rows)
    d = hf.describe()
    assert (d["batch_size"], d["pad_to"], d["num_beams"]) == (4, 256, 3)


def test_bench_command_writes_report_and_refuses_to_overwrite(tiny_gguf_q8, tmp_path):
    out = tmp_path / "report.json"
    args = ["bench", "-m", str(tiny_gguf_q8), "--rows", "3", "--slots", "2", "--beams", "1",
            "--max-new-tokens", "2", "--baselines", "none", "--device", "cpu", "--threads", "2",
            "--warmup-rows", "1", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["cpu slots=2 beams=1 cache=on"]
    assert "slots=2" in result.output and "passes/step" in result.output
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not out.with_suffix(".png").exists()
    else:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


def test_input_file_rows_are_repeated(tmp_path):
    src = tmp_path / "captions.jsonl"
    src.write_text('{"laion_2b": "a", "laion_coco": "b"}\n{"laion_2b": "c"}\n{"laion_2b": "d", "laion_coco": "e"}\n')
    assert repeat_to(bench.load_pairs(src), 5) == [("a", "b"), ("d", "e"), ("a", "b"), ("d", "e"), ("a", "b")]


def _busy_report(loads: dict[str, float | None], cpus: int = 2) -> dict:
    """A report of three configurations whose passes saw the given foreign CPU load (cores)."""
    results = []
    for name, load in loads.items():
        engine = name.startswith("cpu slots")
        results.append({"name": name, "system": ENGINE if engine else LOOP_BASELINE, "status": "ok", "device": "cpu",
                        "slots": int(name.split("slots=")[1].split()[0]) if engine else 1, "beams": 1, "prefix_cache": True,
                        "rows_per_s": 1.5 if engine else 1.0, "generated_tokens_per_s": 9.0, "prompt_tokens_per_s": 90.0,
                        "time_to_first_result_s": 0.5, "peak_rss_mib": 100.0, "ratios": {},
                        "runs": [{"foreign_cpu_load": 0.01}, {"foreign_cpu_load": load}], "foreign_cpu_load": 0.02})
    return {"results": results, "machine": {"logical_cpus": cpus}, "model": {"path": "m.gguf", "quant": "q8_0"},
            "settings": {"rows": 6, "max_new_tokens": 4, "n_threads": 2, "repeats": 2}}


def test_foreign_load_marks_the_disturbed_configurations_and_warns():
    report = _busy_report({f"cpu {LOOP_BASELINE}": 0.05, "cpu slots=1 beams=1 cache=on": 0.97, "cpu slots=2 beams=1 cache=on": None})
    warning = bench.mark_foreign_load(report)
    assert [r["foreign_load_disturbed"] for r in report["results"]] == [False, True, False]
    assert warning.startswith("other processes kept up to 0.97 of 2 cores busy during 1 of 3 configurations (marked *")
    quiet = _busy_report({f"cpu {LOOP_BASELINE}": 0.1, "cpu slots=1 beams=1 cache=on": 0.2})
    assert bench.mark_foreign_load(quiet) is None
    # on a 16-core host a quarter of a core is noise: the limit is 5 % of the machine there
    assert bench.mark_foreign_load(_busy_report({"cpu slots=1 beams=1 cache=on": 0.5}, cpus=16)) is None
    assert bench.mark_foreign_load(_busy_report({"cpu slots=1 beams=1 cache=on": 0.9}, cpus=16)) is not None


def test_the_table_and_the_plot_mark_disturbed_figures():
    from rich.console import Console

    from capsfuse_lite.cli.bench import print_report_table

    report = _busy_report({f"cpu {LOOP_BASELINE}": 1.1, "cpu slots=1 beams=1 cache=on": 0.0, "cpu slots=2 beams=1 cache=on": 0.0})
    report["foreign_load_warning"] = bench.mark_foreign_load(report)
    console = Console(record=True, width=300)
    print_report_table(report, console)
    lines = console.export_text().splitlines()
    assert any(f"cpu {LOOP_BASELINE} *" in line for line in lines)
    assert not any("slots=1 beams=1 cache=on *" in line for line in lines)
    assert any("* measured while other processes kept cores busy" in line for line in lines)
    layout = bench.plot_layout(report)
    assert layout["baselines"] == [(f"cpu {LOOP_BASELINE}: 1.00 rows/s *", 1.0)]  # baselines labelled with their figure
    assert list(layout["series"]) == ["cpu beams=1 cache=on"] and layout["series"]["cpu beams=1 cache=on"] == [(1, 1.5), (2, 1.5)]
    assert layout["y_top"] >= 1.5 and "* measured while other processes" in layout["title"]


def test_bench_command_warns_on_screen_when_other_processes_were_busy(tiny_gguf_q8, tmp_path, monkeypatch):
    class Busy:  # the meter as on a machine where another process kept one core busy
        foreign_load = 1.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(bench, "CpuLoadMeter", Busy)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["bench", "-m", str(tiny_gguf_q8), "--rows", "2", "--slots", "2", "--beams", "1",
                                      "--max-new-tokens", "2", "--baselines", "none", "--device", "cpu", "--threads", "1",
                                      "--warmup-rows", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: other processes kept up to 1.00 of" in result.output and "cpu slots=2 beams=1 cache=on *" in result.output
    data = json.loads(out.read_text())
    assert data["results"][0]["foreign_load_disturbed"] is True and data["foreign_load_warning"]
