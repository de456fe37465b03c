#!/usr/bin/env bash
# One device call for docs/perf.md: configure + build kiln (Release, -j16), run the CUDA tests,
# measure the ceilings (D2D copy TB/s, cuBLASLt BF16 8192^3 TFLOP/s), benchmark kiln's GEMV
# against cuBLASLt, build BF16 dummy engines of Llama-3.1-8B and Qwen3-0.6B, run
# `kiln bench -p 512 -n 128` on each (plus decode with the GEMV off, with programmatic dependent
# launch off, and a per-op GPU-time profile), the HF transformers peer, and engine load time
# (disk to ready: `kiln run` of the Llama-3.1-8B engine with the page cache dropped and warm,
# next to the disk's raw read speed).
# Results in $OUT: log (everything), tests.txt, bench.md (raw outputs), summary.md (the table).
#
#   bench/gpu_bench.sh                          # everything
#   STAGES="build tests" bench/gpu_bench.sh     # subset of: build tests ceilings kernels bench peer load
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
STAGES=${STAGES:-"build tests ceilings kernels bench peer load"}
BUILD=${BUILD:-build-gpu}
ENGINES=${ENGINES:-/tmp/kiln-engines}
RAW=${RAW:-/tmp/kiln-bench-raw}  # per-stage files (the device returns at most 8 files)
REPS=${REPS:-3}
MODELS="meta-llama__Llama-3.1-8B-Instruct Qwen__Qwen3-0.6B"
rm -rf "$RAW" && mkdir -p "$RAW"
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "=== $(date +%T) $*"; }

