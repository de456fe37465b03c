#!/usr/bin/env python3
"""Differential test of kiln's chat-template renderer against jinja2 set up like transformers.

transformers' apply_chat_template renders with jinja2's ImmutableSandboxedEnvironment
(trim_blocks, lstrip_blocks, loopcontrols, a `generation` block tag), a json.dumps-based `tojson`
filter and the globals raise_exception and strftime_now; make_env() below reproduces that setup
(transformers/utils/chat_template_utils.py) so transformers itself is not needed.

For every template under tests/fixtures (the real Llama 3 / Qwen3 / Gemma 3 ones and
tests/fixtures/chat_templates/*.jinja) it renders randomized conversations with both jinja2 and
kiln (the ChatTemplateDiff.RenderCases test of kiln_tests, driven through environment variables)
and compares the strings byte for byte; when jinja2 raises, kiln must fail too.

  chat_template_diff.py --kiln-tests build/tests/kiln_tests [--cases 300] [--seed 1]
  chat_template_diff.py --write-golden tests/fixtures/chat_templates/golden.json

--write-golden stores a small deterministic sample with jinja2's results; kiln_tests replays it in
ChatTemplateGolden.MatchesJinja2 without Python. Exit status: 0 when everything matches, 1 on a
mismatch or when jinja2 is missing.
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile

try:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    print("chat_template_diff: jinja2 is not installed; install tests/requirements.txt into the "
          "test venv (python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt)",
          file=sys.stderr)
    sys.exit(1)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
TOKENIZER_DIRS = ["tokenizers/llama3", "tokenizers/qwen3", "tokenizers/gemma3"]
# bos/eos for the stand-alone .jinja templates (what their models' tokenizers use).
JINJA_TOKENS = {
    "chatml.jinja": ("", "<|im_end|>"),
    "zephyr.jinja": ("<s>", "</s>"),
    "phi3_style.jinja": ("<s>", "<|endoftext|>"),
    "llama31_style.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral_tools_style.jinja": ("<s>", "</s>"),
    "deepseek_style.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "features_style.jinja": ("<bos>", "<eos>"),
}
NOW = 1699956800  # fixed clock for strftime_now on both sides


def make_env(now):
    class GenerationTag(jinja2.ext.Extension):
        # transformers' AssistantTracker: {% generation %} renders its body through a caller.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_generation_support")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation_support(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.fromtimestamp(now).strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def token_string(cfg, key):
    v = cfg.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def load_template(name):
    """(source, special tokens) the way kiln's ChatTemplate loads them."""
    if name.endswith(".jinja"):
        with open(os.path.join(FIXTURES, "chat_templates", name), encoding="utf-8") as f:
            source = f.read()
        bos, eos = JINJA_TOKENS[name]
        tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
        return source, tokens
    with open(os.path.join(FIXTURES, name, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token"):
        if token_string(cfg, key):
            tokens[key] = token_string(cfg, key)
    extra = cfg.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [
            t if isinstance(t, str) else t.get("content") for t in extra
            if isinstance(t, str) or isinstance(t, dict) and isinstance(t.get("content"), str)]
    return cfg["chat_template"], tokens


def jinja_render(template, tokens, case):
    ctx = {"messages": case["messages"], "tools": None, "documents": None,
           "add_generation_prompt": case["add_generation_prompt"]}
    ctx.update(tokens)
    ctx.update(case.get("extra", {}))
    try:
        return True, template.render(**ctx)
    except Exception as e:  # jinja2 and Python errors alike: kiln must fail as well
        return False, f"{type(e).__name__}: {e}"


# ---- random conversations -----------------------------------------------------------------------

TEXTS = [
    "Hello", "What is 2+2?", "  padded with spaces  ", "line one\nline two\n", "\n\nleading newlines",
    "ünïcödé ✓ 😀 中文", "quotes ' \" and \\ backslash", "tab\there", "", "{{ not a template }} {% x %}",
    "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "<tool_response>42</tool_response>",
    "trailing newline\n", "A" * 50, "mixed\r\nline endings", "emoji 👩‍👩‍👧 and ZWJ", "$x = {a: [1, 2]}",
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two numbers, returning their sum as a float value.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]},
        "return": {"type": "number"}}},
]


def rand_text(rng):
    return rng.choice(TEXTS)


def rand_tool_call(rng, call_id):
    args = rng.choice([{"city": "Paris"}, {"a": 1, "b": 2.5}, {"city": "Zürich", "unit": "c"}])
    if rng.random() < 0.3:
        args = json.dumps(args)  # some clients send arguments as a JSON string
    return {"id": call_id, "type": "function",
            "function": {"name": rng.choice(["get_weather", "add"]), "arguments": args}}


