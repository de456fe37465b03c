"""How well does transformers itself do in BF16 on the parity fixtures? Teacher-forced greedy
agreement (argmax after the prompt and after each reference token, against the FP32 reference's
greedy tokens) and max relative logit error at the prompt positions, for comparison with
tests/test_cuda_parity.cpp's BF16 criteria.

usage: python3 bench/hf_bf16_agreement.py [fixture ...]
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

FIXTURES = ["llama", "llama31_rope", "mistral_swa", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3_text", "gpt2", "mixtral", "phi3", "qwen2_moe"]


def main():
    for name in sys.argv[1:] or FIXTURES:
        d = f"tests/fixtures/hf/{name}"
        ref = json.load(open(f"{d}/reference.json"))
        ref_logits = load_file(f"{d}/reference.safetensors")
        for dt in (torch.float32, torch.bfloat16):
            try:
                m = AutoModelForCausalLM.from_pretrained(d, dtype=dt)
            except TypeError:
                m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=dt)
            m = m.cuda().eval()
            agree = steps = 0
            worst = 0.0
            for j, (p, g) in enumerate(zip(ref["prompts"], ref["greedy"])):
                ids = torch.tensor([p + g[:-1]], device="cuda")
                with torch.no_grad():
                    lg = m(ids).logits[0].float()
                pred = lg[len(p) - 1:].argmax(-1).tolist()
                agree += sum(int(a == b) for a, b in zip(pred, g))
                steps += len(g)
                want = ref_logits[f"logits_{j}"].cuda()
                got = lg[:len(p)]
                err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
                worst = max(worst, err)
            print(f"[hf {str(dt).replace('torch.', '')}] {name:14s} max rel err {worst:.2e} | "
                  f"greedy teacher-forced {agree}/{steps}", flush=True)


if __name__ == "__main__":
    main()
