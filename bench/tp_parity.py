#!/usr/bin/env python3
"""Tensor- and pipeline-parallel logits parity through the CLI (issue 15's device check).

For each fixture folder (config.json, model.safetensors, reference.json, reference.safetensors),
each dtype and each mode (tp2: --tp 2, pp2: --pp 2, tp2pp2: both), `kiln logits` writes the
logits of every prompt position, once with one rank and once in the mode. Printed per fixture:
the largest per-position relative error (||got - want|| / ||want||, as the C++ parity tests) of
one rank and of the mode against the Hugging Face reference, and of the mode against one rank.
A mode fails where it is farther from the reference than the single-GPU tests allow (F32: 1e-5,
BF16: 2e-2: CudaParity's bounds; checkpoints whose activations are quantized per token, FP8:
0.14, the fp8 quality bound NMSE < 2e-2, as each rank quantizes its own slice of a row-parallel
layer's inputs with its own scale). One rank failing skips the fixture (unsupported there); a mode
refused with a one-line error naming --tp / --pp (act-order weights, say) is reported as refused.
Exit status 1 if any mode failed.

Pure Python (no numpy): safetensors F32 files are read with the struct module.

  bench/tp_parity.py --kiln build-gpu/kiln --device cuda [--dtypes f32,bf16] [--modes tp2,pp2]
                     tests/fixtures/hf/llama tests/fixtures/hf/qwen3 ...
"""
import argparse
import array
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

BOUND = {"f32": 1e-5, "bf16": 2e-2, "f16": 2e-2}
MODES = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "tp2pp2": ["--tp", "2", "--pp", "2"]}


def read_f32(path):
    """{name: (shape, array('f'))} of a safetensors file holding F32 tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {t['dtype']}, not F32")
        a, b = t["data_offsets"]
        v = array.array("f")
        v.frombytes(data[a:b])
        if sys.byteorder != "little":
            v.byteswap()
        out[name] = (t["shape"], v)
    return out


def quantized_activations(fixture):
    """Whether the checkpoint quantizes activations (compressed-tensors input_activations, or
    an fp8 quantization_config with an activation scheme)."""
    try:
        q = json.load(open(os.path.join(fixture, "config.json"))).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    groups = (q.get("config_groups") or {}).values()
    return any(g.get("input_activations") for g in groups) or bool(q.get("activation_scheme"))


def rel_err(got, want, off, vocab):
    num = den = 0.0
    for k in range(off, off + vocab):
        d = got[k] - want[k]
        num += d * d
        den += want[k] * want[k]
    return math.sqrt(num / den) if den > 0 else math.inf


def run_logits(kiln, model, dtype, device, ids, extra, out):
    cmd = [kiln, "logits", model, "--dtype", dtype, "--device", device, "--prompt-ids",
           ",".join(str(i) for i in ids), "--out", out] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return None, lines[-1] if lines else f"exit {r.returncode}"
    return read_f32(out)["logits"], None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixtures", nargs="+")
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--modes", default="tp2,pp2")
    a = ap.parse_args()
    failed = 0
    tmp = tempfile.mkdtemp(prefix="tp_parity_")
    for fx in a.fixtures:
        name = os.path.basename(os.path.normpath(fx))
        try:
            ref = json.load(open(os.path.join(fx, "reference.json")))
            want = read_f32(os.path.join(fx, "reference.safetensors"))
        except OSError:
            print(f"{name:24} skipped: no reference files")
            continue
        prompts = ref["prompts"]
        act_q = quantized_activations(fx)
        for dtype in a.dtypes.split(","):
            bound = math.sqrt(2e-2) if act_q else BOUND[dtype]
            one, skip = [], None
            for j, p in enumerate(prompts):
                lg, err = run_logits(a.kiln, fx, dtype, a.device, p, [], f"{tmp}/one_{j}.st")
                if lg is None:
                    skip = err
                    break
                one.append(lg)
            if skip:
                print(f"{name:24} {dtype:4} skipped: one rank fails: {skip}")
                continue
            vocab = one[0][0][1]
            e1 = max(rel_err(one[j][1], want[f"logits_{j}"][1], i * vocab, vocab)
                     for j, p in enumerate(prompts) for i in range(len(p)))
            for mode in a.modes.split(","):
                worst_ref = worst_one = 0.0
                refused = None
                for j, p in enumerate(prompts):
                    lg, err = run_logits(a.kiln, fx, dtype, a.device, p, MODES[mode],
                                         f"{tmp}/{mode}_{j}.st")
                    if lg is None:
                        refused = err
                        break
                    for i in range(len(p)):
                        worst_ref = max(worst_ref, rel_err(lg[1], want[f"logits_{j}"][1],
                                                           i * vocab, vocab))
                        worst_one = max(worst_one, rel_err(lg[1], one[j][1], i * vocab, vocab))
                if refused is not None:
                    named = "--tp" in refused or "--pp" in refused
                    failed += not named
                    print(f"{name:24} {dtype:4} {mode:6} {'refused' if named else 'FAILED'}: "
                          f"{refused}")
                    continue
                ok = worst_ref <= bound
                failed += not ok
                print(f"{name:24} {dtype:4} {mode:6} vs HF: one rank {e1:.2e}, {mode} "
                      f"{worst_ref:.2e} (bound {bound:.2g}) | {mode} vs one rank "
                      f"{worst_one:.2e} {'ok' if ok else 'FAILED'}", flush=True)
    print(f"tp_parity: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
