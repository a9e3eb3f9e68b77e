"""Concatenating ``fuse --shard I/N`` outputs back into input order.

Shard ``I`` of ``N`` holds input rows ``I, I+N, I+2N, ...`` in order, so the full result is the
parts interleaved round-robin: one row of part 0, one of part 1, ..., one of part N-1, again.

A merge must be provably the whole input, once, in order, so it relies on the ``OUTPUT.meta.json``
that ``fuse`` writes beside every part, never on the order of the arguments. Each part needs one;
it says which shard the part is, how many input rows the run selected from (``input.rows`` and
``selection.limit``) and the part's own row count and byte size. Parts are refused unless they are
shards 0 .. N-1 of one run (same input, model, decoding settings and fields), each exactly once,
each holding exactly the rows its shard selects, and each file unchanged since ``fuse`` wrote it
(row count and size as in its meta file). They are then sorted by shard index.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from capsfuse_lite import __version__
from capsfuse_lite.errors import ConfigError, InputFileError, OutputExistsError, write_error
from capsfuse_lite.files import replace_atomically
from capsfuse_lite.files import check_output_folder, make_output_folder
from capsfuse_lite.formats import Layout, detect_compression, detect_format, merge_kinds, open_reader, open_writer
from capsfuse_lite.run.config import parse_shard
from capsfuse_lite.run.outputs import meta_path, partial_path
from capsfuse_lite.files import write_json_atomic

_SAME = (("input", "rows"), ("input", "bytes"), ("input", "sha256"), ("model", "sha256"), ("settings", "beams"),
         ("settings", "max_new_tokens"), ("fields", "raw"), ("fields", "synthetic"), ("fields", "output"),
         ("selection", "limit"))


def _load_metas(parts: list[Path]) -> list[dict]:
    metas = []
    for part in parts:
        path = meta_path(part)
        if not path.exists():
            raise InputFileError(f"no meta file beside {part} ({path.name}): merge needs the meta file `fuse --shard I/N` "
                                 "writes beside each part to know which shard it is and that it is complete")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputFileError(f"{path}: unreadable meta file ({exc})") from None
        if not isinstance(meta, dict):
            raise InputFileError(f"{path}: not a capsfuse-lite meta file")
        metas.append(meta)
    return metas


def _get(meta: dict, key: tuple[str, str]):
    section = meta.get(key[0])
    return section.get(key[1]) if isinstance(section, dict) else None


def shard_rows(shard: tuple[int, int], input_rows: int, limit: int | None) -> int:
    """How many rows ``fuse --shard I/N`` selects from ``input_rows`` rows (after ``--limit``)."""
    stop = input_rows if limit is None else min(limit, input_rows)
    return len(range(shard[0], stop, shard[1]))


def order_parts(parts: list[Path]) -> tuple[list[Path], list[dict]]:
    """Parts sorted by shard index, checked (from their meta files) to be shards 0..N-1 of one run,
    each with the row count its shard selects. The files themselves are checked by :func:`merge_shards`."""
    metas = _load_metas(parts)
    resolved = [p.resolve() for p in parts]
    for k, path in enumerate(resolved):
        if path in resolved[:k]:
            raise ConfigError(f"{parts[k]} is given twice; each shard must be merged exactly once")
    shards = []
    for part, meta in zip(parts, metas):
        spec = _get(meta, ("selection", "shard"))
        if not spec:
            raise InputFileError(f"{part}: not a shard output (its meta file has no shard); nothing to merge")
        try:
            if not isinstance(spec, str):
                raise ConfigError(spec)
            shards.append(parse_shard(spec))
        except ConfigError:
            raise InputFileError(f"{meta_path(part)}: selection.shard is {json.dumps(spec)}, not \"I/N\" with "
                                 "0 <= I < N (the meta file was edited or damaged); rerun that shard") from None
    counts = {n for _, n in shards}
    if len(counts) != 1:
        raise ConfigError(f"parts come from different shard counts ({', '.join(f'{i}/{n}' for i, n in shards)})")
    n = counts.pop()
    have = sorted(i for i, _ in shards)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        dupes = sorted({i for i in have if have.count(i) > 1})
        raise ConfigError(f"need shards 0..{n - 1} of {n} exactly once"
                          + (f"; missing {', '.join(f'{i}/{n}' for i in missing)}" if missing else "")
                          + (f"; repeated {', '.join(f'{i}/{n}' for i in dupes)}" if dupes else ""))
    for key in _SAME:
        values = {json.dumps(_get(m, key)) for m in metas}
        if len(values) > 1:
            raise ConfigError(f"parts differ in {'.'.join(key)} ({', '.join(sorted(values))}): they are not one run")
    for part, meta, shard in zip(parts, metas, shards):
        input_rows, limit, rows = _get(meta, ("input", "rows")), _get(meta, ("selection", "limit")), _get(meta, ("output", "rows"))
        if not isinstance(input_rows, int) or not isinstance(rows, int) or not isinstance(_get(meta, ("output", "bytes")), int):
            raise InputFileError(f"{meta_path(part)}: lacks input.rows, output.rows or output.bytes; "
                                 "not written by this capsfuse-lite (rerun the shard)")
        want = shard_rows(shard, input_rows, limit if isinstance(limit, int) else None)
        if rows != want:
            raise InputFileError(f"{part}: shard {shard[0]}/{shard[1]} of {input_rows} input rows should hold {want} rows, "
                                 f"its meta file says {rows}; rerun that shard")
    order = sorted(range(len(parts)), key=lambda k: shards[k][0])
    return [parts[k] for k in order], [metas[k] for k in order]


def _check_unchanged(part: Path, meta: dict, rows: int) -> None:
    """The part file is the one its meta file describes (row count and byte size)."""
    size = part.stat().st_size
    if size != meta["output"]["bytes"] or rows != meta["output"]["rows"]:
        raise InputFileError(f"{part}: {rows} rows / {size:,} bytes, but its meta file says {meta['output']['rows']} rows / "
                             f"{meta['output']['bytes']:,} bytes: the file changed after `fuse` wrote it; rerun that shard")


def merge_shards(parts: list[str | Path], output: str | Path, *, output_format: str | None = None,
                 force: bool = False, csv_delimiter: str | None = None) -> int:
    """Interleave shard outputs into ``output`` (written atomically, with a meta file); returns rows.
    ``csv_delimiter``: of CSV parts (and a CSV output)."""
    parts = [Path(p) for p in parts]
    output = Path(output)
    if not parts:
        raise ConfigError("no parts to merge")
    fmt = detect_format(output, output_format, role="output")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    if any(output.resolve() == p.resolve() for p in parts):
        raise ConfigError(f"{output}: the merged output must not be one of the parts")
    check_output_folder(output)
    parts, metas = order_parts(parts)
    readers = [open_reader(p, csv_delimiter=csv_delimiter) for p in parts]
    layouts = [r.scan() for r in readers]
    for part, meta, layout in zip(parts, metas, layouts):
        _check_unchanged(part, meta, layout.rows)
    total = sum(layout.rows for layout in layouts)
    make_output_folder(output)  # a missing folder is made once the parts have passed
    tmp = partial_path(output)
    try:
        with open_writer(tmp, fmt, _merged_layout(parts, layouts), compression=detect_compression(output),
                         csv_delimiter=csv_delimiter) as writer:
            iters = [r.rows() for r in readers]
            while True:
                ended_at = None
                for k, it in enumerate(iters):
                    item = next(it, None)
                    if item is None:
                        ended_at = k if ended_at is None else ended_at
                    elif ended_at is not None:
                        raise InputFileError(f"{parts[k]} has more rows than {parts[ended_at]}: not shards of one run")
                    else:
                        writer.write(item[1])
                if ended_at is not None:
                    break
            for k, it in enumerate(iters):
                if next(it, None) is not None:
                    raise InputFileError(f"{parts[k]} has rows left after {parts[ended_at]} ended: not shards of one run")
        meta = _merged_meta(parts, metas, output, fmt, total)
        replace_atomically(tmp, output)  # the output, then the meta file that describes it
        write_json_atomic(meta_path(output), meta)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def _merged_layout(parts: list[Path], layouts: list[Layout]) -> Layout:
    """The columns of the merged file. CSV and Parquet parts of one run share the input's columns;
    JSON parts list the keys (and value kinds) their own rows have: rows may differ in keys, and a
    column may be null in one part and numbers in another, so theirs are united."""
    first = layouts[0]
    if all(list(layout.columns.items()) == list(first.columns.items()) for layout in layouts):
        return first
    if any(layout.format not in ("json", "jsonl") for layout in layouts):
        for part, layout in zip(parts, layouts):
            if list(layout.columns) != list(first.columns):
                raise InputFileError(f"{part}: columns differ from {parts[0]} ({', '.join(layout.columns)})")
        return first
    columns: dict[str, str] = {}
    for layout in layouts:
        for name, kind in layout.columns.items():
            columns[name] = merge_kinds(columns.get(name), kind)
    return Layout(first.format, sum(layout.rows for layout in layouts), columns)


def _merged_meta(parts: list[Path], metas: list[dict], output: Path, fmt: str, total: int) -> dict:
    meta: dict = dict(metas[0])
    meta.update({
        "capsfuse_lite": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output": {"path": str(output), "format": fmt, "rows": total, "bytes": partial_path(output).stat().st_size},
        "merged_from": [str(p) for p in parts],
    })
    meta["selection"] = {**(metas[0].get("selection") or {}), "shard": None}
    counts: dict = {}
    for m in metas:
        for key, value in (m.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + (value or 0)
    meta["counts"] = counts
    meta["timing"] = {"parts": [m.get("timing") for m in metas]}
    meta["command"] = [m.get("command") for m in metas]
    return meta
