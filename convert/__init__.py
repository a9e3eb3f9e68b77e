"""CapsFus-LLaMA (HF LLaMA checkpoint) to GGUF, streaming and torch-free.

Installed as ``capsfuse_lite.convert``. Public API:

* :func:`convert_checkpoint` (source folder or hub id -> GGUF path)
* :func:`read_gguf_metadata` (a GGUF's key/values, read without loading the model)
"""

from __future__ import annotations

# llama.cpp's libraries (the quantizer) load before numpy: see capsfuse_lite.engine.llama
from capsfuse_lite.engine import llama as _native_first  # noqa: F401,I001

from .gguf_metadata import GGUFArray, read_gguf_metadata
from .llama import OUT_TYPES
from .pipeline import CONVERTER_VERSION, convert_checkpoint

__all__ = ["CONVERTER_VERSION", "GGUFArray", "OUT_TYPES", "convert_checkpoint", "read_gguf_metadata"]
