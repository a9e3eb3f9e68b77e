"""Conversion progress: a rich bar (bytes and tensors) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("capsfuse_lite.convert")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class ConvertProgress:
    """Tracks bytes written and tensors done; renders with rich when ``enabled``."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._task = None
        self._total_bytes = 0
        self._total_tensors = 0
        self._done_bytes = 0
        self._done_tensors = 0
        self._last_log = 0.0

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)
        else:
            log.info(text)

    def start(self, description: str, total_bytes: int, total_tensors: int) -> None:
        self._total_bytes, self._total_tensors = total_bytes, total_tensors
        self._done_bytes = self._done_tensors = 0
        if not self.enabled:
            log.info("%s: %d tensors, %s", description, total_tensors, _human(total_bytes))
            self._last_log = time.monotonic()
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._bar = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total_bytes, tensors=f"0/{total_tensors} tensors")

    def advance(self, nbytes: int, tensor_done: bool = False) -> None:
        self._done_bytes += nbytes
        self._done_tensors += int(tensor_done)
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes, tensors=f"{self._done_tensors}/{self._total_tensors} tensors")
        elif tensor_done and (time.monotonic() - self._last_log > 10 or self._done_tensors == self._total_tensors):
            self._last_log = time.monotonic()
            log.info("%d/%d tensors, %s/%s", self._done_tensors, self._total_tensors,
                     _human(self._done_bytes), _human(self._total_bytes))

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


human_bytes = _human
