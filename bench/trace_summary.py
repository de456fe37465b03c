#!/usr/bin/env python3
"""Where a decode step's time goes, from bench/cupti_trace.cpp's CSV.

A step begins at each launch of the kernel named by --step-start (the token embedding). For the
steps whose kernel count is the most common one (the decode steps), each kernel's *share* of the
step is the time from the previous kernel's end to its own end: under programmatic dependent
launch a kernel starts early and waits, so its start-to-end span overlaps its predecessor, while
the ends are ordered. Shares sum to the step. Printed: the step's median span and the gap between
steps, shares summed by kernel and grid (median over steps), and the first `--positions` kernels
of a step one by one (span, share). With --layers N --period P (and --offset O: the kernels
before the first layer), also one layer's shares: the kernel at position O + P l + k of a step is
layer l's k-th, and each k gets the median over the steps and over layers 1 .. N - 2 (the first
and last layers' neighbours differ), then the shares of everything after the N layers summed
(final norm, LM head, sampling): the per-layer table of docs/perf.md.

  bench/trace_summary.py trace.csv [--positions 40] [--last 100] [--step-start embed_kernel]
                                   [--layers 32 --period 8 --offset 1]
"""
import argparse
import collections
import csv
import re
import statistics


def short(name):
    """The function's name out of an Itanium-mangled kernel name, plus a hint of its template."""
    m = re.match(r"_Z(N?)(.*)", name)
    if not m:
        return name[:40]
    s, toks = m.group(2), []
    while True:
        d = re.match(r"(\d+)", s)
        if not d:
            break
        n = int(d.group(1))
        tok = s[len(d.group(1)):len(d.group(1)) + n]
        s = s[len(d.group(1)) + n:]
        if not tok.startswith("_GLOBAL__N"):
            toks.append(tok)
        if not m.group(1):
            break
    fn = toks[-1] if toks else name[:40]
    args = re.findall(r"Li(\d+)E", s[:80])  # integer template arguments (warps, rows, ...)
    if "bfloat16" in s[:60]:
        fn += "<bf16>"
    if args:
        fn += "<" + ",".join(args) + ">"
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--positions", type=int, default=40)
    ap.add_argument("--last", type=int, default=100, help="steps from the end to summarize")
    ap.add_argument("--step-start", default="embed_kernel", help="first kernel of a step")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of the model")
    ap.add_argument("--period", type=int, default=8, help="kernels a layer launches")
    ap.add_argument("--offset", type=int, default=1, help="kernels of a step before layer 0")
    a = ap.parse_args()
    with open(a.csv) as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["start"]))
    steps, cur = {}, None
    for r in rows:
        if a.step_start in r["name"]:
            cur = len(steps)
            steps[cur] = []
        if cur is not None:
            steps[cur].append(r)
    if not steps:
        print(f"no kernel named {a.step_start} in the trace")
        return
    counts = collections.Counter(len(v) for v in steps.values())
    n, _ = counts.most_common(1)[0]
    ids = sorted(c for c, v in steps.items() if len(v) == n)[-a.last:]
    spans, gaps, shares, pos = [], [], collections.defaultdict(list), collections.defaultdict(list)
    prev_end = None
    for c in ids:
        ks = sorted(steps[c], key=lambda r: int(r["end"]))
        t0, t1 = min(int(r["start"]) for r in ks), int(ks[-1]["end"])
        spans.append((t1 - t0) / 1e3)
        if prev_end is not None and t0 > prev_end:
            gaps.append((t0 - prev_end) / 1e3)
        prev_end = t1
        per = collections.defaultdict(float)
        last = t0
        for i, r in enumerate(ks):
            e = int(r["end"])
            share = (e - last) / 1e3
            last = e
            per[short(r["name"]) + " [" + r["grid"] + "]"] += share
            pos[i].append((short(r["name"]), r["grid"], r["block"], r["regs"],
                           (e - int(r["start"])) / 1e3, share))
        for k, v in per.items():
            shares[k].append(v)
    med = statistics.median
    print(f"decode step: {n} kernels, {len(ids)} steps summarized (of {len(steps)} steps)")
    print(f"step span median {med(spans):.1f} us; gap between steps median "
          f"{med(gaps) if gaps else 0:.1f} us")
    print("| kernel | share of a step (us, median) | % |")
    print("| --- | ---: | ---: |")
    tot = med(spans)
    for k, v in sorted(shares.items(), key=lambda kv: -med(kv[1])):
        print(f"| {k} | {med(v):.1f} | {100 * med(v) / tot:.1f} |")
    print(f"| position | kernel | grid | block | regs | span us | share us |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for i in range(min(a.positions, n)):
        rows = pos[i]
        print(f"| {i} | {rows[0][0]} | {rows[0][1]} | {rows[0][2]} | {rows[0][3]} | "
              f"{med(x[4] for x in rows):.1f} | {med(x[5] for x in rows):.1f} |")
    if a.layers:
        layer_table(pos, n, a.layers, a.period, a.offset, len(ids))


def layer_table(pos, n, layers, period, offset, nsteps):
    """Median share of each kernel of a layer over the steps and layers 1 .. layers - 2, and the
    shares after the last layer summed (median over the steps)."""
    med = statistics.median
    after = offset + period * layers
    if layers < 3 or after > n:
        print(f"--layers {layers} --period {period} --offset {offset}: needs at least 3 layers "
              f"and {after} kernels a step, the steps have {n}")
        return
    print(f"| kernel of a layer (layers 1-{layers - 2}) | share (us, median) |")
    print("| --- | ---: |")
    total = 0.0
    for k in range(period):
        ps = [offset + period * l + k for l in range(1, layers - 1)]
        names = {pos[p][0][0] for p in ps}
        v = med(x[5] for p in ps for x in pos[p])
        total += v
        print(f"| {' / '.join(sorted(names))} | {v:.1f} |")
    print(f"| a layer | {total:.1f} |")
    tail = [sum(pos[p][s][5] for p in range(after, n)) for s in range(nsteps)]
    print(f"| after the {layers} layers ({n - after} kernels) | {med(tail):.1f} |")


if __name__ == "__main__":
    main()
