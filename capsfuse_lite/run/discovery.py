"""Which files a dataset run fuses, and where each output goes (see :mod:`capsfuse_lite.run.dataset`).

Only names and sizes are read here: folders are walked (following links to folders, each real folder
once), globs expanded, hidden names, capsfuse-lite's own files and everything under the output
folder (however spelled: links and ``..`` resolved) left out; each shard keeps its path relative to
the input root under the output folder.
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.formats import detect_format, split_compression
from capsfuse_lite.formats.base import _EXTENSIONS

_OWN_FILES = (".meta.json", ".journal.jsonl")  # written by capsfuse-lite beside each output: never shards
_FORMAT_EXTENSION = {"json": ".json", "jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}


def has_magic(text: str) -> bool:
    """Whether ``text`` is a glob pattern (holds ``*``, ``?`` or ``[``)."""
    return any(c in text for c in "*?[")


def is_dataset(inputs: list, output: str | Path) -> bool:
    """Whether a ``fuse`` command names a dataset: several inputs, a folder, a glob that is not a file
    name and matches some file, or an existing folder as output (one file into a folder is a dataset
    of one shard). A missing file whose name holds glob characters (``shard[red].jsonl``) and matches
    nothing is a missing file, reported as such."""
    if len(inputs) != 1:
        return True
    path, text = Path(inputs[0]), str(inputs[0])
    glob = not path.exists() and has_magic(text) and next(_glob.iglob(text, recursive=True), None) is not None
    return path.is_dir() or glob or Path(output).is_dir()


@dataclass(frozen=True)
class Shard:
    """One input file of a dataset and where its output goes."""

    input: Path
    rel: str  # its path relative to the input root, with / separators
    output: Path
    size: int  # input bytes (the progress estimates rows from them until the shard is read)


def find_shards(inputs: list, output_dir: str | Path, *, input_format: str | None = None,
                output_format: str | None = None) -> tuple[Path, list[Shard]]:
    """The input root and the shards of ``inputs`` (folders, globs, files), sorted by relative path.
    Only names and sizes are read here; raises InputFileError / ConfigError for nothing to fuse, a
    missing path, or two inputs that would write the same output."""
    output_dir = Path(output_dir)
    out_abs = output_dir.resolve()  # links and .. resolved: an output folder inside the input is found however spelled
    found: list[tuple[Path, Path]] = []  # (file as given, its root)
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            if path.resolve() == output_dir.resolve():
                raise ConfigError(f"{output_dir}: the output folder must not be the input folder (outputs keep the "
                                  "inputs' names); choose another -o")
            found += [(f, path) for f in _walk(path, out_abs, input_format)]
        elif path.is_file():
            found.append((path, path.parent))
        elif has_magic(item):
            root = _glob_root(item)
            matches = sorted(Path(p) for p in _glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputFileError(f"{item}: no file matches this pattern")
            found += [(f, root) for f in matches if not _excluded(f, out_abs)]
        else:
            raise InputFileError(f"{item}: no such file or folder")
    if not found:
        raise InputFileError(f"{', '.join(map(str, inputs))}: no caption files found (.json, .jsonl, .csv or .parquet, "
                             "the first three optionally .gz or .zst; pass --input-format for other names)")
    roots = {root.absolute() for _, root in found}
    common = Path(os.path.commonpath([str(r) for r in roots])) if len(roots) > 1 else roots.pop()
    shards: dict[str, Shard] = {}
    seen: dict[Path, str] = {}
    for file, _ in found:
        real = file.resolve()
        if real in seen:
            continue  # the same file named twice (a folder and a glob inside it)
        rel = Path(os.path.relpath(file.absolute(), common)).as_posix()
        out = output_dir / output_name(rel, output_format)
        if out.absolute().resolve() == real:
            raise ConfigError(f"{file}: its output would be the input file itself; choose an output folder "
                              "other than the input folder")
        key = out.absolute().as_posix()
        if key in shards:
            raise ConfigError(f"{shards[key].input} and {file} would both be written to {out}; "
                              "rename one, or fuse them in separate runs")
        seen[real] = rel
        shards[key] = Shard(file, rel, out, file.stat().st_size)
    return common, sorted(shards.values(), key=lambda s: s.rel)


def _excluded(path: Path, out_abs: Path) -> bool:
    """capsfuse-lite's own files, and anything under the output folder ``out_abs`` (resolved), also
    when reached through a symbolic link or a ``..``."""
    if path.name.endswith(_OWN_FILES):
        return True
    real = path.resolve()
    return real == out_abs or out_abs in real.parents


def _walk(folder: Path, out_abs: Path, input_format: str | None) -> Iterator[Path]:
    """Caption files below ``folder`` (recursively, following links to folders, each real folder
    once), hidden names and the output folder left out."""
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if real in seen:  # a link back to a folder already walked (a loop, or two links to one folder)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _excluded(here / d, out_abs))
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or _excluded(path, out_abs):
                continue
            if input_format is None and split_compression(name)[0].suffix.lower() not in _EXTENSIONS:
                continue
            yield path


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ``data/**/*.jsonl`` -> ``data``."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def output_name(rel: str, output_format: str | None) -> str:
    """A shard's output path under the output folder: ``rel``, or with ``output_format``'s extension
    (``a/b.csv.gz`` as jsonl -> ``a/b.jsonl.gz``; Parquet output drops .gz/.zst)."""
    if not output_format:
        return rel
    fmt = detect_format(rel, output_format, role="output") if output_format != "parquet" else "parquet"
    path = Path(rel)
    inner, compression = split_compression(path)
    stem = inner.stem if inner.suffix.lower() in _EXTENSIONS else inner.name
    name = stem + _FORMAT_EXTENSION[fmt] + (path.suffix if compression and fmt != "parquet" else "")
    return inner.with_name(name).as_posix()
