#!/usr/bin/env python3
"""Hugging Face transformers reference numbers for a GGUF model: perplexity and greedy text.

What it computes, for one GGUF file:
  * loads the file with transformers (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)),
    which dequantizes every GGUF tensor with the `gguf` package (numpy, float32) and casts it to
    --dtype (float32 default; float64, bfloat16); eager attention, eval mode, no KV cache;
  * perplexity with llama-perplexity's convention on the token ids of --text as the vocab
    tokenizes it WITH its special tokens (kiln tokenize --special, which matches llama.cpp):
    chunks of --ctx tokens (512), n_chunks = min(len(ids) // ctx, --chunks (16)), the first
    token of each chunk replaced by BOS when the vocab adds BOS (GGUF
    tokenizer.ggml.add_bos_token; SmolLM2: no, Gemma 3: yes, id 2), logits of the chunk from
    one forward, positions p in [ctx/2, ctx-1) scored: nll of token p+1 under log_softmax of
    the logits at p, computed in float64.  PPL = exp(mean nll),
    stderr = sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)) * PPL (llama-perplexity's
    "+/-"), and the running PPL after each chunk (what llama-perplexity prints as [i]x.xx);
  * greedy continuations: --n-gen (32) new tokens by argmax over full forwards of the whole
    sequence (no cache, no generate()) for each prompt tokenized by kiln with the special
    tokens; records the ids, each step's top-2 logit margin, and the decoded text;
  * optionally (--check-hf-tokenizer) whether transformers' own tokenizer of the GGUF
    (AutoTokenizer.from_pretrained(dir, gguf_file=...)) gives the same ids as kiln for the
    text, the prompts and the cases of a llama.cpp tokens JSON (--cases, a list of
    {"text", "ids"} made with llama-tokenize --no-bos).
It prints everything and writes it as JSON (--out).

Token ids come from kiln (`kiln tokenize FILE --special < text`), so that kiln, llama.cpp and
this script score the same ids; --tokenizer hf uses transformers' tokenizer instead (it
differs from llama.cpp's: see --check-hf-tokenizer; for Gemma 3 (transformers 5.x) it is badly
wrong, because the GGUF's BPE-ranked SentencePiece vocab is loaded as a Unigram model).
--ids-json FILE gives the text's ids directly (a JSON array), e.g. ids made elsewhere.

Requirements: torch, transformers (>= 4.5x; tested with 5.17), gguf, accelerate, numpy.
kiln is needed only for tokenizing (and --decode of the continuations).

Usage (CPU; a few minutes per model on 2 cores):
  python tests/gguf_reference.py MODEL.gguf --text ppl_text.txt --kiln build/kiln \
      --dtype float32 --threads 2 --out ref.json [--check-hf-tokenizer --cases tokens.json]
On a GPU machine (where torch with CUDA is), add --device cuda (TF32 is disabled so that
float32 means float32); the token ids can be made beforehand with kiln and passed with
--ids-json / --prompt-ids-json if kiln is not built there.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def log(*a):
    print(*a, flush=True)


def run_kiln(kiln, args, stdin_text, retries=10, wait_s=60):
    """Runs kiln (retrying while the binary is missing, e.g. during a rebuild)."""
    for attempt in range(retries + 1):
        if os.path.exists(kiln):
            r = subprocess.run([kiln] + args, input=stdin_text.encode("utf-8"), capture_output=True)
            if r.returncode == 0:
                return r.stdout.decode("utf-8")
            err = r.stderr.decode("utf-8", "replace")
        else:
            err = "missing binary"
        if attempt == retries:
            raise RuntimeError(f"kiln {' '.join(args)} failed: {err}")
        log(f"  kiln {args[0]} failed ({err.strip()[:200]}); retrying in {wait_s}s")
        time.sleep(wait_s)


def kiln_tokenize(kiln, gguf_path, text, special=True):
    args = ["tokenize", gguf_path] + (["--special"] if special else [])
    return json.loads(run_kiln(kiln, args, text))


def kiln_decode(kiln, gguf_path, ids):
    return run_kiln(kiln, ["tokenize", gguf_path, "--decode"], json.dumps(ids))


def gguf_vocab_info(gguf_path):
    """add_bos and bos id as llama.cpp reads them from the GGUF metadata."""
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)

    def field(name, default=None):
        f = r.fields.get(name)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    # llama.cpp's default when the key is absent: SPM ("llama") and WPM add BOS, BPE does not.
    add_bos = field("tokenizer.ggml.add_bos_token", model in ("llama", "bert"))
    return {"arch": field("general.architecture"), "tokenizer_model": model,
            "tokenizer_pre": field("tokenizer.ggml.pre"), "add_bos": bool(add_bos),
            "bos_id": field("tokenizer.ggml.bos_token_id"),
            "eos_id": field("tokenizer.ggml.eos_token_id")}


def perplexity(model, torch, ids, ctx, n_chunks_max, add_bos, bos_id, device):
    n_chunks = min(len(ids) // ctx, n_chunks_max)
    if n_chunks < 1:
        raise SystemExit(f"need at least {ctx} tokens, have {len(ids)}")
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running, per_chunk, chunk_secs, nlls, argmax_ids = [], [], [], [], []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        targets = chunk[first + 1:]  # tokens p+1 for p in [first, ctx-1), as in the file
        if add_bos:
            chunk[0] = bos_id
        t0 = time.time()
        with torch.inference_mode():
            x = torch.tensor([chunk], dtype=torch.long, device=device)
            # logits_to_keep: the lm_head only for positions [first, ctx) (same numbers).
            logits = model(input_ids=x, use_cache=False, logits_to_keep=ctx - first).logits[0]
            logits = logits[:-1].to(torch.float64)  # positions first .. ctx-2
            lsm = torch.log_softmax(logits, dim=-1)
            t = torch.tensor(targets, dtype=torch.long, device=lsm.device)
            lp = lsm.gather(1, t[:, None])[:, 0].cpu()
            am = logits.argmax(dim=-1).cpu()
        chunk_secs.append(time.time() - t0)
        lp = lp.tolist()
        c_nll = [-v for v in lp]
        nlls.append(c_nll)
        argmax_ids.append(am.tolist())
        nll_sum += sum(c_nll)
        nll2_sum += sum(v * v for v in c_nll)
        count += len(c_nll)
        per_chunk.append(math.exp(sum(c_nll) / len(c_nll)))
        running.append(math.exp(nll_sum / count))
        log(f"  chunk {c + 1}/{n_chunks}: ppl {per_chunk[-1]:.4f}  running {running[-1]:.4f}"
            f"  ({chunk_secs[-1]:.1f}s)")
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 else 0.0
    return {"ctx": ctx, "n_chunks": n_chunks, "n_tokens_text": len(ids), "first_scored": first,
            "count": count, "mean_nll": mean, "ppl": ppl, "ppl_stderr": stderr,
            "running_ppl": running, "per_chunk_ppl": per_chunk, "chunk_seconds": chunk_secs,
            "nll": nlls, "argmax_ids": argmax_ids,
            "argmax_ids_note": "argmax of the logits at positions ctx/2 .. ctx-2 of each chunk"}


def greedy(model, torch, prompt_ids, n_gen, device):
    ids = list(prompt_ids)
    out, margins, top2 = [], [], []
    t0 = time.time()
    with torch.inference_mode():
        for _ in range(n_gen):
            x = torch.tensor([ids], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1]
            logits = logits.to(torch.float64).cpu()
            v, i = torch.topk(logits, 2)
            nxt = int(torch.argmax(logits))  # first maximum on ties
            out.append(nxt)
            margins.append(float(v[0] - v[1]))
            top2.append([int(i[0]), int(i[1])])
            ids.append(nxt)
    return {"prompt_ids": list(prompt_ids), "generated_ids": out, "top2_margin": margins,
            "top2_ids": top2, "min_margin": min(margins), "seconds": time.time() - t0}


def first_diff(a, b):
    for j in range(min(len(a), len(b))):
        if a[j] != b[j]:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="the .gguf file")
    ap.add_argument("--text", help="text for the perplexity (e.g. /work/gguf/peer/ppl_text.txt)")
    ap.add_argument("--ids-json", help="token ids of the text (JSON array) instead of tokenizing --text")
    ap.add_argument("--kiln", default="build/kiln", help="kiln binary, for tokenizing and decoding")
    ap.add_argument("--tokenizer", choices=["kiln", "hf"], default="kiln")
    ap.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--prompt", action="append", help="greedy prompt (repeatable); default: 3 prompts")
    ap.add_argument("--prompt-ids-json", help="JSON list of id lists for the prompts (instead of tokenizing)")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--check-hf-tokenizer", action="store_true",
                    help="compare transformers' tokenizer of the GGUF with the ids used")
    ap.add_argument("--cases", help="llama-tokenize cases JSON ([{text, ids}], no BOS) for --check-hf-tokenizer")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.abspath(a.gguf)
    gdir, gname = os.path.split(gguf_path)
    vocab = gguf_vocab_info(gguf_path)
    prompts = a.prompt or DEFAULT_PROMPTS
    res = {"gguf": gguf_path, "dtype": a.dtype, "device": a.device,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "vocab": vocab,
           "tokenizer": a.tokenizer, "timings": {}}
    log(f"{gname}: dtype {a.dtype}, device {a.device}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    log(f"  vocab: {vocab}")
    t_start = time.time()

    hf_tok = None
    if a.tokenizer == "hf" or a.check_hf_tokenizer:
        t0 = time.time()
        hf_tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        res["timings"]["hf_tokenizer_load_s"] = time.time() - t0

    def tokenize(text):
        if a.tokenizer == "kiln":
            return kiln_tokenize(a.kiln, gguf_path, text, special=True)
        return hf_tok(text, add_special_tokens=True)["input_ids"]

    # --- token ids
    text = open(a.text, encoding="utf-8").read() if a.text else None
    ppl_ids = None
    if not a.no_ppl:
        if a.ids_json:
            ppl_ids = json.load(open(a.ids_json))
            res["ids_source"] = a.ids_json
        elif text is not None:
            ppl_ids = tokenize(text)
            res["ids_source"] = a.tokenizer
        else:
            raise SystemExit("--text or --ids-json is needed for the perplexity (or --no-ppl)")
        res["text"] = a.text
        log(f"  text: {len(ppl_ids)} tokens, first {ppl_ids[:8]}")
    prompt_ids = None
    if not a.no_greedy:
        prompt_ids = (json.load(open(a.prompt_ids_json)) if a.prompt_ids_json
                      else [tokenize(p) for p in prompts])

    # --- transformers' tokenizer vs the ids used
    if a.check_hf_tokenizer:
        chk = {}
        if ppl_ids is not None and text is not None:
            h = hf_tok(text, add_special_tokens=True)["input_ids"]
            chk["text"] = {"equal": h == ppl_ids, "n_hf": len(h), "n_ids": len(ppl_ids),
                           "first_diff": first_diff(ppl_ids, h)}
        if prompt_ids is not None:
            chk["prompts"] = []
            for p, ids in zip(prompts, prompt_ids):
                h = hf_tok(p, add_special_tokens=True)["input_ids"]
                chk["prompts"].append({"prompt": p, "equal": h == ids, "hf": h, "ids": ids})
        if a.cases:
            cases = json.load(open(a.cases, encoding="utf-8"))
            diffs = []
            for c in cases:
                h = hf_tok(c["text"], add_special_tokens=False)["input_ids"]
                if h != c["ids"]:
                    diffs.append({"text": c["text"], "ref": c["ids"], "hf": h})
            chk["cases"] = {"file": a.cases, "n": len(cases), "n_equal": len(cases) - len(diffs),
                            "diffs": diffs}
        res["hf_tokenizer_check"] = chk
        log("  transformers tokenizer vs ids used: " + json.dumps(
            {k: (v if k != "cases" else {kk: vv for kk, vv in v.items() if kk != "diffs"})
             for k, v in chk.items() if k != "prompts"}))
        for p in chk.get("prompts", []):
            log(f"    prompt {p['prompt']!r}: equal {p['equal']} (hf {p['hf']}, ids {p['ids']})")

    # --- model
    t0 = time.time()
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=dtype,
                                                 attn_implementation="eager")
    model = model.to(a.device).eval()
    res["timings"]["load_s"] = time.time() - t0
    cfg = model.config.to_dict()
    res["config"] = {k: cfg.get(k) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps",
        "rope_parameters", "sliding_window", "layer_types", "query_pre_attn_scalar",
        "tie_word_embeddings", "final_logit_softcapping", "attn_logit_softcapping")
        if k in cfg}
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    res["lm_head_tied"] = tied
    log(f"  loaded {type(model).__name__} in {res['timings']['load_s']:.1f}s, lm_head tied: {tied}")
    log(f"  config: {json.dumps(res['config'])}")

    # --- perplexity
    if ppl_ids is not None:
        t0 = time.time()
        log(f"  perplexity: ctx {a.ctx}, chunks <= {a.chunks}, BOS first: {vocab['add_bos']}")
        r = perplexity(model, torch, ppl_ids, a.ctx, a.chunks, vocab["add_bos"], vocab["bos_id"], a.device)
        res["perplexity"] = r
        res["timings"]["ppl_s"] = time.time() - t0
        log(f"  PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f}  ({r['count']} tokens, "
            f"{res['timings']['ppl_s']:.1f}s)")
        log("  running: " + " ".join(f"{v:.4f}" for v in r["running_ppl"]))

    # --- greedy
    if prompt_ids is not None:
        t0 = time.time()
        res["greedy"] = []
        for p, ids in zip(prompts, prompt_ids):
            g = greedy(model, torch, ids, a.n_gen, a.device)
            g["prompt"] = p
            try:
                g["text"] = kiln_decode(a.kiln, gguf_path, g["generated_ids"]) \
                    if a.tokenizer == "kiln" else None
            except Exception as e:  # decoding is informational only
                g["text"] = None
                log(f"  (kiln decode failed: {e})")
            if g["text"] is None and hf_tok is not None:
                g["text"] = hf_tok.decode(g["generated_ids"])
            res["greedy"].append(g)
            log(f"  greedy {p!r} (prompt ids {ids}):")
            log(f"    text: {g['text']!r}")
            log(f"    ids: {g['generated_ids']}")
            log(f"    min top-2 margin {g['min_margin']:.4f} at step "
                f"{g['top2_margin'].index(g['min_margin'])}; margins "
                + " ".join(f"{m:.3f}" for m in g["top2_margin"]))
        res["timings"]["greedy_s"] = time.time() - t0

    res["timings"]["total_s"] = time.time() - t_start
    log(f"  timings: {json.dumps({k: round(v, 1) for k, v in res['timings'].items()})}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, ensure_ascii=False, indent=1)
        log(f"  wrote {a.out}")


if __name__ == "__main__":
    main()
