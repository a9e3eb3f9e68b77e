"""capsfuse-lite: CapsFusion caption fusion with llama.cpp on one GPU or a CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CapsfuseError

__all__ = ["CapsfuseError", "Fuser", "FuseResult", "FuserStats", "__version__"]

_LAZY = {"Fuser": "engine", "FuseResult": "engine", "FuserStats": "engine"}


def __getattr__(name: str):
    # The engine imports llama_cpp; load it only when asked for, so `import capsfuse_lite` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
