"""``capsfuse-lite bench-model``: a thin wrapper over :func:`capsfuse_lite.bench.model.write_bench_model`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from capsfuse_lite.cli.common import HELP_FORCE, HELP_QUIET

SHAPES_HELP = ("LLaMA shape: tiny (hidden 64, 2 layers), cpu768 (hidden 768, 8 layers: README's CPU tables), "
               "7b, or 13b (CapsFus-LLaMA's); --hidden, --ffn, --layers, --heads and --kv-heads change single fields.")
TYPES_HELP = "q4_k_m (llama.cpp's Q4_K_M mixture), q4_0 (llama.cpp's Q4_0 mixture), q8_0 or f16."


def bench_model(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTPUT", help="GGUF file to write; a missing folder is created.", dir_okay=False)] = ...,
    shape: Annotated[str, typer.Option("--shape", "-s", metavar="SHAPE", help=SHAPES_HELP)] = "13b",
    out_type: Annotated[str, typer.Option("--type", "-t", metavar="TYPE", help=TYPES_HELP)] = "q4_k_m",
    hidden: Annotated[Optional[int], typer.Option(metavar="N", help="Hidden size (embedding length).  [default: the shape's]")] = None,
    ffn: Annotated[Optional[int], typer.Option(metavar="N", help="Feed-forward (intermediate) size.  [default: the shape's]")] = None,
    layers: Annotated[Optional[int], typer.Option(metavar="N", help="Number of layers.  [default: the shape's]")] = None,
    heads: Annotated[Optional[int], typer.Option(metavar="N", help="Attention heads.  [default: the shape's]")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(metavar="N", help="KV heads (grouped-query attention).  [default: as many as the heads]")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Random seed; the same seed writes the same bytes.", min=0)] = 0,
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=HELP_QUIET)] = False,
) -> None:
    """Write a random-weight LLaMA GGUF for benchmarks.

    Written in seconds, with no torch and no download.
    Same architecture metadata, tokenizer (CapsFus-LLaMA's 32001 tokens) and capsfuse.* defaults as a converted CapsFus-LLaMA, and for q4_k_m/q4_0 the per-tensor types of llama.cpp's quantizer: speed measured with it is the real model's. It never emits EOS, so every row generates the full token budget; its text is meaningless.
    """
    from capsfuse_lite.cli.common import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with user_errors():
        from capsfuse_lite.bench.model import bench_shape, write_bench_model

        chosen = bench_shape(shape, hidden=hidden, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads)
        write_bench_model(output, chosen, out_type, seed=seed, force=force, progress=False if quiet else None)


def register(app: typer.Typer) -> None:
    app.command("bench-model")(bench_model)
