#!/usr/bin/env python3
"""End-to-end test of `kiln serve` (OpenAI-compatible HTTP server) on the demo model, on the CPU.

Starts kiln serve on free loopback ports (--port 0; the bound port is read from its log) and
checks, with the official `openai` client and raw HTTP:
  * completions (string, token ids, a batch of prompts with n, echo + logprobs) and chat
    (non-streaming, streaming with the role delta, finish_reason and include_usage, logprobs),
    each against `kiln run` greedy output or against each other;
  * lm-eval's scoring request against log_softmax of `kiln logits` (within 1e-4);
  * 64 concurrent streaming clients each get what the same request gets alone;
  * a KV cache small enough to force preemption, and a prefix-cache hit, change no output;
  * a client that disconnects mid-stream has its request aborted and its blocks freed;
  * malformed JSON, an oversized body, a wrong API key, an unknown model, a too-long prompt,
    invalid parameters and a full queue get 400/413/401/404/400/400/503, and the server goes on;
  * SIGTERM lets an in-flight stream finish and exits 0.

Usage: server_test.py --kiln build/kiln [--model models/demo] [-v]
"""
import argparse
import http.client
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import openai

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = None  # set in main()
MAX_SEQ_LEN = 256  # models/demo's max_position_embeddings
NAME = "demo"      # --served-model-name of every server here


class Server:
    """One `kiln serve` process; stopped by stop() (SIGTERM, then SIGKILL after a timeout)."""

    def __init__(self, *extra, api_key=None, model=None, wait_healthy=True):
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-serve-", suffix=".log", delete=False)
        cmd = [ARGS.kiln, "serve", model or ARGS.model, "--device", "cpu", "--threads", "1", "--port", "0",
               "--served-model-name", NAME, *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        self.api_key = api_key
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        self.log.close()  # the child has its own descriptor; read_log() reopens by name
        self.port = None
        deadline = time.time() + 60
        while time.time() < deadline:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.read_log())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if self.port is None:
            self.kill()
            raise RuntimeError("kiln serve did not start:\n" + self.read_log())
        if wait_healthy:
            self.wait_healthy(deadline)

    def wait_healthy(self, deadline):
        while time.time() < deadline:  # /health: 503 while loading, then 200
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("kiln serve never became healthy:\n" + self.read_log())

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def headers(self, key=None):
        h = {"Content-Type": "application/json"}
        key = key if key is not None else self.api_key
        if key:
            h["Authorization"] = "Bearer " + key
        return h

    def request(self, method, path, body=None, headers=None, timeout=60):
        """Raw HTTP; returns (status, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            conn.request(method, path, body=data, headers=headers or self.headers())
            r = conn.getresponse()
            raw = r.read().decode()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw
        finally:
            conn.close()

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, path, body, timeout=120):
        """Streams an SSE response; returns the list of JSON events (ending before [DONE])."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(dict(body, stream=True)),
                         headers=self.headers())
            r = conn.getresponse()
            if r.status != 200:
                raise AssertionError(f"stream: HTTP {r.status}: {r.read()!r}")
            events, done = [], False
            for line in r:
                line = line.decode().rstrip("\n")
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                events.append(json.loads(line[6:]))
            if not done:
                raise AssertionError("stream ended without data: [DONE]")
            return events
        finally:
            conn.close()

    def client(self, key=None):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                             api_key=key or self.api_key or "unused", max_retries=0, timeout=120)

    def metrics(self):
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")
            out[name] = float(value)
        return out

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        """Ends the process (if still running) and removes its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


def kiln(*args):
    r = subprocess.run([ARGS.kiln, *args], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)}: {r.stderr}")
    return r.stdout


def kiln_run(ids, max_tokens):
    """Greedy continuation ids from `kiln run` (the single-sequence reference path)."""
    out = kiln("run", ARGS.model, "--device", "cpu", "--threads", "1", "--prompt-ids",
               ",".join(map(str, ids)), "--max-tokens", str(max_tokens), "--ignore-eos",
               "--temperature", "0")
    return [int(x) for x in out.strip().split(",") if x]


def read_safetensors_f32(path, name):
    """(shape, flat list of floats) of one F32 tensor, parsed by hand."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        t = header[name]
        assert t["dtype"] == "F32", t
        begin, end = t["data_offsets"]
        f.seek(base + begin)
        data = f.read(end - begin)
    return t["shape"], list(struct.unpack(f"<{len(data) // 4}f", data))


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def prompt_ids(seed, length):
    """Deterministic pseudo-random token ids in [5, 500) (avoids the demo's special ids)."""
    x, ids = seed * 2654435761 % 2**32, []
    for _ in range(length):
        x = (1103515245 * x + 12345) % 2**31
        ids.append(5 + x % 495)
    return ids


