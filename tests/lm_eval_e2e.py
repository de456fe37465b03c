#!/usr/bin/env python3
"""End to end: EleutherAI lm-evaluation-harness against `kiln serve` on the demo model (CPU).

Starts `kiln serve` on a free loopback port, runs the real `lm_eval` CLI with
`--model local-completions` (tokenizer_backend=remote: the server's /tokenize and
/tokenizer_info, as with vLLM) on tests/lm_eval/kiln_tiny_mc.yaml, a loglikelihood
multiple-choice task over six local documents, and checks that it completes with an accuracy:
  * acc and acc_norm are reported, in [0, 1], over all six documents;
  * every choice got a finite, negative loglikelihood, and acc is what the logged
    loglikelihoods' argmax gives;
  * the first document's four loglikelihoods are those of `kiln logits` (log_softmax over the
    whole prompt, summed over the continuation's tokens as lm-eval splits them), within 1e-3.
The demo model has random weights: the accuracy's value means nothing; the pipeline does.
(The scoring request itself is checked against `kiln logits` in tests/server_test.py.)

Usage: lm_eval_e2e.py --kiln build/kiln --model models/demo
"""
import argparse
import array
import glob
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_DIR = os.path.join(HERE, "lm_eval")
N_DOCS = 6


def start_server(kiln, model, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([kiln, "serve", model, "--device", "cpu", "--threads", "1",
                             "--port", "0", "--served-model-name", "demo"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    port = None
    while time.time() < deadline and proc.poll() is None:
        with open(log_path, errors="replace") as f:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", f.read())
        if m:
            port = int(m.group(1))
            try:  # /health: 503 while loading, then 200
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return proc, port
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    with open(log_path, errors="replace") as f:
        sys.exit(f"lm_eval_e2e: kiln serve did not become healthy:\n{f.read()}")


def tokenize(args, text):
    r = subprocess.run([args.kiln, "tokenize", args.model], input=text, text=True,
                       stdout=subprocess.PIPE, check=True)
    return json.loads(r.stdout)


def reference_loglikelihood(args, tmp, context, continuation):
    """log P(continuation | context) from `kiln logits`, with lm-eval's token split: the
    context's ids, then the rest of the whole string's ids (no special tokens, as lm-eval's remote
    tokenizer asks /tokenize)."""
    ctx, whole = tokenize(args, context), tokenize(args, context + continuation)
    assert whole[:len(ctx)] == ctx, (ctx, whole)
    out = os.path.join(tmp, "logits.safetensors")
    subprocess.run([args.kiln, "logits", args.model, "--device", "cpu",
                    "--prompt-ids", ",".join(map(str, whole)), "--out", out], check=True)
    with open(out, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))["logits"]
        rows, vocab = meta["shape"]
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        flat = array.array("f")
        flat.frombytes(f.read(end - start))
    total = 0.0
    for i in range(len(ctx) - 1, len(whole) - 1):  # row i predicts token i + 1
        row = flat[i * vocab:(i + 1) * vocab]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        total += row[whole[i + 1]] - lse
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="kiln-lm-eval-")
    try:
        # The task's data_files path made absolute (lm-eval resolves it against the cwd).
        tasks = os.path.join(tmp, "tasks")
        os.makedirs(tasks)
        with open(os.path.join(TASK_DIR, "kiln_tiny_mc.yaml")) as f:
            yaml = f.read()
        data = os.path.join(TASK_DIR, "tiny_mc.jsonl")
        yaml, n = re.subn(r"test: tiny_mc\.jsonl.*", f"test: {data}", yaml)
        assert n == 1, "kiln_tiny_mc.yaml no longer names tiny_mc.jsonl"
        with open(os.path.join(tasks, "kiln_tiny_mc.yaml"), "w") as f:
            f.write(yaml)

        server, port = start_server(args.kiln, args.model, os.path.join(tmp, "serve.log"))
        try:
            env = dict(os.environ, HF_HOME=os.path.join(tmp, "hf"), HF_HUB_OFFLINE="1",
                       HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            out_dir = os.path.join(tmp, "out")
            cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
                   "--model_args",
                   f"model=demo,base_url=http://127.0.0.1:{port}/v1/completions,"
                   "tokenizer_backend=remote,num_concurrent=2,max_retries=1,timeout=120",
                   "--include_path", tasks, "--tasks", "kiln_tiny_mc",
                   "--output_path", out_dir, "--log_samples"]
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=600)
            print(r.stdout[-4000:])
            if r.returncode != 0:
                with open(os.path.join(tmp, "serve.log"), errors="replace") as f:
                    print("--- kiln serve log (tail)\n" + f.read()[-3000:])
                sys.exit(f"lm_eval_e2e: lm_eval exited with {r.returncode}")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

        results = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
        samples = glob.glob(os.path.join(out_dir, "**", "samples_kiln_tiny_mc_*.jsonl"),
                            recursive=True)
        assert len(results) == 1 and len(samples) == 1, (results, samples)
        with open(results[0]) as f:
            res = json.load(f)["results"]["kiln_tiny_mc"]
        acc, acc_norm = res["acc,none"], res["acc_norm,none"]
        assert 0.0 <= acc <= 1.0 and 0.0 <= acc_norm <= 1.0, res

        with open(samples[0]) as f:
            docs = [json.loads(line) for line in f if line.strip()]
        assert len(docs) == N_DOCS, f"{len(docs)} documents scored, expected {N_DOCS}"
        correct = 0
        for d in docs:
            lls = [float(resp[0][0]) for resp in d["resps"]]  # logged as strings
            assert len(lls) == len(d["doc"]["choices"]), d
            for ll in lls:
                assert math.isfinite(ll) and ll < 0, f"loglikelihood {ll} in {d['doc']}"
            correct += int(max(range(len(lls)), key=lambda i: lls[i]) == d["doc"]["answer"])
        assert abs(acc - correct / N_DOCS) < 1e-9, (acc, correct)

        d0 = next(d for d in docs if d["doc_id"] == 0)
        max_diff = 0.0
        for choice, resp in zip(d0["doc"]["choices"], d0["resps"]):
            got = float(resp[0][0])
            want = reference_loglikelihood(args, tmp, d0["doc"]["question"], " " + choice)
            assert abs(got - want) < 1e-3, f"{choice!r}: lm-eval {got}, kiln logits {want}"
            max_diff = max(max_diff, abs(got - want))
        print(f"lm_eval_e2e: OK: kiln_tiny_mc acc {acc:.4f} acc_norm {acc_norm:.4f} "
              f"over {N_DOCS} documents; |lm-eval - kiln logits| <= {max_diff:.2e} on doc 0")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
