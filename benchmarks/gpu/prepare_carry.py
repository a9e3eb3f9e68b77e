"""Prepare what a lent GPU machine needs for `benchmarks/gpu/check.sh`, in the git-ignored folder
`gpu-carry/` (the device tool carries ignored paths named in its `carry` list, 64 MiB at most).

The GPU image has nvcc, cmake, ninja, torch, numpy, typer, rich and pyarrow but no internet, so this
collects, from this machine's package registries and pip cache:

- wheels/: capsfuse-lite (built from this tree), llama-cpp-python 0.3.36 (its CPU build: the Python
  bindings are used, the shared libraries are replaced by a CUDA build on the GPU machine), gguf,
  diskcache, jinja2 and MarkupSafe (for several CPython versions; llama_cpp imports jinja2);
- llama.cpp.tar.xz: llama.cpp's sources from the llama-cpp-python sdist, trimmed to what a CUDA build
  of libllama/libggml and llama-batched-bench needs (used only when ../shared/gpu-kit is missing);
- bisect/before/capsfuse_lite: the engine as of commit 5793529, before the per-sequence-stream
  work, for check.sh's invariance bisect (its ``convert/`` placed as ``capsfuse_lite/convert``, as
  that version installed it).

    python benchmarks/gpu/prepare_carry.py            # -> gpu-carry/ (prints its size)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PURE = ["gguf>=0.17,<1", "diskcache>=5.6", "jinja2>=3.1", "typing-extensions>=4.5"]
PLATFORM_WHEELS = ["MarkupSafe>=2.0"]
PYTHONS = ["310", "311", "312", "313"]
LIMIT = 64 * 1024 * 1024
BISECT_BEFORE = "5793529"  # parent of a227d5c, which brought the KV layouts (per-sequence streams)
# what a CUDA build of the shared libraries and llama-batched-bench reads
KEEP = ["CMakeLists.txt", "cmake", "common", "include", "src", "vendor", "licenses", "LICENSE",
        "ggml/CMakeLists.txt", "ggml/cmake", "ggml/include", "ggml/src/CMakeLists.txt", "ggml/src/ggml-cpu",
        "ggml/src/ggml-cuda", "tools/CMakeLists.txt", "tools/batched-bench"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def trimmed_sources(sdist_dir: Path, dest: Path) -> None:
    root = sdist_dir / "vendor" / "llama.cpp"
    with tarfile.open(dest, "w:xz") as tar:
        for name in KEEP:
            if (root / name).exists():
                tar.add(root / name, arcname=f"llama.cpp/{name}")
        for f in (root / "ggml" / "src").iterdir():  # ggml-base's own files, no other backends
            if f.is_file():
                tar.add(f, arcname=f"llama.cpp/ggml/src/{f.name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu-carry")
    args = parser.parse_args(argv)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    pip("wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO))
    pip("wheel", "--no-deps", "-q", "-w", str(wheels), LLAMA_CPP_PYTHON)  # the cached build
    pip("download", "--no-deps", "-q", "--only-binary=:all:", "-d", str(wheels), *PURE)
    for py in PYTHONS:
        pip("download", "--no-deps", "-q", "--only-binary=:all:", "--python-version", py,
            "--platform", "manylinux2014_x86_64", "-d", str(wheels), *PLATFORM_WHEELS)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "-q", "--no-binary=:all:", "-d", tmp, LLAMA_CPP_PYTHON)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        trimmed_sources(next(Path(tmp).glob("llama_cpp_python-*/")), out / "llama.cpp.tar.xz")
    before = out / "bisect" / "before"
    before.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BISECT_BEFORE, "capsfuse_lite", "convert"],
                             check=True, capture_output=True).stdout
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        Path(tmp.name).write_bytes(archive)
        with tarfile.open(tmp.name) as tar:
            tar.extractall(before, filter="data")
    (before / "convert").rename(before / "capsfuse_lite" / "convert")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB ({'fits' if size <= LIMIT else 'OVER'} the 64 MiB carry limit)")
    if size > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
