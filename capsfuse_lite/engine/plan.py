"""Sizing a Fuser before llama.cpp allocates anything: the KV-cache layout and how many slots fit.

KV layouts (llama.cpp's ``kv_unified``):

- **unified**: one cache for all sequences. Beams fork by sharing cells (no data copy), and the
  shared instruction prefix is shared too, but every query attends over all used cells behind a
  mask, so attention grows with slots x slots. Used for beam search.
- **streams**: one cache stream per sequence. Each query attends over its own stream only; the
  prefix is placed in a row's stream by a device-side copy of the prefix stream when the row is
  admitted (llama.cpp copies whole streams across streams). Used for greedy decoding, where no beam
  ever forks. llama.cpp's own batched decoding measured 1.5-2.3x more decode throughput with
  per-sequence streams at 64-128 sequences (issue 8, H100); on a 2-core CPU, 16 greedy slots ran
  1.10x faster with streams on rows that end at different lengths (SmolLM2-135M, 96 rows: 3.37 vs
  3.07 rows/s) and on the random cpu768 model at 80 tokens (7.1 vs 6.5), equal at 32 tokens: in a
  unified cache continuous admission scatters rows' cells, and every query attends over all of them.

KV memory per cell is ``n_layer x (n_head_kv x head_dim_k x bytes(type_k) + n_head_kv x head_dim_v x
bytes(type_v))``: 0.78 MiB for LLaMA-2-13B in f16. ``--slots auto`` picks, on a GPU, the largest slot
count up to the throughput knee whose weights + KV cache + compute buffers fit the device's free
memory; on a CPU, the knee (memory permitting). The knee is what ``capsfuse-lite bench`` measured
on this device for this model shape (remembered in the user cache), else the defaults below.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from capsfuse_lite.errors import ConfigError

CELL_PAD = 256  # llama.cpp pads KV sizes (n_ctx, and n_ctx per stream) to multiples of 256
# bytes per element of each KV cache type (block types: block bytes / 32 elements)
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
# Throughput knees when this device has not been benchmarked. GPU: issue 8's H100 measurements
# (greedy rose up to 64 slots and fell past it; 3 beams peaked at 32); on an H200 (README) 3 beams
# peaked at 32 again and greedy with streams gained 9 % from 64 to 128 slots. CPU: README's 2-core tables
# (greedy gains up to 16 slots, 3 beams no more past 8).
DEFAULT_KNEE = {("gpu", 1): 64, ("gpu", "beams"): 32, ("cpu", 1): 16, ("cpu", "beams"): 8}
FIT_FRACTION = 0.92  # of the free memory the estimate may use (allocator slack, fragmentation)
GIB = 1024**3
MIB = 1024**2


def pad(cells: int) -> int:
    return int(math.ceil(cells / CELL_PAD) * CELL_PAD)


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a GGUF header (no weights loaded)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    file_bytes: int
    quant: str | None = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ModelShape":
        from capsfuse_lite.convert.gguf_metadata import read_gguf_metadata
        from capsfuse_lite.models import gguf_defaults

        meta = read_gguf_metadata(path)
        arch = meta.get("general.architecture", "llama")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ConfigError(f"{path}: GGUF metadata {arch}.{key} is missing; re-run `capsfuse-lite convert`")
            return int(value)

        n_embd, n_head = get("embedding_length"), get("attention.head_count")
        n_head_kv = get("attention.head_count_kv", n_head)
        head_dim = n_embd // n_head
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()) or ()) or 32000
        return cls(
            n_layer=get("block_count"), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
            head_dim_k=get("attention.key_length", head_dim), head_dim_v=get("attention.value_length", head_dim),
            n_ff=get("feed_forward_length", 4 * n_embd), n_vocab=int(vocab), n_ctx_train=get("context_length", 4096),
            file_bytes=Path(path).stat().st_size, quant=gguf_defaults(path)["quant"],
        )

    def kv_bytes_per_cell(self, kv_type: str = "f16") -> float:
        try:
            per = KV_TYPE_BYTES[kv_type]
        except KeyError:
            raise ConfigError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPE_BYTES)}") from None
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * per

    @property
    def key(self) -> str:
        """Identifies the compute shape (for remembered bench knees)."""
        return f"L{self.n_layer}-E{self.n_embd}-H{self.n_head}/{self.n_head_kv}-F{self.n_ff}-{self.quant or '?'}"


@dataclass(frozen=True)
class KVLayout:
    """The KV cache a Fuser asks llama.cpp for."""

    unified: bool
    n_seq_max: int
    n_ctx: int  # cells in all
    row_cells: int  # worst-case cells one row holds beyond the shared prefix (unified) / its stream size

    def bytes(self, shape: ModelShape, kv_type: str) -> float:
        return self.n_ctx * shape.kv_bytes_per_cell(kv_type)


def kv_layout(*, slots: int, beams: int, max_input: int, max_new: int, n_prefix: int, shared_min: int,
              unified: bool) -> KVLayout:
    """The layout for ``slots`` rows. Unified: the prefix once plus, per slot, the row's worst case
    (its prompt tokens beyond the shared part and ``beams x max_new`` generated cells). Streams: one
    stream per sequence (plus the prefix's), each holding a whole prompt and its generation."""
    prefix_seq = 1 if n_prefix else 0
    if unified:
        row = max_input - min(shared_min, max_input - 1) + beams * max_new if n_prefix else max_input + beams * max_new
        return KVLayout(True, slots * beams + prefix_seq, pad(n_prefix + slots * row), row)
    if beams != 1:
        raise ConfigError("per-sequence KV streams (kv_unified=False) need beams=1: beam forks share cells, "
                          "which only a unified cache can do")
    per_stream = pad(max_input + max_new)
    n_seq = slots + prefix_seq
    return KVLayout(False, n_seq, per_stream * n_seq, per_stream)


def compute_bytes(shape: ModelShape, n_ubatch: int) -> float:
    """A generous estimate of llama.cpp's compute buffers on the device for one ubatch (activations of
    the widest layer, the logits, cuBLAS/CUDA workspace), with flash attention (no full KQ matrix)."""
    activations = n_ubatch * (8 * shape.n_embd + 3 * shape.n_ff) * 4
    logits = n_ubatch * shape.n_vocab * 4
    return activations + logits + 512 * MIB


@dataclass(frozen=True)
class SlotChoice:
    slots: int
    reason: str  # one line: what fit and why


def _knee(device_kind: str, beams: int, device_name: str, shape: ModelShape) -> tuple[int, str]:
    remembered = remembered_knee(device_name, shape, beams)
    if remembered is not None:
        return remembered, f"the throughput knee `capsfuse-lite bench` measured here ({remembered})"
    knee = DEFAULT_KNEE[(device_kind, 1 if beams == 1 else "beams")]
    return knee, f"the default {device_kind} throughput knee for {'greedy' if beams == 1 else f'{beams} beams'} ({knee})"


def choose_slots(*, requested: int | str, shape: ModelShape, beams: int, max_input: int, max_new: int,
                 n_prefix: int, shared_min: int, unified: bool, kv_type: str, device: dict | None,
                 gpu_fraction: float = 1.0, n_ubatch: int = 512, host_available: int | None = None) -> SlotChoice:
    """Slots for a run: ``requested`` (an int) checked against memory, or ``"auto"``.

    ``device``: the GPU the KV cache lives on (``free``/``total`` bytes, as
    :func:`capsfuse_lite.engine.llama.devices` reports after the model is loaded, so ``free`` no longer
    includes the weights), None on a CPU-only run (then ``host_available`` bytes bound it).
    Raises ConfigError, naming the numbers, when not even the requested count (or one slot) fits.
    """

    def layout(s: int) -> KVLayout:
        return kv_layout(slots=s, beams=beams, max_input=max_input, max_new=max_new, n_prefix=n_prefix,
                         shared_min=shared_min, unified=unified)

    per_cell = shape.kv_bytes_per_cell(kv_type)
    if device is not None:
        where = f"{device.get('description') or device.get('name') or 'GPU'}"
        if device.get("free") is None:  # a backend that reports no memory: the knee alone decides
            budget, free_text = float("inf"), "free memory not reported"
        else:
            budget = device["free"] * FIT_FRACTION - compute_bytes(shape, n_ubatch)
            free_text = f"{device['free'] / GIB:.1f} GiB free after the model"
        kv_on_device = gpu_fraction
        kind = "gpu"
    else:
        where = "CPU"
        budget = (host_available if host_available is not None else float("inf")) * FIT_FRACTION - compute_bytes(shape, n_ubatch)
        kv_on_device = 1.0
        kind = "cpu"
        free_text = f"{host_available / GIB:.1f} GiB RAM available" if host_available is not None else "RAM not checked"

    def need(s: int) -> float:
        return layout(s).bytes(shape, kv_type) * kv_on_device

    def fits(s: int) -> bool:
        return need(s) <= budget

    mode = "unified KV" if unified else "per-sequence KV streams"
    cell_text = f"{per_cell / MIB:.2f} MiB per KV cell ({kv_type})"
    if requested != "auto":
        slots = int(requested)
        if not fits(slots):
            most = _largest_fitting(fits, slots)
            raise ConfigError(
                f"--slots {slots} needs {need(slots) / GIB:.1f} GiB of KV cache ({layout(slots).n_ctx} cells x {cell_text}, "
                f"{mode}) but {where} has {free_text}: "
                + (f"at most {most} slot(s) fit; pass --slots {most} or --slots auto" if most else
                   "not even one slot fits; use a smaller model/quantization, --kv-type q8_0, or fewer GPU layers")
            )
        return SlotChoice(slots, f"slots {slots} (given): {need(slots) / GIB:.2f} GiB KV cache, {mode}, on {where}")
    knee, knee_text = _knee(kind, beams, where, shape)
    slots = _largest_fitting(fits, knee)
    if slots == 0:
        raise ConfigError(
            f"not even one slot fits on {where}: one row's KV cache needs {need(1) / GIB:.2f} GiB ({cell_text}) and "
            f"{where} has {free_text}; use a smaller quantization, --kv-type q8_0, or fewer GPU layers (--n-gpu-layers)"
        )
    bound = "memory" if slots < knee else "the knee"
    return SlotChoice(slots, f"slots auto = {slots} on {where} ({free_text}): {bound} binds; "
                             f"{need(slots) / GIB:.2f} GiB KV cache ({layout(slots).n_ctx} cells x {cell_text}, {mode}); "
                             f"knee: {knee_text}")


STREAMS_MIN_SHARE = 0.75  # auto layout (greedy): streams unless they fit < 75 % of unified's slots


def choose_layout(*, requested: int | str, shape: ModelShape, beams: int, kv_unified: bool | None,
                  max_input: int, max_new: int, n_prefix: int, shared_min: int, kv_type: str,
                  device: dict | None, **kw) -> tuple[bool, SlotChoice]:
    """(unified, slots): the KV layout and the slot count. ``kv_unified=None`` picks: unified for
    beam search (forks share cells); for greedy, per-sequence streams (faster attention),
    unless their whole-row streams (a 512-cell stream per sequence) fit so much less memory than a
    unified cache that they would run under ``STREAMS_MIN_SHARE`` of its slots (on a CPU as on a GPU)."""
    args = dict(requested=requested, shape=shape, beams=beams, max_input=max_input, max_new=max_new,
                n_prefix=n_prefix, shared_min=shared_min, kv_type=kv_type, device=device, **kw)
    if kv_unified is not None or beams > 1:
        unified = True if kv_unified is None else kv_unified
        return unified, choose_slots(unified=unified, **args)
    try:
        streams = choose_slots(unified=False, **args)
    except ConfigError:
        return True, choose_slots(unified=True, **args)
    if requested != "auto":
        return False, streams
    unified = choose_slots(unified=True, **args)
    if streams.slots >= STREAMS_MIN_SHARE * unified.slots:
        return False, streams
    return True, SlotChoice(unified.slots, unified.reason + f" (per-sequence streams would fit only {streams.slots})")


def _largest_fitting(fits, upper: int) -> int:
    """Largest s in [0, upper] with fits(s) (fits is monotone: more slots never need less)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- knees remembered from `capsfuse-lite bench` ------------------------------------------------

def _knee_store() -> Path:
    from capsfuse_lite.models import cache_dir

    return cache_dir() / "bench-knees.json"


def _knee_key(device_name: str, shape: ModelShape, beams: int) -> str:
    return f"{device_name}|{shape.key}|beams={beams}"


def remembered_knee(device_name: str, shape: ModelShape, beams: int) -> int | None:
    try:
        data = json.loads(_knee_store().read_text())
        value = data.get(_knee_key(device_name, shape, beams))
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def remember_knee(device_name: str, shape: ModelShape, beams: int, slots: int) -> Path | None:
    """Record the slot count the bench recommends for this device, model shape and beam count."""
    store = _knee_store()
    try:
        data = json.loads(store.read_text()) if store.exists() else {}
        if not isinstance(data, dict):
            data = {}
        data[_knee_key(device_name, shape, beams)] = int(slots)
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, store)
    except OSError:
        return None
    return store
