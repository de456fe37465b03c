"""Does transformers' own BF16 forward route the MoE parity fixtures as its float64 forward does?

For each fixture and prompt: the float64 and the bfloat16 model run the prompt; every MoE router's
choice (the top-k expert set of each token) is recorded through forward hooks, and each prompt
position reports its BF16 logit error (||bf16 - f64|| / ||f64||, as tests/test_cuda_parity.cpp
measures kiln) beside the layers where BF16 chose a different expert set. It also prints the
smallest float64 routing margin (k-th best minus (k+1)-th best score) at each flipped choice.

Runs on the GPU when torch sees one, else on the CPU (a few seconds per fixture; the CPU's BF16
matmuls round like the GPU's at these sizes, but the flips need not be the same ones).
tests/fixtures/make_hf_fixtures.py now checks the same thing (and more) before it accepts a MoE
fixture's seed.

usage: python3 bench/hf_moe_routing.py [fixture ...]   (default: gpt_oss deepseek_v3 qwen3_moe)
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

# The GPU if there is one: transformers' BF16 kernels there are the ones users run.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def load(d, dt):
    # Eager attention and experts, as the fixtures' float64 references were made (grouped_mm
    # has no float64 kernel).
    kw = {"attn_implementation": "eager", "experts_implementation": "eager"}
    try:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dt, **kw)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=dt, **kw)
    return m.to(DEV).eval()


def routers(model):
    """(name, module) of each router: a module named *router / *gate inside an MLP whose output
    carries the expert choice (indices) or the logits over experts."""
    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("router", "gate") and ".mlp." in name + ".":
            out.append((name, mod))
    return out


def choice(output, k, n_experts):
    """[tokens, k] sorted expert ids, and [tokens] margins (k-th minus (k+1)-th score; nan when
    only indices are visible) from a router's output."""
    ts = output if isinstance(output, (tuple, list)) else (output,)
    ints = [t for t in ts if torch.is_tensor(t) and not t.is_floating_point()]
    floats = [t for t in ts if torch.is_tensor(t) and t.is_floating_point()
              and t.shape[-1] == n_experts]
    scores = floats[0].reshape(-1, n_experts).double() if floats else None
    if ints:
        idx = ints[0].reshape(-1, ints[0].shape[-1])
    else:
        idx = scores.topk(k, dim=-1).indices
    margin = torch.full((idx.shape[0],), float("nan"), dtype=torch.float64, device=idx.device)
    if scores is not None and k < n_experts:
        top = scores.topk(k + 1, dim=-1).values
        margin = top[:, k - 1] - top[:, k]
    return idx.sort(dim=-1).values, margin


def run(model, ids, k, n_experts):
    rec = {}
    hooks = []
    for name, mod in routers(model):
        def hook(m, i, o, name=name):
            rec[name] = choice(o, k, n_experts)
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    for h in hooks:
        h.remove()
    return logits, rec


def main():
    for name in sys.argv[1:] or ["gpt_oss", "deepseek_v3", "qwen3_moe"]:
        d = f"tests/fixtures/hf/{name}"
        cfg = json.load(open(f"{d}/config.json"))
        ref = json.load(open(f"{d}/reference.json"))
        k = cfg.get("num_experts_per_tok", 2)
        n_experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get(
            "num_experts")
        m64, m16 = load(d, torch.float64), load(d, torch.bfloat16)
        worst_flip, worst_kept, flips = 0.0, 0.0, 0
        for j, p in enumerate(ref["prompts"]):
            ids = torch.tensor([p], device=DEV)
            l64, r64 = run(m64, ids, k, n_experts)
            l16, r16 = run(m16, ids, k, n_experts)
            err = ((l16 - l64).norm(dim=-1) / l64.norm(dim=-1)).tolist()
            flipped = [[] for _ in p]
            for layer, (i64, mg) in r64.items():
                i16, _ = r16[layer]
                for pos in range(len(p)):
                    if not torch.equal(i64[pos], i16[pos]):
                        flipped[pos].append(f"{layer}(margin {mg[pos].item():.2e})")
            for pos, e in enumerate(err):
                if flipped[pos]:
                    flips += 1
                    worst_flip = max(worst_flip, e)
                else:
                    worst_kept = max(worst_kept, e)
                if flipped[pos] or e > 2e-2:
                    print(f"  {name} prompt {j} pos {pos}: bf16 err {e:.2e}; flips: "
                          f"{', '.join(flipped[pos]) or 'none'}")
        print(f"[hf routing] {name:12s} routers {len(routers(m64))} | positions with a BF16 "
              f"routing flip {flips}, worst err there {worst_flip:.2e} | worst err elsewhere "
              f"{worst_kept:.2e}", flush=True)


if __name__ == "__main__":
    main()
