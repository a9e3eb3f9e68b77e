"""Random-weight LLaMA GGUFs for benchmarks, written directly as quantized blocks.

``write_bench_model(path, shape="13b", out_type="q4_k_m")`` writes a GGUF that llama.cpp runs
exactly like a conversion of CapsFus-LLaMA: the same architecture metadata, the same tokenizer
(LLaMA-2's SentencePiece vocabulary, shipped as package data, plus ``[PAD]`` = 32000, written by
the converter's own metadata functions), the same ``capsfuse.*`` decoding defaults, and for
``q4_k_m`` / ``q4_0`` the same per-tensor types llama.cpp's quantizer picks (see
:func:`tensor_type`). Only the weights are random, so speed measured with it is the speed of the
real model; the captions it writes are meaningless. No torch and no fp32 checkpoint: every
quantized block is written as raw bytes (random quants, finite fp16 scales), tensor by tensor in
chunks of at most ``CHUNK_BYTES``, so memory stays flat and writing is bound by the disk
(a 13B q4_k_m, 7.9 GB, takes seconds).

Weights. Every weight matrix is zero-mean with the standard deviation of a well-conditioned
pre-norm network: 1/sqrt(fan_in) for the projections that read the normed stream (q, k, v,
gate, up), ``RESIDUAL_SCALE``/sqrt(fan_in) for the two that write the residual stream
(attn_output, ffn_down), ``EMBED_STD`` for the token embedding, and ``OUTPUT_SCALE``/sqrt(hidden)
for the output matrix, so logits spread over a few units through 40 layers. RMSNorm gains are
f32 around 1. The embedding and the residual writers share the factor ``EMBED_STD``: RMSNorm
makes the network invariant to it, and it lifts every fp16 block scale of the presets out of
fp16's subnormal range.

Never EOS. The output row of EOS (id 2) is all zeros (every block scale 0), so its logit is
exactly 0, while the other logits are h·w_t with zero-mean random rows w_t: about half of the
32000 other tokens score above EOS at every step, so EOS is never the argmax and never among the
2 x beams candidates of beam search. Every row generates the full token budget on every system:
equal work.

Block layouts (ggml's ``block_*`` structs, little endian, fp16 scales):

* Q4_0 (18 B / 32 weights): d, 16 bytes of nibbles; w = d (q - 8).
* Q5_0 (22 B / 32): d, 4 bytes of 5th bits, 16 bytes of nibbles; w = d (q - 16).
* Q8_0 (34 B / 32): d, 32 int8; w = d q.
* Q4_K (144 B / 256): d, dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles;
  w = d sc q - dmin m per 32 weights. We set m = sc and dmin = 7.5 d, so w = d sc (q - 7.5).
* Q5_K (176 B / 256): as Q4_K plus 32 bytes of 5th bits; m = sc, dmin = 15.5 d.
* Q6_K (210 B / 256): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d;
  w = d sc (q - 32) per 16 weights.

Quants are uniform random bytes; d carries a random sign where the layout allows (symmetric
weights) and a jitter of ±25 % per block.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR

from capsfuse_lite import defaults as D
from capsfuse_lite.errors import ConfigError, ModelLoadError

VOCAB_FILE = "ggml-vocab-llama-spm.gguf"
PAD_TOKEN = "[PAD]"  # CapsFus-LLaMA's added token: id 32000, a CONTROL token
CONTEXT_LENGTH = 4096  # LLaMA-2's trained context, as CapsFus-LLaMA's config.json says
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

EMBED_STD = 8.0
RESIDUAL_SCALE = 0.3 * EMBED_STD
OUTPUT_SCALE = 4.0
NORM_STD = 0.1
JITTER = (0.75, 1.25)  # per-block factor on the scale d
CHUNK_BYTES = 2 << 20  # generated at a time: small enough to stay in the CPU caches
WRITE_BYTES = 16 << 20  # handed to the writer thread at a time (two in flight at most)
_HEADER_ALLOWANCE = 8 << 20

OUT_TYPES = ("q4_k_m", "q4_0", "q8_0", "f16")
FILE_TYPES = {
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}


@dataclass(frozen=True)
class BenchShape:
    """A LLaMA shape. ``kv_heads=None`` means as many as ``heads`` (no grouped-query attention)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int | None = None
    label: str = "custom"

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        kv = f"/{self.n_kv_heads} kv" if self.n_kv_heads != self.heads else ""
        return f"hidden {self.hidden}, ffn {self.ffn}, {self.layers} layers, {self.heads}{kv} heads"


