"""Lazy, torch-free reading of PyTorch zip checkpoints (``pytorch_model*.bin``).

A ``torch.save`` file is a zip archive: ``<prefix>/data.pkl`` (a pickle of the state dict whose
tensors point at storages through persistent ids) and ``<prefix>/data/<key>`` (raw storage
bytes, stored uncompressed and aligned). The pickle is read with :class:`_RestrictedUnpickler`,
which resolves only the few globals a tensor state dict needs and refuses everything else (for
example ``os.system``) before it can be called. Tensors become :class:`TensorRef` objects that
point into the zip file itself, so the data is memory-mapped, never copied into memory up front.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import CheckpointError, UnsafePickleError

from .tensors import ITEMSIZE, TensorRef, contiguous_strides, file_size

# torch storage class name -> element type
_STORAGE_TYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
# torch dtype objects that _rebuild_tensor_v3 / UntypedStorage pickles name
_DTYPES = {"float32": "F32", "float": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _DType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


class _TensorClass:
    """Stand-in for torch.Tensor / torch.nn.Parameter when they appear as pickle globals."""


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: Any, stride: Any, *_rest: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride), storage.dtype)


def _rebuild_tensor_v3(storage: _Storage, storage_offset: int, size: Any, stride: Any, _requires_grad: Any,
                       _hooks: Any, dtype: _DType, *_rest: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride), dtype.dtype)


def _rebuild_parameter(data: _LazyTensor, *_rest: Any) -> _LazyTensor:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, _state: Any) -> Any:
    if new_type is not _TensorClass:
        raise pickle.UnpicklingError("tensor subclass in checkpoint")
    return func(*args)


# The complete list of callables a tensor state dict may name. Nothing else is resolvable.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if module == "torch" and name == "UntypedStorage":
            return _StorageType("U8")
        if module == "torch" and name in _DTYPES:
            return _DType(_DTYPES[name])
        raise UnsafePickleError(
            f"{self._path}: the checkpoint's pickle asks for {module}.{name}, which a tensor checkpoint never needs; "
            "refused (nothing was executed). Use a trusted checkpoint, or its safetensors version"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], _StorageType):
            raise UnsafePickleError(f"{self._path}: unexpected persistent id {pid!r:.80} in the checkpoint's pickle; refused")
        _kind, storage_type, key, _location, numel = pid[:5]
        return _Storage(storage_type.dtype, str(key), int(numel))


def _member_data_offset(path: Path, handle: Any, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's bytes (the local header's extra field may differ from the central one)."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip entry {info.filename}; the file is damaged, re-download it")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_checkpoint(path: Path) -> dict[str, TensorRef]:
    """Index a ``torch.save`` zip file: tensor name -> TensorRef into the same file."""
    path = Path(path)
    size = file_size(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            magic = handle.read(2)
        if magic == b"\x80\x02" or magic[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) PyTorch checkpoint; re-save it with a current torch or use safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a complete PyTorch zip checkpoint (truncated or corrupt); re-download it") from None
    with archive:
        names = archive.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(f"{path}: no data.pkl in the PyTorch zip checkpoint; not a torch.save file")
        prefix = pkl_names[0][: -len("data.pkl")]
        try:
            with archive.open(pkl_names[0]) as pkl:
                state = _RestrictedUnpickler(pkl, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: cannot read the checkpoint's pickle ({exc}); the file is corrupt, re-download it") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: the checkpoint does not hold a state dict of tensors")

        refs: dict[str, TensorRef] = {}
        offsets: dict[str, int] = {}
        with open(path, "rb") as handle:
            for name, tensor in state.items():
                if not isinstance(tensor, _LazyTensor):
                    raise CheckpointError(f"{path}: entry {name!r} is not a tensor; not a model state dict")
                key = tensor.storage.key
                if key not in offsets:
                    try:
                        info = archive.getinfo(f"{prefix}data/{key}")
                    except KeyError:
                        raise CheckpointError(f"{path}: storage {key} of tensor {name} is missing; the file is corrupt") from None
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{path}: storage {key} is compressed; torch.save files store tensors uncompressed")
                    start = _member_data_offset(path, handle, info)
                    if start + info.file_size > size:
                        raise CheckpointError(f"{path}: truncated (storage {key} ends past the end of the file); re-download it")
                    offsets[key] = start
                    storage_bytes = info.file_size
                    if storage_bytes < tensor.storage.numel * ITEMSIZE.get(tensor.storage.dtype, 1):
                        raise CheckpointError(f"{path}: storage {key} is shorter than its header says; the file is corrupt")
                itemsize = ITEMSIZE.get(tensor.dtype, 1)
                strides = None if tensor.strides == contiguous_strides(tensor.shape) else tensor.strides
                ref = TensorRef(str(name), tensor.shape, tensor.dtype, path, offsets[key] + tensor.offset * itemsize, strides)
                if (tensor.offset * itemsize + ref.extent_bytes()) > tensor.storage.numel * ITEMSIZE.get(tensor.storage.dtype, 1):
                    raise CheckpointError(f"{path}: tensor {name} reaches past its storage; the file is corrupt")
                refs[str(name)] = ref
    return refs
