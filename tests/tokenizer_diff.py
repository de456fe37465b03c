#!/usr/bin/env python3
"""Differential test: kiln's tokenizer against Hugging Face `tokenizers` on random strings.

For the fixture tokenizers (Llama 3, Qwen3, Gemma 3) and for synthetic tokenizer.json variants
built from their vocabularies (covering the normalizers, pre-tokenizers, models, added-token
flags, post-processors and decoders kiln supports), it encodes seeded random strings (many
scripts, emoji, code, whitespace runs, digits, special-token-like text) with and without special
tokens, decodes the ids with and without skip_special_tokens, decodes random id sequences, and
requires kiln's output to be identical. SentencePiece tokenizer.model files (BPE with byte
fallback, Unigram) trained at test time are checked against the sentencepiece library. All
requests for one tokenizer go through one `kiln tokenize DIR --jsonl` process.

Usage: tokenizer_diff.py --kiln build/kiln [--n 2000] [--seed 1] [--only NAME ...]
"""
import argparse
import copy
import json
import lzma
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
from tokenizers import Tokenizer, __version__ as HF_VERSION  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Blocks whose assigned characters are stable across the Unicode versions of PCRE2, utf8proc,
# Oniguruma and Python (characters unassigned in Python's database are filtered out).
BLOCKS = [
    (0x00A0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF), (0x0600, 0x06FF),
    (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x10A0, 0x10FF), (0x1E00, 0x1EFF), (0x2000, 0x206F),
    (0x20A0, 0x20BF), (0x2100, 0x218F), (0x2190, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x257F),
    (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF),
    (0x0300, 0x036F), (0x1D400, 0x1D7FF),
]
EMOJI = ["😀", "🎉", "👍", "👍🏽", "❤️", "🇫🇷", "👨‍👩‍👧", "🤖", "🔥", "✅", "🚀", "🙂", "🐍", "☕", "∑"]
WORDS = ["the", "The", "HELLO", "world", "tokenizer", "naïve", "café", "Straße", "İstanbul",
         "don't", "I'm", "we'LL", "they'VE", "it'S", "ſ", "ﬁne", "Ǆ", "Ωmega", "ΣΑΣ", "ǅemal",
         "x²", "½", "①", "Ⅻ", "٣٤٥", "१२३", "hello", "WORLD", "[X]", "<mask>"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "if x != None and y >= 3:", "#include <vector>", "SELECT * FROM t WHERE id=42;",
        "\tfoo();\r\n", "<div class=\"a\">x</div>", "λx.x", "a->b", "x:=1", "/* c */", "`ls -la`",
        "{\"k\": [1, 2.5e-3, null]}", "0x1F", "$HOME/.bashrc", "a_b_c", "__init__"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009",
          "\u0085", "\u2028", "\u200b", "\u180e", "    \n", "\t\t", " " * 9, "\f", "\v"]


def assigned_chars(rng_seed):
    chars = []
    for lo, hi in BLOCKS:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
                chars.append(c)
    return chars


CHARS = assigned_chars(0)


def random_text(rng, specials):
    parts = []
    for _ in range(rng.randint(1, 12)):
        k = rng.random()
        if k < 0.20:
            parts.append(rng.choice(WORDS))
        elif k < 0.30:
            parts.append(rng.choice(CODE))
        elif k < 0.45:
            parts.append(rng.choice(SPACES))
        elif k < 0.52:
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9))))
        elif k < 0.60:
            parts.append(rng.choice(EMOJI))
        elif k < 0.72 and specials:
            s = rng.choice(specials)
            r = rng.random()
            if r < 0.3:
                s = s[: rng.randint(1, len(s))]  # partial special token
            elif r < 0.5:
                s = " " + s + rng.choice(["", " ", "  ", "\n"])
            parts.append(s)
        elif k < 0.85:
            parts.append("".join(rng.choice(CHARS) for _ in range(rng.randint(1, 8))))
        else:
            alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'.,;:!?-()"
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 15))))
        if rng.random() < 0.5:
            parts.append(" ")
    text = "".join(parts)
    if rng.random() < 0.02:
        text = ""
    return text


# ---- tokenizer variants ---------------------------------------------------------------------

def load_fixture(fixtures, name):
    with lzma.open(os.path.join(fixtures, name, "tokenizer.json.xz"), "rt", encoding="utf-8") as f:
        return json.load(f)


def with_added(base, extra):
    """Appends added tokens (with fresh ids after the largest one)."""
    j = copy.copy(base)
    j["added_tokens"] = list(base["added_tokens"])
    vocab = base["model"]["vocab"]
    n = max([t["id"] for t in j["added_tokens"]] + [len(vocab) - 1]) + 1
    for t in extra:
        tok = {"id": n, "content": t["content"], "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": False, "special": False}
        tok.update(t)
        j["added_tokens"].append(tok)
        n += 1
    return j


