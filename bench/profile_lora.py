"""Where a compiled LoRA step goes: torch.profiler shares of matmuls and everything else.

    python bench/profile_lora.py [--dtype bf16] [--attention matmul]

Builds the ``bench_lora.py`` tunesmith model (SmolLM2-135M shape, batch 4 × 256, LoRA r=8 q/v),
compiled as ``compile=true`` does, runs two warm-up steps and profiles two more. Prints the ops
with the largest share of self CPU time and the matmuls' total share: the part of the step that
the floor share (training/flops.py) can account for. Shares, unlike seconds, barely move with
the machine's load.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from bench_lora import tunesmith_model
from tunesmith.training.losses import CrossEntropyLoss
from tunesmith.training.setup import build_optimizer, compile_model_and_loss

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--attention", default="matmul", choices=["sdpa", "matmul"])
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = tunesmith_model("smollm2_135m", dtype, torch.device("cpu"), attention=args.attention)
    loss_fn = CrossEntropyLoss()
    compile_model_and_loss(model, loss_fn)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-4, 0.0)
    tokens = torch.randint(0, model.config.vocab_size, (4, 256))

    def step() -> None:
        loss = loss_fn(model.hidden_states(tokens), tokens, model.logits) / tokens.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile() as prof:
        for _ in range(2):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    for e in rows[:10]:
        print(f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.key[:90]}")
    share = sum(e.self_cpu_time_total for e in rows if e.key in MATMULS) / total
    print(f"matmuls: {100 * share:.1f}% of the step's self CPU time ({args.dtype}, attention={args.attention}, compiled)")


if __name__ == "__main__":
    main()
