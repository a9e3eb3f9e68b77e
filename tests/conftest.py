"""Session-wide fixtures: sample captions, the LLaMA SentencePiece model, a tiny upstream-layout
checkpoint, its f32/q8_0 GGUFs and the transformers reference model (see tests/checkpoints.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
if str(TESTS) not in sys.path:  # make `from checkpoints import ...` work from any test module
    sys.path.insert(0, str(TESTS))

from checkpoints import TOKENIZER_MODEL, make_llama_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    """The 47 upstream CapsFusion rows (laion_2b, laion_coco, capsfuion_official)."""
    return json.loads((FIXTURES / "capsfusion_sample.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def sp_model_path() -> Path:
    """LLaMA-2's SentencePiece tokenizer.model, rebuilt from the vocab GGUF (make_tokenizer_model.py)."""
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Upstream layout: fp32 .bin shards + index, 4.28 config, [PAD]=32000, vocab 32001, 2 layers."""
    return make_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capsfuse_lite.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-f32.gguf"
    return convert_checkpoint(tiny_llama_dir, out, out_type="f32", progress=False)


@pytest.fixture(scope="session")
def tiny_gguf_q8(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capsfuse_lite.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-q8_0.gguf"
    return convert_checkpoint(tiny_llama_dir, out, out_type="q8_0", progress=False)


@pytest.fixture(scope="session")
def hf_tiny_model(tiny_llama_dir: Path):
    """transformers LlamaForCausalLM (fp32, eval) loaded from tiny_llama_dir."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model.eval()
