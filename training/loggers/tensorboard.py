"""TensorBoard: scalars as event files in ``output_dir/tensorboard``; the config in the Text tab."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class TensorBoardLogger:
    """Writes scalars with ``SummaryWriter``; TensorBoard has no artifacts, so outputs stay on disk only.

    Args:
        log_dir: Event folder.
        config: The resolved config, shown as YAML under Text → ``config``.
    """

    def __init__(self, log_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package (a core dependency)

        self.writer = SummaryWriter(str(log_dir))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # markdown code block

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_artifacts(self, paths: list[Path]) -> None:
        pass

    def close(self) -> None:
        self.writer.close()
