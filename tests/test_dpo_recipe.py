"""The DPO recipe end to end on a tiny random Llama: the reference is the base model, a synthetic
preference is learned, a custom loss plugs in from YAML, resume is exact, the full-weights variant works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.data import load_tokenizer
from tunesmith.data.preference import PreferenceDataset, preference_collate
from tunesmith.models import apply_lora, load_pretrained
from tunesmith.models.lora import disable_adapters
from tunesmith.recipes import dpo_single_device as recipe
from recipe_helpers import make_pairs, run_until_checkpoint
from tunesmith.training.config import build_config, load_yaml
from tunesmith.training.preference import Reference, sequence_logprobs

@pytest.fixture(scope="module")
def pref_data(tiny_pref_data) -> dict[str, Path]:
    return tiny_pref_data


def make_cfg(model_dir: Path, data: dict[str, Path], out: Path, **overrides) -> recipe.Config:
    values = {
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_seq_len": 64},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "output"]},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 8, "max_steps": 30, "lr": 1e-2,
        "warmup_steps": 2, "logger": "none", "loss_args": {"beta": 0.5},
    }
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build_config(recipe.Config, values, [])


def test_disabled_adapters_are_exactly_the_base_model(tiny_llama_dir, pref_data):
    base = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    policy = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    apply_lora(policy, ["q_proj", "v_proj", "down_proj", "output"], rank=4, alpha=8.0)
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_b" in name:
            p.data.normal_()  # a trained-looking adapter: it must change the output when enabled
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    batch = preference_collate([PreferenceDataset(make_pairs(3, 5), tokenizer)[i] for i in range(3)], tokenizer.pad_id)
    with torch.no_grad():
        base_logits = base(batch["tokens"])
        assert not torch.equal(policy(batch["tokens"]), base_logits)
        with disable_adapters(policy):
            assert torch.equal(policy(batch["tokens"]), base_logits)
        expected, _ = sequence_logprobs(base.hidden_states(batch["tokens"]), batch["labels"], base.logits)
    assert torch.equal(Reference(policy)(batch), expected)  # the recipe's LoRA reference is the base model
    table = Reference(policy).precompute(PreferenceDataset(make_pairs(3, 5), tokenizer), lambda items:
                                         preference_collate(items, tokenizer.pad_id), 2, torch.device("cpu"))
    assert torch.allclose(Reference(policy)(batch, table), expected, atol=1e-5)


def test_dpo_learns_a_synthetic_preference_within_50_steps(tiny_llama_dir, pref_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "run", max_steps=40, save_merged=True))
    assert result["held_out_before"]["reward_acc"] == pytest.approx(0.5)  # policy == reference: all ties
    assert result["held_out_after"]["reward_acc"] > 0.9
    assert result["held_out_after"]["margin"] > 0
    assert sum(result["losses"][-5:]) / 5 < 0.5 * result["losses"][0]
    ckpt = result["checkpoint"]
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and (ckpt / "merged" / "config.json").is_file()


def test_custom_loss_by_import_path_in_yaml_trains_without_recipe_change(tiny_llama_dir, pref_data, tmp_path, monkeypatch):
    (tmp_path / "my_pref_losses.py").write_text(
        "import torch\n"
        "import torch.nn.functional as F\n\n"
        "class SquaredSigmoid:\n"
        "    needs_reference = True\n"
        "    def __init__(self, beta=0.1):\n"
        "        self.beta = beta\n"
        "    def __call__(self, logps):\n"
        "        h = logps.log_ratio_margin()\n"
        "        return (1 - torch.sigmoid(self.beta * h)) ** 2, *logps.implicit_rewards(self.beta)\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg_file = tmp_path / "custom.yaml"
    cfg = make_cfg(tiny_llama_dir, pref_data, tmp_path / "run", max_steps=15, loss="my_pref_losses.SquaredSigmoid",
                   loss_args={"beta": 1.0})
    from tunesmith.training.config import to_dict

    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    result = recipe.main(build_config(recipe.Config, load_yaml(cfg_file), []))
    assert result["held_out_before"]["loss"] == pytest.approx(0.25)  # (1 - σ(0))² with policy == reference
    assert result["held_out_after"]["reward_acc"] > 0.8


@pytest.mark.parametrize("variant", [{}, {"full": True, "precompute_reference": True, "lr": 1e-3}])
def test_resume_after_stop_is_exact(tiny_llama_dir, pref_data, tmp_path, monkeypatch, variant):
    kw = dict(max_steps=6, save_every=3, **variant)
    full = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "full", **kw))
    run_until_checkpoint(monkeypatch, lambda: recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "split", **kw)),
                         stop_step=3)
    resumed = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "split", resume=True, **kw))
    assert len(resumed["losses"]) == 3
    assert torch.allclose(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][3:]), atol=1e-6, rtol=0)
    a = load_file(full["checkpoint"] / "trainable.safetensors")
    b = load_file(resumed["checkpoint"] / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_weights_with_frozen_copy_matches_precomputed_reference(tiny_llama_dir, pref_data, tmp_path):
    """A frozen deep copy and a precomputed table are the same reference: identical training."""
    kw = dict(max_steps=3, full=True, lr=1e-3, **{"data.max_seq_len": 32})
    copy_run = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "copy", **kw))
    table_run = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "table", precompute_reference=True, **kw))
    assert torch.allclose(torch.tensor(copy_run["losses"]), torch.tensor(table_run["losses"]), atol=1e-5)
    assert copy_run["losses"][-1] < copy_run["losses"][0]
    weights = load_file(copy_run["checkpoint"] / "trainable.safetensors")
    assert "layers.0.mlp.up_proj.weight" in weights  # all weights trained, not adapters


def test_reference_free_loss_trains(tiny_llama_dir, pref_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, pref_data, tmp_path / "simpo", max_steps=12, loss="simpo",
                                  loss_args={"beta": 2.0, "gamma": 0.5}))
    assert result["held_out_after"]["reward_acc"] > result["held_out_before"]["reward_acc"]
    assert result["held_out_after"]["ref_logp_chosen"] == 0.0  # no reference pass was made


def test_packed_pairs_give_each_response_the_log_prob_it_has_alone(tiny_llama_dir):
    """data.packing: whole pairs share a row with per-response attention and positions; the summed
    log-probs (and token counts) per response equal the plain batch's, pair by pair."""
    from tunesmith.data.preference import pack_pairs, packed_pairs_collate
    from tunesmith.training.preference import count_pairs, pair_index, policy_logprobs

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    dataset = PreferenceDataset(make_pairs(7, 11), tokenizer)
    model = load_pretrained(str(tiny_llama_dir)).eval()
    rows = pack_pairs(dataset.items, 128)
    assert len(rows) < len(dataset) and max(len(r["pairs"]) for r in rows) >= 2  # really packed
    packed = packed_pairs_collate(rows, tokenizer.pad_id)
    plain = preference_collate([dataset[i] for i in range(len(dataset))], tokenizer.pad_id)
    assert count_pairs(packed) == len(dataset) and sorted(pair_index(packed).tolist()) == list(range(len(dataset)))
    with torch.no_grad():
        logps, counts = policy_logprobs(model, packed)
        expected, expected_counts = policy_logprobs(model, plain)
    order = pair_index(packed)  # packed pairs come out in row order: reorder the plain ones to match
    b = len(dataset)
    torch.testing.assert_close(logps, torch.cat([expected[:b][order], expected[b:][order]]), atol=1e-4, rtol=0)
    assert torch.equal(counts, torch.cat([expected_counts[:b][order], expected_counts[b:][order]]))


def test_held_out_answers_are_scored_against_the_chosen_ones(tiny_llama_dir, pref_data, tmp_path):
    cfg = make_cfg(tiny_llama_dir, pref_data, tmp_path / "run", max_steps=1, sample_max_new_tokens=4,
                   eval_examples=3, show_samples=1, eval_metric=["exact_match"])
    before, after = recipe.main(cfg)["held_out"]
    val = [yaml.safe_load(line) for line in pref_data["val"].read_text().splitlines()[:3]]
    assert [s["reference"] for s in after.samples] == [r["chosen"] for r in val]
    assert [s["prompt"] for s in after.samples] == [r["prompt"] for r in val]
    assert after.scores["exact_match"] == sum(s["completion"].strip() == s["reference"] for s in after.samples) / 3
    assert {"reward_acc", "margin", "exact_match"} <= set(before.scores) and "reward_acc" in after.percent