A = None  # the main server: a KV cache that never preempts


def setUpModule():
    global A
    A = Server("--kv-cache-tokens", "32768", "--max-num-seqs", "64")


def tearDownModule():
    if A is not None:
        A.kill()


class Completions(unittest.TestCase):
    def test_models(self):
        models = A.client().models.list().data
        self.assertEqual([m.id for m in models], [NAME])

    def test_ids_prompt_matches_kiln_run(self):
        ids = prompt_ids(1, 12)
        ref = kiln_run(ids, 10)
        r = A.client().completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True,
                                                      "skip_special_tokens": False})
        _, want = A.post("/detokenize", {"tokens": ref})
        self.assertEqual(r.choices[0].text, want["prompt"])
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.prompt_tokens, 12)
        self.assertEqual(r.usage.completion_tokens, 10)

    def test_string_prompt_is_tokenized_like_tokenize(self):
        text = "Hello world, this is kiln."
        _, tk = A.post("/tokenize", {"prompt": text})
        self.assertEqual(tk["count"], len(tk["tokens"]))
        _, back = A.post("/detokenize", {"tokens": tk["tokens"]})
        self.assertIn(text, back["prompt"])  # maybe with a leading <s>
        c = A.client()
        by_text = c.completions.create(model=NAME, prompt=text, max_tokens=8, temperature=0)
        by_ids = c.completions.create(model=NAME, prompt=tk["tokens"], max_tokens=8,
                                      temperature=0)
        self.assertEqual(by_text.usage.prompt_tokens, tk["count"])
        self.assertEqual(by_text.choices[0].text, by_ids.choices[0].text)

    def test_batch_of_prompts_with_n(self):
        c = A.client()
        prompts = ["The quick brown fox", "Once upon a time"]
        singles = [c.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
                   for p in prompts]
        r = c.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True})
        self.assertEqual(sorted(ch.index for ch in r.choices), [0, 1, 2, 3])
        for ch in r.choices:
            self.assertEqual(ch.text, singles[ch.index // 2], ch.index)
        self.assertEqual(r.usage.completion_tokens, 4 * 6)

    def test_echo_logprobs(self):
        ids = prompt_ids(2, 9)
        r = A.client().completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0,
                                          echo=True, logprobs=2,
                                          extra_body={"ignore_eos": True})
        ch = r.choices[0]
        _, ptext = A.post("/detokenize", {"tokens": ids})
        self.assertTrue(ch.text.startswith(ptext["prompt"]))
        lp = ch.logprobs
        self.assertEqual(len(lp.tokens), 9 + 3)
        self.assertIsNone(lp.token_logprobs[0])
        self.assertIsNone(lp.top_logprobs[0])
        for i in range(1, 12):
            self.assertLessEqual(lp.token_logprobs[i], 0.0)
            self.assertGreaterEqual(len(lp.top_logprobs[i]), 1)
            self.assertLessEqual(len(lp.top_logprobs[i]), 2)
            # Greedy: each generated token is the most likely one.
            if i >= 9:
                self.assertAlmostEqual(lp.token_logprobs[i], max(lp.top_logprobs[i].values()),
                                       places=5)
        self.assertEqual(lp.text_offset, sorted(lp.text_offset))

    def test_scoring_matches_kiln_logits(self):
        ids = prompt_ids(3, 20)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "x.safetensors")
            kiln("logits", ARGS.model, "--device", "cpu", "--threads", "1", "--prompt-ids",
                 ",".join(map(str, ids)), "--out", out)
            shape, flat = read_safetensors_f32(out, "logits")
        self.assertEqual(shape[0], len(ids))
        V = shape[1]
        want = [log_softmax(flat[i * V:(i + 1) * V])[ids[i + 1]] for i in range(len(ids) - 1)]
        for max_tokens in (1, 0):
            # lm-eval's loglikelihood request, exactly.
            status, r = A.post("/v1/completions",
                               {"model": NAME, "prompt": [ids], "max_tokens": max_tokens,
                                "logprobs": 1, "echo": True, "temperature": 0})
            self.assertEqual(status, 200, r)
            lp = r["choices"][0]["logprobs"]
            self.assertIsNone(lp["token_logprobs"][0])
            got = lp["token_logprobs"][1:len(ids)]
            self.assertEqual(len(got), len(want))
            for i, (g, w) in enumerate(zip(got, want)):
                self.assertLess(abs(g - w), 1e-4, f"max_tokens {max_tokens} position {i + 1}")
            self.assertEqual(len(lp["tokens"]), len(ids) + max_tokens)

    def test_stream_completion_matches_non_stream(self):
        body = {"model": NAME, "prompt": "Streaming test", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}
        _, whole = A.post("/v1/completions", body)
        events = A.stream("/v1/completions", dict(body, stream_options={"include_usage": True}))
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        self.assertEqual(text, whole["choices"][0]["text"])
        finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        self.assertEqual(finishes[-1], "length")
        self.assertEqual(events[-1]["choices"], [])
        self.assertEqual(events[-1]["usage"]["completion_tokens"], 12)


