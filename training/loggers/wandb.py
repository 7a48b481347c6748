"""Weights & Biases: one W&B run per training run (``pip install "tunesmith[wandb]"``).

W&B's own environment is honoured: ``WANDB_MODE=offline`` writes the run under
``output_dir/wandb/`` for a later ``wandb sync``, ``WANDB_PROJECT`` / ``WANDB_ENTITY`` /
``WANDB_DIR`` / ``WANDB_API_KEY`` / ``WANDB_NAME`` as W&B documents them; the ``wandb.project`` and
``wandb.entity`` options win over the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunesmith.training.config import ConfigError
from tunesmith.training.loggers import require


class WandbLogger:
    """Logs scalars with ``run.log(..., step=step)``, the config as the run's config, outputs as one artifact.

    Args:
        output_dir: The run's folder; W&B's local files go under it unless ``WANDB_DIR`` is set.
        config: The resolved config.
        project: W&B project (default: ``WANDB_PROJECT``, else ``tunesmith``).
        entity: W&B user or team (default: ``WANDB_ENTITY``, else your default entity).
    """

    def __init__(self, output_dir: Path, config: dict[str, Any], project: str | None, entity: str | None) -> None:
        wandb = require("wandb", "wandb")
        self._wandb = wandb
        directory = None if os.environ.get("WANDB_DIR") else str(output_dir)
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "tunesmith", entity=entity,
                                  dir=directory, config=config)
        except (wandb.errors.UsageError, wandb.errors.CommError, wandb.errors.AuthenticationError) as e:
            raise ConfigError(f"logger=wandb could not start a W&B run: {e}. Log in (`wandb login` or WANDB_API_KEY), "
                              "or set WANDB_MODE=offline to write the run locally and `wandb sync` it later") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_artifacts(self, paths: list[Path]) -> None:
        artifact = self._wandb.Artifact(f"run-{self.run.id}-outputs", type="model")
        for path in paths:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()
