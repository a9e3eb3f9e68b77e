"""Owned wrappers over llama.cpp's C handles (llama-cpp-python's low-level ctypes API).

This is the only module that touches ``llama_cpp.llama_cpp``. Each C handle has one small class
that frees it in ``close()`` (also via ``with``), and C return codes become Python exceptions:

- :class:`Model`   -- ``llama_model`` (weights, GGUF metadata); owns its :class:`Vocab`.
- :class:`Vocab`   -- tokenize / detokenize with the model's own tokenizer (not a separate handle:
  llama.cpp frees it with the model).
- :class:`Context` -- ``llama_context`` with its memory (KV cache): ``decode``, logits,
  ``llama_memory_seq_*`` operations.
- :class:`Batch`   -- a ``llama_batch`` whose arrays are numpy buffers owned here.

Lifetimes: a context cannot outlive its model's weights, so ``Model.close()`` first closes every
context still open on it; any later call on a closed handle (model, vocab, context, batch) raises
:class:`LlamaError` instead of touching freed C memory.

llama.cpp's own log lines are hidden unless :func:`set_verbose` is on (errors are always shown).

Importing this module loads llama.cpp's shared libraries, on purpose before numpy: a CUDA build of
llama-cpp-python whose ``libggml-cuda.so`` carries (and exports) its own copy of libstdc++ crashed
in ``llama_model_load_from_file`` when numpy's C++ runtime had been loaded first (issue 8).
:func:`libstdcxx_hazard` detects such a build; :class:`Model` refuses to load it, with a clear
message, when numpy was imported before llama.cpp.
"""

from __future__ import annotations

import os
import sys

_NUMPY_FIRST = "numpy" in sys.modules and "llama_cpp.llama_cpp" not in sys.modules

# llama.cpp's CPU backend is built with OpenMP. libgomp's idle workers spin for GOMP_SPINCOUNT
# (300,000) rounds, milliseconds, after each parallel region: after a decode they then take the
# cores the engine's own search needs, and on a busy machine the decode's too. Passive waiting
# (OMP_WAIT_POLICY=PASSIVE) fixes that but makes every barrier inside a decode a sleep (-15 %
# greedy rows/s on the quiet 2-core CPU). 10,000 rounds keeps the barriers spinning and stops
# within ~0.1 ms (measured there: greedy 16 slots 15.2 -> 16.3 rows/s, 64 slots x 3 beams host time
# 10.2 -> 7.6 ms per step). Read once, when libgomp loads; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import llama_cpp.llama_cpp  # noqa: E402,F401  (loads libllama and the ggml libraries before numpy)

import ctypes  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402

from capsfuse_lite.errors import ConfigError, ModelLoadError


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
    """The bindings, with the backend initialised once and the log filter installed."""
    global _initialised, _log_callback
    lib = llama_cpp.llama_cpp

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


def libstdcxx_hazard() -> str | None:
    """The library of this llama.cpp build that exports a private libstdc++ copy, else None (see
    :mod:`capsfuse_lite.engine.native`)."""
    from capsfuse_lite.engine.native import libstdcxx_hazard as check

    return check(_lib_folder())


_warned_hazard = False


def _check_load_order() -> None:
    """Before a model loads: refuse the known crash (a private-libstdc++ build with numpy loaded
    first) with one line; warn once when such a build is loaded in the safer order."""
    global _warned_hazard
    if os.environ.get("CAPSFUSE_LITE_ALLOW_NUMPY_FIRST"):
        return
    owner = libstdcxx_hazard()
    if not owner:
        return
    fix = ("reinstall llama-cpp-python with CMAKE_ARGS=\"-DGGML_CUDA=on -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL\" "
           "(capsfuse-lite's README)")
    if _NUMPY_FIRST:
        raise ModelLoadError(
            f"this llama-cpp-python build's {owner} carries its own copy of libstdc++, and numpy was imported "
            f"before llama.cpp: loading a model would crash. Import capsfuse_lite (or llama_cpp) before numpy, or {fix} "
            "(set CAPSFUSE_LITE_ALLOW_NUMPY_FIRST=1 to try anyway)"
        )
    if not _warned_hazard:
        _warned_hazard = True
        sys.stderr.write(f"capsfuse-lite: warning: this llama-cpp-python build's {owner} carries its own copy of "
                         f"libstdc++ and may crash when other C++ libraries load; {fix}\n")


