"""Progress you can watch: a tqdm bar (step, loss, lr, tokens/s, ETA) and TensorBoard scalars."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA peak allocated on GPU, peak RSS (resident set) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricLogger:
    """One object for the progress bar and the TensorBoard writer of a run.

    Args:
        log_dir: TensorBoard event folder (``output_dir/tensorboard``); ``None`` disables TensorBoard.
        total_steps: Optimizer steps in the whole run (for the bar's ETA).
        start_step: Steps already done (resumed runs start the bar there).
    """

    def __init__(self, log_dir: str | Path | None, total_steps: int, start_step: int = 0) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(log_dir))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def tokens_per_second(self, tokens: int) -> float:
        """Tokens (all positions, padding excluded) processed since ``start_step``, per second."""
        return tokens / max(1e-9, time.perf_counter() - self._t0)

    def log(self, step: int, scalars: dict[str, float], *, advance: bool = True) -> None:
        """Show ``scalars`` on the bar and write them to TensorBoard at ``step``."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if advance:
            shown = {k.split("/")[-1]: _fmt(v) for k, v in scalars.items() if k.startswith("train/")}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class SilentLogger:
    """Stands in for ``MetricLogger`` on ranks other than 0: one progress bar per job, not per rank."""

    def start_step(self) -> None:
        pass

    def tokens_per_second(self, tokens: int) -> float:
        return 0.0

    def log(self, step: int, scalars: dict[str, float], *, advance: bool = True) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"
