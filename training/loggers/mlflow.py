"""MLflow: one MLflow run per training run (``pip install "tunesmith[mlflow]"``).

The tracking URI is the ``mlflow.tracking_uri`` option, else ``MLFLOW_TRACKING_URI``, else a local
store in ``output_dir/mlflow`` (a SQLite database, MLflow's recommended local backend, with the
artifacts beside it)::

    mlflow ui --backend-store-uri sqlite:///output/smollm2_135m/mlflow/mlflow.db
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tunesmith.training.loggers import require

MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"rank": 8}}`` → ``{"lora.rank": "8"}``: MLflow parameters are flat strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_LENGTH]
    return flat


class MLflowLogger:
    """Logs scalars as MLflow metrics at their step, the config as parameters (+ ``config.yaml``), outputs as artifacts.

    Args:
        output_dir: The run's folder (home of the default local store).
        config: The resolved config.
        tracking_uri: Where runs go (see the module docstring for the default).
        experiment: Experiment name (default: ``MLFLOW_EXPERIMENT_NAME``, else ``tunesmith``).
    """

    def __init__(self, output_dir: Path, config: dict[str, Any], tracking_uri: str | None, experiment: str | None) -> None:
        mlflow = require("mlflow", "mlflow")
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if uri is None:  # a local store next to the run's other outputs
            local = (output_dir / "mlflow").resolve()
            local.mkdir(parents=True, exist_ok=True)
            uri, artifact_location = f"sqlite:///{local / 'mlflow.db'}", (local / "artifacts").as_uri()
        self.client = mlflow.MlflowClient(uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tunesmith"
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name, artifact_location)
        self.run_id = self.client.create_run(experiment_id).info.run_id
        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
