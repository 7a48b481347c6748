"""Progress you can watch: a tqdm bar (step, loss, lr, tokens/s, ETA) and the run's metric loggers.

Every recipe builds its logger with one call::

    logger = metric_logger(cfg, total_steps, start_step=step)      # logger=tensorboard | wandb | mlflow | [...]
    logger.log(step, {"train/loss": ..., ...})                      # bar + every backend, same step
    logger.close(artifacts=[final_dir / "adapter", report_file])   # outputs to the backends that keep them

The backends live in training/loggers/ (one file each).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tunesmith.training.loggers import Backend, logger_names, open_backends


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA peak allocated on GPU, peak RSS (resident set) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricLogger:
    """The progress bar and the metric backends of a run: each ``log`` goes to all of them.

    Args:
        backends: Opened backends (``open_backends``); empty: the bar only.
        total_steps: Optimizer steps in the whole run (for the bar's ETA).
        start_step: Steps already done (resumed runs start the bar there).
        enabled: False on every process but the first of a distributed job: no bar, no backends,
            no printing (one report per job, not per rank).
    """

    def __init__(self, backends: list[Backend], total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.backends = backends
        self.enabled = enabled
        self._total, self._start = total_steps, start_step
        self._bar: tqdm | None = None  # opened at the first step, so reports printed before it stay readable
        self._t0 = time.perf_counter()

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self._total, initial=self._start, desc="train", unit="step", dynamic_ncols=True,
                             disable=not self.enabled)
        return self._bar

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def tokens_per_second(self, tokens: int) -> float:
        """Tokens (all positions, padding excluded) processed since ``start_step``, per second."""
        return tokens / max(1e-9, time.perf_counter() - self._t0)

    def log(self, step: int, scalars: dict[str, float], *, advance: bool = True) -> None:
        """Send ``scalars`` to every backend at ``step``; with ``advance``, show the ``train/`` ones on the bar and move it."""
        for backend in self.backends:
            backend.log(step, scalars)
        if advance:
            shown = {k.split("/")[-1]: _fmt(v) for k, v in scalars.items() if k.startswith("train/")}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            if self.bar.n >= self._total:
                self.bar.close()  # the last step: what the recipe prints next starts on a line of its own

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self, artifacts: Sequence[str | Path] = ()) -> None:
        """Close the bar; hand the run's outputs that exist to the backends, then close them."""
        if self._bar is not None:
            self._bar.close()
        found = [Path(p) for p in artifacts if Path(p).exists()]
        for backend in self.backends:
            if found:
                backend.log_artifacts(found)
            backend.close()


def metric_logger(cfg: Any, total_steps: int, start_step: int = 0, main_process: bool = True) -> MetricLogger:
    """The logger every recipe uses: the bar plus the backends named by ``cfg.logger``.

    Args:
        cfg: A recipe config with ``RunOptions`` (``logger``, ``wandb``, ``mlflow``, ``output_dir``);
            the resolved config goes to every backend.
        total_steps: Optimizer steps in the whole run.
        start_step: Steps already done (a resumed run).
        main_process: False on every process but the first of a distributed job (they log nothing).

    Raises:
        ConfigError: an unknown logger name, or a backend whose package is not installed.
    """
    from tunesmith.training.config import to_dict

    names = logger_names(cfg.logger)
    backends = open_backends(names, Path(cfg.output_dir), to_dict(cfg), cfg.wandb, cfg.mlflow) if main_process else []
    return MetricLogger(backends, total_steps, start_step, enabled=main_process)


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"
