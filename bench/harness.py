"""What every benchmark script shares: sides in their own processes taking turns, medians, the floor share, logs.

A script describes its *sides* (functions that build a model and return a training step) and calls
``main``. The parent process then runs every (dtype, side) as a subprocess of the same script
(``--side NAME --dtype D``), round after round, sides taking turns (A B A B …: a drift in the
machine's load hits every side alike), and summarises each side by its median round. Each child:

1. builds its side, runs ``--warmup`` untimed steps (compilation happens there) and ``--steps``
   timed ones, and reads its peak memory from the first step on (peak RSS on CPU: the whole
   process, PyTorch, weights, the compiler; CUDA peak allocated on GPU);
2. measures the GEMM rate of ``torch.matmul`` on the model's GEMM shapes in the same dtype, in
   the same process (``training/flops.py:gemm_rate``);
3. prints one ``RESULT {json}`` line: items/s, tokens/s, step seconds, peak GiB, the step's
   counted GEMM FLOPs and the floor share (FLOPs / rate / step time), and for tunesmith sides the
   ``--dry-run`` estimate of the same run.

The parent prints a line per round and a Markdown table (BENCHMARKS.md's format) and writes all of
it to ``bench/results/<date>_<name>.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Where logs go; run_all.sh --quick points it elsewhere (smoke-test numbers are not results).
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


@dataclass
class Side:
    """One thing to measure.

    Attributes:
        build: ``build(args, dtype, device) -> SideRun``.
        label: How tables name it.
        python: Interpreter to run it with (default: this one).
    """

    build: Callable[..., "SideRun"]
    label: str
    python: str | None = None


@dataclass
class SideRun:
    """A built side: its step, its batches and what is needed to count its work.

    Attributes:
        step: Runs one optimizer step on a batch, returns the loss.
        batches: ``warmup + steps`` batches (anything ``step`` accepts).
        tokens: Tokens each batch counts (real, non-padding).
        items: Items each batch counts (pairs for DPO; rows otherwise).
        flops: GEMM FLOPs of one step (``train_step_flops(...).total``).
        cfg: The model shape (for the GEMM rate's shapes).
        gemm_tokens: Rows of the linear GEMMs (tokens per micro-batch).
        estimate_gib: ``--dry-run`` estimate of this run (tunesmith sides), or None.
        run_all: Instead of step-by-step, one call that runs every batch and returns the seconds of
            the timed ones and the losses (for trainers that own their loop: TRL).
    """

    step: Callable[[Any], float] | None
    batches: list[Any]
    tokens: list[int]
    items: list[int]
    flops: float
    cfg: Any
    gemm_tokens: int
    estimate_gib: float | None = None
    run_all: Callable[[], tuple[float, list[float]]] | None = None
    extra: dict[str, float] = field(default_factory=dict)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak from now: after the model is built, before the first step.

    Some sides build a dense model first and quantize it afterwards (random weights: there is no
    checkpoint to quantize while loading), so the build's peak is not what training needs. On CPU
    Linux resets the process's peak RSS (VmHWM) when "5" is written to ``/proc/self/clear_refs``.
    """
    import gc

    from tunesmith.models.host_memory import return_freed_host_memory

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    return_freed_host_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the whole process's (ru_maxrss)


def peak_memory_gib(device: torch.device) -> float:
    """Peak RSS of this process on CPU since ``reset_peak_memory`` (VmHWM), CUDA peak allocated on GPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(run: SideRun, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Warm-up steps, timed steps, peak memory, the GEMM rate and the floor share of one side."""
    from tunesmith.training.flops import gemm_rate

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = slice(args.warmup, args.warmup + args.steps)
    reset_peak_memory(device)
    if run.run_all is not None:
        seconds, losses = run.run_all()
    else:
        losses = [run.step(b) for b in run.batches[: args.warmup]]
        sync()
        start = time.perf_counter()
        losses += [run.step(b) for b in run.batches[timed]]
        sync()
        seconds = time.perf_counter() - start
    peak = peak_memory_gib(device)
    rate = gemm_rate(run.cfg, dtype, run.gemm_tokens, device=str(device), seconds=args.gemm_seconds)
    step_s = seconds / args.steps
    result = {
        "items_per_s": sum(run.items[timed]) / seconds, "tokens_per_s": sum(run.tokens[timed]) / seconds,
        "step_s": step_s, "peak_gib": peak, "gflop_per_step": run.flops / 1e9, "gemm_gflops": rate / 1e9,
        "floor_share": run.flops / rate / step_s, "first_loss": losses[0], "last_loss": losses[-1], **run.extra,
    }
    if run.estimate_gib is not None:
        result["estimate_gib"] = run.estimate_gib
    return result


def machine() -> str:
    """The CPU (or GPU) the numbers come from, and its load."""
    if torch.cuda.is_available():
        return f"gpu={torch.cuda.get_device_name()}"
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return (f"cpu={info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}) "
            f"cores={os.cpu_count()} load={os.getloadavg()[0]:.2f} threads={torch.get_num_threads()}")


class Log:
    """Prints and appends every line to ``bench/results/<date>_<name>.log``."""

    def __init__(self, name: str) -> None:
        RESULTS.mkdir(exist_ok=True)
        self.path = RESULTS / f"{datetime.date.today().isoformat()}_{name}.log"
        self.file = self.path.open("a")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def common_args(ap: argparse.ArgumentParser, *, steps: int, warmup: int, rounds: int, dtypes: str) -> None:
    """The options every benchmark script has."""
    ap.add_argument("--dtypes", default=dtypes)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=rounds, help="each side runs this many times, sides taking turns")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gemm-seconds", type=float, default=1.0, help="time for the GEMM-rate microbenchmark")
    ap.add_argument("--name", help="log file name (bench/results/<date>_<name>.log)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print RESULT json
    ap.add_argument("--dtype", help=argparse.SUPPRESS)


def _fmt_estimate(r: dict[str, float]) -> str:
    if "estimate_gib" not in r:
        return ""
    return f"{r['estimate_gib']:.2f} ({100 * (r['estimate_gib'] / r['peak_gib'] - 1):+.0f}%)"


def main(script: str, args: argparse.Namespace, sides: dict[str, Side], *, name: str, reference: str,
         unit: str = "tokens", header: str = "") -> dict[str, dict[str, dict[str, float]]]:
    """Run ``args.side`` (a child) or every side of ``args.sides`` in turns (the parent); → medians by dtype, side.

    Args:
        script: The benchmark script's path (children run it again).
        args: Parsed options (``common_args`` plus the script's own, incl. ``sides``).
        sides: Every side the script knows, by name.
        name: Default log name.
        reference: The side the ratios are taken against.
        unit: ``tokens`` or ``pairs`` (DPO): which rate leads the table.
        header: What the run measures (shape, batch, …), printed first.
    """
    if args.side:
        side = sides[args.side]
        device = torch.device(args.device)
        torch.manual_seed(0)
        run = side.build(args, DTYPES[args.dtype], device)
        print("RESULT " + json.dumps(measure(run, args, DTYPES[args.dtype], device)), flush=True)
        return {}

    log = Log(args.name or name)
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [a for a in sys.argv[1:]]
    log(f"$ python {os.path.relpath(script)} {' '.join(shlex.quote(a) for a in argv)}")
    log(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {header} steps={args.steps} "
        f"(+{args.warmup} warmup) rounds={args.rounds}")
    log(machine())
    rate_key = "items_per_s" if unit == "pairs" else "tokens_per_s"
    out: dict[str, dict[str, dict[str, float]]] = {}
    for dtype in args.dtypes.split(","):
        runs: dict[str, list[dict[str, float]]] = {}
        for rnd in range(1, args.rounds + 1):
            for name_ in args.sides.split(","):
                side = sides[name_]
                cmd = [side.python or sys.executable, script, "--side", name_, "--dtype", dtype, *argv]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    log(f"  round {rnd} {name_:12s} {dtype}: skipped ({reason[:160]})")
                    continue
                r = json.loads(line[0][len("RESULT "):])
                runs.setdefault(name_, []).append(r)
                est = f"  estimate {_fmt_estimate(r)}" if "estimate_gib" in r else ""
                pairs = f"{r['items_per_s']:6.2f} pairs/s  " if unit == "pairs" else ""
                log(f"  round {rnd} {name_:12s} {dtype}: {pairs}{r['tokens_per_s']:7.1f} tokens/s  "
                    f"floor {100 * r['floor_share']:4.1f}% ({r['gflop_per_step']:.1f} GFLOP/step at "
                    f"{r['gemm_gflops']:.0f} GFLOP/s)  peak {r['peak_gib']:.2f} GiB{est}  "
                    f"loss {r['first_loss']:.3f}→{r['last_loss']:.3f}")
        median = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
        out[dtype] = median
        ref = median.get(reference)
        log(f"  medians, {dtype}:")
        lead = "pairs/s | tokens/s" if unit == "pairs" else "tokens/s"
        log(f"| side | dtype | {lead} | floor share | peak (GiB) | vs {sides[reference].label} {unit}/s "
            f"| vs {sides[reference].label} memory | `--dry-run` estimate (GiB) |")
        log("|---|---|" + "---:|" * (7 if unit == "pairs" else 6))
        for s, r in median.items():
            vs = (f"{r[rate_key] / ref[rate_key]:.2f}× | {r['peak_gib'] / ref['peak_gib']:.2f}×" if ref else "– | –")
            rates = f"{r['items_per_s']:.2f} | {r['tokens_per_s']:.1f}" if unit == "pairs" else f"{r['tokens_per_s']:.1f}"
            log(f"| {sides[s].label} | {dtype} | {rates} | {100 * r['floor_share']:.0f}% | {r['peak_gib']:.2f} | {vs} "
                f"| {_fmt_estimate(r)} |")
    log(f"(log: {os.path.relpath(log.path)})")
    return out
