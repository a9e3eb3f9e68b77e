"""The settings of a fuse run: :class:`FuseConfig`, the ``--shard``/``--slots`` parsers, and the settings
fingerprint a journal is keyed by (shared by every file of a dataset run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capsfuse_lite import defaults
from capsfuse_lite.errors import ConfigError
from capsfuse_lite.formats import parse_csv_delimiter
from capsfuse_lite.run.rows import RESERVED_COLUMNS

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shard I of N, counting from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N (shards are numbered 0 .. N-1)")
    return i, n


def parse_slots(text: str | int | None) -> int | str:
    """``--slots``: ``auto`` or a positive integer."""
    if text is None or text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--slots {text!r}: give a number of rows decoded at once, e.g. --slots 32, or auto") from None
    if value < 1:
        raise ConfigError(f"--slots must be at least 1, got {value}")
    return value


def check_writable_folder(output: Path) -> None:
    """Fail now, with one line, if ``output`` cannot be created (read-only folder, no permission),
    instead of after the model work; a missing folder is fine (see :mod:`capsfuse_lite.run.outputs`)."""
    from capsfuse_lite.files import check_output_folder

    check_output_folder(output)


@dataclass
class FuseConfig:
    input: str | Path
    output: str | Path
    model: str | Path | None = None  # a GGUF path (see models.resolve_model)
    input_format: str | None = None
    output_format: str | None = None
    csv_delimiter: str | None = None  # CSV input, and CSV output (default: the CSV input's, else ",")
    raw_field: str = defaults.RAW_FIELD
    synthetic_field: str = defaults.SYNTHETIC_FIELD
    output_field: str = defaults.OUTPUT_FIELD
    slots: int | str = "auto"  # rows decoded at once, or "auto" (see capsfuse_lite.engine.plan)
    beams: int | None = None
    max_new_tokens: int | None = None
    n_gpu_layers: int | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    kv_type: str | None = None  # the engine's KV cache element type (f16 by default)
    chat_template: str = "none"  # "auto": the prompt inside the GGUF's own chat template (defaults.CHAT_TEMPLATES)
    limit: int | None = None
    shard: tuple[int, int] | None = None
    resume: bool = False
    force: bool = False
    command: str | None = None  # the command line, recorded in the meta file

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        if self.kv_type is not None:
            from capsfuse_lite.engine.plan import KV_TYPE_BYTES

            if self.kv_type not in KV_TYPE_BYTES:
                raise ConfigError(f"--kv-type {self.kv_type}: use one of {', '.join(KV_TYPE_BYTES)}")
        self.slots = parse_slots(self.slots)
        if self.chat_template not in defaults.CHAT_TEMPLATES:
            raise ConfigError(f"--chat-template {self.chat_template}: use none (the prompt as it is; CapsFus-LLaMA's) "
                              "or auto (the GGUF's own chat template around it)")
        flags = {"beams": "--beams", "max_new_tokens": "--max-new-tokens", "n_ctx": "--ctx",
                 "n_threads": "--threads"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be 0 or more, got {self.limit}")
        if self.resume and self.force:
            raise ConfigError("--resume and --force contradict each other (--force discards the journal and starts over)")
        if self.csv_delimiter is not None:
            self.csv_delimiter = parse_csv_delimiter(self.csv_delimiter)
        if len({self.raw_field, self.synthetic_field}) < 2:
            raise ConfigError("--raw-field and --synthetic-field name the same column")
        if not self.output_field:
            raise ConfigError("--output-field must name a column")
        if self.output_field in RESERVED_COLUMNS:
            raise ConfigError(f"--output-field {self.output_field!r} is reserved: every run writes its own "
                              f"{', '.join(RESERVED_COLUMNS)} columns beside the fused caption; choose another name")
        if self.output_field in (self.raw_field, self.synthetic_field):
            raise ConfigError(f"--output-field {self.output_field!r} is an input caption column: the fused caption "
                              "would overwrite it; choose another name")


def settings_fingerprint(cfg: FuseConfig, meta: dict, model_sha256: str) -> dict:
    """The part of a journal's fingerprint that every file of a run shares: model, decoding, fields."""
    return {
        "model_sha256": model_sha256,
        "beams": cfg.beams if cfg.beams is not None else meta["num_beams"],
        "max_new_tokens": cfg.max_new_tokens if cfg.max_new_tokens is not None else meta["max_new_tokens"],
        "length_offset": meta["length_offset"],
        "max_input_tokens": meta["max_input_tokens"],
        "prompt_template": _template_sha256(cfg, meta),
        "raw_field": cfg.raw_field,
        "synthetic_field": cfg.synthetic_field,
    }


def _template_sha256(cfg: FuseConfig, meta: dict) -> str:
    """The prompt template's sha256 as the model sees it (inside its chat template with
    ``--chat-template auto``): a resume or rerun with the other choice is another prompt."""
    if cfg.chat_template == "none":
        return meta["prompt_template_sha256"]
    from capsfuse_lite.engine.fuser import effective_template_sha256

    return effective_template_sha256(meta, cfg.chat_template, str(cfg.model))


def fuser_kwargs(cfg: FuseConfig, fingerprint: dict) -> dict:
    """Keyword arguments for the engine (``Fuser``) of a run with ``cfg`` and ``fingerprint``."""
    kwargs = {k: getattr(cfg, k) for k in ("slots", "n_gpu_layers", "n_ctx", "n_threads", "kv_type")}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["beams"] = fingerprint["beams"]
    kwargs["max_new_tokens"] = fingerprint["max_new_tokens"]
    if cfg.chat_template != "none":
        kwargs["chat_template"] = cfg.chat_template
    return kwargs
