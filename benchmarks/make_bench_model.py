"""Build the CPU-sized benchmark model: LLaMA's shape at a size a 2-core CPU can run.

A random LlamaForCausalLM with hidden 768, intermediate 2048, 8 layers, 12 heads and CapsFus-LLaMA's
vocabulary (LLaMA-2's real SentencePiece tokenizer plus [PAD] = 32000, 32001 tokens), written in
upstream's layout (fp32 ``pytorch_model-*.bin`` shards + index, transformers-4.28 config, tokenizer
files) by ``tests/checkpoints.py``, then converted with
:func:`capsfuse_lite.convert.convert_checkpoint` (q8_0 by default).

The weights are random, so the captions it writes are nonsense; the compute per token (and the
tokenizer, hence the prompt lengths of the sample captions) is what matters for speed.

    python benchmarks/make_bench_model.py                 # -> /work/bench-models/...
    python benchmarks/make_bench_model.py --out DIR --type q4_k_m

Prints the checkpoint folder and the GGUF path. Needs torch + transformers (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

SHAPE = dict(hidden=768, intermediate=2048, layers=8, heads=12)
NAME = "capsfus-llama-cpu768"


def build(out: Path, out_type: str = "q8_0", force: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """The HF checkpoint folder and its GGUF under ``out`` (reused when present unless ``force``)."""
    from checkpoints import make_llama_checkpoint

    from capsfuse_lite.convert import convert_checkpoint

    folder = out / NAME
    gguf = out / f"{NAME}-{out_type}.gguf"
    if force or not (folder / "config.json").is_file():
        make_llama_checkpoint(folder, layout="bin-sharded", dtype="float32", config_style="4.28", seed=seed, **SHAPE)
    if force or not gguf.is_file():
        convert_checkpoint(folder, gguf, out_type=out_type, force=True, progress=False)
    return folder, gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/bench-models"), help="output folder (outside the repo)")
    parser.add_argument("--type", default="q8_0", help="GGUF type for convert_checkpoint (default q8_0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    folder, gguf = build(args.out, args.type, args.force, args.seed)
    print(f"checkpoint: {folder}")
    print(f"gguf:       {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
