"""Tiny random LLaMA checkpoints in the layouts the converter must read (test-time only: torch).

``make_llama_checkpoint`` writes a LlamaForCausalLM folder like BAAI/CapsFus-LLaMA's, only tiny:
LLaMA-2's real SentencePiece vocabulary plus ``[PAD]`` = 32000 (vocab 32001), random weights
from a fixed seed, and the files transformers 4.28 wrote (fp32 ``.bin`` shards with an index,
``rotary_emb.inv_freq`` buffers, a config without rope_theta/head_dim, added_tokens.json,
special_tokens_map.json) or the current style (``rope_parameters``/``dtype``, safetensors,
``added_tokens_decoder``).

Weights are scaled for a well-conditioned model: linear layers ~ N(0, 1/fan_in) so attention is
far from uniform (a wrong Q/K permutation moves logits by ~3, against ~1e-5 between llama.cpp f32
and transformers), RMSNorm gains 1 + N(0, 0.2²), the residual branches' output projections
(o_proj, down_proj) x 0.3 so the residual stream is not dominated by quantisation noise of the
layers (q8_0 top-1 agreement ~97 % over CapsFusion prompts), and the LM head x ``lm_head_scale``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_MODEL = FIXTURES / "tokenizer.model"
PAD_TOKEN = "[PAD]"
SP_VOCAB = 32000
VOCAB = SP_VOCAB + 1
MAX_POSITIONS = 512
LAYOUTS = ("bin-sharded", "bin", "safetensors", "safetensors-sharded")
DTYPES = ("float32", "float16", "bfloat16")

_SPECIAL = {"<s>": 1, "</s>": 2, "<unk>": 0}
RESIDUAL_BRANCH_SCALE = 0.3


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _config_dict(style: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None,
                 dtype: str, tie: bool) -> dict:
    if style == "4.28":
        config = {
            "_name_or_path": "tiny-capsfus-llama",
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": intermediate,
            "max_position_embeddings": MAX_POSITIONS,
            "model_type": "llama",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-06,
            "tie_word_embeddings": tie,
            "torch_dtype": dtype,
            "transformers_version": "4.28.1",
            "use_cache": True,
            "vocab_size": VOCAB,
        }
        if kv_heads is not None:  # GQA post-dates 4.28, but the key is all that differs
            config["num_key_value_heads"] = kv_heads
        return config
    if style != "current":
        raise ValueError(f"config_style {style!r}")
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=SP_VOCAB, tie_word_embeddings=tie,
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return config


def _write_tokenizer(folder: Path, style: str) -> None:
    shutil.copyfile(TOKENIZER_MODEL, folder / "tokenizer.model")
    special_map = {
        "bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"), "pad_token": PAD_TOKEN,
    }
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": {"__type": "AddedToken", **_added_token("<s>")},
        "eos_token": {"__type": "AddedToken", **_added_token("</s>")},
        "unk_token": {"__type": "AddedToken", **_added_token("<unk>")},
        "model_max_length": 1000000000000000019884624838656, "pad_token": None,
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }
    if style == "current":
        decoder = {str(i): {**_added_token(t), "normalized": False, "special": True} for t, i in _SPECIAL.items()}
        decoder[str(SP_VOCAB)] = {**_added_token(PAD_TOKEN), "normalized": False, "special": True}
        tokenizer_config.update(added_tokens_decoder=decoder, pad_token=PAD_TOKEN, legacy=True)
        for key in ("bos_token", "eos_token", "unk_token"):
            tokenizer_config[key] = tokenizer_config[key]["content"]
    (folder / "added_tokens.json").write_text(json.dumps({PAD_TOKEN: SP_VOCAB}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def random_state_dict(config_kwargs: dict, seed: int, lm_head_scale: float, with_inv_freq: bool) -> dict:
    """HF LlamaForCausalLM parameter names/shapes with well-conditioned random fp32 values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            if name == "lm_head.weight":
                value = value * lm_head_scale
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                value = value * RESIDUAL_BRANCH_SCALE
        state[name] = value.contiguous()
    if with_inv_freq:  # transformers 4.28 saved this buffer in every layer
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for layer in range(config.num_hidden_layers):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def _shards(state: dict, n: int) -> list[dict]:
    names = list(state)
    total = sum(t.numel() for t in state.values())
    shards, current, size = [], {}, 0
    for name in names:
        current[name] = state[name]
        size += state[name].numel()
        if size >= total * (len(shards) + 1) / n and len(shards) < n - 1:
            shards.append(current)
            current = {}
    shards.append(current)
    return [s for s in shards if s]


