"""Prompts: llama.cpp-built prompts equal an independent sentencepiece implementation of the
256-token rule, on the sample rows and on made-up long / boundary / unicode rows; the template
and budget come from the GGUF's capsfuse.* metadata; the `prompts` command writes them out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsfuse_lite import defaults
from capsfuse_lite.errors import ConfigError, OutputExistsError
from capsfuse_lite.engine.prompts import PromptBuilder, common_prefix_length, render, validate_template

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VOCAB_GGUF = FIXTURES / "ggml-vocab-llama-spm.gguf"
MAX = defaults.MAX_INPUT_TOKENS


# -- the independent reference: sentencepiece + str.format ---------------------------------------


def reference_prompt(sp, raw: str, synthetic: str, template: str = defaults.PROMPT_TEMPLATE, max_tokens: int = MAX):
    """(text, ids, truncated) by the rule: drop tokens from the end of the raw caption (decode,
    refill, re-encode, repeat) until the BOS-prefixed prompt fits; then the synthetic caption."""

    def encode(text: str) -> list[int]:
        return [sp.bos_id()] + sp.encode(text)

    captions = {"raw": raw.strip(), "synthetic": synthetic.strip()}
    text = template.format(**captions)
    ids = encode(text)
    truncated = len(ids) > max_tokens
    for name in ("raw", "synthetic"):
        pieces = sp.encode(captions[name])
        keep = len(pieces)
        while len(ids) > max_tokens and keep > 0:
            keep = max(0, keep - (len(ids) - max_tokens))
            captions[name] = sp.decode(pieces[:keep]).rstrip("\ufffd").strip() if keep else ""
            text = template.format(**captions)
            ids = encode(text)
    return text, ids, truncated


@pytest.fixture(scope="module")
def sp(sp_model_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))


@pytest.fixture(scope="module")
def preview():
    """llama.cpp's tokenizer from the real LLaMA vocab GGUF (no capsfuse metadata: defaults)."""
    from capsfuse_lite.engine.fuser import PromptPreview

    with PromptPreview(VOCAB_GGUF) as p:
        yield p


def words_to(sp, n_tokens: int, synthetic: str = "A dog on a beach.") -> str:
    """A raw caption of single-token words whose prompt is exactly ``n_tokens`` tokens long."""
    words = ["cat", "dog", "red", "big", "sun", "car"]
    raw, length, i = "", 0, 0
    while length < n_tokens:
        raw = f"{raw} {words[i % len(words)]}".strip()
        length = len([sp.bos_id()] + sp.encode(defaults.PROMPT_TEMPLATE.format(raw=raw, synthetic=synthetic)))
        i += 1
    assert length == n_tokens
    return raw


def made_up_rows(sp) -> dict[str, tuple[str, str]]:
    sentence = "Vintage 1970s Polaroid photo #{i}: a red Volkswagen T2 camper van parked near Lake Tahoe, CA, price $12,500 (negotiable) "
    alt_3000 = "".join(sentence.format(i=i) for i in range(30))[:3000]
    long_synthetic = " ".join(f"a small brown dog number {i} runs across a sunny green field" for i in range(40))
    return {
        "exactly_256": (words_to(sp, 256), "A dog on a beach."),
        "exactly_257": (words_to(sp, 257), "A dog on a beach."),
        "alt_text_3000_chars": (alt_3000, "A van parked by a lake."),
        "long_synthetic": ("Summer dog", long_synthetic),
        "both_long": (alt_3000, long_synthetic),
        "empty_raw_long_synthetic": ("", long_synthetic),
        "unicode_emoji": ("Äpfel und Birnen 🍎🍐 — Ørsted 東京タワー 🦙🦙 " * 40, "Fruit on a table."),
        "emoji_only": ("🦙" * 300, "A llama."),
        "cjk": ("東京の夜景とスカイツリーの写真、高解像度の壁紙 " * 30, "A city skyline at night."),
        "special_token_text": ("Buy now </s> <s> [PAD] {synthetic} {raw} best price", "A shop {x} sign."),
        "surrounding_whitespace": ("  \n\tbeach  at sunset \n", "\t A beach. \n"),
        "empty_both": ("", ""),
        "newlines_inside": ("line one\nline two\n\nline three " * 25, "Some text."),
    }


