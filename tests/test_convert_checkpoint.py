"""Checkpoint reading rules, GGUF metadata, hub resolution and the convert/info commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capsfuse_lite import defaults as D
from capsfuse_lite.cli import app
from capsfuse_lite.convert import convert_checkpoint, read_gguf_metadata
from capsfuse_lite.convert.source import read_config
from capsfuse_lite.convert.spm import load_sentencepiece
from capsfuse_lite.convert.torchbin import read_torch_checkpoint
from capsfuse_lite.errors import CheckpointError, ConfigError, HubError, UnsupportedModelError

from checkpoints import make_llama_checkpoint


@pytest.fixture
def ckpt_copy(tiny_llama_dir, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_capsfuse_metadata_and_source_hashes(tiny_gguf_f32, tiny_llama_dir):
    meta = read_gguf_metadata(tiny_gguf_f32)
    assert meta[D.KEY_PROMPT_TEMPLATE] == D.PROMPT_TEMPLATE
    assert (meta[D.KEY_MAX_INPUT_TOKENS], meta[D.KEY_NUM_BEAMS], meta[D.KEY_MAX_NEW_TOKENS], meta[D.KEY_LENGTH_OFFSET]) == (
        D.MAX_INPUT_TOKENS, D.NUM_BEAMS, D.MAX_NEW_TOKENS, D.LENGTH_OFFSET)
    assert meta[D.KEY_SOURCE] == str(tiny_llama_dir) and meta[D.KEY_REVISION] == "local"
    assert meta[D.KEY_CONVERTER_VERSION].startswith("capsfuse-lite ")
    digests = json.loads(meta[D.KEY_SOURCE_SHA256])
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "config.json",
            "tokenizer.model", "added_tokens.json", "pytorch_model.bin.index.json"} <= set(digests)
    for name, digest in digests.items():
        assert hashlib.sha256((tiny_llama_dir / name).read_bytes()).hexdigest() == digest, name
    assert meta["general.architecture"] == "llama" and meta["llama.vocab_size"] == 32001
    assert meta["llama.context_length"] == 512 and meta["llama.rope.freq_base"] == 10000.0
    assert "rope_freqs.weight" not in meta  # inv_freq buffers are skipped, not converted


def test_config_styles_normalise_to_the_same_parameters(tmp_path):
    old = read_config(make_llama_checkpoint(tmp_path / "old", layers=1, kv_heads=2, layout="safetensors") / "config.json")
    new = read_config(make_llama_checkpoint(tmp_path / "new", layers=1, kv_heads=2, layout="safetensors",
                                            config_style="current") / "config.json")
    assert old.__dict__ | {"pad_token_id": None} == new.__dict__ | {"pad_token_id": None}
    assert (old.rope_theta, old.head_dim, old.n_kv_heads, old.torch_dtype) == (10000.0, 16, 2, "float32")


def test_4_28_config_without_kv_heads_and_theta(ckpt_copy):
    config = read_config(ckpt_copy / "config.json")
    raw = json.loads((ckpt_copy / "config.json").read_text())
    assert "num_key_value_heads" not in raw and "rope_theta" not in raw and "head_dim" not in raw
    assert (config.n_kv_heads, config.rope_theta, config.head_dim) == (4, 10000.0, 16)


@pytest.mark.parametrize(
    "config_changes, error, message",
    [
        (dict(architectures=["MistralForCausalLM"], model_type="mistral"), UnsupportedModelError, "MistralForCausalLM"),
        (dict(intermediate_size=160), CheckpointError, r"mlp\.\w+_proj\.weight has shape .*config.json implies"),
        (dict(num_hidden_layers=3), CheckpointError, r"lacks .* blk\.2\."),  # missing tensors
        (dict(num_hidden_layers=1), CheckpointError, r"unexpected tensor model\.layers\.1\."),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), UnsupportedModelError, "dynamic"),
    ],
    ids=["architecture", "shape", "missing-tensor", "unknown-tensor", "rope-scaling"],
)
def test_inconsistent_checkpoints_refused(ckpt_copy, tmp_path, config_changes, error, message):
    _edit_json(ckpt_copy / "config.json", **config_changes)
    with pytest.raises(error, match=message):
        convert_checkpoint(ckpt_copy, tmp_path / "o.gguf", out_type="f32", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_vocabulary_larger_than_embedding_refused(ckpt_copy, tmp_path):
    (ckpt_copy / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000, "<extra>": 32001}))
    with pytest.raises(CheckpointError, match="32002 tokens but the embedding only 32001 rows"):
        convert_checkpoint(ckpt_copy, tmp_path / "o.gguf", out_type="f32", progress=False)


def test_added_token_gap_refused(ckpt_copy, tmp_path):
    (ckpt_copy / "added_tokens.json").write_text(json.dumps({"[PAD]": 32005}))
    with pytest.raises(CheckpointError, match="gap would shift the vocabulary"):
        convert_checkpoint(ckpt_copy, tmp_path / "o.gguf", out_type="f32", progress=False)


def test_embedding_rows_beyond_tokenizer_become_unused_padding(ckpt_copy, tmp_path):
    (ckpt_copy / "added_tokens.json").unlink()
    special = json.loads((ckpt_copy / "special_tokens_map.json").read_text())
    special.pop("pad_token")
    (ckpt_copy / "special_tokens_map.json").write_text(json.dumps(special))
    out = convert_checkpoint(ckpt_copy, tmp_path / "o.gguf", out_type="f32", progress=False)
    meta = read_gguf_metadata(out, load_arrays=True)
    assert meta["tokenizer.ggml.tokens"][32000] == "[PAD32000]"
    assert meta["tokenizer.ggml.token_type"][32000] == 5  # UNUSED
    assert meta["tokenizer.ggml.tokens"][:32000] == load_sentencepiece(ckpt_copy / "tokenizer.model").pieces


def test_unknown_out_type(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="q3_k"):
        convert_checkpoint(tiny_llama_dir, tmp_path / "o.gguf", out_type="q3_k", progress=False)


def _cli(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process: huggingface_hub reads HF_HOME/HF_HUB_OFFLINE at import."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "capsfuse_lite", *args], capture_output=True, text=True, env=env, timeout=120)


def test_hub_unreachable_is_one_clear_error(tmp_path):
    result = _cli(["convert", "BAAI/CapsFus-LLaMA", "-o", str(tmp_path / "o.gguf")], tmp_path / "hf")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot be reached" in result.stderr and "not in the local cache" in result.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_hub_id_resolved_from_offline_cache(tiny_llama_dir, tmp_path):
    """A populated HF cache (HF_HOME) converts offline and records the repo and the snapshot's commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--BAAI--CapsFus-LLaMA"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "o.gguf"
    result = _cli(["convert", "-o", str(out), "--type", "f16"], tmp_path / "hf")  # default SOURCE
    assert result.returncode == 0, result.stderr
    meta = read_gguf_metadata(out)
    assert meta[D.KEY_SOURCE] == "BAAI/CapsFus-LLaMA" and meta[D.KEY_REVISION] == commit
    assert meta["general.name"] == "CapsFus-LLaMA"


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(HubError, match="not a hub id"):
        convert_checkpoint(str(tmp_path / "nope" / "deeper" / "x"), tmp_path / "o.gguf", progress=False)


