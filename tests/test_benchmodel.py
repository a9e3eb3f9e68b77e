"""`capsfuse-lite bench-model`: random-weight GGUFs that llama.cpp runs like a converted CapsFus-LLaMA.

Oracles: gguf-py's own dequantizers read our raw blocks back (layout and scales); llama.cpp's
quantizer, run on an f16 bench model, picks the tensor types our q4_k_m/q4_0 files must have;
`capsfuse-lite convert` of the tiny test checkpoint gives the tokenizer and capsfuse.* metadata;
llama.cpp itself loads and runs every type (greedy and 3 beams never stop at EOS).
"""

from __future__ import annotations

import hashlib
import json

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from capsfuse_lite.bench import model as bm
from capsfuse_lite import defaults as D
from capsfuse_lite.cli import app
from capsfuse_lite.convert.gguf_metadata import read_gguf_metadata, read_gguf_tensors
from capsfuse_lite.errors import ConfigError, OutputExistsError

TYPES = ("q4_k_m", "q4_0", "q8_0", "f16")
LLAMA_FTYPE_NAMES = {"q4_k_m": "Q4_K - Medium", "q4_0": "Q4_0", "q8_0": "Q8_0", "f16": "F16"}
# 80 layers with grouped KV heads: llama.cpp's 70B rule (attn_v Q5_K) on top of use_more_bits.
DEEP_GQA = bm.BenchShape(hidden=256, ffn=256, layers=80, heads=4, kv_heads=2)
MID = bm.BenchShape(hidden=256, ffn=512, layers=16, heads=4)
VOCAB_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
              "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix")
DECODING_KEYS = (D.KEY_PROMPT_TEMPLATE, D.KEY_MAX_INPUT_TOKENS, D.KEY_NUM_BEAMS, D.KEY_MAX_NEW_TOKENS, D.KEY_LENGTH_OFFSET)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench_tiny")
    return {t: bm.write_bench_model(folder / f"tiny-{t}.gguf", "tiny", t) for t in TYPES}


@pytest.fixture(scope="module")
def pairs(sample_rows) -> list[tuple[str, str]]:
    return [(r["laion_2b"], r["laion_coco"]) for r in sample_rows]


def _types(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    return {t.name: (t.shape, t.ggml_type) for t in read_gguf_tensors(path)}


# -- blocks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(bm.LAYOUTS), ids=lambda q: q.name)
def test_random_blocks_decode_to_zero_mean_weights_of_the_asked_spread(qtype):
    """gguf-py's dequantizer (an independent reading of ggml's block layouts) sees finite,
    zero-mean weights with the requested standard deviation, and varied per-block scales."""
    std = 0.0137
    blocks = bm.random_blocks(np.random.default_rng(1), qtype, 4000, std)
    assert blocks.shape == (4000, gguf.GGML_QUANT_SIZES[qtype][1]) and blocks.dtype == np.uint8
    weights = gguf.quants.dequantize(blocks.reshape(1, -1), qtype).reshape(4000, -1).astype(np.float64)
    assert np.isfinite(weights).all()
    assert weights.std() == pytest.approx(std, rel=0.03)
    assert abs(weights.mean()) < 0.01 * std
    block_rms = np.sqrt((weights ** 2).mean(axis=1))
    assert block_rms.min() > 0.3 * std and block_rms.max() < 3 * std  # every block scale sensible
    assert len(np.unique(block_rms.round(7))) > 1000  # scales vary from block to block


@pytest.mark.parametrize("out_type", ["q4_k_m", "q4_0", "q8_0"])
def test_every_block_scale_of_the_13b_plans_is_a_normal_fp16(out_type):
    """Finite, sensible scales: no fp16 subnormals (nor zeros, nor infinities) in any 13b tensor."""
    tensors = bm.plan_bench_tensors(bm.bench_shape("13b"), out_type, 32001)
    QT = gguf.GGMLQuantizationType
    for qtype, std in {(t.qtype, t.std) for t in tensors if t.qtype in bm.LAYOUTS}:
        blocks = bm.random_blocks(np.random.default_rng(0), qtype, 2000, std)
        fields = [208] if qtype == QT.Q6_K else [0, 2] if qtype in (QT.Q4_K, QT.Q5_K) else [0]
        for at in fields:
            d = np.abs(blocks[:, at:at + 2].copy().view("<f2").astype(np.float32))
            assert np.isfinite(d).all() and d.min() >= np.finfo(np.float16).smallest_normal, (qtype, std)


def test_tensor_chunks_zero_the_asked_row_and_respect_the_chunk_size():
    tensor = bm.BenchTensor("output.weight", (100, 512), gguf.GGMLQuantizationType.Q6_K, 0.1)
    chunks = list(bm.tensor_chunks(tensor, np.random.default_rng(0), zero_rows=(2,), chunk_bytes=4 * 420))
    assert [c.nbytes for c in chunks] == [4 * 420] * 25
    weights = gguf.quants.dequantize(np.concatenate(chunks).reshape(100, -1), tensor.qtype)
    assert not weights[2].any() and np.isfinite(weights).all()
    assert (np.abs(weights).sum(axis=1) > 0).sum() == 99


# -- tensor types and metadata -------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "out_type"), [(DEEP_GQA, "q4_k_m"), ("tiny", "q4_k_m"), (MID, "q4_0"), ("tiny", "q4_0")],
                         ids=["80-layers-gqa-q4_k_m", "tiny-q4_k_m", "16-layers-q4_0", "tiny-q4_0"])
