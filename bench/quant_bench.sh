#!/usr/bin/env bash
# One device call for the quantization figures (docs/perf.md, docs/quality.md): build kiln
# (Release, -j16), run the CUDA and quantization tests, measure the copy-bandwidth ceiling, then
# build Llama-3.1-8B-shaped dummy engines in BF16, BF16 + int8-wo, BF16 + int4-wo and fp8 and run
# `kiln bench` on each (tg128 batch 1 and 8, pp512), plus per-op GPU-time profiles of the
# quantized decodes; stage kv: BF16 engines with a BF16 and an FP8 KV cache, decoding at a
# context depth of $DEPTH tokens (tg128 @ d$DEPTH, batches $KV_BATCHES); stage fp8: offline
# 128/128 of the 8B shape in BF16 and fp8, and (H200) the 70B shape's fp8 batch-1 decode; stage
# tg: tg128 at batch 1 and 8 of in-memory dummies in $TG_QUANTS. A scheme named X+head in
# $TG_QUANTS is --quant X --quant-lm-head.
# Results in $OUT: log, tests.txt.
#
#   bench/quant_bench.sh                        # everything
#   STAGES="build tests" bench/quant_bench.sh   # subset of: build tests ceilings gemv bench kv tg profile trace fp8
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
# kiln's flags for a scheme of $TG_QUANTS: X+head is X with the LM head quantized too.
quant_args() { if [[ $1 == *+head ]]; then echo "--quant ${1%+head} --quant-lm-head"; else echo "--quant $1"; fi; }
stamp() { echo "=== $(date +%T) $*"; }
source bench/carried_deps.sh

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

if has build; then
  stamp "build"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON >/tmp/cmake.log 2>&1 ||
    tail -n 30 /tmp/cmake.log
  if ! cmake --build "$BUILD" -j16 --target kiln kiln_tests bench_gemv_quant >/tmp/build.log 2>&1; then
    grep -E "error|Error" /tmp/build.log | head -n 40
    echo "BUILD FAILED"
    exit 1
  fi
  stamp "build done"
fi

if has tests; then
  stamp "tests"
  timeout "${TESTS_TIMEOUT:-280}" "$BUILD/tests/kiln_tests" --gtest_filter="${TESTS:-Cuda*:*Cuda*:Quant*}" \
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

if has gemv; then
  stamp "quantized GEMV micro-benchmark (bench/gemv_quant.cpp)"
  timeout 150 "$BUILD/bench_gemv_quant"
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
if has tg; then
  # Decode only (tg128, batch 1 and 8) of in-memory dummies: quick kernel checks, no engine folder.
  for q in ${TG_QUANTS:-none int4-wo}; do
    stamp "tg128 8B $q (dummy weights in memory)"
    timeout 200 "$BUILD/kiln" bench --dummy-weights "bench/configs/$M/config.json" --dtype bf16 \
      $(quant_args "$q") --max-seq-len 2048 --device cuda -p 0 -n 128 -b 1,8 -r "$REPS" 2>&1 | tail -n 3
  done
fi

if has profile; then
  # Per-op GPU time of one decode (graphs off, so each op is timed) for $TG_QUANTS.
  for q in ${TG_QUANTS:-none int4-wo}; do
    stamp "per-op GPU time, tg128 8B $q"
    KILN_CUDA_PROFILE=1 timeout 200 "$BUILD/kiln" bench --dummy-weights \
      "bench/configs/$M/config.json" --dtype bf16 $(quant_args "$q") --max-seq-len 2048 --device cuda \
      -p 0 -n 128 -b 1 -r 1 2>&1 | tail -n 20
  done
fi

if has trace; then
  # Kernel timeline of the batch-1 decode step (CUDA graphs and PDL as in production), through
  # the CUPTI tracer bench/cupti_trace.cpp; bench/trace_summary.py splits a step per kernel.
  cmake --build "$BUILD" -j16 --target kiln_trace >/tmp/build_trace.log 2>&1 ||
    tail -n 20 /tmp/build_trace.log
  for q in ${TG_QUANTS:-none int4-wo}; do
    stamp "kernel timeline, tg128 8B $q"
    CUDA_INJECTION64_PATH="$BUILD/libkiln_trace.so" KILN_TRACE_OUT="$OUT/trace_$q.csv" \
      timeout 200 "$BUILD/kiln" bench --dummy-weights "bench/configs/$M/config.json" --dtype bf16 \
      $(quant_args "$q") --max-seq-len 2048 --device cuda -p 0 -n 128 -b 1 -r 1 2>&1 | tail -n 3
    python3 bench/trace_summary.py "$OUT/trace_$q.csv" --positions "${POSITIONS:-24}" \
      --layers 32 --period 8 --offset 1  # the 8B shape: embed, then 8 kernels a layer
    gzip -f "$OUT/trace_$q.csv"
  done
fi

if has fp8; then
  # The FP8 goals: offline 128/128 on the 8B shape (1024 requests at once) beside BF16 in this
  # call, then (on an H200: 70 GB of fp8 weights) the 70B shape's batch-1 decode. Dummy weights
  # built in memory (--dummy-weights): a 70B fp8 engine folder would not fit the disk.
  for q in none fp8; do
    stamp "offline 128/128, 1024 requests, 8B $q"
    timeout 240 "$BUILD/kiln" bench offline --dummy-weights "bench/configs/$M/config.json" \
      --dtype bf16 --quant "$q" --max-seq-len 2048 --random-input-len 128 \
      --random-output-len 128 --num-prompts 1024 --max-num-seqs 1024 -o json \
      >"$OUT/offline_$q.json" 2>"$OUT/offline_$q.err"
    echo "exit $?"; tail -n 4 "$OUT/offline_$q.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(d[k],2) for k in ['output_throughput','request_throughput','mean_ttft_ms','median_tpot_ms'] if k in d})" "$OUT/offline_$q.json"
  done
  M70=meta-llama__Llama-3.3-70B-Instruct
  if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)" -gt 100000 ]; then
    stamp "70B fp8 tg128 batch 1 (dummy weights in memory)"
    timeout 400 "$BUILD/kiln" bench --dummy-weights "bench/configs/$M70/config.json" --dtype bf16 \
      --quant fp8 --max-seq-len 2048 --device cuda -p 0 -n 128 -b 1 -r 2 2>&1 | tail -n 4
  else
    echo "70B fp8: skipped (needs an H200's memory)"
  fi
fi

stamp "end"
