"""GRPO: online RL with verifiable rewards (DeepSeekMath / R1), LoRA policy, on one device.

    load base model (frozen; NF4 if quantize_base) + tokenizer ─► add LoRA adapters ─► read prompts
    reference π_ref = the same network with its adapters off (no second copy)
    report held-out reward of greedy answers (before)
    for step in steps:
        sample:  G completions per prompt from the current policy (KV cache; temperature, top-p)
        score:   rewards r = Σ_k w_k · reward_k(prompts, completions, **record fields)
                 advantages A = (r − mean_group) [/ std_group]   (zero for a group of equal rewards)
        prepare: log π_old of the sampled tokens (only when ppo_epochs > 1: else π_old = π_θ),
                 log π_ref (adapters off; skipped when the loss needs no reference)
        for epoch in ppo_epochs:                               (several updates per batch of samples)
            for each micro-batch:  loss = loss_fn(log π_θ, log π_old, log π_ref, A) ; loss.backward()
            clip grad norm ; AdamW step
        LR schedule step ; log (rewards per function, KL, clip fraction, lengths, tokens/s) ; eval ; checkpoint
    report held-out reward (after) ; final checkpoint (PEFT adapter; merged/, gguf/) ; push_to_hub

The policy loss is chosen by name or import path (``loss=dapo``, ``loss=my_losses.MyLoss``) with its
``loss_args``; every loss takes the same ``PolicyLogProbs`` (training/policy_losses.py). Rewards are
functions named by import path (training/rewards.py has the contract and built-ins).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch

from tunesmith.models import apply_lora
from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.models.lora import disable_adapters
from tunesmith.training.checkpointing import remove_stale_temp_dirs, resume_latest, save_adapter_checkpoint
from tunesmith.training.final_outputs import push_run, run_output_writers
from tunesmith.training.config import (
    ConfigError, NonNegativeInt, PositiveInt, Range, check_keyword_args, to_dict, to_yaml,
)
from tunesmith.training.grpo import (
    PromptDataOptions,
    completion_logprobs,
    evaluate_rewards,
    prompt_batches,
    report_rewards,
    rollout_batch,
    sample_groups,
    score_groups,
)
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.evaluation import HeldOutReport, write_held_out_report
from tunesmith.training.metrics import metric_logger, peak_memory_gib
from tunesmith.training.options import LoRAOptions, RunOptions
from tunesmith.training.policy_losses import PolicyLogProbs, build_policy_loss, group_advantages, policy_loss_class
from tunesmith.training.rewards import REWARDS, build_rewards, reward_names
from tunesmith.training.schedules import warmup_cosine
from tunesmith.training.setup import (
    build_optimizer, load_model_and_tokenizer, select_device, select_dtype, set_attention, to_device,
)


@dataclass
class Config(RunOptions):
    """Options of this recipe (YAML keys and ``key=value`` overrides use these names).

    The options every recipe shares come from ``RunOptions`` in training/options.py. Here
    ``batch_size`` counts prompts per micro-batch (each brings ``num_generations`` completions),
    a step samples ``batch_size × grad_accum_steps`` prompts. The held-out report before and after
    answers ``eval_examples`` held-out prompts greedily (0: all) and scores the answers with the
    rewards (and any ``eval_metric``); the evaluation every ``eval_every`` steps answers
    ``eval_batches × batch_size`` of them (0: all).

    Attributes:
        data: The prompts (see ``PromptDataOptions``).
        lora: Adapter shape and placement of the policy (see ``LoRAOptions``).
        quantize_base: QLoRA: the adapted layers' frozen base weights in NF4 (policy and reference).
        rewards: Reward functions, by built-in name (``exact_match``, ``number_match``,
            ``format_json``, ``json_match``) or import path (``my_rewards.score``); see training/rewards.py.
        reward_weights: Weight of each reward in the total (empty: 1.0 each).
        num_generations: G, completions sampled per prompt (the group the advantages are relative to).
        max_new_tokens: Longest completion in tokens (the end-of-turn token included).
        temperature: Sampling temperature of the completions (> 0).
        top_p: Nucleus mass of the sampling (1: off).
        ppo_epochs: Policy updates per batch of samples (TRL's ``num_iterations``, μ in the paper); with
            1 the sampling policy is the policy being updated and every ratio is exactly 1.
        loss: ``grpo``, ``dr_grpo``, ``dapo`` or an import path to your class (training/policy_losses.py).
        loss_args: Keyword arguments of the loss class (``beta`` — the KL weight, 0 drops the
            reference pass — ``epsilon``, ``epsilon_low``/``epsilon_high``).
        logprob_chunk_size: Completion tokens projected to the vocabulary at once (0: all).
        sample_max_new_tokens: > 0 prints ``show_samples`` greedy answers to held-out prompts before and
            after (held-out answers are ``max_new_tokens`` long).
        eval_metric: Scores of the held-out answers besides the rewards (default: none; the rewards
            are the held-out metric).
    """

    data: PromptDataOptions = field(default_factory=PromptDataOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    quantize_base: bool = False
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: list[float] = field(default_factory=list)
    num_generations: Annotated[int, Range(ge=2, why="GRPO compares completions within a group: at least 2")] = 8
    max_new_tokens: PositiveInt = 128
    temperature: Annotated[float, Range(gt=0, why="greedy completions of a prompt are all the same: no signal")] = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    ppo_epochs: PositiveInt = 1
    loss: str = "grpo"
    loss_args: dict[str, Any] = field(default_factory=dict)
    logprob_chunk_size: NonNegativeInt = 1024
    output_dir: str = "output/grpo"  # this recipe's default
    lr: float = 1e-5  # this recipe's default
    warmup_steps: int = 0  # this recipe's default
    batch_size: int = 2  # this recipe's default
    eval_metric: list[str] = field(default_factory=lambda: ["none"])  # the rewards score held-out answers already

    def validate(self) -> None:
        """Rules across options, checked by ``build_config`` before anything loads."""
        from tunesmith.training.plugins import resolve

        self.loss_args = check_keyword_args(policy_loss_class(self.loss), self.loss_args, "loss_args")
        if not self.rewards:
            raise ConfigError("config key 'rewards' is empty: name at least one reward function (rewards=[exact_match])")
        for name in self.rewards:
            resolve(name, REWARDS, "rewards")  # a typo is refused now; the data columns are checked after reading
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"config key 'reward_weights' has {len(self.reward_weights)} values for "
                              f"{len(self.rewards)} rewards {list(self.rewards)}: give one weight per reward (or none)")


def estimate_memory(cfg: Config) -> Any:
    """Expected peak memory of this run, split by kind (printed by ``tune-run ... --dry-run``)."""
    from tunesmith.training.memory import estimate_grpo_memory

    return estimate_grpo_memory(cfg)


def main(cfg: Config) -> dict[str, Any]:
    # ---- setup -------------------------------------------------------------------------------------
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)  # the global RNG also drives sampling: checkpoints save and restore it
    output_dir = Path(cfg.output_dir)
    remove_stale_temp_dirs(output_dir)

    nf4_targets = cfg.lora.targets if cfg.quantize_base else []
    base = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype, device, cfg.chat_template, nf4_targets)
    model, tokenizer = base.model, base.tokenizer
    apply_lora(model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               quantize_base=cfg.quantize_base, seed=cfg.seed)
    model.activation_checkpointing = cfg.activation_checkpointing
    set_attention(model, cfg.attention)
    keep_freed_host_memory(device)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # the adapters

    eval_metrics = load_eval_metrics(cfg.eval_metric)
    batches, val_set = prompt_batches(cfg.data, tokenizer, cfg.batch_size, cfg.seed)
    fields = batches.dataset.field_names & val_set.field_names  # record columns the rewards may ask for
    reward_fns, weights = build_rewards(cfg.rewards, cfg.reward_weights, fields)
    names = reward_names(cfg.rewards)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum_steps
    optimizer = build_optimizer(params.values(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps)
    loss_fn = build_policy_loss(cfg.loss, cfg.loss_args)
    needs_reference = getattr(loss_fn, "needs_reference", True)
    step = resume_latest(output_dir, params, optimizer, scheduler, config=to_dict(cfg)) if cfg.resume else 0

    def save(at_step: int, final: bool = False) -> Path:
        return save_adapter_checkpoint(
            output_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
            micro_batches=at_step * cfg.grad_accum_steps, lora=cfg.lora, base_model=base.source,
            config_yaml=to_yaml(cfg), keep_last=cfg.keep_last,
            final_writers=run_output_writers(cfg, base, model) if final else None)  # merged/, gguf/

    def held_out(when: str) -> HeldOutReport:  # the rewards (and any eval_metric) of greedy answers
        scores = evaluate_rewards(model, tokenizer, val_set, reward_fns, weights, names, eval_metrics=eval_metrics,
                                  max_prompts=cfg.eval_examples, max_new_tokens=cfg.max_new_tokens)
        report_rewards(scores, when, cfg.show_samples if cfg.sample_max_new_tokens > 0 else 0)
        samples = scores.pop("samples")
        report = HeldOutReport(when, scores=scores, samples=[{"prompt": p, "completion": a} for p, a in samples])
        logger.log(step, report.scalars(), advance=False)
        return report

    # ---- before ------------------------------------------------------------------------------------
    logger = metric_logger(cfg, total_steps, start_step=step)
    before = held_out("before") if step == 0 else None
    history: list[dict[str, float]] = []

    # ---- training loop -----------------------------------------------------------------------------
    model.train()
    while step < total_steps:
        logger.start_step()
        # 1. sample G completions per prompt with the current policy (no grad)
        t0 = time.perf_counter()
        items = [item for i in range(cfg.grad_accum_steps) for item in batches[step * cfg.grad_accum_steps + i]]
        groups = sample_groups(model, tokenizer, items, cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p)
        gen_seconds = time.perf_counter() - t0

        # 2. score: weighted sum of the reward functions; advantages relative to each prompt's group
        rewards = score_groups(reward_fns, groups, fields)  # [p, G, k]
        total_reward = rewards @ weights  # [p, G]
        advantages = group_advantages(total_reward, scale=getattr(loss_fn, "scale_rewards", True))
        micro = [to_device(rollout_batch(groups[i:i + cfg.batch_size], advantages[i:i + cfg.batch_size],
                                         tokenizer.pad_id), device)
                 for i in range(0, len(groups), cfg.batch_size)]
        step_completions = sum(len(mb["advantages"]) for mb in micro)
        step_tokens = int(sum(mb["mask"].sum() for mb in micro))

        # 3. log-probs of the sampling policy (only needed when it drifts: ppo_epochs > 1) and the reference
        t1 = time.perf_counter()
        with torch.no_grad():
            for mb in micro:
                if cfg.ppo_epochs > 1:
                    model.eval()  # the sampling policy had no dropout
                    mb["old"] = completion_logprobs(model, mb, cfg.logprob_chunk_size)
                    model.train()
                if needs_reference:
                    with disable_adapters(model):
                        mb["reference"] = completion_logprobs(model, mb, cfg.logprob_chunk_size)

        # 4. ppo_epochs policy updates on these samples
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
        for _ in range(cfg.ppo_epochs):
            for mb in micro:
                logps = completion_logprobs(model, mb, cfg.logprob_chunk_size)  # [r, t], with grad
                x = PolicyLogProbs(policy=logps, old=mb["old"] if cfg.ppo_epochs > 1 else logps.detach(),
                                   reference=mb.get("reference", torch.zeros_like(logps)), advantages=mb["advantages"],
                                   mask=mb["mask"], step_completions=step_completions, step_tokens=step_tokens,
                                   max_new_tokens=cfg.max_new_tokens)
                loss, clipped = loss_fn(x)
                loss.backward()
                sums["loss"] += loss.item() / cfg.ppo_epochs
                sums["clipped"] += float(clipped.sum()) / (step_tokens * cfg.ppo_epochs)
                if needs_reference:  # mean per-token KL(π_θ ‖ π_ref) over the step's completion tokens
                    sums["kl"] += float((x.kl().detach() * x.mask).sum()) / (step_tokens * cfg.ppo_epochs)
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        train_seconds = time.perf_counter() - t1

        scalars = {
            "train/loss": sums["loss"], "train/reward": float(total_reward.mean()),
            "train/reward_std": float(total_reward.std(dim=1).mean()),
            "train/zero_std_groups": float((total_reward.std(dim=1) == 0).float().mean()),
            "train/kl": sums["kl"], "train/clip_fraction": sums["clipped"],
            "train/completion_len": step_tokens / step_completions,
            # generation: completion tokens sampled per second; training: prompt + completion tokens
            # through the ppo_epochs updates per second of steps 3-4 (the no-grad passes included)
            "train/gen_tokens_per_s": step_tokens / max(1e-9, gen_seconds),
            "train/train_tokens_per_s": sum(int(mb["lengths"].sum()) for mb in micro) * cfg.ppo_epochs / max(1e-9, train_seconds),
            "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
            "train/peak_mem_gib": peak_memory_gib(device),
        }
        for j, name in enumerate(names):
            scalars[f"rewards/{name}/mean"] = float(rewards[..., j].mean())
            scalars[f"rewards/{name}/std"] = float(rewards[..., j].std())
        logger.log(step, scalars)
        history.append({**scalars, "completions": [t for g in groups for t in g.texts]})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val = evaluate_rewards(model, tokenizer, val_set, reward_fns, weights, names,
                                   max_prompts=cfg.eval_batches * cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
            logger.log(step, {f"val/{k}": v for k, v in val.items() if k != "samples"}, advance=False)
            logger.write(f"step {step}: held-out reward {val['reward']:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)

    # ---- after -------------------------------------------------------------------------------------
    after = held_out("after")
    final_dir = save(step, final=True)
    push_run(cfg, final_dir, before, after, base.source)  # push_to_hub=REPO
    report_file = write_held_out_report(output_dir, before, after)
    logger.close(artifacts=[final_dir / "adapter", report_file])
    print(f"adapter saved to {final_dir / 'adapter'}" + (f"; merged model in {final_dir / 'merged'}" if cfg.save_merged else ""))
    return {"losses": [h["train/loss"] for h in history], "history": history,
            "held_out_before": before.scores if before else {}, "held_out_after": after.scores,
            "held_out": (before, after), "checkpoint": final_dir}


if __name__ == "__main__":
    from tunesmith.training.cli import run_file

    sys.exit(run_file(__file__))
