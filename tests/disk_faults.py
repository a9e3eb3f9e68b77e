"""Disk faults for tests: an injected "disk full" (ENOSPC) and a real small or read-only tmpfs.

``FullDisk(budget).open`` replaces ``open`` in a module under test (``monkeypatch.setattr(module,
"open", ..., raising=False)``): files it opens for writing fail with ENOSPC once ``budget`` bytes
were written through them, as ``write(2)`` does on a full disk. ``tmpfs(size)`` mounts a real
tmpfs (root only) and skips the test where mounting is not allowed; the injected tests cover the
same code paths there.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


class FullDisk:
    """Files opened for writing through it fail with ENOSPC once ``budget`` bytes were written."""

    def __init__(self, budget: int):
        self.budget = budget

    def open(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return handle if "r" in mode and "+" not in mode else _Limited(handle, self)


class _Limited:
    def __init__(self, handle, disk: FullDisk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        self._disk.budget -= len(data)
        if self._disk.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@contextlib.contextmanager
def tmpfs(size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (e.g. "96k") mounted on a temporary folder; skips if not permitted."""
    where = Path(tempfile.mkdtemp(prefix="capsfuse-tmpfs-"))
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); the injected faults cover this")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def resize(where: Path, size: str) -> None:
    """Grow a tmpfs from :func:`tmpfs` (what freeing disk space looks like to the next run)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)
