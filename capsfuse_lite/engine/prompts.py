"""CapsFusion prompts: the upstream template and the 256-token length rule.

Upstream (CapsFusion's ``capsfusion_inference.py``) strips both captions, fills the template, and
if the BOS-prefixed prompt has ``total >= 256`` tokens it drops the last ``total - 256`` tokens of
the raw caption (tokenized on its own), decodes them and fills the template again, once. Two bugs
follow: a prompt of exactly 256 tokens loses its whole raw caption (``ids[:-0]`` is empty), and a
single pass can still leave the prompt over budget because tokens do not add up across the
decode/re-encode boundary (the tokenizer then silently cut the prompt's *end*, "New Sentence:").

The rule implemented here keeps upstream's intent without those bugs:

1. ``raw`` and ``synthetic`` are stripped; the prompt is the template filled with them. If its
   token ids (BOS included) number at most ``max_tokens`` it is used whole.
2. Otherwise the raw caption is tokenized on its own (without BOS) and its last
   ``excess = len(prompt_ids) - max_tokens`` tokens are dropped; the kept tokens are decoded, the
   text cleaned (trailing U+FFFD from a cut inside a multi-byte character removed, then
   whitespace stripped), the template filled again and re-tokenized. This repeats, always
   dropping at least ``excess`` more tokens of the raw caption, until the prompt fits or no raw
   token is left (raw caption empty).
3. Only if the raw caption is empty and the prompt still does not fit, the synthetic caption is
   trimmed the same way.
4. If even the bare template does not fit, :class:`~capsfuse_lite.errors.ConfigError`.

Token ids are llama.cpp's SentencePiece tokenization with BOS (equal to ``sentencepiece``'s, as the
tests check); BOS as the GGUF's ``tokenizer.ggml.add_bos_token`` says (CapsFus-LLaMA: yes).

Other instruct models (``--chat-template auto``): the filled template is the user message of the
model's own chat template, ``pre + prompt + post``; ``pre`` and ``post`` (e.g. ChatML's
``<|im_start|>user\n`` and ``<|im_end|>\n<|im_start|>assistant\n``) are tokenized with their special
tokens, the prompt between them exactly as without a chat template (captions never become special
tokens), and the budget counts all of it. One deliberate difference from upstream's HF slow ``LlamaTokenizer``: text such as
``</s>`` or ``<s>`` inside a caption stays text, where the HF tokenizer turned it into the special
token (a web alt-text cannot end the prompt early).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from capsfuse_lite.defaults import MAX_INPUT_TOKENS, PROMPT_TEMPLATE
from capsfuse_lite.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{(raw|synthetic)\}")


@dataclass(frozen=True)
class Prompt:
    """A model input: its text, its token ids (BOS first) and whether a caption was shortened."""

    text: str
    token_ids: list[int]
    truncated: bool


def validate_template(template: str) -> str:
    """Return ``template`` if it holds ``{raw}`` and ``{synthetic}`` exactly once each."""
    found = _PLACEHOLDER.findall(template)
    if sorted(found) != ["raw", "synthetic"]:
        raise ConfigError(
            "a prompt template needs the placeholders {raw} and {synthetic} exactly once each; "
            f"this one has {found or 'none'}"
        )
    return template


def render(template: str, raw: str, synthetic: str) -> str:
    """Fill the template's ``{raw}`` and ``{synthetic}`` in one pass (so braces inside a caption
    are never themselves substituted)."""
    values = {"raw": raw, "synthetic": synthetic}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def clean_decoded(text: str) -> str:
    """Text of kept caption tokens: replacement characters left by a cut inside a multi-byte
    character are removed from the end, then surrounding whitespace is stripped."""
    return text.rstrip("\ufffd").strip()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptBuilder:
    """Builds :class:`Prompt` objects under the length rule (see the module docstring).

    ``tokenize(text)`` must return the ids *with* BOS as the model sees them; ``detokenize(ids)``
    the text of ids. The number of special tokens ``tokenize`` adds is measured once from
    ``tokenize("")`` and removed when a caption is tokenized on its own. ``chat``: the chat
    template's text before and after the prompt, tokenized by ``tokenize_chat`` (special tokens
    parsed, no BOS); the prompt's own ids stay ``tokenize``'s, after its BOS.
    """

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        detokenize: Callable[[list[int]], str],
        template: str = PROMPT_TEMPLATE,
        max_tokens: int = MAX_INPUT_TOKENS,
        *,
        chat: tuple[str, str] | None = None,
        tokenize_chat: Callable[[str], list[int]] | None = None,
    ):
        self.tokenize = tokenize
        self.detokenize = detokenize
        self.template = validate_template(template)
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._n_special = len(tokenize(""))
        self.chat = chat
        if chat is not None:
            if tokenize_chat is None:
                raise ValueError("a chat template's text needs tokenize_chat")
            self._chat_ids = (tokenize_chat(chat[0]), tokenize_chat(chat[1]))

    def _ids(self, text: str) -> list[int]:
        """The model's ids for a filled template: ``tokenize(text)``, inside the chat template if any."""
        ids = self.tokenize(text)
        if self.chat is None:
            return ids
        n = self._n_special
        return ids[:n] + self._chat_ids[0] + ids[n:] + self._chat_ids[1]

    def _text(self, text: str) -> str:
        return text if self.chat is None else self.chat[0] + text + self.chat[1]

    def prefix_ids(self) -> list[int]:
        """Ids of the instruction before the first caption (the engine evaluates them once and reuses
        the part every prompt shares with them)."""
        return self._ids(self.prefix_text)[: None if self.chat is None else -len(self._chat_ids[1]) or None]

    @property
    def prefix_text(self) -> str:
        """The instruction text before the first caption placeholder (shared by every prompt)."""
        return self.template[: _PLACEHOLDER.search(self.template).start()]

    def build(self, raw: str, synthetic: str) -> Prompt:
        """The prompt for one pair of captions."""
        raw, synthetic = raw.strip(), synthetic.strip()
        text = render(self.template, raw, synthetic)
        ids = self._ids(text)
        if len(ids) <= self.max_tokens:
            return Prompt(self._text(text), ids, False)
        text, ids = self._shrink(raw, lambda r: render(self.template, r, synthetic), ids)
        if len(ids) > self.max_tokens:
            text, ids = self._shrink(synthetic, lambda s: render(self.template, "", s), ids)
        if len(ids) > self.max_tokens:
            raise ConfigError(
                f"the prompt template alone is {len(ids)} tokens, more than the {self.max_tokens}-token "
                "prompt budget; use a shorter template or a larger budget"
            )
        return Prompt(self._text(text), ids, True)

    def _shrink(self, caption: str, fill: Callable[[str], str], ids: list[int]) -> tuple[str, list[int]]:
        """Drop tokens from the end of ``caption`` until ``fill(caption)`` fits or it is empty."""
        caption_ids = self.tokenize(caption)[self._n_special :]
        keep = len(caption_ids)
        text = fill(caption)
        while len(ids) > self.max_tokens and keep > 0:
            keep = max(0, keep - (len(ids) - self.max_tokens))
            text = fill(clean_decoded(self.detokenize(caption_ids[:keep])) if keep else "")
            ids = self._ids(text)
        return text, ids


