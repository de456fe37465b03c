#!/usr/bin/env python3
"""Bounded-time soak test of `kiln serve` on loopback (hardening issue 10).

Starts `kiln serve` itself on a free loopback port, on the CPU, with a KV cache small enough that
sequences get preempted and a waiting queue short enough that bursts get 503, then runs
--clients concurrent workers for --duration seconds. Each worker loops over a random mix of
cases (see CASES below):

  completion, completion_stream, chat, chat_stream  valid requests: string / token-id / batched
      prompts, max_tokens 1..64, sometimes n > 1, logprobs, echo, stop strings, seeds, penalties;
      200 (or 503 "queue is full"), and the body is checked (choices, finish reasons, usage,
      stop strings, SSE framing up to `data: [DONE]`)
  seed_repeat      the same seeded sampling request twice: both answers must be identical
  cancel           a stream closed after a few SSE chunks (or right after sending), or a
                   non-streaming request abandoned before its answer
  malformed_json, wrong_type, invalid_value   400
  oversized        a body over --max-request-bytes (Content-Length or chunked): 413
  too_long         a prompt (or prompt + max_tokens) beyond the context: 400
  unknown_model    404;  bad_key  401 (--api-key is always set);  unknown_route  404
  info             /v1/models, /tokenize, /detokenize, /tokenizer_info, /metrics, /health: 200
  keepalive        several requests on one kept-alive connection: 200 each

Every response's status must be one the case expects; a timeout or a connection error the case
did not cause itself is a failure (the first ones are recorded with details). A client that gets
503 backs off 0.2-1 s before its next case.

Meanwhile the server's RSS (/proc/<pid>/status VmRSS), threads and open descriptors are sampled
every --sample-interval seconds. After the warm-up (the first 20% of the run) RSS must be flat:
the growth over the rest of the run, read off a least-squares line through the samples, must not
exceed 5% of the RSS at the end of the warm-up plus 10 MiB. (With the demo model the process
starts at ~190 MB, nearly all of it mapped code and libraries, and reaches ~400 MB once each of
its 256 HTTP threads has tokenized a prompt: a 512 KiB BPE cache per thread, see docs/soak.md.
The default 10-minute run makes ~150 000 requests after the warm-up on 2 cores, so a leak of
200 bytes a request, or 4 MB a minute, exceeds the bound of ~30 MB, while a slow allocator drift
of ~2 MB a minute stays within it.)

At the end the workers stop taking new cases and finish what they are doing; then the script
checks that /metrics shows 0 running, 0 waiting and 0 KV-cache usage, that /health is 200 and a
completion still works, that the finished-completion counters match what the clients got, that
no descriptors leaked, and that SIGTERM makes the server exit 0 within --exit-timeout seconds.
It prints a summary and exits 1 on any failure; --json FILE also writes the summary as JSON.

Usage (from the repository root; the demo engine is built with
`build/kiln build models/demo -o /tmp/soak-demo.engine`):

  .venv/bin/python scripts/soak.py --kiln build/kiln --model /tmp/soak-demo.engine \\
      [--duration 600] [--clients 128] [--json soak.json]

--cases completion,cancel,... restricts the mix (to chase a problem); --no-prompt-logprobs
leaves out echo + logprobs, which crashes kiln builds from before the scheduler fix described in
docs/soak.md. The figures of a 10-minute run are in docs/soak.md.

Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

NAME = "soak"        # --served-model-name
API_KEY = "soak-key"  # --api-key
REQUEST_TIMEOUT = 120  # seconds for any one request; a server that takes longer is hung
MAX_FAILURES_KEPT = 25

WORDS = ("the quick brown fox jumps over a lazy dog while kiln serves tokens on two cores "
         "héllo naïve café 中文 字 🙂 🚀 über straße json config engine cache block").split()


# ---------------------------------------------------------------------------------------------
# The server process


class Server:
    def __init__(self, args):
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-soak-", suffix=".log", delete=False)
        self.cmd = [args.kiln, "serve", args.model, "--device", "cpu", "--port", "0",
                    "--served-model-name", NAME, "--api-key", API_KEY,
                    "--kv-cache-tokens", str(args.kv_cache_tokens),
                    "--max-num-seqs", str(args.max_num_seqs),
                    "--max-queue", str(args.max_queue),
                    "--max-request-bytes", str(args.max_request_bytes)]
        if args.threads:
            self.cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.server_env))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log, env=env)
        self.log.close()
        self.port = None
        deadline = time.time() + 60
        while time.time() < deadline and self.port is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.read_log())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        while self.port and time.time() < deadline:
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("kiln serve did not become healthy:\n" + self.read_log())

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def proc_status(self):
        """(RSS in KiB, threads, open descriptors) of the server, or None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
            return int(st["VmRSS"].split()[0]), int(st["Threads"]), fds
        except (OSError, KeyError, ValueError):
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# HTTP


def headers(key=API_KEY, extra=None):
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = "Bearer " + key
    h.update(extra or {})
    return h


def request(port, method, path, body=None, hdrs=None, timeout=REQUEST_TIMEOUT, conn=None):
    """One request (on `conn` if given, else a fresh connection); returns (status, raw body)."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=hdrs if hdrs is not None else headers())
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        if own:
            conn.close()


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")
        out[name] = float(value)
    return out


class CaseError(Exception):
    """The response broke the case's expectations (a failure with details)."""


