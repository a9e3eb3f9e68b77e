"""Model files and handles: wrong architecture, truncated files, impossible settings, lifetimes.

A GGUF is checked from its header before any model work (nothing hashed, loaded or journaled),
and no order of closing llama.cpp handles can reach freed memory from Python.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capsfuse_lite.cli import app
from capsfuse_lite.convert.gguf_metadata import read_gguf_layout
from capsfuse_lite.convert.info import describe_gguf
from capsfuse_lite.errors import ModelLoadError
from capsfuse_lite.run.journal import journal_path
from capsfuse_lite.models import check_gguf

VOCAB_GGUF = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


def relabel(src: Path, dst: Path, arch: bytes = b"qwen2") -> Path:
    """``src`` with general.architecture set to ``arch`` (same length: the rest of the file is unchanged)."""
    data = src.read_bytes()
    key = b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    assert data.count(key) == 1 and len(arch) == 5
    dst.write_bytes(data.replace(key, key[:-5] + arch))
    return dst


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def captions(tmp_path, sample_rows) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(sample_rows[:3]), encoding="utf-8")
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused_before_work(result, tmp_path, message: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.count("\n") == 1 and message in " ".join(result.stderr.split()), result.stderr
    assert not journal_path(tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "cache" / "sha256").exists()  # the model was not hashed


def test_a_gguf_of_another_architecture_is_refused_by_fuse_and_prompts(tmp_path, tiny_gguf_q8, captions):
    model = relabel(tiny_gguf_q8, tmp_path / "qwen.gguf")
    with pytest.raises(ModelLoadError, match="general.architecture is 'qwen2'; capsfuse-lite runs LLaMA models"):
        check_gguf(model)
    result = cli("fuse", captions, "-o", tmp_path / "out.jsonl", "--model", model, "--max-new-tokens", "2")
    refused_before_work(result, tmp_path, "general.architecture is 'qwen2'")
    vocab = relabel(VOCAB_GGUF, tmp_path / "qwen-vocab.gguf")
    result = cli("prompts", captions, "-o", tmp_path / "p.jsonl", "--model", vocab)
    assert result.exit_code == 2 and "general.architecture is 'qwen2'" in result.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_a_truncated_gguf_is_flagged_by_info_and_refused_by_fuse(tmp_path, tiny_gguf_q8, captions):
    model = truncated(tiny_gguf_q8, tmp_path / "half.gguf")
    details = describe_gguf(model, check_gpu=False)
    assert len(details["problems"]) == 1 and details["problems"][0].startswith("truncated: the tensor data ends at byte")
    assert describe_gguf(tiny_gguf_q8, check_gpu=False)["problems"] == []
    whole = read_gguf_layout(tiny_gguf_q8)
    assert whole.file_size - 32 < whole.data_end <= whole.file_size  # the header describes every byte of data
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_gguf_q8.read_bytes()[:-1024])  # only the end of the last tensor is missing
    assert "truncated" in read_gguf_layout(short).problems()[0]
    result = cli("info", model)
    assert result.exit_code == 2 and "truncated" in result.stderr and "file" in result.stdout  # details, then the problem
    assert cli("info", model, "--json").exit_code == 2
    assert cli("info", tiny_gguf_q8).exit_code == 0
    result = cli("fuse", captions, "-o", tmp_path / "out.jsonl", "--model", model, "--max-new-tokens", "2")
    refused_before_work(result, tmp_path, "half.gguf: truncated: the tensor data ends at byte")


def test_max_new_tokens_beyond_the_trained_context_is_refused_before_any_work(tmp_path, tiny_gguf_q8, captions):
    result = cli("fuse", captions, "-o", tmp_path / "out.jsonl", "--model", tiny_gguf_q8, "--max-new-tokens", "100000")
    refused_before_work(result, tmp_path, "max_new_tokens=100000: a 256-token prompt plus 100000 new tokens exceeds "
                                          "the 512 positions tiny-q8_0.gguf was trained for; use at most 256")


LIFETIMES = """
import sys
from capsfuse_lite.engine.llama import Batch, Context, LlamaError, Model

model = Model(sys.argv[1])
ctx = Context(model, n_ctx=64, n_threads=1)
batch = Batch(16)
batch.add_sequence(model.vocab.encode("a red bicycle"), 0, 0, True)
model.close()                       # the model first: its context goes with it
for call in (lambda: ctx.decode(batch), lambda: ctx.logits(0), lambda: ctx.seq_rm(0), lambda: model.vocab.encode("x")):
    try:
        call()
        print("ran")
    except LlamaError as exc:
        print("refused:", exc)
ctx.close()                         # closing twice is harmless
batch.close()
for call in (lambda: batch.add(1, 0, [0], True), lambda: batch.add_sequence([1, 2], 0, 0, True), batch.clear):
    try:
        call()
        print("ran")
    except LlamaError as exc:
        print("refused:", exc)
model2 = Model(sys.argv[1])
ctx2 = Context(model2, n_ctx=64, n_threads=1)
batch2 = Batch(16)
batch2.close()
try:
    ctx2.decode(batch2)
except LlamaError as exc:
    print("refused:", exc)
ctx2.close()
model2.close()
print("done")
"""


def test_closing_a_model_before_its_context_cannot_crash(tmp_path, tiny_gguf_q8):
    # A subprocess: a use-after-free would kill it (exit 139), not pytest.
    done = subprocess.run([sys.executable, "-c", LIFETIMES, str(tiny_gguf_q8)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert lines == ["refused: the context is closed (its model was closed)"] * 3 + ["refused: the model is closed"] + \
        ["refused: the batch is closed"] * 4 + ["done"]


def test_sha256_cache_is_one_small_entry_per_file(tmp_path, monkeypatch):
    """A dataset hashes each shard once: one cache entry per path (N shards, N small writes, never a
    rewrite of the others' entries), reused while size and mtime hold, replaced when the file changes."""
    import hashlib
    import os

    from capsfuse_lite import models

    files = []
    for i in range(3):
        f = tmp_path / f"shard{i}.jsonl"
        f.write_bytes(b'{"laion_2b": "a", "laion_coco": "b"}\n' * (i + 1))
        files.append(f)
    digests = [models.file_sha256(f) for f in files]
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    entries = sorted((tmp_path / "cache" / "sha256").iterdir())
    assert len(entries) == 3 and not any(e.name.endswith(".tmp") for e in entries)
    first = models.sha256_cache_entry(files[0].resolve())
    stamp = first.stat().st_mtime_ns, first.read_bytes()

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached digest must not read the file again")

    with monkeypatch.context() as patched:
        patched.setattr(models, "open", no_reading, raising=False)
        assert [models.file_sha256(f) for f in files] == digests  # cache hits
    assert (first.stat().st_mtime_ns, first.read_bytes()) == stamp  # hashing the others left it alone

    files[1].write_bytes(files[1].read_bytes().replace(b'"a"', b'"A"'))  # same size, new content
    os.utime(files[1], ns=(files[1].stat().st_atime_ns, files[1].stat().st_mtime_ns + 10**9))
    assert models.file_sha256(files[1]) == hashlib.sha256(files[1].read_bytes()).hexdigest() != digests[1]
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 3  # replaced, not added beside
    models.sha256_cache_entry(files[2].resolve()).write_text("not json")
    assert models.file_sha256(files[2]) == digests[2]  # a damaged entry is hashed again
