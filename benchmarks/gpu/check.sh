#!/usr/bin/env bash
# Issue 8's device checks in ONE call on a lent GPU machine (see benchmarks/README.md, "On a lent
# GPU"). Run from the repository root with gpu-carry/ carried (benchmarks/gpu/prepare_carry.py):
#
#   run(command="bash benchmarks/gpu/check.sh", carry=["gpu-carry"], timeout_s=600)
#
# It installs the carried wheels, builds llama.cpp's shared libraries with CUDA (or unpacks a carried
# build: gpu-carry/cuda-libs.tar.xz.*, which the first run leaves under $OUT for the next), writes a
# 13B-shaped q4_k_m GGUF with random weights, checks that outputs at many slots equal those at one
# slot, then measures `capsfuse-lite bench` and llama.cpp's llama-batched-bench on the same file.
# Everything it learns lands in $OUT (log.txt, parity.json, bench.json, batched-bench.txt).
#
# CHECK_DEVICE=cpu runs the same steps on a CPU-only machine with a tiny model (a dry run of the
# script itself; no CUDA build).
set -euo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-check-out}
CARRY=${CARRY:-gpu-carry}
DEVICE=${CHECK_DEVICE:-gpu}
SHAPE=${CHECK_SHAPE:-$([ "$DEVICE" = gpu ] && echo 13b || echo tiny)}
ROWS=${CHECK_ROWS:-$([ "$DEVICE" = gpu ] && echo 256 || echo 16)}
SLOTS=${CHECK_SLOTS:-$([ "$DEVICE" = gpu ] && echo 32,64,128 || echo 1,4)}
WORK=${CHECK_WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }

log "device=$DEVICE shape=$SHAPE rows=$ROWS slots=$SLOTS"
python3 -m venv --system-site-packages "$WORK/venv"
. "$WORK/venv/bin/activate"
if [ "$DEVICE" = cpu ]; then  # the dry run: this machine's Python may lack what the GPU image has
  pip install -q numpy typer rich
fi
pip install -q --no-index --no-deps --find-links "$CARRY/wheels" \
  capsfuse-lite llama-cpp-python gguf diskcache jinja2 MarkupSafe typing-extensions
LIB=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp').origin), 'lib'))")

if [ "$DEVICE" = gpu ]; then
  if ls "$CARRY"/cuda-libs.tar.xz.* >/dev/null 2>&1; then
    log "unpacking the carried CUDA build"
    cat "$CARRY"/cuda-libs.tar.xz.* | tar -xJ -C "$WORK"
  else
    log "building llama.cpp with CUDA"
    tar -xJf "$CARRY/llama.cpp.tar.xz" -C "$WORK"
    cmake -S "$WORK/llama.cpp" -B "$WORK/build" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} \
      -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" ${EXTRA_CMAKE_ARGS:-} > "$OUT/cmake.txt" 2>&1
    ninja -C "$WORK/build" -j"$(nproc)" llama llama-batched-bench > "$OUT/ninja.txt" 2>&1
    mkdir -p "$WORK/cuda-libs"
    cp -a "$WORK"/build/bin/*.so* "$WORK/build/bin/llama-batched-bench" "$WORK/cuda-libs/"
    (cd "$WORK" && tar -cJf - cuda-libs | split -b 20m - "$OUT/cuda-libs.tar.xz.")
    log "built; the libraries are saved as $OUT/cuda-libs.tar.xz.* (carry them next time)"
  fi
  cp -a "$WORK"/cuda-libs/*.so* "$LIB/"
  nm -DC --defined-only "$LIB/libggml-cuda.so" 2>/dev/null | grep -c 'std::' > "$OUT/libggml-cuda-std-exports.txt" || true
  readelf -d "$LIB/libggml-cuda.so" | grep NEEDED >> "$OUT/libggml-cuda-std-exports.txt" || true
fi
python - <<'PY' | tee -a "$OUT/log.txt"
from capsfuse_lite.llama import devices, libstdcxx_hazard, supports_gpu_offload
print("gpu offload:", supports_gpu_offload(), "| private libstdc++ in:", libstdcxx_hazard())
for d in devices():
    print(f"device {d['name']}: {d['description']} {d['free'] / 2**30:.1f}/{d['total'] / 2**30:.1f} GiB free")
PY

MODEL="$WORK/bench-$SHAPE-q4_k_m.gguf"
log "writing the $SHAPE bench model"
capsfuse-lite bench-model -o "$MODEL" --shape "$SHAPE" --type q4_k_m --force | tee -a "$OUT/log.txt"

log "parity: many slots vs one slot (greedy and 3 beams)"
python benchmarks/gpu/parity.py "$MODEL" --slots "${SLOTS##*,}" --out "$OUT/parity.json" | tee -a "$OUT/log.txt"

log "capsfuse-lite bench"
capsfuse-lite bench --model "$MODEL" --rows "$ROWS" --max-new-tokens 80 --slots "$SLOTS" --beams 1,3 \
  --baselines none --repeats 2 -o "$OUT/bench.json" --force 2>&1 | tee -a "$OUT/log.txt"

if [ -x "$WORK/cuda-libs/llama-batched-bench" ]; then
  log "llama-batched-bench (per-sequence streams, and -kvu unified)"
  BB="$WORK/cuda-libs/llama-batched-bench"
  LD_LIBRARY_PATH="$LIB" "$BB" -m "$MODEL" -c 65536 -b 2048 -ub 512 -npp 47 -ntg 80 -npl 64,128 -ngl 99 -fa on \
    > "$OUT/batched-bench.txt" 2>&1 || true
  LD_LIBRARY_PATH="$LIB" "$BB" -m "$MODEL" -c 65536 -b 2048 -ub 512 -npp 47 -ntg 80 -npl 64,128 -ngl 99 -fa on -kvu \
    >> "$OUT/batched-bench.txt" 2>&1 || true
  grep -E "^\|" "$OUT/batched-bench.txt" | tee -a "$OUT/log.txt" || true
fi
log "done"
