#!/usr/bin/env bash
# Installs kiln's build dependencies (Debian packages; idempotent), builds kiln in Release, builds
# an engine from the small checkpoint kept in the repo and generates with it.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake pkg-config git xz-utils python3 python3-venv
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
./build/kiln build models/demo -o build/demo.engine
./build/kiln run build/demo.engine --prompt "Hello from kiln" --max-tokens 24 --temperature 0
./build/kiln run build/demo.engine --prompt-ids 1,2,3,4,5 --max-tokens 16 --ignore-eos