class Chat(unittest.TestCase):
    MESSAGES = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say something."}]

    def test_chat_matches_template_and_completion(self):
        r = A.client().chat.completions.create(model=NAME, messages=self.MESSAGES, max_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
        msg = r.choices[0].message
        self.assertEqual(msg.role, "assistant")
        # The same prompt through /tokenize (template, no special tokens added) and completions.
        _, tk = A.post("/tokenize", {"messages": self.MESSAGES})
        _, c = A.post("/v1/completions", {"model": NAME, "prompt": tk["tokens"], "max_tokens": 8,
                                          "temperature": 0, "ignore_eos": True})
        self.assertEqual(msg.content, c["choices"][0]["text"])
        self.assertEqual(r.usage.prompt_tokens, tk["count"])
        self.assertEqual(r.choices[0].finish_reason, "length")

    def test_chat_stream(self):
        c = A.client()
        whole = c.chat.completions.create(model=NAME, messages=self.MESSAGES, temperature=0,
                                          max_completion_tokens=10,
                                          extra_body={"ignore_eos": True})
        chunks = list(c.chat.completions.create(
            model=NAME, messages=self.MESSAGES, temperature=0, max_completion_tokens=10,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        self.assertEqual(content, whole.choices[0].message.content)
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        self.assertEqual([f for f in finishes if f], ["length"])
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 10)
        self.assertEqual(chunks[-1].usage.prompt_tokens, whole.usage.prompt_tokens)

    def test_chat_logprobs(self):
        r = A.client().chat.completions.create(model=NAME, messages=self.MESSAGES, max_tokens=5,
                                               temperature=0, logprobs=True, top_logprobs=3,
                                               extra_body={"ignore_eos": True})
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), 5)
        for e in content:
            self.assertEqual(len(e.top_logprobs), 3)
            tops = [t.logprob for t in e.top_logprobs]
            self.assertEqual(tops, sorted(tops, reverse=True))
            self.assertAlmostEqual(e.logprob, tops[0], places=5)  # greedy
            self.assertEqual(bytes(e.bytes).decode(errors="replace"), e.token)


