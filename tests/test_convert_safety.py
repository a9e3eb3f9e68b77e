"""Safety: refused pickles, truncated shards, interrupted runs, overwrite and disk checks, no torch."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from capsfuse_lite.convert import convert_checkpoint
from capsfuse_lite.convert.tensors import MappedFiles
from capsfuse_lite.errors import CheckpointError, DiskSpaceError, OutputExistsError, UnsafePickleError

SHARD_2 = "pytorch_model-00002-of-00002.bin"


@pytest.fixture
def ckpt_copy(tiny_llama_dir, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_calling_os_system_is_refused_and_never_runs(ckpt_copy, tmp_path):
    marker = tmp_path / "pwned"
    shard = ckpt_copy / SHARD_2
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_STORED) as archive:  # same name, malicious payload
        archive.writestr("archive/data.pkl", pickle.dumps({"x": _RunsShell(f"touch {marker}")}, protocol=2))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(UnsafePickleError, match=r"system.*refused \(nothing was executed\)") as info:
        convert_checkpoint(ckpt_copy, tmp_path / "out.gguf", out_type="f32", progress=False)
    assert SHARD_2 in str(info.value)
    assert not marker.exists()
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("layout", ["bin", "safetensors"])
def test_truncated_shard_fails_naming_the_file(layout, tmp_path):
    from checkpoints import make_llama_checkpoint

    folder = make_llama_checkpoint(tmp_path / "ckpt", layout=layout, layers=1)
    weights = next(p for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match=weights.name) as info:
        convert_checkpoint(folder, tmp_path / "out.gguf", out_type="f32", progress=False)
    assert "truncated" in str(info.value) or "corrupt" in str(info.value)


def test_corrupt_index_names_missing_shard(ckpt_copy, tmp_path):
    (ckpt_copy / SHARD_2).unlink()
    with pytest.raises(CheckpointError, match=SHARD_2):
        convert_checkpoint(ckpt_copy, tmp_path / "out.gguf", out_type="f32", progress=False)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch, existing):
    out = tmp_path / "out.gguf"
    if existing:
        out.write_bytes(b"previous model")
    calls = {"n": 0}
    original = MappedFiles.rows_f32

    def interrupt_midway(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MappedFiles, "rows_f32", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_llama_dir, out, out_type="q8_0", force=existing, progress=False)
    assert calls["n"] == 6
    assert list(tmp_path.iterdir()) == ([out] if existing else [])  # no partial or temp file left
    if existing:
        assert out.read_bytes() == b"previous model"


def test_refuses_to_overwrite_without_force(tiny_gguf_f32, tiny_llama_dir):
    before = tiny_gguf_f32.stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--force"):
        convert_checkpoint(tiny_llama_dir, tiny_gguf_f32, out_type="f32", progress=False)
    assert tiny_gguf_f32.stat().st_mtime_ns == before


def test_force_overwrites(tiny_llama_dir, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    convert_checkpoint(tiny_llama_dir, out, out_type="f16", force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"


def test_disk_space_checked_first(tiny_llama_dir, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(DiskSpaceError, match=r"needs about .*MB.*only 1.0 MB is free"):
        convert_checkpoint(tiny_llama_dir, tmp_path / "out.gguf", out_type="q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_converter_runs_without_torch(tiny_llama_dir, tmp_path):
    """The converter must not import torch (nor transformers/sentencepiece/safetensors)."""
    out = tmp_path / "no-torch.gguf"
    script = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'sentencepiece', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "from capsfuse_lite.convert import convert_checkpoint\n"
        f"convert_checkpoint({str(tiny_llama_dir)!r}, {str(out)!r}, out_type='q8_0', progress=False)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    assert out.read_bytes()[:4] == b"GGUF"