PRESETS: dict[str, BenchShape] = {
    "tiny": BenchShape(64, 172, 2, 4, label="tiny"),  # the test checkpoints' shape
    "cpu768": BenchShape(768, 2048, 8, 12, label="cpu768"),  # README's CPU tables
    "7b": BenchShape(4096, 11008, 32, 32, label="7b"),  # LLaMA-2-7B
    "13b": BenchShape(5120, 13824, 40, 40, label="13b"),  # LLaMA-2-13B = CapsFus-LLaMA
}


def bench_shape(shape: str | BenchShape = "13b", **overrides: int | None) -> BenchShape:
    """A preset by name (or a BenchShape) with any of hidden/ffn/layers/heads/kv_heads replaced;
    raises ConfigError for an unknown preset or a layout LLaMA cannot have."""
    if isinstance(shape, str):
        if shape.lower() not in PRESETS:
            raise ConfigError(f"--shape {shape!r} is not a preset; choose one of {', '.join(PRESETS)} "
                              "(or set --hidden/--ffn/--layers/--heads)")
        shape = PRESETS[shape.lower()]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        unknown = set(changes) - {"hidden", "ffn", "layers", "heads", "kv_heads"}
        if unknown:
            raise TypeError(f"unknown shape field(s) {sorted(unknown)}")
        shape = dataclasses.replace(shape, **changes, label="custom")
    for name in ("hidden", "ffn", "layers", "heads"):
        value = getattr(shape, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if shape.kv_heads is not None and (not isinstance(shape.kv_heads, int) or shape.kv_heads < 1):
        raise ConfigError(f"kv_heads must be a positive integer, got {shape.kv_heads!r}")
    if shape.hidden % shape.heads or shape.head_dim % 2:
        raise ConfigError(f"hidden {shape.hidden} must split into {shape.heads} heads of an even size")
    if shape.heads % shape.n_kv_heads:
        raise ConfigError(f"{shape.heads} heads cannot be grouped over {shape.n_kv_heads} KV heads")
    return shape


def check_out_type(out_type: str) -> str:
    out = out_type.lower()
    if out not in OUT_TYPES:
        raise ConfigError(f"--type {out_type!r} is not supported by bench-model; choose one of {', '.join(OUT_TYPES)}")
    return out


# -- which type each tensor gets ---------------------------------------------------------------


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixtures."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _fit(qtype: QT, ncols: int) -> QT:
    """llama.cpp's fallback when a row is not a whole number of blocks: 256-blocks become the
    32-block type of about the same size, and F16 when even that does not fit."""
    if ncols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, qtype)
        if ncols % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
    return qtype


