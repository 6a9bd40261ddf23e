#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers for the CPU reference backend.

For each case: `ernie make-model` writes a synthetic checkpoint, transformers loads it with
Ernie4_5_MoeForCausalLM in float32, and greedy decoding (full recompute every step, eager
attention) records the chosen tokens and the top-5 log-probabilities of every step.
The fixture stores the make-model arguments and the resulting config, so the C++ test can
rebuild the identical checkpoint (weights are deterministic per seed on every machine).

Usage: tools/make_golden.py --ernie build/ernie --out tests/golden [--device cuda]
Needs: torch, transformers (>= 5), safetensors.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import Ernie4_5_MoeForCausalLM

STEPS = 24
TOP = 5
PROMPT_LENGTHS = [1, 6, 17, 64, 100]

# Each case covers features the reference must get right (see tests/golden/README.md).
CASES = [
    {
        "name": "tiny_shared_tied_gqa",
        "seed": 11,
        # tiny preset: 4 layers (layer 0 dense, 1-3 MoE, end index -1), GQA 4/2, head_dim 48,
        # 16 experts top-4, 2 shared experts, tied head.
        "sets": [],
    },
    {
        "name": "untied_mqa_interval2_noshared",
        "seed": 22,
        "sets": [
            "tie_word_embeddings=false",
            "moe_num_shared_experts=0",
            "num_hidden_layers=6",
            "num_key_value_heads=1",
            "head_dim=32",
            "moe_layer_start_index=2",
            "moe_layer_interval=2",
        ],
    },
    {
        "name": "mha_hd128_k8_moe_first",
        "seed": 33,
        "sets": [
            "num_attention_heads=2",
            "num_key_value_heads=2",
            "head_dim=128",
            "moe_num_experts=24",
            "moe_k=8",
            "moe_num_shared_experts=1",
            "moe_layer_start_index=0",
            "moe_layer_end_index=2",
            "rope_theta=10000.0",
        ],
    },
]


def bias_changes_selection(model, input_ids):
    """Fraction of (token, MoE layer) pairs whose top-k differs with vs without the bias."""
    changed, total = 0, 0
    hooks = []

    def hook(module, args):
        nonlocal changed, total
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        # transformers 5 keeps the router weight on a router module that owns moe_statics;
        # 4.x kept both on the MoE block as .gate and .moe_statics.
        weight = module.weight if isinstance(getattr(module, "weight", None), torch.Tensor) else module.gate.weight
        p = torch.softmax(torch.nn.functional.linear(x, weight.float()), dim=-1)
        k = module.top_k
        bias = module.moe_statics.e_score_correction_bias.reshape(-1)
        biased = torch.topk(p + bias, k).indices
        plain = torch.topk(p, k).indices
        same = (biased.sort(-1).values == plain.sort(-1).values).all(-1)
        changed += int((~same).sum())
        total += same.numel()

    for module in model.modules():
        if hasattr(module, "moe_statics") and hasattr(module, "top_k"):
            hooks.append(module.register_forward_pre_hook(hook))
    if not hooks:
        raise RuntimeError("found no MoE router in the transformers model")
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return changed / max(total, 1)


def bf16_deviation(path, prompts, device):
    """How far transformers itself moves in bfloat16: the largest |logprob difference| over the
    float32 run's top tokens, teacher-forced on the float32 greedy tokens. A bf16 engine is
    judged against this scale."""
    model = Ernie4_5_MoeForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager").to(device).eval()
    worst = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = p["prompt"] + p["tokens"][:-1]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
            lp = torch.log_softmax(logits.double(), dim=-1)
            first = len(p["prompt"]) - 1
            for s, top in enumerate(p["top_logprobs"]):
                for tok, want in top:
                    worst = max(worst, abs(float(lp[first + s, tok]) - want))
    return worst


def run_case(case, ernie, device):
    with tempfile.TemporaryDirectory() as d:
        args = ["make-model", "--preset", "tiny", "--seed", str(case["seed"]), "--out", d]
        for s in case["sets"]:
            args += ["--set", s]
        subprocess.run([ernie] + args, check=True)
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        model = Ernie4_5_MoeForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager").to(device).eval()
        rng = random.Random(case["seed"])
        vocab = config["vocab_size"]
        prompts = []
        for n in PROMPT_LENGTHS:
            prompt = [rng.randrange(3, vocab) for _ in range(n)]
            ids = list(prompt)
            tokens, top = [], []
            with torch.no_grad():
                for _ in range(STEPS):
                    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
                    lp = torch.log_softmax(logits.double(), dim=-1)
                    v, i = torch.topk(lp, TOP)
                    top.append([[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())])
                    nxt = int(torch.argmax(logits))
                    tokens.append(nxt)
                    ids.append(nxt)
            prompts.append({"prompt": prompt, "tokens": tokens, "top_logprobs": top})
        frac = bias_changes_selection(model, torch.tensor([prompts[-1]["prompt"]], device=device))
        bf16_diff = bf16_deviation(d, prompts, device)
        print(f"{case['name']}: transformers in bfloat16 differs by up to {bf16_diff:.3f} in the "
              "reference's top logprobs", file=sys.stderr)
        print(f"{case['name']}: bias changes the selection for {frac:.1%} of token-layers",
              file=sys.stderr)
        return {
            "name": case["name"],
            "make_model_args": args[1:args.index("--out")] + sum((["--set", s] for s in case["sets"]), []),
            "config": config,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "device": device,
            "steps": STEPS,
            "bias_changed_selection_fraction": frac,
            "bf16_max_logprob_diff": bf16_diff,
            "prompts": prompts,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ernie", required=True, help="path to the ernie binary")
    ap.add_argument("--out", required=True, help="fixture directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    # Full f32 everywhere: no TF32 shortcuts in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(a.out, exist_ok=True)
    for case in CASES:
        fixture = run_case(case, a.ernie, a.device)
        path = os.path.join(a.out, case["name"] + ".json")
        with open(path, "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
        print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
