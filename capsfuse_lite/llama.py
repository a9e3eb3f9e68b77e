"""Owned wrappers over llama.cpp's C handles (llama-cpp-python's low-level ctypes API).

This is the only module that touches ``llama_cpp.llama_cpp``. Each C handle has one small class
that frees it in ``close()`` (also via ``with``), and C return codes become Python exceptions:

- :class:`Model`   -- ``llama_model`` (weights, GGUF metadata); owns its :class:`Vocab`.
- :class:`Vocab`   -- tokenize / detokenize with the model's own tokenizer (not a separate handle:
  llama.cpp frees it with the model).
- :class:`Context` -- ``llama_context`` with its memory (KV cache): ``decode``, logits,
  ``llama_memory_seq_*`` operations.
- :class:`Batch`   -- ``llama_batch`` from ``llama_batch_init``.

Lifetimes: a context cannot outlive its model's weights, so ``Model.close()`` first closes every
context still open on it; any later call on a closed handle (model, vocab, context, batch) raises
:class:`LlamaError` instead of touching freed C memory.

llama.cpp's own log lines are hidden unless :func:`set_verbose` is on (errors are always shown).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import ConfigError, ModelLoadError


class LlamaError(RuntimeError):
    """A llama.cpp call failed in a way that is a bug or a resource limit, not a user input error."""


class NoKVSpaceError(LlamaError):
    """``llama_decode`` returned 1: no free KV-cache cells for the batch (increase n_ctx)."""


class DecodeAbortedError(LlamaError):
    """``llama_decode`` returned 2: the abort callback stopped the computation."""


# KV cache element types accepted for ``kv_type`` (names as llama.cpp's --cache-type-k/-v).
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30, "iq4_nl": 20}

_init_lock = threading.Lock()
_initialised = False
_verbose = False
_last_level = 0
_log_callback = None  # keeps the ctypes callback alive for as long as llama.cpp may call it


def _lib():
    """Import the bindings, initialise the backend once and install the log filter."""
    global _initialised, _log_callback
    import llama_cpp.llama_cpp as lib

    if _initialised:
        return lib
    with _init_lock:
        if not _initialised:
            lib.llama_backend_init()

            @lib.llama_log_callback
            def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                global _last_level
                if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line's level
                    _last_level = level
                if _verbose or _last_level >= 4:  # GGML_LOG_LEVEL_ERROR (DEBUG=1 INFO=2 WARN=3 ERROR=4)
                    sys.stderr.write(text.decode("utf-8", errors="replace"))

            _log_callback = _log
            lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
            _initialised = True
    return lib


def set_verbose(verbose: bool) -> None:
    """Show (True) or hide (False) llama.cpp's informational log lines; errors always show."""
    global _verbose
    _verbose = bool(verbose)
    _lib()


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(_lib().llama_supports_gpu_offload())


def max_parallel_sequences() -> int:
    """The largest ``n_seq_max`` this llama.cpp build accepts."""
    return int(_lib().llama_max_parallel_sequences())