def set_verbose(verbose: bool) -> None:
    """Show (True) or hide (False) llama.cpp's informational log lines; errors always show."""
    global _verbose
    _verbose = bool(verbose)
    _lib()


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    return bool(_lib().llama_supports_gpu_offload())


def quantize_model(source: Path, dest: Path, ftype: int, n_threads: int) -> int:
    """llama.cpp's own quantizer (``llama_model_quantize``): the GGUF ``source`` into ``dest`` with
    llama.cpp's tensor mix for ``ftype`` (a ``LLAMA_FTYPE_*``); returns its code (0: done)."""
    lib = _lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(n_threads)
    return int(lib.llama_model_quantize(os.fsencode(source), os.fsencode(dest), ctypes.byref(params)))


def max_parallel_sequences() -> int:
    """The largest ``n_seq_max`` this llama.cpp build accepts."""
    return int(_lib().llama_max_parallel_sequences())


_ggml = None


def _ggml_lib():
    """libggml (loaded with libllama by llama-cpp-python) for the device queries llama.h lacks."""
    global _ggml
    if _ggml is None:
        ggml = ctypes.CDLL(str(_lib_folder() / "libggml.so"))
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(ggml, name).restype = ctypes.c_char_p
            getattr(ggml, name).argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_memory.restype = None
        ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        _ggml = ggml
    return _ggml


class _ThreadpoolParams(ctypes.Structure):
    """ggml.h's ``struct ggml_threadpool_params``."""

    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


_threadpool_api = None


def _threadpool_lib():
    """(libggml-cpu, libllama) with the threadpool functions llama-cpp-python does not bind."""
    global _threadpool_api
    if _threadpool_api is None:
        folder = _lib_folder()
        cpu = ctypes.CDLL(str(folder / "libggml-cpu.so"))
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
        cpu.ggml_threadpool_free.restype = None
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        llama = llama_cpp.llama_cpp._lib
        llama.llama_attach_threadpool.restype = None
        llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        llama.llama_detach_threadpool.restype = None
        llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        _threadpool_api = (cpu, llama)
    return _threadpool_api


def _lib_folder() -> Path:
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.llama_cpp.__file__).resolve().parent / "lib"


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def devices() -> list[dict]:
    """The compute devices of this llama.cpp build: ``name``, ``description``, ``type`` (cpu, gpu,
    igpu, accel) and ``free``/``total`` memory in bytes as the backend reports them now."""
    try:
        ggml = _ggml_lib()
    except (OSError, AttributeError):  # a build laid out differently: no device list
        return []
    out = []
    for i in range(int(ggml.ggml_backend_dev_count())):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": (ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            "type": _DEVICE_TYPES.get(int(ggml.ggml_backend_dev_type(dev)), "other"),
            "free": int(free.value),
            "total": int(total.value),
        })
    return out


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