class Endpoints(unittest.TestCase):
    def test_tokenizer_info_and_metrics(self):
        status, info = A.request("GET", "/tokenizer_info")
        self.assertEqual(status, 200)
        self.assertIn("im_start", info["chat_template"])
        self.assertEqual(info["eos_token"], "<|im_end|>")
        m = A.metrics()
        for name in ["kiln:num_requests_running", "kiln:num_requests_waiting",
                     "kiln:kv_cache_usage_perc", "kiln:prefix_cache_queries_total",
                     "kiln:prefix_cache_hits_total", "kiln:prompt_tokens_total",
                     "kiln:generation_tokens_total", "kiln:time_to_first_token_seconds_count",
                     "kiln:inter_token_latency_seconds_count",
                     "kiln:e2e_request_latency_seconds_count"]:
            self.assertIn(name, m)

    def test_prefix_cache_hit_gives_identical_output(self):
        body = {"model": NAME, "prompt": prompt_ids(4, 100), "max_tokens": 16, "temperature": 0,
                "ignore_eos": True}
        _, first = A.post("/v1/completions", body)
        before = A.metrics()
        _, second = A.post("/v1/completions", body)
        after = A.metrics()
        self.assertEqual(first["choices"][0]["text"], second["choices"][0]["text"])
        # 100 prompt tokens: 6 full 16-token blocks can be shared.
        self.assertGreaterEqual(after["kiln:prefix_cache_hits_total"] -
                                before["kiln:prefix_cache_hits_total"], 96)
        self.assertGreaterEqual(second["usage"]["prompt_tokens_details"]["cached_tokens"], 96)

    def test_64_concurrent_streams_match_alone(self):
        bodies = [{"model": NAME, "prompt": prompt_ids(100 + i, 5 + (7 * i) % 40),
                   "max_tokens": 8 + i % 9, "temperature": 0, "ignore_eos": True}
                  for i in range(64)]
        alone = []
        for b in bodies:
            status, r = A.post("/v1/completions", b)
            self.assertEqual(status, 200, r)
            alone.append(r["choices"][0]["text"])
        results, errors = [None] * 64, []

        def worker(i):
            try:
                ev = A.stream("/v1/completions", bodies[i])
                results[i] = "".join(e["choices"][0]["text"] for e in ev if e["choices"])
            except Exception as e:  # reported below
                errors.append(f"{i}: {e!r}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertEqual(errors, [])
        for i in range(64):
            self.assertEqual(results[i], alone[i], f"client {i}")

    def test_disconnect_mid_stream_frees_blocks(self):
        before = A.metrics()
        conn = http.client.HTTPConnection("127.0.0.1", A.port, timeout=30)
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"model": NAME, "prompt": prompt_ids(5, 8),
                                      "max_tokens": MAX_SEQ_LEN - 8, "temperature": 0,
                                      "ignore_eos": True, "stream": True}),
                     headers=A.headers())
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        for line in r:  # read until the first token arrives, then hang up
            if line.startswith(b"data: {"):
                break
        r.close()
        conn.close()
        deadline, m = time.time() + 20, None
        while time.time() < deadline:
            m = A.metrics()
            if (m["kiln:num_requests_running"] == 0 and m["kiln:kv_cache_usage_perc"] == 0 and
                    m['kiln:request_success_total{finished_reason="abort"}'] >
                    before['kiln:request_success_total{finished_reason="abort"}']):
                break
            time.sleep(0.05)
        self.assertEqual(m["kiln:num_requests_running"], 0)
        self.assertEqual(m["kiln:kv_cache_usage_perc"], 0)
        # Aborted, not run to its end: fewer tokens generated than asked for.
        self.assertGreater(m['kiln:request_success_total{finished_reason="abort"}'],
                           before['kiln:request_success_total{finished_reason="abort"}'])
        self.assertLess(m["kiln:generation_tokens_total"] - before["kiln:generation_tokens_total"],
                        MAX_SEQ_LEN - 8)


