"""The last phase of a fuse run: assemble OUTPUT.partial in input order from the journal, describe it in
its meta file, and publish it onto OUTPUT atomically. ``run``: the
:class:`~capsfuse_lite.run.single.FuseRun` being finished (its config, layout, reader, journal)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from capsfuse_lite import __version__
from capsfuse_lite.errors import InputFileError, write_error
from capsfuse_lite.files import remove_quietly, replace_atomically, writable
from capsfuse_lite.formats import detect_compression, open_writer
from capsfuse_lite.run.config import FuseConfig
from capsfuse_lite.run.journal import RESUME_HINT, Journal
from capsfuse_lite.run.outputs import partial_path
from capsfuse_lite.run.rows import (ERROR_COLUMN, FINISH_COLUMN, STATUS_COLUMN, STATUS_SKIPPED, RunSummary, caption_pair,
                                    pair_key, result_columns, skipped_section)


def assemble(run: Any, journal: Journal, summary: RunSummary) -> None:
    """Stream the input again, join the journaled results by index, write OUTPUT.partial."""
    cfg = run.config
    added = {cfg.output_field: "string", FINISH_COLUMN: "string", STATUS_COLUMN: "string", ERROR_COLUMN: "string"}
    selected = run.selected
    tmp = partial_path(cfg.output)
    results = journal.results()
    current = next(results, None)
    summary.truncated_prompts = summary.length_cut = 0  # of the whole output, resumed rows included
    summary.skipped_reasons = {}
    try:
        with open_writer(tmp, run.output_format, run.layout.with_columns(added),
                         compression=detect_compression(cfg.output), csv_delimiter=cfg.csv_delimiter) as writer:
            for i, row in run._reader.rows():
                if i >= selected.stop:
                    break
                if i % selected.step != selected.start:
                    continue
                while current is not None and current[0] < i:
                    current = next(results, None)
                raw, synthetic, reason = caption_pair(row, cfg.raw_field, cfg.synthetic_field)
                entry = None
                if reason is None:
                    if current is None or current[0] != i or current[1].get("h") != pair_key(raw, synthetic).hex():
                        raise InputFileError(f"{cfg.input}: row {i} has no journaled result for its current captions "
                                             "(did the input change during the run?); rerun to fuse it")
                    entry = current[1]
                out = result_columns(cfg.output_field, entry, reason)
                if out[STATUS_COLUMN] == STATUS_SKIPPED:
                    summary.count_reason(out[ERROR_COLUMN])
                else:
                    summary.truncated_prompts += bool(entry.get("truncated"))
                    summary.length_cut += entry["finish_reason"] == "length"
                row = {k: v for k, v in row.items() if k not in out}
                row.update(out)
                writer.write(writable(row))
    except OSError as exc:
        remove_quietly(tmp)
        raise write_error(exc, tmp, RESUME_HINT) from None
    except BaseException:
        remove_quietly(tmp)
        raise

def publish(cfg: FuseConfig) -> None:
    """Rename the finished OUTPUT.partial onto OUTPUT (durably)."""
    try:
        replace_atomically(partial_path(cfg.output), cfg.output)
    except OSError as exc:
        raise write_error(exc, cfg.output, RESUME_HINT) from None

def output_meta(run: Any, summary: RunSummary, fingerprint: dict) -> dict:
    """The meta file of the OUTPUT.partial just assembled."""
    from capsfuse_lite.models import file_sha256

    cfg = run.config
    try:
        output_bytes = partial_path(cfg.output).stat().st_size
    except OSError as exc:
        raise write_error(exc, partial_path(cfg.output), RESUME_HINT) from None
    meta = {
        "capsfuse_lite": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "input": {"path": str(cfg.input.resolve()), "format": run.layout.format, "rows": run.layout.rows,
                  "bytes": run.input_bytes, "sha256": file_sha256(cfg.input)},
        "csv_delimiter": cfg.csv_delimiter or ",",
        "output": {"path": str(cfg.output.resolve()), "format": run.output_format, "rows": summary.rows_total,
                   "bytes": output_bytes},
        "fields": {"raw": cfg.raw_field, "synthetic": cfg.synthetic_field, "output": cfg.output_field},
        "selection": {"limit": cfg.limit, "shard": f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else None},
        "model": summary.model,
        "settings": {**summary.settings, "max_input_tokens": fingerprint["max_input_tokens"],
                     "prompt_template_sha256": fingerprint["prompt_template"]},
        "counts": {k: getattr(summary, k) for k in ("rows_total", "rows_fused", "rows_reused", "rows_resumed",
                                                    "rows_skipped", "truncated_prompts", "length_cut")},
        "skipped": skipped_section(summary),
        "timing": {"wall_s": round(summary.wall_s, 3), "fuse_s": round(summary.fuse_s, 3),
                   "rows_per_s": round(summary.rows_per_s, 4),
                   "generated_tokens_per_s": round(summary.generated_tokens_per_s, 2)},
        "journal_run": run.journal.run_id,
    }
    return meta
