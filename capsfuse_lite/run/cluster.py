"""Dataset mode on a Ray cluster: one long-lived worker per GPU, each streaming shards through its model.

    run = RayDatasetRun(DatasetConfig(input="data/", output="/shared/fused", model="/shared/m.gguf"),
                        RayOptions(address="head-node:6379"))
    run.prepare(); run.check_model(); summary = run.execute()

**Workers.** The driver (the ``fuse --ray`` command) finds the shards, checks and hashes the model once,
passes over shards whose complete output exists, and starts :class:`FuseWorker` actors: one per GPU
(``num_gpus=1``), or on a CPU-only cluster one per ``cpus_per_worker`` CPUs (its llama.cpp threads).
Each loads the GGUF once, in its constructor, and runs one engine thread: a
:class:`~capsfuse_lite.run.dataset.ShardStream`, exactly as a single-machine dataset run does, fed with
the shards Ray hands it. Paths (inputs, outputs, model) are absolute and must name the same files on
every node: shared storage.

**Handing out shards.** Ray's ``ActorPool`` holds every worker ``shards_per_worker`` times, so each
worker has the shard it is feeding and the next ones queued in its stream: rows of the next shard fill
the slots while the last rows of the previous one finish (with shards smaller than the slots, a
worker's queue can run dry and its stream drains and starts again). ``fuse_shard(shard)`` returns when
the shard is published (or failed, or cut by a stop) with its :class:`~capsfuse_lite.run.dataset.ShardOutcome`.

**Why Ray core actors, not Ray Data.** The unit of work here is a file with its own journal, lock,
content-keyed resume and atomic publish; that is what makes a rerun skip finished shards and resume cut
ones. Ray Data's unit is a block of rows written by its own datasinks under its own file names, with no
per-file resume when a job is restarted and a failed block redone whole. Using it only as a queue of file
names would add its executor (and pandas) for what an actor pool does directly. Actors give what is
needed: resources per worker (a GPU each), a model loaded once per process, and Ray's fault tolerance.

**Fault tolerance is Ray's.** Workers are created with ``max_restarts`` and their calls with
``max_task_retries``: when a worker process dies (killed, out of memory, its node lost), Ray restarts the
actor (on another node if its node is gone; the model is loaded again) and re-executes the
``fuse_shard`` calls it had in flight. A re-executed call opens its shard's journal again and resumes,
so only the rows that were in the engine are fused again. A worker that died ``max_restarts`` times is
given up, and its shards are reported failed. The driver's loop only hands the next shard to a worker
with a free place, like ``ActorPool.map_unordered``; it never reschedules work itself.

**Exactly once, in input order.** Every row is journaled under its input index (and the hash of its
captions); a shard's output is written by streaming its input again, in order, and taking each row's
journaled result, then renamed into place -- so every input row is in the output once, in order, however
many times a worker died on the way. The journal is locked (``flock``) by the one process fusing the
shard; a re-executed call waits up to ``LOCK_WAIT_S`` for the lock of a process that is gone (on a
network filesystem, the lock of a lost node is released when its lease ends). A shard whose output is
published is skipped by any later call or rerun. If the driver dies, Ray ends its workers with it; the
same command run again skips finished shards and resumes cut ones.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from capsfuse_lite.run.dataset import (DatasetConfig, DatasetRun, DatasetSummary, RowTally, ShardOutcome, ShardStream,
                                       finished_outcome, open_shard)
from capsfuse_lite.run.discovery import Shard
from capsfuse_lite.errors import CapsfuseError, ConfigError, ModelLoadError
from capsfuse_lite.run.progress import Progress
from capsfuse_lite.run.config import fuser_kwargs
from capsfuse_lite.run.single import default_fuser_factory

RAY_INSTALL = "pip install 'capsfuse-lite[ray]' (on this machine and every node)"
MAX_RESTARTS = 16  # restarts of one worker before Ray gives it up
MAX_TASK_RETRIES = 4  # re-executions of one shard's call after its worker died (a shard that kills its worker fails)
LOCK_WAIT_S = 180.0  # how long a worker waits for the journal lock of a process that is gone
POLL_S = 1.0  # how often the driver asks the workers for progress


def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray: {RAY_INSTALL}") from None
    return ray


@dataclass
class RayOptions:
    """How to run on Ray: ``address`` (None: the cluster ``ray start`` made on this machine, or
    RAY_ADDRESS, else a new local one), ``workers`` (default: one per GPU; CPU-only: CPUs /
    ``cpus_per_worker``), ``cpus_per_worker`` (default: 1 beside a GPU; CPU-only: the CPUs of the
    largest node), shards queued per worker, and Ray's restart and retry budgets."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float | None = None
    shards_per_worker: int = 3
    max_restarts: int = MAX_RESTARTS
    max_task_retries: int = MAX_TASK_RETRIES

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ConfigError(f"--ray-cpus-per-worker must be more than 0, got {self.cpus_per_worker}")
        if self.shards_per_worker < 1:
            raise ConfigError("shards_per_worker must be at least 1")

    def command_options(self) -> tuple:
        """These options as `fuse` arguments (for the rerun command)."""
        out: tuple = ("--ray",)
        for flag, value in (("--ray-address", self.address), ("--ray-workers", self.workers),
                            ("--ray-cpus-per-worker", self.cpus_per_worker)):
            if value is not None:
                out += (flag, f"{value:g}" if isinstance(value, float) else str(value))
        return out


