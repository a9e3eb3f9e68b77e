"""Resolve SOURCE: a local folder as is, or a Hugging Face hub id through ``snapshot_download``.

Only config, tokenizer and weight files are fetched (``allow_patterns``); safetensors weights are
preferred and PyTorch ``.bin`` shards are fetched only when the repo has no safetensors. The
standard hub environment applies (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
``HF_ENDPOINT``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from capsfuse_lite.errors import HubError

from .source import CONFIG_FILES, TOKENIZER_FILES

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
BASE_PATTERNS = [*CONFIG_FILES, *TOKENIZER_FILES]
SAFETENSORS_PATTERNS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class ResolvedSource:
    folder: Path
    repo_id: str | None  # None for a local folder
    revision: str | None  # commit hash of a hub snapshot

    @property
    def label(self) -> str:
        return self.repo_id or str(self.folder)


def _has_weights(folder: Path, patterns: list[str]) -> bool:
    return any(any(folder.glob(p)) for p in patterns if not p.endswith(".json"))


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise HubError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such model repo on the Hugging Face hub (or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} does not exist in {repo_id}") from None
    except LocalEntryNotFoundError:
        reason = (f"{where}: the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set) and the model is not "
                  "in the local cache")
        raise HubError(f"{reason}; connect to the network, or pass a local model folder as SOURCE",
                       reason=reason) from None
    except (OSError, ValueError) as exc:  # connection errors, HTTP errors, invalid ids
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"{where}: download from the Hugging Face hub failed ({first})"
        raise HubError(f"{reason}; check the network, or pass a local model folder as SOURCE", reason=reason) from None


def resolve_source(source: str | Path, revision: str | None = None) -> ResolvedSource:
    """A local folder, or the cached snapshot of a hub repo (downloaded if needed)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{path}: SOURCE must be a model folder or a hub id, not a file")
        if revision:
            raise HubError(f"{path}: --revision only applies to hub ids, not to a local folder")
        return ResolvedSource(path.resolve(), None, None)
    text = str(source)
    if not _REPO_ID.match(text):
        raise HubError(f"{text}: no such folder, and not a hub id of the form owner/name")
    folder = _download(text, revision, [*BASE_PATTERNS, *SAFETENSORS_PATTERNS])
    if not _has_weights(folder, SAFETENSORS_PATTERNS):
        folder = _download(text, revision, [*BASE_PATTERNS, *BIN_PATTERNS])
    commit = folder.name if _COMMIT.match(folder.name) else revision
    return ResolvedSource(folder, text, commit)
