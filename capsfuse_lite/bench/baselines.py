"""The systems `capsfuse-lite bench` compares the engine against, run on the same rows.

Every runner here (and the engine runner in :mod:`capsfuse_lite.bench.measure`) has the same small
shape: ``load()`` builds the model, ``run(pairs)`` yields one :class:`RowFigures` per row as
rows finish, ``close()`` frees it, ``describe()`` says how it was set up. The bench times
``run`` and never looks inside.

- :class:`LlamaLoopBaseline` (``llama-cpp-python-loop``): what users do today, one
  ``llama_cpp.Llama.create_completion`` per row, greedy, on the same GGUF. llama-cpp-python keeps
  the previous prompt in its KV cache and reuses the common prefix, so this loop already gets
  the shared prompt template for free.
- :class:`HFUpstreamBaseline` (``hf-upstream``): upstream CapsFusion's method on the original
  Hugging Face checkpoint: transformers ``generate`` on batches of 4 prompts left-padded to 256
  tokens, 3-beam search. transformers and torch are imported only when it loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from capsfuse_lite import defaults
from capsfuse_lite.errors import CheckpointError, ConfigError, ModelLoadError
from capsfuse_lite.engine.prompts import PromptBuilder

LOOP_BASELINE = "llama-cpp-python-loop"
HF_BASELINE = "hf-upstream"
BASELINE_NAMES = (LOOP_BASELINE, HF_BASELINE)

# Upstream's generation setup (CapsFusion's inference script and config).
HF_BATCH_SIZE = 4
HF_PAD_TO = defaults.MAX_INPUT_TOKENS
HF_NUM_BEAMS = defaults.NUM_BEAMS


@dataclass(frozen=True)
class RowFigures:
    """What one finished row cost: the real prompt tokens it read and the tokens it generated."""

    prompt_tokens: int
    generated_tokens: int


Pair = tuple[str, str]


class LlamaLoopBaseline:
    """One ``Llama.create_completion`` call per row: greedy, the same max tokens, same prompts."""

    name = LOOP_BASELINE

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_new_tokens: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        n_ctx: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.max_new_tokens = max_new_tokens
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx = n_ctx
        self._llm = None
        self._builder = None

    def load(self) -> None:
        import llama_cpp

        from capsfuse_lite.models import gguf_defaults

        meta = gguf_defaults(self.model_path)
        if self.n_ctx is None:  # room for the longest prompt and the whole token budget
            self.n_ctx = max(512, meta["max_input_tokens"] + self.max_new_tokens)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=self.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"{self.model_path}: llama-cpp-python could not load the model for the "
                f"{self.name} baseline ({exc}); check the file with `capsfuse-lite fuse` first"
            ) from None
        llm = self._llm
        self._builder = PromptBuilder(
            lambda text: llm.tokenize(text.encode("utf-8"), add_bos=True),
            lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace"),
            meta["prompt_template"],
            meta["max_input_tokens"],
        )

    def run(self, pairs: Iterable[Pair]) -> Iterator[RowFigures]:
        llm, builder = self._llm, self._builder
        for raw, synthetic in pairs:
            prompt = builder.build(raw, synthetic)
            out = llm.create_completion(
                prompt.token_ids,
                max_tokens=self.max_new_tokens,
                temperature=0.0,
                repeat_penalty=1.0,
            )
            usage = out["usage"]
            yield RowFigures(usage["prompt_tokens"], usage["completion_tokens"])

    def describe(self) -> dict:
        return {
            "method": "llama_cpp.Llama.create_completion per row, greedy (temperature 0)",
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "max_new_tokens": self.max_new_tokens,
        }

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def _check_hf_checkpoint(folder: Path) -> None:
    if not folder.is_dir():
        raise ConfigError(f"--hf-checkpoint {folder}: not a folder; give the Hugging Face checkpoint folder the GGUF was converted from")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; --hf-checkpoint must be a Hugging Face checkpoint folder")


class HFUpstreamBaseline:
    """Upstream's generation: transformers ``generate``, batch 4, left-padded to 256, 3 beams."""

    name = HF_BASELINE

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        max_new_tokens: int,
        n_threads: int,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = HF_BATCH_SIZE,
        pad_to: int = HF_PAD_TO,
        num_beams: int = HF_NUM_BEAMS,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        _check_hf_checkpoint(self.checkpoint)
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--hf-dtype {dtype}: use auto, float32, bfloat16 or float16")
        self.max_new_tokens = max_new_tokens
        self.n_threads = n_threads
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.pad_to = pad_to
        self.num_beams = num_beams
        self._model = None
        self._tok = None
        self._builder = None

    def _resolved_dtype(self) -> str:
        # Upstream casts to bf16. On CPUs with AVX512-BF16 that is also torch's fastest path
        # (about 6x fp32 on the 2-core EPYC of benchmarks/); float32 is there for older CPUs.
        return "bfloat16" if self.dtype == "auto" else self.dtype

    def load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError:
            raise ConfigError(
                f"the {self.name} baseline needs transformers and torch: pip install 'capsfuse-lite[test]'"
            ) from None
        torch.set_num_threads(self.n_threads)
        transformers.utils.logging.disable_progress_bar()  # keep the bench's own status line clean
        transformers.utils.logging.set_verbosity_error()
        if self.device == "gpu" and not torch.cuda.is_available():
            raise ConfigError(f"the {self.name} baseline on the GPU needs a CUDA build of torch")
        torch_device = torch.device("cuda" if self.device == "gpu" else "cpu")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(self.checkpoint))
        model = model.to(getattr(torch, self._resolved_dtype())).to(torch_device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(self.checkpoint), padding_side="left")
        if tok.pad_token is None:  # as upstream: [PAD] is id 32000 in added_tokens.json
            tok.add_special_tokens({"pad_token": "[PAD]"})
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            raise CheckpointError(
                f"{self.checkpoint}: the tokenizer has {len(tok)} tokens but the model only "
                f"{model.get_input_embeddings().weight.shape[0]} embeddings"
            )
        self._model, self._tok, self._torch, self._torch_device = model, tok, torch, torch_device
        self._builder = PromptBuilder(
            lambda text: tok(text).input_ids,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            defaults.PROMPT_TEMPLATE,
            self.pad_to,
        )

    def _batches(self, pairs: Iterable[Pair]) -> Iterator[list[str]]:
        batch: list[str] = []
        for raw, synthetic in pairs:
            batch.append(self._builder.build(raw, synthetic).text)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def run(self, pairs: Iterable[Pair]) -> Iterator[RowFigures]:
        tok, model, torch = self._tok, self._model, self._torch
        eos, pad = tok.eos_token_id, tok.pad_token_id
        for texts in self._batches(pairs):
            enc = tok(texts, padding="max_length", max_length=self.pad_to, truncation=True, return_tensors="pt")
            enc = enc.to(self._torch_device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=enc.input_ids,
                    attention_mask=enc.attention_mask,
                    num_beams=self.num_beams,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            new = out[:, enc.input_ids.shape[1]:].tolist()
            for mask, ids in zip(enc.attention_mask.sum(dim=1).tolist(), new):
                yield RowFigures(int(mask), _generated_length(ids, eos))

    def describe(self) -> dict:
        return {
            "method": "transformers generate (upstream CapsFusion)",
            "checkpoint": str(self.checkpoint),
            "batch_size": self.batch_size,
            "pad_to": self.pad_to,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "dtype": self._resolved_dtype(),
            "device": self.device,
            "n_threads": self.n_threads,
        }

    def close(self) -> None:
        self._model = None
        self._tok = None


def _generated_length(ids: Sequence[int], eos: int | None) -> int:
    """Tokens generated before EOS (generate pads a row after its EOS while others go on)."""
    ids = list(ids)
    return ids.index(eos) if eos in ids else len(ids)


def hf_checkpoint_available(folder: str | os.PathLike | None) -> bool:
    """True when an HF folder was given and transformers/torch can be imported."""
    if folder is None:
        return False
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
