#!/usr/bin/env python3
"""`kiln bench offline` and `kiln bench serve` on the demo model (CPU): the JSON they print.

Counts must be exact (8 requests of 16 prompt ids and 8 generated tokens: 128 in, 64 out), the
throughputs must be those counts over the duration, and the latency statistics must agree with
the per-request lists of --save-detailed (vLLM's definitions: TPOT = (e2el - ttft) / (out - 1),
whose numerator is the sum of that request's inter-token gaps). Also: --dataset with text and
token-id prompts, --max-concurrency and --request-rate, one-line errors for bad input, and the
llama-bench style `kiln bench <model>` still parsing as before. Standard library only.

Usage: bench_serving_test.py --kiln build/kiln --model models/demo [-v]
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

ARGS = None
RANDOM = ["--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "8"]


def kiln(*args, check=True, timeout=300):
    r = subprocess.run([ARGS.kiln, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
    return r


def bench_json(*args):
    return json.loads(kiln("bench", *args, "-o", "json").stdout)


class Checks:
    def check_metrics(self, m, n, in_len, out_len, detailed=True):
        self.assertEqual(m["num_prompts"], n)
        self.assertEqual(m["completed"], n)
        self.assertEqual(m["failed"], 0)
        self.assertEqual(m["total_input_tokens"], n * in_len)
        self.assertEqual(m["total_output_tokens"], n * out_len)
        d = m["duration"]
        self.assertGreater(d, 0)
        self.assertAlmostEqual(m["request_throughput"], n / d, delta=1e-9 * n / d)
        self.assertAlmostEqual(m["output_throughput"], n * out_len / d, delta=1e-6)
        self.assertAlmostEqual(m["total_token_throughput"], n * (in_len + out_len) / d, delta=1e-6)
        for k in ("ttft", "tpot", "itl", "e2el"):
            mean, med, p90, p99 = (m[f"{s}_{k}_ms"] for s in ("mean", "median", "p90", "p99"))
            self.assertGreater(mean, 0, k)
            self.assertTrue(med <= p90 <= p99, (k, med, p90, p99))
            self.assertGreaterEqual(m[f"std_{k}_ms"], 0, k)
        self.assertGreater(m["mean_e2el_ms"], m["mean_ttft_ms"])
        self.assertLess(m["mean_e2el_ms"], d * 1000)
        if not detailed:
            return
        self.assertEqual(m["input_lens"], [in_len] * n)
        self.assertEqual(m["output_lens"], [out_len] * n)
        self.assertEqual(m["errors"], [""] * n)
        self.assertEqual(len(m["ttfts"]), n)
        # One scheduler event per token, and one chunk per event (kiln serve sends a chunk for
        # every event that carries tokens, text or not): out_len - 1 gaps each.
        self.assertEqual([len(x) for x in m["itls"]], [out_len - 1] * n)
        gaps = [g for x in m["itls"] for g in x]
        self.assertAlmostEqual(m["mean_itl_ms"], 1000 * sum(gaps) / len(gaps), delta=1e-6)
        tpots = [sum(x) / (out_len - 1) for x in m["itls"]]
        self.assertAlmostEqual(m["mean_tpot_ms"], 1000 * sum(tpots) / n, delta=1e-6)
        self.assertAlmostEqual(m["mean_ttft_ms"], 1000 * sum(m["ttfts"]) / n, delta=1e-6)
        t = sorted(m["ttfts"])
        median = (t[n // 2 - 1] + t[n // 2]) / 2 if n % 2 == 0 else t[n // 2]
        self.assertAlmostEqual(m["median_ttft_ms"], 1000 * median, delta=1e-6)

class Offline(unittest.TestCase, Checks):
    def run_offline(self, *extra):
        return bench_json("offline", ARGS.model, "--device", "cpu", "--threads", "1", *extra)

    def test_random_counts_and_metrics(self):
        m = self.run_offline(*RANDOM, "--save-detailed")
        self.assertEqual(m["backend"], "kiln-offline")
        self.check_metrics(m, 8, 16, 8)

    def test_pacing_and_range_ratio(self):
        a = self.run_offline(*RANDOM, "--seed", "7", "--max-concurrency", "2", "--save-detailed")
        self.assertEqual(a["max_concurrency"], 2)
        self.check_metrics(a, 8, 16, 8)
        b = self.run_offline("--random-input-len", "16", "--random-output-len", "8",
                             "--random-range-ratio", "0.5", "--num-prompts", "6",
                             "--request-rate", "50", "--save-detailed")
        self.assertEqual(b["request_rate"], 50)
        self.assertEqual(b["completed"], 6)
        for n in b["input_lens"]:
            self.assertTrue(8 <= n <= 24, n)
        for n in b["output_lens"]:
            self.assertTrue(4 <= n <= 12, n)
        self.assertEqual(b["total_output_tokens"], sum(b["output_lens"]))

    def test_dataset_text_and_ids(self):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write(json.dumps({"prompt": [5, 6, 7, 8], "output_len": 3}) + "\n\n")
            f.write(json.dumps({"prompt": "hello there", "output_len": 5}) + "\n")
        try:
            m = self.run_offline("--dataset", f.name, "--save-detailed")
            self.assertEqual(m["completed"], 2)
            self.assertEqual(m["output_lens"], [3, 5])
            self.assertEqual(m["input_lens"][0], 4)
            # The text went through the model's tokenizer (with <s>).
            self.assertGreaterEqual(m["input_lens"][1], 3)
        finally:
            os.unlink(f.name)

    def test_text_table(self):
        out = kiln("bench", "offline", ARGS.model, "--device", "cpu", *RANDOM).stdout
        for row in ("Successful requests:", "Benchmark duration (s):", "Total input tokens:",
                    "Total generated tokens:", "Request throughput (req/s):",
                    "Output token throughput (tok/s):", "Total Token throughput (tok/s):",
                    "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P90 E2EL (ms):"):
            self.assertIn(row, out)
        self.assertRegex(out, r"Successful requests:\s+8\s")
        self.assertRegex(out, r"Total generated tokens:\s+64\s")

    def test_bad_input_is_one_line(self):
        cases = [
            (["--num-prompts", "2"], "give either --dataset"),
            ([*RANDOM, "--request-rate", "fast"], "--request-rate"),
            (["--dataset", "/nonexistent.jsonl"], "cannot open"),
            (["--random-input-len", "250", "--random-output-len", "16", "--num-prompts", "1"],
             "max_seq_len"),
        ]
        for extra, want in cases:
            r = kiln("bench", "offline", ARGS.model, "--device", "cpu", *extra, check=False)
            self.assertEqual(r.returncode, 1, (extra, r.stderr))
            lines = r.stderr.strip().splitlines()
            self.assertTrue(lines[-1].startswith("kiln: error: "), r.stderr)
            self.assertIn(want, lines[-1])


class LlamaBenchStillParses(unittest.TestCase):
    def test_model_positional(self):
        rows = bench_json(ARGS.model, "-p", "8", "-n", "4", "-r", "1", "--device", "cpu")
        self.assertEqual([r["test"] for r in rows], ["pp8", "tg4"])
        r = kiln("bench", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("kiln: error: bench needs a model", r.stderr)


class Serve(unittest.TestCase, Checks):
    @classmethod
    def setUpClass(cls):
        cls.log = tempfile.NamedTemporaryFile(prefix="kiln-serve-", suffix=".log", delete=False)
        cls.proc = subprocess.Popen([ARGS.kiln, "serve", ARGS.model, "--device", "cpu",
                                     "--threads", "1", "--port", "0",
                                     "--served-model-name", "demo"],
                                    stdout=cls.log, stderr=cls.log)
        deadline = time.time() + 120
        cls.url = None
        while time.time() < deadline and cls.proc.poll() is None:
            with open(cls.log.name, errors="replace") as f:
                m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", f.read())
            if m:
                try:
                    with urllib.request.urlopen(m.group(1) + "/health", timeout=5) as r:
                        if r.status == 200:
                            cls.url = m.group(1)
                            return
                except OSError:
                    pass
            time.sleep(0.1)
        cls.tearDownClass()
        with open(cls.log.name, errors="replace") as f:
            raise RuntimeError("kiln serve did not become healthy:\n" + f.read())

    @classmethod
    def tearDownClass(cls):
        if cls.proc.poll() is None:
            cls.proc.send_signal(signal.SIGTERM)
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait()
        os.unlink(cls.log.name)

    def test_random_counts_and_metrics(self):
        # The vocabulary size comes from /tokenizer_info, the model name from /v1/models.
        m = bench_json("serve", "--url", self.url, *RANDOM, "--save-detailed")
        self.assertEqual(m["backend"], "kiln-serve")
        self.assertEqual(m["model_id"], "demo")
        self.check_metrics(m, 8, 16, 8)

    def test_concurrency_rate_and_endpoint_url(self):
        m = bench_json("serve", "--url", self.url + "/v1/completions", "--model", "demo",
                       "--vocab-size", "100", *RANDOM, "--max-concurrency", "3",
                       "--request-rate", "40", "--save-detailed")
        self.assertEqual(m["max_concurrency"], 3)
        self.check_metrics(m, 8, 16, 8)

    def test_dataset_text_prompt_len_from_usage(self):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.write(json.dumps({"prompt": "hello there", "output_len": 4}) + "\n")
            f.write(json.dumps({"prompt": [9, 10, 11], "output_len": 2}) + "\n")
        try:
            m = bench_json("serve", "--url", self.url, "--dataset", f.name, "--save-detailed")
            self.assertEqual(m["completed"], 2)
            self.assertEqual(m["output_lens"], [4, 2])
            self.assertGreaterEqual(m["input_lens"][0], 3)  # the server's usage.prompt_tokens
            self.assertEqual(m["input_lens"][1], 3)
        finally:
            os.unlink(f.name)

    def test_errors(self):
        r = kiln("bench", "serve", "--url", "127.0.0.1:1", *RANDOM, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("kiln: error: --url: expected", r.stderr)
        # Nothing listens on port 1: the warm-up fails in one line, no benchmark runs.
        r = kiln("bench", "serve", "--url", "http://127.0.0.1:1", "--vocab-size", "100",
                 *RANDOM, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr.strip().splitlines()[-1], r"^kiln: error: the warm-up request")
        # A request the server refuses (prompt + output beyond max_seq_len) is reported with the
        # server's message.
        r = kiln("bench", "serve", "--url", self.url, "--random-input-len", "250",
                 "--random-output-len", "16", "--num-prompts", "1", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("HTTP 400", r.stderr)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--model", required=True)
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0], *rest])


if __name__ == "__main__":
    main()
