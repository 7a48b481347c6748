"""Where a run's metrics go besides the progress bar: TensorBoard, Weights & Biases, MLflow.

Each backend is one small class in its own file, with the same three methods::

    log(step, scalars)      # the same scalars, at the same steps, for every backend
    log_artifacts(paths)    # the run's outputs at the end: adapter folder, held-out report
    close()

and receives the resolved config when it opens. ``open_backends`` builds the ones ``logger=``
names; ``MetricLogger`` (training/metrics.py) fans every call out to them. wandb and mlflow are
optional extras: naming one that is not installed is a config error that says what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tunesmith.training.config import ConfigError

BACKENDS = ("tensorboard", "wandb", "mlflow")


class Backend(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self) -> None: ...


def logger_names(option: str | list[str]) -> list[str]:
    """The ``logger`` option as a list of backend names (``none`` or ``[]``: only the progress bar).

    Raises:
        ConfigError: an unknown name.
    """
    names = [option] if isinstance(option, str) else list(option)
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"logger={name!r} is not one of {', '.join(BACKENDS)} (or none); "
                              "several go in a list: logger=[tensorboard,wandb]")
    return list(dict.fromkeys(names))


def require(module: str, extra: str) -> Any:
    """Import an optional package, or fail as a config error that names the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"logger={extra} needs the {module} package: pip install \"tunesmith[{extra}]\"") from None


def open_backends(names: list[str], output_dir: Path, config: dict[str, Any], wandb: Any, mlflow: Any) -> list[Backend]:
    """Open the named backends, each given the resolved config.

    Args:
        names: From ``logger_names``.
        output_dir: The run's folder (TensorBoard events, offline W&B runs and the default MLflow
            store go under it).
        config: The resolved config as plain containers.
        wandb: ``WandbOptions`` (project, entity).
        mlflow: ``MLflowOptions`` (tracking_uri, experiment).
    """
    for name in names:  # every optional package first: a missing one must not leave another's run half open
        if name != "tensorboard":
            require(name, name)
    backends: list[Backend] = []
    for name in names:
        if name == "tensorboard":
            from tunesmith.training.loggers.tensorboard import TensorBoardLogger

            backends.append(TensorBoardLogger(output_dir / "tensorboard", config))
        elif name == "wandb":
            from tunesmith.training.loggers.wandb import WandbLogger

            backends.append(WandbLogger(output_dir, config, project=wandb.project, entity=wandb.entity))
        elif name == "mlflow":
            from tunesmith.training.loggers.mlflow import MLflowLogger

            backends.append(MLflowLogger(output_dir, config, tracking_uri=mlflow.tracking_uri,
                                         experiment=mlflow.experiment))
    return backends
