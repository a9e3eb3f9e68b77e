"""Errors a user can cause.

Every exception meant for a person derives from :class:`CapsfuseError`. The CLI prints its
message as one line (no traceback) and exits with code 2. Messages name the file, row or
setting at fault and say how to fix it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class CapsfuseError(Exception):
    """Base class of all user-facing errors (exit code 2)."""

    exit_code = 2


class InputFileError(CapsfuseError):
    """An input file is missing, malformed or lacks a needed column."""


class OutputExistsError(CapsfuseError):
    """The output file exists and --force was not given."""


class DiskSpaceError(CapsfuseError):
    """Not enough free disk space for the output."""


class HubError(CapsfuseError):
    """The Hugging Face hub could not be reached, or the repo/revision does not exist.

    ``reason`` is the message without its advice on what to pass to ``convert`` (SOURCE), for a
    caller with other options (``fuse`` without ``--model``) to add its own."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class CheckpointError(CapsfuseError):
    """A checkpoint folder or shard is missing, truncated, corrupt or unsupported."""


class UnsafePickleError(CheckpointError):
    """A pickle in a checkpoint asks for something other than tensor data."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture (or a config value) is not supported."""


class ModelLoadError(CapsfuseError):
    """llama.cpp could not load a GGUF file or create a context."""


class ConfigError(CapsfuseError):
    """A command-line option or setting is invalid."""


class OutputWriteError(CapsfuseError):
    """An output, journal or report could not be written: read-only or vanished folder, no permission."""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def write_error(exc: BaseException, path: str | os.PathLike, hint: str = "") -> CapsfuseError:
    """The user-facing error for a failed write of ``path`` (an OSError or a sqlite3 error).

    Disk full becomes :class:`DiskSpaceError`; a read-only folder, a missing permission and a folder
    deleted or renamed while the file was open become :class:`OutputWriteError`. ``hint`` (e.g.
    "the journal keeps every fused row: rerun the same command") is appended after a semicolon.
    """
    path = Path(path)
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    tail = f"; {hint}" if hint else ""
    if code in _DISK_FULL or "disk is full" in text or "database or disk is full" in text:
        return DiskSpaceError(f"disk full while writing {path}; free some space{tail}")
    if code == errno.EROFS or "readonly" in text or "read-only" in text:
        if not path.parent.is_dir():
            return OutputWriteError(f"cannot write {path}: folder {path.parent} was deleted or renamed during the run{tail}")
        return OutputWriteError(f"cannot write {path}: {path.parent} is read-only; choose another output folder{tail}")
    if code in (errno.EACCES, errno.EPERM):
        return OutputWriteError(f"cannot write {path}: permission denied in {path.parent}; choose another output folder{tail}")
    if code in (errno.ENOENT, errno.ENOTDIR, getattr(errno, "ESTALE", errno.ENOENT)) or not path.parent.is_dir():
        return OutputWriteError(f"cannot write {path}: folder {path.parent} no longer exists (deleted or renamed during the run?){tail}")
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return OutputWriteError(f"cannot write {path}: {reason}{tail}")