def test_types_and_bytes_equal_llama_cpp_quantizer(tmp_path, shape, out_type):
    """Our direct q4_k_m/q4_0 file has the tensor types, size and metadata llama.cpp's quantizer
    gives the same model from f16: Q6_K output and use_more_bits layers, the 70B Q5_K rule,
    Q5_0/Q8_0/F16 fallbacks for rows that are not whole blocks."""
    from capsfuse_lite.convert.quantize import quantize_with_llama_cpp

    f16 = bm.write_bench_model(tmp_path / "f16.gguf", shape, "f16")
    reference = tmp_path / "reference.gguf"
    quantize_with_llama_cpp(f16, reference, out_type, n_threads=1)
    ours = bm.write_bench_model(tmp_path / "ours.gguf", shape, out_type)
    assert _types(ours) == _types(reference)
    assert ours.stat().st_size == reference.stat().st_size
    assert read_gguf_metadata(ours) == read_gguf_metadata(reference)


def test_deep_gqa_reference_really_mixes_types(tmp_path):
    """The 80-layer case above is only a strong check if it holds every q4_k_m type."""
    path = bm.write_bench_model(tmp_path / "deep.gguf", DEEP_GQA, "q4_k_m")
    QT = gguf.GGMLQuantizationType
    kinds = {}
    for name, (_shape, qtype) in _types(path).items():
        kinds.setdefault(name.split(".")[-2], set()).add(QT(qtype))
    assert kinds["attn_v"] == {QT.Q6_K, QT.Q5_K} and kinds["ffn_down"] == {QT.Q6_K, QT.Q4_K}
    assert kinds["output"] == {QT.Q6_K} and kinds["token_embd"] == {QT.Q4_K} and kinds["attn_norm"] == {QT.F32}


def test_thirteen_b_plan_matches_a_real_q4_k_m_conversion():
    """CapsFus-LLaMA's shape: 363 tensors, 7.87 GB of q4_k_m data (llama.cpp's own Q4_K_M
    LLaMA-2-13B files are 7.87 GB), Q6_K in 20 attn_v and 20 ffn_down layers."""
    tensors = bm.plan_bench_tensors(bm.bench_shape("13b"), "q4_k_m", 32001)
    assert len(tensors) == 3 + 40 * 9
    assert 7.80e9 < sum(t.nbytes for t in tensors) < 7.90e9
    six = [t.name for t in tensors if t.qtype == gguf.GGMLQuantizationType.Q6_K]
    assert len(six) == 41 and "output.weight" in six


def test_q8_0_and_f16_types_equal_the_converters(tiny, tiny_gguf_q8, tiny_gguf_f32):
    """q8_0 is written by `convert` itself: same per-tensor types for the same shape."""
    assert _types(tiny["q8_0"]) == _types(tiny_gguf_q8)
    f16_types = {name: t for name, (_s, t) in _types(tiny["f16"]).items()}
    assert {name: s for name, (s, _t) in _types(tiny["f16"]).items()} == {n: s for n, (s, _t) in _types(tiny_gguf_f32).items()}
    assert {t for name, t in f16_types.items() if not name.endswith("norm.weight")} == {gguf.GGMLQuantizationType.F16}


def test_tokenizer_equals_the_converters(tiny, tiny_gguf_q8, pairs):
    """Same vocabulary arrays, special ids and flags as `convert` writes for CapsFus-LLaMA, and the
    same prompt token ids for all 47 sample rows (llama.cpp's tokenizer on both files)."""
    from capsfuse_lite.engine.fuser import PromptPreview

    ours = read_gguf_metadata(tiny["q4_k_m"], load_arrays=True)
    converted = read_gguf_metadata(tiny_gguf_q8, load_arrays=True)
    for key in VOCAB_KEYS:
        assert ours[key] == converted[key], key
    assert ours["tokenizer.ggml.tokens"][32000] == "[PAD]" and len(ours["tokenizer.ggml.tokens"]) == 32001
    with PromptPreview(tiny["q4_k_m"]) as a, PromptPreview(tiny_gguf_q8) as b:
        for raw, synthetic in pairs:
            assert a.build(raw, synthetic).token_ids == b.build(raw, synthetic).token_ids


