#!/usr/bin/env bash
# Builds kiln with its tests and runs them with ctest. Python reference tools (HF tokenizers,
# transformers) go into .venv from tests/requirements.txt; kiln itself never needs Python.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --deps-only

if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt .venv/requirements.txt; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/requirements.txt
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