def tensor_type(name: str, shape: tuple[int, ...], out_type: str, bench: BenchShape) -> QT:
    """The type of one tensor in a ``out_type`` GGUF, as a real conversion makes it.

    f16 and q8_0 are what ``capsfuse-lite convert`` writes itself (every matrix in that type, F16
    for rows that are not whole Q8_0 blocks). q4_0 and q4_k_m are what llama.cpp's quantizer
    (``llama_tensor_get_type``) picks for a LLaMA: output.weight Q6_K; for q4_k_m, attn_v and
    ffn_down Q6_K in the layers where ``_use_more_bits`` holds, attn_v Q5_K elsewhere in a 70B-like
    model (80 layers with grouped KV heads), Q4_K everything else, token_embd included; then the
    shape fallbacks of :func:`_fit`. Norms are F32.
    """
    if len(shape) < 2:
        return QT.F32
    ncols = shape[-1]
    if out_type == "f16":
        return QT.F16
    if out_type == "q8_0":
        return _fit(QT.Q8_0, ncols)
    qtype = QT.Q4_K if out_type == "q4_k_m" else QT.Q4_0
    if name == gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight":
        qtype = QT.Q6_K  # llama.cpp's Q8_0 for rows that are not whole base blocks is _fit's result too
    elif out_type == "q4_k_m" and name.startswith("blk."):
        layer = int(name.split(".")[1])
        kind = name.split(".")[2]
        if kind in ("attn_v", "ffn_down") and _use_more_bits(layer, bench.layers):
            qtype = QT.Q6_K
        elif kind == "attn_v" and bench.layers == 80 and bench.n_kv_heads != bench.heads:
            qtype = QT.Q5_K  # llama.cpp's LLM_TYPE_70B rule
    return _fit(qtype, ncols)


@dataclass(frozen=True)
class BenchTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: QT
    std: float  # standard deviation of the weights (norms: of the gain around 1)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _llama_config(bench: BenchShape, vocab_size: int):
    from capsfuse_lite.convert.source import LlamaConfig

    return LlamaConfig(
        hidden_size=bench.hidden, intermediate_size=bench.ffn, n_layers=bench.layers, n_heads=bench.heads,
        n_kv_heads=bench.n_kv_heads, head_dim=bench.head_dim, vocab_size=vocab_size, context_length=CONTEXT_LENGTH,
        rms_norm_eps=RMS_NORM_EPS, rope_theta=ROPE_THETA, rope_scaling_factor=None, tie_word_embeddings=False,
        torch_dtype=None, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )


def _weight_std(name: str, shape: tuple[int, ...], bench: BenchShape) -> float:
    if len(shape) < 2:
        return NORM_STD
    kind = name.split(".")[-2]
    fan_in = shape[-1]
    if kind == "token_embd":
        return EMBED_STD
    if kind == "output":
        return OUTPUT_SCALE / math.sqrt(fan_in)
    if kind in ("attn_output", "ffn_down"):
        return RESIDUAL_SCALE / math.sqrt(fan_in)
    return 1.0 / math.sqrt(fan_in)


def plan_bench_tensors(bench: BenchShape, out_type: str, vocab_size: int) -> list[BenchTensor]:
    """Every tensor of the GGUF in file order: token_embd, the layers, output_norm, output."""
    from capsfuse_lite.convert.llama import expected_shapes

    shapes = expected_shapes(_llama_config(bench, vocab_size))
    tail = [gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight", gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"]
    order = [name for name in shapes if name not in tail] + tail
    return [BenchTensor(name, shapes[name], tensor_type(name, shapes[name], out_type, bench),
                        _weight_std(name, shapes[name], bench)) for name in order]


# -- random blocks -------------------------------------------------------------------------------


def _mean_square(values: np.ndarray) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64) ** 2))


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


K_SCALE_RANGE = (8, 40)  # Q4_K/Q5_K 6-bit sub-scales (mins equal them)
Q6K_SCALE_RANGE = (4, 11)  # Q6_K int8 sub-scale magnitudes: 4 + (random byte & 7), sign from its top bit


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (get_scale_min_k4)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


# 65536 packed sub-scale sets (mins = scales), picked per block by 16 random bits: packing
# afresh for every block would cost more than generating the quants.
_K_SCALE_TABLE = (lambda sc: _pack_k_scales(sc, sc))(
    np.random.default_rng(0x5CA1E).integers(K_SCALE_RANGE[0], K_SCALE_RANGE[1] + 1, size=(1 << 16, 8), dtype=np.uint8))
_Q6K_SCALE_LUT = np.array([(-1 if b & 0x80 else 1) * (Q6K_SCALE_RANGE[0] + (b & 7)) for b in range(256)], np.int8)


