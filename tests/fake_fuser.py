"""A stand-in for capsfuse_lite.engine.fuser.Fuser, for unit tests of the runner's own logic.

It honours the Fuser interface (constructor keywords, settings, model_info, fuse(pairs,
ordered=False) consuming lazily with a bounded look-ahead, request_stop, close) and completes
rows out of order, like continuous batching does. Its "caption" is a deterministic function of
the pair, so a test can say exactly what each output row must hold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from capsfuse_lite.run.progress import Progress


@dataclass
class FakeResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    truncated: bool
    error: str | None = None


REFUSED = "<refuse me>"  # a caption holding this is refused like a tokenizer refusal in the real engine


def fake_caption(raw: str, synthetic: str, max_new_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) the fake produces for a pair."""
    words = f"{synthetic.strip()} featuring {raw.strip()}".split()
    if len(words) > max_new_tokens:
        return " ".join(words[:max_new_tokens]), "length"
    return " ".join(words), "eos"


class FakeFuser:
    def __init__(self, model_path, *, slots=8, beams=None, max_new_tokens=None, on_result=None, **kwargs):
        slots = 8 if slots == "auto" else slots  # as the engine picks a count for "auto"
        self.settings = {"slots": slots, "beams": beams or 3, "max_new_tokens": max_new_tokens or 80, **kwargs}
        self.model_info = {"path": str(model_path), "file_type": "fake"}
        self.seen: list[tuple[str, str]] = []  # every pair consumed, in order
        self.on_result = on_result  # called with the number of results yielded so far
        self.streams = 0  # fuse() calls (a dataset feeds all its shards through one)
        self.closed = False
        self._stop = False

    def fuse(self, pairs, *, ordered=True):
        assert ordered is False, "the runner journals rows as they complete"
        self.streams += 1
        self._stop = False
        rng = random.Random(1234)
        window = []
        yielded = 0
        for index, (raw, synthetic) in enumerate(pairs):
            self.seen.append((raw, synthetic))
            window.append((index, raw, synthetic))
            while len(window) >= self.settings["slots"] or (window and self._stop):
                if self._stop:
                    return  # rows in flight are dropped, as in the real engine
                yield self._result(*window.pop(rng.randrange(len(window))))
                yielded += 1
                if self.on_result:
                    self.on_result(yielded)
        while window and not self._stop:
            yield self._result(*window.pop(rng.randrange(len(window))))
            yielded += 1
            if self.on_result:
                self.on_result(yielded)

    def _result(self, index, raw, synthetic):
        if REFUSED in raw or REFUSED in synthetic:
            return FakeResult(index, "", [], "skipped", 0, False, "the tokenizer refused a caption (fake)")
        text, reason = fake_caption(raw, synthetic, self.settings["max_new_tokens"])
        return FakeResult(index, text, list(range(len(text.split()))), reason, 40 + len(raw.split()), len(raw) > 90)

    def request_stop(self):
        self._stop = True

    def close(self):
        self.closed = True


class FakeFactory:
    """``fuser_factory`` for FuseRun that remembers the Fusers it made."""

    def __init__(self, on_result=None, fail=False):
        self.made: list[FakeFuser] = []
        self.on_result = on_result
        self.fail = fail

    def __call__(self, model_path, **kwargs):
        if self.fail:
            raise AssertionError("the model must not be loaded in this situation")
        fuser = FakeFuser(model_path, on_result=self.on_result, **kwargs)
        self.made.append(fuser)
        return fuser

    @property
    def seen(self) -> list[tuple[str, str]]:
        return [pair for f in self.made for pair in f.seen]



class NoteRecorder(Progress):
    """A progress sink that keeps the notes a run prints."""

    def __init__(self):
        super().__init__()
        self.notes: list[str] = []

    def note(self, text):
        self.notes.append(text)
