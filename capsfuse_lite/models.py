"""Which GGUF a run uses: ``--model PATH`` or the default in the user cache.

Without ``--model`` the default is CapsFus-LLaMA at q4_k_m in ``~/.cache/capsfuse-lite/``
(``$CAPSFUSE_LITE_CACHE``, else ``$XDG_CACHE_HOME/capsfuse-lite``). On first use it is converted
from the Hugging Face checkpoint by :func:`capsfuse_lite.convert.convert_checkpoint`, after
asking (or with ``--yes``); offline, the error says how to convert a local copy or pass ``--model``.

Also here: the file's sha256 (cached by path, size and mtime, so a multi-gigabyte model is hashed
once) and the ``capsfuse.*`` decoding defaults read from the GGUF header without loading weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

from capsfuse_lite import defaults
from capsfuse_lite.errors import ConfigError, HubError, ModelLoadError

DEFAULT_QUANT = "q4_k_m"
DEFAULT_MODEL_FILE = f"CapsFus-LLaMA-{DEFAULT_QUANT}.gguf"


def cache_dir() -> Path:
    """The user cache folder of capsfuse-lite (not created here)."""
    env = os.environ.get("CAPSFUSE_LITE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "capsfuse-lite"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_FILE


def _convert_hint(target: Path) -> str:
    return (f"convert a local copy of {defaults.DEFAULT_HUB_REPO} with "
            f"`capsfuse-lite convert /path/to/CapsFus-LLaMA -o {target} --type {DEFAULT_QUANT}`, "
            "or pass --model FILE.gguf")


def resolve_model(
    model: str | Path | None,
    *,
    yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    convert: Callable[..., Path] | None = None,
    offer_conversion: bool = True,
) -> Path:
    """The GGUF to load.

    ``model`` given: it must be an existing GGUF file. ``None``: the default q4_k_m in the cache,
    converted first if missing, after ``confirm(question)`` returns True (or ``yes``). ``convert``
    replaces :func:`convert_checkpoint` (tests). ``offer_conversion=False`` (a command without
    ``--yes``): a missing default model is an error saying how to convert it.
    """
    if model is not None:
        path = Path(model).expanduser()
        if path.is_dir():
            raise ConfigError(
                f"{path} is a folder; --model takes a GGUF file. Convert a checkpoint folder first: "
                f"`capsfuse-lite convert {path} -o model.gguf`"
            )
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist (--model takes a .gguf file)")
        check_gguf(path)
        return path

    target = default_model_path()
    if target.is_file():
        return target
    if not offer_conversion:
        raise ConfigError(f"no --model given and the default model {target} is not converted yet: "
                          f"`capsfuse-lite fuse` converts it on first use, or {_convert_hint(target)}")
    question = (f"No --model given and the default model is not converted yet. Download "
                f"{defaults.DEFAULT_HUB_REPO} (about 52 GB) and convert it to {DEFAULT_QUANT} "
                f"(about 8 GB) at {target}?")
    if not yes:
        if confirm is None:
            raise ConfigError(f"no --model given and {target} does not exist; pass --yes to convert "
                              f"{defaults.DEFAULT_HUB_REPO} there, or {_convert_hint(target)}")
        if not confirm(question):
            raise ConfigError(f"no model: {_convert_hint(target)}")
    if convert is None:
        from capsfuse_lite.convert import convert_checkpoint as convert
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(convert(defaults.DEFAULT_HUB_REPO, target, out_type=DEFAULT_QUANT))
    except HubError as exc:
        raise HubError(f"{exc.reason}; offline? {_convert_hint(target)}", reason=exc.reason) from None


SUPPORTED_ARCHITECTURES = ("llama",)


def check_gguf(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` is a complete GGUF of a LLaMA model (header only: no
    weights are read). Catches files that are not GGUF, truncated copies (tensor data past the end of
    the file) and other architectures (a GGUF relabelled or converted from another family)."""
    from capsfuse_lite.convert.gguf_metadata import read_gguf_layout

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file; convert a checkpoint with `capsfuse-lite convert`")
    layout = read_gguf_layout(path)
    arch = layout.meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: general.architecture is {arch!r}; capsfuse-lite runs LLaMA models "
                             "(CapsFus-LLaMA converted with `capsfuse-lite convert`) only")
    problems = layout.problems()
    if problems:
        raise ModelLoadError(f"{path}: {problems[0]}")


