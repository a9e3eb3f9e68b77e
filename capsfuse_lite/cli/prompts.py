"""`capsfuse-lite prompts`: write the exact model inputs (text, token ids, truncation) per row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from capsfuse_lite import defaults
from capsfuse_lite.cli.common import (HELP_CHAT_TEMPLATE, HELP_CSV_DELIMITER, HELP_FORCE, HELP_INPUT_FORMAT, HELP_RAW_FIELD,
                         HELP_SYNTHETIC_FIELD, HELP_VERBOSE)


def _model_help() -> str:
    from capsfuse_lite.cli.common import help_path
    from capsfuse_lite.models import default_model_path

    return ("GGUF whose tokenizer and prompt template are used.  "
            f"[default: fuse's default model, {help_path(default_model_path())}]")


def prompts(
    input: Annotated[Path, typer.Argument(metavar="INPUT", help="Caption file, as for fuse: .json, .jsonl, .csv or .parquet (the first three may be gzip or zstd compressed).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="OUTPUT", help="JSONL file to write: one line per input row with its prompt, token_ids, n_tokens and truncated, or why the row is skipped. A missing folder is created.")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", metavar="MODEL", help=_model_help(), show_default=False)] = None,
    input_format: Annotated[Optional[str], typer.Option(metavar="FORMAT", help=HELP_INPUT_FORMAT)] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(metavar="CHAR", help=HELP_CSV_DELIMITER)] = None,
    raw_field: Annotated[str, typer.Option(metavar="NAME", help=HELP_RAW_FIELD)] = defaults.RAW_FIELD,
    synthetic_field: Annotated[str, typer.Option(metavar="NAME", help=HELP_SYNTHETIC_FIELD)] = defaults.SYNTHETIC_FIELD,
    limit: Annotated[Optional[int], typer.Option(metavar="N", help="Only the first N input rows.")] = None,
    chat_template: Annotated[str, typer.Option("--chat-template", metavar="MODE", help=HELP_CHAT_TEMPLATE)] = "none",
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help=HELP_VERBOSE)] = False,
) -> None:
    """Write every row's exact model input (prompt, tokens).

    The prompt text and token ids fuse will use, under upstream's 256-token rule (which rows are
    truncated, which are skipped and why), before any GPU time is spent. Only the model's
    vocabulary is loaded.
    """
    from capsfuse_lite.cli.common import native_first, user_errors, verbose_llama

    native_first()
    verbose_llama(verbose)
    from capsfuse_lite.engine.fuser import PromptPreview
    from capsfuse_lite.errors import ConfigError, OutputExistsError, write_error
    from capsfuse_lite.run.journal import json_line
    from capsfuse_lite.files import replace_atomically
    from capsfuse_lite.engine.llama import LlamaError
    from capsfuse_lite.models import resolve_model
    from capsfuse_lite.files import make_output_folder
    from capsfuse_lite.engine.prompts import PreviewSummary, preview_records
    from capsfuse_lite.formats import open_reader
    from capsfuse_lite.run.config import check_writable_folder
    from capsfuse_lite.run.rows import caption_pair

    with user_errors():
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit {limit}: give a number of rows >= 0")
        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; pass --force to overwrite it (or choose another -o)")
        check_writable_folder(output)
        reader = open_reader(input, input_format, csv_delimiter=csv_delimiter)
        reader.scan(required=(raw_field, synthetic_field))  # a malformed file fails before any output
        summary = PreviewSummary()
        model_path = resolve_model(model, offer_conversion=False)
        make_output_folder(output)
        with PromptPreview(model_path, chat_template) as preview:
            if preview.model_note:
                typer.echo(preview.model_note, err=True)
            built = {}  # the prompt of the row whose captions were just checked

            def captions(row: dict) -> tuple[str, str, str | None]:
                """The same rows `fuse` skips, tokenizer refusals included, are skipped here."""
                raw, synthetic, reason = caption_pair(row, raw_field, synthetic_field)
                if reason is None:
                    try:
                        built["prompt"] = preview.build(raw, synthetic)
                    except (UnicodeError, LlamaError) as exc:
                        return "", "", f"the tokenizer refused a caption ({exc})"
                return raw, synthetic, reason

            records = preview_records(reader.rows(columns=(raw_field, synthetic_field)),
                                      lambda raw, synthetic: built.pop("prompt"), captions, summary, limit)
            tmp = output.with_name(output.name + ".tmp")
            try:
                with open(tmp, "wb") as out:
                    for record in records:
                        out.write(json_line(record))
                    out.flush()
                    os.fsync(out.fileno())
                replace_atomically(tmp, output)
            except OSError as exc:
                raise write_error(exc, output) from None
            finally:
                tmp.unlink(missing_ok=True)
        typer.echo(
            f"wrote {output}: {summary.rows} rows, {summary.truncated} truncated to fit "
            f"{preview.builder.max_tokens} tokens, {summary.skipped} skipped; longest prompt {summary.max_tokens} tokens",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command("prompts")(prompts)
