"""`capsfuse-lite prompts`: write the exact model inputs (text, token ids, truncation) per row."""

from __future__ import annotations

import json
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
    from .errors import ConfigError, OutputExistsError
    from .journal import replace_atomically
    from .models import resolve_model
    from .prompts import PreviewSummary, preview_records
    from .records import open_reader
    from .runner import caption_pair

    with user_errors():
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit {limit}: give a number of rows >= 0")
        if output.exists() and not force:
            raise OutputExistsError(f"{output} exists; pass --force to overwrite it (or choose another -o)")
        reader = open_reader(input, input_format, csv_delimiter=csv_delimiter)
        reader.scan(required=(raw_field, synthetic_field))  # a malformed file fails before any output
        summary = PreviewSummary()
        with PromptPreview(resolve_model(model)) as preview:
            records = preview_records(
                reader.rows(columns=(raw_field, synthetic_field)),
                preview.build,
                lambda row: caption_pair(row, raw_field, synthetic_field),
                summary,
                limit,
            )
            tmp = output.with_name(output.name + ".tmp")
            try:
                with open(tmp, "w", encoding="utf-8") as out:
                    for record in records:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                replace_atomically(tmp, output)
            finally:
                tmp.unlink(missing_ok=True)
        typer.echo(
            f"wrote {output}: {summary.rows} rows, {summary.truncated} truncated to fit "
            f"{preview.builder.max_tokens} tokens, {summary.skipped} skipped; longest prompt {summary.max_tokens} tokens",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command("prompts")(prompts)
