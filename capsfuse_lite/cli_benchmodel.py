"""``capsfuse-lite bench-model``: a thin wrapper over :func:`capsfuse_lite.benchmodel.write_bench_model`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

SHAPES_HELP = ("LLaMA shape: tiny (hidden 64, 2 layers), cpu768 (hidden 768, 8 layers: README's CPU tables), "
               "7b, or 13b (CapsFus-LLaMA's). --hidden/--ffn/--layers/--heads/--kv-heads change single fields.")
TYPES_HELP = "q4_k_m (llama.cpp's Q4_K_M mixture), q4_0 (llama.cpp's Q4_0 mixture), q8_0 or f16."


def bench_model(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .gguf file.", dir_okay=False)] = ...,
    shape: Annotated[str, typer.Option("--shape", "-s", help=SHAPES_HELP)] = "13b",
    out_type: Annotated[str, typer.Option("--type", "-t", help=TYPES_HELP)] = "q4_k_m",
    hidden: Annotated[Optional[int], typer.Option(help="Hidden size (embedding length).")] = None,
    ffn: Annotated[Optional[int], typer.Option(help="Feed-forward (intermediate) size.")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Number of layers.")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads.")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="KV heads (grouped-query attention; default: = heads).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same bytes.", min=0)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
) -> None:
    """Write a random-weight LLaMA GGUF for benchmarks in seconds (no torch, no download).

    Same architecture metadata, tokenizer (CapsFus-LLaMA's 32001 tokens) and capsfuse.* defaults as a converted CapsFus-LLaMA, and for q4_k_m/q4_0 the per-tensor types of llama.cpp's quantizer: speed measured with it is the real model's. It never emits EOS, so every row generates the full token budget; its text is meaningless.
    """
    from .cli import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    with user_errors():
        from .benchmodel import bench_shape, write_bench_model

        chosen = bench_shape(shape, hidden=hidden, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads)
        write_bench_model(output, chosen, out_type, seed=seed, force=force, progress=progress)


def register(app: typer.Typer) -> None:
    app.command("bench-model")(bench_model)
