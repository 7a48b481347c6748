"""The README's custom loss, named by import path in a YAML file, trains with no edit of the recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
        "device": "cpu", "dtype": "fp32", "max_steps": 4, "sample_max_new_tokens": 0, "logger": "none",
    }
    cfg_file = tmp_path / "focal.yaml"
    cfg_file.write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "focal"), "loss": "my_losses.FocalLoss",
                                        "loss_args": {"gamma": 1.5}}))
    focal = recipe.main(build_config(recipe.Config, load_yaml(cfg_file), []))
    plain = recipe.main(build_config(recipe.Config, {**common, "output_dir": str(tmp_path / "ce")}, []))
    # Focal loss scales each token's CE by (1 - p)^gamma < 1: the same model must score strictly lower.
    assert 0 < focal["held_out_before"] < plain["held_out_before"]
    assert len(focal["losses"]) == 4


def test_readme_preference_loss_example_computes_its_formula(tmp_path, monkeypatch):
    """The README's ~20-line DPO-style loss runs against the real PreferenceLogProbs and gives (1 − σ(βh))²."""
    import math
    import sys

    import torch

    from tunesmith.training.preference_losses import PreferenceLogProbs, build_preference_loss

    match = re.search(r"```python\n(# my_pref_losses\.py\n.*?)```", README.read_text(), re.S)
    assert match, "README lost its preference-loss example"
    (tmp_path / "my_pref_losses.py").write_text(match.group(1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_pref_losses", None)
    loss_fn = build_preference_loss("my_pref_losses.SquaredSigmoid", {"beta": 0.5})
    logps = PreferenceLogProbs(
        policy_chosen=torch.tensor([-3.0, -7.0]), policy_rejected=torch.tensor([-5.0, -4.0]),
        reference_chosen=torch.tensor([-4.0, -6.0]), reference_rejected=torch.tensor([-4.0, -5.0]),
        chosen_tokens=torch.tensor([3.0, 4.0]), rejected_tokens=torch.tensor([2.0, 5.0]),
    )
    losses, chosen_r, rejected_r = loss_fn(logps)
    for i, (pc, pr, rc, rr) in enumerate([(-3, -5, -4, -4), (-7, -4, -6, -5)]):
        h = (pc - rc) - (pr - rr)
        assert losses[i].item() == pytest.approx((1 - 1 / (1 + math.exp(-0.5 * h))) ** 2, rel=1e-6)
        assert chosen_r[i].item() == pytest.approx(0.5 * (pc - rc))
        assert rejected_r[i].item() == pytest.approx(0.5 * (pr - rr))