# ---------------------------------------------------------------------------------------------
# Shared state: counts and failures


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_case = defaultdict(Counter)  # case -> status -> count
        self.failures = []
        self.failure_count = 0
        self.completion_tokens = 0     # from the responses' usage
        self.completions_min = 0       # completions the server surely accepted (saw 200)
        self.completions_unknown = 0   # completions whose acceptance the client never saw
        self.seed_repeats = Counter()  # same / skipped

    def count(self, case, status):
        with self.lock:
            self.by_case[case][str(status)] += 1

    def fail(self, case, what, detail):
        with self.lock:
            self.failure_count += 1
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append({"time": round(time.time() - T0, 1), "case": case,
                                      "what": what, "detail": str(detail)[:600]})

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


T0 = time.time()


# ---------------------------------------------------------------------------------------------
# Request generators


class Ctx:
    def __init__(self, port, stats, max_seq_len, vocab, max_request_bytes, rng,
                 no_prompt_logprobs=False):
        self.port, self.stats, self.rng = port, stats, rng
        self.no_prompt_logprobs = no_prompt_logprobs
        self.max_seq_len, self.vocab, self.max_request_bytes = max_seq_len, vocab, max_request_bytes
        # A few shared prefixes (over a KV block long) so the prefix cache hits and shares blocks.
        pr = random.Random(1234)
        self.prefixes = [" ".join(pr.choice(WORDS) for _ in range(8)) for _ in range(4)]
        self.id_prefixes = [[pr.randrange(5, vocab) for _ in range(20)] for _ in range(4)]

    # -- pieces

    def text(self, lo=1, hi=12, prefix=True):
        # Up to ~6 tokens a word on the demo tokenizer: 20 words + 64 tokens fit 256.
        r = self.rng
        t = " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))
        if prefix and r.random() < 0.3:
            t = r.choice(self.prefixes) + " " + t
        return t

    def ids(self, lo=1, hi=40):
        r = self.rng
        ids = [r.randrange(5, self.vocab) for _ in range(r.randint(lo, hi))]
        if r.random() < 0.3:
            ids = r.choice(self.id_prefixes) + ids
        return ids

    def sampling(self, body):
        """Random valid sampling parameters, shared by completions and chat."""
        r = self.rng
        if r.random() < 0.3:
            body["temperature"] = 0
        elif r.random() < 0.7:
            body["temperature"] = round(r.uniform(0.5, 1.5), 2)
        if r.random() < 0.2:
            body["top_p"] = round(r.uniform(0.3, 1.0), 2)
        if r.random() < 0.2:
            body["top_k"] = r.choice([-1, 0, 1, 5, 50])
        if r.random() < 0.1:
            body["min_p"] = round(r.uniform(0, 0.2), 2)
        if r.random() < 0.4:
            body["seed"] = r.randrange(0, 2**31)
        if r.random() < 0.25:
            body["stop"] = r.choice(["e", " ", "\n", ["a", "th"], ["zz", "中"], "<|im_end|>"])
        if r.random() < 0.3:
            body["ignore_eos"] = True
        if r.random() < 0.1:
            body["presence_penalty"] = round(r.uniform(-1, 1), 2)
            body["frequency_penalty"] = round(r.uniform(-1, 1), 2)
        if r.random() < 0.1:
            body["repetition_penalty"] = round(r.uniform(0.8, 1.5), 2)
        if r.random() < 0.05:
            body["logit_bias"] = {str(r.randrange(5, self.vocab)): r.choice([-100, 5, 100])}
        if r.random() < 0.2:
            body["n"] = r.randint(2, 4)
        return body

    def completion_body(self, stream):
        r = self.rng
        kind = r.random()
        if kind < 0.45:
            prompt, P = self.text(), 1
        elif kind < 0.85:
            prompt, P = self.ids(), 1
        elif kind < 0.93:
            prompt = [self.text() for _ in range(r.randint(2, 3))]
            P = len(prompt)
        else:
            prompt = [self.ids() for _ in range(r.randint(2, 3))]
            P = len(prompt)
        body = self.sampling({"model": NAME, "prompt": prompt, "max_tokens": r.randint(1, 64)})
        if r.random() < 0.3:
            body["logprobs"] = r.randint(0, 5)
        if r.random() < 0.1:
            body["echo"] = True
            body.pop("stop", None)
            if self.no_prompt_logprobs:
                body.pop("logprobs", None)
        if not stream and r.random() < 0.05:  # lm-eval's scoring request
            body.update(max_tokens=r.choice([0, 1]), echo=True, logprobs=1, temperature=0)
            body.pop("stop", None)
        if "min_tokens" not in body and r.random() < 0.1:
            body["min_tokens"] = r.randint(0, body["max_tokens"])
        if stream:
            body["stream"] = True
            if r.random() < 0.8:
                body["stream_options"] = {"include_usage": True}
        return body, P

    def chat_body(self, stream):
        r = self.rng
        msgs = []
        if r.random() < 0.3:
            msgs.append({"role": "system", "content": self.text(1, 4)})
        for i in range(r.choice([1, 1, 3])):
            role = "user" if i % 2 == 0 else "assistant"
            content = self.text(1, 3 if msgs else 4, prefix=not msgs)
            if r.random() < 0.1:
                content = [{"type": "text", "text": content}, {"type": "text", "text": "ok"}]
            msgs.append({"role": role, "content": content})
        body = self.sampling({"model": NAME, "messages": msgs})
        body["max_completion_tokens" if r.random() < 0.3 else "max_tokens"] = r.randint(1, 64)
        if r.random() < 0.3:
            body["logprobs"] = True
            if r.random() < 0.7:
                body["top_logprobs"] = r.randint(0, 5)
        if stream:
            body["stream"] = True
            if r.random() < 0.8:
                body["stream_options"] = {"include_usage": True}
        return body

    # -- checks

    def expect(self, case, status, raw, want, queue_ok=False):
        """Counts the status; returns the JSON body when it is 200. Raises CaseError otherwise
        unless the status is the expected error (with an OpenAI error body) or, where queue_ok,
        503 for a full queue (returns None then)."""
        self.stats.count(case, status)
        if status == 200 and 200 in want:
            try:
                return json.loads(raw)
            except ValueError:
                raise CaseError(f"200 with a body that is not JSON: {raw[:200]!r}")
        if status in want or (queue_ok and status == 503):
            try:
                err = json.loads(raw)["error"]
                assert isinstance(err["message"], str) and "type" in err
            except (ValueError, KeyError, TypeError, AssertionError):
                raise CaseError(f"{status} without an OpenAI error body: {raw[:200]!r}")
            if status == 503:
                if "queue is full" not in err["message"]:
                    raise CaseError(f"503 that is not a full queue: {err['message']}")
                time.sleep(self.rng.uniform(0.2, 1.0))  # back off, as a client would
            return None
        raise CaseError(f"unexpected status {status} (want {sorted(want)}): {raw[:300]!r}")

    def check_completion(self, body, r, P):
        n = body.get("n", 1)
        ch = r.get("choices")
        if r.get("object") != "text_completion" or not isinstance(ch, list) or len(ch) != n * P:
            raise CaseError(f"bad completion: want {n * P} choices: {json.dumps(r)[:300]}")
        for c in ch:
            self.check_choice(body, c["finish_reason"], c["text"], c.get("stop_reason"))
            if body.get("logprobs") is not None and body["max_tokens"] > 0 and not body.get("echo"):
                if len(c["logprobs"]["tokens"]) > body["max_tokens"]:
                    raise CaseError(f"more logprob tokens than max_tokens: {c}")
        return self.check_usage(body, r.get("usage"), n * P)

    def check_choice(self, body, finish, text, stop_reason):
        if finish not in ("stop", "length"):
            raise CaseError(f"finish_reason {finish!r} (not stop/length) in {text!r}")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if not body.get("echo") and not body.get("min_tokens"):  # (stops count after min_tokens)
            for s in stops:
                if s in text:
                    raise CaseError(f"stop string {s!r} in the output {text!r}")
        if stop_reason is not None and stop_reason not in stops:
            raise CaseError(f"stop_reason {stop_reason!r} is not one of the stop strings {stops}")

    def check_usage(self, body, usage, completions):
        if not isinstance(usage, dict):
            raise CaseError(f"no usage: {usage!r}")
        mt = body.get("max_tokens", body.get("max_completion_tokens"))
        ct = usage["completion_tokens"]
        if not 0 <= ct <= completions * mt or usage["total_tokens"] != ct + usage["prompt_tokens"]:
            raise CaseError(f"bad usage {usage} for {completions} x max_tokens {mt}")
        return ct

    def read_sse(self, r):
        """JSON events of an SSE response up to `data: [DONE]` (which must come)."""
        events = []
        for line in r:
            line = line.decode("utf-8").rstrip("\r\n")
            if not line:
                continue
            if not line.startswith("data: "):
                raise CaseError(f"not an SSE data line: {line[:200]!r}")
            if line == "data: [DONE]":
                rest = r.read()
                if rest.strip():
                    raise CaseError(f"data after [DONE]: {rest[:200]!r}")
                return events
            ev = json.loads(line[6:])
            if "error" in ev:
                raise CaseError(f"error event in the stream: {line[:300]}")
            events.append(ev)
        raise CaseError(f"stream ended without data: [DONE] after {len(events)} events")

    def post_stream(self, case, path, body, completions, check):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=headers())
            r = conn.getresponse()
            if r.status != 200:
                self.expect(case, r.status, r.read(), {200}, queue_ok=True)
                return
            self.stats.count(case, 200)
            self.stats.add(completions_min=completions)
            check(body, self.read_sse(r))
        finally:
            conn.close()

    def check_completion_events(self, body, events, P):
        n = body.get("n", 1)
        text, finish, usage = defaultdict(str), {}, None
        for ev in events:
            if ev.get("usage"):
                usage = ev["usage"]
                continue
            for c in ev["choices"]:
                i = c["index"]
                if i in finish:
                    raise CaseError(f"choice {i} continued after its finish")
                text[i] += c["text"]
                if c["finish_reason"] is not None:
                    finish[i] = (c["finish_reason"], c.get("stop_reason"))
        if sorted(finish) != list(range(n * P)):
            raise CaseError(f"finished choices {sorted(finish)}, want {n * P}")
        for i, (f, sr) in finish.items():
            self.check_choice(body, f, text[i], sr)
        if body.get("stream_options"):
            self.stats.add(completion_tokens=self.check_usage(body, usage, n * P))

    def check_chat_events(self, body, events):
        n = body.get("n", 1)
        text, finish, usage, roles = defaultdict(str), {}, None, set()
        for ev in events:
            if ev.get("usage"):
                usage = ev["usage"]
                continue
            if ev.get("object") != "chat.completion.chunk":
                raise CaseError(f"bad chunk {ev}")
            for c in ev["choices"]:
                i = c["index"]
                if i in finish:
                    raise CaseError(f"choice {i} continued after its finish")
                if "role" in c["delta"]:
                    roles.add(i)
                elif i not in roles:
                    raise CaseError(f"choice {i}: content before the role delta")
                text[i] += c["delta"].get("content", "") or ""
                if c["finish_reason"] is not None:
                    finish[i] = (c["finish_reason"], c.get("stop_reason"))
        if sorted(finish) != list(range(n)):
            raise CaseError(f"finished choices {sorted(finish)}, want {n}")
        for i, (f, sr) in finish.items():
            self.check_choice(body, f, text[i], sr)
        if body.get("stream_options"):
            self.stats.add(completion_tokens=self.check_usage(body, usage, n))

    # -- cases: each sends its requests, counts statuses, raises CaseError on a failure

    def case_completion(self, case):
        body, P = self.completion_body(stream=False)
        status, raw = request(self.port, "POST", "/v1/completions", body)
        r = self.expect(case, status, raw, {200}, queue_ok=True)
        if r is not None:
            self.stats.add(completions_min=body.get("n", 1) * P)
            self.stats.add(completion_tokens=self.check_completion(body, r, P))

    def case_completion_stream(self, case):
        body, P = self.completion_body(stream=True)
        self.post_stream(case, "/v1/completions", body, body.get("n", 1) * P,
                         lambda b, ev: self.check_completion_events(b, ev, P))

    def case_chat(self, case):
        body = self.chat_body(stream=False)
        status, raw = request(self.port, "POST", "/v1/chat/completions", body)
        r = self.expect(case, status, raw, {200}, queue_ok=True)
        if r is None:
            return
        n = body.get("n", 1)
        self.stats.add(completions_min=n)
        if r.get("object") != "chat.completion" or len(r.get("choices", [])) != n:
            raise CaseError(f"bad chat completion: {json.dumps(r)[:300]}")
        for c in r["choices"]:
            if c["message"]["role"] != "assistant" or not isinstance(c["message"]["content"], str):
                raise CaseError(f"bad message {c['message']}")
            self.check_choice(body, c["finish_reason"], c["message"]["content"], c["stop_reason"])
            if body.get("logprobs") and len(c["logprobs"]["content"]) > 64:
                raise CaseError("more logprobs than max_tokens")
        self.stats.add(completion_tokens=self.check_usage(body, r["usage"], n))

    def case_chat_stream(self, case):
        body = self.chat_body(stream=True)
        self.post_stream(case, "/v1/chat/completions", body, body.get("n", 1),
                         self.check_chat_events)

    def case_seed_repeat(self, case):
        # Sampling reads only (seed, position) and the logits: the batch a request lands in, and
        # preemption, must not change what it writes.
        r = self.rng
        body = {"model": NAME, "prompt": self.ids(4, 30), "max_tokens": r.randint(8, 32),
                "temperature": 1.0, "seed": r.randrange(2**31), "n": r.choice([1, 2]),
                "ignore_eos": True}
        answers = []
        for _ in range(2):
            status, raw = request(self.port, "POST", "/v1/completions", body)
            res = self.expect(case, status, raw, {200}, queue_ok=True)
            if res is None:
                self.stats.seed_repeats["skipped (503)"] += 1
                return
            self.stats.add(completions_min=body["n"])
            self.stats.add(completion_tokens=self.check_completion(body, res, 1))
            answers.append([c["text"] for c in res["choices"]])
        if answers[0] != answers[1]:
            raise CaseError(f"same seed, different outputs: {answers} for {body}")
        self.stats.seed_repeats["same"] += 1

    def case_cancel(self, case):
        r = self.rng
        how = r.choices(["after_chunks", "after_send", "nonstream"], [0.7, 0.15, 0.15])[0]
        ids = self.ids(4, 20)
        n = r.choice([1, 1, 2])
        if r.random() < 0.5:
            path, body = "/v1/completions", {"model": NAME, "prompt": ids}
        else:
            path, body = "/v1/chat/completions", {
                "model": NAME, "messages": [{"role": "user", "content": self.text(1, 8)}]}
        body.update(max_tokens=150, ignore_eos=True, n=n, stream=how != "nonstream")
        sub = f"{case}:{how}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=headers())
            if how != "after_chunks":
                if how == "nonstream":
                    time.sleep(r.uniform(0, 0.3))
                # Gone before any answer: whether it was accepted is unknown here.
                self.stats.count(sub, "closed before the answer")
                self.stats.add(completions_unknown=n)
                return
            resp = conn.getresponse()
            if resp.status != 200:
                self.expect(sub, resp.status, resp.read(), {200}, queue_ok=True)
                return
            self.stats.count(sub, 200)
            self.stats.add(completions_min=n)
            want, got = r.randint(1, 6), 0
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    raise CaseError("a 150-token stream ended within 6 chunks")
                if line.startswith(b"data: "):
                    got += 1
                    if got >= want:
                        break
            resp.close()
        finally:
            conn.close()  # mid-stream: the server must abort the request and free its blocks

    MALFORMED = [b'{"model": "soak", "prompt": "x",', b"", b"[1, 2]", b"null", b'"text"',
                 b'{"prompt": "x"} trailing', b"\xff\xfe\x00", b'{"prompt": "\\ud800"}',
                 b'{"model": "soak", "prompt": "x", "temperature": NaN}',
                 b'{"model": "soak", "prompt": "x", "max_tokens": 1e400}',
                 b'{"model": "soak", "prompt": "\xc3\x28"}', b"{'prompt': 'x'}",
                 b'{"model": "soak", "stop": ' + b"[" * 300 + b"]" * 300 + b"}"]

    def case_malformed_json(self, case):
        path = self.rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize",
                                "/detokenize"])
        body = self.rng.choice(self.MALFORMED)
        self.expect(case, *request(self.port, "POST", path, body), {400})

    WRONG_TYPES = [{"max_tokens": "x"}, {"temperature": "hot"}, {"n": "2"}, {"stream": "yes"},
                   {"logprobs": "many"}, {"stop": 3}, {"seed": "s"}, {"prompt": 5},
                   {"prompt": [[]]}, {"prompt": [1, -1]}, {"prompt": [1.5]}, {"prompt": {}},
                   {"model": 5}, {"n": 1.5}, {"top_k": "all"}, {"logit_bias": [1]},
                   {"stream_options": 1, "stream": True}, {"echo": "no"}]
    WRONG_CHAT = [{"messages": "hi"}, {"messages": []}, {"messages": [{"role": 1}]},
                  {"messages": [{"role": "user", "content": 5}]},
                  {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                  {"logprobs": "yes"}, {"top_logprobs": 2}, {"max_tokens": [1]}]
    INVALID = [{"temperature": -1}, {"top_p": 0}, {"n": 0}, {"n": 500}, {"max_tokens": -1},
               {"logit_bias": {"x": 1}}, {"prompt": []}, {"prompt": [1, 2, 100000]},
               {"stream_options": {"include_usage": True}}, {"suffix": "x"}, {"best_of": 3},
               {"top_k": -5}, {"logprobs": 21}, {"stop": [""]}, {"min_tokens": 9},
               {"presence_penalty": 5}, {"repetition_penalty": 0}, {"stop_token_ids": [99999]}]

    def case_wrong_type(self, case):
        if self.rng.random() < 0.3:
            path = "/v1/chat/completions"
            body = dict({"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4}, **self.rng.choice(self.WRONG_CHAT))
        elif self.rng.random() < 0.15:
            path = "/detokenize"
            body = {"tokens": self.rng.choice(["abc", [-1], [1.5], [10**6], None])}
        else:
            path = "/v1/completions"
            body = dict({"model": NAME, "prompt": "x", "max_tokens": 4},
                        **self.rng.choice(self.WRONG_TYPES))
        self.expect(case, *request(self.port, "POST", path, body), {400})

    def case_invalid_value(self, case):
        body = dict({"model": NAME, "prompt": "x", "max_tokens": 4}, **self.rng.choice(self.INVALID))
        self.expect(case, *request(self.port, "POST", "/v1/completions", body), {400})

    def case_oversized(self, case):
        r = self.rng
        size = self.max_request_bytes + r.choice([1, 1000, self.max_request_bytes])
        path = r.choice(["/v1/completions", "/v1/chat/completions", "/tokenize"])
        head = b'{"model": "soak", "prompt": "'
        pad = b"x" * (size - len(head) - 2)
        if r.random() < 0.7:
            status, raw = request(self.port, "POST", path, head + pad + b'"}')
            self.expect(case, status, raw, {413})
            return
        # Chunked: no Content-Length, so only the handler sees the size.
        sub = case + ":chunked"

        def chunks():
            yield head
            for i in range(0, len(pad), 1 << 16):
                yield pad[i:i + (1 << 16)]
            yield b'"}'
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("POST", path, body=chunks(), headers=headers(), encode_chunked=True)
            resp = conn.getresponse()
            self.expect(sub, resp.status, resp.read(), {413})
        finally:
            conn.close()

    def case_too_long(self, case):
        r = self.rng
        L = self.max_seq_len
        which = r.randrange(5)
        if which == 0:
            body = {"model": NAME, "prompt": [r.randrange(5, self.vocab)
                                              for _ in range(r.randint(L + 1, L + 300))]}
        elif which == 1:  # fits alone, not with max_tokens
            body = {"model": NAME, "prompt": [r.randrange(5, self.vocab) for _ in range(L - 20)],
                    "max_tokens": r.randint(21, 200)}
        elif which == 2:
            body = {"model": NAME, "prompt": " ".join(r.choice(WORDS) for _ in range(400)),
                    "max_tokens": 4}
        elif which == 3:
            body = {"model": NAME, "messages": [{"role": "user", "content": " ".join(
                r.choice(WORDS) for _ in range(400))}], "max_tokens": 4}
        else:
            body = {"model": NAME, "prompt": [5] * (L - 1), "max_tokens": 2, "stream": True}
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        self.expect(case, *request(self.port, "POST", path, body), {400})

    def case_unknown_model(self, case):
        name = self.rng.choice(["gpt-4", "soak2", "", "SOAK", "soak ", "../soak"])
        path, body = self.rng.choice([
            ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})])
        self.expect(case, *request(self.port, "POST", path, dict(body, model=name)), {404})

    def case_bad_key(self, case):
        hdrs = self.rng.choice([headers(None), headers("wrong"), headers(API_KEY + "x"),
                                headers(None, {"Authorization": "Basic " + API_KEY}),
                                headers(None, {"Authorization": API_KEY})])
        method, path, body = self.rng.choice([
            ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2}),
            ("POST", "/v1/chat/completions", {"model": NAME,
                                              "messages": [{"role": "user", "content": "hi"}]}),
            ("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "x"}),
            ("POST", "/v1/completions", b"{broken")])
        self.expect(case, *request(self.port, method, path, body, hdrs), {401})

    def case_unknown_route(self, case):
        method, path = self.rng.choice([("GET", "/v1/nothing"), ("POST", "/v2/completions"),
                                        ("GET", "/v1/completions"), ("POST", "/v1/models")])
        self.expect(case, *request(self.port, method, path, b"{}" if method == "POST" else None),
                    {404})

    def info_request(self, conn=None, case="info"):
        """One random informational request, counted as case:endpoint and checked."""
        r = self.rng
        which = r.choice(["models", "tokenize", "tokenize_chat", "detokenize", "tokenizer_info",
                          "metrics", "health"])
        if which == "models":
            status, raw = request(self.port, "GET", "/v1/models", conn=conn)
        elif which == "tokenize":
            status, raw = request(self.port, "POST", "/tokenize",
                                  {"model": NAME, "prompt": self.text(),
                                   "return_token_strs": r.random() < 0.5}, conn=conn)
        elif which == "tokenize_chat":
            status, raw = request(self.port, "POST", "/tokenize",
                                  {"messages": [{"role": "user", "content": self.text()}]},
                                  conn=conn)
        elif which == "detokenize":
            status, raw = request(self.port, "POST", "/detokenize", {"tokens": self.ids()},
                                  conn=conn)
        elif which == "tokenizer_info":
            status, raw = request(self.port, "GET", "/tokenizer_info", conn=conn)
        elif which == "metrics":
            status, raw = request(self.port, "GET", "/metrics", hdrs={}, conn=conn)
        else:
            status, raw = request(self.port, "GET", "/health", hdrs={}, conn=conn)
        sub = case + ":" + which
        self.stats.count(sub, status)
        if status != 200:
            raise CaseError(f"{sub}: status {status}: {raw[:300]!r}")
        if which == "metrics":
            m = parse_metrics(raw.decode())
            if "kiln:num_requests_running" not in m:
                raise CaseError("metrics without kiln:num_requests_running")
        elif which != "health":
            j = json.loads(raw)
            if which == "models" and j["data"][0]["id"] != NAME:
                raise CaseError(f"models: {j}")
            if which in ("tokenize", "tokenize_chat") and j["count"] != len(j["tokens"]):
                raise CaseError(f"tokenize: {j}")
            if which == "detokenize" and not isinstance(j["prompt"], str):
                raise CaseError(f"detokenize: {j}")

    def case_info(self, case):
        self.info_request()

    def case_keepalive(self, case):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            for _ in range(self.rng.randint(2, 5)):
                self.info_request(conn, case)
        finally:
            conn.close()


