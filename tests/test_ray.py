"""Dataset mode on Ray (capsfuse_lite.run.cluster), on a local Ray cluster this module starts once (2 CPUs):
two workers of one CPU and one llama.cpp thread each, the tiny model, tiny shards.

The single-process reference is a dataset run without Ray on the same shards. Outputs are compared
byte for byte at --slots 1 (a row is then decoded alone, whatever the schedule; see test_fuse_cli's
module docstring), greedy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from fake_fuser import FakeFactory, NoteRecorder
from typer.testing import CliRunner

from capsfuse_lite.cli import app
from capsfuse_lite.run import cluster as cluster_module
from capsfuse_lite.run.cluster import RayDatasetRun, RayOptions, WorkerEngine
from capsfuse_lite.run.dataset import DatasetConfig, DatasetRun
from capsfuse_lite.errors import ConfigError, DiskSpaceError
from capsfuse_lite.formats import read_all
from capsfuse_lite.run.outputs import meta_path

SETTINGS = dict(max_new_tokens=8, n_threads=1, beams=1, slots=1)
FLAGS = ("--max-new-tokens", "8", "--threads", "1", "--beams", "1", "--slots", "1")
TWO_WORKERS = RayOptions(workers=2, cpus_per_worker=1)
SHARDS = [f"part-{k}.jsonl" for k in range(6)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module; its address (for drivers in other processes)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_rows, tiny_gguf_f32):
    """Six shards of 16 distinct rows, and the single-process dataset run's output of them."""
    root = tmp_path_factory.mktemp("ray")
    data = root / "data"
    data.mkdir()
    for k, name in enumerate(SHARDS):
        rows = [dict(r, laion_2b=f"{r['laion_2b']} ({k}.{j})", n=j) for j, r in enumerate(sample_rows[k * 7:][:16])]
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPSFUSE_LITE_CACHE", str(root / "cache"))
        run = DatasetRun(DatasetConfig(input=data, output=root / "single", model=tiny_gguf_f32, **SETTINGS))
        run.prepare()
        assert run.execute().complete
    return data, {name: read_all(root / "single" / name) for name in SHARDS}


def ray_run(data: Path, out: Path, model: Path, progress=None, on_ready=None, options=TWO_WORKERS):
    run = RayDatasetRun(DatasetConfig(input=data, output=out, model=model, **SETTINGS), options, progress=progress,
                        on_ready=on_ready)
    run.prepare()
    run.check_model()
    return run, run.execute()


def assert_same_as_single_process(out: Path, reference: dict) -> None:
    for name, rows in reference.items():
        assert read_all(out / name) == rows, name  # every row once, in input order, same captions
    assert not list(out.glob("*.journal.jsonl")) and not list(out.glob("*.partial"))


def test_six_shards_over_two_workers_equal_a_single_process_run(cluster, dataset, tiny_gguf_f32, tmp_path):
    data, reference = dataset
    ready = []
    run, summary = ray_run(data, tmp_path / "out", tiny_gguf_f32, on_ready=ready.extend)
    assert summary.complete and summary.shards_done == 6 and summary.workers == 2 and not summary.failed
    assert_same_as_single_process(tmp_path / "out", reference)
    pids = {info["pid"] for info in ready}
    assert len(pids) == 2 and set(run.by_worker) == pids  # both workers fused shards
    assert all(info["settings"]["n_threads"] == 1 and info["settings"]["slots"] == 1 for info in ready)
    assert run.progress.live == run.live_figures  # the display follows the workers' engines

    ready.clear()  # a rerun finds every shard complete: no worker is started
    run, summary = ray_run(data, tmp_path / "out", tiny_gguf_f32, on_ready=ready.extend)
    assert summary.complete and summary.shards_skipped == 6 and not ready


