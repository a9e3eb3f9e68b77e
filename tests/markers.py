"""Shared pytest markers.

``needs_pyarrow``: Parquet cases only. pyarrow comes with the ``parquet`` extra, which CI installs
(``pip install -e ".[test,parquet]"``), so these run there; without it only they skip, never a
whole module of JSON/CSV tests.
"""

from __future__ import annotations

import importlib.util

import pytest

needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="Parquet needs pyarrow (the parquet extra)")