def _save_weights(folder: Path, state: dict, layout: str) -> None:
    import torch

    safetensors = layout.startswith("safetensors")
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    shards = _shards(state, 2) if layout.endswith("sharded") else [state]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}.{ext}" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        if safetensors:
            from safetensors.torch import save_file

            save_file(shard, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / file)
        weight_map.update({name: file for name in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_name = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        (folder / index_name).write_text(json.dumps(index, indent=2))


def make_llama_checkpoint(dir: str | Path, *, hidden: int = 64, intermediate: int = 172, layers: int = 2,
                          heads: int = 4, kv_heads: int | None = None, layout: str = "bin-sharded",
                          dtype: str = "float32", config_style: str = "4.28", seed: int = 0,
                          lm_head_scale: float = 4.0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny random LlamaForCausalLM checkpoint folder and return it."""
    import torch

    if layout not in LAYOUTS or dtype not in DTYPES:
        raise ValueError(f"layout {layout!r} / dtype {dtype!r}")
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_dict(config_style, hidden, intermediate, layers, heads, kv_heads, dtype, tie_word_embeddings)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    _write_tokenizer(folder, config_style)
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                  tie_word_embeddings=tie_word_embeddings)
    state = random_state_dict(kwargs, seed, lm_head_scale, with_inv_freq=config_style == "4.28")
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cast = getattr(torch, dtype)
    state = {name: t.to(cast) if t.is_floating_point() else t for name, t in state.items()}
    _save_weights(folder, state, layout)
    return folder


# -- a GGUF's weights as an HF checkpoint (for `capsfuse-lite bench --hf-checkpoint`) ---------------

_HF_NAMES = {  # GGUF tensor (gguf-py's LLaMA names) -> HF LlamaForCausalLM parameter
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_SAFETENSORS_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}.weight"
    return f"{_HF_NAMES[parts[0]]}.weight"


def _to_bf16(values):
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def checkpoint_from_gguf(gguf_path: str | Path, folder: str | Path, *, dtype: str = "bfloat16",
                         chunk_rows: int = 4096) -> Path:
    """Write the GGUF's LLaMA weights, dequantized, as an HF checkpoint in upstream's style (4.28
    config, CapsFus-LLaMA's tokenizer files, one ``model.safetensors`` of ``dtype``): the same
    model for transformers. Q/K rows go back to HF's rotate_half order. Streams row chunks; no torch."""
    import gguf
    import numpy as np

    from capsfuse_lite.convert.gguf_metadata import read_gguf_metadata
    from capsfuse_lite.convert.llama import rope_row_order

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = read_gguf_metadata(gguf_path)
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    config = _config_dict("4.28", meta["llama.embedding_length"], meta["llama.feed_forward_length"],
                          meta["llama.block_count"], heads, kv_heads if kv_heads != heads else None, dtype, False)
    config.update(max_position_embeddings=meta["llama.context_length"], vocab_size=meta["llama.vocab_size"],
                  rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
                  _name_or_path=str(meta.get("general.name", "bench-model")))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    _write_tokenizer(folder, "4.28")

    tag, itemsize = _SAFETENSORS_DTYPES[dtype]
    reader = gguf.GGUFReader(gguf_path)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists ne0 (the row length) first
        size = int(np.prod(shape)) * itemsize
        header[_hf_name(tensor.name)] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(folder / "model.safetensors", "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for tensor in reader.tensors:
            kind = tensor.name.split(".")[-2]
            rows = tensor.data if tensor.data.ndim > 1 else tensor.data.reshape(1, -1)
            if kind in ("attn_q", "attn_k"):  # GGUF's interleaved rope pairs -> HF's rotate_half halves
                weights = gguf.quants.dequantize(rows, tensor.tensor_type)
                hf = np.empty_like(weights)
                hf[rope_row_order(weights.shape[0], heads if kind == "attn_q" else kv_heads)] = weights
                chunks = [hf]
            else:
                chunks = (gguf.quants.dequantize(rows[i:i + chunk_rows], tensor.tensor_type)
                          for i in range(0, rows.shape[0], chunk_rows))
            for chunk in chunks:
                out.write((_to_bf16(chunk) if dtype == "bfloat16" else chunk.astype(np.float32)).tobytes())
    return folder