@dataclass
class PreviewSummary:
    rows: int = 0
    truncated: int = 0
    skipped: int = 0
    max_tokens: int = 0


def preview_records(
    rows: Iterable[tuple[int, dict]],
    build: Callable[[str, str], Prompt],
    captions: Callable[[dict], tuple[str, str, str | None]],
    summary: PreviewSummary,
    limit: int | None = None,
) -> Iterator[dict]:
    """One JSON-ready record per input row: ``{"row", "prompt", "token_ids", "n_tokens",
    "truncated"}``, or ``{"row", "skipped": reason}`` when ``captions(row)`` gives a reason (the
    same rows ``fuse`` skips). ``summary`` is updated as records are produced."""
    for index, row in rows:
        if limit is not None and summary.rows >= limit:
            return
        summary.rows += 1
        raw, synthetic, reason = captions(row)
        if reason is not None:
            summary.skipped += 1
            yield {"row": index, "skipped": reason}
            continue
        prompt = build(raw, synthetic)
        summary.truncated += prompt.truncated
        summary.max_tokens = max(summary.max_tokens, len(prompt.token_ids))
        yield {
            "row": index,
            "prompt": prompt.text,
            "token_ids": prompt.token_ids,
            "n_tokens": len(prompt.token_ids),
            "truncated": prompt.truncated,
        }
