"""What every command module of :mod:`capsfuse_lite.cli` shares: plain-text output, the error mapping, help wording
and the help layout. Kept apart from :mod:`capsfuse_lite.cli` (which builds the app and imports the
command modules) so that a command module can be imported on its own.

Text conventions: every line a user reads is printed as plain text (:func:`plain`): paths, commands
and captions may hold brackets (``shard[red].jsonl``, ``pip install 'capsfuse-lite[parquet]'``) that
rich would otherwise take for markup. Help is click's plain layout (no rich markup in help strings)
drawn by :class:`HelpCommand`: flags show as flags, metavars as written (INPUT, OUTPUT, N), defaults
as values.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import typer
import typer.core

from capsfuse_lite.errors import CapsfuseError

# Help shared by several commands (one wording per option everywhere).
HELP_CSV_DELIMITER = "CSV field separator: one character, or tab, comma, semicolon, pipe.  [default: comma]"
HELP_INPUT_FORMAT = "json, jsonl, csv or parquet, when INPUT's extension does not tell (compression is still detected)."
HELP_OUTPUT_FORMAT = "json, jsonl, csv or parquet, when OUTPUT's extension does not tell."
HELP_RAW_FIELD = "Column with the raw alt-text (Sentence 1 of the prompt)."
HELP_SYNTHETIC_FIELD = "Column with the synthetic caption (Sentence 2)."
HELP_FORCE = "Overwrite OUTPUT if it exists."
HELP_QUIET = "Plain log lines instead of a progress bar (the default when stderr is not a terminal)."
HELP_CHAT_TEMPLATE = ("none: upstream's prompt text as it is (CapsFus-LLaMA's; also the default for other models); auto: "
                      "for another instruct model, that prompt as the user message of the GGUF's own chat template "
                      "(tokenizer.chat_template, rendered by llama.cpp).  [default: none]")
HELP_VERBOSE = "Show llama.cpp's own log lines (model loading, devices), e.g. when a model does not load."


def help_path(path) -> str:
    """``path`` as help text shows it: ``~`` for the home folder."""
    from pathlib import Path

    text, home = str(path), str(Path.home())
    return "~" + text[len(home):] if home != "/" and text.startswith(home + "/") else text


def help_threads() -> str:
    from capsfuse_lite.machine import default_threads

    return f"[default: {default_threads()}, the cores this process may use]"


def plain(*parts: Any, style: str | None = None):
    """``parts`` as one rich Text, never parsed as markup (``style`` applies to the first part only)."""
    from rich.text import Text

    text = Text()
    for k, part in enumerate(parts):
        text.append(str(part), style=style if k == 0 else None)
    return text


def stderr_console():
    """A rich console on stderr that highlights nothing and never wraps a line into two."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """Print a one-line user error to stderr (``error: message``, the message as plain text)."""
    stderr_console().print(plain("error:", " ", message, style="bold red"))


def verbose_llama(verbose: bool) -> None:
    """``--verbose``: show llama.cpp's own log lines (model loading, devices, errors' context)."""
    if verbose:
        from capsfuse_lite.engine.llama import set_verbose

        set_verbose(True)


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
    private libstdc++ crashes otherwise; see capsfuse_lite.engine.llama). Commands that may load a model call
    this first; --help and the other commands stay light."""
    from capsfuse_lite.engine import llama  # noqa: F401


class HelpCommand(typer.core.TyperCommand):
    """A command whose help reads the same under every typer version: the usage line shows arguments by
    their metavar (``INPUT``, ``[SOURCE]``, ``PART...``), the Arguments section names them without a
    type, options show ``-o, --output OUTPUT`` with their metavar, flags show as flags, and a default is
    stated as ``[default: value]`` unless the help already states it. Every command gets this class
    (see :func:`_register`)."""

    @staticmethod
    def _metavar(param) -> str:
        return param.metavar or param.name.upper()

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = self._metavar(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    @staticmethod
    def _extras(param) -> str:
        extra = []
        default = param.default
        help_text = param.help or ""
        flag = getattr(param, "is_flag", False)
        unset = default is None or default is False or default in ("", (), [])
        if (not unset and not flag and param.show_default is not False
                and "[default:" not in help_text and not callable(default)):
            extra.append(f"default: {default}")
        if param.required and param.param_type_name == "option":
            extra.append("required")
        return f"  [{'; '.join(extra)}]" if extra else ""

    def format_options(self, ctx, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            help_text = (param.help or "") + self._extras(param)
            if param.param_type_name == "argument":
                arguments.append((self._metavar(param), help_text))
                continue
            names = ", ".join(sorted(param.opts, key=lambda o: o.startswith("--")))
            if param.secondary_opts:
                names += " / " + ", ".join(param.secondary_opts)
            if not getattr(param, "is_flag", False) and not getattr(param, "count", False):
                names += f" {self._metavar(param)}"
            options.append((names, help_text))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    _write_dl(formatter, rows)


def _write_dl(formatter, rows: list[tuple[str, str]], col_max: int = 30, spacing: int = 2) -> None:
    """click's two-column definition list, wrapped without breaking words at hyphens (paths, commands
    and option names such as capsfuse-lite or --max-new-tokens stay whole)."""
    import textwrap

    first_col = min(max(len(first) for first, _ in rows), col_max) + spacing
    indent = " " * formatter.current_indent
    width = max(formatter.width - first_col - formatter.current_indent, 20)
    wrap = textwrap.TextWrapper(width=width, break_on_hyphens=False, break_long_words=False)
    for first, second in rows:
        formatter.write(f"{indent}{first}")
        lines = wrap.wrap(second) if second else []
        if not lines:
            formatter.write("\n")
            continue
        if len(first) <= first_col - spacing:
            formatter.write(" " * (first_col - len(first)))
        else:
            formatter.write("\n" + indent + " " * first_col)
        formatter.write(lines[0] + "\n")
        for line in lines[1:]:
            formatter.write(f"{indent}{' ' * first_col}{line}\n")
