"""capsfuse-lite: CapsFusion caption fusion with llama.cpp on one GPU or a CPU."""

from __future__ import annotations

__version__ = "0.1.0"

from capsfuse_lite.errors import CapsfuseError

__all__ = ["CapsfuseError", "Fuser", "FuseResult", "FuserStats", "__version__"]

_LAZY = {"Fuser": "engine.fuser", "FuseResult": "engine.fuser", "FuserStats": "engine.fuser"}


class _SourceTreeConvert:
    """Finds ``capsfuse_lite.convert`` in a source checkout, where it is the repository's top-level
    ``convert/`` folder (an install maps it into the package: pyproject's package-dir). Only that one
    name is served, and only when this package was imported from a source tree (no ``convert/``
    inside it, ``../convert/__init__.py`` and ``../pyproject.toml`` beside it): from the repository
    folder the source ``capsfuse_lite/`` shadows an installed copy, and without this the README's
    API and ``python -m capsfuse_lite`` failed there after a plain ``pip install .``."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import os
        from importlib.util import spec_from_file_location

        return spec_from_file_location(fullname, os.path.join(self.folder, "__init__.py"),
                                       submodule_search_locations=[self.folder])


def _serve_source_tree_convert() -> None:
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "convert")):  # an installed package holds convert/ itself
        return
    root = os.path.dirname(here)
    folder = os.path.join(root, "convert")
    if not (os.path.isfile(os.path.join(folder, "__init__.py")) and os.path.isfile(os.path.join(root, "pyproject.toml"))):
        return
    name = f"{__name__}.convert"
    if not any(isinstance(f, _SourceTreeConvert) and f.name == name for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeConvert(name, folder))


_serve_source_tree_convert()


def __getattr__(name: str):
    # The engine imports llama_cpp; load it only when asked for, so `import capsfuse_lite` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