class _WorkerNotes(Progress):
    """A worker's progress: counts only; notes (a torn journal cut, a replaced column) are printed to
    the worker's stderr, which Ray shows on the driver's console."""

    def note(self, text: str) -> None:
        print(f"capsfuse-lite: {text}", file=sys.stderr, flush=True)


class WorkerEngine:
    """A worker's engine thread: one :class:`ShardStream` at a time over the shards submitted to it.

    ``submit(shard)`` queues a shard and returns a Future of its :class:`ShardOutcome`. The stream takes
    queued shards as its slots free up; when the queue is empty it lets the rows in the engine finish,
    then waits for the next shard (blocking the stream itself while rows are in flight would stall them).
    """

    def __init__(self, cfg: DatasetConfig, base: dict, model_meta: dict, *,
                 fuser_factory: Callable[..., Any] = default_fuser_factory, lock_wait: float = LOCK_WAIT_S,
                 actor_id: str | None = None):
        self.cfg, self.base, self.model_meta, self.lock_wait = cfg, base, model_meta, lock_wait
        self.actor_id = actor_id  # the Ray actor this engine runs in (None outside Ray)
        self.progress = _WorkerNotes()  # counts rows (the driver shows the progress); notes go to the log
        self.fuser = fuser_factory(Path(cfg.model), **fuser_kwargs(cfg, base))
        self.stream: ShardStream | None = None
        self._queue: collections.deque = collections.deque()
        self._futures: dict[int, tuple[Any, concurrent.futures.Future]] = {}  # id(run) -> (run, its Future)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="capsfuse-engine", daemon=True)
        self._thread.start()

    def submit(self, shard: Shard) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                future.set_result(ShardOutcome(shard.rel, "interrupted"))
            else:
                self._queue.append((shard, future))
                self._cv.notify()
        return future

    def request_stop(self) -> None:
        """Stop after the current decode step: open shards keep their journals, queued ones are not begun."""
        with self._cv:
            self._stop = True
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify()
        for shard, future in queued:
            future.set_result(ShardOutcome(shard.rel, "interrupted"))
        stream = self.stream
        if stream is not None:
            stream.request_stop()

    def stats(self) -> dict:
        """Rows and tokens this process finished; per open shard (path, rows, rows done, rows resumed)."""
        stream = self.stream
        runs = list(stream.open) if stream is not None else []
        return {"pid": os.getpid(), "rows": self.progress.rows, "tokens": self.progress.tokens,
                "open": [(r.label, r.layout.rows, r.summary.rows_resumed + r.rows_counted, r.summary.rows_resumed)
                         for r in runs],
                "live": self._engine_live()}

    def _engine_live(self) -> list[int] | None:
        """The engine's ``(rows in flight, tokens generated)`` now (:meth:`Fuser.live`), or None."""
        live = getattr(self.fuser, "live", None)
        try:
            return list(live()) if live is not None else None
        except Exception:  # noqa: BLE001 - a progress answer must never fail the worker
            return None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
            self.stream = ShardStream(self._next_run, lambda: self.fuser, self._done)
            try:
                self.stream.run()
            except BaseException as exc:  # a full disk, or a bug: the shards this worker holds fail with it
                futures, self._futures = self._futures, {}
                for run, future in futures.values():
                    future.set_result(self._mark(ShardOutcome.failure(run.label, exc)))
            finally:
                self.stream = None

    def _next_run(self):
        while True:
            with self._cv:
                if self._stop or not self._queue:
                    return None
                shard, future = self._queue.popleft()
            try:
                got = open_shard(self.cfg, shard, self.base, self.model_meta, self.progress, lock_wait=self.lock_wait)
            except BaseException as exc:  # a full disk (or a bug): the stream ends, this shard with it
                future.set_result(self._mark(ShardOutcome.failure(shard.rel, exc)))
                raise
            if isinstance(got, ShardOutcome):
                future.set_result(self._mark(got))
                continue
            self._futures[id(got)] = (got, future)
            return got

    def _done(self, run, error: BaseException | None) -> None:
        self._futures.pop(id(run))[1].set_result(self._mark(ShardOutcome.of(run, error)))

    def _mark(self, outcome: ShardOutcome) -> ShardOutcome:
        outcome.worker, outcome.actor = os.getpid(), self.actor_id
        return outcome


