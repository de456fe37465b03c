#!/usr/bin/env bash
# One device call for the quantization figures (docs/perf.md, docs/quality.md): build kiln
# (Release, -j16), run the CUDA and quantization tests, measure the copy-bandwidth ceiling, then
# build Llama-3.1-8B-shaped dummy engines in BF16, BF16 + int8-wo, BF16 + int4-wo and fp8 and run
# `kiln bench` on each (tg128 batch 1 and 8, pp512), plus per-op GPU-time profiles of the
# quantized decodes; stage kv: BF16 engines with a BF16 and an FP8 KV cache, decoding at a
# context depth of $DEPTH tokens (tg128 @ d$DEPTH, batches $KV_BATCHES).
# Results in $OUT: log, tests.txt.
#
#   bench/quant_bench.sh                        # everything
#   STAGES="build tests" bench/quant_bench.sh   # subset of: build tests ceilings bench kv
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/quant_bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
STAGES=${STAGES:-"build tests ceilings bench"}
BUILD=${BUILD:-build-gpu}
ENGINES=${ENGINES:-/tmp/kiln-engines}
REPS=${REPS:-3}
M=meta-llama__Llama-3.1-8B-Instruct
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date +%T) $*"; }
source bench/carried_deps.sh

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

if has build; then
  stamp "build"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON >/tmp/cmake.log 2>&1 ||
    tail -n 30 /tmp/cmake.log
  if ! cmake --build "$BUILD" -j16 --target kiln kiln_tests >/tmp/build.log 2>&1; then
    grep -E "error|Error" /tmp/build.log | head -n 40
    echo "BUILD FAILED"
    exit 1
  fi
  stamp "build done"
fi

if has tests; then
  stamp "tests"
  timeout 280 "$BUILD/tests/kiln_tests" --gtest_filter="${TESTS:-Cuda*:*Cuda*:Quant*}" \
    >"$OUT/tests.txt" 2>&1
  echo "kiln_tests exit $?"
  grep -E "^\[cuda parity|^\[quality|^\[  FAILED  \]|^\[  PASSED  \]|^\[  SKIPPED \]" \
    "$OUT/tests.txt" | sort -u
  grep -E -A6 "Failure$" "$OUT/tests.txt" | head -n 80
  stamp "tests done"
fi

if has ceilings; then
  stamp "ceilings"
  nvcc -O3 -gencode=arch=compute_90a,code=sm_90a bench/ceilings.cu -lcublasLt -o "$BUILD/ceilings" &&
    timeout 120 "$BUILD/ceilings"
fi

if has bench; then
  for q in ${QUANTS:-none int8-wo int4-wo fp8}; do
    E="$ENGINES/$q"
    rm -rf "$E"
    stamp "engine $M $q"
    "$BUILD/kiln" build --dummy-weights --config "bench/configs/$M/config.json" --dtype bf16 \
      --quant "$q" --max-seq-len 2048 -o "$E" | tail -n 1
    stamp "kiln bench $q"
    timeout 150 "$BUILD/kiln" bench "$E" --device cuda -r "$REPS" -p 512 -n 128 -b 1,8
  done
  for q in ${PROFILE_QUANTS:-int8-wo int4-wo fp8}; do
    stamp "$q per-op GPU time (decode)"
    KILN_CUDA_PROFILE=1 timeout 120 "$BUILD/kiln" bench "$ENGINES/$q" --device cuda -r 1 \
      -p 0 -n 128 2>&1 | tail -n 16
  done
  rm -rf "$ENGINES"
fi

if has kv; then
  DEPTH=${DEPTH:-4096}
  for kv in auto fp8; do
    E="$ENGINES/kv-$kv"
    rm -rf "$E"
    stamp "engine $M bf16, kv cache $kv"
    "$BUILD/kiln" build --dummy-weights --config "bench/configs/$M/config.json" --dtype bf16 \
      --kv-cache-dtype "$kv" --max-seq-len $((DEPTH + 256)) -o "$E" | tail -n 1
    stamp "kiln bench kv $kv"
    timeout 240 "$BUILD/kiln" bench "$E" --device cuda -r "${KV_REPS:-2}" -p 0 -n 128 \
      -d "$DEPTH" -b "${KV_BATCHES:-1,16,32}"
    rm -rf "$E"
  done
fi
stamp "end"
