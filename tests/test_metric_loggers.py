"""Metric loggers: TensorBoard, W&B (offline) and MLflow (local store) get the same metrics at the same
steps, the resolved config and the run's outputs; read back from their own files with their own readers.

- TensorBoard: ``EventAccumulator`` over ``output_dir/tensorboard``.
- W&B: ``wandb leet inspect --json RUN.wandb``, W&B's own reader of an offline run's transaction log
  (one JSON record per line: ``run`` holds the config, ``history`` the logged rows, ``artifact``
  the manifest).
- MLflow: ``MlflowClient`` on the local SQLite store the run created in ``output_dir/mlflow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tiny_data, tmp_path_factory) -> dict:
    """A 4-step LoRA run logging to all three, with a mid-run held-out loss and an eval metric."""
    from tunesmith.recipes import lora_single_device as recipe
    from tunesmith.training.config import build_config

    home = tmp_path_factory.mktemp("wandb_home")
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # artifact staging etc. stay in tmp
            env.setenv(var, str(home))
        env.delenv("WANDB_DIR", raising=False)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = build_config(recipe.Config, {
            "model": str(tiny_llama_dir), "data": {"train": str(tiny_data["train"]), "val": str(tiny_data["val"]),
                                                   "max_seq_len": 64},
            "output_dir": str(out), "device": "cpu", "dtype": "fp32", "max_steps": 4, "lr": 1e-2, "warmup_steps": 1,
            "eval_every": 2, "eval_batches": 1, "sample_max_new_tokens": 3, "eval_examples": 2,
            "logger": ["tensorboard", "wandb", "mlflow"], "wandb": {"project": "tunesmith-test"}}, [])
        result = recipe.main(cfg)
    return {"out": out, "result": result}


def tensorboard_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def wandb_records(out: Path) -> list[dict]:
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                          capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in text.splitlines()]


def test_every_backend_gets_the_same_metrics_at_the_same_steps(run):
    import mlflow

    out = run["out"]
    tb = tensorboard_scalars(out / "tensorboard")
    assert {"train/loss", "train/lr", "val/loss", "val/exact_match"} <= {tag for tag, _ in tb}
    assert sorted(step for tag, step in tb if tag == "val/loss") == [0, 2, 4]  # before, eval_every, after
    assert sorted(step for tag, step in tb if tag == "train/loss") == [1, 2, 3, 4]

    wb = {}
    for record in wandb_records(out):
        if record["type"] == "history":
            row = record["history"]
            wb.update({(k, row["step"]["num"]): v for k, v in row["item"].items() if not k.startswith("_")})

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tunesmith"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    ml = {(key, m.step): m.value for key in mlrun.data.metrics for m in client.get_metric_history(mlrun.info.run_id, key)}

    assert wb.keys() == tb.keys() == ml.keys()
    for key, value in tb.items():  # TensorBoard stores float32
        assert wb[key] == pytest.approx(value, rel=1e-6) and ml[key] == pytest.approx(value, rel=1e-6), key
    assert ml[("val/loss", 4)] == run["result"]["held_out_after"]


def test_every_backend_gets_the_config_and_wandb_mlflow_the_outputs(run):
    import mlflow

    out = run["out"]
    records = wandb_records(out)
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    assert run_record["project"] == "tunesmith-test"
    assert run_record["config"]["update"]["lora"]["rank"] == 8 and run_record["config"]["update"]["max_steps"] == 4
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert {c["path"] for c in artifact["manifest"]["contents"]} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "held_out_report.json"}

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    assert mlrun.data.params["lora.rank"] == "8" and mlrun.data.params["data.max_seq_len"] == "64"
    assert mlrun.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert names == {"adapter", "held_out_report.json", "config.yaml"}
    assert {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]


def test_unknown_or_missing_logger_is_a_config_error_naming_the_extra(monkeypatch, tmp_path):
    from tunesmith.training.config import ConfigError
    from tunesmith.training.metrics import metric_logger
    from tunesmith.training.options import RunOptions

    cfg = RunOptions(model="m", output_dir=str(tmp_path), logger=["tensorboard", "wandbb"])
    with pytest.raises(ConfigError, match="logger='wandbb' is not one of tensorboard, wandb, mlflow"):
        metric_logger(cfg, total_steps=1)
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
        cfg.logger = name
        with pytest.raises(ConfigError, match=rf'logger={name} needs the {name} package: pip install "tunesmith\[{name}\]"'):
            metric_logger(cfg, total_steps=1)


def test_other_processes_of_a_distributed_job_log_nothing(tmp_path, capsys):
    from tunesmith.training.metrics import metric_logger
    from tunesmith.training.options import RunOptions

    logger = metric_logger(RunOptions(model="m", output_dir=str(tmp_path)), total_steps=2, main_process=False)
    logger.log(1, {"train/loss": 1.0})
    logger.write("hello")
    logger.close()
    assert logger.backends == [] and not (tmp_path / "tensorboard").exists()
    assert "hello" not in capsys.readouterr().out
