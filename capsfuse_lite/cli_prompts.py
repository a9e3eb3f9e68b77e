"""`capsfuse-lite prompts`: write the exact model inputs (text, token ids, truncation) per row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import defaults


def prompts(
    input: Annotated[Path, typer.Argument(help="Caption file: .json, .jsonl, .csv or .parquet with the two caption columns.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL file: one line per input row with prompt, token_ids, n_tokens, truncated (or skipped).")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF whose tokenizer and prompt template to use (only the vocabulary is loaded). Default: the converted default model.")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="Input format (json, jsonl, csv, parquet) instead of the extension.")] = None,
    csv_delimiter: Annotated[Optional[str], typer.Option(help="CSV field separator: one character, or tab, comma, semicolon, pipe (default: comma).")] = None,
    raw_field: Annotated[str, typer.Option(help="Column with the raw alt-text (Sentence 1).")] = defaults.RAW_FIELD,
    synthetic_field: Annotated[str, typer.Option(help="Column with the synthetic caption (Sentence 2).")] = defaults.SYNTHETIC_FIELD,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N input rows.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT.")] = False,
) -> None:
    """Show what the model will read: the prompt of every row under the 256-token rule, before any GPU time is spent."""
    from .cli import user_errors
    from .engine import PromptPreview
    from .errors import ConfigError, OutputExistsError, write_error
    from .journal import json_line, replace_atomically
    from .llama import LlamaError
    from .models import resolve_model
    from .prompts import PreviewSummary, preview_records
    from .records import open_reader
    from .runner import caption_pair, check_writable_folder

    with user_errors():
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit {limit}: give a number of rows >= 0")
        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; pass --force to overwrite it (or choose another -o)")
        if not output.parent.is_dir():
            raise ConfigError(f"cannot write {output}: folder {output.parent} does not exist")
        check_writable_folder(output)
        reader = open_reader(input, input_format, csv_delimiter=csv_delimiter)
        reader.scan(required=(raw_field, synthetic_field))  # a malformed file fails before any output
        summary = PreviewSummary()
        with PromptPreview(resolve_model(model)) as preview:
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
