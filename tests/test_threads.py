"""llama.cpp threads follow the cores other processes leave (capsfuse_lite.machine.ThreadGovernor):
on a shared CPU, more threads than free cores stall every barrier of a decode."""

from __future__ import annotations

from capsfuse_lite import Fuser
from capsfuse_lite.machine import ThreadGovernor


def samples(*points):
    """A fake (seconds, machine busy CPU s, own CPU s) reader returning ``points`` in turn."""
    it = iter(points)
    return lambda: next(it)


def test_governor_follows_the_free_cores_after_each_interval():
    gov = ThreadGovernor(2, cores=2, interval=2.0, sample=samples(
        (0.0, 100.0, 10.0),
        (1.0, 102.0, 11.0),  # too soon: nothing measured
        (2.0, 104.0, 11.6),  # others: 4 - 1.6 CPU s in 2 s = 1.2 cores -> 0.8 free -> 1 thread
        (4.0, 107.8, 12.5),  # others 1.45 cores -> still 1: no change
        (6.0, 110.0, 14.3),  # others 0.2 cores -> 2 threads again
        (8.0, 110.0, 14.3),  # a quiet machine, this run idle: 2 threads, unchanged
    ))
    assert [gov.poll() for _ in range(5)] == [None, 1, None, 2, None]
    assert gov.threads == 2


def test_governor_never_exceeds_its_threads_or_goes_below_one():
    gov = ThreadGovernor(3, cores=8, interval=1.0, sample=samples((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (2.0, 9.0, 0.0)))
    assert gov.poll() is None  # 8 free cores, but at most 3 threads: unchanged
    assert gov.poll() == 1  # 9 cores busy elsewhere (of 8): at least one thread


class _Fixed:
    def __init__(self, threads):
        self.threads = threads

    def poll(self):
        return self.threads


def test_the_scheduler_applies_the_governors_count(tiny_gguf_q8, sample_rows):
    pairs = [(r["laion_2b"], r["laion_coco"]) for r in sample_rows[:3]]
    with Fuser(tiny_gguf_q8, slots=2, beams=1, max_new_tokens=3) as fuser:  # threads left to the default
        assert fuser.settings["threads_follow_load"] is True
        fuser._scheduler.governor = _Fixed(1)
        list(fuser.fuse(pairs))
        assert fuser._ctx.n_threads == 1
    with Fuser(tiny_gguf_q8, slots=2, beams=1, max_new_tokens=3, n_threads=2) as fuser:  # a given count is kept
        assert fuser.settings["threads_follow_load"] is False and fuser._scheduler.governor is None
