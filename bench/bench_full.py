"""Full fine-tuning throughput and peak memory on one process: tunesmith vs transformers.

    python bench/bench_full.py                         # SmolLM2-135M shape, batch 4 × 256, bf16 and fp32

Every weight trains (AdamW, lr 1e-5), same random token batches (every position labelled), same
shape as the LoRA benchmark. ``tunesmith``: our Llama with compile and (CPU) ``attention:
matmul``, the chunked cross-entropy (a trained head: each chunk checkpointed);
``tunesmith_default``: no compile, SDPA; ``hf``: ``LlamaForCausalLM`` (sdpa), eager, its own loss.
The distributed recipes' 1-vs-2-process scaling is ``bench_distributed.py``.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench_lora import lora_run, random_init_, shape_bench, side_batches
from harness import Side, SideRun

LR = 1e-5


def tunesmith_full(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, speed: bool = True) -> SideRun:
    from tunesmith.models import builders
    from tunesmith.models.hf_checkpoint import build_empty
    from tunesmith.models.host_memory import keep_freed_host_memory
    from tunesmith.models.llama import Llama
    from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
    from tunesmith.training.memory import GIB, estimate
    from tunesmith.training.setup import build_optimizer, compile_model_and_loss

    cfg = builders.BUILDERS[args.shape]()
    compile = speed and not args.no_compile
    attention = (args.attention or ("matmul" if device.type == "cpu" else "sdpa")) if speed else "sdpa"
    model = build_empty(Llama, cfg, dtype, device)
    random_init_(model)
    model.requires_grad_(True)
    model.set_attention(attention)
    keep_freed_host_memory(device)
    model.train()
    loss_fn = CrossEntropyLoss(chunk_size=args.chunk_size)
    if compile:
        compile_model_and_loss(model, loss_fn)
    opt = build_optimizer(list(model.parameters()), "adamw", LR, 0.0)

    def step(b: dict[str, torch.Tensor]) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        loss = loss_fn(model.hidden_states(b["tokens"]), b["labels"], model.logits) / (b["labels"] != IGNORE_INDEX).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    run = lora_run(args, step, side_batches(args, "tunesmith", cfg.vocab_size), cfg, full=True)
    run.estimate_gib = estimate(cfg, dtype=args.dtype, batch_size=args.batch, seq_len=args.seq, rank=0, targets=[],
                                full=True, chunk_size=args.chunk_size, device_type=device.type, compile=compile,
                                attention=attention).total / GIB
    return run


def hf_full(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SideRun:
    import transformers

    from tunesmith.models import builders
    from tunesmith.models.llama_hf import config_to_hf

    cfg = builders.BUILDERS[args.shape]()
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).to(device)
    random_init_(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(b: dict[str, torch.Tensor]) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        labels = torch.cat([torch.full_like(b["labels"][:, :1], -100), b["labels"]], dim=1)[:, :-1]
        out = model(input_ids=b["tokens"], labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    args.chunk_size = 0  # HF projects every position at once: no head recompute in its FLOPs
    return lora_run(args, step, side_batches(args, "hf", cfg.vocab_size), cfg, full=True)


SIDES = {
    "tunesmith": Side(tunesmith_full, "tunesmith"),
    "tunesmith_default": Side(partial(tunesmith_full, speed=False), "tunesmith (recipe defaults)"),
    "hf": Side(hf_full, "HF transformers"),
}


def main() -> None:
    shape_bench(__file__, __doc__, SIDES, method="full fine-tune", default_sides="tunesmith,hf", reference="hf",
                steps=4, warmup=2)


if __name__ == "__main__":
    main()