# The device image lacks some -dev packages and reaches no registry: unpack the Debian packages
# carried in .deps/ (here: `cd .deps && apt-get download libpcre2-dev libpcre2-8-0
# libutf8proc-dev libutf8proc2 libcli11-dev libgtest-dev`) into a private prefix.
if ! pkg-config --exists libpcre2-8 libutf8proc 2>/dev/null && ls .deps/*.deb >/dev/null 2>&1; then
  D=/tmp/kiln-deps
  for f in .deps/*.deb; do dpkg -x "$f" "$D"; done
  sed -i "s|^prefix=.*|prefix=$D/usr|" "$D"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc \
    "$D"/usr/share/pkgconfig/*.pc
  export PKG_CONFIG_PATH=$D/usr/lib/x86_64-linux-gnu/pkgconfig:$D/usr/share/pkgconfig
  export CMAKE_PREFIX_PATH=$D/usr
  export LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  echo "using carried build dependencies in $D"
fi

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

if has build; then
  stamp "build"
  if ! cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKILN_TESTS=ON >"$RAW/cmake.log" 2>&1; then
    tail -n 30 "$RAW/cmake.log"
  fi
  grep -E "CUDA backend" "$RAW/cmake.log"
  if ! cmake --build "$BUILD" -j16 >"$RAW/build.log" 2>&1; then
    grep -E "error|Error" "$RAW/build.log" | head -n 40
    echo "BUILD FAILED"
    exit 1
  fi
  stamp "build done"
fi

if has tests; then
  stamp "tests"
  timeout 300 "$BUILD/tests/kiln_tests" --gtest_filter='Cuda*:*Cuda*' >"$OUT/tests.txt" 2>&1
  echo "kiln_tests exit $?"
  grep -E "^\[cuda parity|^\[  FAILED  \]|^\[  PASSED  \]|^\[  SKIPPED \]" "$OUT/tests.txt" | sort -u
  grep -E -A4 "Failure$" "$OUT/tests.txt" | head -n 60
  if [ "${HF_AGREEMENT:-1}" = 1 ]; then
    stamp "transformers BF16 on the parity fixtures (what the BF16 criteria can expect)"
    PYTHONUNBUFFERED=1 timeout 240 python3 bench/hf_bf16_agreement.py 2>&1 | grep -E "^\[hf|Error" |
      tee -a "$OUT/tests.txt"
  fi
  stamp "tests done"
fi

if has ceilings; then
  stamp "ceilings"
  nvcc -O3 -gencode=arch=compute_90a,code=sm_90a bench/ceilings.cu -lcublasLt -o "$BUILD/ceilings" &&
    timeout 120 "$BUILD/ceilings" | tee "$RAW/ceilings.txt"
fi

if has kernels; then
  stamp "GEMV vs cuBLASLt"
  timeout 120 "$BUILD/bench_gpu_kernels" | tee "$RAW/gemv.txt"
fi

if has bench; then
  for m in $MODELS; do
    stamp "engine $m"
    rm -rf "$ENGINES/$m"
    "$BUILD/kiln" build --dummy-weights --config "bench/configs/$m/config.json" --dtype bf16 \
      --max-seq-len 2048 -o "$ENGINES/$m"
    kb() { timeout 180 "$BUILD/kiln" bench "$ENGINES/$m" --device cuda -r "$REPS" "$@"; }
    stamp "kiln bench $m"
    kb -p 512 -n 128 -b 1,8,32 | tee "$RAW/bench_$m.md"
    kb -p 512 -n 128 -o json >"$RAW/bench_$m.json"
    stamp "kiln bench $m, CUDA graphs off"
    KILN_CUDA_GRAPHS=0 kb -p 0 -n 128 | tee "$RAW/bench_${m}_nographs.md"
    if [ "${ABLATIONS:-1}" = 1 ]; then
      stamp "kiln bench $m, GEMV off (cuBLASLt for decode)"
      KILN_CUDA_GEMV=0 kb -p 0 -n 128 | tee "$RAW/bench_${m}_nogemv.md"
      stamp "kiln bench $m, programmatic dependent launch off"
      KILN_CUDA_PDL=0 kb -p 0 -n 128 | tee "$RAW/bench_${m}_nopdl.md"
    fi
    stamp "kiln bench $m, tensor-core prefill attention off"
    KILN_CUDA_ATTN_TC=0 kb -p 512 -n 0 | tee "$RAW/bench_${m}_notc.md"
    if [ "${PROFILES:-1}" = 1 ]; then
      stamp "kiln bench $m, per-op GPU time (decode, graphs off)"
      KILN_CUDA_PROFILE=1 REPS=1 kb -p 0 -n 128 2>&1 | tee "$RAW/profile_tg_$m.txt"
      stamp "kiln bench $m, per-op GPU time (prefill)"
      KILN_CUDA_PROFILE=1 REPS=1 kb -p 512 -n 0 2>&1 | tee "$RAW/profile_pp_$m.txt"
    fi
    rm -rf "$ENGINES/$m"
  done
fi

if has peer; then
  for m in $MODELS; do
    stamp "HF peer $m"
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/hf_peer.py "bench/configs/$m" 512 128 "$REPS" 2>&1 |
      grep -v Warning | tee "$RAW/peer_$m.md"
  done
fi

if has load; then
  # Engine load, disk to ready: process start, CUDA init, mmap + upload of 15 GiB, prefill, one
  # token. Twice with the page cache dropped (needs root; otherwise only the weights file is
  # evicted, with dd iflag=nocache, and the libraries stay cached), then once warm. The raw read
  # speed of the weights file (one dd, then 8 in parallel) is the floor for the cold figure.
  m=meta-llama__Llama-3.1-8B-Instruct
  E="$ENGINES/load_$m"
  W="$E/weights.safetensors"
  drop() {
    sync
    if ! echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
      echo "drop_caches failed (not root?): evicting only $W (dd iflag=nocache)" | tee -a "$RAW/load.txt"
      dd if="$W" iflag=nocache count=0 status=none
    fi
  }
  # timed LABEL CMD...: wall seconds of CMD (output in load_cmd.log) appended to load.txt, with
  # the upload summary line when CMD printed one.
  timed() {
    local label=$1 t0 t1 rc
    shift
    t0=$(date +%s%N)
    "$@" >"$RAW/load_cmd.log" 2>&1
    rc=$?
    t1=$(date +%s%N)
    printf '%-36s %7.2f s%s  %s\n' "$label" "$(((t1 - t0) / 1000000))e-3" \
      "$([ $rc = 0 ] || echo " (exit $rc)")" "$(grep -h '^kiln upload' "$RAW/load_cmd.log")" |
      tee -a "$RAW/load.txt"
    [ $rc = 0 ] || tail -n 5 "$RAW/load_cmd.log"
  }
  stamp "load: engine $m"
  rm -rf "$E"
  timed "kiln build --dummy-weights" "$BUILD/kiln" build --dummy-weights \
    --config "bench/configs/$m/config.json" --dtype bf16 --max-seq-len 2048 -o "$E"
  size=$(stat -c %s "$W")
  echo "weights.safetensors: $size bytes" | tee -a "$RAW/load.txt"
  stamp "load: raw read speed of the weights file"
  drop
  timed "dd bs=64M, 1 job, cold" dd if="$W" of=/dev/null bs=64M
  drop
  per=$(((size / 67108864 + 8) / 8))
  par() {  # waits on the jobs' ids: a bare `wait` would also wait for the log's tee
    local pids=()
    for i in 0 1 2 3 4 5 6 7; do
      dd if="$W" of=/dev/null bs=64M skip=$((i * per)) count=$per status=none &
      pids+=($!)
    done
    wait "${pids[@]}"
  }
  timed "dd bs=64M, 8 parallel jobs, cold" par
  stamp "load: kiln run --prompt-ids 1,2,3 --max-tokens 1 --device cuda"
  drop
  timed "kiln --help, cold (process start)" "$BUILD/kiln" --help
  run1() {
    KILN_UPLOAD_VERBOSE=1 "$BUILD/kiln" run "$E" --prompt-ids 1,2,3 --max-tokens 1 --device cuda
  }
  for i in 1 2; do
    drop
    timed "kiln run, page cache dropped #$i" run1
  done
  timed "kiln run, warm" run1
  awk -v b="$size" '/^dd bs=64M, 1 job/ { printf "disk: %.2f GB/s (1 dd)\n", b / $(NF-1) / 1e9 }
    /^dd bs=64M, 8 parallel/ { printf "disk: %.2f GB/s (8 dd)\n", b / $(NF-1) / 1e9 }' \
    "$RAW/load.txt" | tee -a "$RAW/load.txt"
  rm -rf "$E"
fi

# Weight bytes read per generated token (BF16): every matrix once, except the input embedding
# table (one row) unless it is tied to the LM head.
stamp "summary"
python3 - "$RAW" $MODELS <<'EOF' | tee "$OUT/summary.md"
import json, re, sys, pathlib
raw = pathlib.Path(sys.argv[1])
def text(name):
    p = raw / name
    return p.read_text() if p.exists() else ""
cp = re.search(r"copy_TBps ([\d.]+)", text("ceilings.txt"))
copy = float(cp.group(1)) if cp else None
print("| model | weight GB/token | kiln tg128 t/s | GB/s | % of copy BW | kiln pp512 t/s | "
      "tg128 b8 t/s | tg128 b32 t/s | tg128 graphs off | GEMV off | PDL off | pp512 TC attn off | "
      "HF tg128 t/s | HF pp512 t/s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for m in sys.argv[2:]:
    c = json.load(open(f"bench/configs/{m}/config.json"))
    H, L, V, I = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = c.get("head_dim") or H // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    params = L * (H * (q + 2 * kv) + q * H + 3 * H * I) + V * H
    gb = 2 * params / 1e9
    def rate(name, test, batch=1):
        # kiln rows: | test | batch | t/s |; the peer's: | test | t/s |
        mm = re.search(r"\| %s\s*\|\s*%d\s*\|\s*([\d.]+)" % (test, batch), text(name)) or \
            re.search(r"\| %s\s*\|\s*([\d.]+)" % test, text(name))
        return float(mm.group(1)) if mm else None
    tg, pp = rate(f"bench_{m}.md", "tg128"), rate(f"bench_{m}.md", "pp512")
    b8, b32 = rate(f"bench_{m}.md", "tg128", 8), rate(f"bench_{m}.md", "tg128", 32)
    tgg = rate(f"bench_{m}_nographs.md", "tg128")
    tg0, tg1 = rate(f"bench_{m}_nogemv.md", "tg128"), rate(f"bench_{m}_nopdl.md", "tg128")
    pptc = rate(f"bench_{m}_notc.md", "pp512")
    ptg, ppp = rate(f"peer_{m}.md", "tg128"), rate(f"peer_{m}.md", "pp512")
    f = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"
    bw = gb * tg if tg else None
    pct = 100 * bw / (copy * 1000) if (bw and copy) else None
    print(f"| {m} | {gb:.2f} | {f(tg)} | {f(bw, 0)} | {f(pct)} | {f(pp)} | {f(b8)} | {f(b32)} | "
          f"{f(tgg)} | {f(tg0)} | {f(tg1)} | {f(pptc)} | {f(ptg)} | {f(ppp)} |")
EOF
for f in "$RAW"/*; do
  case "$f" in *.log) continue ;; esac
  echo "## $(basename "$f")" >>"$OUT/bench.md"
  cat "$f" >>"$OUT/bench.md"
  echo >>"$OUT/bench.md"
done
stamp "end"
