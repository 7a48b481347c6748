"""The README's custom loss, named by import path in a YAML file, trains with no edit of the recipe."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tunesmith.recipes import lora_single_device as recipe
from tunesmith.training.config import build_config, load_yaml

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_loss_code() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(# my_losses\.py\n.*?)```", text, re.S)
    assert match, "README lost its custom-loss example"
    return match.group(1)


def test_readme_focal_loss_plugs_in_by_import_path(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(readme_loss_code())
    monkeypatch.chdir(tmp_path)  # import paths resolve from the working directory, like the CLI
    common = {
        "model": str(tiny_llama_dir), "data": {"train": str(tiny_data["train"]), "val": str(tiny_data["val"])},
        "device": "cpu", "dtype": "fp32", "max_steps": 4, "sample_max_new_tokens": 0, "tensorboard": False,
    }
    cfg_file = tmp_path / "focal.yaml"
    cfg_file.write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "focal"), "loss": "my_losses.FocalLoss",
                                        "loss_args": {"gamma": 1.5}}))
    focal = recipe.main(build_config(recipe.Config, load_yaml(cfg_file), []))
    plain = recipe.main(build_config(recipe.Config, {**common, "output_dir": str(tmp_path / "ce")}, []))
    # Focal loss scales each token's CE by (1 - p)^gamma < 1: the same model must score strictly lower.
    assert 0 < focal["held_out_before"] < plain["held_out_before"]
    assert len(focal["losses"]) == 4