def test_cli_convert_and_info(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--type", "q8_0", "--quiet"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["convert", str(tiny_llama_dir), "-o", str(out), "--type", "q8_0"])
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    shown = runner.invoke(app, ["info", str(out)])
    assert shown.exit_code == 0, shown.output
    for text in ("MOSTLY_Q8_0", "32001 tokens", "pad 32000", "capsfuse.num_beams", "gpu offload"):
        assert text in shown.output
    details = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert details["capsfuse"][D.KEY_MAX_NEW_TOKENS] == 80 and details["vocab"]["size"] == 32001
    assert isinstance(details["gpu_offload"], bool)


def test_strided_and_shared_storage_tensors_read_exactly(ckpt_copy, tiny_gguf_f32, tmp_path):
    """Views torch.save keeps as (storage, offset, strides) convert to the same bytes as contiguous ones."""
    import gguf
    import numpy as np
    import torch

    shard = next(p for p in sorted(ckpt_copy.glob("pytorch_model-*.bin"))
                 if any(n.endswith("q_proj.weight") for n in torch.load(p, weights_only=True)))
    state = torch.load(shard, weights_only=True)
    q_name = next(n for n in state if n.endswith("self_attn.q_proj.weight"))
    v_name = q_name.replace("q_proj", "v_proj")
    q, v = state[q_name], state[v_name]
    packed = torch.cat([v.flatten(), q.t().flatten()])  # one storage holding both tensors
    state[v_name] = packed[: v.numel()].view(v.shape)  # offset 0 of a larger storage
    state[q_name] = packed[v.numel():].view(q.shape[1], q.shape[0]).t()  # at an offset, column-major strides
    assert not state[q_name].is_contiguous() and torch.equal(state[q_name], q)
    assert state[q_name].untyped_storage().data_ptr() == state[v_name].untyped_storage().data_ptr()
    torch.save(state, shard)
    refs = read_torch_checkpoint(shard)
    assert refs[q_name].strides == (1, q.shape[1]) and refs[q_name].offset == refs[v_name].offset + v.numel() * 4
    out = convert_checkpoint(ckpt_copy, tmp_path / "views.gguf", out_type="f32", progress=False)
    expected = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny_gguf_f32).tensors}
    for tensor in gguf.GGUFReader(out).tensors:
        np.testing.assert_array_equal(np.asarray(tensor.data), expected[tensor.name], err_msg=tensor.name)


def test_progress_bar_renders(tiny_llama_dir, tmp_path, capsys):
    """The bar a terminal gets (``progress=True``; the CLI draws it when stderr is a terminal and -q is
    not given); an output name with brackets is shown as is, not taken for rich markup."""
    convert_checkpoint(tiny_llama_dir, tmp_path / "p[red].gguf", out_type="f16", progress=True)
    err = capsys.readouterr().err
    assert "21/21 tensors" in err and "f16 p[red].gguf" in err