def _read_string(fn, *args) -> str | None:
    """Call a llama.cpp ``(..., char *buf, size_t size) -> int32 length`` function, growing the buffer."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = fn(*args, buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1


class Vocab:
    """The model's tokenizer. Valid while its :class:`Model` is open."""

    def __init__(self, handle, model: "Model"):
        self._lib = _lib()
        self._handle = handle
        self._model = model  # keeps the owning model alive
        self.n_tokens = int(self._lib.llama_vocab_n_tokens(handle))
        self.bos = int(self._lib.llama_vocab_bos(handle))
        self.eos = int(self._lib.llama_vocab_eos(handle))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS as the model asks, ``parse_special=False``
        treats text such as ``</s>`` as plain text."""
        self._model._check_open()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self._handle, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                raise LlamaError(f"llama_tokenize overflowed on a text of {len(data)} bytes")
            capacity = -n

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The ids a prompt is fed as: BOS (whatever the GGUF's add_bos flag says) then the text's
        tokens, with special-token text such as ``</s>`` kept as plain text."""
        ids = self.tokenize(text, add_special=False, parse_special=False)
        return [self.bos] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (not stripped)."""
        return self.detokenize(ids, remove_special=True, unparse_special=False)

    def detokenize_bytes(self, ids: Sequence[int], remove_special: bool = True, unparse_special: bool = False) -> bytes:
        """The UTF-8 bytes of ``ids`` (may end inside a multi-byte character)."""
        self._model._check_open()
        arr = (self._lib.llama_token * max(1, len(ids)))(*ids)
        capacity = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = self._lib.llama_detokenize(self._handle, arr, len(ids), buf, capacity, remove_special, unparse_special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n + 1

    def detokenize(self, ids: Sequence[int], remove_special: bool = True, unparse_special: bool = False) -> str:
        """Text of ``ids``; ``remove_special`` drops BOS/EOS, ``unparse_special=False`` renders control
        tokens (e.g. ``[PAD]``) as nothing. Invalid UTF-8 becomes U+FFFD."""
        return self.detokenize_bytes(ids, remove_special, unparse_special).decode("utf-8", errors="replace")


class Model:
    """A GGUF loaded by llama.cpp (``llama_model_load_from_file``)."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, vocab_only: bool = False, use_mmap: bool = True):
        self._lib = _lib()
        self.path = Path(path)
        self._handle = None
        self._contexts: weakref.WeakSet = weakref.WeakSet()  # open contexts on this model (closed first)
        if not self.path.is_file():
            raise ModelLoadError(f"model file {self.path} does not exist; pass the path of a GGUF made by `capsfuse-lite convert`")
        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = bool(vocab_only)
        if not use_mmap:
            params.load_mode = 0
        handle = self._lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path}: not a GGUF this llama.cpp build can read, or truncated "
                "(re-run `capsfuse-lite convert`; pass verbose=True / --verbose for llama.cpp's log)"
            )
        self._handle = handle
        self.vocab = Vocab(self._lib.llama_model_get_vocab(handle), self)

    def _check_open(self) -> None:
        if self._handle is None:
            raise LlamaError("the model is closed")

    def meta(self, key: str) -> str | None:
        """A scalar GGUF metadata value as a string (``llama_model_meta_val_str``), None if absent."""
        self._check_open()
        return _read_string(self._lib.llama_model_meta_val_str, self._handle, key.encode())

    @property
    def description(self) -> str:
        self._check_open()
        return _read_string(self._lib.llama_model_desc, self._handle) or ""

    @property
    def file_type(self) -> str:
        """Quantization type as llama.cpp names it, e.g. ``Q8_0`` or ``Q4_K - Medium``."""
        self._check_open()
        name = self._lib.llama_ftype_name(self._lib.llama_model_ftype(self._handle))
        return name.decode() if name else "unknown"

    @property
    def n_params(self) -> int:
        self._check_open()
        return int(self._lib.llama_model_n_params(self._handle))

    @property
    def n_layer(self) -> int:
        self._check_open()
        return int(self._lib.llama_model_n_layer(self._handle))

    @property
    def n_ctx_train(self) -> int:
        self._check_open()
        return int(self._lib.llama_model_n_ctx_train(self._handle))

    def close(self) -> None:
        """Free the model, after closing every context still open on it (they use its weights)."""
        for context in list(self._contexts):
            context.close()
        if self._handle is not None:
            self._lib.llama_model_free(self._handle)
            self._handle = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Batch:
    """A ``llama_batch`` of up to ``capacity`` tokens, each in up to ``n_seq_max`` sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        self._lib = _lib()
        self.capacity = int(capacity)
        self.n_seq_max = int(n_seq_max)
        self._struct = self._lib.llama_batch_init(self.capacity, 0, self.n_seq_max)
        if not self._struct.token:
            raise LlamaError(f"llama_batch_init failed for {capacity} tokens")
        self._token = np.ctypeslib.as_array(self._struct.token, shape=(self.capacity,))
        self._pos = np.ctypeslib.as_array(self._struct.pos, shape=(self.capacity,))
        self._n_seq = np.ctypeslib.as_array(self._struct.n_seq_id, shape=(self.capacity,))
        self._logits = np.ctypeslib.as_array(self._struct.logits, shape=(self.capacity,))
        self.n_tokens = 0

    def _check_open(self) -> None:
        if self._struct is None:
            raise LlamaError("the batch is closed")

    def clear(self) -> None:
        self._check_open()
        self.n_tokens = 0
        self._struct.n_tokens = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n_tokens

    def add(self, token: int, pos: int, seq_ids: Iterable[int], logits: bool) -> int:
        """Append one token; returns its index in the batch (for :meth:`Context.logits`)."""
        self._check_open()
        seq_ids = list(seq_ids)
        i = self.n_tokens
        if i >= self.capacity:
            raise LlamaError(f"batch is full ({self.capacity} tokens)")
        if not 0 < len(seq_ids) <= self.n_seq_max:
            raise LlamaError(f"a token needs 1..{self.n_seq_max} sequence ids, got {len(seq_ids)}")
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq[i] = len(seq_ids)
        row = self._struct.seq_id[i]
        for j, s in enumerate(seq_ids):
            row[j] = s
        self._logits[i] = 1 if logits else 0
        self.n_tokens = i + 1
        self._struct.n_tokens = self.n_tokens
        return i

    def add_sequence(self, tokens: Sequence[int], pos0: int, seq_id: int, logits_last: bool) -> int:
        """Append consecutive tokens of one sequence at positions pos0, pos0+1, ...; returns the
        batch index of the last one."""
        self._check_open()
        n = len(tokens)
        i = self.n_tokens
        if n == 0 or i + n > self.capacity:
            raise LlamaError(f"cannot add {n} tokens to a batch with {self.capacity - i} free")
        self._token[i : i + n] = tokens
        self._pos[i : i + n] = np.arange(pos0, pos0 + n)
        self._n_seq[i : i + n] = 1
        self._logits[i : i + n] = 0
        seq = self._struct.seq_id
        for k in range(i, i + n):
            seq[k][0] = seq_id
        if logits_last:
            self._logits[i + n - 1] = 1
        self.n_tokens = i + n
        self._struct.n_tokens = self.n_tokens
        return i + n - 1

    def close(self) -> None:
        if self._struct is not None:
            # Drop the numpy views first: they point into the memory llama_batch_free releases.
            self._token = self._pos = self._n_seq = self._logits = None
            self.n_tokens = 0
            self._lib.llama_batch_free(self._struct)
            self._struct = None

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Context:
    """A ``llama_context`` (one KV cache shared by up to ``n_seq_max`` sequences)."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        kv_unified: bool = True,
    ):
        self._lib = lib = _lib()
        model._check_open()
        self.model = model
        self._handle = None
        if kv_type not in KV_TYPES:
            raise ConfigError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
        if kv_type not in ("f32", "f16", "bf16") and flash_attn is False:
            raise ConfigError(f"kv_type={kv_type} (a quantized KV cache) needs flash attention; leave flash_attn unset or True")
        if n_seq_max > max_parallel_sequences():
            raise ConfigError(
                f"{n_seq_max} parallel sequences (slots x beams, plus one for the shared prefix) exceed this "
                f"llama.cpp build's limit of {max_parallel_sequences()}; lower slots or beams"
            )
        params = lib.llama_context_default_params()
        params.n_ctx = int(n_ctx)
        params.n_batch = int(n_batch)
        params.n_ubatch = int(n_ubatch or min(n_batch, 512))
        params.n_seq_max = int(n_seq_max)
        params.kv_unified = bool(kv_unified)
        if n_threads:
            params.n_threads = params.n_threads_batch = int(n_threads)
        params.flash_attn_type = {
            None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.no_perf = True
        handle = lib.llama_init_from_model(model._handle, params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not create a context for {model.path} with n_ctx={n_ctx}, "
                f"n_seq_max={n_seq_max}, kv_type={kv_type}: out of memory or a setting this model does not "
                "support (llama.cpp's error line above says which)"
            )
        self._handle = handle
        model._contexts.add(self)  # the model closes this context before freeing its weights
        self._memory = lib.llama_get_memory(handle)
        self.n_ctx = int(lib.llama_n_ctx(handle))
        self.n_batch = int(lib.llama_n_batch(handle))
        self.n_ubatch = int(lib.llama_n_ubatch(handle))
        self.n_seq_max = int(lib.llama_n_seq_max(handle))
        self.n_threads = int(lib.llama_n_threads(handle))
        self.n_vocab = model.vocab.n_tokens

    def _check_open(self) -> None:
        if self._handle is None:
            raise LlamaError("the context is closed" + (" (its model was closed)" if self.model._handle is None else ""))

    def decode(self, batch: Batch) -> None:
        """Evaluate ``batch`` (``llama_decode``); raises on any non-zero return code."""
        self._check_open()
        batch._check_open()
        if batch.n_tokens == 0:
            return
        rc = int(self._lib.llama_decode(self._handle, batch._struct))
        if rc == 0:
            return
        if rc == 1:
            raise NoKVSpaceError(f"no KV-cache space for a batch of {batch.n_tokens} tokens (n_ctx={self.n_ctx})")
        if rc == 2:
            raise DecodeAbortedError("llama_decode was aborted")
        if rc == -1:
            raise LlamaError(f"llama_decode rejected the batch of {batch.n_tokens} tokens as invalid")
        raise LlamaError(f"llama_decode failed with code {rc}")

    def logits(self, index: int) -> np.ndarray:
        """The logits row of batch token ``index`` from the last decode: a float32 view that the next
        decode overwrites (copy it to keep it)."""
        self._check_open()
        ptr = self._lib.llama_get_logits_ith(self._handle, index)
        if not ptr:
            raise LlamaError(f"no logits for batch index {index} (was logits requested for it?)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        """Remove the cells of ``seq_id`` at positions [p0, p1) (all by default)."""
        self._check_open()
        if not self._lib.llama_memory_seq_rm(self._memory, seq_id, p0, p1):
            raise LlamaError(f"llama_memory_seq_rm({seq_id}, {p0}, {p1}) failed")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make the cells of ``src`` at positions [p0, p1) also belong to ``dst`` (no data copy in a
        unified cache)."""
        self._check_open()
        self._lib.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position held by ``seq_id``, -1 if it is empty."""
        self._check_open()
        return int(self._lib.llama_memory_seq_pos_max(self._memory, seq_id))

    def clear(self) -> None:
        """Empty the whole KV cache."""
        self._check_open()
        self._lib.llama_memory_clear(self._memory, False)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.llama_free(self._handle)
            self._handle = None
            self._memory = None
            self.model._contexts.discard(self)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