def bytelevel_dec():
    return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def bytelevel_pre(prefix=False, regex=False):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


def spm_decoder(strip=True):
    d = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
         {"type": "ByteFallback"}, {"type": "Fuse"}]
    if strip:
        d.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": d}


def template(first, last=None):
    single = [{"SpecialToken": {"id": first, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    special = {first: {"id": first, "ids": [None], "tokens": [first]}}
    if last:
        single.append({"SpecialToken": {"id": last, "type_id": 0}})
        special[last] = {"id": last, "ids": [None], "tokens": [last]}
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special}


def fill_template(tp, j):
    ids = {t["content"]: t["id"] for t in j["added_tokens"]}
    for name, v in tp["special_tokens"].items():
        v["ids"] = [ids.get(name, j["model"]["vocab"].get(name))]
    return tp


def variants(fixtures):
    """Yields (name, tokenizer.json dict or None for the fixture as is)."""
    yield "llama3", None
    yield "qwen3", None
    yield "gemma3", None
    qwen = load_fixture(fixtures, "qwen3")
    flags = [
        {"content": "<mask>", "lstrip": True, "special": True},
        {"content": "[X]", "rstrip": True},
        {"content": "hello", "single_word": True, "normalized": True},
        {"content": "WORLD", "normalized": True},
        {"content": "<sep>", "lstrip": True, "rstrip": True, "single_word": True},
    ]
    j = with_added(qwen, flags)
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKD"}, {"type": "Replace", "pattern": {"Regex": "[\u0300-\u036f]"}, "content": ""},
        {"type": "Lowercase"}]}
    j["pre_tokenizer"] = bytelevel_pre(prefix=True, regex=True)
    j["decoder"] = bytelevel_dec()
    j["post_processor"] = fill_template(template("<|im_start|>", "<|im_end|>"), j)
    yield "qwen3-gpt2-lower", j

    j = with_added(qwen, flags)
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Prepend", "prepend": "@"}]}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[aeiou]+"}, "behavior": "Contiguous", "invert": True},
        {"type": "Split", "pattern": {"Regex": "\\s*"}, "behavior": "Isolated", "invert": False},
        {"type": "Punctuation", "behavior": "Isolated"},
        bytelevel_pre()]}
    j["decoder"] = bytelevel_dec()
    j["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|im_end|>", 151645],
                           "cls": ["<|im_start|>", 151644], "trim_offsets": True,
                           "add_prefix_space": False}
    yield "qwen3-splits", j

    j = copy.copy(qwen)
    j["normalizer"] = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "BertPreTokenizer"}, {"type": "Digits", "individual_digits": True}, bytelevel_pre()]}
    j["decoder"] = bytelevel_dec()
    yield "qwen3-bert", j

    j = copy.copy(qwen)
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": True, "strip_right": False}, {"type": "NFD"},
        {"type": "StripAccents"}]}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"Regex": "(?i:ab|c)"}, "behavior": "Removed", "invert": False},
        bytelevel_pre(prefix=True)]}
    j["decoder"] = bytelevel_dec()
    yield "qwen3-whitespace", j

    # Byte-level mapping done by a normalizer: the model sees mapped strings (generic BPE path).
    j = copy.copy(qwen)
    j["normalizer"] = {"type": "ByteLevel"}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\u0120?[^\u0120\u010a]+|[\u0120\u010a]+"},
         "behavior": "Isolated", "invert": False},
        {"type": "WhitespaceSplit"}]}
    j["decoder"] = bytelevel_dec()
    yield "qwen3-bytelevel-normalizer", j

    gemma = load_fixture(fixtures, "gemma3")
    j = copy.copy(gemma)
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                          "split": True}
    j["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True},
        {"type": "Fuse"}]}
    yield "gemma3-metaspace-first", j

    j = with_added(gemma, flags)
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    j["pre_tokenizer"] = None
    j["decoder"] = spm_decoder(strip=True)
    yield "gemma3-llama2-legacy", j

    j = copy.copy(gemma)
    j["normalizer"] = {"type": "NFC"}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "MergedWithPrevious"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}]}
    j["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                    "split": False}
    yield "gemma3-metaspace-always", j

    # Unigram over Gemma's pieces with synthetic (but fixed) scores.
    j = copy.copy(gemma)
    vocab = sorted(gemma["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [[p, -math.log(i + 2.0) - (len(p) % 3) * 0.01] for i, (p, _) in enumerate(vocab)]
    j["model"] = {"type": "Unigram", "unk_id": gemma["model"]["vocab"]["<unk>"],
                  "vocab": pieces, "byte_fallback": True}
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        {"type": "Prepend", "prepend": "\u2581"}]}
    j["pre_tokenizer"] = {"type": "Digits", "individual_digits": True}
    j["decoder"] = spm_decoder(strip=True)
    yield "gemma3-unigram", j

    j = copy.copy(j)
    j["model"] = dict(j["model"], byte_fallback=False)
    j["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"Regex": "\u2581+"}, "content": " "},
        {"type": "Strip", "content": " ", "start": 2, "stop": 0}]}
    yield "gemma3-unigram-unk", j


