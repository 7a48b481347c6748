"""Tokens/s and peak memory per rank of a distributed recipe on 1, 2, … processes (gloo on CPU, NCCL on GPU).

    python bench/bench_distributed.py                                   # lora_distributed, smollm2_135m, 1 vs 2
    python bench/bench_distributed.py --recipe dpo_distributed --config smollm2_135m_dpo
    python bench/bench_distributed.py --recipe full_finetune_distributed --config tiny_full_cpu --nproc 1,2
    python bench/bench_distributed.py --steps 8 --warmup 2 quantize_base=true     # key=value: config overrides

For each process count the recipe runs under torchrun on its bundled config (the global
``batch_size`` unchanged, so every count trains the same updates), for ``--warmup`` untimed and
``--steps`` timed optimizer steps; no mid-run evaluation or sample, the held-out loss before and
after on one batch. On CPU the cores are split evenly (``OMP_NUM_THREADS`` = cores / processes).

Reported per process count: the job's tokens/s (median of the timed steps' ``train/tokens_per_s``,
which counts every rank's tokens), its floor share (``floor_share``), its ratio to the first count's, each rank's peak memory (peak
RSS on CPU: the whole process; CUDA peak allocated on GPU) and the last step's loss (the same on
every count: the updates do not depend on it). One process runs under torchrun too (FSDP over a
single rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """One rank: run the recipe with a logger that records each step, then report per-rank peaks."""
    import importlib

    import torch

    from tunesmith.training.cli import resolve_config_path
    from tunesmith.training.config import build_config, load_yaml
    from tunesmith.training.metrics import peak_memory_gib
    from tunesmith.training.process_group import barrier, gather_objects, init_distributed

    recipe = importlib.import_module(f"tunesmith.recipes.{args.recipe}")
    steps: list[dict[str, float]] = []

    build_logger = recipe.metric_logger

    def recording_logger(*a, **k):  # the recipe's logger, also keeping each step's scalars here
        logger = build_logger(*a, **k)
        log = logger.log

        def record(step: int, scalars: dict[str, float], *, advance: bool = True) -> None:
            if advance:
                steps.append(dict(scalars))
            log(step, scalars, advance=advance)

        logger.log = record
        return logger

    recipe.metric_logger = recording_logger
    recipe.teardown = barrier  # keep the process group to gather the peaks
    path = resolve_config_path(args.config)
    overrides = [f"max_steps={args.warmup + args.steps}", "eval_every=0", "eval_batches=1", "save_every=0",
                 "sample_max_new_tokens=0", "logger=[]", f"output_dir={args.out}", *args.overrides]
    cfg = build_config(recipe.Config, load_yaml(path), overrides, yaml_name=str(path))
    recipe.main(cfg)
    env = init_distributed(cfg.device)  # the recipe's process group, still open
    peaks = gather_objects(peak_memory_gib(env.device), env)
    if env.is_main:
        timed = steps[args.warmup:]
        tokens_per_s = statistics.median(s["train/tokens_per_s"] for s in timed)
        Path(args.result).write_text(json.dumps({
            "tokens_per_s": tokens_per_s, "floor_share": floor_share(cfg, tokens_per_s, env.world_size),
            "loss": [s["train/loss"] for s in steps], "peak_gib_per_rank": peaks,
        }))
    if env.sharded:
        torch.distributed.destroy_process_group()


def floor_share(cfg, tokens_per_s: float, world_size: int) -> float:
    """tokens/s × GEMM FLOPs per token / (this rank's measured GEMM rate × ranks): training/flops.py.

    FLOPs per token are counted for full rows of ``max_seq_len`` (every position labelled; DPO:
    plus the adapters-off reference's forward); each rank measures its rate with its own share of
    the cores (``OMP_NUM_THREADS``), so ranks × rate is the job's.
    """
    import torch

    from tunesmith.training.flops import gemm_rate, train_step_flops
    from tunesmith.training.memory import model_config

    shape = model_config(cfg.model)
    lora = getattr(cfg, "lora", None)
    full = getattr(cfg, "full", lora is None)
    per_token = train_step_flops(shape, rows=1, seq_len=cfg.data.max_seq_len, targets=list(lora.targets) if lora else [],
                                 rank=lora.rank if lora else 0, full=full,
                                 reference_forward="dpo" in type(cfg).__module__ and not full).per_token
    dtype = {"bf16": torch.bfloat16}.get(cfg.dtype, torch.float32)
    rate = gemm_rate(shape, dtype, tokens=max(1, cfg.batch_size // world_size) * cfg.data.max_seq_len)
    return tokens_per_s * per_token / (rate * world_size)


def launch(args: argparse.Namespace, nproc: int, tmp: Path) -> dict:
    """Run ``nproc`` workers under torchrun; → rank 0's result."""
    result = tmp / f"result_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(29500 + nproc), __file__, "--worker", "--recipe", args.recipe, "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(tmp / f"out_{nproc}"),
           "--result", str(result), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{nproc} processes failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lora_distributed")
    parser.add_argument("--config", default="smollm2_135m")
    parser.add_argument("--nproc", default="1,2", help="process counts to compare, comma-separated")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"{args.recipe} --config {args.config} {' '.join(args.overrides)}: {args.warmup} warm-up + "
          f"{args.steps} timed steps, {os.cpu_count()} CPU cores", flush=True)
    print(f"{'processes':>9}  {'tokens/s':>9}  {'floor':>6}  {'vs 1':>5}  {'peak GiB per rank':<24}  final loss")
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for nproc in (int(n) for n in args.nproc.split(",")):
            r = launch(args, nproc, Path(tmp))
            first = first or r["tokens_per_s"]
            peaks = " ".join(f"{p:.2f}" for p in r["peak_gib_per_rank"])
            print(f"{nproc:>9}  {r['tokens_per_s']:>9.0f}  {100 * r['floor_share']:>5.1f}%  {r['tokens_per_s'] / first:>5.2f}  {peaks:<24}  "
                  f"{r['loss'][-1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
