"""k-quant and q4_0 outputs through llama.cpp's own quantizer (``llama_model_quantize``)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from capsfuse_lite.errors import ModelLoadError
from capsfuse_lite.machine import default_threads

from .llama import LLAMA_QUANT_TYPES


def quantize_with_llama_cpp(source: Path, dest: Path, out_type: str, n_threads: int | None = None) -> None:
    """Quantize the GGUF ``source`` (F16/BF16/F32) into ``dest`` with llama.cpp's mix for ``out_type``."""
    import llama_cpp

    # llama-cpp-python prints llama.cpp's log lines while its logger is below ERROR.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_QUANT_TYPES[out_type])
    params.nthread = n_threads or default_threads()
    rc = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(dest), ctypes.byref(params))
    if rc != 0:
        raise ModelLoadError(f"{source}: llama.cpp could not quantize the intermediate GGUF to {out_type} (code {rc})")