class Preemption(unittest.TestCase):
    def test_small_kv_cache_gives_identical_outputs(self):
        # 320 tokens (20 blocks): one full sequence fits, 12 concurrent ones of ~120 do not.
        small = Server("--kv-cache-tokens", "320", "--max-num-seqs", "12")
        try:
            bodies = [{"model": NAME, "prompt": prompt_ids(200 + i, 30 + i), "max_tokens": 90,
                       "temperature": 0, "ignore_eos": True} for i in range(12)]
            want = [A.post("/v1/completions", b)[1]["choices"][0]["text"] for b in bodies]
            got, errors = [None] * 12, []

            def worker(i):
                try:
                    status, r = small.post("/v1/completions", bodies[i])
                    assert status == 200, r
                    got[i] = r["choices"][0]["text"]
                except Exception as e:  # reported below
                    errors.append(f"{i}: {e!r}")

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=150)
            self.assertEqual(errors, [])
            self.assertEqual(got, want)
            self.assertGreater(small.metrics()["kiln:num_preemptions_total"], 0)
            self.assertEqual(small.stop(), 0)
        finally:
            small.kill()

    def test_preempted_request_with_prompt_logprobs(self):
        # A request with prompt logprobs (echo + logprobs) preempted after its first token was
        # recomputed with its prompt scored again, into the prompt logprobs already handed out:
        # SIGSEGV (found by scripts/soak.py). The newest running sequence is the one preempted:
        # `other` runs, then `scored` joins, and 20 blocks cannot hold both to their end
        # (16 + 10 blocks), so `scored` is preempted and recomputed once `other` is done.
        small = Server("--kv-cache-tokens", "320")
        try:
            other = {"model": NAME, "prompt": prompt_ids(300, 30), "max_tokens": 220,
                     "temperature": 0, "ignore_eos": True, "stream": True}
            scored = {"model": NAME, "prompt": prompt_ids(301, 10), "max_tokens": 150,
                      "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 1}
            status, want = A.post("/v1/completions", scored)
            self.assertEqual(status, 200, want)
            conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=120)
            conn.request("POST", "/v1/completions", body=json.dumps(other),
                         headers=small.headers())
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            lines = iter(r)
            for line in lines:  # its first token is out: it runs
                if line.startswith(b"data: {"):
                    break
            status, got = small.post("/v1/completions", scored)
            self.assertEqual(status, 200, got)
            rest = [line.decode().strip() for line in lines]
            conn.close()
            self.assertEqual([x for x in rest if x.startswith("data: ")][-1], "data: [DONE]")
            self.assertGreater(small.metrics()["kiln:num_preemptions_total"], 0)
            g, w = got["choices"][0], want["choices"][0]
            self.assertEqual(g["text"], w["text"])
            self.assertEqual(g["logprobs"]["tokens"], w["logprobs"]["tokens"])
            lps = g["logprobs"]["token_logprobs"]
            self.assertEqual(len(lps), 10 + 150)
            self.assertIsNone(lps[0])
            for x, y in zip(lps[1:], w["logprobs"]["token_logprobs"][1:]):
                self.assertAlmostEqual(x, y, delta=1e-4)
            self.assertEqual(small.stop(), 0)
        finally:
            small.kill()


