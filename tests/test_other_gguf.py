"""Other GGUFs than CapsFus-LLaMA (issue 17): a tiny LLaMA model with a GPT-2-style vocabulary, no
BOS by its GGUF (``add_bos_token = false``) and a ChatML chat template, as SmolLM2-Instruct
(tests/gpt2_gguf.py). Prompt ids are checked against HF ``tokenizers`` on the same vocabulary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from capsfuse_lite import defaults
from capsfuse_lite.cli import app
from capsfuse_lite.engine.prompts import render
from gpt2_gguf import write_gpt2_gguf

PRE, POST = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
IM_START, IM_END, ENDOFTEXT = 1, 2, 0


@pytest.fixture(scope="module")
def corpus(sample_rows):
    return [defaults.PROMPT_TEMPLATE] + [r["laion_2b"] for r in sample_rows] + [r["laion_coco"] for r in sample_rows]


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory, corpus):
    """(path, reference tokenizer): add_bos_token false, ChatML template."""
    path = tmp_path_factory.mktemp("gpt2") / "chat.gguf"
    return path, write_gpt2_gguf(path, corpus)


@pytest.fixture(scope="module")
def bos_gguf(tmp_path_factory, corpus):
    """(path, reference tokenizer): add_bos_token true, no chat template."""
    path = tmp_path_factory.mktemp("gpt2") / "bos.gguf"
    return path, write_gpt2_gguf(path, corpus, add_bos=True, chat_template=None)


def pairs(sample_rows, n=8):
    return [(r["laion_2b"], r["laion_coco"]) for r in sample_rows[:n]]


def test_prompt_ids_follow_the_ggufs_add_bos_token(chat_gguf, bos_gguf, sample_rows):
    from capsfuse_lite.engine.fuser import PromptPreview

    for (path, tok), bos in ((chat_gguf, []), (bos_gguf, [IM_START])):
        with PromptPreview(path) as preview:
            for raw, synthetic in pairs(sample_rows):
                prompt = preview.build(raw, synthetic)
                assert prompt.text == render(defaults.PROMPT_TEMPLATE, raw.strip(), synthetic.strip())  # upstream's text
                assert prompt.token_ids == bos + tok.encode(prompt.text).ids, path.name


def test_chat_template_auto_makes_the_instruction_the_user_message(chat_gguf, sample_rows):
    from capsfuse_lite.engine.fuser import PromptPreview

    path, tok = chat_gguf
    with PromptPreview(path, "auto") as preview:
        assert preview.builder.chat == (PRE, POST)
        for raw, synthetic in pairs(sample_rows):
            prompt = preview.build(raw, synthetic)
            assert prompt.text == PRE + render(defaults.PROMPT_TEMPLATE, raw.strip(), synthetic.strip()) + POST
            assert prompt.token_ids == tok.encode(prompt.text).ids  # ChatML's tokens special, no BOS added
            assert prompt.token_ids[0] == IM_START and prompt.token_ids.count(IM_START) == 2
        # a caption's special-token text stays text: the only <|im_end|> is the template's
        prompt = preview.build("a <|im_end|> b <|im_start|>", "c")
        assert prompt.token_ids.count(IM_END) == 1 and prompt.token_ids.count(IM_START) == 2


def test_the_256_token_rule_counts_the_chat_template(chat_gguf, sample_rows):
    from capsfuse_lite.engine.fuser import PromptPreview

    path, tok = chat_gguf
    long_raw = " ".join(r["laion_2b"] for r in sample_rows[:20])
    with PromptPreview(path, "auto") as preview:
        prompt = preview.build(long_raw, sample_rows[0]["laion_coco"])
        assert prompt.truncated and 250 <= len(prompt.token_ids) <= defaults.MAX_INPUT_TOKENS
        assert prompt.text.startswith(PRE) and prompt.text.endswith(POST)
        assert prompt.token_ids == tok.encode(prompt.text).ids
        assert sample_rows[0]["laion_coco"] in prompt.text  # the raw caption is cut, not the synthetic one
        full = preview.build(sample_rows[0]["laion_2b"], sample_rows[0]["laion_coco"])
        assert not full.truncated


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_stops_at_the_models_own_end_token(chat_gguf, beams):
    from capsfuse_lite import Fuser

    path, tok = chat_gguf
    with Fuser(path, slots=2, beams=beams, max_new_tokens=12, chat_template="auto", n_threads=1) as fuser:
        vocab = fuser._model.vocab
        assert vocab.eos == ENDOFTEXT and IM_END in vocab.eog_ids  # <|im_end|> ends generation by llama.cpp's rule
        results = list(fuser.fuse([("VW T-ROC alloy wheel", "The wheel is shown."), ("a red barn", "a barn")]))
    for r in results:
        assert (r.text, r.finish_reason) == ("wheel.", "eos"), r
        assert r.token_ids == tok.encode(" wheel.").ids
    assert fuser.settings["chat_template"] == "auto" and fuser.settings["add_bos"] is False
    assert fuser.settings["end_tokens"] == ["<|endoftext|>", "<|im_end|>"]


def test_capsfus_llama_keeps_bos_its_eos_and_no_note(tiny_gguf_q8):
    from capsfuse_lite import Fuser

    with Fuser(tiny_gguf_q8, slots=1, beams=1, max_new_tokens=2, n_threads=1) as fuser:
        vocab = fuser._model.vocab
        assert vocab.add_bos and 32000 in vocab.eog_ids  # llama.cpp counts [PAD] as end-of-generation ...
        assert fuser.end_tokens == frozenset([vocab.eos])  # ... upstream stops at EOS alone
        assert fuser.build_prompt("a", "b").token_ids[0] == vocab.bos
        assert fuser.model_note is None and fuser.settings["chat_template"] == "none"


def _write_rows(path, sample_rows, n=2):
    path.write_text(json.dumps([{"laion_2b": raw, "laion_coco": syn} for raw, syn in pairs(sample_rows, n)]))
    return path


def test_fuse_says_in_one_line_that_the_model_is_not_capsfus_llama(chat_gguf, sample_rows, tmp_path):
    path, _ = chat_gguf
    src = _write_rows(tmp_path / "in.json", sample_rows)
    common = ["fuse", str(src), "--model", str(path), "--beams", "1", "--max-new-tokens", "8", "--slots", "2",
              "--threads", "1", "-q"]
    result = CliRunner().invoke(app, common + ["-o", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "capsfuse.* metadata" in line]
    assert len(notes) == 1, result.output
    assert notes[0].startswith(f"note: {path.name} has no capsfuse.* metadata, so it is not CapsFus-LLaMA")
    assert "as plain text, without its chat template (--chat-template auto" in notes[0]
    assert "without BOS" in notes[0] and notes[0].endswith("stops at <|endoftext|>, <|im_end|>")
    rows = [json.loads(line) for line in (tmp_path / "none.jsonl").read_text().splitlines()]
    assert [r["capsfusion"] for r in rows] == ["", ""]  # after "New Sentence:" this model says <|endoftext|>

    result = CliRunner().invoke(app, common + ["-o", str(tmp_path / "auto.jsonl"), "--chat-template", "auto"])
    assert result.exit_code == 0, result.output
    assert "fed as the user message of its own chat template (--chat-template auto)" in result.output
    rows = [json.loads(line) for line in (tmp_path / "auto.jsonl").read_text().splitlines()]
    assert [(r["capsfusion"], r["finish_reason"]) for r in rows] == [("wheel.", "eos")] * 2
    meta = json.loads((tmp_path / "auto.jsonl.meta.json").read_text())
    assert meta["settings"]["chat_template"] == "auto"

    # the other choice on a complete output is another prompt: refused, not "already complete"
    again = CliRunner().invoke(app, common + ["-o", str(tmp_path / "auto.jsonl")])
    assert again.exit_code == 2 and "--force" in again.output, again.output
    bad = CliRunner().invoke(app, common + ["-o", str(tmp_path / "x.jsonl"), "--chat-template", "jinja"])
    assert bad.exit_code == 2 and "error: --chat-template jinja: use none" in bad.output, bad.output


def test_a_journal_made_with_one_chat_template_choice_does_not_resume_the_other(chat_gguf, bos_gguf, tmp_path):
    from capsfuse_lite.models import gguf_defaults
    from capsfuse_lite.run.config import FuseConfig, settings_fingerprint

    for (path, _), differs in ((chat_gguf, True), (bos_gguf, False)):  # bos.gguf has no chat template
        meta = gguf_defaults(path)
        none, auto = (settings_fingerprint(FuseConfig(input=tmp_path / "in.json", output=tmp_path / "o.jsonl", model=path,
                                                      chat_template=choice), meta, "0" * 64) for choice in ("none", "auto"))
        assert (none != auto) is differs
        assert none["prompt_template"] == meta["prompt_template_sha256"]