def rand_conversation(rng, template):
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rand_text(rng)})
    turns = rng.randint(1, 4)
    for t in range(turns):
        user = {"role": "user", "content": rand_text(rng)}
        if template.startswith("tokenizers/gemma3") or template == "features_style.jinja":
            if rng.random() < 0.3:
                user["content"] = [{"type": "image"}, {"type": "text", "text": rand_text(rng)}]
        msgs.append(user)
        if t == turns - 1 and rng.random() < 0.6:
            break
        if rng.random() < 0.3:
            calls = [rand_tool_call(rng, "call%05d" % rng.randint(0, 99999))
                     for _ in range(rng.choice([1, 1, 2]))]
            content = rng.choice([None, "", "Calling a tool."])
            if template != "deepseek_style.jinja" and content is None:
                content = ""
            msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
            for c in calls:
                msgs.append({"role": "tool", "tool_call_id": c["id"],
                             "content": rng.choice(["22 degrees", '{"sum": 3.5}', "ok"])})
        reply = {"role": "assistant", "content": rand_text(rng)}
        if rng.random() < 0.2:
            reply["reasoning_content"] = "Thinking about it."
        msgs.append(reply)
    # Occasionally an invalid conversation, so templates' raise_exception paths are compared too.
    if rng.random() < 0.08:
        msgs.append({"role": rng.choice(["user", "assistant", "narrator"]), "content": "again"})
    return msgs


def rand_case(rng, template):
    case = {"template": template, "messages": rand_conversation(rng, template),
            "add_generation_prompt": rng.random() < 0.7, "extra": {}}
    if rng.random() < 0.35:
        case["extra"]["tools"] = rng.sample(TOOLS, rng.randint(1, 2))
    if rng.random() < 0.3:
        case["extra"]["enable_thinking"] = rng.random() < 0.5
    if rng.random() < 0.2:
        case["extra"]["date_string"] = "01 Jan 2025"
    return case


def all_templates():
    names = list(TOKENIZER_DIRS)
    names += sorted(f for f in os.listdir(os.path.join(FIXTURES, "chat_templates"))
                    if f.endswith(".jinja"))
    return names


def expected(cases):
    env = make_env(NOW)
    loaded = {}
    out = []
    for case in cases:
        if case["template"] not in loaded:
            source, tokens = load_template(case["template"])
            loaded[case["template"]] = (env.from_string(source), tokens)
        template, tokens = loaded[case["template"]]
        out.append(jinja_render(template, tokens, case))
    return out


def run_kiln(kiln_tests, cases):
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = os.path.join(tmp, "cases.json")
        out_path = os.path.join(tmp, "out.json")
        with open(cases_path, "w", encoding="utf-8") as f:
            json.dump({"now": NOW, "cases": cases}, f, ensure_ascii=False)
        env = dict(os.environ, KILN_CHAT_TEMPLATE_CASES=cases_path,
                   KILN_CHAT_TEMPLATE_OUT=out_path)
        proc = subprocess.run([kiln_tests, "--gtest_filter=ChatTemplateDiff.RenderCases"],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out_path):
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit("chat_template_diff: kiln_tests failed to render the cases")
        with open(out_path, encoding="utf-8") as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kiln-tests", help="path of the kiln_tests binary")
    ap.add_argument("--cases", type=int, default=300, help="random conversations per template")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write-golden", metavar="PATH", help="write a golden sample and exit")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    if args.write_golden:
        cases = [rand_case(rng, t) for t in all_templates() for _ in range(12)]
        golden = []
        for case, (ok, text) in zip(cases, expected(cases)):
            case = dict(case)
            if ok:
                case["rendered"] = text
            else:
                case["error"] = text
            golden.append(case)
        with open(args.write_golden, "w", encoding="utf-8") as f:
            json.dump({"generator": "tests/chat_template_diff.py --write-golden",
                       "jinja2": jinja2.__version__, "now": NOW, "cases": golden},
                      f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {len(golden)} cases to {args.write_golden}")
        return 0

    if not args.kiln_tests:
        ap.error("--kiln-tests is required")
    cases = [rand_case(rng, t) for t in all_templates() for _ in range(args.cases)]
    want = expected(cases)
    got = run_kiln(args.kiln_tests, cases)
    passed = failed = 0
    for case, (ok, text), res in zip(cases, want, got):
        same = ok == res["ok"] and (not ok or text == res["rendered"])
        if same:
            passed += 1
            continue
        failed += 1
        if failed <= 10:
            print(f"MISMATCH in {case['template']}:")
            print("  case :", json.dumps(case, ensure_ascii=False)[:2000])
            print("  jinja2:", repr(text)[:2000] if ok else "error: " + text)
            print("  kiln  :", repr(res.get("rendered"))[:2000] if res["ok"]
                  else "error: " + res["error"])
    print(f"chat_template_diff: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
