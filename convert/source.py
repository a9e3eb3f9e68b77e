"""A Hugging Face LLaMA checkpoint folder: its config, tokenizer files and weight shards.

:func:`open_checkpoint` reads ``config.json`` (transformers-4.28 style as well as the current
style), finds the weights (safetensors preferred over PyTorch ``.bin``; sharded through an index
or single) and indexes every tensor lazily. No tensor data is read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsfuse_lite.errors import CheckpointError, UnsupportedModelError

from .safetensors_reader import read_safetensors
from .tensors import TensorRef
from .torchbin import read_torch_checkpoint

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG_FILES = ("config.json", "generation_config.json")
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters the GGUF needs, normalised across transformers versions."""

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # linear RoPE scaling, None when absent
    tie_word_embeddings: bool
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-download it") from None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, list):  # newer configs allow several EOS ids; the first is the primary one
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _rope(cfg: dict, path: Path) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor) from either config style."""
    params = cfg.get("rope_parameters")  # current style: {"rope_type": ..., "rope_theta": ...}
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            return float(theta or 10000.0), None
        if kind != "linear":
            raise UnsupportedModelError(f"{path}: RoPE scaling type {kind!r} is not supported (only linear); use an unscaled LLaMA")
        return float(theta or 10000.0), float(scaling["factor"])
    return float(theta or 10000.0), None


def read_config(path: Path) -> LlamaConfig:
    cfg = _json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    archs = cfg.get("architectures") or ([] if cfg.get("model_type") != "llama" else ["LlamaForCausalLM"])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModelError(
            f"{path}: architecture {', '.join(archs) or cfg.get('model_type', 'unknown')} is not supported; "
            "capsfuse-lite converts LlamaForCausalLM checkpoints (such as BAAI/CapsFus-LLaMA)"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{path}: hidden_act {act!r} is not supported (LLaMA uses silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{path}: attention/MLP biases are not supported (LLaMA has none)")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope(cfg, path)[0],
            rope_scaling_factor=_rope(cfg, path)[1],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            bos_token_id=_int_or_none(cfg.get("bos_token_id")),
            eos_token_id=_int_or_none(cfg.get("eos_token_id")),
            pad_token_id=_int_or_none(cfg.get("pad_token_id")),
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: config.json lacks {exc.args[0]!r}; not a complete LLaMA config") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json holds an invalid value ({exc})") from None
    if heads % kv_heads or head_dim % 2:
        raise UnsupportedModelError(f"{path}: {heads} attention heads with {kv_heads} KV heads of size {head_dim} is not a valid LLaMA layout")
    return config


@dataclass
class Checkpoint:
    folder: Path
    config: LlamaConfig
    config_path: Path
    weight_files: list[Path]
    tensors: dict[str, TensorRef]
    extra_files: list[Path] = field(default_factory=list)  # config/tokenizer files present

    @property
    def source_files(self) -> list[Path]:
        """Every file the conversion reads (for the sha256 record), config and tokenizer first."""
        return [*self.extra_files, *self.weight_files]


def find_weight_files(folder: Path) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None): safetensors first, then PyTorch .bin."""
    for index_name, single_name in _WEIGHT_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            weight_map = _json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map; the index is corrupt, re-download it")
            files = sorted({folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard(s) {', '.join(missing)} missing from {folder}; download them")
            return files, index
        single = folder / single_name
        if single.is_file():
            return [single], None
    raise CheckpointError(
        f"{folder}: no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read config and index the tensors of every shard (lazily; no tensor data is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face model folder")
    config = read_config(config_path)
    weight_files, index = find_weight_files(folder)
    tensors: dict[str, TensorRef] = {}
    for path in weight_files:
        refs = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_checkpoint(path)
        for name, ref in refs.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} also appears in {tensors[name].path.name}; the shards overlap")
            tensors[name] = ref
    extra = [folder / n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if (folder / n).is_file()]
    if index is not None:
        extra.append(index)
    return Checkpoint(folder, config, config_path, weight_files, tensors, extra)
