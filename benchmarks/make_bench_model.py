"""Build the benchmark models: random-weight LLaMA GGUFs, and optionally the same weights for transformers.

A thin wrapper over :func:`capsfuse_lite.bench.model.write_bench_model` (the same as
``capsfuse-lite bench-model``) that names the files after shape and type in one folder:

    python benchmarks/make_bench_model.py                           # OUT/capsfus-llama-cpu768-q8_0.gguf
    python benchmarks/make_bench_model.py --shape 13b --type q4_k_m # OUT/capsfus-llama-13b-q4_k_m.gguf (7.9 GB, seconds)
    python benchmarks/make_bench_model.py --hf-checkpoint          # + OUT/capsfus-llama-cpu768/ for --hf-checkpoint

``--hf-checkpoint`` also writes the GGUF's weights, dequantized, as an HF checkpoint in upstream's
style (bf16 safetensors, 4.28 config, CapsFus-LLaMA's tokenizer files) for the ``hf-upstream``
baseline of ``capsfuse-lite bench``: transformers then runs the same model, so it never emits EOS
either (needs the repository's tests/ folder; about 2 bytes per parameter of disk).

OUT defaults to ``~/.cache/capsfuse-lite/bench-models``. Existing files are reused unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(out: Path, shape: str = "cpu768", out_type: str = "q8_0", *, seed: int = 0, force: bool = False,
          hf_checkpoint: bool = False) -> tuple[Path, Path | None]:
    """The GGUF (and HF checkpoint folder) under ``out``; reused when present unless ``force``."""
    from capsfuse_lite.bench.model import write_bench_model

    gguf = out / f"capsfus-llama-{shape}-{out_type}.gguf"
    if force or not gguf.is_file():
        write_bench_model(gguf, shape, out_type, seed=seed, force=True, progress=None)
    folder = None
    if hf_checkpoint:
        folder = out / f"capsfus-llama-{shape}"
        if force or not (folder / "model.safetensors").is_file():
            sys.path.insert(0, str(REPO / "tests"))
            from checkpoints import checkpoint_from_gguf

            checkpoint_from_gguf(gguf, folder, dtype="bfloat16")
    return gguf, folder


def main(argv: list[str] | None = None) -> int:
    import logging

    from capsfuse_lite.bench.model import OUT_TYPES, PRESETS
    from capsfuse_lite.errors import CapsfuseError
    from capsfuse_lite.models import cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=cache_dir() / "bench-models", help="output folder")
    parser.add_argument("--shape", default="cpu768", choices=list(PRESETS), help="LLaMA shape (default cpu768, README's CPU tables)")
    parser.add_argument("--type", default="q8_0", choices=list(OUT_TYPES), help="GGUF type (default q8_0, README's CPU tables)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    parser.add_argument("--hf-checkpoint", action="store_true",
                        help="also write the same weights as an HF checkpoint (for bench --hf-checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        gguf, folder = build(args.out, args.shape, args.type, seed=args.seed, force=args.force,
                             hf_checkpoint=args.hf_checkpoint)
    except CapsfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"gguf:       {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB)")
    if folder is not None:
        print(f"checkpoint: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
