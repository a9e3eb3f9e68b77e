"""Errors a user can cause.

Every exception meant for a person derives from :class:`CapsfuseError`. The CLI prints its
message as one line (no traceback) and exits with code 2. Messages name the file, row or
setting at fault and say how to fix it.
"""

from __future__ import annotations


class CapsfuseError(Exception):
    """Base class of all user-facing errors (exit code 2)."""

    exit_code = 2


class InputFileError(CapsfuseError):
    """An input file is missing, malformed or lacks a needed column."""


class OutputExistsError(CapsfuseError):
    """The output file exists and --force was not given."""


class DiskSpaceError(CapsfuseError):
    """Not enough free disk space for the output."""


class HubError(CapsfuseError):
    """The Hugging Face hub could not be reached, or the repo/revision does not exist."""


class CheckpointError(CapsfuseError):
    """A checkpoint folder or shard is missing, truncated, corrupt or unsupported."""


class UnsafePickleError(CheckpointError):
    """A pickle in a checkpoint asks for something other than tensor data."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture (or a config value) is not supported."""


class ModelLoadError(CapsfuseError):
    """llama.cpp could not load a GGUF file or create a context."""


class ConfigError(CapsfuseError):
    """A command-line option or setting is invalid."""
