"""Concatenating ``fuse --shard I/N`` outputs back into input order.

Shard ``I`` of ``N`` holds input rows ``I, I+N, I+2N, ...`` in order, so the full result is the
parts interleaved round-robin: one row of part 0, one of part 1, ..., one of part N-1, again.
Each part's ``OUTPUT.meta.json`` says which shard it is; parts are sorted by it and checked to
come from one run (same input, model and decoding settings, and all of shards 0 .. N-1).
Without meta files the parts are taken in the order given.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from . import __version__
from .errors import ConfigError, InputFileError, OutputExistsError
from .journal import replace_atomically
from .records import detect_compression, detect_format, open_reader, open_writer
from .runner import meta_path, parse_shard, partial_path, write_json_atomic

_SAME = (("input", "rows"), ("input", "bytes"), ("model", "sha256"), ("settings", "beams"),
         ("settings", "max_new_tokens"), ("fields", "output"), ("selection", "limit"))


def _load_metas(parts: list[Path]) -> list[dict] | None:
    metas = []
    for part in parts:
        path = meta_path(part)
        if not path.exists():
            metas.append(None)
            continue
        try:
            metas.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise InputFileError(f"{path}: unreadable meta file ({exc})") from None
    if all(m is None for m in metas):
        return None
    missing = [str(p) for p, m in zip(parts, metas) if m is None]
    if missing:
        raise InputFileError(f"no meta file beside {', '.join(missing)} (the other parts have one): cannot tell which shard it is")
    return metas


def order_parts(parts: list[Path]) -> tuple[list[Path], list[dict] | None]:
    """Parts sorted by shard index, checked to be shards 0..N-1 of one run."""
    metas = _load_metas(parts)
    if metas is None:
        return parts, None
    shards = []
    for part, meta in zip(parts, metas):
        spec = (meta.get("selection") or {}).get("shard")
        if not spec:
            raise InputFileError(f"{part}: not a shard output (its meta file has no shard); nothing to merge")
        shards.append(parse_shard(spec))
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
        values = {json.dumps((m.get(key[0]) or {}).get(key[1])) for m in metas}
        if len(values) > 1:
            raise ConfigError(f"parts differ in {'.'.join(key)} ({', '.join(sorted(values))}): they are not one run")
    order = sorted(range(len(parts)), key=lambda k: shards[k][0])
    return [parts[k] for k in order], [metas[k] for k in order]


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
    parts, metas = order_parts(parts)
    readers = [open_reader(p, csv_delimiter=csv_delimiter) for p in parts]
    layouts = [r.scan() for r in readers]
    for part, layout in zip(parts[1:], layouts[1:]):
        if list(layout.columns) != list(layouts[0].columns):
            raise InputFileError(f"{part}: columns differ from {parts[0]} ({', '.join(layout.columns)})")
    total = sum(layout.rows for layout in layouts)
    tmp = partial_path(output)
    try:
        with open_writer(tmp, fmt, layouts[0], compression=detect_compression(output), csv_delimiter=csv_delimiter) as writer:
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
        write_json_atomic(meta_path(output), meta)
        replace_atomically(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def _merged_meta(parts: list[Path], metas: list[dict] | None, output: Path, fmt: str, total: int) -> dict:
    meta: dict = dict(metas[0]) if metas else {}
    meta.update({
        "capsfuse_lite": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output": {"path": str(output), "format": fmt, "rows": total},
        "merged_from": [str(p) for p in parts],
    })
    if metas:
        meta["selection"] = {**(metas[0].get("selection") or {}), "shard": None}
        counts: dict = {}
        for m in metas:
            for key, value in (m.get("counts") or {}).items():
                counts[key] = counts.get(key, 0) + (value or 0)
        meta["counts"] = counts
        meta["timing"] = {"parts": [m.get("timing") for m in metas]}
        meta["command"] = [m.get("command") for m in metas]
    return meta
