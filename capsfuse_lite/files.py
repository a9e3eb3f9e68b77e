"""Files the user keeps: durable atomic writes, output folders, text UTF-8 files can hold.

The bottom floor of the package (it imports only :mod:`capsfuse_lite.errors`): the converter, the
fuse run, ``merge``, ``prompts`` and ``bench`` all publish their files through these.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import ConfigError, write_error


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def replace_atomically(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file onto its final name and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def check_output_folder(output: str | Path) -> None:
    """Fail now, with one line, if ``output`` cannot be created: its folder (or, when that is missing,
    the nearest existing folder above it, where it would be made) is read-only, not ours, or a file."""
    output = Path(output)
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {output}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(exc, output) from None


def make_output_folder(output: str | Path) -> None:
    """Create ``output``'s folder and its parents if missing (one error line if that fails)."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, output) from None


def unencodable_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def writable(value: Any) -> Any:
    """``value`` (a cell, a row) with text that UTF-8 files cannot hold -- lone surrogates, which JSON
    input may carry -- replaced by U+FFFD; returned as is (same object) when there is none."""
    if isinstance(value, str):
        if unencodable_at(value) is None:
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        items = [(writable(k), writable(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items())):
            return value
        return dict(items)
    if isinstance(value, list):
        items = [writable(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` durably (fsynced temp file, rename, fsynced folder); a failed
    write is one user-facing error naming ``path`` and leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(writable(obj), f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        replace_atomically(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise write_error(exc, path) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
