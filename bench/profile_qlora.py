"""Where a QLoRA step goes: torch.profiler shares of NF4 dequantization, matmuls and the rest.

    python bench/profile_qlora.py [--dtype bf16] [--steps 2] [--nf4-all]

Builds the ``bench_qlora.py`` tunesmith model (SmolLM2-135M shape, batch 4 × 256, LoRA r=8 q/v,
adapted layers' base in NF4; ``--nf4-all``: every block linear), eager (the profiler sees every
op; compile fuses the pointwise work but not torchao's dequantization, which runs outside the
graph), and prints each group's share of the profiled CPU time over ``--steps`` steps after one
warm-up. Shares, unlike seconds, barely move with the machine's load.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_lora import TARGETS, random_batches, tunesmith_model
from bench_qlora import quantize_every_block_linear

GROUPS = {  # op names → group
    "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nf4-all", action="store_true")
    args = ap.parse_args()
    from tunesmith.training.losses import CrossEntropyLoss
    from tunesmith.training.setup import build_optimizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = tunesmith_model("smollm2_135m", dtype, torch.device("cpu"), quantize_base=True, attention="sdpa")
    if args.nf4_all:
        quantize_every_block_linear(model)
    loss_fn = CrossEntropyLoss(chunk_size=256)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 1e-4, 0.0)
    batches = random_batches(model.config.vocab_size if hasattr(model, "config") else 49152, 4, 256, args.steps + 1)

    def step(b):
        loss = loss_fn(model.hidden_states(b["tokens"]), b["labels"], model.logits) / b["labels"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    # torchao's NF4 linear dequantizes with get_original_weight (forward, and again in backward for
    # the input gradient): label each call, so its inclusive time is the dequantization's.
    from torch.profiler import record_function

    from tunesmith.models.nf4 import _nf4_module

    cls = _nf4_module().NF4Tensor
    original = cls.get_original_weight

    def labelled(self):
        with record_function("nf4_dequantize"):
            return original(self)

    cls.get_original_weight = labelled
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for b in batches[1:]:
            step(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = defaultdict(float)
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(e.key == k or e.key.startswith(k + ".") for k in keys)), "other")
        shares[group] += e.self_cpu_time_total
    dq = sum(e.cpu_time_total for e in events if e.key == "nf4_dequantize")
    calls = sum(e.count for e in events if e.key == "nf4_dequantize")
    print(f"QLoRA step profile, {args.dtype}, targets {TARGETS}, NF4 on {'all 7 block linears' if args.nf4_all else 'q/v'}:"
          f" {total / 1e6 / args.steps:.2f} s profiled per step")
    for g, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<26} {100 * t / total:5.1f}%")
    print("  top self-CPU ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"    {e.key:<40} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")
    if dq:
        print(f"  NF4 dequantization (inclusive, {calls} calls in {args.steps} steps): {100 * dq / total:.1f}% of the profiled time")


if __name__ == "__main__":
    main()