class FuseWorker:
    """A Ray actor (see the module docstring): the model, loaded once, and its :class:`WorkerEngine`.

    The constructor never raises for a user's error (a model this node cannot read): ``ready()``
    reports it, so Ray does not restart the worker over and over."""

    def __init__(self, cfg: DatasetConfig, base: dict, model_meta: dict, model_size: int):
        from capsfuse_lite.engine import llama  # noqa: F401  (llama.cpp's libraries before numpy: see capsfuse_lite.engine.llama)

        self.error: str | None = None
        self.engine: WorkerEngine | None = None
        try:
            size = Path(cfg.model).stat().st_size
            if size != model_size:
                raise ModelLoadError(f"{cfg.model} is {size} bytes on this node but {model_size} where the command "
                                     "ran: every node must see the same model file (shared storage)")
            import ray

            self.engine = WorkerEngine(cfg, base, model_meta, actor_id=ray.get_runtime_context().get_actor_id())
        except CapsfuseError as exc:
            self.error = str(exc)
        except OSError as exc:
            self.error = f"cannot read {cfg.model} on this node ({exc.strerror or exc}): the model must be on storage every node sees"

    async def ready(self) -> dict:
        import ray

        engine = self.engine
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "error": self.error,
                "actor": ray.get_runtime_context().get_actor_id(),
                "settings": dict(getattr(engine.fuser, "settings", None) or {}) if engine else {}}

    async def fuse_shard(self, shard: Shard) -> ShardOutcome:
        if self.engine is None:
            return ShardOutcome(shard.rel, "failed", self.error)
        return await asyncio.wrap_future(self.engine.submit(shard))

    async def stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {"pid": os.getpid()}

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.request_stop()


