"""tune-run: dry runs, typed overrides, and user errors that exit 2 with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def tune_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.training.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_dry_run_prints_resolved_config_with_override():
    r = tune_run("lora_single_device", "--config", "llama3_8b", "batch_size=4", "lora.rank=4", "--dry-run")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["batch_size"] == 4
    assert resolved["lora"]["rank"] == 4
    assert resolved["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert resolved["lr"] == pytest.approx(2e-4)  # from the YAML, not the recipe default


def test_dry_run_plans_a_gpu_run_on_a_machine_without_one():
    """--dry-run plans for the machine the run will use: device=cuda is not checked against this one."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    planned = tune_run("qlora_distributed", "--config", "llama3_1_70b", "--nproc-per-node", "8", "batch_size=8",
                       "device=cuda", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "total" in planned.stdout and "device: cuda" in planned.stdout
    from tunesmith.training import cli

    with pytest.raises(cli.ConfigError, match="CUDA is not available"):  # a real run on this machine is refused
        cli.run("lora_single_device", ["--config", "smollm2_135m", "device=cuda", "output_dir=/tmp/never"])


def test_typo_in_key_suggests_the_closest_key():
    r = tune_run("lora_single_device", "--config", "llama3_8b", "bach_size=4", "--dry-run")
    assert r.returncode == 2
    assert "did you mean batch_size?" in r.stderr
    assert "Traceback" not in r.stderr


def test_typo_in_nested_key_suggests_nested_key():
    r = tune_run("lora_single_device", "--config", "llama3_8b", "lora.rnak=4", "--dry-run")
    assert r.returncode == 2
    assert "did you mean lora.rank?" in r.stderr


def test_wrong_type_names_key_value_and_expected_type():
    r = tune_run("lora_single_device", "--config", "llama3_8b", "batch_size=four", "--dry-run")
    assert r.returncode == 2
    assert "batch_size" in r.stderr and "'four'" in r.stderr and "int" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("model: some/repo\ndata:\n  train: x.jsonl\nlearning_rate: 0.1\n")
    r = tune_run("lora_single_device", "--config", str(cfg), "--dry-run")
    assert r.returncode == 2
    assert str(cfg) in r.stderr
    assert "unknown config key 'learning_rate'" in r.stderr


def test_missing_required_value_is_named(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("data:\n  train: x.jsonl\n")
    r = tune_run("lora_single_device", "--config", str(cfg), "--dry-run")
    assert r.returncode == 2 and "model" in r.stderr


def test_unknown_recipe_suggests_name():
    r = tune_run("lora_single_devce", "--config", "llama3_8b", "--dry-run")
    assert r.returncode == 2 and "did you mean lora_single_device?" in r.stderr


def test_ls_lists_recipes_and_configs():
    r = tune_run("ls")
    assert r.returncode == 0
    assert "lora_single_device" in r.stdout and "smollm2_135m" in r.stdout and "llama3_1_70b" in r.stdout


def test_cp_then_run_the_copy(tmp_path):
    r = tune_run("cp", "lora_single_device", str(tmp_path / "my_recipe.py"))
    assert r.returncode == 0, r.stderr
    copied = tmp_path / "my_recipe.py"
    # Edit the copy: a new option with a default; the copy runs with its own Config.
    anchor = '    loss: str = "cross_entropy"\n'
    assert anchor in copied.read_text()
    text = copied.read_text().replace(anchor, anchor + "    my_new_knob: int = 7\n")
    copied.write_text(text)
    r = tune_run(str(copied), "--config", "llama3_2_1b", "my_new_knob=9", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["my_new_knob"] == 9
    # ... and cp never overwrites
    r = tune_run("cp", "lora_single_device", str(copied))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_cp_config_into_directory(tmp_path):
    r = tune_run("cp", "smollm2_135m", str(tmp_path))
    assert r.returncode == 0
    assert yaml.safe_load((tmp_path / "smollm2_135m.yaml").read_text())["model"].startswith("package:")


def test_console_script_is_installed():
    r = subprocess.run(["tune-run", "ls"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "lora_single_device" in r.stdout


def test_readme_generate_command_takes_the_prompt_verbatim_from_a_training_config(capsys):
    from tunesmith.training.cli import main

    prompt = "Extract the person's name, age and city as JSON: Ana, 41, lives in Porto."
    assert main(["generate", "--config", "smollm2_135m", f"prompt={prompt}", "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["prompt"] == prompt and resolved["output_dir"] == "output/smollm2_135m"
    assert "lora" not in resolved and "batch_size" not in resolved  # generate exposes only what it uses
    assert main(["generate", "--config", "smollm2_135m", "prompt=yes", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["prompt"] == "yes"


def test_text_format_is_packed_unless_told_otherwise(capsys):
    from tunesmith.training.cli import main

    assert main(["lora_single_device", "--config", "llama3_8b", "data.format=text", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\nexpected")[0])["data"]["packing"] is True
    assert main(["lora_single_device", "--config", "llama3_8b", "data.format=text", "data.packing=false", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\nexpected")[0])["data"]["packing"] is False
