"""Peer numbers for docs/perf.md: Hugging Face transformers, BF16, SDPA attention, random weights
of the given config, on the GPU. Prints llama-bench-like rows: pp (one forward over `pp` random
tokens, last-position logits) and tg (greedy generate of `tg` tokens from a 1-token prompt,
eager decode with the default dynamic cache), each the median of `reps` timed runs after a
warm-up.

usage: python3 bench/hf_peer.py <config-dir> <pp> <tg> <reps>
"""
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    cfg_dir, pp, tg, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    vocab = cfg.vocab_size
    name = f"{cfg.architectures[0]} bf16 (transformers {transformers.__version__}, torch {torch.__version__}, sdpa)"

    def timed(fn):
        fn()  # warm-up
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, vocab, (1, pp), device="cuda", generator=g)

    def prefill():
        with torch.no_grad():
            try:
                model(ids, use_cache=False, logits_to_keep=1)
            except TypeError:
                model(ids, use_cache=False)

    one = torch.randint(0, vocab, (1, 1), device="cuda", generator=g)

    def generate():
        with torch.no_grad():
            out = model.generate(one, max_new_tokens=tg, min_new_tokens=tg, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == tg + 1, out.shape

    t_pp = timed(prefill)
    t_tg = timed(generate)
    print(f"| {name} | pp{pp} | {pp / t_pp:.2f} t/s |")
    print(f"| {name} | tg{tg} | {tg / t_tg:.2f} t/s |")


if __name__ == "__main__":
    main()
