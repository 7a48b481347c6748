"""Learning-rate schedules, as plain ``LambdaLR`` multipliers a reader can check by hand."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup from 0 to the base LR over ``warmup_steps``, then cosine decay to ``min_ratio`` × base.

    The multiplier for optimizer step ``s`` (0-based, applied before the step's update) is::

        (s + 1) / warmup_steps                                         if s < warmup_steps
        min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))   otherwise,
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, multiplier)