def sha256_cache_entry(path: Path) -> Path:
    """Where :func:`file_sha256` remembers the digest of ``path`` (absolute, resolved): one small
    file per hashed path, so a dataset of N shards costs N small writes, not N rewrites of one
    growing file, and concurrent runs (SLURM arrays, Ray workers) never drop each other's entries."""
    name = hashlib.blake2b(str(path).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return cache_dir() / "sha256" / f"{name}.json"


def file_sha256(path: str | Path, *, use_cache: bool = True) -> str:
    """sha256 of a file; remembered in the cache folder by (absolute path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = sha256_cache_entry(path)
    if use_cache:
        try:
            known = json.loads(entry.read_text())
        except (OSError, ValueError):
            known = None
        if isinstance(known, dict) and all(known.get(k) == v for k, v in key.items()) and isinstance(known.get("sha256"), str):
            return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()
    if use_cache:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**key, "sha256": value}, ensure_ascii=True))
            os.replace(tmp, entry)  # a changed file's entry is replaced, never added beside it
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return value


def gguf_defaults(path: str | Path) -> dict:
    """Decoding defaults a GGUF carries (``capsfuse.*``), falling back to :mod:`defaults`, plus its
    architecture, trained context length and quant type; read from the header only (no weights loaded)."""
    from capsfuse_lite.convert.gguf_metadata import read_gguf_metadata

    meta = read_gguf_metadata(path)

    def integer(key, fallback):
        try:
            return int(meta.get(key, fallback))
        except (TypeError, ValueError):
            raise ModelLoadError(f"{path}: metadata {key}={meta[key]!r} is not an integer; re-run `capsfuse-lite convert`") from None

    quant = None
    if "general.file_type" in meta:
        from gguf import LlamaFileType

        try:
            quant = LlamaFileType(int(meta["general.file_type"])).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        except ValueError:
            quant = str(meta["general.file_type"])
    template = str(meta.get(defaults.KEY_PROMPT_TEMPLATE) or defaults.PROMPT_TEMPLATE)
    arch = str(meta.get("general.architecture", ""))
    return {
        "architecture": arch,
        "context_length": integer(f"{arch}.context_length", 0),  # trained positions; 0 if the GGUF does not say
        "num_beams": integer(defaults.KEY_NUM_BEAMS, defaults.NUM_BEAMS),
        "max_new_tokens": integer(defaults.KEY_MAX_NEW_TOKENS, defaults.MAX_NEW_TOKENS),
        "length_offset": integer(defaults.KEY_LENGTH_OFFSET, defaults.LENGTH_OFFSET),
        "max_input_tokens": integer(defaults.KEY_MAX_INPUT_TOKENS, defaults.MAX_INPUT_TOKENS),
        "prompt_template": template,
        "prompt_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()[:16],
        "quant": quant,
        "capsfuse_metadata": any(str(key).startswith("capsfuse.") for key in meta),  # made by capsfuse-lite
        "chat_template": meta.get("tokenizer.chat_template") or None,  # the GGUF's own, for --chat-template auto
    }


def terminal_confirm() -> Callable[[str], bool] | None:
    """A yes/no prompt on the terminal, or None when stdin is not a terminal (then --yes is needed)."""
    if not sys.stdin.isatty():
        return None
    import typer

    def confirm(question: str) -> bool:
        try:
            return typer.confirm(question, default=False, err=True)
        except (EOFError, typer.Abort):  # Ctrl-D at the question: a "no", not an internal error
            return False

    return confirm
