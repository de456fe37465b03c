#!/usr/bin/env bash
# Builds kiln's libFuzzer targets (clang, ASan + UBSan, in build-fuzz/) and runs each for a set
# time with its seed corpus; see docs/fuzzing.md.
#
#   scripts/fuzz.sh [SECONDS per target, default 600] [target ...]   (targets: see fuzz/fuzz_*.cpp,
#                                                                     named without "fuzz_")
#
# The seed corpus fuzz/corpus/<target>/ is copied into build-fuzz/fuzz-work/<target>/corpus/, which
# keeps growing across runs (the repository's corpus stays small). Findings (crash-*, leak-*,
# timeout-*, oom-*) go to build-fuzz/fuzz-work/<target>/artifacts/, the log to .../fuzz.log.
# Prints one summary line per target and exits 1 when any target found something.
#
# Environment: FUZZ_BUILD_DIR (build-fuzz), FUZZ_JOBS (2: build parallelism), FUZZ_TIMEOUT (5 s per
# input), FUZZ_RSS_MB (2048), FUZZ_ARGS (extra libFuzzer flags), FUZZ_NO_BUILD=1 (skip the build).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECONDS_PER_TARGET=${1:-600}
shift || true
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${FUZZ_JOBS:-2}
TIMEOUT=${FUZZ_TIMEOUT:-5}
RSS_MB=${FUZZ_RSS_MB:-2048}

if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS per target] [target ...]" >&2
  exit 2
fi

# Largest input per target: a little above the biggest seed.
max_len() {
  case "$1" in
    safetensors) echo 4096 ;;
    config) echo 8192 ;;
    arch_spec) echo 16384 ;;
    tokenizer_json) echo 32768 ;;
    tokenizer_spm) echo 16384 ;;
    chat_template) echo 8192 ;;
    server_request) echo 4096 ;;
    *) echo 8192 ;;
  esac
}

ALL=()
for f in fuzz/fuzz_*.cpp; do
  n=$(basename "$f" .cpp)
  ALL+=("${n#fuzz_}")
done
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
for t in "${TARGETS[@]}"; do
  [ -f "fuzz/fuzz_$t.cpp" ] || { echo "fuzz.sh: no target '$t' (have: ${ALL[*]})" >&2; exit 2; }
done

if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DKILN_FUZZ=ON -DKILN_CUDA=OFF -DKILN_TESTS=OFF -DKILN_NATIVE=OFF >/dev/null
  fi
  cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]/#/fuzz_}"
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

found=0
for t in "${TARGETS[@]}"; do
  work="$ROOT/$BUILD/fuzz-work/$t"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp -n "fuzz/corpus/$t"/* "$work/corpus/" 2>/dev/null || true
  dict=()
  [ -f "fuzz/$t.dict" ] && dict=("-dict=fuzz/$t.dict")
  before=$(ls "$work/artifacts" | sort)
  set +e
  # shellcheck disable=SC2086
  "$BUILD/fuzz/fuzz_$t" "$work/corpus" "${dict[@]}" -max_total_time="$SECONDS_PER_TARGET" \
    -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" -timeout="$TIMEOUT" -max_len="$(max_len "$t")" \
    -artifact_prefix="$work/artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} >"$work/fuzz.log" 2>&1
  rc=$?
  set -e
  after=$(ls "$work/artifacts" | sort)
  new=$(comm -13 <(echo "$before") <(echo "$after") | grep -E '^(crash|leak|timeout|oom)-' || true)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -1)
  added=$(sed -n 's/^stat::new_units_added: *//p' "$work/fuzz.log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$work/fuzz.log" | tail -1 | cut -d' ' -f2)
  size=$(ls "$work/corpus" | wc -l)
  nfound=$(echo -n "$new" | grep -c . || true)
  line="$t: ${runs:-?} runs, ${added:-?} new units, cov ${cov:-?}, corpus $size files, $nfound findings"
  if [ "$nfound" -gt 0 ] || [ "$rc" -ne 0 ]; then
    found=1
    line+=" (exit $rc; log $work/fuzz.log)"
    for a in $new; do line+=$'\n'"  $work/artifacts/$a"; done
  fi
  echo "$line"
done
exit $found
