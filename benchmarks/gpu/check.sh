#!/usr/bin/env bash
# Issue 15's device checks in ONE call on a lent GPU machine (see benchmarks/README.md, "On a lent
# GPU"). Run from the repository root with gpu-carry/ carried (benchmarks/gpu/prepare_carry.py):
#
#   run(command="bash benchmarks/gpu/check.sh", carry=["gpu-carry"], timeout_s=600)
#
# It installs the carried wheels, takes llama.cpp's CUDA libraries and llama-batched-bench from the
# prebuilt kit (../shared/gpu-kit, CUDA 13 sm_90; else a carried build, else builds them: ~200 s),
# writes a 13B-shaped q4_k_m GGUF with random weights, then, in order of value:
#  1. bench-greedy: `capsfuse-lite bench` greedy at 64/128 slots (rows/s, passes/step, host/device
#     ms per step) and, in the same call, llama-batched-bench -pps (the C++ shared-prompt figure);
#  2. bisect: outputs at 64 slots vs one slot on the sample rows, greedy (80 tokens: a first
#     difference below 40 is the 40-token answer) and 3 beams, with this tree (per-sequence streams,
#     kv_unified=true, and streams without flash attention) and with the engine from before the
#     per-sequence-stream work (commit 5793529, carried as gpu-carry/bisect/before);
#  3. first-token: the first token's logits of a prompt evaluated alone vs among 63 others, then 8
#     decode steps fed the same tokens, streams vs unified, n_ubatch 512 vs 64, flash attention
#     on/off (kernel noise or a defect; on the CPU only streams + no flash + n_ubatch 512 is exact);
#  4. bench-beams (3 beams, 32 slots), 5. smollm2 (the real trained model, when its GGUF is found:
#     $SMOLLM2, gpu-carry/ or ../shared/), 6. import-order, 7. fuse-auto.
#
# Device time is scarce, so each step is skipped when the time left (CHECK_DEADLINE seconds after
# the start, default 560) is below its estimate. A step that finished leaves a marker under $WORK:
# the same command run again on the still-warm machine does only the steps left, and every call
# leaves all results so far in its $OUT: results.tar.gz (log.txt, bench-*.json, batched-bench.txt,
# bisect-*.json, first-token.json, import-order.txt) and log.txt.
#
# CHECK_DEVICE=cpu runs the same steps on a CPU-only machine with a tiny model (a dry run of the
# script itself; no CUDA build).
set -euo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-check-out}
CARRY=${CARRY:-gpu-carry}
DEVICE=${CHECK_DEVICE:-gpu}
GPU=$([ "$DEVICE" = gpu ] && echo 1 || echo "")
SHAPE=${CHECK_SHAPE:-$([ $GPU ] && echo 13b || echo tiny)}
ROWS=${CHECK_ROWS:-$([ $GPU ] && echo 256 || echo 16)}
GREEDY_SLOTS=${CHECK_GREEDY_SLOTS:-$([ $GPU ] && echo 64,128 || echo 1,4)}
BEAM_SLOTS=${CHECK_BEAM_SLOTS:-$([ $GPU ] && echo 32 || echo 4)}
PARITY_SLOTS=${CHECK_PARITY_SLOTS:-$([ $GPU ] && echo 64 || echo 4)}
BISECT_ROWS=${CHECK_BISECT_ROWS:-$([ $GPU ] && echo 24 || echo 6)}
BISECT_NEW=${CHECK_BISECT_NEW:-$([ $GPU ] && echo 80 || echo 12)}
KIT=${GPU_KIT:-../shared/gpu-kit}
SMOLLM2=${SMOLLM2:-$(ls "$CARRY"/SmolLM2*.gguf ../shared/*/SmolLM2*.gguf /work/smollm2/SmolLM2*.gguf 2>/dev/null | head -1 || true)}
DEADLINE=${CHECK_DEADLINE:-560}
WORK=${CHECK_WORK:-/tmp/gpu-check}
RES="$WORK/results"
mkdir -p "$OUT" "$WORK" "$RES"
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$RES/log.txt"; }
# the device tool brings back only a few files per call: one archive of the results, the log, and
# the parts of the built libraries
publish() {
  tar -czf "$OUT/results.tar.gz" -C "$RES" --exclude 'cuda-libs.tar.xz.*' . 2>/dev/null || true
  cp -a "$RES/log.txt" "$OUT/" 2>/dev/null || true
  cp -a "$RES"/cuda-libs.tar.xz.* "$OUT/" 2>/dev/null || true
}
trap publish EXIT
# step NAME SECONDS: true when NAME has not run yet and its estimate fits in the time left
step() {
  if [ -e "$WORK/done.$1" ]; then return 1; fi
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt "$2" ]; then log "SKIPPED $1: needs ~$2 s, $left s left (run the same command again)"; return 1; fi
  log "== $1 (~$2 s, $left s left)"
  STEP_T=$(( left - 10 ))  # a step that overruns is cut off before the call's own limit
}
done_() { touch "$WORK/done.$1"; }

log "device=$DEVICE shape=$SHAPE rows=$ROWS greedy=$GREEDY_SLOTS beams=$BEAM_SLOTS parity=$PARITY_SLOTS"
if step install 30; then
  PY=python3  # the interpreter that has the image's numpy, typer and rich
  for p in python3 python /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python; do
    if command -v "$p" >/dev/null && "$p" -c "import numpy, typer, rich" 2>/dev/null; then PY=$p; break; fi
  done
  log "python: $(command -v $PY) $($PY --version 2>&1)"
  # into a folder on PYTHONPATH: the image's Python may be a venv without pip (its packages are not
  # "system site packages" of a new venv either)
  pip install -q --target "$WORK/site" --no-index --no-deps --find-links "$CARRY/wheels" \
    capsfuse-lite llama-cpp-python gguf diskcache jinja2 MarkupSafe typing-extensions
  if [ -z "$GPU" ] && ! $PY -c "import numpy, typer, rich" 2>/dev/null; then
    $PY -m pip install -q --target "$WORK/site" numpy typer rich  # the dry run: what the GPU image has
  fi
  mkdir -p "$WORK/bin"
  PYPATH=$(command -v $PY)
  printf '#!/bin/sh\nexec %s -P -m capsfuse_lite "$@"\n' "$PYPATH" > "$WORK/bin/capsfuse-lite"
  printf '#!/bin/sh\nexec %s -P "$@"\n' "$PYPATH" > "$WORK/bin/python"
  chmod +x "$WORK/bin/capsfuse-lite" "$WORK/bin/python"
  done_ install
fi
export PATH="$WORK/bin:$PATH" PYTHONPATH="$WORK/site"
LIB=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp').origin), 'lib'))")

if [ $GPU ] && step cuda-build 260; then
  if ls "$KIT"/libs/libs.tar.xz.* >/dev/null 2>&1; then
    log "unpacking the prebuilt CUDA libraries of $KIT"
    mkdir -p "$WORK/cuda-libs" && cat "$KIT"/libs/libs.tar.xz.* | xz -d | tar -C "$WORK/cuda-libs" -xf -
  elif ls "$CARRY"/cuda-libs.tar.xz.* >/dev/null 2>&1; then
    log "unpacking the carried CUDA build"
    cat "$CARRY"/cuda-libs.tar.xz.* | tar -xJ -C "$WORK"
  else
    tar -xJf "$CARRY/llama.cpp.tar.xz" -C "$WORK"
    # the trimmed sources keep only tools/batched-bench: build that tool alone, no app/
    echo 'add_subdirectory(batched-bench)' > "$WORK/llama.cpp/tools/CMakeLists.txt"
    mkdir -p "$WORK/llama.cpp/app" && touch "$WORK/llama.cpp/app/CMakeLists.txt"
    cmake -S "$WORK/llama.cpp" -B "$WORK/build" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} \
      -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" ${EXTRA_CMAKE_ARGS:-} > "$RES/cmake.txt" 2>&1
    ninja -C "$WORK/build" -j"$(nproc)" llama llama-batched-bench > "$RES/ninja.txt" 2>&1
    mkdir -p "$WORK/cuda-libs"
    cp -a "$WORK"/build/bin/*.so* "$WORK/build/bin/llama-batched-bench" "$WORK/cuda-libs/"
    # saved for a fresh machine (carry them next time); in the background, on a few cores
    (cd "$WORK" && nice -n 10 tar -cf - cuda-libs | xz -T4 -6 | split -b 20m - "$RES/cuda-libs.tar.xz." \
      && echo "[saved] $RES/cuda-libs.tar.xz.*" >> "$RES/log.txt") &
    log "built"
  fi
  { echo "exported std:: symbols in libggml-cuda.so:"; nm -DC --defined-only "$LIB/libggml-cuda.so" | grep -c 'std::' || true
    readelf -d "$LIB/libggml-cuda.so" | grep NEEDED || true; } > "$RES/libggml-cuda-exports.txt" 2>&1
  done_ cuda-build
fi
if [ $GPU ]; then cp -a "$WORK"/cuda-libs/*.so* "$LIB/"; fi
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # llama-batched-bench's libraries
python - <<'PY' 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off at the deadline)"
from capsfuse_lite.engine.llama import devices, libstdcxx_hazard, supports_gpu_offload
print("gpu offload:", supports_gpu_offload(), "| private libstdc++ in:", libstdcxx_hazard())
for d in devices():
    print(f"device {d['name']}: {d['description']} {d['free'] / 2**30:.1f}/{d['total'] / 2**30:.1f} GiB free")
PY

MODEL="$WORK/bench-$SHAPE-q4_k_m.gguf"
TINY="$WORK/bench-tiny-q4_k_m.gguf"
if step model 90; then
  capsfuse-lite bench-model -o "$MODEL" --shape "$SHAPE" --type q4_k_m --force 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off at the deadline)"
  [ "$SHAPE" = tiny ] || capsfuse-lite bench-model -o "$TINY" --shape tiny --type q4_k_m --force -q
  done_ model
fi
[ -e "$TINY" ] || TINY="$MODEL"

BENCH="capsfuse-lite bench --model $MODEL --rows $ROWS --max-new-tokens 80 --baselines none --repeats 2 --warmup-rows 32 --force -q"
if step bench-greedy 110; then
  timeout "$STEP_T" $BENCH --slots "$GREEDY_SLOTS" --beams 1 -o "$RES/bench-greedy.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off at the deadline)"
  done_ bench-greedy
fi
BB="$WORK/cuda-libs/llama-batched-bench"
if [ -x "$BB" ] && step batched-bench 60; then
  # the issue's C++ reference: 160-token prompts whose shared part is evaluated once (-pps)
  for args in "-npp 160 -ntg 80 -npl $GREEDY_SLOTS -pps" "-npp 160 -ntg 80 -npl $GREEDY_SLOTS -pps -kvu"; do
    echo "## llama-batched-bench $args" >> "$RES/batched-bench.txt"
    timeout 90 "$BB" -m "$MODEL" -c 40960 -b 2048 -ub 512 -ngl 99 -fa on $args \
      2>&1 | grep -E "^\||^main:" >> "$RES/batched-bench.txt" || true
  done
  cat "$RES/batched-bench.txt" | tee -a "$RES/log.txt"
  done_ batched-bench
fi
# which change moved slot invariance: this tree (streams for greedy, and kv_unified=true) vs the
# engine before the per-sequence-stream work (5793529), same GPU, GGUF and rows
SO="python benchmarks/gpu/slot_outputs.py $MODEL --slots 1,$PARITY_SLOTS --rows $BISECT_ROWS --max-new-tokens $BISECT_NEW"
if step bisect-now 100; then
  timeout "$STEP_T" $SO --beams 1,3 --label now --out "$RES/bisect-now.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off)"
  done_ bisect-now
fi
if [ -d "$CARRY/bisect/before" ] && step bisect-before 100; then
  PYTHONPATH="$PWD/$CARRY/bisect/before:$WORK/site" timeout "$STEP_T" $SO --beams 1,3 --label before-5793529 \
    --out "$RES/bisect-before.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off)"
  done_ bisect-before
fi
if step first-token 40; then
  (cd benchmarks/gpu && timeout "$STEP_T" python first_token.py "$MODEL" --seqs $PARITY_SLOTS --rows 4 --steps 8 \
    --n-gpu-layers $([ $GPU ] && echo -1 || echo 0) --out "$RES/first-token.json") 2>&1 | tee -a "$RES/log.txt" || log "exit $?"
  done_ first-token
fi
if step bisect-unified 60; then
  timeout "$STEP_T" $SO --beams 1 --kv-unified true --label now-unified --out "$RES/bisect-unified.json" 2>&1 \
    | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off)"
  done_ bisect-unified
fi
if step bisect-streams-no-fa 60; then
  # on the CPU (SmolLM2, 16 slots) per-sequence streams without flash attention kept 43/47 rows equal
  # to one slot, against 30/47 by default: does the GPU show the same?
  timeout "$STEP_T" $SO --beams 1 --kv-unified false --flash-attn false --label now-streams-no-fa \
    --out "$RES/bisect-streams-no-fa.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off)"
  done_ bisect-streams-no-fa
fi
if step bench-beams 120; then
  timeout "$STEP_T" $BENCH --slots "$BEAM_SLOTS" --beams 3 -o "$RES/bench-beams.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $? (failed, or cut off at the deadline)"
  done_ bench-beams
fi
if step nbatch 60; then
  # larger batches for prompt waves (CPU count on the tiny model: 128 slots, n_batch 2048 vs 512,
  # 376 -> 328 passes): rows/s and passes/step side by side, same rows, greedy streams
  NB_SLOTS=${GREEDY_SLOTS##*,}
  timeout "$STEP_T" python - "$MODEL" "$NB_SLOTS" "$ROWS" <<'PY' 2>&1 | tee -a "$RES/log.txt" || log "exit $?"
import sys, time
from capsfuse_lite import Fuser
from capsfuse_lite.bench.measure import load_pairs, repeat_to
model, slots, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pairs = repeat_to(load_pairs(), rows)
for n_batch in (None, 2048, None, 2048):
    with Fuser(model, slots=slots, beams=1, max_new_tokens=80, n_batch=n_batch) as f:
        list(f.fuse(pairs[:slots]))  # warm-up
        t = time.perf_counter(); n = len(list(f.fuse(pairs))); el = time.perf_counter() - t
        s = f.stats
        print(f"nbatch-ab slots={slots} n_batch={f.settings['n_batch']} n_ubatch={f.settings['n_ubatch']}: {n / el:.2f} rows/s, "
              f"passes/step {s.passes_per_step:.2f}, device {s.device_ms_per_step:.1f} ms/step", flush=True)
PY
  done_ nbatch
fi
if [ -n "$SMOLLM2" ] && [ -e "$SMOLLM2" ] && step smollm2 90; then
  # the real trained model: rows end at EOS (7-40 tokens), so slots refill one by one
  timeout "$STEP_T" capsfuse-lite bench --model "$SMOLLM2" --rows $([ $GPU ] && echo 128 || echo 8) \
    --slots $([ $GPU ] && echo 1,64 || echo 1,4) --beams 1 --baselines llama-cpp-python-loop --repeats 2 \
    --warmup-rows 8 --force -q -o "$RES/bench-smollm2.json" 2>&1 | tee -a "$RES/log.txt" || log "exit $?"
  done_ smollm2
elif [ ! -e "$WORK/done.smollm2" ]; then
  log "SKIPPED smollm2: no SmolLM2 GGUF (set SMOLLM2=, or put it in $CARRY/)"
fi
if step import-order 40; then
  # the CUDA 13 report: numpy imported before llama.cpp's libraries made model loading segfault
  # (run outside the repository: a source checkout's capsfuse_lite/ lacks the installed .convert)
  for order in "import numpy; import llama_cpp" "import llama_cpp; import numpy"; do
    rc=0; timeout 60 python -c "$order
from llama_cpp import Llama
m = Llama(model_path='$TINY', n_gpu_layers=99, verbose=True)
print('generated:', m('a photo of', max_tokens=4)['choices'][0]['text'] != None)" > "$WORK/io.txt" 2>&1 || rc=$?
    echo "[$order] llama_cpp.Llama load with offload: exit $rc" | tee -a "$RES/import-order.txt" "$RES/log.txt"
    grep -E "print_info: (file type|model params)|offloaded|generated" "$WORK/io.txt" >> "$RES/import-order.txt" || true
  done
  rc=0; (cd "$WORK" && timeout 60 python -c "import numpy
from capsfuse_lite import Fuser
with Fuser('$TINY', slots=2) as f:
    print(len(list(f.fuse([('a dog', 'a brown dog on grass')]))), 'row')") >> "$RES/import-order.txt" 2>&1 || rc=$?
  echo "[import numpy; from capsfuse_lite import Fuser] exit $rc" | tee -a "$RES/import-order.txt" "$RES/log.txt"
  done_ import-order
fi
if step fuse-auto 40; then  # what --slots auto picks here, and the line that says why
  SAMPLE=$(cd "$WORK" && python -c "from capsfuse_lite.bench.measure import sample_captions_path; print(sample_captions_path())")
  timeout "$STEP_T" capsfuse-lite fuse "$SAMPLE" -o "$WORK/fused.jsonl" --model "$MODEL" --force --verbose 2>&1 \
    | grep -v "^llama_\|^load\|^print_info\|^ggml_\|^graph_\|^sched_" | tail -15 | tee -a "$RES/log.txt" || log "exit $?"
  python -c "import json; s = json.load(open('$WORK/fused.jsonl.meta.json'))['settings']; print(s['slots_reason'])" \
    2>&1 | tee -a "$RES/log.txt" || true
  done_ fuse-auto
fi




wait
log "done"
