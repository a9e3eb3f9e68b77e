"""The Fuser: CapsFus-LLaMA caption fusion over one llama.cpp context.

``Fuser(model_path, ...)`` loads a GGUF, reads its ``capsfuse.*`` metadata for the defaults
(prompt template, prompt budget, beams, max new tokens, length offset), sizes the run
(:mod:`capsfuse_lite.engine.plan`: how many slots fit the device, and the KV layout: one unified cache for
beam search, one stream per sequence for greedy), creates one context holding ``slots x beams``
sequences plus one for the shared instruction prefix, and ``fuse(pairs)`` streams
:class:`FuseResult` objects. Scheduling (continuous batching, prefix reuse, KV forking for beams,
the vectorised search of each decode step) lives in :mod:`capsfuse_lite.engine.scheduler`; token search
(greedy, beam search and its transformers-version arithmetic) in :mod:`capsfuse_lite.engine.search`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from capsfuse_lite import defaults
from capsfuse_lite.errors import ConfigError, ModelLoadError
from capsfuse_lite.engine.llama import (Batch, Context, LlamaError, Model, apply_chat_template, devices, set_verbose,  # first: loads llama.cpp
                    supports_gpu_offload)
from capsfuse_lite.machine import ThreadGovernor, available_memory, default_threads
from capsfuse_lite.models import gguf_defaults
from capsfuse_lite.engine.plan import ModelShape, choose_layout, kv_layout
from capsfuse_lite.engine.prompts import Prompt, PromptBuilder, common_prefix_length
from capsfuse_lite.engine.scheduler import Finished, Scheduler

logger = logging.getLogger("capsfuse_lite")


@dataclass
class FuseResult:
    index: int  # position of the pair in the iterable given to fuse()
    text: str  # fused caption: decoded without special tokens, stripped
    token_ids: list[int]  # generated ids (EOS not included)
    finish_reason: str  # "eos" | "length" | "skipped" (the row could not be fused: see ``error``)
    prompt_tokens: int  # prompt length in tokens, BOS included (0 when skipped)
    truncated: bool  # the 256-token rule shortened a caption
    error: str | None = None  # why a row was skipped (text the tokenizer refuses); None when fused

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class FuserStats:
    """Running totals over every ``fuse()`` call of a Fuser.

    ``prompt_tokens`` counts each finished row's full prompt (the shared prefix included, though it
    is evaluated once); ``generated_tokens`` the tokens of the returned captions (EOS excluded);
    ``evaluated_tokens`` every token passed to ``llama_decode`` (all beams, prompt chunks, the
    prefix). ``elapsed_s`` is time spent inside ``fuse()``, not in the caller's loop body.
    """

    rows: int = 0  # rows fused (skipped rows not included)
    rows_skipped: int = 0  # rows whose captions could not be tokenized (FuseResult.error)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    evaluated_tokens: int = 0
    decode_calls: int = 0
    steps: int = 0  # decode steps (each advances every running row by one token or prompt chunk)
    # micro-batches llama.cpp split the decodes into (each a full pass over the weights): all
    # decodes, and the decode steps' alone (see capsfuse_lite.engine.ubatch)
    passes: int = 0
    step_passes: int = 0
    device_s: float = 0.0  # inside llama_decode and waiting for its results (the GPU/CPU kernels)
    host_s: float = 0.0  # the engine's own work between decodes: search, KV bookkeeping, batching
    # host_s broken down: admitting rows (prompt building, tokenizing), filling the batch, top-k and
    # log-normalisers over the logits, per-row search bookkeeping, KV forks and frees
    admit_s: float = 0.0
    batch_s: float = 0.0
    logits_s: float = 0.0
    search_s: float = 0.0
    kv_s: float = 0.0

    @property
    def host_ms_per_step(self) -> float:
        """Engine time per decode step spent outside llama.cpp's kernels: on a GPU, time it waits."""
        return 1e3 * self.host_s / self.steps if self.steps else 0.0

    @property
    def passes_per_step(self) -> float:
        """Weight passes per decode step: 1 when every step is one micro-batch."""
        return self.step_passes / self.steps if self.steps else 0.0

    @property
    def device_ms_per_step(self) -> float:
        return 1e3 * self.device_s / self.steps if self.steps else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _positive(name: str, value: int | None, minimum: int = 1, optional: bool = True) -> int | None:
    if (value is not None or not optional) and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