class RayDatasetRun(DatasetRun):
    """A dataset on a Ray cluster (see the module docstring). ``on_ready(infos)`` is called once the
    workers have loaded the model, with each worker's pid and node."""

    lock_wait = LOCK_WAIT_S

    def __init__(self, config: DatasetConfig, options: RayOptions | None = None, *, progress: Progress | None = None,
                 on_ready: Callable[[list[dict]], None] | None = None):
        super().__init__(config, progress=progress)
        self.options = options or RayOptions()
        self.on_ready = on_ready
        self.workers: list = []  # actor handles while the run executes
        self.worker_info: list[dict] = []  # pid, node of each worker once it loaded the model
        self.by_worker: collections.Counter = collections.Counter()  # shards written per worker process

    def prepare(self) -> list[Shard]:
        import_ray()
        shards = super().prepare()
        # Workers run on other nodes, in other folders: every path they get is absolute.
        self.shards = [Shard(s.input.absolute(), s.rel, s.output.absolute(), s.size) for s in shards]
        return self.shards

    def request_stop(self) -> None:
        self._stop = True  # the dispatch loop tells the workers within POLL_S

    def execute(self) -> DatasetSummary:
        ray = import_ray()
        cfg = self.config
        if self.shards is None:
            self.prepare()
        t0 = time.monotonic()
        cfg.model = Path(cfg.model).absolute()
        base = self.fingerprint()
        self.mark_forced()
        summary = self.summary = DatasetSummary(output=cfg.output, shards_total=len(self.shards))
        self.progress.shards_total = len(self.shards)
        self.progress.start(0, 0)
        started = False
        try:  # (the progress display is closed whatever happens from here)
            self._tally = RowTally(self.shards)
            self._sizes = {s.rel: s.size for s in self.shards}
            self._done_rows = self._run_rows = 0  # rows done in the shards with an outcome; of those, by this run
            self._open: dict[int, list] = {}  # worker index -> its open shards (last answer)
            self._tokens_seen: dict[tuple, int] = {}  # (worker index, pid) -> generated tokens
            self._live: dict[tuple, tuple] = {}  # (worker index, pid) -> (rows in flight, tokens generated)
            self._ended: set[str] = set()  # shards with an outcome
            todo = []
            for shard in self.shards:  # complete outputs need no worker (nor a cluster, if all are)
                outcome = finished_outcome(cfg, shard, base)
                if outcome is None:
                    todo.append(shard)
                else:
                    self._record(shard, outcome)
            self._show()
            if todo and not self._stop:
                started = self._connect(ray)
                self._start_workers(ray, len(todo))
                t_fuse = time.monotonic()
                try:
                    self._dispatch(ray, todo)
                finally:
                    summary.fuse_s = time.monotonic() - t_fuse
            else:
                summary.shards_left += len(todo)
        finally:
            for worker in self.workers:
                ray.kill(worker)
            self.workers = []
            if started:
                ray.shutdown()
            self.progress.close()
        summary.wall_s = time.monotonic() - t0
        return summary

    # -- the cluster -------------------------------------------------------------------------------

    def _connect(self, ray) -> bool:
        """Connect to (or start) the cluster; True if this call did (and must shut it down)."""
        if ray.is_initialized():
            return False
        address = self.options.address
        try:
            ray.init(**({"address": address} if address else {}), logging_level=logging.WARNING)
        except ConnectionError as exc:
            auth = ("" if os.environ.get("RAY_AUTH_MODE") else
                    "; if it runs (Ray's token authentication is on by default), copy the head node's ~/.ray/auth_token "
                    "here and set RAY_AUTH_MODE=token")
            raise ConfigError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'}: {exc}; start it with "
                              f"`ray start --head` (and `ray start --address=HEAD:6379` on the other nodes){auth}") from None
        return True

    def _start_workers(self, ray, shards: int) -> None:
        opts, cfg = self.options, self.config
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
        if gpus:
            num_gpus, num_cpus = 1, opts.cpus_per_worker or 1
            workers = opts.workers or gpus
            if workers > gpus:
                raise ConfigError(f"--ray-workers {workers}: the cluster has {gpus} GPU(s), one worker each")
        else:
            node_cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            num_gpus, num_cpus = 0, opts.cpus_per_worker or max(node_cpus or [cpus]) or 1
            workers = opts.workers or max(1, int(cpus // num_cpus))
        if workers * num_cpus > cpus:
            raise ConfigError(f"{workers} Ray workers x {num_cpus:g} CPUs need more than the cluster's {cpus:g} CPUs; "
                              "lower --ray-workers or --ray-cpus-per-worker")
        workers = min(workers, shards)  # no worker without a shard to fuse
        threads = cfg.n_threads or (None if num_gpus else max(1, int(num_cpus)))
        worker_cfg = replace(cfg, n_threads=threads)
        actor = ray.remote(FuseWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=opts.max_restarts,
                                               max_task_retries=opts.max_task_retries)
        size = Path(cfg.model).stat().st_size
        self.progress.note(f"starting {workers} Ray worker(s) ({'1 GPU' if num_gpus else f'{num_cpus:g} CPU(s)'} each), "
                           f"each loading {cfg.model} ...")
        self.workers = [actor.remote(worker_cfg, self.base, self.model_meta, size) for _ in range(workers)]
        try:
            infos = ray.get([w.ready.remote() for w in self.workers])
        except ray.exceptions.RayError as exc:
            raise ModelLoadError(f"a Ray worker failed to start: {_last_line(exc)}") from None
        errors = [info["error"] for info in infos if info["error"]]
        if errors:
            raise ModelLoadError(errors[0])
        self.worker_info = infos
        self._pids = [info["pid"] for info in infos]
        self._pids_seen = set(self._pids)
        self._actors = {info["actor"]: index for index, info in enumerate(infos)}
        self.progress.t0 = time.monotonic()  # rates from here: not the cluster's start nor the model loads
        self.progress.watch(self.live_figures)  # rows in flight and tok/s before the first shard is done
        self.summary.workers = workers
        self.progress.note(f"{workers} Ray worker(s) ready: " + ", ".join(f"pid {i['pid']} on {i['node']}" for i in infos))
        reason = infos[0]["settings"].get("slots_reason")
        if reason:
            self.progress.note(reason)
        if self.on_ready is not None:
            self.on_ready(infos)

    def _dispatch(self, ray, todo: list[Shard]) -> None:
        from ray.util.actor_pool import ActorPool

        pool = ActorPool([w for w in self.workers for _ in range(self.options.shards_per_worker)])
        by_rel = {s.rel: s for s in todo}
        queue = iter(todo)
        submitted: list[Shard] = []
        stats: dict = {}  # stats call ref -> worker index
        lost: list[str] = []
        told_stop = False
        last_poll = 0.0

        def fill() -> None:
            while not self._stop and pool.has_free():
                shard = next(queue, None)
                if shard is None:
                    return
                submitted.append(shard)
                pool.submit(lambda worker, s: worker.fuse_shard.remote(s), shard)

        fill()
        while pool.has_next():
            if self._stop and not told_stop:
                told_stop = True
                for worker in self.workers:
                    worker.stop.remote()
            try:
                outcome = pool.get_next_unordered(timeout=POLL_S)
            except TimeoutError:
                outcome = None
            except ray.exceptions.RayError as exc:  # a worker Ray gave up on: its call is lost
                lost.append(_last_line(exc))
                outcome = None
            if outcome is not None:
                self._record(by_rel.pop(outcome.rel), outcome)
            fill()
            if time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                self._poll(ray, stats)
        reason = lost[-1] if lost else "no result came back"
        for shard in submitted:
            if shard.rel in by_rel:
                self._record(by_rel.pop(shard.rel),
                             ShardOutcome(shard.rel, "failed", f"its Ray worker died and was given up ({reason})"))
        if self._stop:
            self.summary.shards_left += len(by_rel)  # never handed out: the run was stopped
        else:
            for shard in list(by_rel.values()):  # never handed out: every worker was given up
                self._record(by_rel.pop(shard.rel), ShardOutcome(shard.rel, "failed", f"no Ray worker left ({reason})"))
        self._show()

    # -- progress --------------------------------------------------------------------------------

    def _seen_process(self, index: int | None, pid: int | None) -> None:
        """Worker ``index`` answered from process ``pid``: a new process means Ray restarted it."""
        if index is None or pid is None or pid in self._pids_seen:
            return  # (a late answer from a process already replaced is not news)
        self._pids_seen.add(pid)
        self.progress.note(f"Ray worker {index} restarted (process {self._pids[index]} ended, now {pid}); "
                           "its shards resume from their journals")
        self._pids[index] = pid

    def _record(self, shard: Shard, outcome: ShardOutcome) -> None:
        self.summary.add(outcome)
        self._ended.add(shard.rel)
        if outcome.actor is not None:
            self._seen_process(self._actors.get(outcome.actor), outcome.worker)
        if outcome.status == "done":
            self.by_worker[outcome.worker] += 1
        if outcome.status == "failed":
            self.note_failure(shard.rel, outcome)
            self._tally.forget(shard)
        elif outcome.status == "skipped":  # complete before this run
            self._tally.learn(shard, outcome.rows)
            self._done_rows += outcome.rows
        elif outcome.counts:  # done, or begun and cut (its journal keeps the rows): counted as the summary does
            self._tally.learn(shard, outcome.rows)
            this_run = sum(outcome.counts[k] for k in ("rows_fused", "rows_reused", "rows_skipped"))
            self._done_rows += outcome.counts["rows_resumed"] + this_run
            self._run_rows += this_run

    def _poll(self, ray, stats: dict) -> None:
        """Collect the workers' answers to the last progress request, and ask again."""
        ready, _ = ray.wait(list(stats), num_returns=len(stats), timeout=0) if stats else ([], [])
        for ref in ready:
            index = stats.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            pid = answer.get("pid")
            self._seen_process(index, pid)
            self._open[index] = answer.get("open", [])
            self._tokens_seen[(index, pid)] = answer.get("tokens", 0)
            live = answer.get("live")
            if isinstance(live, (list, tuple)) and len(live) == 2:
                self._live[(index, pid)] = (int(live[0]), int(live[1]))
        asked = set(stats.values())
        for index, worker in enumerate(self.workers):
            if index not in asked:
                stats[worker.stats.options(max_task_retries=0).remote()] = index
        self._show()

    def live_figures(self) -> tuple[int, int] | None:
        """The workers' engines together, as of their last answers: ``(rows in flight, tokens
        generated)``, or None before any answer. A restarted worker's old process keeps its tokens but
        has no rows in flight any more."""
        if not self._live:
            return None
        current = {(index, pid) for index, pid in enumerate(self._pids)}
        return (sum(rows for key, (rows, _) in self._live.items() if key in current),
                sum(tokens for _, tokens in self._live.values()))

    def _show(self) -> None:
        """The progress display from the shard outcomes and the workers' last answers."""
        summary, progress = self.summary, self.progress
        opened = {rel: (rows, done, resumed) for answers in self._open.values()
                  for rel, rows, done, resumed in answers if rel not in self._ended}
        done = self._done_rows + sum(d for _, d, _ in opened.values())
        tokens = max(sum(self._tokens_seen.values()), summary.generated_tokens)
        progress.update(done, self._run_rows + sum(d - r for _, d, r in opened.values()), tokens)
        progress.set_total(*self._tally.total(sum(rows for rows, _, _ in opened.values()),
                                              sum(self._sizes.get(rel, 0) for rel in opened)))
        progress.set_shards(summary.shards_done + summary.shards_skipped, summary.shards_total, len(summary.failed))


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
