#!/usr/bin/env bash
# One device call for the serving figures of docs/perf.md: build kiln (Release, -j16), time the
# decode attention kernels (bench_attention_decode), run the GPU tests (ops, sampling, scheduler
# on CUDA), then on a Llama-3.1-8B-shaped dummy BF16 engine: kiln bench tg128 (batch 1),
# `kiln bench offline` for 128/128 (1024 requests), 128/2048, 2048/128 and 1000/1000,
# and `kiln bench serve` against `kiln serve` at concurrency 1, 16, 64.
# Carry the Debian packages the device image lacks in build-debs/ (apt-get download
# libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2 libcli11-dev libgtest-dev
# libcpp-httplib-dev libcpp-httplib0.11 libssl-dev libssl3 zlib1g-dev zlib1g libbrotli-dev
# libbrotli1 libxxhash-dev).
#   STAGES="build kernels tests offline serve" OUT=... bench/serve_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/serve_bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
STAGES=${STAGES:-"build kernels tests offline serve"}
BUILD=${BUILD:-build-gpu}
N1=${N1:-1024}   # requests of the 128/128 run
N2=${N2:-256}    # requests of the longer runs
SEQS=${SEQS:-512}
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date +%T) $*"; }

source bench/carried_deps.sh
export PATH=/usr/local/cuda/bin:$PATH
stamp device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "commit ${COMMIT:-unknown}"

if has build; then
  stamp build
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON >"$OUT/cmake.log" 2>&1 ||
    tail -n 30 "$OUT/cmake.log"
  if ! cmake --build "$BUILD" -j16 --target kiln kiln_tests bench_attention_decode >"$OUT/build.log" 2>&1; then
    grep -E "error" "$OUT/build.log" | head -n 40
    echo "BUILD FAILED"
    exit 1
  fi
fi
K=$BUILD/kiln

if has kernels; then
  stamp "decode attention (bench_attention_decode)"
  timeout 120 "$BUILD/bench_attention_decode"
fi

if has tests; then
  stamp tests
  timeout 300 "$BUILD/tests/kiln_tests" \
    --gtest_filter='*Cuda*:*Sampl*:*Logprob*:*Logit*' >"$OUT/tests.txt" 2>&1
  echo "kiln_tests exit $?"
  grep -E "^\[cuda|^\[mixed|^\[  FAILED  \]|^\[  PASSED  \]|tests ran" "$OUT/tests.txt" | sort -u | head -80
  grep -E -A6 "Failure$" "$OUT/tests.txt" | head -n 80
fi

E=/tmp/l8.engine
CFG=bench/configs/meta-llama__Llama-3.1-8B-Instruct/config.json
if has offline || has serve; then
  stamp "engine"
  "$K" build --dummy-weights --config "$CFG" --dtype bf16 --max-seq-len 4096 -o "$E" | tail -n 1
  stamp "tg128 (kiln bench, batch 1)"
  timeout 120 "$K" bench "$E" -p 0 -n 128 -b 1 -r 2 --kv-cache-tokens 8192 2>&1 | tail -n 3
fi
if has offline; then
  # Each spec: input,output,requests[,max-num-seqs]
  for spec in ${SPECS:-"128,128,$N1 128,2048,$N2 2048,128,$N2 1000,1000,$N2"}; do
    spec=${spec//,/ }
    set -- $spec
    seqs=${4:-$SEQS}
    f="$OUT/offline_$1_$2_s$seqs"
    stamp "offline $1/$2, $3 requests, --max-num-seqs $seqs"
    timeout 240 "$K" bench offline "$E" --random-input-len "$1" --random-output-len "$2" \
      --num-prompts "$3" --max-num-seqs "$seqs" --step-log "$f.steps.csv" -o json >"$f.json" 2>"$f.err"
    echo "exit $?"; tail -n 3 "$f.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(d[k],2) for k in ['output_throughput','request_throughput','mean_ttft_ms','median_tpot_ms','p99_tpot_ms','median_itl_ms'] if k in d})" "$f.json"
  done
fi
if has serve; then
  stamp "serve"
  "$K" serve "$E" --port 8011 --max-num-seqs 256 >"$OUT/serve.log" 2>&1 &
  SP=$!
  for i in $(seq 1 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
  for c in 1 16 64; do
    n=$((c == 1 ? 16 : c * 4))
    stamp "bench serve concurrency $c ($n requests)"
    timeout 200 "$K" bench serve --url http://127.0.0.1:8011 --random-input-len 128 \
      --random-output-len 128 --num-prompts "$n" --max-concurrency "$c" --vocab-size 128256 -o json \
      >"$OUT/serve_c$c.json" 2>>"$OUT/serve.log"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(d[k],2) for k in ['output_throughput','median_ttft_ms','p99_ttft_ms','median_tpot_ms','p99_tpot_ms','median_itl_ms'] if k in d})" "$OUT/serve_c$c.json"
  done
  kill -TERM $SP; wait $SP; echo "serve exit $?"; tail -n 5 "$OUT/serve.log"
fi
stamp done
