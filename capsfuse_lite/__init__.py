"""capsfuse-lite: CapsFusion caption fusion with llama.cpp on one GPU or a CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CapsfuseError

__all__ = ["CapsfuseError", "__version__"]
