"""The `capsfuse-lite` command line: a thin typer layer over the library.

Each command lives in a module of this package and only builds a config, calls the
library and maps errors. :func:`user_errors` turns :class:`CapsfuseError` into one line on
stderr and exit code 2. Command modules must not import llama_cpp, torch or pyarrow at import
time, so that ``--help`` stays fast.

What the commands share (plain-text output, :func:`user_errors`, help wording and layout) is in
:mod:`capsfuse_lite.cli.common`; every line a user reads is plain text, never rich markup.

Exit codes (README "Exit codes"): 0 done (also "already done"), 2 a problem with the input or
settings (:class:`CapsfuseError`, or a usage error from the parser), 130 interrupted by Ctrl-C,
143 stopped by SIGTERM (``fuse`` saves its journal first), 1 an internal error: a traceback and how
to report it (:func:`main`).
"""

from __future__ import annotations

import platform
import sys
import traceback

import typer
import typer.core

from capsfuse_lite import __version__
from capsfuse_lite.cli.common import HelpCommand, error_line, native_first, plain, user_errors  # noqa: F401 (used by commands)

app = typer.Typer(
    name="capsfuse-lite",
    help="CapsFusion caption fusion with llama.cpp: convert CapsFus-LLaMA to GGUF, fuse caption files, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # help uses up to 120 columns of a wide terminal
)

EXIT_INTERNAL_ERROR = 1


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

    for name in ("convert", "prompts", "fuse", "bench", "bench_model"):
        importlib.import_module(f"{__package__}.{name}").register(app)
    for info in app.registered_commands:  # every command's help in one layout (HelpCommand)
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = HelpCommand


_register()


def internal_error_report(exc: BaseException) -> str:
    """The line printed under the traceback of an unexpected error (exit code 1)."""
    try:
        from importlib.metadata import version

        llama_cpp = version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - the report must not fail
        llama_cpp = "?"
    return (f"internal error ({type(exc).__name__}): this is a bug in capsfuse-lite, not a problem with your "
            f"input. Please report it to the capsfuse-lite developers with the traceback above, the command you "
            f"ran and these versions: capsfuse-lite {__version__}, llama-cpp-python {llama_cpp}, "
            f"Python {platform.python_version()}, {platform.platform()}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        error_line("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - anything that is not a CapsfuseError is a bug
        traceback.print_exc()
        error_line(internal_error_report(exc))
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
