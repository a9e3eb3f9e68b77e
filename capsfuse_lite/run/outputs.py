"""Output files as the commands treat them: their folder, and when an existing ``fuse`` output is done.

Folders: every command that writes a file (``fuse``, ``merge``, ``prompts``, ``bench``, ``convert``)
creates a missing output folder, parents included, like ``mkdir -p``; it is created only once the
inputs have been checked, so a command that fails early leaves nothing behind. Whether files can be
created there is checked first, in the nearest folder that exists (:func:`check_output_folder`).

Continuable: a journal beside an existing OUTPUT is an interrupted run's (:func:`unfinished_journal`),
whatever options started it (``--force`` included): any rerun continues it and replaces OUTPUT when
done (a run with other settings is refused by the journal, naming them; ``--force`` discards it). The
one exception is the journal OUTPUT itself was assembled from (its meta file names the journal's run):
a run killed after publishing, before deleting it; that journal is deleted.

Done: ``fuse`` writes ``OUTPUT.meta.json`` beside a finished OUTPUT. A rerun of a command whose
OUTPUT is *complete* does nothing and exits 0 with one line (:func:`finished_output`); complete means
all of (the same rule for a single file and for each shard of a dataset):

- OUTPUT and its meta file exist, and OUTPUT has the size the meta file recorded (not edited since);
- the input has the content the output was made from (sha256, cached by path, size and mtime, so an
  unchanged input is not read again; outputs from before sha256 was recorded: same path and size;
  an edit that keeps the size is a change);
- this command asks for what the meta file records: the same model file (sha256), input and output
  format, CSV delimiter, caption and output fields, ``--limit``, ``--shard``, ``--chat-template``,
  ``--kv-type`` (f16 when not given), and ``--beams`` /
  ``--max-new-tokens`` where given (left out, they are the model's, which is the same file).

``--slots``, ``--ctx``, ``--threads`` and ``--n-gpu-layers`` are not compared: they change speed,
not what is asked for. An OUTPUT that exists but is not complete for this command is refused with
what differs and the way out (``--force`` redoes it); nothing is overwritten without ``--force``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import ConfigError, OutputExistsError


def meta_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".meta.json")


def partial_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


def read_meta(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if it is missing or not a JSON object."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _get(meta: dict, *keys: str) -> Any:
    for key in keys:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def _short(digest: Any) -> str:
    return f"sha256 {str(digest)[:12]}" if digest else "sha256 unknown"


def unfinished_journal(output: str | Path) -> bool:
    """Whether the journal beside ``output`` (an existing OUTPUT) is an interrupted run's, which a
    rerun continues. A journal whose run the meta file names (OUTPUT was assembled from it; the run
    was killed before deleting it) is deleted instead (unless another process holds it), and False
    returned."""
    from capsfuse_lite.run.journal import journal_path, journal_run_id, remove_leftover

    output = Path(output)
    journal = journal_path(output)
    if not journal.exists():
        return False
    meta = read_meta(meta_path(output))
    run = journal_run_id(journal)
    if run is not None and meta is not None and meta.get("journal_run") == run and remove_leftover(journal):
        return False
    return True


def finished_output(cfg: Any, *, output_format: str, input_format: str, model_sha256: str | None = None) -> str:
    """``cfg`` (a :class:`~capsfuse_lite.run.config.FuseConfig`) names an existing OUTPUT: return the
    one line saying it is already complete for this command, or raise
    :class:`~capsfuse_lite.errors.OutputExistsError` saying why it is not and how to redo it.
    ``cfg.model`` is the ``--model`` given, or None for the default model; ``model_sha256`` its
    hash when the caller has it (a dataset hashes the model once)."""
    from capsfuse_lite.models import DEFAULT_MODEL_FILE, default_model_path, file_sha256
    from capsfuse_lite.formats import parse_csv_delimiter

    out = Path(cfg.output)
    redo = "pass --force to redo it (or choose another -o)"
    meta_file = meta_path(out)
    meta = read_meta(meta_file)
    if meta is None or not isinstance(meta.get("output"), dict):
        what = "is missing" if not meta_file.exists() else "is not a capsfuse-lite meta file"
        raise OutputExistsError(f"{out} exists but is not a finished capsfuse-lite output ({meta_file.name} {what}); "
                                "pass --force to overwrite it (or choose another -o)")
    size = out.stat().st_size
    if _get(meta, "output", "bytes") != size:
        raise OutputExistsError(f"{out} changed since capsfuse-lite wrote it ({size} bytes; {meta_file.name} says "
                                f"{_get(meta, 'output', 'bytes')}); {redo}")

    source = Path(cfg.input)
    recorded = _get(meta, "input", "sha256")
    if recorded:
        changed = file_sha256(source) != recorded
    else:  # a meta file from before input hashes were recorded
        changed = (_get(meta, "input", "path") != str(source.resolve())
                   or _get(meta, "input", "bytes") != source.stat().st_size)
    if changed:
        raise OutputExistsError(f"{out} was made from other input data than {source} holds now (the file changed "
                                "since, or is another file); pass --force to fuse it again (or choose another -o)")

    diffs: list[str] = []

    def compare(label: str, was: Any, now: Any) -> None:
        if was != now:
            diffs.append(f"{label} {'none' if was is None else was} -> {'none' if now is None else now}")

    compare("input format", _get(meta, "input", "format"), input_format)
    compare("output format", _get(meta, "output", "format"), output_format)
    if "csv" in (input_format, output_format):
        compare("--csv-delimiter", repr(_get(meta, "csv_delimiter") or ","), repr(parse_csv_delimiter(cfg.csv_delimiter)))
    compare("--raw-field", _get(meta, "fields", "raw"), cfg.raw_field)
    compare("--synthetic-field", _get(meta, "fields", "synthetic"), cfg.synthetic_field)
    compare("--output-field", _get(meta, "fields", "output"), cfg.output_field)
    compare("--limit", _get(meta, "selection", "limit"), cfg.limit)
    compare("--shard", _get(meta, "selection", "shard"), f"{cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else None)
    compare("--kv-type", _get(meta, "settings", "kv_type") or "f16", cfg.kv_type or "f16")
    for key, flag in (("beams", "--beams"), ("max_new_tokens", "--max-new-tokens")):
        if getattr(cfg, key) is not None:
            compare(flag, _get(meta, "settings", key), getattr(cfg, key))
    compare("--chat-template", _get(meta, "settings", "chat_template") or "none", getattr(cfg, "chat_template", "none"))

    made_with = _get(meta, "model", "sha256")
    model = Path(cfg.model).expanduser() if cfg.model is not None else default_model_path()
    if model.is_file():
        now = model_sha256 or file_sha256(model)
        if now != made_with:
            diffs.append(f"model {_get(meta, 'model', 'file')} ({_short(made_with)}) -> {model.name} ({_short(now)})")
    elif cfg.model is not None:
        raise ConfigError(f"model file {model} does not exist (--model takes a .gguf file)")
    elif _get(meta, "model", "file") != DEFAULT_MODEL_FILE:  # the default model is gone: judge by name
        diffs.append(f"model {_get(meta, 'model', 'file')} -> {DEFAULT_MODEL_FILE} (the default)")
    if diffs:
        raise OutputExistsError(f"{out} exists, made with other settings ({'; '.join(diffs)}); "
                                "pass --force to redo it with these (or choose another -o)")

    rows = _get(meta, "output", "rows")
    return (f"{out} is already complete ({rows} rows, made {_get(meta, 'created') or '?'} with "
            f"{_get(meta, 'model', 'file')}): nothing to do; --force redoes it")