# (case, weight): valid generation requests are the bulk of the load.
CASES = [("completion", 16), ("completion_stream", 14), ("chat", 10), ("chat_stream", 10),
         ("seed_repeat", 3), ("cancel", 10), ("malformed_json", 4), ("wrong_type", 4),
         ("invalid_value", 3), ("oversized", 1), ("too_long", 3), ("unknown_model", 3),
         ("bad_key", 3), ("unknown_route", 1), ("info", 10), ("keepalive", 3)]


def worker(ctx, stop, cases):
    names, weights = zip(*cases)
    while not stop.is_set():
        case = ctx.rng.choices(names, weights)[0]
        try:
            getattr(ctx, "case_" + case)(case)
        except CaseError as e:
            ctx.stats.fail(case, "check", e)
        except socket.timeout as e:
            ctx.stats.count(case, "timeout")
            ctx.stats.fail(case, "timeout", repr(e))
        except (OSError, http.client.HTTPException) as e:
            ctx.stats.count(case, "connection error")
            ctx.stats.fail(case, "connection error", repr(e))
        except Exception as e:  # a bug in the response shape (KeyError, ...) or in this script
            ctx.stats.count(case, "exception")
            ctx.stats.fail(case, "exception", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# RSS


def linear_fit(ts, ys):
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0
    return slope, my - slope * mt


def sampler(server, samples, stop, interval):
    while not stop.wait(interval):
        st = server.proc_status()
        if st:
            samples.append((time.time() - T0, *st))


def rss_report(samples, warmup_s, end_s):
    after = [s for s in samples if s[0] >= warmup_s]
    if len(after) < 3:
        return {"ok": False, "error": f"only {len(after)} RSS samples after the warm-up"}
    ts = [s[0] for s in after]
    mb = [s[1] / 1024 for s in after]
    slope, icpt = linear_fit(ts, mb)
    at_warmup = mb[0]
    growth = slope * (end_s - warmup_s)
    bound = 0.05 * at_warmup + 10
    return {"ok": growth <= bound,
            "start_mb": round(samples[0][1] / 1024, 1),
            "warmup_end_mb": round(at_warmup, 1),
            "end_mb": round(mb[-1], 1),
            "min_after_warmup_mb": round(min(mb), 1),
            "max_after_warmup_mb": round(max(mb), 1),
            "growth_per_min_mb": round(slope * 60, 3),
            "fitted_growth_mb": round(growth, 2),
            "bound_mb": round(bound, 2),
            "samples": len(samples),
            "threads_min_max": [min(s[2] for s in samples), max(s[2] for s in samples)],
            "fds_min_max": [min(s[3] for s in samples), max(s[3] for s in samples)]}


# ---------------------------------------------------------------------------------------------


def get_metrics(port):
    return parse_metrics(request(port, "GET", "/metrics", hdrs={}, timeout=30)[1].decode())


def end_checks(server, port, stats, m0, fds_idle_start, failures):
    """After the load: idle, still serving, counters consistent, no leaked descriptors."""
    out = {"idle_metrics": {}, "final_metrics": {}, "finished": None, "fds_end": None}
    # Idle: nothing running or waiting, no KV blocks held.
    m, idle = {}, False
    deadline = time.time() + 60
    while server.proc.poll() is None and time.time() < deadline:
        m = get_metrics(port)
        if (m["kiln:num_requests_running"] == 0 and m["kiln:num_requests_waiting"] == 0
                and m["kiln:kv_cache_usage_perc"] == 0):
            idle = True
            break
        time.sleep(0.5)
    out["idle_metrics"] = m
    if not idle:
        failures.append("not idle 60 s after the last request: " + json.dumps(
            {k: v for k, v in m.items() if k.startswith(("kiln:num_requests", "kiln:kv_cache"))}))
    # Still serving.
    if request(port, "GET", "/health", hdrs={})[0] != 200:
        failures.append("/health is not 200 after the run")
    status, raw = request(port, "POST", "/v1/completions",
                          {"model": NAME, "prompt": "still there?", "max_tokens": 8})
    if status != 200 or len(json.loads(raw)["choices"]) != 1:
        failures.append(f"the final completion got {status}: {raw[:300]!r}")
    else:
        stats.add(completions_min=1)
    time.sleep(0.5)
    mf = out["final_metrics"] = get_metrics(port)
    for k in ("kiln:num_requests_running", "kiln:num_requests_waiting",
              "kiln:kv_cache_usage_perc"):
        if mf[k] != 0:
            failures.append(f"{k} is {mf[k]} after the final completion")
    # Every completion the server accepted finished exactly once (stop, length or abort).
    finished = out["finished"] = sum(
        mf[f'kiln:request_success_total{{finished_reason="{r}"}}'] -
        m0[f'kiln:request_success_total{{finished_reason="{r}"}}']
        for r in ("stop", "length", "abort"))
    lo, hi = stats.completions_min, stats.completions_min + stats.completions_unknown
    if not lo <= finished <= hi:
        failures.append(f"finished completions in /metrics {finished:.0f}, the clients saw "
                        f"{lo} accepted (+ up to {stats.completions_unknown} unseen)")
    # No descriptors left behind once the clients are gone.
    for _ in range(20):
        out["fds_end"] = server.proc_status()[2]
        if out["fds_end"] <= fds_idle_start:
            break
        time.sleep(0.5)
    if out["fds_end"] > fds_idle_start:
        failures.append(f"open descriptors: {fds_idle_start} before the run, "
                        f"{out['fds_end']} after")
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kiln", default=os.path.join(here, "..", "build", "kiln"))
    p.add_argument("--model", default=os.path.join(here, "..", "models", "demo"),
                   help="engine folder or Hugging Face folder")
    p.add_argument("--duration", type=float, default=600, help="seconds of load")
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--kv-cache-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=80,
                   help="below --clients, so that bursts also get 503")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=0, help="kiln's CPU threads (0: all cores)")
    p.add_argument("--sample-interval", type=float, default=2.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--exit-timeout", type=float, default=30)
    p.add_argument("--seed", type=int, default=None, help="seeds the workers' random choices")
    p.add_argument("--no-prompt-logprobs", action="store_true",
                   help="no echo + logprobs with max_tokens > 1: kiln builds before the fix of "
                        "the preempted-prompt-logprobs crash (docs/soak.md) die on them")
    p.add_argument("--cases", help="only these cases (comma-separated; to chase a problem)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server, e.g. GLIBC_TUNABLES=glibc.malloc.tcache_count=0 "
                        "(no per-thread malloc caches: RSS then shows leaks sooner)")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args()
    cases = CASES
    if args.cases:
        want = args.cases.split(",")
        cases = [c for c in CASES if c[0] in want]
        if len(cases) != len(want):
            p.error(f"--cases: known cases are {', '.join(c for c, _ in CASES)}")

    global T0
    failures = []  # checks outside the requests themselves that failed
    server = Server(args)
    port = server.port
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    stats = Stats()
    code = exit_s = None
    end = {"idle_metrics": {}, "final_metrics": {}, "finished": None, "fds_end": None}
    try:
        max_seq_len = json.loads(request(port, "GET", "/v1/models")[1])["data"][0]["max_model_len"]
        vocab = json.loads(request(port, "GET", "/tokenizer_info")[1])["vocab_size"]
        m0 = get_metrics(port)
        print(f"soak: kiln serve pid {server.proc.pid} on port {port} (max_seq_len {max_seq_len},"
              f" vocab {vocab}); {args.clients} clients for {args.duration:.0f} s, seed {seed}; "
              f"log {server.log.name}", flush=True)

        stop, sample_stop = threading.Event(), threading.Event()
        T0 = time.time()
        samples = [(0.0, *server.proc_status())]
        fds_idle_start = samples[0][3]
        sampler_thread = threading.Thread(target=sampler, daemon=True,
                                          args=(server, samples, sample_stop,
                                                args.sample_interval))
        sampler_thread.start()
        workers = []
        for i in range(args.clients):
            ctx = Ctx(port, stats, max_seq_len, vocab, args.max_request_bytes,
                      random.Random(seed * 1000 + i), args.no_prompt_logprobs)
            t = threading.Thread(target=worker, args=(ctx, stop, cases), daemon=True)
            t.start()
            workers.append(t)
        next_report = time.time() + 60
        while time.time() - T0 < args.duration and server.proc.poll() is None:
            time.sleep(max(0.0, min(1.0, args.duration - (time.time() - T0))))
            if time.time() >= next_report:
                next_report += 60
                total = sum(sum(c.values()) for c in stats.by_case.values())
                s = samples[-1]
                print(f"soak: {time.time() - T0:5.0f} s  {total} requests  "
                      f"{stats.failure_count} failures  RSS {s[1] / 1024:.1f} MB  "
                      f"threads {s[2]}  fds {s[3]}", flush=True)
        load_end = time.time() - T0
        stop.set()
        # In-flight cases finish (each request is bounded by REQUEST_TIMEOUT).
        join_deadline = time.time() + REQUEST_TIMEOUT + 30
        for t in workers:
            t.join(timeout=max(0.0, join_deadline - time.time()))
        stuck = sum(t.is_alive() for t in workers)
        if stuck:
            failures.append(f"{stuck} workers still inside a request {REQUEST_TIMEOUT + 30} s "
                            "after the end")
        drain_s = time.time() - T0 - load_end
        sample_stop.set()
        sampler_thread.join()
        rss = rss_report(samples, args.warmup_fraction * load_end, samples[-1][0])
        if not rss["ok"]:
            failures.append(rss["error"] if "error" in rss else
                            f"RSS grew {rss['fitted_growth_mb']} MB after the warm-up "
                            f"(bound {rss['bound_mb']} MB)")

        if server.proc.poll() is not None:
            failures.append(f"the server exited during the run with {server.proc.returncode}")
        else:
            try:
                end = end_checks(server, port, stats, m0, fds_idle_start, failures)
            except Exception as e:
                failures.append(f"end checks: {type(e).__name__}: {e}")
            # Graceful stop.
            t = time.time()
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = server.proc.wait(timeout=args.exit_timeout)
            except subprocess.TimeoutExpired:
                failures.append(f"no exit {args.exit_timeout:.0f} s after SIGTERM")
            exit_s = round(time.time() - t, 2)
            if code not in (None, 0):
                failures.append(f"exit status {code} after SIGTERM")
        log = server.read_log()
    finally:
        server.kill()

    mf = end["final_metrics"]
    gen_tokens = (mf["kiln:generation_tokens_total"] - m0["kiln:generation_tokens_total"]
                  if mf else None)
    total = sum(sum(c.values()) for c in stats.by_case.values())
    ok = not failures and stats.failure_count == 0
    summary = {
        "ok": ok,
        "command": server.cmd,
        "config": {"duration_s": args.duration, "clients": args.clients, "seed": seed,
                   "no_prompt_logprobs": args.no_prompt_logprobs, "cases": args.cases,
                   "server_env": args.server_env,
                   "warmup_fraction": args.warmup_fraction, "cpus": os.cpu_count()},
        "load_s": round(load_end, 1),
        "drain_s": round(drain_s, 1),
        "requests_total": total,
        "requests_per_s": round(total / load_end, 1),
        "requests": {case: dict(sorted(c.items())) for case, c in sorted(stats.by_case.items())},
        "completion_tokens_seen_by_clients": stats.completion_tokens,
        "server_generation_tokens": gen_tokens,
        "server_generation_tokens_per_s": round(gen_tokens / load_end, 1) if mf else None,
        "completions_accepted": {"seen": stats.completions_min,
                                 "unseen_max": stats.completions_unknown,
                                 "finished_in_metrics": end["finished"]},
        "seed_repeats": dict(stats.seed_repeats),
        "failure_count": stats.failure_count,
        "failures": stats.failures,
        "end_checks_failed": failures,
        "rss": rss,
        "samples_t_rss_kb_threads_fds": samples,
        "fds": {"idle_before": fds_idle_start, "idle_after": end["fds_end"]},
        "metrics_idle_after_run": {k: v for k, v in end["idle_metrics"].items()
                                   if "_bucket" not in k},
        "metrics_final": {k: v for k, v in mf.items() if "_bucket" not in k},
        "shutdown": {"exit_status": code, "seconds": exit_s},
        "server_log_tail": log.splitlines()[-15:],
        "server_log_stream_aborted_lines": sum("stream aborted" in x for x in log.splitlines()),
    }
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if ok:
        os.unlink(server.log.name)
    return 0 if ok else 1


def print_summary(s):
    print(f"\n== kiln serve soak: {'PASS' if s['ok'] else 'FAIL'} ==")
    print(f"{s['config']['clients']} clients, {s['load_s']} s of load (+{s['drain_s']} s to "
          f"finish in-flight cases), {s['requests_total']} requests ({s['requests_per_s']}/s)")
    print(f"{'case':34} statuses")
    for case, c in s["requests"].items():
        print(f"  {case:32} " + "  ".join(f"{k}: {v}" for k, v in c.items()))
    print(f"completion tokens: {s['completion_tokens_seen_by_clients']} in responses' usage; "
          f"{s['server_generation_tokens']} generated by the server "
          f"({s['server_generation_tokens_per_s']}/s)")
    ca = s["completions_accepted"]
    print(f"completions: {ca['seen']} accepted as seen by clients (+ up to {ca['unseen_max']} "
          f"unseen), {ca['finished_in_metrics']} finished in /metrics; seed repeats "
          f"{s['seed_repeats']}")
    r = s["rss"]
    if "error" in r:
        print("RSS: " + r["error"])
    else:
        print(f"RSS: start {r['start_mb']} MB, warm-up end {r['warmup_end_mb']} MB, after warm-up "
              f"min {r['min_after_warmup_mb']} / max {r['max_after_warmup_mb']} MB, end "
              f"{r['end_mb']} MB; growth {r['growth_per_min_mb']} MB/min, "
              f"{r['fitted_growth_mb']} MB fitted over the window (bound {r['bound_mb']} MB); "
              f"threads {r['threads_min_max']}, fds {r['fds_min_max']}")
    print(f"fds idle before/after: {s['fds']['idle_before']} / {s['fds']['idle_after']}")
    mf = s["metrics_final"]
    keys = ["kiln:num_requests_running", "kiln:num_requests_waiting", "kiln:kv_cache_usage_perc",
            "kiln:num_preemptions_total", "kiln:prefix_cache_hits_total",
            "kiln:prefix_cache_queries_total", "kiln:generation_tokens_total",
            'kiln:request_success_total{finished_reason="stop"}',
            'kiln:request_success_total{finished_reason="length"}',
            'kiln:request_success_total{finished_reason="abort"}']
    print("final metrics: " + ", ".join(f"{k.replace('kiln:', '')} {mf.get(k, 0):.4g}"
                                        for k in keys))
    print(f"SIGTERM: exit status {s['shutdown']['exit_status']} after "
          f"{s['shutdown']['seconds']} s")
    if s["failure_count"]:
        print(f"{s['failure_count']} request failures; the first ones:")
        for f in s["failures"]:
            print(f"  [{f['time']} s] {f['case']}: {f['what']}: {f['detail']}")
    for f in s["end_checks_failed"]:
        print("  end check failed: " + f)
    if not s["ok"]:
        print("server log (tail):\n    " + "\n    ".join(s["server_log_tail"]))


if __name__ == "__main__":
    sys.exit(main())