def test_a_killed_worker_costs_only_its_in_flight_rows(cluster, dataset, tiny_gguf_f32, tmp_path):
    """SIGKILL one worker process once its current shard has journaled rows: Ray restarts the actor
    and re-executes its calls, which resume from the journals; every row ends up once, in order."""
    data, reference = dataset
    killed = {}

    def kill_when_mid_shard(infos):
        def watch():
            worker, pid = run.workers[0], infos[0]["pid"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stats = ray.get(worker.stats.remote())
                cut = [(rel, done) for rel, rows, done, _ in stats.get("open", []) if 3 <= done < rows]
                if cut:
                    os.kill(pid, signal.SIGKILL)
                    killed.update(rel=cut[0][0], done=cut[0][1])
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()

    progress = NoteRecorder()
    run = RayDatasetRun(DatasetConfig(input=data, output=tmp_path / "out", model=tiny_gguf_f32, **SETTINGS),
                        TWO_WORKERS, progress=progress, on_ready=kill_when_mid_shard)
    run.prepare()
    run.check_model()
    summary = run.execute()
    assert killed, "the worker was not caught mid-shard"
    assert summary.complete and summary.shards_done == 6 and not summary.failed
    assert_same_as_single_process(tmp_path / "out", reference)
    counts = json.loads(meta_path(tmp_path / "out" / killed["rel"]).read_text())["counts"]
    assert counts["rows_resumed"] >= killed["done"]  # its journaled rows were not fused again
    assert any("Ray worker 0 restarted" in note for note in progress.notes)


def test_a_killed_job_then_the_same_command_resumes(cluster, dataset, tiny_gguf_f32, tmp_path):
    """kill -9 the `fuse --ray` command and its workers at once (the whole job lost mid-run), then run
    the same command again: finished shards are skipped, cut ones resume from their journals."""
    data, reference = dataset
    out = tmp_path / "out"
    args = ["fuse", data, "-o", out, "--model", tiny_gguf_f32, *FLAGS, "--quiet", "--ray", "--ray-address", cluster,
            "--ray-workers", "2", "--ray-cpus-per-worker", "1"]
    env = dict(os.environ, CAPSFUSE_LITE_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "capsfuse_lite", *map(str, args)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 180

    def done(name: str) -> bool:  # written with its meta file (an output without one is continued from its journal)
        return (out / name).exists() and (out / f"{name}.meta.json").exists()

    def mid_run() -> bool:  # a shard published and another one cut (journaled rows, not published)
        published = {name for name in SHARDS if done(name)}
        return bool(published) and any(p.read_bytes().count(b"\n") > 2 for p in out.glob("*.journal.jsonl")
                                       if p.name[: -len(".journal.jsonl")] not in published)

    workers: list[int] = []
    while True:
        assert driver.poll() is None, f"the run ended before it could be killed: {log.read_text()}"
        assert time.monotonic() < deadline, "the run did not get going"
        workers = workers or [int(pid) for pid in re.findall(r"pid (\d+) on ", log.read_text())]  # once ready
        if len(workers) == 2 and out.exists() and mid_run():
            for pid in workers:  # frozen: nothing is journaled or published after this point
                os.kill(pid, signal.SIGSTOP)
            if mid_run():
                break
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    for pid in workers:  # with their owner gone, Ray retries none of their calls
        os.kill(pid, signal.SIGKILL)
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    published = [name for name in SHARDS if done(name)]
    journaled = sum(p.read_bytes().count(b"\n") - 1 for p in out.glob("*.journal.jsonl")
                    if p.name[: -len(".journal.jsonl")] not in published)  # (killed between publishing and cleaning up)

    run, summary = ray_run(data, out, tiny_gguf_f32)  # the same job, again
    assert summary.complete and not summary.failed
    assert summary.shards_skipped >= len(published) >= 1 and summary.rows_resumed >= journaled > 0
    assert_same_as_single_process(out, reference)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].startswith("Z")
    except FileNotFoundError:
        return False


def test_a_malformed_shard_fails_alone_and_exits_2(cluster, dataset, tiny_gguf_f32, tmp_path):
    data, reference = dataset
    mixed = tmp_path / "data"
    mixed.mkdir()
    for name in SHARDS[:3]:
        shutil.copy(data / name, mixed / name)
    (mixed / "broken.jsonl").write_text('{"laion_2b": "a", "laion_coco": "b"}\n{"laion_2b": \n')
    result = CliRunner().invoke(app, [str(a) for a in ("fuse", mixed, "-o", tmp_path / "out", "--model", tiny_gguf_f32,
                                                       *FLAGS, "--ray", "--ray-workers", "2",
                                                       "--ray-cpus-per-worker", "1")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 of 4 shards failed (the others are complete); fix them and rerun the same command:"]
    assert f"  broken.jsonl: {mixed / 'broken.jsonl'}: line 2: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
    for name in SHARDS[:3]:
        assert read_all(tmp_path / "out" / name) == reference[name]
    assert not (tmp_path / "out" / "broken.jsonl").exists()


def test_workers_that_do_not_fit_the_cluster_are_refused(cluster, dataset, tiny_gguf_f32, tmp_path):
    data, _ = dataset
    with pytest.raises(ConfigError, match=r"3 Ray workers x 1 CPUs need more than the cluster's 2 CPUs"):
        ray_run(data, tmp_path / "out", tiny_gguf_f32, options=RayOptions(workers=3, cpus_per_worker=1))
    assert not list((tmp_path / "out").glob("*.jsonl"))


# -- a worker's engine thread, without Ray (fake engine) -----------------------------------------------


def test_worker_engine_answers_every_shard_even_when_its_engine_fails(tmp_path, sample_rows, monkeypatch):
    """Every shard submitted to a worker gets an outcome: done, failed alone (malformed), or failed
    with the error that ended the worker's stream (a full disk) -- never a call left waiting."""
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        (data / f"s{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_rows[5 * k: 5 * k + 5]))
    (data / "s3.jsonl").write_text("{not json\n")
    model = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"
    run = DatasetRun(DatasetConfig(input=data, output=tmp_path / "out", model=model, slots=4))
    shards = run.prepare()
    engine = WorkerEngine(run.config, run.fingerprint(), run.model_meta, fuser_factory=FakeFactory(), lock_wait=0)
    outcomes = [future.result(timeout=60) for future in [engine.submit(s) for s in shards]]
    assert [(o.rel, o.status) for o in outcomes] == [("s0.jsonl", "done"), ("s1.jsonl", "done"), ("s2.jsonl", "done"),
                                                    ("s3.jsonl", "failed")]
    assert "line 1: invalid JSON" in outcomes[3].error and all(o.worker == os.getpid() for o in outcomes)
    assert len(read_all(tmp_path / "out" / "s1.jsonl")) == 5 and engine.stats()["rows"] == 15

    def disk_full(*args, **kwargs):
        raise DiskSpaceError("disk full while writing out/s0.jsonl.journal.jsonl; free some space")

    monkeypatch.setattr(cluster_module, "open_shard", disk_full)
    again = DatasetRun(DatasetConfig(input=data, output=tmp_path / "out2", model=model, slots=4)).prepare()
    outcome = engine.submit(again[0]).result(timeout=60)
    assert outcome.status == "failed" and outcome.error.startswith("disk full")
    engine.request_stop()
    assert engine.submit(again[1]).result(timeout=60).status == "interrupted"


def test_live_figures_before_the_first_shard_is_done(tmp_path, sample_rows):
    """Workers answer progress polls with their engine's live figures (rows in flight, tokens so far);
    the driver's display sums them, so a Ray run shows tok/s from the first poll, not 0 rows/s until a
    whole shard is published. A restarted worker's old process keeps its tokens, not its rows."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "s0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:3]))
    model = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"
    run = DatasetRun(DatasetConfig(input=data, output=tmp_path / "out", model=model, slots=4))
    run.prepare()

    class LiveFactory(FakeFactory):
        def __call__(self, model_path, **kwargs):
            fuser = super().__call__(model_path, **kwargs)
            fuser.live = lambda: (3, 41)
            return fuser

    engine = WorkerEngine(run.config, run.fingerprint(), run.model_meta, fuser_factory=LiveFactory(), lock_wait=0)
    assert engine.stats()["live"] == [3, 41]
    engine.request_stop()
    plain = WorkerEngine(run.config, run.fingerprint(), run.model_meta, fuser_factory=FakeFactory(), lock_wait=0)
    assert plain.stats()["live"] is None  # an engine without live figures: the display keeps rows/s
    plain.request_stop()

    driver = RayDatasetRun(DatasetConfig(input=data, output=tmp_path / "out", model=model), TWO_WORKERS)
    driver._live, driver._pids = {}, [100, 200]
    assert driver.live_figures() is None
    driver._live = {(0, 100): (3, 41), (1, 200): (2, 10)}
    assert driver.live_figures() == (5, 51)
    driver._pids = [100, 300]  # worker 1 restarted: its old process's rows are gone, its tokens were made
    driver._live[(1, 300)] = (1, 4)
    assert driver.live_figures() == (4, 55)


def test_an_interrupted_ray_run_shows_the_rows_its_summary_counts(tmp_path, sample_rows):
    """Ctrl-C on a Ray run: the shards it began and did not finish keep their journaled rows in the
    bar's count, as in the summary (and as a single-machine dataset run does): one set of counts."""
    from capsfuse_lite.run.dataset import DatasetSummary, RowTally, ShardOutcome

    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        (data / f"s{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_rows[4 * k: 4 * k + 4]))
    model = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"
    progress = NoteRecorder()
    run = RayDatasetRun(DatasetConfig(input=data, output=tmp_path / "out", model=model), TWO_WORKERS, progress=progress)
    shards = run.prepare()
    run.summary = DatasetSummary(output=run.config.output, shards_total=3)
    run._tally, run._sizes = RowTally(shards), {s.rel: s.size for s in shards}
    run._done_rows = run._run_rows = 0
    run._open, run._tokens_seen, run._live, run._ended, run._pids = {}, {}, {}, set(), []

    def counts(resumed, fused):
        return {"rows_total": 4, "rows_resumed": resumed, "rows_fused": fused, "rows_reused": 0, "rows_skipped": 0,
                "truncated_prompts": 0, "length_cut": 0, "prompt_tokens": 0, "generated_tokens": 3 * fused,
                "skipped_reasons": {}}

    run._record(shards[0], ShardOutcome("s0.jsonl", "skipped", rows=4))
    run._record(shards[1], ShardOutcome("s1.jsonl", "done", rows=4, counts=counts(1, 3)))
    run._record(shards[2], ShardOutcome("s2.jsonl", "interrupted", rows=4, counts=counts(0, 2)))
    run._show()
    summary = run.summary
    assert summary.rows_done == 4 + 4 + 2 and summary.rows_this_run == 3 + 2
    assert (progress.done, progress.rows) == (summary.rows_done, summary.rows_this_run)
