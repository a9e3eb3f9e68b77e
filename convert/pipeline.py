"""``convert_checkpoint``: HF LLaMA checkpoint (folder or hub id) -> GGUF, streaming and torch-free."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from capsfuse_lite import __version__
from capsfuse_lite import defaults as D
from capsfuse_lite.files import replace_atomically
from capsfuse_lite.files import check_output_folder, make_output_folder

from .hub import resolve_source
from .llama import (ARCH_NAME, DIRECT_TYPES, LLAMA_QUANT_TYPES, QUANT_BITS_PER_WEIGHT, add_model_metadata,
                    add_vocab_metadata, check_out_type, plan_tensors)
from .progress import ConvertProgress, human_bytes
from .source import open_checkpoint
from .vocab import build_vocab
from .writer import (PENDING_DIGEST, SequentialHasher, check_free_space, check_output_path, fsync_file,
                     remove_quietly, sha256_file, temp_path, write_gguf)

log = logging.getLogger("capsfuse_lite.convert")


def _gguf_py_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


CONVERTER_VERSION = f"capsfuse-lite {__version__} (gguf-py {_gguf_py_version()})"
_HEADER_ALLOWANCE = 8 << 20  # metadata + vocabulary + alignment, generous


def _intermediate_type(plans_dtypes: set[str]) -> str:
    """F16 intermediate for llama.cpp's quantizer, BF16 when the weights are BF16 (lossless)."""
    return "bf16" if plans_dtypes == {"BF16"} else "f16"


def add_capsfuse_defaults(writer: gguf.GGUFWriter) -> None:
    """Upstream's prompt template and decoding settings, the defaults ``fuse`` reads back."""
    writer.add_string(D.KEY_PROMPT_TEMPLATE, D.PROMPT_TEMPLATE)
    writer.add_uint32(D.KEY_MAX_INPUT_TOKENS, D.MAX_INPUT_TOKENS)
    writer.add_uint32(D.KEY_NUM_BEAMS, D.NUM_BEAMS)
    writer.add_uint32(D.KEY_MAX_NEW_TOKENS, D.MAX_NEW_TOKENS)
    writer.add_uint32(D.KEY_LENGTH_OFFSET, D.LENGTH_OFFSET)


def _add_capsfuse_metadata(writer: gguf.GGUFWriter, label: str, revision: str | None, digests: dict[str, str]) -> None:
    from .writer import digest_json

    add_capsfuse_defaults(writer)
    writer.add_string(D.KEY_SOURCE, label)
    writer.add_string(D.KEY_REVISION, revision or "local")
    writer.add_string(D.KEY_SOURCE_SHA256, digest_json(digests))
    writer.add_string(D.KEY_CONVERTER_VERSION, CONVERTER_VERSION)


def convert_checkpoint(source: str | Path = D.DEFAULT_HUB_REPO, out_path: str | Path = "capsfus-llama.gguf", *,
                       out_type: str = "q4_k_m", revision: str | None = None, force: bool = False,
                       progress: bool | None = None) -> Path:
    """Convert a LlamaForCausalLM checkpoint into a GGUF at ``out_path`` and return that path.

    ``source`` is a local folder or a hub id; ``out_type`` one of f32, f16, bf16, q8_0 (written
    directly) or q4_0, q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer, from an F16/BF16 intermediate
    next to the output, removed afterwards). The output appears only when complete.
    """
    out_type = check_out_type(out_type)
    out = Path(out_path).expanduser().resolve()
    check_output_path(out, force)
    check_output_folder(out)  # a missing folder is made once the checkpoint has been read
    reporter = ConvertProgress(progress)

    resolved = resolve_source(source, revision)
    checkpoint = open_checkpoint(resolved.folder)
    dtypes = {ref.dtype for ref in checkpoint.tensors.values()}
    write_type = out_type if out_type in DIRECT_TYPES else _intermediate_type(dtypes - {"F64", "I64"})
    plans = plan_tensors(checkpoint, write_type)
    embedding = next(p for p in plans if p.name == "token_embd.weight")
    vocab = build_vocab(checkpoint.folder, checkpoint.config, embedding.rows)
    make_output_folder(out)

    # Disk: the direct output (or the intermediate) plus, for llama.cpp quant types, the final file.
    written_bytes = sum(p.nbytes for p in plans) + _HEADER_ALLOWANCE
    needed = written_bytes
    if out_type in LLAMA_QUANT_TYPES:
        n_weights = sum(int(np.prod(p.shape)) for p in plans)
        needed += int(n_weights * QUANT_BITS_PER_WEIGHT[out_type] / 8) + _HEADER_ALLOWANCE
    check_free_space(out.parent, needed, f"converting to {out_type}")

    names = {path: path.name for path in checkpoint.source_files}
    digests = {names[p]: sha256_file(p) for p in checkpoint.extra_files}
    digests.update({names[p]: PENDING_DIGEST for p in checkpoint.weight_files})

    file_type = DIRECT_TYPES[write_type][1]
    writer = gguf.GGUFWriter(None, ARCH_NAME)
    writer.add_name(Path(resolved.label).name if resolved.repo_id is None else resolved.repo_id.split("/")[-1])
    if resolved.repo_id:
        writer.add_source_repo_url(f"https://huggingface.co/{resolved.repo_id}")
    add_model_metadata(writer, checkpoint.config, file_type)
    add_vocab_metadata(writer, vocab)
    _add_capsfuse_metadata(writer, resolved.label, resolved.revision, digests)
    for plan in plans:
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)

    reporter.message(
        f"converting {resolved.label} ({checkpoint.config.n_layers} layers, vocab {len(vocab)}, "
        f"{len(checkpoint.weight_files)} weight file(s)) to {out_type}: {out}"
    )
    first = temp_path(out, write_type)
    final_tmp = temp_path(out, out_type) if out_type in LLAMA_QUANT_TYPES else first
    try:
        write_gguf(first, writer, plans, reporter, SequentialHasher(checkpoint.weight_files), digests, names,
                   f"{write_type} {out.name}")
        if out_type in LLAMA_QUANT_TYPES:
            from .quantize import quantize_with_llama_cpp

            reporter.message(f"quantizing to {out_type} with llama.cpp ({human_bytes(first.stat().st_size)} {write_type} intermediate)")
            quantize_with_llama_cpp(first, final_tmp, out_type)
            fsync_file(final_tmp)  # llama.cpp's quantizer does not fsync what it writes
            remove_quietly(first)
        replace_atomically(final_tmp, out)  # rename, then fsync the folder so the rename survives a crash
    except BaseException:
        remove_quietly(first)
        remove_quietly(final_tmp)
        raise
    reporter.message(f"wrote {out} ({human_bytes(out.stat().st_size)})")
    return out