def write_tokenizer_json(path, j, model_cache):
    """Writes j; the (large) model section is serialized once per distinct model object."""
    key = id(j["model"])
    if key not in model_cache:
        model_cache[key] = (j["model"], json.dumps(j["model"], ensure_ascii=False))
    rest = {k: v for k, v in j.items() if k != "model"}
    text = json.dumps(rest, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:-1] + ', "model": ' + model_cache[key][1] + "}")


# ---- comparison -----------------------------------------------------------------------------

def run_kiln(kiln, tok_dir, requests):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests).encode("utf-8")
    p = subprocess.run([kiln, "tokenize", tok_dir, "--jsonl"], input=data, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"kiln tokenize {tok_dir} failed ({p.returncode}): "
                           f"{p.stderr.decode('utf-8', 'replace').strip()}")
    # Not splitlines(): decoded text may hold U+2028 or U+0085, which JSON leaves unescaped.
    lines = p.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(requests):
        raise RuntimeError(f"kiln returned {len(lines)} lines for {len(requests)} requests")
    return [json.loads(x) for x in lines]


def check_variant(name, tok_dir, kiln, n, seed):
    t0 = time.time()
    hf = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    rng = random.Random(f"{seed}-{name}")
    specials = [t.content for t in hf.get_added_tokens_decoder().values()]
    specials = sorted(specials)[:200] + ["<|im_start|>", "<start_of_turn>", "<|eot_id|>"]
    texts = [random_text(rng, specials) for _ in range(n)]
    enc0 = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    enc1 = [e.ids for e in hf.encode_batch(texts, add_special_tokens=True)]
    vocab_n = hf.get_vocab_size(with_added_tokens=True)
    rand_ids = [[rng.randrange(vocab_n + 3) for _ in range(rng.randint(1, 12))] for _ in range(n // 4)]
    id_lists = enc1 + rand_ids
    dec_keep = hf.decode_batch(id_lists, skip_special_tokens=False)
    dec_skip = hf.decode_batch(id_lists, skip_special_tokens=True)

    requests, expected, what = [], [], []
    for t, a, b in zip(texts, enc0, enc1):
        requests += [{"text": t, "special": False}, {"text": t, "special": True}]
        expected += [a, b]
        what += [("encode", t), ("encode+special", t)]
    for ids, k, s in zip(id_lists, dec_keep, dec_skip):
        requests += [{"ids": ids, "special": True}, {"ids": ids, "special": False}]
        expected += [k, s]
        what += [("decode", ids), ("decode skip_special", ids)]
    got = run_kiln(kiln, tok_dir, requests)
    return report(name, requests, expected, got, what,
                  f"{n} strings, {len(id_lists)} id lists, HF tokenizers", t0)


def train_spm(model_type, seed, **opts):
    """Trains a small SentencePiece model on generated text; returns the serialized proto."""
    import io
    import sentencepiece as spm
    rng = random.Random(f"spm-{seed}-{model_type}")
    # A narrow alphabet, so the tests' wider text also exercises unknown chars.
    keep = set("語日本中文한국어😀éüßñ")
    corpus = ["".join(c for c in random_text(rng, []) if ord(c) < 0x180 or c in keep)
              for _ in range(3000)]
    corpus = [c.replace("\n", " ") for c in corpus if c.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type=model_type,
        normalization_rule_name="identity", character_coverage=0.9995, num_threads=1,
        minloglevel=2, **opts)
    return out.getvalue()


def check_spm(name, tok_dir, kiln, n, seed):
    """kiln loading tokenizer.model vs the sentencepiece library, on text without specials."""
    import sentencepiece as spm
    t0 = time.time()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    rng = random.Random(f"{seed}-{name}")
    texts = [random_text(rng, []) for _ in range(n)]
    enc = [sp.encode(t) for t in texts]
    # kiln follows transformers' conversion of the model, whose decoding differs from
    # sentencepiece's own for byte pieces in random order (a run of byte pieces that is not valid
    # UTF-8 becomes one U+FFFD per byte; a leading byte-piece space is stripped) and for
    # <unk> (a special token, skipped): random ids avoid those pieces, and sequences holding
    # <unk> are not decoded.
    plain = [i for i in range(sp.get_piece_size())
             if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    rand_ids = [[rng.choice(plain) for _ in range(rng.randint(1, 12))] for _ in range(n // 4)]
    dec_ids = [ids for ids in enc + rand_ids if not any(sp.is_unknown(i) for i in ids)]
    dec = [sp.decode(ids) for ids in dec_ids]
    requests, expected, what = [], [], []
    for t, ids in zip(texts, enc):
        requests.append({"text": t, "special": False})
        expected.append(ids)
        what.append(("encode", t))
        requests.append({"text": t, "special": True})
        expected.append([sp.bos_id()] + ids)
        what.append(("encode+special", t))
    for ids, d in zip(dec_ids, dec):
        requests.append({"ids": ids, "special": False})
        expected.append(d)
        what.append(("decode skip_special", ids))
    got = run_kiln(kiln, tok_dir, requests)
    return report(name, requests, expected, got, what, f"{n} strings, sentencepiece", t0)


def report(name, requests, expected, got, what, info, t0):
    bad = [(w, e, g) for w, e, g in zip(what, expected, got) if e != g]
    print(f"{name}: {len(requests) - len(bad)}/{len(requests)} match "
          f"({info}, {time.time() - t0:.1f}s)", flush=True)
    for (kind, inp), e, g in bad[:5]:
        print(f"  MISMATCH {kind} {json.dumps(inp, ensure_ascii=False)[:300]}\n"
              f"    ref:  {json.dumps(e, ensure_ascii=False)[:300]}\n"
              f"    kiln: {json.dumps(g, ensure_ascii=False)[:300]}", flush=True)
    return len(requests) - len(bad), len(bad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", required=True, help="path to the kiln binary")
    ap.add_argument("--fixtures", default=os.path.join(HERE, "fixtures", "tokenizers"))
    ap.add_argument("--n", type=int, default=2000, help="random strings per fixture tokenizer")
    ap.add_argument("--n-synthetic", type=int, default=600,
                    help="random strings per synthetic tokenizer variant")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    args = ap.parse_args()
    print(f"tokenizers {HF_VERSION}, kiln {args.kiln}", flush=True)
    if not os.access(args.kiln, os.X_OK):
        print(f"error: kiln binary not found at {args.kiln}", file=sys.stderr)
        return 1
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="kiln_tokdiff_") as tmp, \
            ThreadPoolExecutor(max_workers=2) as ex:
        # Variants are checked (kiln and HF, two at a time) while the next ones are written.
        futures = []
        model_cache = {}
        for name, j in variants(args.fixtures):
            if args.only and name not in args.only:
                continue
            d = os.path.join(tmp, name)
            os.makedirs(d)
            if j is None:
                src = os.path.join(args.fixtures, name)
                with lzma.open(os.path.join(src, "tokenizer.json.xz"), "rb") as f, \
                        open(os.path.join(d, "tokenizer.json"), "wb") as g:
                    g.write(f.read())
                with open(os.path.join(src, "tokenizer_config.json"), "rb") as f, \
                        open(os.path.join(d, "tokenizer_config.json"), "wb") as g:
                    g.write(f.read())
                n = args.n
            else:
                write_tokenizer_json(os.path.join(d, "tokenizer.json"), j, model_cache)
                n = args.n_synthetic
            futures.append(ex.submit(check_variant, name, d, args.kiln, n, args.seed))
        # SentencePiece tokenizer.model files (no tokenizer.json): BPE with byte fallback as in
        # Llama 2, and Unigram.
        spm_variants = [
            ("spm-bpe", dict(model_type="bpe", vocab_size=800, byte_fallback=True,
                             add_dummy_prefix=True, remove_extra_whitespaces=False)),
            ("spm-unigram", dict(model_type="unigram", vocab_size=1000, byte_fallback=False,
                                 add_dummy_prefix=True, remove_extra_whitespaces=True)),
        ]
        for name, opts in spm_variants:
            if args.only and name not in args.only:
                continue
            d = os.path.join(tmp, name)
            os.makedirs(d)
            with open(os.path.join(d, "tokenizer.model"), "wb") as f:
                f.write(train_spm(opts.pop("model_type"), args.seed, **opts))
            futures.append(ex.submit(check_spm, name, d, args.kiln, args.n_synthetic, args.seed))
        results = [f.result() for f in futures]
    for p, f in results:
        passed += p
        failed += f
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
