"""The `capsfuse-lite` command line: a thin typer layer over the library.

Each command lives in a ``cli_*.py`` module next to this one and only builds a config, calls the
library and maps errors. :func:`user_errors` turns :class:`CapsfuseError` into one line on
stderr and exit code 2. Command modules must not import llama_cpp, torch or pyarrow at import
time, so that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer

from . import __version__
from .errors import CapsfuseError

app = typer.Typer(
    name="capsfuse-lite",
    help="CapsFusion caption fusion with llama.cpp: convert CapsFus-LLaMA to GGUF, fuse caption files, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def error_line(message: str) -> None:
    """Print a one-line user error to stderr."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Map CapsfuseError to one stderr line and exit code 2 (no traceback)."""
    try:
        yield
    except CapsfuseError as exc:
        error_line(str(exc))
        raise typer.Exit(exc.exit_code) from None


def native_first() -> None:
    """Load llama.cpp's shared libraries before anything imports numpy or pyarrow (a CUDA build with a
    private libstdc++ crashes otherwise; see capsfuse_lite.llama). Commands that may load a model call
    this first; --help and the other commands stay light."""
    from . import llama  # noqa: F401


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"capsfuse-lite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """CapsFusion caption fusion with llama.cpp."""


def _register() -> None:
    import importlib

    for name in ("cli_convert", "cli_prompts", "cli_fuse", "cli_bench", "cli_benchmodel"):
        importlib.import_module(f"{__package__}.{name}").register(app)


_register()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        error_line("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
