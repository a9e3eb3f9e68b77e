"""``describe_gguf``: what ``capsfuse-lite info`` shows about a GGUF, as a plain dict.

``problems`` lists what makes the file unusable although its header reads (tensor data extending
past the end of the file: a truncated download or copy); ``info`` prints them and exits with 2.
"""

from __future__ import annotations

import json
from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

import gguf

from capsfuse_lite import defaults as D

from .gguf_metadata import GGUFArray, read_gguf_layout

CAPSFUSE_KEYS = (D.KEY_PROMPT_TEMPLATE, D.KEY_MAX_INPUT_TOKENS, D.KEY_NUM_BEAMS, D.KEY_MAX_NEW_TOKENS,
                 D.KEY_LENGTH_OFFSET, D.KEY_SOURCE, D.KEY_REVISION, D.KEY_SOURCE_SHA256, D.KEY_CONVERTER_VERSION,
                 D.KEY_RANDOM_WEIGHTS)


def _enum_name(enum: type, value: Any) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def gpu_offload_supported() -> bool:
    from capsfuse_lite.engine.llama import supports_gpu_offload  # loads llama.cpp (only when asked)

    return supports_gpu_offload()


def describe_gguf(path: str | Path, *, check_gpu: bool = True) -> dict[str, Any]:
    path = Path(path)
    layout = read_gguf_layout(path)
    meta, tensors = layout.meta, layout.tensors
    arch = meta.get("general.architecture", "unknown")
    types = Counter(_enum_name(gguf.GGMLQuantizationType, t.ggml_type) for t in tensors)
    tokens = meta.get("tokenizer.ggml.tokens")
    capsfuse = {key: meta[key] for key in CAPSFUSE_KEYS if key in meta}
    if D.KEY_SOURCE_SHA256 in capsfuse:
        try:
            capsfuse[D.KEY_SOURCE_SHA256] = json.loads(capsfuse[D.KEY_SOURCE_SHA256])
        except json.JSONDecodeError:
            pass
    file_type = meta.get("general.file_type")
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "architecture": arch,
        "name": meta.get("general.name"),
        "file_type": None if file_type is None else _enum_name(gguf.LlamaFileType, file_type),
        "tensor_types": dict(types.most_common()),
        "n_tensors": len(tensors),
        "n_parameters": sum(prod(t.shape) for t in tensors),
        "layers": meta.get(f"{arch}.block_count"),
        "embedding_length": meta.get(f"{arch}.embedding_length"),
        "context_length": meta.get(f"{arch}.context_length"),
        "heads": meta.get(f"{arch}.attention.head_count"),
        "kv_heads": meta.get(f"{arch}.attention.head_count_kv"),
        "vocab": {
            "model": meta.get("tokenizer.ggml.model"),
            "size": len(tokens) if isinstance(tokens, GGUFArray) else None,
            "bos": meta.get("tokenizer.ggml.bos_token_id"),
            "eos": meta.get("tokenizer.ggml.eos_token_id"),
            "unk": meta.get("tokenizer.ggml.unknown_token_id"),
            "pad": meta.get("tokenizer.ggml.padding_token_id"),
            "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
        },
        "capsfuse": capsfuse,
        "problems": layout.problems(),  # e.g. truncated: the file cannot be loaded
        "gpu_offload": gpu_offload_supported() if check_gpu else None,
    }
