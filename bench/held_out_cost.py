"""What the held-out report's answers cost, next to a training step, for a config (the demo by default).

    python bench/held_out_cost.py                                     # base model, SmolLM2 demo config
    python bench/held_out_cost.py --adapter output/smollm2_135m/step_000060/adapter

Process time on one thread, so a machine busy with other jobs changes little: the answers the
recipe gives before training (or after, with ``--adapter``) are timed around ``answer_held_out``,
a training step as the mean of three LoRA steps on the config's batches.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunesmith.models import apply_lora, load_peft_adapter
from tunesmith.recipes import lora_single_device as recipe
from tunesmith.training.cli import resolve_config_path
from tunesmith.training.config import build_config, load_yaml
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, answer_held_out
from tunesmith.training.losses import IGNORE_INDEX, CrossEntropyLoss
from tunesmith.training.setup import build_optimizer, load_model_and_tokenizer, select_dtype, sft_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2_135m")
    parser.add_argument("--adapter", help="answer with this PEFT adapter (the after-training answers)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = build_config(recipe.Config, load_yaml(resolve_config_path(args.config)), args.overrides)
    device = torch.device("cpu")
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, select_dtype(cfg.dtype, device), device, cfg.chat_template)
    model, tokenizer = base.model, base.tokenizer
    batches, _, val_set = sft_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)

    if args.adapter:
        load_peft_adapter(model, args.adapter)
    report = HeldOutReport("after" if args.adapter else "before")
    start = time.process_time()
    answer_held_out(model, tokenizer, val_set, load_eval_metrics(cfg.eval_metric), report, cfg)
    answers = time.process_time() - start
    tokens = [len(tokenizer.encode(s["answer"], add_special_tokens=False)) for s in report.samples]

    if not args.adapter:
        apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = build_optimizer(params, "adamw", cfg.lr, 0.0), CrossEntropyLoss()
    model.train()
    start = time.process_time()
    for i in range(3):
        batch = batches[i]
        loss = loss_fn(model.hidden_states(batch["tokens"]), batch["labels"], model.logits)
        (loss / int((batch["labels"] != IGNORE_INDEX).sum())).backward()
        optimizer.step()
        optimizer.zero_grad()
    step = (time.process_time() - start) / 3
    print(f"{len(tokens)} answers ({report.when}): {answers:.2f} s CPU, {sum(tokens) / len(tokens):.1f} tokens each; "
          f"training step: {step:.2f} s CPU; answers = {answers / step:.1f} steps (one thread)")


if __name__ == "__main__":
    main()
