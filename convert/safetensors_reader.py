"""Index ``*.safetensors`` files without the safetensors package.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}), then the data block; offsets are relative
to the start of the data block.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from capsfuse_lite.errors import CheckpointError

from .tensors import ITEMSIZE, TensorRef, file_size

_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I64": "I64", "I32": "I32",
           "I16": "I16", "I8": "I8", "U8": "U8", "BOOL": "BOOL"}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Tensor name -> TensorRef into the file; a short or malformed file is a CheckpointError."""
    path = Path(path)
    size = file_size(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header); re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header; re-download it")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download it")
    data_start = 8 + header_len
    refs: dict[str, TensorRef] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}; re-download it") from None
        ref = TensorRef(name, shape, dtype, path, data_start + begin)
        if end - begin != ref.n_elements * ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)}; the file is corrupt")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes, tensor {name} ends at byte {data_start + end}); re-download it"
            )
        refs[name] = ref
    return refs
