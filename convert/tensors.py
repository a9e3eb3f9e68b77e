"""Lazy tensor references and memory-mapped, row-chunked reading of checkpoint data.

Every checkpoint reader (PyTorch zip, safetensors) produces :class:`TensorRef` objects that say
where a tensor's bytes lie in a file. :class:`MappedFiles` maps those files read-only and hands
out float32 row blocks, releasing the pages of a tensor once it has been converted, so resident
memory stays bounded by one chunk rather than by the model.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from capsfuse_lite.errors import CheckpointError

# Element types a LLaMA weight may have in a checkpoint.
NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's data lives: a byte offset in a file plus shape/strides (in elements)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "F32" | "F16" | "BF16" (others are refused when the tensor is read)
    path: Path
    offset: int
    strides: tuple[int, ...] | None = None  # None: C-contiguous

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 1)

    @property
    def nbytes(self) -> int:
        return self.n_elements * self.itemsize

    def extent_bytes(self) -> int:
        """Bytes from ``offset`` to the end of the last element (covers strided views)."""
        if self.n_elements == 0:
            return 0
        if self.strides is None:
            return self.nbytes
        last = sum((dim - 1) * stride for dim, stride in zip(self.shape, self.strides))
        return (last + 1) * self.itemsize


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class MappedFiles:
    """Read-only memory maps of checkpoint files, opened on first use and closed together."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        mapped = self._maps.get(path)
        if mapped is None:
            try:
                with open(path, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot memory-map the checkpoint file ({exc})") from None
            self._maps[path] = mapped
        return mapped

    def array(self, ref: TensorRef) -> np.ndarray:
        """A zero-copy view of the tensor in its stored dtype (uint16 bits for BF16)."""
        dtype = NUMPY_DTYPES.get(ref.dtype)
        if dtype is None:
            raise CheckpointError(
                f"{ref.path}: tensor {ref.name} is stored as {ref.dtype}; only F32, F16 and BF16 weights are supported"
            )
        mapped = self._map(ref.path)
        if ref.offset + ref.extent_bytes() > len(mapped):
            raise CheckpointError(
                f"{ref.path}: tensor {ref.name} lies beyond the end of the file; the file is truncated or corrupt, re-download it"
            )
        strides = ref.strides or contiguous_strides(ref.shape)
        return np.ndarray(
            ref.shape, dtype=dtype, buffer=mapped, offset=ref.offset, strides=tuple(s * dtype.itemsize for s in strides)
        )

    def rows_f32(self, ref: TensorRef, start: int, stop: int, row_index: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (first axis), or rows ``row_index[start:stop]``, as float32."""
        view = self.array(ref)
        block = view[start:stop] if row_index is None else view[row_index[start:stop]]
        if ref.dtype == "BF16":
            return bf16_to_f32(block)
        return np.ascontiguousarray(block, dtype=np.float32)

    def release(self, ref: TensorRef) -> None:
        """Drop the tensor's pages from this process (they stay in the OS page cache)."""
        mapped = self._maps.get(ref.path)
        if mapped is None or not hasattr(mapped, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (ref.offset // page) * page
        end = min(len(mapped), ref.offset + ref.extent_bytes())
        if end > start:
            try:
                mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
        self._maps.clear()

    def __enter__(self) -> "MappedFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror})") from None
