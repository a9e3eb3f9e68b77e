"""k-quant and q4_0 outputs through llama.cpp's own quantizer (``llama_model_quantize``, called
through :mod:`capsfuse_lite.engine.llama`, the one owner of llama.cpp's C API)."""

from __future__ import annotations

from pathlib import Path

from capsfuse_lite.errors import ModelLoadError
from capsfuse_lite.machine import default_threads

from .llama import LLAMA_QUANT_TYPES


def quantize_with_llama_cpp(source: Path, dest: Path, out_type: str, n_threads: int | None = None) -> None:
    """Quantize the GGUF ``source`` (F16/BF16/F32) into ``dest`` with llama.cpp's mix for ``out_type``."""
    from capsfuse_lite.engine.llama import quantize_model  # loads llama.cpp (only when quantizing)

    rc = quantize_model(source, dest, LLAMA_QUANT_TYPES[out_type], n_threads or default_threads())
    if rc != 0:
        raise ModelLoadError(f"{source}: llama.cpp could not quantize the intermediate GGUF to {out_type} (code {rc})")
