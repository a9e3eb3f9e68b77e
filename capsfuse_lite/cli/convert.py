"""``capsfuse-lite convert`` and ``capsfuse-lite info``: thin wrappers over capsfuse_lite.convert."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from capsfuse_lite.cli.common import HELP_FORCE, HELP_QUIET
from capsfuse_lite.defaults import DEFAULT_HUB_REPO

TYPES_HELP = ("f32, f16, bf16, q8_0 (written directly) or q4_0, q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer); "
              "q8_0 and f16 stay closest to upstream's bf16.")


def convert(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=f"Checkpoint folder (config.json, tokenizer.model, .safetensors or .bin weights) or a Hugging Face hub id, downloaded to the HF cache (HF_HOME).  [default: {DEFAULT_HUB_REPO}]", show_default=False)] = DEFAULT_HUB_REPO,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTPUT", help="GGUF file to write; a missing folder is created.", dir_okay=False)] = ...,
    out_type: Annotated[str, typer.Option("--type", "-t", metavar="TYPE", help=TYPES_HELP)] = "q4_k_m",
    revision: Annotated[Optional[str], typer.Option(metavar="REV", help="Branch, tag or commit of a hub id (not for a folder).  [default: main]")] = None,
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=HELP_QUIET)] = False,
) -> None:
    """Convert CapsFus-LLaMA (a LLaMA checkpoint) to a GGUF.

    Tensors are streamed one by one: memory stays flat whatever the checkpoint's size, and torch is
    not needed. OUTPUT appears only when complete.
    """
    from capsfuse_lite.cli.common import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with user_errors():
        from capsfuse_lite.convert import convert_checkpoint

        convert_checkpoint(source, output, out_type=out_type, revision=revision, force=force,
                           progress=False if quiet else None)


def _size(n: int) -> str:
    from capsfuse_lite.convert.progress import human_bytes

    return human_bytes(n)


def info(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="GGUF file.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the details as JSON.")] = False,
) -> None:
    """Show what a GGUF holds and whether it is complete.

    Architecture, size, quantization, vocabulary, the capsfuse defaults fuse takes from it
    (beams, max new tokens, prompt template) and whether this llama.cpp build offloads to a GPU.
    Exit code 2 when the file is truncated or not a GGUF.
    """
    from capsfuse_lite.cli.common import user_errors

    with user_errors():
        from capsfuse_lite.convert.info import describe_gguf

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
    from capsfuse_lite.cli.common import error_line

    for problem in details.get("problems") or ():
        error_line(f"{model}: {problem}")
    if details.get("problems"):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("info")(info)
