"""Streaming GGUF output: temp file + atomic rename, disk-space check, source hashing.

The GGUF header (metadata and tensor infos) is written first by gguf-py's ``GGUFWriter``; the
tensor data then follows tensor by tensor, each converted in row chunks of at most
``CHUNK_ELEMENTS`` values, so memory does not grow with the model. The sha256 of each weight
shard is computed while the shard is read (sequentially, one pass) and patched into the header at
the end: the header carries a same-length placeholder until then.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from capsfuse_lite.errors import DiskSpaceError, OutputExistsError

from .llama import TensorPlan
from .progress import ConvertProgress, human_bytes
from .tensors import MappedFiles

CHUNK_ELEMENTS = 1 << 22  # 4 Mi values per chunk: 16 MiB as float32
_HASH_BLOCK = 8 << 20
PENDING_DIGEST = "0" * 64


def check_output_path(out: Path, force: bool) -> None:
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a folder; give the output .gguf file name")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: {what} needs about {human_bytes(needed)} of free disk space, only {human_bytes(free)} is free; "
            "free some space or choose another output folder"
        )


def temp_path(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}.partial")


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fsync_file(path: Path) -> None:
    """Flush a finished file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class SequentialHasher:
    """sha256 of files read front to back as the conversion advances through them."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._paths = list(paths)
        self._digests = {p: hashlib.sha256() for p in self._paths}
        self._pos = {p: 0 for p in self._paths}
        self._handles: dict[Path, object] = {}
        self._buffer = bytearray(_HASH_BLOCK)

    def advance(self, path: Path, upto: int) -> None:
        if path not in self._digests:
            return
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb")
            handle.seek(self._pos[path])
        view = memoryview(self._buffer)
        while self._pos[path] < upto:
            n = handle.readinto(view[: min(_HASH_BLOCK, upto - self._pos[path])])
            if not n:
                break
            self._digests[path].update(view[:n])
            self._pos[path] += n

    def finish(self) -> dict[Path, str]:
        for path in self._paths:
            self.advance(path, os.path.getsize(path))
            handle = self._handles.pop(path, None)
            if handle is not None:
                handle.close()
        return {p: d.hexdigest() for p, d in self._digests.items()}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def digest_json(digests: dict[str, str]) -> str:
    """The capsfuse.source_sha256 value: a JSON object, file name -> hex digest, sorted."""
    return json.dumps(dict(sorted(digests.items())), separators=(",", ":"))


def _encode(block: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return block
    if qtype == QT.F16:
        return block.astype(np.float16)
    return gguf.quants.quantize(block, qtype)


def write_tensor_data(fout, writer: gguf.GGUFWriter, plan: TensorPlan, files: MappedFiles,
                      progress: ConvertProgress) -> None:
    """Convert one tensor chunk by chunk into ``fout`` (aligned as GGUF requires)."""
    writer.write_padding(fout, fout.tell())
    row_index = plan.row_index()
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, plan.row_elements))
    written = 0
    source_row_bytes = plan.source.nbytes // max(1, plan.rows)
    for start in range(0, plan.rows, rows_per_chunk):
        stop = min(plan.rows, start + rows_per_chunk)
        data = _encode(files.rows_f32(plan.source, start, stop, row_index), plan.qtype)
        fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        written += data.nbytes
        progress.advance((stop - start) * source_row_bytes, tensor_done=stop == plan.rows)
    if written != plan.nbytes:  # a bug, not a user error
        raise AssertionError(f"{plan.name}: wrote {written} bytes, expected {plan.nbytes}")
    writer.write_padding(fout, written)
    files.release(plan.source)


def write_gguf(path: Path, writer: gguf.GGUFWriter, plans: list[TensorPlan], progress: ConvertProgress,
               hasher: SequentialHasher, digests: dict[str, str], digest_key_names: dict[Path, str],
               description: str) -> None:
    """Write header, KV, tensor infos and streamed tensor data to ``path``; then patch the digests."""
    placeholder = digest_json(digests).encode()
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    header_end = fout.tell()
    progress.start(description, sum(p.source.nbytes for p in plans), len(plans))
    try:
        with MappedFiles() as files:
            for plan in plans:
                hasher.advance(plan.source.path, plan.source.offset + plan.source.extent_bytes())
                write_tensor_data(fout, writer, plan, files, progress)
        for file_path, hexdigest in hasher.finish().items():
            digests[digest_key_names[file_path]] = hexdigest
        final = digest_json(digests).encode()
        assert len(final) == len(placeholder)
        fout.flush()
        with open(path, "r+b") as patch:
            head = patch.read(header_end)
            at = head.find(placeholder)
            if at < 0 or head.find(placeholder, at + 1) >= 0:
                raise AssertionError("sha256 placeholder not found exactly once in the GGUF header")
            patch.seek(at)
            patch.write(final)
            patch.flush()
            os.fsync(patch.fileno())
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        progress.stop()
        hasher.close()
        writer.close()