def test_capsfuse_metadata_says_random_and_keeps_the_converters_defaults(tiny, tiny_gguf_q8):
    from capsfuse_lite.models import gguf_defaults

    ours, converted = read_gguf_metadata(tiny["q8_0"]), read_gguf_metadata(tiny_gguf_q8)
    for key in DECODING_KEYS:
        assert ours[key] == converted[key], key
    for key in (D.KEY_SOURCE, D.KEY_REVISION, D.KEY_SOURCE_SHA256, D.KEY_CONVERTER_VERSION):
        assert key in ours and key in converted
    assert ours[D.KEY_RANDOM_WEIGHTS] is True and D.KEY_RANDOM_WEIGHTS not in converted
    assert "random" in ours[D.KEY_SOURCE] and "bench-model" in ours[D.KEY_SOURCE]
    assert "random" in ours["general.name"] and "bench-model" in ours["general.description"]
    assert ours[D.KEY_CONVERTER_VERSION] == converted[D.KEY_CONVERTER_VERSION]
    defaults_ours, defaults_theirs = gguf_defaults(tiny["q8_0"]), gguf_defaults(tiny_gguf_q8)
    # LLaMA-2's trained context / the tiny test checkpoint's
    assert defaults_ours.pop("context_length") == 4096 and defaults_theirs.pop("context_length") == 512
    assert defaults_ours == defaults_theirs
    for key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.vocab_size", "general.file_type"):
        assert ours[key] == converted[key], key


@pytest.mark.parametrize("out_type", TYPES)
def test_info_and_llama_cpp_report_the_type(tiny, out_type):
    from capsfuse_lite.engine.llama import Model

    result = CliRunner().invoke(app, ["info", str(tiny[out_type]), "--json"])
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    assert details["file_type"] == gguf.LlamaFileType(bm.FILE_TYPES[out_type]).name
    assert details["vocab"]["size"] == 32001 and details["capsfuse"][D.KEY_RANDOM_WEIGHTS] is True
    with Model(tiny[out_type]) as model:
        assert model.file_type == LLAMA_FTYPE_NAMES[out_type]
        assert model.vocab.n_tokens == 32001 and model.vocab.eos == 2


# -- running it ------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_type", TYPES)
def test_greedy_and_beams_run_the_full_budget_without_eos(tiny, pairs, out_type):
    """Every row generates max_new_tokens with greedy and with 3 beams (equal work), and greedy's
    logits are finite, EOS's exactly 0 with thousands of tokens above it at every step."""
    from capsfuse_lite import Fuser

    rows = pairs[:6]
    for beams in (1, 3):
        with Fuser(tiny[out_type], slots=3, beams=beams, max_new_tokens=12, n_threads=1) as fuser:
            results = list(fuser.fuse(rows))
        assert [r.finish_reason for r in results] == ["length"] * len(rows)
        assert all(len(r.token_ids) == 12 and 2 not in r.token_ids for r in results)
    probe = bm.probe_eos(tiny[out_type], rows[:3], steps=10, n_threads=1)
    assert probe.steps == 30 and probe.finite
    assert probe.max_abs_eos_logit == 0.0
    assert probe.min_above_eos > 10000 and probe.min_margin > 5
    assert 1 < probe.mean_logit_std < 20 and probe.distinct_tokens > 5


def test_a_deep_model_keeps_finite_varied_logits(tmp_path, pairs):
    """40 layers (CapsFus-LLaMA's depth) at a small width: the residual stream stays sane."""
    path = bm.write_bench_model(tmp_path / "deep.gguf", bm.BenchShape(128, 256, 40, 4), "q4_k_m")
    probe = bm.probe_eos(path, pairs[:2], steps=8, n_threads=1)
    assert probe.finite and probe.max_abs_eos_logit == 0.0 and probe.min_above_eos > 10000
    assert 1 < probe.mean_logit_std < 20 and probe.distinct_tokens > 3


