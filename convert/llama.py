"""LLaMA specifics of the conversion: tensor names, shapes, Q/K row order, output types, metadata.

Names come from gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.LLAMA``. HF stores the Q and K
projections with each head's rotary halves split (rotate_half layout); llama.cpp's rope pairs
adjacent dimensions, so the rows of ``q_proj`` (per attention head) and ``k_proj`` (per KV head)
are reordered: within a head, row ``2*i + j`` of the output comes from row ``j*half + i`` of the
input. This is a pure row permutation, so it is applied while streaming rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_ARCH, MODEL_TENSOR

from capsfuse_lite.errors import CheckpointError, ConfigError

from .source import Checkpoint, LlamaConfig
from .tensors import NUMPY_DTYPES, TensorRef

ARCH = MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]

# out_type -> (tensor type for 2-D weights written by Python, llama_ftype) ; k-quants and q4_0
# are produced by llama.cpp's quantizer from an F16/BF16 intermediate.
DIRECT_TYPES = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LLAMA_QUANT_TYPES = {
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
OUT_TYPES = (*DIRECT_TYPES, *LLAMA_QUANT_TYPES)
# Approximate bits per weight of llama.cpp's mixes (for the disk-space estimate only).
QUANT_BITS_PER_WEIGHT = {"q4_0": 4.55, "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6}

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers older transformers saved in the state dict


def check_out_type(out_type: str) -> str:
    out = out_type.lower()
    if out not in OUT_TYPES:
        raise ConfigError(f"--type {out_type!r} is not supported; choose one of {', '.join(OUT_TYPES)}")
    return out


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from, its GGUF name/type/size and its row order."""

    source: TensorRef
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: QT
    permute_heads: int = 0  # >0: apply the rope row permutation with this many heads

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_elements(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else self.shape[0]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)

    def row_index(self) -> np.ndarray | None:
        return rope_row_order(self.rows, self.permute_heads) if self.permute_heads else None


def tensor_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * type_size


def rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Source row for each output row: HF rotate_half layout -> llama.cpp interleaved pairs."""
    head_dim = n_rows // n_heads
    half = head_dim // 2
    rows = np.arange(n_rows).reshape(n_heads, 2, half)  # [head, which half, i]
    return rows.transpose(0, 2, 1).reshape(n_rows)  # output (head, i, which half)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> HF (numpy-order) shape for every tensor a LLaMA GGUF needs."""
    h, ff, hd = config.hidden_size, config.intermediate_size, config.head_dim
    names = gguf.TENSOR_NAMES
    shapes: dict[str, tuple[int, ...]] = {
        names[MODEL_TENSOR.TOKEN_EMBD] + ".weight": (config.vocab_size, h),
        names[MODEL_TENSOR.OUTPUT_NORM] + ".weight": (h,),
        names[MODEL_TENSOR.OUTPUT] + ".weight": (config.vocab_size, h),
    }
    per_layer = {
        MODEL_TENSOR.ATTN_NORM: (h,),
        MODEL_TENSOR.ATTN_Q: (config.n_heads * hd, h),
        MODEL_TENSOR.ATTN_K: (config.n_kv_heads * hd, h),
        MODEL_TENSOR.ATTN_V: (config.n_kv_heads * hd, h),
        MODEL_TENSOR.ATTN_OUT: (h, config.n_heads * hd),
        MODEL_TENSOR.FFN_NORM: (h,),
        MODEL_TENSOR.FFN_GATE: (ff, h),
        MODEL_TENSOR.FFN_UP: (ff, h),
        MODEL_TENSOR.FFN_DOWN: (h, ff),
    }
    for layer in range(config.n_layers):
        for tensor, shape in per_layer.items():
            shapes[names[tensor].format(bid=layer) + ".weight"] = shape
    return shapes


def _weight_type(out_type: str, shape: tuple[int, ...]) -> QT:
    if len(shape) < 2:
        return QT.F32  # norms stay f32, as llama.cpp expects
    qtype = DIRECT_TYPES[out_type][0]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return QT.F16  # row not a multiple of the block: llama.cpp's converter falls back the same way
    return qtype


def plan_tensors(checkpoint: Checkpoint, write_type: str) -> list[TensorPlan]:
    """Map, validate and order every checkpoint tensor; raises on unknown/missing/mis-shaped ones."""
    config = checkpoint.config
    name_map = gguf.get_tensor_name_map(ARCH, config.n_layers)
    expected = expected_shapes(config)
    q_name = gguf.TENSOR_NAMES[MODEL_TENSOR.ATTN_Q]
    k_name = gguf.TENSOR_NAMES[MODEL_TENSOR.ATTN_K]
    output_name = gguf.TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
    plans: dict[str, TensorPlan] = {}
    for hf_name, ref in checkpoint.tensors.items():
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in expected:
            raise CheckpointError(f"{ref.path}: unexpected tensor {hf_name} for a {config.n_layers}-layer LlamaForCausalLM")
        if name in plans:
            raise CheckpointError(f"{ref.path}: tensors {plans[name].source.name} and {hf_name} both map to {name}")
        if ref.shape != expected[name]:
            raise CheckpointError(
                f"{ref.path}: tensor {hf_name} has shape {list(ref.shape)}, config.json implies {list(expected[name])}"
            )
        if ref.dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{ref.path}: tensor {hf_name} is stored as {ref.dtype}; only F32, F16 and BF16 weights are supported")
        heads = 0
        if name.startswith("blk.") and name.endswith(".weight"):
            base = name[: -len(".weight")]
            layer = int(name.split(".")[1])
            if base == q_name.format(bid=layer):
                heads = config.n_heads
            elif base == k_name.format(bid=layer):
                heads = config.n_kv_heads
        plans[name] = TensorPlan(ref, name, ref.shape, _weight_type(write_type, ref.shape), heads)
    if output_name not in plans and config.tie_word_embeddings:
        expected.pop(output_name)  # llama.cpp reuses token_embd when output.weight is absent
    missing = [name for name in expected if name not in plans]
    if missing:
        raise CheckpointError(
            f"{checkpoint.folder}: checkpoint lacks {len(missing)} tensor(s) a LLaMA needs, e.g. {missing[0]}; "
            "a shard is missing or the checkpoint is incomplete"
        )
    # File order, then offset: one sequential pass over each shard.
    return sorted(plans.values(), key=lambda p: (str(p.source.path), p.source.offset))


def add_model_metadata(writer: gguf.GGUFWriter, config: LlamaConfig, file_type: int) -> None:
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling_factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    if file_type not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocab_metadata(writer: gguf.GGUFWriter, vocab) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for setter, value in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_pad_token_id, vocab.pad_id),
    ):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
