#!/usr/bin/env bash
# Issue 15's device call, on a machine of two or more GPUs (nvidia-h200-x2 or larger): build
# kiln, then
#   parity:  TP=2 and PP=2 logits against one GPU and the HF reference for every fixture
#            architecture, F32 and BF16 (bench/tp_parity.py; CudaParity's bounds);
#   decode:  tg128 at batch 1 of the Llama-3.1-8B shape, BF16, at TP=1 and TP=2 (goal: time per
#            token at TP=2 <= 0.6x TP=1);
#   offline: 128/128 of the 8B shape at TP=2 (1024 requests), BF16;
#   70b:     the Llama-3.3-70B shape at TP=2: BF16 decode and offline 128/128 (TensorRT-LLM's
#            FP8 TP2 H200 figure: 6,428 output tok/s), and FP8 the same.
# Dummy weights built in memory (--dummy-weights). NCCL_NVLS_ENABLE=0 as the device notes ask.
# Results in $OUT: log, parity.txt, offline_*.json.
#
#   bench/multi_gpu.sh                           # everything
#   STAGES="build parity" bench/multi_gpu.sh     # subset of: build parity decode offline 70b
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/multi_gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
STAGES=${STAGES:-"build parity decode offline 70b"}
BUILD=${BUILD:-build-gpu}
TP=${TP:-2}
export NCCL_NVLS_ENABLE=0
M8=bench/configs/meta-llama__Llama-3.1-8B-Instruct/config.json
M70=bench/configs/meta-llama__Llama-3.3-70B-Instruct/config.json
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date +%T) $*"; }
source bench/carried_deps.sh

stamp "device"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
nvidia-smi topo -m 2>/dev/null | head -n 6
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [ "$GPUS" -lt "$TP" ]; then
  echo "needs $TP GPUs, found $GPUS"
  exit 1
fi

if has build; then
  stamp "build"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/tmp/cmake.log 2>&1 || tail -n 30 /tmp/cmake.log
  if ! cmake --build "$BUILD" -j"$(nproc)" --target kiln >/tmp/build.log 2>&1; then
    grep -E "error|Error" /tmp/build.log | head -n 40
    echo "BUILD FAILED"
    exit 1
  fi
  stamp "build done"
fi
K="$BUILD/kiln"

if has parity; then
  stamp "parity: TP=$TP and PP=2 against one GPU and the HF reference"
  timeout "${PARITY_TIMEOUT:-900}" python3 bench/tp_parity.py --kiln "$K" --device cuda \
    --dtypes f32,bf16 --modes "tp$TP,pp2" tests/fixtures/hf/* | tee "$OUT/parity.txt" | tail -n 80
fi

bench_tg() {  # $1: config, $2: tp, rest: kiln flags
  local cfg=$1 tp=$2
  shift 2
  stamp "tg128 batch 1, $(basename "$(dirname "$cfg")"), TP=$tp $*"
  timeout "${TG_TIMEOUT:-400}" "$K" bench --dummy-weights "$cfg" --dtype bf16 "$@" --tp "$tp" \
    --max-seq-len 2048 --device cuda -p 0 -n 128 -b 1 -r 2 2>&1 | tail -n 3
}
bench_offline() {  # $1: config, $2: tp, $3: tag, rest: kiln flags
  local cfg=$1 tp=$2 tag=$3
  shift 3
  stamp "offline 128/128, 1024 requests, $tag, TP=$tp $*"
  timeout "${OFFLINE_TIMEOUT:-600}" "$K" bench offline --dummy-weights "$cfg" --dtype bf16 "$@" \
    --tp "$tp" --max-seq-len 2048 --random-input-len 128 --random-output-len 128 \
    --num-prompts 1024 --max-num-seqs 1024 -o json >"$OUT/offline_$tag.json" 2>"$OUT/offline_$tag.err"
  echo "exit $?"
  tail -n 3 "$OUT/offline_$tag.err"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(d[k],2) for k in ['output_throughput','request_throughput','mean_ttft_ms','median_tpot_ms'] if k in d})" "$OUT/offline_$tag.json"
}

if has decode; then
  bench_tg "$M8" 1 --quant none
  bench_tg "$M8" "$TP" --quant none
fi
if has offline; then
  bench_offline "$M8" 1 8b_bf16_tp1 --quant none
  bench_offline "$M8" "$TP" "8b_bf16_tp$TP" --quant none
fi
if has 70b; then
  bench_tg "$M70" "$TP" --quant none
  bench_offline "$M70" "$TP" "70b_bf16_tp$TP" --quant none
  bench_tg "$M70" "$TP" --quant fp8
  bench_offline "$M70" "$TP" "70b_fp8_tp$TP" --quant fp8
fi
stamp "end"