def check_against_reference(sp, build, raw: str, synthetic: str):
    prompt = build(raw, synthetic)
    text, ids, truncated = reference_prompt(sp, raw, synthetic)
    assert prompt.token_ids == ids
    assert prompt.text == text
    assert prompt.truncated == truncated
    assert len(prompt.token_ids) <= MAX
    assert prompt.token_ids[0] == sp.bos_id()
    return prompt


def test_sample_rows_match_sentencepiece_reference(sp, preview, sample_rows):
    truncated = 0
    for row in sample_rows:
        prompt = check_against_reference(sp, preview.build, row[defaults.RAW_FIELD], row[defaults.SYNTHETIC_FIELD])
        truncated += prompt.truncated
    assert truncated >= 1  # the sample holds a row over the budget


def test_made_up_rows_match_sentencepiece_reference(sp, preview):
    for name, (raw, synthetic) in made_up_rows(sp).items():
        try:
            check_against_reference(sp, preview.build, raw, synthetic)
        except AssertionError as exc:
            raise AssertionError(f"row {name}: {exc}") from None


def test_exactly_256_tokens_is_kept_whole(sp, preview):
    raw = words_to(sp, 256)
    prompt = preview.build(raw, "A dog on a beach.")
    assert len(prompt.token_ids) == 256
    assert not prompt.truncated
    assert f"Sentence 1: {raw}\n" in prompt.text


def test_257_tokens_drop_the_end_of_the_raw_caption(sp, preview):
    raw = words_to(sp, 257)
    prompt = preview.build(raw, "A dog on a beach.")
    assert prompt.truncated
    assert len(prompt.token_ids) == 256
    kept = prompt.text.split("Sentence 1: ", 1)[1].split("\nSentence 2: ", 1)[0]
    assert raw.startswith(kept) and len(kept) < len(raw)
    assert prompt.text.endswith("\nSentence 2: A dog on a beach.\nNew Sentence:")


def test_synthetic_is_trimmed_only_after_raw_is_empty(sp, preview):
    rows = made_up_rows(sp)
    prompt = preview.build(*rows["both_long"])
    assert prompt.truncated and len(prompt.token_ids) <= MAX
    assert "Sentence 1: \nSentence 2: a small brown dog number 0" in prompt.text
    assert prompt.text.endswith("\nNew Sentence:")
    short_raw = preview.build(*rows["long_synthetic"])
    assert "Sentence 1: \nSentence 2:" in short_raw.text  # "Summer dog" gave way first


def test_a_cut_inside_an_emoji_leaves_no_replacement_character(sp, preview):
    prompt = preview.build("🦙" * 300, "A llama.")
    assert prompt.truncated
    assert "\ufffd" not in prompt.text
    kept = prompt.text.split("Sentence 1: ", 1)[1].split("\n", 1)[0]
    assert kept and set(kept) == {"🦙"}


def test_special_token_text_stays_plain_text(sp, preview):
    prompt = preview.build("Buy now </s> here", "A shop.")
    assert 2 not in prompt.token_ids  # "</s>" is not turned into EOS
    assert "Sentence 1: Buy now </s> here\n" in prompt.text


def test_braces_in_captions_are_not_substituted():
    assert render("{raw}|{synthetic}", "{synthetic}", "{raw}") == "{synthetic}|{raw}"


def test_template_must_hold_both_placeholders_once():
    validate_template(defaults.PROMPT_TEMPLATE)
    for bad in ("no placeholders", "{raw} only", "{raw} {raw} {synthetic}"):
        with pytest.raises(ConfigError, match="placeholders"):
            validate_template(bad)


