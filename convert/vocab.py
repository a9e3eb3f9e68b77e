"""The GGUF vocabulary of a LLaMA checkpoint: SentencePiece pieces plus HF added tokens.

Rules (the same ones llama.cpp's ``convert_hf_to_gguf.py`` applies, made strict):

* ids ``0 .. len(tokenizer.model)-1`` are the SentencePiece pieces with their scores and types;
* added tokens (``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``)
  must continue that range without gaps (CapsFus-LLaMA: ``[PAD]`` = 32000). An added token that
  names an existing id must repeat that id's piece. Added tokens are CONTROL tokens when HF
  treats them as special (``special: true`` or named in ``special_tokens_map.json``), otherwise
  USER_DEFINED; their score is -1000, as in llama.cpp;
* the token count must equal the embedding rows. If the tokenizer has *fewer* tokens than rows
  (models padded to a multiple of 64, say), the extra rows are unreachable and get the
  placeholder entries ``[PAD<id>]`` of type UNUSED; *more* tokens than rows is refused. Ids are
  never shifted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import CheckpointError

from .source import LlamaConfig
from .spm import CONTROL, UNUSED, USER_DEFINED, SentencePieceModel, load_sentencepiece

log = logging.getLogger("capsfuse_lite.convert")

ADDED_TOKEN_SCORE = -1000.0


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    n_padding: int = 0  # placeholder rows appended (see the module rules)

    def __len__(self) -> int:
        return len(self.tokens)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-download it") from None


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_tokens(folder: Path, special_names: set[str]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from added_tokens.json and tokenizer_config.json."""
    added: dict[int, tuple[str, bool]] = {}
    data = _read_json(folder / "added_tokens.json")
    if data is not None:
        if not isinstance(data, dict):
            raise CheckpointError(f"{folder / 'added_tokens.json'}: expected an object of token -> id")
        for content, token_id in data.items():
            added[int(token_id)] = (str(content), content in special_names)
    config = _read_json(folder / "tokenizer_config.json") or {}
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is None:
            continue
        special = bool(entry.get("special", False)) or content in special_names
        previous = added.get(int(token_id))
        if previous is not None and previous[0] != content:
            raise CheckpointError(
                f"{folder}: added token id {token_id} is {previous[0]!r} in added_tokens.json but {content!r} in tokenizer_config.json"
            )
        added[int(token_id)] = (content, special)
    return added


def build_vocab(folder: Path, config: LlamaConfig, n_rows: int) -> Vocab:
    """The vocabulary for an embedding matrix of ``n_rows`` rows (see the module rules)."""
    folder = Path(folder)
    sp_path = folder / "tokenizer.model"
    if not sp_path.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.model; capsfuse-lite needs LLaMA's SentencePiece tokenizer")
    sp: SentencePieceModel = load_sentencepiece(sp_path)
    special_map = _read_json(folder / "special_tokens_map.json") or {}
    specials = {role: _token_content(value) for role, value in special_map.items()}
    special_names = {name for name in specials.values() if name}
    tokenizer_config = _read_json(folder / "tokenizer_config.json") or {}

    tokens = list(sp.pieces)
    scores = list(sp.scores)
    types = list(sp.types)
    added = _added_tokens(folder, special_names)
    for token_id in sorted(added):
        content, special = added[token_id]
        if token_id < len(sp):
            if tokens[token_id] != content:
                raise CheckpointError(
                    f"{folder}: added token {content!r} claims id {token_id}, which tokenizer.model assigns to {tokens[token_id]!r}"
                )
            continue
        if token_id != len(tokens):
            raise CheckpointError(
                f"{folder}: added token {content!r} has id {token_id} but the next free id is {len(tokens)}; "
                "a gap would shift the vocabulary, refusing"
            )
        tokens.append(content)
        scores.append(ADDED_TOKEN_SCORE)
        types.append(CONTROL if special else USER_DEFINED)

    if config.vocab_size != n_rows:
        raise CheckpointError(
            f"{folder}: config.json says vocab_size {config.vocab_size} but the embedding has {n_rows} rows; the checkpoint is inconsistent"
        )
    if len(tokens) > n_rows:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokens)} tokens but the embedding only {n_rows} rows; "
            "refusing (the extra tokens would have no embedding)"
        )
    n_padding = n_rows - len(tokens)
    if n_padding:
        log.warning("tokenizer has %d tokens, embedding %d rows: rows %d..%d become unused [PAD<id>] entries",
                    len(tokens), n_rows, len(tokens), n_rows - 1)
        for token_id in range(len(tokens), n_rows):
            tokens.append(f"[PAD{token_id}]")
            scores.append(ADDED_TOKEN_SCORE)
            types.append(UNUSED)

    by_content = {content: i for i, content in enumerate(tokens)}

    def role_id(role: str, fallback: int | None) -> int | None:
        name = specials.get(role)
        if name is not None and name in by_content:
            return by_content[name]
        return fallback if fallback is not None and 0 <= fallback < len(tokens) else None

    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=role_id("bos_token", sp.bos_id if sp.bos_id >= 0 else config.bos_token_id),
        eos_id=role_id("eos_token", sp.eos_id if sp.eos_id >= 0 else config.eos_token_id),
        unk_id=role_id("unk_token", sp.unk_id if sp.unk_id >= 0 else None),
        pad_id=role_id("pad_token", sp.pad_id if sp.pad_id >= 0 else config.pad_token_id),
        add_bos=bool(tokenizer_config.get("add_bos_token", True)),
        add_eos=bool(tokenizer_config.get("add_eos_token", False)),
        add_space_prefix=sp.add_dummy_prefix,
        n_padding=n_padding,
    )