def test_hf_checkpoint_from_a_bench_model_is_the_same_model(tiny, tmp_path, pairs):
    """benchmarks/make_bench_model.py --hf-checkpoint: transformers on the exported checkpoint
    computes llama.cpp's logits (f16 weights: only float rounding apart; a wrong Q/K row order or
    tensor name moves them by units), with CapsFus-LLaMA's tokenizer files."""
    from transformers import AutoTokenizer

    from capsfuse_lite.engine.fuser import PromptPreview
    from checkpoints import checkpoint_from_gguf
    from test_convert_parity import hf_logits, llama_cpp_logits, load_hf, max_abs_diff

    folder = checkpoint_from_gguf(tiny["f16"], tmp_path / "hf", dtype="float32")
    with PromptPreview(tiny["f16"]) as preview:
        tokens = [preview.build(raw, synthetic).token_ids for raw, synthetic in pairs[:2]]
    assert max_abs_diff(llama_cpp_logits(tiny["f16"], tokens), hf_logits(load_hf(folder), tokens)) <= 2e-2
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert (len(tok), tok.pad_token, tok.eos_token_id) == (32001, "[PAD]", 2)
    from safetensors.torch import load_file  # the bf16 export (what bench runs) rounds those weights

    full = load_file(folder / "model.safetensors")
    half = load_file(checkpoint_from_gguf(tiny["f16"], tmp_path / "hf16", dtype="bfloat16") / "model.safetensors")
    assert full.keys() == half.keys()
    for name, value in full.items():
        assert str(half[name].dtype) == "torch.bfloat16"
        assert float((half[name].float() - value).abs().max()) <= 2 ** -8 * float(value.abs().max()), name


# -- files, options, memory ------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = bm.write_bench_model(tmp_path / "again.gguf", "tiny", "q4_k_m", seed=0)
    other = bm.write_bench_model(tmp_path / "other.gguf", "tiny", "q4_k_m", seed=1)
    assert _sha(again) == _sha(tiny["q4_k_m"])
    assert _types(other) == _types(again)
    weights = {path: {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors} for path in (again, other)}
    for name, data in weights[again].items():  # every tensor differs, not just the seed in the metadata
        assert not np.array_equal(data, weights[other][name]), name
    ours = weights[again]  # and within a file, layers are not copies of each other
    assert not np.array_equal(ours["blk.0.attn_q.weight"], ours["blk.1.attn_q.weight"])
    assert not np.array_equal(ours["blk.0.attn_q.weight"], ours["blk.0.attn_k.weight"])
    assert not list(tmp_path.glob(".*partial"))


def test_refuses_to_overwrite_and_rejects_bad_settings(tiny, tmp_path):
    before = _sha(tiny["f16"])
    with pytest.raises(OutputExistsError):
        bm.write_bench_model(tiny["f16"], "tiny", "f16")
    assert _sha(tiny["f16"]) == before
    for kwargs in ({"shape": "70b"}, {"out_type": "q5_k_m"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            bm.write_bench_model(tmp_path / "x.gguf", **{"shape": "tiny", **kwargs})
    for overrides in ({"heads": 5}, {"kv_heads": 3}, {"layers": 0}, {"hidden": 66, "heads": 2}):
        with pytest.raises(ConfigError):
            bm.bench_shape("tiny", **overrides)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_writes_a_custom_shape_and_reports_errors_in_one_line(tmp_path):
    out = tmp_path / "custom.gguf"
    runner = CliRunner()
    result = runner.invoke(app, ["bench-model", "-o", str(out), "--shape", "tiny", "--type", "q4_0", "--layers", "3",
                                 "--kv-heads", "2", "--seed", "7", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = read_gguf_metadata(out)
    assert (meta["llama.block_count"], meta["llama.attention.head_count_kv"]) == (3, 2)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0 and meta[D.KEY_REVISION] == "seed 7"
    again = runner.invoke(app, ["bench-model", "-o", str(out), "--shape", "tiny"])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, ["bench-model", "-o", str(tmp_path / "y.gguf"), "--shape", "huge"])
    assert bad.exit_code == 2 and "tiny, cpu768, 7b, 13b" in bad.output


def _peak_rss_of_writing(tmp_path: Path, shape: dict, out_type: str, name: str) -> tuple[int, int]:
    code = (
        "import sys, resource\n"
        "from capsfuse_lite.bench import model as bm\n"
        "bm.CHUNK_BYTES, bm.WRITE_BYTES = 1 << 20, 4 << 20\n"
        f"bm.write_bench_model({str(tmp_path / name)!r}, bm.BenchShape(**{shape!r}), {out_type!r})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]), (tmp_path / name).stat().st_size


def test_memory_stays_flat_whatever_the_model_size(tmp_path):
    """Peak RSS writing a 0.31 GB f16 model exceeds writing a 9 MB one by a few chunks, not by
    the model (the whole embedding alone is 98 MB as f16, 196 MB as float32)."""
    small_rss, _ = _peak_rss_of_writing(tmp_path, {"hidden": 64, "ffn": 172, "layers": 2, "heads": 4}, "f16", "small.gguf")
    big_rss, big_size = _peak_rss_of_writing(tmp_path, {"hidden": 1536, "ffn": 4096, "layers": 2, "heads": 12}, "f16", "big.gguf")
    assert big_size > 300e6
    assert big_rss - small_rss < 40e6, (small_rss, big_rss)
