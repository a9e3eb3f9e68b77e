"""Progress from the first second (issue 17): while no row has finished, the display shows rows in
flight and the tokens/s they generate, not ``0/47 rows 0.00 rows/s ETA ?``; the engine's live
figures it reads (:meth:`Fuser.live`) follow the decode steps before any row finishes."""

from __future__ import annotations

import io
import time

from rich.console import Console

from capsfuse_lite.run.progress import LogProgress, Progress, RichProgress

PAIRS = [("VW T-ROC alloy wheel production vehicle teaser", "The wheel on the Volkswagen SUV is shown."),
         ("Red barn at dusk, Vermont", "a red barn in a field"),
         ("IMG_2041 golden retriever puppy", "a dog lying on the grass"),
         ("Vintage 1960s Omega Seamaster watch", "a watch on a table")]


def test_before_any_row_finishes_the_rates_are_rows_in_flight_and_tokens_per_second():
    progress = Progress()
    progress.start(47)
    assert progress.rates_text() == "0.00 rows/s 0 tok/s"  # nothing running yet (model loading)
    progress.watch(lambda: (16, 320))
    text = progress.rates_text()
    assert text.startswith("16 in flight ") and text.endswith(" tok/s") and "rows/s" not in text
    assert int(text.split()[3]) > 0  # 320 tokens over the time since watch()
    now = time.monotonic()
    progress.t0 = progress._live_t0 = now - 10  # as if the engine had run for 10 s
    assert progress.rates_text() == "16 in flight 32 tok/s"
    progress.advance(1, 40)  # a row finished: rows/s of finished rows from here, tokens/s still of every row
    assert progress.rates_text() == "0.10 rows/s 32 tok/s"


def test_the_bar_draws_the_live_figures():
    console = Console(file=io.StringIO(), record=True, width=80, force_terminal=False)  # a plain terminal's width
    bar = RichProgress(console=console)
    bar.start(47)
    bar.watch(lambda: (16, 320))
    bar.close()
    line = [ln for ln in console.export_text().splitlines() if "0/47" in ln]
    assert line and "16 in flight" in line[-1] and " tok/s" in line[-1] and "0.00 rows/s" not in line[-1], console.export_text()


def test_a_display_error_in_live_falls_back_to_the_plain_rates():
    progress = LogProgress(io.StringIO())
    progress.start(3)

    def broken():
        raise RuntimeError("closed")

    progress.watch(broken)
    assert progress.rates_text() == "0.00 rows/s 0 tok/s"


def test_fuser_live_counts_rows_in_flight_and_their_tokens_before_any_row_finishes(tiny_gguf_q8):
    from capsfuse_lite import Fuser

    with Fuser(tiny_gguf_q8, slots=4, beams=1, max_new_tokens=12, n_threads=1) as fuser:
        samples, finished = [], []
        decode = fuser._scheduler._decode

        def watched_decode(**kwargs):
            if not finished:
                samples.append(fuser.live())
            return decode(**kwargs)

        fuser._scheduler._decode = watched_decode
        for result in fuser.fuse(PAIRS, ordered=False):
            finished.append(result)
        # decodes: the shared prefix (no row yet), the prompts of the 4 rows (none generated yet),
        # then each step's rows with one more token each, until the first row finishes
        assert samples[0] == (0, 0) and samples[1] == (4, 0)
        steps = samples[1:]
        assert len(steps) >= 3
        assert steps == [(4, 4 * k) for k in range(len(steps))]
        assert fuser.live() == (0, fuser.stats.generated_tokens) and fuser.stats.generated_tokens > 0


def test_fuse_runs_show_the_engine_live_figures_until_the_first_row(tiny_gguf_q8, tmp_path):
    import json

    from capsfuse_lite.run.single import FuseConfig, run_fuse

    class FirstRow(Progress):
        seen: list[str] = []

        def advance(self, rows, tokens=0):
            if self.rows == 0:
                self.seen.append(self.rates_text())  # what the display showed just before the first row
            super().advance(rows, tokens)

    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"laion_2b": raw, "laion_coco": syn} for raw, syn in PAIRS]))
    progress = FirstRow()
    run_fuse(FuseConfig(input=src, output=tmp_path / "out.jsonl", model=tiny_gguf_q8, slots=4, beams=1,
                        max_new_tokens=6, n_threads=1), progress=progress)
    assert len(progress.seen) == 1 and " in flight " in progress.seen[0], progress.seen


def test_quiet_log_lines_keep_coming_while_no_row_finishes_and_stop_with_the_run():
    """--quiet / logs: a line every interval even while no row finishes (live figures: rows in
    flight, tok/s), none after close(); a display dropped or whose stream closed stops its clock."""
    import gc

    stream = io.StringIO()
    progress = LogProgress(stream, interval=0.05)
    progress.start(10)
    progress.watch(lambda: (3, 40))
    time.sleep(0.4)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.startswith("fusing: 0/10")]
    assert len(lines) >= 2 and all("3 in flight, " in ln and " tok/s, ETA" in ln for ln in lines), stream.getvalue()
    clock = progress._clock
    progress.close()
    assert not clock.is_alive()
    printed = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == printed  # nothing after close

    closing = io.StringIO()
    progress = LogProgress(closing, interval=0.05)
    progress.start(10)
    clock = progress._clock
    closing.close()  # e.g. a test runner's captured stream, gone before the run closed its display
    clock.join(timeout=2)
    assert not clock.is_alive()

    progress = LogProgress(io.StringIO(), interval=0.05)
    progress.start(10)
    clock = progress._clock
    del progress
    gc.collect()
    clock.join(timeout=2)
    assert not clock.is_alive()