def test_template_longer_than_the_budget_is_a_config_error(sp):
    builder = PromptBuilder(lambda t: [sp.bos_id()] + sp.encode(t), sp.decode, max_tokens=20)
    with pytest.raises(ConfigError, match="template alone"):
        builder.build("raw", "synthetic")


def test_prefix_text_and_common_prefix(preview):
    assert preview.builder.prefix_text == defaults.PROMPT_TEMPLATE.split("{raw}")[0]
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0


def gguf_with_metadata(src: Path, dst: Path, values: dict) -> Path:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    details = {
        key: MetadataDetails(gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.UINT32, v)
        for key, v in values.items()
    }
    copy_with_new_metadata(reader, writer, details, [])
    return dst


def test_template_and_budget_come_from_gguf_metadata(sp, tmp_path):
    from capsfuse_lite.engine.fuser import PromptPreview

    template = "Merge these.\nA: {raw}\nB: {synthetic}\nMerged:"
    path = gguf_with_metadata(
        VOCAB_GGUF, tmp_path / "custom.gguf", {defaults.KEY_PROMPT_TEMPLATE: template, defaults.KEY_MAX_INPUT_TOKENS: 40}
    )
    with PromptPreview(path) as custom:
        assert custom.builder.template == template and custom.builder.max_tokens == 40
        raw = "a very long alt text " * 20
        prompt = custom.build(raw, "A dog.")
        text, ids, truncated = reference_prompt(sp, raw, "A dog.", template, 40)
        assert (prompt.text, prompt.token_ids, prompt.truncated) == (text, ids, truncated)
        assert truncated and len(ids) <= 40


def test_broken_template_in_gguf_is_refused(tmp_path):
    from capsfuse_lite.engine.fuser import PromptPreview

    path = gguf_with_metadata(VOCAB_GGUF, tmp_path / "bad.gguf", {defaults.KEY_PROMPT_TEMPLATE: "no placeholders"})
    with pytest.raises(ConfigError, match="placeholders"):
        PromptPreview(path)


def test_fuser_builds_the_same_prompts_as_the_reference(sp, tiny_gguf_f32, sample_rows):
    from capsfuse_lite import Fuser

    with Fuser(tiny_gguf_f32, slots=1, beams=1, max_new_tokens=4) as fuser:
        assert fuser.settings["template_source"] == "gguf"
        for row in sample_rows[:10]:
            check_against_reference(sp, fuser.build_prompt, row[defaults.RAW_FIELD], row[defaults.SYNTHETIC_FIELD])
        assert fuser.tokenize("hi", add_bos=False) == sp.encode("hi")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_command_writes_one_line_per_row(sp, tiny_gguf_f32, sample_rows, tmp_path):
    from typer.testing import CliRunner

    from capsfuse_lite.cli import app

    rows = sample_rows[:5] + [{"laion_2b": "", "laion_coco": "x"}, {"laion_2b": "🦙" * 300, "laion_coco": "A llama."}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "prompts.jsonl"
    result = CliRunner().invoke(app, ["prompts", str(source), "-o", str(out), "--model", str(tiny_gguf_f32)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["row"] for line in lines] == list(range(7))
    assert lines[5] == {"row": 5, "skipped": "field 'laion_2b' is empty"}
    for line, row in zip(lines[:5] + lines[6:], rows[:5] + rows[6:]):
        text, ids, truncated = reference_prompt(sp, row["laion_2b"], row["laion_coco"])
        assert (line["prompt"], line["token_ids"], line["n_tokens"], line["truncated"]) == (text, ids, len(ids), truncated)
    assert lines[6]["truncated"] is True
    again = CliRunner().invoke(app, ["prompts", str(source), "-o", str(out), "--model", str(tiny_gguf_f32)])
    assert again.exit_code == OutputExistsError.exit_code and "exists" in again.output
    limited = CliRunner().invoke(app, ["prompts", str(source), "-o", str(out), "--model", str(tiny_gguf_f32), "--limit", "2", "--force"])
    assert limited.exit_code == 0 and len(out.read_text().splitlines()) == 2
