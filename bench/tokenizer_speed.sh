#!/usr/bin/env bash
# Single-thread encode throughput of kiln vs Hugging Face tokenizers (Rust, through its Python
# binding) on the same ~1 MB mixed English/code/Unicode text with the Llama 3 tokenizer.
#
# usage: bench/tokenizer_speed.sh [BUILD_DIR]
#   BUILD_DIR holds bench_tokenize_speed (default: build). HF comes from .venv
#   (python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
bench=$build/bench_tokenize_speed
py=$root/.venv/bin/python
fixtures=$root/tests/fixtures/tokenizers
[ -x "$bench" ] || { echo "error: $bench not found (cmake --build $build --target bench_tokenize_speed)" >&2; exit 1; }
[ -x "$py" ] || { echo "error: $py not found (python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/llama3"
xz -dc "$fixtures/llama3/tokenizer.json.xz" > "$tmp/llama3/tokenizer.json"
cp "$fixtures/llama3/tokenizer_config.json" "$tmp/llama3/"

kiln_out=$("$bench" "$tmp/llama3" "$fixtures/llama3.json" --dump "$tmp/text.txt" --runs 5)
hf_out=$(RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false "$py" - "$tmp/llama3/tokenizer.json" "$tmp/text.txt" <<'PY'
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8", newline="") as f:
    text = f.read()
nbytes = len(text.encode("utf-8"))
paras, b = [], 0
while b < len(text):
    e = text.find("\n\n", b)
    e = len(text) if e < 0 else e + 2
    paras.append(text[b:e])
    b = e

def best(fn, runs=5):
    t, out = 1e30, None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out

t, n = best(lambda: len(tok.encode(text, add_special_tokens=False).ids))
print(f"hf whole: {nbytes / t / 1e6:.2f} MB/s ({n} tokens, {nbytes} bytes, best of 5)")
t, n = best(lambda: sum(len(e.ids) for e in tok.encode_batch(paras, add_special_tokens=False)))
print(f"hf paragraphs: {nbytes / t / 1e6:.2f} MB/s ({n} tokens, {len(paras)} paragraphs, best of 5)")
PY
)
echo "$kiln_out"
echo "$hf_out"
rate() { echo "$1" | awk -v k="$2" '$0 ~ "^"k": " { print $3 }'; }
for mode in whole paragraphs; do
  k=$(rate "$kiln_out" "kiln $mode")
  h=$(rate "$hf_out" "hf $mode")
  awk -v k="$k" -v h="$h" -v m="$mode" 'BEGIN { printf "ratio %s: kiln/hf = %.1fx\n", m, k / h }'
done