def _set_d(blocks: np.ndarray, d: np.ndarray, offset: int = 0) -> None:
    blocks[:, offset:offset + 2] = _fp16_bytes(d)


def _set_k(levels: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """Q4_K/Q5_K: d, dmin = d (levels - 1) / 2 and sub-scales = mins, so w = d sc (q - (levels - 1) / 2)."""

    def set_scales(blocks: np.ndarray, d: np.ndarray) -> None:
        dm = np.empty((d.shape[0], 2), "<f2")
        dm[:, 0] = d
        dm[:, 1] = d * np.float32((levels - 1) / 2)
        blocks[:, 0:4] = dm.view(np.uint8)
        pick = blocks[:, 4:6].copy().view("<u2").reshape(-1)  # random bytes, about to be replaced
        blocks[:, 4:16] = _K_SCALE_TABLE[pick]

    return set_scales


def _set_q6k(blocks: np.ndarray, d: np.ndarray) -> None:
    blocks[:, 192:208] = _Q6K_SCALE_LUT[blocks[:, 192:208]].view(np.uint8)
    _set_d(blocks, d, 208)


@dataclass(frozen=True)
class _Layout:
    signed_d: bool  # d takes a random sign (the quants alone are symmetric about their offset)
    unit_var: float  # E[(w / d)^2] over uniform random quants (and sub-scales)
    set_scales: Callable[[np.ndarray, np.ndarray], None]  # write d (and dmin, sub-scales) into the blocks


_K_MS = _mean_square(np.arange(K_SCALE_RANGE[0], K_SCALE_RANGE[1] + 1))
_Q6K_MS = _mean_square(np.arange(Q6K_SCALE_RANGE[0], Q6K_SCALE_RANGE[1] + 1))
LAYOUTS: dict[QT, _Layout] = {
    QT.Q4_0: _Layout(True, _mean_square(np.arange(16) - 8), _set_d),
    QT.Q5_0: _Layout(True, _mean_square(np.arange(32) - 16), _set_d),
    QT.Q8_0: _Layout(True, _mean_square(np.arange(-128, 128)), _set_d),
    QT.Q4_K: _Layout(False, _mean_square(np.arange(16) - 7.5) * _K_MS, _set_k(16)),
    QT.Q5_K: _Layout(False, _mean_square(np.arange(32) - 15.5) * _K_MS, _set_k(32)),
    QT.Q6_K: _Layout(True, _mean_square(np.arange(64) - 32) * _Q6K_MS, _set_q6k),
}
_JITTER_MS = (JITTER[1] ** 3 - JITTER[0] ** 3) / (3 * (JITTER[1] - JITTER[0]))  # E[j^2], j ~ U(JITTER)


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(0, np.iinfo(np.uint64).max, size=(n + 7) // 8, dtype=np.uint64, endpoint=True)
    return words.view(np.uint8)[:n]


def random_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int, std: float) -> np.ndarray:
    """``n_blocks`` blocks of ``qtype`` as a (n_blocks, type_size) uint8 array: uniform random
    quants, every fp16 scale finite, weights zero-mean with standard deviation ``std``."""
    layout = LAYOUTS.get(qtype)
    if layout is None:
        raise ValueError(f"no random block layout for {qtype.name}")
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = random_bytes(rng, n_blocks * size).reshape(n_blocks, size)
    u = rng.uniform(-1.0, 1.0, size=n_blocks).astype(np.float32)  # sign and jitter from one draw
    d = JITTER[0] + (JITTER[1] - JITTER[0]) * np.abs(u)
    d *= np.float32(std / math.sqrt(layout.unit_var * _JITTER_MS))
    if layout.signed_d:
        d = np.copysign(d, u)
    layout.set_scales(blocks, d)
    return blocks


def _random_floats(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """Uniform zero-mean values with standard deviation ``std`` (float32)."""
    values = rng.random(n, dtype=np.float32)
    values -= np.float32(0.5)
    values *= np.float32(std * math.sqrt(12.0))
    return values


def tensor_chunks(tensor: BenchTensor, rng: np.random.Generator, zero_rows: tuple[int, ...] = (),
                  chunk_bytes: int | None = None):
    """The tensor's data as byte arrays of whole rows, at most ``chunk_bytes`` (default
    ``CHUNK_BYTES``) each, one row at least; rows in ``zero_rows`` are all zeros (a zero weight
    row for any type)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if len(tensor.shape) == 1:
        yield (np.float32(1.0) + rng.standard_normal(tensor.shape[0], dtype=np.float32) * np.float32(tensor.std)).view(np.uint8)
        return
    n_rows, ncols = tensor.shape
    block, size = gguf.GGML_QUANT_SIZES[tensor.qtype]
    row_bytes = ncols // block * size
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(n_rows, start + rows_per_chunk)
        if tensor.qtype in (QT.F16, QT.F32):
            dtype = np.float16 if tensor.qtype == QT.F16 else np.float32
            data = _random_floats(rng, (stop - start) * ncols, tensor.std).astype(dtype, copy=False).view(np.uint8)
        else:
            data = random_blocks(rng, tensor.qtype, (stop - start) * ncols // block, tensor.std).reshape(-1)
        for row in zero_rows:
            if start <= row < stop:
                data[(row - start) * row_bytes:(row - start + 1) * row_bytes] = 0
        yield data


# -- the file ------------------------------------------------------------------------------------


def vocab_path() -> Path:
    """LLaMA-2's vocabulary GGUF shipped with capsfuse-lite (see data/NOTICE)."""
    path = D.PACKAGE_DATA / VOCAB_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: the LLaMA vocabulary is missing from this installation; reinstall capsfuse-lite")
    return path


def bench_vocab():
    """CapsFus-LLaMA's vocabulary as ``capsfuse-lite convert`` builds it: LLaMA-2's 32000
    SentencePiece pieces, scores and types, then ``[PAD]`` = 32000 (CONTROL, score -1000, the
    padding id); BOS 1, EOS 2, UNK 0; add BOS, not EOS; a space prefix."""
    from capsfuse_lite.convert.gguf_metadata import read_gguf_metadata
    from capsfuse_lite.convert.spm import CONTROL
    from capsfuse_lite.convert.vocab import ADDED_TOKEN_SCORE, Vocab

    meta = read_gguf_metadata(vocab_path(), load_arrays=True)
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    pad_id = len(tokens)
    return Vocab(
        tokens=[*tokens, PAD_TOKEN], scores=[*scores, ADDED_TOKEN_SCORE], types=[*types, CONTROL],
        bos_id=int(meta["tokenizer.ggml.bos_token_id"]), eos_id=int(meta["tokenizer.ggml.eos_token_id"]),
        unk_id=int(meta["tokenizer.ggml.unknown_token_id"]), pad_id=pad_id,
        add_bos=bool(meta["tokenizer.ggml.add_bos_token"]), add_eos=bool(meta["tokenizer.ggml.add_eos_token"]),
        add_space_prefix=True,
    )


def model_name(bench: BenchShape) -> str:
    return f"bench-llama-{bench.label}-random"


def _writer(bench: BenchShape, out_type: str, seed: int, vocab, tensors: list[BenchTensor]) -> gguf.GGUFWriter:
    from capsfuse_lite.convert.llama import ARCH_NAME, add_model_metadata, add_vocab_metadata
    from capsfuse_lite.convert.pipeline import CONVERTER_VERSION, add_capsfuse_defaults

    writer = gguf.GGUFWriter(None, ARCH_NAME)
    writer.add_name(model_name(bench))
    writer.add_description(
        f"Random weights (seed {seed}) in a LLaMA shape ({bench.describe()}) with CapsFus-LLaMA's tokenizer and "
        "decoding defaults, written by `capsfuse-lite bench-model` for benchmarks: it never emits EOS and its "
        "text is meaningless."
    )
    add_model_metadata(writer, _llama_config(bench, len(vocab)), FILE_TYPES[out_type])
    add_vocab_metadata(writer, vocab)
    add_capsfuse_defaults(writer)
    writer.add_string(D.KEY_SOURCE, f"random weights (capsfuse-lite bench-model, {bench.label} shape, seed {seed})")
    writer.add_string(D.KEY_REVISION, f"seed {seed}")
    writer.add_string(D.KEY_SOURCE_SHA256, "{}")
    writer.add_string(D.KEY_CONVERTER_VERSION, CONVERTER_VERSION)
    writer.add_bool(D.KEY_RANDOM_WEIGHTS, True)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer


def write_bench_model(path: str | os.PathLike, shape: str | BenchShape = "13b", out_type: str = "q4_k_m", *,
                      seed: int = 0, force: bool = False, progress: bool | None = None) -> Path:
    """Write a random-weight GGUF of ``shape`` (a preset name: tiny, cpu768, 7b, 13b, or a
    :class:`BenchShape`) and ``out_type`` (q4_k_m, q4_0, q8_0, f16) to ``path``; return the path.

    The same ``seed`` gives the same bytes (for the same ``CHUNK_BYTES``). The file appears only
    when complete (temp file, fsync, rename); an existing file is refused unless ``force``.
    ``progress``: a bar on stderr (None: when stderr is a terminal), else log lines.
    """
    from capsfuse_lite.convert.progress import ConvertProgress, human_bytes
    from capsfuse_lite.convert.writer import check_free_space, check_output_path, remove_quietly, temp_path
    from capsfuse_lite.files import check_output_folder, make_output_folder

    bench = bench_shape(shape)
    out_type = check_out_type(out_type)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(path).expanduser().resolve()
    check_output_path(out, force)
    check_output_folder(out)
    vocab = bench_vocab()
    make_output_folder(out)
    tensors = plan_bench_tensors(bench, out_type, len(vocab))
    total = sum(t.nbytes for t in tensors)
    check_free_space(out.parent, total + _HEADER_ALLOWANCE, f"writing a {human_bytes(total)} bench model")
    writer = _writer(bench, out_type, seed, vocab, tensors)
    output_name = gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"

    reporter = ConvertProgress(progress)
    reporter.message(f"writing a random {bench.label} model ({bench.describe()}, vocab {len(vocab)}) as {out_type}: {out}")
    tmp = temp_path(out, out_type)
    started = time.perf_counter()
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        reporter.start(f"{out_type} {out.name}", total, len(tensors))
        # One thread writes batch k while this one generates batch k+1 (file writes release the
        # GIL), so the disk, not the random numbers, sets the pace.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model-writer") as pool:
            pending = None
            batch: list = []
            batch_bytes = 0

            def put(data: bytes | np.ndarray, flush: bool = False) -> None:
                nonlocal pending, batch, batch_bytes
                batch.append(memoryview(data))
                batch_bytes += len(batch[-1])
                if batch_bytes >= WRITE_BYTES or flush:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(fout.writelines, batch)
                    batch, batch_bytes = [], 0

            try:
                position = fout.tell()
                for index, tensor in enumerate(tensors):
                    rng = np.random.default_rng([seed, index])
                    pad = gguf.GGUFWriter.ggml_pad(position, writer.data_alignment) - position
                    put(bytes(pad))
                    position += pad
                    zero = (vocab.eos_id,) if tensor.name == output_name else ()
                    written = 0
                    for data in tensor_chunks(tensor, rng, zero):
                        put(data)
                        written += data.nbytes
                        reporter.advance(data.nbytes)
                    if written != tensor.nbytes:  # a bug, not a user error
                        raise AssertionError(f"{tensor.name}: wrote {written} bytes, expected {tensor.nbytes}")
                    position += written
                    reporter.advance(0, tensor_done=True)
                pad = gguf.GGUFWriter.ggml_pad(position, writer.data_alignment) - position
                put(bytes(pad), flush=True)  # the file ends aligned too, as gguf-py and llama.cpp write it
                position += pad
                if pending is not None:
                    pending.result()
            finally:
                reporter.stop()
        if fout.tell() != position:  # a bug, not a user error
            raise AssertionError(f"file position {fout.tell()} != {position}")
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        remove_quietly(tmp)
        raise
    seconds = time.perf_counter() - started
    size = out.stat().st_size
    reporter.message(f"wrote {out} ({human_bytes(size)}) in {seconds:.1f} s ({size / seconds / 1e6:.0f} MB/s)")
    return out


# -- checking a bench model ----------------------------------------------------------------------


@dataclass
class EosProbe:
    """What greedy decoding saw, step by step, over some prompts (see :func:`probe_eos`)."""

    steps: int = 0  # logit rows inspected
    finite: bool = True  # every logit finite
    max_abs_eos_logit: float = 0.0  # 0 when the EOS row of output.weight is zero
    min_above_eos: int = -1  # fewest tokens scoring strictly above EOS at any step
    min_margin: float = math.inf  # smallest (top-th best non-EOS logit - EOS logit)
    max_abs_logit: float = 0.0
    mean_logit_std: float = 0.0  # spread of the logits across the vocabulary, averaged over steps
    distinct_tokens: int = 0  # different tokens chosen over all steps


def probe_eos(model_path: str | os.PathLike, pairs: list[tuple[str, str]], steps: int, *, top: int = 6,
              n_threads: int | None = None, n_gpu_layers: int = 0) -> EosProbe:
    """Greedy-decode each (raw, synthetic) pair for ``steps`` tokens and record how far EOS stays
    below the ``top`` best tokens (``top`` = 2 x beams covers beam search's candidates)."""
    from capsfuse_lite.engine.fuser import prompt_builder
    from capsfuse_lite.engine.llama import Batch, Context, Model
    from capsfuse_lite.models import gguf_defaults

    probe = EosProbe()
    chosen: set[int] = set()
    spreads: list[float] = []
    with Model(model_path, n_gpu_layers=n_gpu_layers) as model:
        eos = model.vocab.eos
        builder = prompt_builder(model, gguf_defaults(model.path))
        prompts = [builder.build(raw, synthetic).token_ids for raw, synthetic in pairs]
        n_ctx = max(len(p) for p in prompts) + steps + 1
        with Context(model, n_ctx=n_ctx, n_batch=max(512, n_ctx), n_threads=n_threads) as ctx, Batch(ctx.n_batch) as batch:
            for ids in prompts:
                ctx.clear()
                batch.clear()
                index = batch.add_sequence(ids, 0, 0, logits_last=True)
                for step in range(steps):
                    ctx.decode(batch)
                    logits = ctx.logits(index).astype(np.float64)
                    probe.steps += 1
                    if not np.isfinite(logits).all():
                        probe.finite = False
                        return probe
                    others = np.delete(logits, eos)
                    probe.max_abs_eos_logit = max(probe.max_abs_eos_logit, abs(float(logits[eos])))
                    above = int((others > logits[eos]).sum())
                    probe.min_above_eos = above if probe.min_above_eos < 0 else min(probe.min_above_eos, above)
                    probe.min_margin = min(probe.min_margin, float(np.partition(others, -top)[-top] - logits[eos]))
                    probe.max_abs_logit = max(probe.max_abs_logit, float(np.abs(logits).max()))
                    spreads.append(float(logits.std()))
                    token = int(np.argmax(logits))
                    chosen.add(token)
                    batch.clear()
                    index = batch.add(token, len(ids) + step, 0, logits=True)
    probe.mean_logit_std = float(np.mean(spreads)) if spreads else 0.0
    probe.distinct_tokens = len(chosen)
    return probe
