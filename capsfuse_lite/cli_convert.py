"""``capsfuse-lite convert`` and ``capsfuse-lite info``: thin wrappers over capsfuse_lite.convert."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .defaults import DEFAULT_HUB_REPO

TYPES_HELP = "Output type: f32, f16, bf16, q8_0 (written directly) or q4_0, q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer)."


def convert(
    source: Annotated[str, typer.Argument(help="Model folder, or a Hugging Face hub id (downloaded to the HF cache).")] = DEFAULT_HUB_REPO,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf file.", dir_okay=False)] = ...,
    out_type: Annotated[str, typer.Option("--type", "-t", help=TYPES_HELP)] = "q4_k_m",
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit); hub ids only.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
) -> None:
    """Convert a LLaMA checkpoint (default BAAI/CapsFus-LLaMA) into a GGUF for `fuse`."""
    from .cli import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with user_errors():
        from .convert import convert_checkpoint

        convert_checkpoint(source, output, out_type=out_type, revision=revision, force=force, progress=progress)


def _size(n: int) -> str:
    from .convert.progress import human_bytes

    return human_bytes(n)


def info(
    model: Annotated[Path, typer.Argument(help="A .gguf file.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the details as JSON.")] = False,
) -> None:
    """Show a GGUF's architecture, size, quantization, vocabulary, capsfuse defaults and GPU support."""
    from .cli import user_errors

    with user_errors():
        from .convert.info import describe_gguf

        details = describe_gguf(model)
    if as_json:
        typer.echo(json.dumps(details, indent=2, ensure_ascii=False))
        _fail_on_problems(model, details)
        return
    vocab = details["vocab"]
    lines = [
        f"file          {details['path']} ({_size(details['size_bytes'])})",
        f"model         {details['name']} [{details['architecture']}], {details['layers']} layers, "
        f"embedding {details['embedding_length']}, heads {details['heads']}/{details['kv_heads']} (q/kv), "
        f"context {details['context_length']}",
        f"type          {details['file_type']} ({', '.join(f'{k} x{v}' for k, v in details['tensor_types'].items())}), "
        f"{details['n_parameters'] / 1e6:.1f}M parameters",
        f"vocabulary    {vocab['model']}, {vocab['size']} tokens, bos {vocab['bos']}, eos {vocab['eos']}, "
        f"unk {vocab['unk']}, pad {vocab['pad']}, add_bos {vocab['add_bos']}",
    ]
    capsfuse = details["capsfuse"]
    if not capsfuse:
        lines.append("capsfuse      no capsfuse.* metadata (not made by capsfuse-lite convert; fuse uses built-in defaults)")
    for key, value in capsfuse.items():
        if isinstance(value, dict):
            value = ", ".join(f"{name} {digest[:12]}" for name, digest in value.items()) or "none"
        elif isinstance(value, str) and len(value) > 100:
            value = json.dumps(value[:97] + "...")
        lines.append(f"{key:<30}{value}")
    lines.append(f"gpu offload   {'yes' if details['gpu_offload'] else 'no (this llama-cpp-python build is CPU-only)'}")
    typer.echo("\n".join(lines))
    _fail_on_problems(model, details)


def _fail_on_problems(model: Path, details: dict) -> None:
    """A file that cannot be loaded (e.g. truncated) is reported as an error line and exit code 2."""
    from .cli import error_line

    for problem in details.get("problems") or ():
        error_line(f"{model}: {problem}")
    if details.get("problems"):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("info")(info)