def apply_chat_template(template: str, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str | None:
    """``messages`` ((role, content) pairs) rendered by llama.cpp's ``llama_chat_apply_template``
    with ``template`` (a GGUF's chat template: llama.cpp recognises its family, e.g. ChatML, and
    renders that family's format; Jinja code is not run), followed by the assistant's turn opener
    when ``add_assistant``; None when llama.cpp does not know the template."""
    lib = _lib()
    keep = [(role.encode("utf-8"), content.encode("utf-8")) for role, content in messages]
    chat = (lib.llama_chat_message * max(1, len(keep)))(*(lib.llama_chat_message(role=r, content=c) for r, c in keep))
    tmpl = template.encode("utf-8")
    size = 2 * sum(len(c) for _, c in keep) + 1024
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(tmpl, chat, len(keep), add_assistant, buf, size)
        if n < 0:
            return None
        if n <= size:
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
        # BOS as the GGUF says (tokenizer.ggml.add_bos_token; llama.cpp's default for the tokenizer type
        # when absent: yes for LLaMA's SentencePiece, no for GPT-2's BPE), never a BOS the vocab lacks
        self.add_bos = bool(self._lib.llama_vocab_get_add_bos(handle)) and self.bos >= 0
        self._eog_ids: frozenset[int] | None = None

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every token that ends generation (``llama_vocab_is_eog``): EOS, and e.g. ``<|im_end|>`` or
        ``<|endoftext|>`` of chat models; ``{eos}`` for LLaMA-2's vocabulary."""
        if self._eog_ids is None:
            self._model._check_open()
            is_eog = self._lib.llama_vocab_is_eog
            self._eog_ids = frozenset(t for t in range(self.n_tokens) if is_eog(self._handle, t))
        return self._eog_ids

    def token_text(self, token: int) -> str:
        """The text of a token as the vocabulary stores it (e.g. ``<|im_end|>``)."""
        self._model._check_open()
        text = self._lib.llama_vocab_get_text(self._handle, token)
        return text.decode("utf-8", errors="replace") if text else ""

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

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The ids a prompt is fed as: BOS (``add_bos=None``: as the GGUF says, :attr:`add_bos`) then
        the text's tokens, with special-token text such as ``</s>`` kept as plain text."""
        ids = self.tokenize(text, add_special=False, parse_special=False)
        if add_bos is None:
            add_bos = self.add_bos
        return [self.bos] + ids if add_bos and self.bos >= 0 else ids

    def encode_special(self, text: str) -> list[int]:
        """Token ids of template text whose special-token text (``<|im_start|>``) is the special token;
        no BOS."""
        return self.tokenize(text, add_special=False, parse_special=True)

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
        _check_load_order()
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

    def chat_template(self) -> str | None:
        """The GGUF's own chat template (``tokenizer.chat_template``), None if it has none."""
        self._check_open()
        text = self._lib.llama_model_chat_template(self._handle, None)
        return text.decode("utf-8", errors="replace") if text else None

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
    """A ``llama_batch`` of up to ``capacity`` tokens whose arrays are numpy buffers owned here, so
    a whole decode step is filled with a few array assignments (no per-token ctypes calls). Each
    token belongs to one sequence."""

    def __init__(self, capacity: int):
        lib = _lib()
        self.capacity = int(capacity)
        if self.capacity < 1:
            raise LlamaError(f"a batch needs a capacity of at least 1 token, got {capacity}")
        self.token = np.zeros(self.capacity, dtype=np.int32)
        self.pos = np.zeros(self.capacity, dtype=np.int32)
        self.seq = np.zeros(self.capacity, dtype=np.int32)
        self.output = np.zeros(self.capacity, dtype=np.int8)
        self._n_seq_id = np.ones(self.capacity, dtype=np.int32)
        seq_t = ctypes.POINTER(lib.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_t * self.capacity)(
            *(ctypes.cast(base + 4 * i, seq_t) for i in range(self.capacity))
        )
        self._struct = lib.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(lib.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_t)),
            logits=self.output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.n_tokens = 0
        self.n_outputs = 0  # tokens whose logits the next decode returns
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LlamaError("the batch is closed")

    def clear(self) -> None:
        self._check_open()
        self.n_tokens = self.n_outputs = 0
        self._struct.n_tokens = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n_tokens

    def _reserve(self, n: int) -> int:
        self._check_open()
        i = self.n_tokens
        if n < 1 or i + n > self.capacity:
            raise LlamaError(f"cannot add {n} tokens to a batch with {self.capacity - i} free")
        self.n_tokens = i + n
        self._struct.n_tokens = self.n_tokens
        return i

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token; returns its index in the batch."""
        i = self._reserve(1)
        self.token[i], self.pos[i], self.seq[i], self.output[i] = token, pos, seq_id, bool(logits)
        self.n_outputs += bool(logits)
        return i

    def add_tokens(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                   outputs: Sequence[int] | None = None) -> int:
        """Append one token per entry, each with its logits requested unless ``outputs`` (1/0 per
        token) says otherwise; returns the batch index of the first."""
        n = len(tokens)
        i = self._reserve(n)
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = positions
        self.seq[i : i + n] = seq_ids
        if outputs is None:
            self.output[i : i + n] = 1
            self.n_outputs += n
        else:
            self.output[i : i + n] = outputs
            self.n_outputs += int(self.output[i : i + n].sum())
        return i

    def add_sequence(self, tokens: Sequence[int], pos0: int, seq_id: int, logits_last: bool) -> int:
        """Append consecutive tokens of one sequence at positions pos0, pos0+1, ...; returns the
        batch index of the last one."""
        n = len(tokens)
        i = self._reserve(n)
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(pos0, pos0 + n)
        self.seq[i : i + n] = seq_id
        self.output[i : i + n] = 0
        if logits_last:
            self.output[i + n - 1] = 1
            self.n_outputs += 1
        return i + n - 1

    def close(self) -> None:
        """Nothing to free in llama.cpp (the arrays are numpy's); a closed batch refuses use."""
        self._struct.n_tokens = 0
        self.n_tokens = self.n_outputs = 0
        self._closed = True

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorHead(ctypes.Structure):
    """The start of ggml.h's ``struct ggml_tensor`` up to its name (ggml 0.3.36's layout)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


# computed once per micro-batch by every LLaMA-architecture graph; its ne[1] is the ubatch's tokens
_UBATCH_MARKER = b"attn_norm-0"


class Context:
    """A ``llama_context`` (one KV cache shared by up to ``n_seq_max`` sequences).

    ``count_ubatches=True`` (for tests and diagnosis: it makes llama.cpp's scheduler stop at one
    tensor of every graph) appends to ``ubatches`` the token count of every micro-batch llama.cpp
    really computes, one entry per weight pass (see :mod:`capsfuse_lite.engine.ubatch`).
    """

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
        cpu_poll: int = 0,
        count_ubatches: bool = False,
    ):
        self._lib = lib = _lib()
        model._check_open()
        self.model = model
        self._handle = None
        self._threadpool = None
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
        self.ubatches: list[int] = []
        self._eval_callback = None
        if count_ubatches:
            ubatches = self.ubatches

            @lib.ggml_backend_sched_eval_callback
            def _observe(tensor, ask, _user):
                head = ctypes.cast(tensor, ctypes.POINTER(_TensorHead)).contents
                if head.name != _UBATCH_MARKER:
                    return False if ask else True
                if not ask:
                    ubatches.append(int(head.ne[1]))
                return True

            self._eval_callback = _observe  # kept alive as long as the context
            params.cb_eval = _observe
            params.cb_eval_user_data = None
        handle = lib.llama_init_from_model(model._handle, params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not create a context for {model.path} with n_ctx={n_ctx}, "
                f"n_seq_max={n_seq_max}, kv_type={kv_type}: out of memory or a setting this model does not "
                "support (llama.cpp's error line above says which)"
            )
        self._handle = handle
        model._contexts.add(self)  # the model closes this context before freeing its weights
        self._attach_threadpool(params.n_threads, cpu_poll)
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

    def _attach_threadpool(self, n_threads: int, poll: int) -> None:
        """Give the CPU backend a threadpool whose idle workers sleep at once (``poll=0``) instead of
        ggml's default of spinning for a while after every decode: spinning workers take the cores
        the engine's own search needs between decodes. Skipped when the build lacks the symbols."""
        try:
            cpu, llama = _threadpool_lib()
        except (OSError, AttributeError):
            return
        params = _ThreadpoolParams(n_threads=max(1, int(n_threads)), prio=0, poll=max(0, min(100, int(poll))))
        pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if pool:
            llama.llama_attach_threadpool(self._handle, pool, pool)
            self._threadpool = (cpu, llama, pool)

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

    def set_threads(self, n_threads: int) -> None:
        """Threads llama.cpp's CPU backend uses from the next decode on (``llama_set_n_threads``)."""
        self._check_open()
        n = max(1, int(n_threads))
        self._lib.llama_set_n_threads(self._handle, n, n)
        self.n_threads = int(self._lib.llama_n_threads(self._handle))

    def synchronize(self) -> None:
        """Wait for the last decode to finish (``llama_decode`` may return before a GPU is done)."""
        self._check_open()
        self._lib.llama_synchronize(self._handle)

    def outputs(self, n_outputs: int) -> np.ndarray:
        """The logits of the last decode as one (n_outputs, n_vocab) float32 view, one row per token
        whose logits were requested, in batch order (``llama_get_logits``). The next decode
        overwrites it: copy what must be kept."""
        self._check_open()
        if n_outputs < 1:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = self._lib.llama_get_logits(self._handle)
        if not ptr:
            raise LlamaError("llama_get_logits returned no logits (none were requested?)")
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

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
            if self._threadpool is not None:
                self._threadpool[1].llama_detach_threadpool(self._handle)
            self._lib.llama_free(self._handle)
            self._handle = None
            self._memory = None
            self.model._contexts.discard(self)
        if self._threadpool is not None:
            cpu, _, pool = self._threadpool
            cpu.ggml_threadpool_free(pool)
            self._threadpool = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