_STEP_COUNTERS = ("decode_calls", "evaluated_tokens", "passes", "step_passes", "steps", "device_s", "host_s", "admit_s", "batch_s", "logits_s",
                  "search_s", "kv_s")


def _counter_values(counters) -> dict:
    return {name: getattr(counters, name) for name in _STEP_COUNTERS}


class _RowError(Exception):
    """A pair that cannot become a prompt; the row is skipped with this reason."""


class Fuser:
    """Fuses (raw alt-text, synthetic caption) pairs with a CapsFus-LLaMA GGUF.

    Arguments left as ``None`` come from the GGUF's ``capsfuse.*`` metadata, else from
    :mod:`capsfuse_lite.defaults`. ``slots="auto"`` takes the most rows that fit the GPU's free
    memory up to the throughput knee (``capsfuse-lite bench`` measures and remembers it; see
    :func:`capsfuse_lite.engine.plan.choose_slots`); an explicit count is checked against memory the same
    way, so a run never starts into an out-of-memory crash (``slots_reason`` says what fit and
    why). ``n_gpu_layers=None`` offloads every layer when this llama.cpp build supports a GPU,
    else runs on the CPU (with one notice line). ``kv_unified=None`` picks the KV layout
    (:mod:`capsfuse_lite.engine.plan`). ``n_ctx=None`` sizes a unified KV cache for the worst case of every
    slot at once; a smaller ``n_ctx`` admits rows only while their worst case fits. ``n_batch=None``
    is ``max(512, slots x beams)``. ``length_offset``: see :mod:`capsfuse_lite.engine.search` (256 =
    upstream's transformers 4.28 arithmetic, 0 = current transformers). ``chat_template``: "none"
    feeds upstream's prompt as it is, "auto" inside the GGUF's own chat template (other instruct
    models; :func:`prompt_builder`); ``model_note`` is one line on how a model without ``capsfuse.*``
    metadata is prompted (None for CapsFus-LLaMA). ``stats`` (a
    :class:`FuserStats`) splits time into device (llama.cpp's kernels) and host (this engine).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        slots: int | str = "auto",
        beams: int | None = None,
        max_new_tokens: int | None = None,
        n_gpu_layers: int | None = None,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        kv_unified: bool | None = None,
        length_offset: int | None = None,
        prefix_cache: bool = True,
        chat_template: str = "none",
        verbose: bool | None = None,
    ):
        check_chat_template(chat_template)
        if slots != "auto":
            _positive("slots", slots, optional=False)
        _positive("beams", beams)
        _positive("max_new_tokens", max_new_tokens)
        _positive("n_ctx", n_ctx)
        _positive("n_batch", n_batch)
        _positive("n_threads", n_threads)
        _positive("length_offset", length_offset, 0)
        self._model: Model | None = None
        self._ctx: Context | None = None
        self._batch: Batch | None = None
        self._scheduler: Scheduler | None = None
        self._stop = False
        self._running = False
        if verbose is not None:  # None keeps the process-wide setting (llama.set_verbose; off by default)
            set_verbose(verbose)
        gpu = supports_gpu_offload()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if gpu else 0
            if not gpu:
                logger.warning("capsfuse-lite: this llama.cpp build has no GPU support; running on the CPU")
        self._model = model = Model(model_path, n_gpu_layers=n_gpu_layers)
        try:
            shape = ModelShape.from_gguf(model.path)
            meta = gguf_defaults(model.path)
            beams = beams or meta["num_beams"]
            max_new_tokens = max_new_tokens or meta["max_new_tokens"]
            if length_offset is None:
                length_offset = meta["length_offset"]
            self._builder = prompt_builder(model, meta, chat_template)
            self.end_tokens = end_tokens(model, meta)
            self.model_note = model_note(model, meta, chat_template, self._builder.chat is not None)
            probe = self._builder.build("", "")  # a template longer than the budget fails here, not on every row
            max_input_tokens = self._builder.max_tokens
            prefix_ids = self._builder.prefix_ids() if prefix_cache else None
            n_prefix = len(prefix_ids) if prefix_ids else 0
            if max_input_tokens + max_new_tokens > model.n_ctx_train > 0:
                raise ConfigError(
                    f"max_new_tokens={max_new_tokens}: a {max_input_tokens}-token prompt plus {max_new_tokens} new tokens "
                    f"exceeds the {model.n_ctx_train} positions {model.path.name} was trained for; use at most "
                    f"{model.n_ctx_train - max_input_tokens} (--max-new-tokens)"
                )
            if n_ctx is not None:
                if kv_unified is False:
                    raise ConfigError("n_ctx sizes a unified KV cache; with per-sequence streams (kv_unified=False) leave it unset")
                kv_unified = True
            shared_min = max(0, common_prefix_length(prefix_ids, probe.token_ids) - 1) if prefix_ids else 0
            on_gpu = bool(gpu and n_gpu_layers != 0)
            device = _gpu_memory() if on_gpu else None
            gpu_fraction = 1.0 if n_gpu_layers < 0 or n_gpu_layers >= model.n_layer else n_gpu_layers / model.n_layer
            kv_unified, choice = choose_layout(
                requested=slots, shape=shape, beams=beams, max_input=max_input_tokens, max_new=max_new_tokens,
                n_prefix=n_prefix, shared_min=shared_min, kv_unified=kv_unified, kv_type=kv_type, device=device,
                gpu_fraction=gpu_fraction, n_ubatch=min(n_batch or 512, 512),
                host_available=None if on_gpu else available_memory(),
            )
            slots = choice.slots
            self.slots_reason = choice.reason
            layout = kv_layout(slots=slots, beams=beams, max_input=max_input_tokens, max_new=max_new_tokens,
                               n_prefix=n_prefix, shared_min=shared_min, unified=kv_unified)
            worst_row = max_input_tokens + beams * max_new_tokens
            if n_ctx is None:
                n_ctx = layout.n_ctx
            elif n_ctx < n_prefix + worst_row:
                raise ConfigError(
                    f"n_ctx={n_ctx} is too small: one row may need {n_prefix + worst_row} KV cells "
                    f"({max_input_tokens} prompt + {beams} beams x {max_new_tokens} new tokens"
                    f"{f' + {n_prefix} shared prefix' if n_prefix else ''}); raise n_ctx or leave it unset"
                )
            if n_batch is None:
                n_batch = max(512, slots * beams)
            elif n_batch < slots * beams:
                raise ConfigError(f"n_batch={n_batch} must be at least slots x beams = {slots * beams}")
            self._ctx = Context(
                model,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=min(n_batch, 512),
                n_seq_max=layout.n_seq_max,
                n_threads=n_threads or default_threads(),
                flash_attn=flash_attn,
                kv_type=kv_type,
                kv_unified=kv_unified,
            )
            self._batch = Batch(self._ctx.n_batch)
            self._scheduler = Scheduler(
                self._ctx, self._batch, slots, beams, max_new_tokens, length_offset, self.end_tokens, prefix_ids,
                host_threads=default_threads(), streams=not kv_unified,
                # threads left to the default on a CPU follow the cores other processes leave
                governor=ThreadGovernor(self._ctx.n_threads) if n_threads is None and not on_gpu else None,
            )
        except BaseException:
            self.close()
            raise
        self.settings = {
            "model": str(model.path),
            "slots": slots,
            "beams": beams,
            "max_new_tokens": max_new_tokens,
            "max_input_tokens": max_input_tokens,
            "length_offset": length_offset,
            "template_source": "gguf" if model.meta(defaults.KEY_PROMPT_TEMPLATE) else "default",
            "n_ctx": self._ctx.n_ctx,
            "n_batch": self._ctx.n_batch,
            "n_ubatch": self._ctx.n_ubatch,
            "n_seq_max": self._ctx.n_seq_max,
            "n_threads": self._ctx.n_threads,
            "threads_follow_load": self._scheduler.governor is not None,
            "n_gpu_layers": n_gpu_layers,
            "gpu": bool(gpu and n_gpu_layers != 0),
            "flash_attn": flash_attn,
            "kv_type": kv_type,
            "kv_unified": kv_unified,
            "slots_reason": self.slots_reason,
            "prefix_cache": prefix_cache,
            "prefix_tokens": n_prefix,
            "chat_template": chat_template,
            "add_bos": model.vocab.add_bos,
            "end_tokens": [model.vocab.token_text(t) for t in sorted(self.end_tokens)],
        }
        self.model_info = {
            "path": str(model.path),
            "file_size": model.path.stat().st_size,
            "file_type": model.file_type,
            "description": model.description,
            "n_params": model.n_params,
            "n_layer": model.n_layer,
            "n_ctx_train": model.n_ctx_train,
            "source": model.meta(defaults.KEY_SOURCE),
            "revision": model.meta(defaults.KEY_REVISION),
            "converter_version": model.meta(defaults.KEY_CONVERTER_VERSION),
        }
        self.stats = FuserStats()

    # -- tokens and prompts -------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special-token text is plain text), BOS first as the
        GGUF's ``tokenizer.ggml.add_bos_token`` says (CapsFus-LLaMA: yes) unless ``add_bos`` is given."""
        return self._open_model().vocab.encode(text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (not stripped)."""
        return self._open_model().vocab.decode(ids)

    def build_prompt(self, raw: str, synthetic: str) -> Prompt:
        """The prompt the model sees for one pair (the 256-token rule applied)."""
        return self._builder.build(raw, synthetic)

    def _open_model(self) -> Model:
        if self._model is None or self._model._handle is None:
            raise ModelLoadError("this Fuser is closed")
        return self._model

    # -- fusing -------------------------------------------------------------------------------

    def live(self) -> tuple[int, int]:
        """``(rows in flight, tokens generated)`` now, for a progress display while no row has
        finished yet (safe to call from another thread: it only reads). Tokens count every row's
        generated tokens so far, finished rows included (EOS excluded)."""
        scheduler = self._scheduler
        active = list(scheduler.active_rows) if scheduler is not None else []
        return len(active), self.stats.generated_tokens + sum(row.search.n_generated for row in active)


    def request_stop(self) -> None:
        """Make a running ``fuse()`` return after its current decode step (safe from a signal
        handler). Rows still in flight are dropped, and with ``ordered=True`` so are finished rows
        waiting for an earlier one; the next ``fuse()`` starts clean."""
        self._stop = True

    def fuse(self, pairs: Iterable[tuple[str, str]], *, ordered: bool = True) -> Iterator[FuseResult]:
        """Fuse (raw, synthetic) pairs; yields one :class:`FuseResult` per pair.

        ``pairs`` is read lazily: one pair is built into a prompt only when a slot (and KV space)
        is free. ``ordered=True`` yields in input order, holding finished rows until the earlier
        ones are done (at most about ``slots x (max_new_tokens + prefill steps)`` rows are held);
        ``ordered=False`` yields rows as they finish.
        """
        if self._ctx is None:
            raise ModelLoadError("this Fuser is closed")
        if self._running:
            raise RuntimeError("fuse() is already running on this Fuser; use one Fuser per stream")
        self._running = True
        self._stop = False
        skipped: list[FuseResult] = []  # rows whose prompt could not be built, not yet yielded

        def prompts() -> Iterator[tuple[int, Prompt]]:
            for i, pair in enumerate(pairs):
                try:
                    yield i, self._prompt_of(i, pair)
                except _RowError as exc:
                    skipped.append(FuseResult(i, "", [], "skipped", 0, False, str(exc)))
        counters = self._scheduler.counters
        base = _counter_values(counters)
        held: dict[int, FuseResult] = {}
        next_index = 0
        steps = self._scheduler.run(prompts(), lambda: self._stop)
        try:
            while True:
                started = time.perf_counter()
                finished = next(steps, None)
                results = [self._result(finished)] if finished is not None else []
                self.stats.elapsed_s += time.perf_counter() - started
                now = _counter_values(counters)
                for name, value in now.items():
                    setattr(self.stats, name, getattr(self.stats, name) + value - base[name])
                base = now
                if finished is None and self._stop:
                    break
                if skipped:
                    self.stats.rows_skipped += len(skipped)
                    results += skipped
                    skipped.clear()
                if not results:
                    break
                for result in results:
                    if not ordered:
                        yield result
                        continue
                    held[result.index] = result
                    while next_index in held:
                        yield held.pop(next_index)
                        next_index += 1
        finally:
            steps.close()
            self._running = False

    def _prompt_of(self, index: int, pair: tuple[str, str]) -> Prompt:
        try:
            raw, synthetic = pair
        except (TypeError, ValueError):
            raise TypeError(f"pair {index} is not a (raw, synthetic) pair of strings: {pair!r}") from None
        if not isinstance(raw, str) or not isinstance(synthetic, str):
            raise TypeError(f"pair {index} must hold two strings, got ({type(raw).__name__}, {type(synthetic).__name__})")
        try:
            return self._builder.build(raw, synthetic)
        except UnicodeError:
            raise _RowError("a caption is not valid Unicode text (it holds a lone surrogate code point)") from None
        except LlamaError as exc:
            raise _RowError(f"the tokenizer refused a caption ({exc})") from None

    def _result(self, finished: Finished) -> FuseResult:
        hyp = finished.hypothesis
        result = FuseResult(
            index=finished.index,
            text=self.detokenize(hyp.tokens).strip(),
            token_ids=list(hyp.tokens),
            finish_reason=hyp.finish_reason,
            prompt_tokens=len(finished.prompt.token_ids),
            truncated=finished.prompt.truncated,
        )
        self.stats.rows += 1
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.generated_tokens += len(result.token_ids)
        return result

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        if getattr(self, "_scheduler", None) is not None:
            self._scheduler.close()
        for handle in (self._batch, self._ctx, self._model):
            if handle is not None:
                handle.close()
        self._batch = self._ctx = self._model = None

    def __enter__(self) -> "Fuser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _gpu_memory() -> dict | None:
    """The GPU memory the KV cache can use: all GPU devices together (llama.cpp splits layers and
    their KV cache across them), as reported after the model is loaded."""
    gpus = [d for d in devices() if d["type"] == "gpu"]
    if not gpus:
        return None
    if any(d["total"] <= 0 for d in gpus):  # a backend that reports no memory
        return {"description": gpus[0]["description"] or gpus[0]["name"], "free": None, "total": None}
    names = sorted({d["description"] or d["name"] for d in gpus})
    label = (f"{len(gpus)} x " if len(gpus) > 1 else "") + " + ".join(names)
    return {"description": label, "free": sum(d["free"] for d in gpus), "total": sum(d["total"] for d in gpus)}


def check_chat_template(choice: str) -> str:
    if choice not in defaults.CHAT_TEMPLATES:
        raise ConfigError(f"--chat-template {choice}: use none (the prompt as it is; CapsFus-LLaMA's) or auto "
                          "(the GGUF's own chat template around it)")
    return choice


def chat_wrap(chat_template: str | None, instruction: str, source: str) -> tuple[str, str] | None:
    """The text a GGUF's chat template puts before and after ``instruction`` as the one user message
    (the assistant's turn opened after it), rendered by llama.cpp; None without a chat template.
    ``source`` names the model in errors."""
    if not chat_template:
        return None
    text = apply_chat_template(chat_template, [("user", instruction)])
    if text is None:
        raise ConfigError(f"{source}: llama.cpp does not know this GGUF's chat template (tokenizer.chat_template); "
                          "use --chat-template none")
    at = text.find(instruction)
    if at < 0:
        raise ConfigError(f"{source}: its chat template changes the instruction text; use --chat-template none")
    return text[:at], text[at + len(instruction):]


def effective_template_sha256(meta: dict, chat_template: str, source: str) -> str:
    """sha256 (16 hex digits) of the prompt text around the captions as the model sees it: the
    template, inside the GGUF's chat template with ``auto`` (``meta`` = gguf_defaults)."""
    import hashlib

    wrap = chat_wrap(meta.get("chat_template"), meta["prompt_template"], source) if check_chat_template(chat_template) == "auto" else None
    if wrap is None:
        return meta["prompt_template_sha256"]
    return hashlib.sha256((wrap[0] + meta["prompt_template"] + wrap[1]).encode("utf-8")).hexdigest()[:16]


def prompt_builder(model: Model, meta: dict, chat_template: str = "none") -> PromptBuilder:
    """The model's :class:`PromptBuilder`: template and budget from its ``capsfuse.*`` metadata
    (``meta`` = :func:`~capsfuse_lite.models.gguf_defaults`), llama.cpp's tokenizer with BOS as the
    GGUF says, special-token text kept as text; with ``chat_template="auto"`` inside the GGUF's own
    chat template (if it has one)."""
    vocab = model.vocab
    chat = None
    if check_chat_template(chat_template) == "auto":
        chat = chat_wrap(model.chat_template(), meta["prompt_template"], str(model.path))
    return PromptBuilder(vocab.encode, vocab.decode, meta["prompt_template"], meta["max_input_tokens"],
                         chat=chat, tokenize_chat=vocab.encode_special)


def end_tokens(model: Model, meta: dict) -> frozenset[int]:
    """The tokens that end a caption: CapsFus-LLaMA (``capsfuse.*`` metadata) stops at EOS alone, as
    upstream's ``generate(eos_token_id=2)`` (llama.cpp also counts its ``[PAD]`` as end-of-generation);
    another model at every token llama.cpp says ends generation (``<|im_end|>``, ``<|endoftext|>``)."""
    vocab = model.vocab
    return frozenset([vocab.eos]) if meta.get("capsfuse_metadata") else vocab.eog_ids


def model_note(model: Model, meta: dict, chat_template: str, wrapped: bool) -> str | None:
    """One line on how a model that is not CapsFus-LLaMA (no ``capsfuse.*`` metadata) is prompted:
    template, BOS, end tokens; None for CapsFus-LLaMA (and bench models) with its default prompt."""
    vocab = model.vocab
    has_template = model.chat_template() is not None
    if meta.get("capsfuse_metadata"):
        if chat_template == "auto" and not has_template:
            return f"--chat-template auto: {model.path.name} has no chat template; upstream's prompt is fed as it is"
        return None
    if wrapped:
        how = "as the user message of its own chat template (--chat-template auto)"
    elif has_template:
        how = "as plain text, without its chat template (--chat-template auto wraps it for an instruct model)"
    else:
        how = "as plain text (it has no chat template)"
    ends = ", ".join(vocab.token_text(t) for t in sorted(end_tokens(model, meta))) or "none"
    return (f"note: {model.path.name} has no capsfuse.* metadata, so it is not CapsFus-LLaMA and its captions are not "
            f"CapsFusion's: upstream's instruction is fed {how}, {'with' if vocab.add_bos else 'without'} BOS "
            f"(tokenizer.ggml.add_bos_token), generation stops at {ends}")


class PromptPreview:
    """Builds prompts with a model's tokenizer only (``vocab_only`` load: no weights, no KV cache),
    for inspecting inputs before fusing."""

    def __init__(self, model_path: str | os.PathLike, chat_template: str = "none"):
        self._model = Model(model_path, vocab_only=True)
        try:
            meta = gguf_defaults(self._model.path)
            self.builder = prompt_builder(self._model, meta, chat_template)
            self.model_note = model_note(self._model, meta, chat_template, self.builder.chat is not None)
        except BaseException:
            self._model.close()
            raise

    def build(self, raw: str, synthetic: str) -> Prompt:
        return self.builder.build(raw, synthetic)

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> "PromptPreview":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