class Errors(unittest.TestCase):
    KEY = "sekrit"

    @classmethod
    def setUpClass(cls):
        cls.s = Server("--max-request-bytes", "20000", "--max-queue", "1", "--max-num-seqs", "1",
                       api_key=cls.KEY)

    @classmethod
    def tearDownClass(cls):
        cls.s.kill()

    def assert_error(self, status, r, want_status):
        self.assertEqual(status, want_status, r)
        self.assertIsInstance(r, dict, r)
        self.assertIsInstance(r["error"]["message"], str)
        self.assertIn("type", r["error"])
        self.assert_still_serving()

    def assert_still_serving(self):
        status, r = self.s.post("/v1/completions", {"model": NAME, "prompt": "ok",
                                                    "max_tokens": 2})
        self.assertEqual(status, 200, r)

    def test_malformed_json(self):
        self.assert_error(*self.s.post("/v1/completions", b'{"prompt": "x",'), 400)
        self.assert_error(*self.s.post("/v1/chat/completions", b"[1, 2]"), 400)
        # Nested past 128 levels (within the size limit): refused, not recursed into.
        deep = b'{"model": "demo", "prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        status, r = self.s.post("/v1/completions", deep)
        self.assert_error(status, r, 400)
        self.assertIn("nested deeper than 128", r["error"]["message"])

    def test_oversized_body(self):
        body = json.dumps({"model": NAME, "prompt": "x" * 30000})
        self.assert_error(*self.s.post("/v1/completions", body), 413)

    def test_api_key(self):
        body = {"model": NAME, "prompt": "x", "max_tokens": 2}
        self.assert_error(*self.s.post("/v1/completions", body,
                                       headers={"Content-Type": "application/json"}), 401)
        self.assert_error(*self.s.post("/v1/completions", body, headers=self.s.headers("wrong")),
                          401)
        with self.assertRaises(openai.AuthenticationError):
            self.s.client("wrong").completions.create(model=NAME, prompt="x", max_tokens=2)
        self.assertEqual(self.s.request("GET", "/health", headers={})[0], 200)

    def test_unknown_model(self):
        with self.assertRaises(openai.NotFoundError):
            self.s.client().completions.create(model="nope", prompt="x", max_tokens=2)
        self.assert_error(*self.s.post("/v1/chat/completions",
                                       {"model": "nope", "messages": [{"role": "user",
                                                                       "content": "hi"}]}), 404)

    def test_too_long_prompt(self):
        status, r = self.s.post("/v1/completions", {"model": NAME, "prompt": prompt_ids(6, 300),
                                                    "max_tokens": 4})
        self.assert_error(status, r, 400)
        self.assertIn(str(MAX_SEQ_LEN), r["error"]["message"])
        status, r = self.s.post("/v1/completions", {"model": NAME, "prompt": prompt_ids(6, 200),
                                                    "max_tokens": 100})
        self.assert_error(status, r, 400)
        self.assertIn(str(MAX_SEQ_LEN), r["error"]["message"])

    def test_invalid_params(self):
        for bad in [{"temperature": -1}, {"top_p": 0}, {"n": 0}, {"logit_bias": {"x": 1}},
                    {"max_tokens": "ten"}, {"stop": 3}, {"prompt": []},
                    {"prompt": [1, 2, 100000]}, {"stream_options": {"include_usage": True}}]:
            body = dict({"model": NAME, "prompt": "x", "max_tokens": 2}, **bad)
            status, r = self.s.post("/v1/completions", body)
            self.assertEqual(status, 400, (bad, r))
            self.assertIn("message", r["error"])
        self.assert_still_serving()

    def test_non_text_content_parts(self):
        # A part whose "type" is not a string (found by fuzz/fuzz_server_request.cpp) is refused
        # like an image part, not with a JSON library type error.
        for part in [{"type": 1, "text": "x"}, {"type": "image_url"}, {"text": "x"}]:
            status, r = self.s.post("/v1/chat/completions",
                                    {"model": NAME, "messages": [{"role": "user",
                                                                  "content": [part]}]})
            self.assert_error(status, r, 400)
            self.assertIn("only text content parts are supported", r["error"]["message"])

    def test_unhonoured_requests_are_refused(self):
        # Structured output and forced tool calls need guided decoding, which kiln lacks: a 400
        # naming the field, not an unconstrained answer.
        chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        tool = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
        for bad, param in [({"response_format": {"type": "json_schema", "json_schema": {}}},
                            "response_format"),
                           ({"response_format": {"type": "json_object"}}, "response_format"),
                           ({"response_format": "json"}, "response_format"),
                           ({"guided_json": {"type": "object"}}, "guided_json"),
                           ({"tools": 5}, "tools"), ({"tools": [{"type": "x"}]}, "tools"),
                           ({"tools": [tool], "tool_choice": "required"}, "tool_choice")]:
            status, r = self.s.post("/v1/chat/completions", dict(chat, **bad))
            self.assert_error(status, r, 400)
            self.assertEqual(r["error"]["param"], param, (bad, r))
        for ok in [{"response_format": {"type": "text"}}, {"tools": [tool]},
                   {"tools": [tool], "tool_choice": "auto"}]:
            status, r = self.s.post("/v1/chat/completions", dict(chat, **ok))
            self.assertEqual(status, 200, (ok, r))

    def test_unknown_route(self):
        self.assert_error(*self.s.request("GET", "/v1/nothing"), 404)

    def test_full_queue_503(self):
        # One sequence runs and one waits; the rest of a burst must be refused with 503.
        body = {"model": NAME, "prompt": prompt_ids(7, 10), "max_tokens": 200,
                "temperature": 0, "ignore_eos": True}
        statuses, lock = [], threading.Lock()
        before = self.s.metrics()

        def worker():
            status, r = self.s.post("/v1/completions", body)
            with lock:
                statuses.append((status, r))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        codes = sorted(s for s, _ in statuses)
        self.assertEqual(len(codes), 8)
        self.assertIn(200, codes)
        self.assertIn(503, codes)
        self.assertEqual(set(codes), {200, 503})
        for s, r in statuses:
            if s == 503:
                self.assertIn("message", r["error"])
        # A refused request never ran: it is no aborted completion (each used to count as one,
        # found by scripts/soak.py); the accepted ones finished by length.
        after = self.s.metrics()
        done = {reason: after[f'kiln:request_success_total{{finished_reason="{reason}"}}'] -
                before[f'kiln:request_success_total{{finished_reason="{reason}"}}']
                for reason in ("stop", "length", "abort")}
        self.assertEqual(done, {"stop": 0, "length": codes.count(200), "abort": 0})
        self.assert_still_serving()


