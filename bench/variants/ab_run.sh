#!/usr/bin/env bash
# One device call to verify and measure this branch: build, the CUDA tests in $TESTS, the GEMV
# micro-benchmark and tg128 (BF16, fp8, int4-wo); then the variant patch (fp8 CUDA-core GEMV for one
# token, int4 16-warp blocks on small grids) with its op tests and tg128; with BASE=1, tg128 of the
# tree before this branch ($BASE_COMMIT), from ab.patch = git diff $BASE_COMMIT HEAD -- src, made beforehand.
# Run from the repo root: HEAD_COMMIT=<sha> [BASE=1] bench/variants/ab_run.sh (carry build-debs).
# Over two calls to a warm machine (the build stays): STAGES="build tests tg" VARIANT=0 first,
# then STAGES=gemv BASE=1.
set -u
O=$OUT
STAGES="${STAGES:-build tests gemv tg}" TESTS="${TESTS:-Dtypes/CudaOps.*:Hf/CudaParity.Fp8Engine*:Hf/CudaParity.WeightOnly*}" TESTS_TIMEOUT=${TESTS_TIMEOUT:-150} \
  TG_QUANTS="none fp8 int4-wo" REPS=2 COMMIT=$HEAD_COMMIT OUT=$O bench/quant_bench.sh >/dev/null 2>&1
[ "${VARIANT:-1}" = 1 ] && git apply bench/variants/fp8_cc_int4_w16.patch && cmake --build build-gpu -j16 --target kiln kiln_tests >/tmp/cc.log 2>&1 && {
  echo "=== cc variant" >> $O/log
  timeout 60 build-gpu/tests/kiln_tests --gtest_filter='Dtypes/CudaOps.LinearFp8*:Dtypes/CudaOps.LinearGatedAct*' 2>&1 | grep -E '^\[  (FAILED|PASSED)|Failure' -A3 | head -20 >> $O/log
  OUT=$O/cc STAGES=tg TG_QUANTS="fp8 int4-wo" REPS=2 COMMIT=$HEAD_COMMIT+cc bench/quant_bench.sh >/dev/null 2>&1
}
[ "${VARIANT:-1}" = 1 ] && git apply -R bench/variants/fp8_cc_int4_w16.patch
if [ -n "${BASE:-}" ]; then
  git apply -R ab.patch && cmake --build build-gpu -j16 --target kiln >/tmp/b2.log 2>&1 && \
    OUT=$O/base STAGES="tg" TG_QUANTS="none fp8 int4-wo" REPS=2 COMMIT=${BASE_COMMIT:-3e20d3c} bench/quant_bench.sh >/dev/null 2>&1
  git apply ab.patch
fi
