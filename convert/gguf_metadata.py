"""Read a GGUF's key/value metadata and tensor table without loading the model.

``read_gguf_metadata(path)`` returns ``{key: value}``; arrays are returned as :class:`GGUFArray`
(item type and length) unless ``load_arrays`` is true, so reading ``capsfuse.*`` keys from a
multi-gigabyte file costs a few milliseconds. ``read_gguf_tensors(path)`` lists the tensor infos;
``read_gguf_layout(path)`` adds where the tensor data starts and ends, so a truncated file is
caught (:meth:`GGUFLayout.problems`) before llama.cpp maps it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFArray:
    item_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    ggml_type: int
    offset: int


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelLoadError(f"{self.path}: truncated GGUF header; the file is incomplete") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header; the file is incomplete")
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int, load_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack("<I")
            length = self.unpack("<Q")
            if load_arrays:
                return [self.value(item_type, True) for _ in range(length)]
            if item_type in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[item_type]) * length
            else:
                for _ in range(length):
                    self.value(item_type, False)
            return GGUFArray(item_type, length)
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}; the file is corrupt or too new")


@dataclass(frozen=True)
class GGUFLayout:
    meta: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int  # first byte of the tensor data (the header's end, aligned)
    file_size: int

    @property
    def data_end(self) -> int:
        """One past the last byte of tensor data the header describes (0 without tensors)."""
        return max((self.data_offset + t.offset + tensor_nbytes(t) for t in self.tensors), default=0)

    def problems(self) -> list[str]:
        """What makes the file unusable though its header reads: tensor data past the end of the file."""
        if self.data_end > self.file_size:
            missing = self.data_end - self.file_size
            return [f"truncated: the tensor data ends at byte {self.data_end:,} but the file has {self.file_size:,} bytes "
                    f"({missing:,} missing); the file is incomplete (convert or copy it again)"]
        return []


def tensor_nbytes(tensor: GGUFTensorInfo) -> int:
    """Bytes of a tensor's data from its shape and ggml type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    except (ValueError, KeyError):
        raise ModelLoadError(f"tensor {tensor.name}: unknown ggml type {tensor.ggml_type}; the file is corrupt or too new") from None
    n = 1
    for dim in tensor.shape:
        n *= dim
    return n // block * size


def _parse(path: Path, load_arrays: bool, want_tensors: bool) -> tuple[dict[str, Any], list[GGUFTensorInfo], int, int]:
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot open the GGUF file ({exc.strerror})") from None
    with handle:
        try:
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelLoadError(f"{path}: empty file, not a GGUF model") from None
        with buf:
            if buf[:4] != b"GGUF":
                raise ModelLoadError(f"{path}: not a GGUF file (convert a checkpoint with capsfuse-lite convert)")
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.unpack("<I")
            if not 1 <= version < 1 << 16:
                raise ModelLoadError(f"{path}: unsupported GGUF version {version} (big-endian file?)")
            n_tensors = cur.unpack("<Q")
            n_kv = cur.unpack("<Q")
            meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.unpack("<I"), load_arrays)
            tensors: list[GGUFTensorInfo] = []
            if want_tensors:
                for _ in range(n_tensors):
                    name = cur.string()
                    dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
                    tensors.append(GGUFTensorInfo(name, dims, cur.unpack("<I"), cur.unpack("<Q")))
            end, size = cur.pos, len(buf)
    return meta, tensors, end, size


def read_gguf_metadata(path: str | Path, *, load_arrays: bool = False) -> dict[str, Any]:
    """All key/values of a GGUF (arrays as GGUFArray unless ``load_arrays``)."""
    return _parse(Path(path), load_arrays, False)[0]


def read_gguf_tensors(path: str | Path) -> list[GGUFTensorInfo]:
    """The tensor table (name, GGUF-order shape, ggml type id, data offset)."""
    return _parse(Path(path), False, True)[1]


def read_gguf_layout(path: str | Path) -> GGUFLayout:
    """Metadata, tensor table and data extent of a GGUF (arrays as GGUFArray)."""
    meta, tensors, header_end, size = _parse(Path(path), False, True)
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1:
        raise ModelLoadError(f"{path}: general.alignment={align!r} is not a positive integer; the file is corrupt")
    return GGUFLayout(meta, tensors, -(-header_end // align) * align, size)