class Loading(unittest.TestCase):
    def test_listens_with_503_before_the_engine_is_loaded(self):
        # config.json is a FIFO: loading blocks on it until the test writes it, so the window
        # between "listening" and "loaded" is held open deterministically.
        with tempfile.TemporaryDirectory() as d:
            for f in os.listdir(ARGS.model):
                if f != "config.json":
                    os.symlink(os.path.abspath(os.path.join(ARGS.model, f)), os.path.join(d, f))
            fifo = os.path.join(d, "config.json")
            os.mkfifo(fifo)
            s = Server(model=d, wait_healthy=False)
            try:
                status, r = s.request("GET", "/health")
                self.assertEqual(status, 503, r)
                self.assertIn("loading", r["error"]["message"])
                status, r = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
                self.assertEqual(status, 503, r)
                with open(os.path.join(ARGS.model, "config.json"), "rb") as src:
                    config = src.read()
                deadline = time.time() + 30
                while True:  # non-blocking open fails (ENXIO) until the loader opens its end
                    try:
                        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                        break
                    except OSError:
                        self.assertLess(time.time(), deadline, "the server never read config.json")
                        time.sleep(0.05)
                try:
                    os.set_blocking(fd, True)
                    os.write(fd, config)
                finally:
                    os.close(fd)
                s.wait_healthy(time.time() + 60)
                status, r = s.post("/v1/completions", {"model": NAME, "prompt": "x",
                                                       "max_tokens": 2})
                self.assertEqual(status, 200, r)
                self.assertEqual(s.stop(), 0)
            finally:
                s.kill()


class NoTokenizer(unittest.TestCase):
    def test_streams_a_chunk_per_token_without_tokenizer_files(self):
        # A dummy-weight engine has no tokenizer: token-id prompts, empty texts, and still one
        # chunk per token (as vLLM streams), which is how `kiln bench serve` times tokens.
        with tempfile.TemporaryDirectory() as d:
            for f in os.listdir(ARGS.model):
                if not f.startswith("tokenizer"):
                    os.symlink(os.path.abspath(os.path.join(ARGS.model, f)), os.path.join(d, f))
            s = Server(model=d)
            try:
                status, r = s.request("GET", "/tokenizer_info")
                self.assertEqual(status, 404, r)
                events = s.stream("/v1/completions",
                                  {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 6,
                                   "temperature": 0, "ignore_eos": True})
                chunks = [e for e in events if e["choices"]]
                self.assertEqual(len(chunks), 6, events)
                self.assertEqual([c["choices"][0]["text"] for c in chunks], [""] * 6)
                self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
                status, r = s.post("/v1/completions", {"model": NAME, "prompt": "text",
                                                       "max_tokens": 2})
                self.assertEqual(status, 400, r)
                self.assertEqual(s.stop(), 0)
            finally:
                s.kill()


class Shutdown(unittest.TestCase):
    def test_sigterm_drains_and_exits_0(self):
        s = Server()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.request("POST", "/v1/completions",
                         body=json.dumps({"model": NAME, "prompt": prompt_ids(8, 10),
                                          "max_tokens": 120, "temperature": 0,
                                          "ignore_eos": True, "stream": True,
                                          "stream_options": {"include_usage": True}}),
                         headers=s.headers())
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            lines = iter(r)
            for line in lines:  # the first token is out: the request is running
                if line.startswith(b"data: {"):
                    break
            s.proc.send_signal(signal.SIGTERM)
            rest = [line.decode().strip() for line in lines]
            data = [x for x in rest if x.startswith("data: ")]
            self.assertEqual(data[-1], "data: [DONE]")
            usage = json.loads(data[-2][6:])["usage"]
            self.assertEqual(usage["completion_tokens"], 120)  # it ran to its end
            self.assertEqual(s.proc.wait(timeout=60), 0, s.read_log())
            conn.close()
        finally:
            s.kill()


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--kiln", required=True)
    p.add_argument("--model", default=os.path.join(HERE, "..", "models", "demo"))
    p.add_argument("-v", action="store_true")
    args, rest = p.parse_known_args()
    ARGS = args
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2 if args.v else 1)


if __name__ == "__main__":
    main()
