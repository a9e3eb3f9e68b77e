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
