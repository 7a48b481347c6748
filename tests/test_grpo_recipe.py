"""The GRPO recipe end to end on a tiny random Llama: the reward rises on a trivially learnable reward,
resume reproduces the samples and the adapter exactly, the reference is the base model, custom
rewards and losses plug in by import path, and the contract items (unknown key, TensorBoard, dry run)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.data import load_tokenizer
from tunesmith.data.prompts import PromptDataset
from tunesmith.models import apply_lora, load_pretrained
from tunesmith.models.generation import generate, sample_completions
from tunesmith.models.lora import disable_adapters
from tunesmith.recipes import grpo_single_device as recipe
from recipe_helpers import make_prompts, run_until_checkpoint, with_overrides, write_splits
from tunesmith.training import cli
from tunesmith.training.config import ConfigError, build_config, load_yaml, to_dict
from tunesmith.training.grpo import Group, completion_logprobs, rollout_batch
from tunesmith.training.rewards import exact_match, format_json, json_match, number_match

WORDS = "red green blue cat dog fish one two three four five apple pear plum tree river stone cloud".split()
# A reward a tiny random model can learn in a few steps: the share of vowels in the completion.
REWARDS_FILE = """
def vowels(prompts, completions, **_):
    return [sum(ch in "aeiou" for ch in text) / max(1, len(text)) for text in completions]

def echo_answer_length(prompts, completions, answer, **_):
    return [float(len(a)) for a in answer]  # uses a record column

def needs_expected(prompts, completions, expected):
    return [0.0] * len(completions)
"""


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory) -> dict[str, Path]:
    path = tmp_path_factory.mktemp("grpo_data")
    (path / "tiny_rewards.py").write_text(REWARDS_FILE)
    files = write_splits(path, make_prompts)
    files["dir"] = path
    return files


@pytest.fixture(autouse=True)
def rewards_importable(prompt_data, monkeypatch):
    monkeypatch.syspath_prepend(str(prompt_data["dir"]))
    yield
    for name in ("tiny_rewards", "my_rewards", "my_policy_losses"):
        sys.modules.pop(name, None)


def make_cfg(model_dir: Path, data: dict[str, Path], out: Path, **overrides) -> recipe.Config:
    values = {
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_prompt_len": 64},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "output"]},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 2, "max_steps": 20, "lr": 1e-2,
        "rewards": ["tiny_rewards.vowels"], "num_generations": 8, "max_new_tokens": 8, "logger": "none",
        "eval_batches": 4, "sample_max_new_tokens": 0,
    }
    return build_config(recipe.Config, with_overrides(values, overrides), [])


def test_reward_rises_on_a_trivially_learnable_reward(tiny_llama_dir, prompt_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "run", loss_args={"beta": 0.04}))
    rewards = [h["train/reward"] for h in result["history"]]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05
    assert result["held_out_after"]["reward"] > result["held_out_before"]["reward"] + 0.1
    assert result["history"][-1]["train/kl"] > 0  # the policy moved away from the reference
    assert all(h["train/clip_fraction"] == 0 for h in result["history"])  # one update per batch: ratio 1
    assert (result["checkpoint"] / "adapter" / "adapter_model.safetensors").is_file()


def test_several_updates_per_batch_clip_and_train(tiny_llama_dir, prompt_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "run", loss="dapo", ppo_epochs=3,
                                  max_steps=8))
    assert any(h["train/clip_fraction"] > 0 for h in result["history"])  # later epochs leave the trust region
    assert result["history"][0]["train/kl"] == 0.0  # DAPO: beta 0, no reference pass
    rewards = [h["train/reward"] for h in result["history"]]
    assert sum(rewards[-3:]) > sum(rewards[:3])


def test_qlora_policy_samples_and_updates_with_an_nf4_base(tiny_llama_dir, prompt_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "run", quantize_base=True, max_steps=2,
                                  loss_args={"beta": 0.1}, **{"lora.targets": ["q_proj", "v_proj"]}))
    assert result["history"][-1]["train/kl"] > 0  # the NF4 base (adapters off) served as the reference
    assert (result["checkpoint"] / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_reproduces_the_samples_and_the_adapter_exactly(tiny_llama_dir, prompt_data, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=3, **{"lora.dropout": 0.1, "loss_args": {"beta": 0.1}})
    full = recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "full", **kw))
    run_until_checkpoint(monkeypatch, lambda: recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "split", **kw)),
                         stop_step=3)
    resumed = recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "split", resume=True, **kw))
    assert len(resumed["history"]) == 3
    for a, b in zip(full["history"][3:], resumed["history"]):
        assert a["completions"] == b["completions"]  # the sampling RNG resumed where it stopped
        assert a["train/loss"] == b["train/loss"]
    assert full["history"][3]["completions"] != full["history"][2]["completions"]
    x = load_file(full["checkpoint"] / "trainable.safetensors")
    y = load_file(resumed["checkpoint"] / "trainable.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_reference_with_adapters_off_is_the_base_model(tiny_llama_dir):
    base = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    policy = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    apply_lora(policy, ["q_proj", "v_proj", "down_proj", "output"], rank=4, alpha=8.0)
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_b" in name:
            p.data.normal_()
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    prompts = PromptDataset(make_prompts(2, 7), tokenizer)
    groups = [Group(item, sample_completions(base, item["prompt_ids"], num_samples=3, max_new_tokens=5), [""] * 3)
              for item in prompts]
    batch = rollout_batch(groups, torch.zeros(2, 3), tokenizer.pad_id)
    with torch.no_grad():
        expected = completion_logprobs(base, batch)
        assert not torch.equal(completion_logprobs(policy, batch), expected)
        with disable_adapters(policy):
            assert torch.equal(completion_logprobs(policy, batch), expected)


def test_group_sampling_shares_the_prompt_and_stops_per_row(tiny_llama_dir):
    model = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # peaked, varied next-token distributions
    prompt = [5, 17, 3, 88, 41, 9]
    greedy = sample_completions(model, prompt, num_samples=3, max_new_tokens=12, temperature=0.0)
    assert greedy == [generate(model, prompt, max_new_tokens=12)] * 3  # every row decodes like generate()
    kw = dict(num_samples=6, max_new_tokens=12, temperature=1.5)
    a = sample_completions(model, prompt, **kw, generator=torch.Generator().manual_seed(0))
    assert a == sample_completions(model, prompt, **kw, generator=torch.Generator().manual_seed(0))
    assert len({tuple(c) for c in a}) > 1
    stop = a[0][2]  # a token row 0 produced: with it as stop id, row 0 ends there, keeping it
    stopped = sample_completions(model, prompt, **kw, stop_ids=[stop], generator=torch.Generator().manual_seed(0))
    for full, cut in zip(a, stopped):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:end]  # same draws; each row stops on its own


def readme_block(first_line: str) -> str:
    """The README's python code block that starts with ``first_line``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```python\n" + first_line) + len("```python\n")
    return readme[start:readme.index("```", start)]


def test_rewards_get_the_record_columns_and_custom_pieces_plug_in_from_yaml(tiny_llama_dir, prompt_data, tmp_path,
                                                                          monkeypatch):
    """The README's custom reward and policy loss, by import path from a YAML file."""
    (tmp_path / "my_policy_losses.py").write_text(readme_block("# my_policy_losses.py"))
    (tmp_path / "my_rewards.py").write_text(readme_block("# my_rewards.py"))
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(tiny_llama_dir, prompt_data, tmp_path / "run", max_steps=12, loss="my_policy_losses.GSPOLoss",
                   loss_args={"epsilon": 4e-4}, logger="tensorboard",
                   rewards=["tiny_rewards.vowels", "my_rewards.exact_answer", "tiny_rewards.echo_answer_length"],
                   reward_weights=[1.0, 1.0, 0.0])
    cfg_file = tmp_path / "custom.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    result = recipe.main(build_config(recipe.Config, load_yaml(cfg_file), []))
    last = result["history"][-1]
    assert last["rewards/echo_answer_length/mean"] > 10  # got the records' answer column
    trained = load_file(result["checkpoint"] / "trainable.safetensors")
    assert max(float(t.abs().max()) for k, t in trained.items() if "lora_b" in k) > 0  # the custom loss trained it

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/reward", "train/kl", "train/clip_fraction", "train/completion_len",
                "train/gen_tokens_per_s", "train/train_tokens_per_s", "rewards/vowels/mean", "rewards/vowels/std",
                "rewards/echo_answer_length/mean", "rewards/exact_answer/mean", "train/lr", "train/grad_norm"):
        assert tag in tags, tag


def test_config_and_data_mistakes_are_named(tiny_llama_dir, prompt_data, tmp_path):
    with pytest.raises(ConfigError, match="did you mean num_generations"):
        build_config(recipe.Config, {"model": "m", "data": {"train": "t"}, "num_generation": 4}, [])
    with pytest.raises(ConfigError, match=r"needs the data column\(s\) \['expected'\]"):
        recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "a", rewards=["tiny_rewards.needs_expected"]))
    with pytest.raises(ConfigError, match="at least 2"):
        recipe.main(make_cfg(tiny_llama_dir, prompt_data, tmp_path / "b", num_generations=1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi", "answer": "x"}) + "\n")
    from tunesmith.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl line 1: missing field 'prompt'.*data\.prompt_field"):
        recipe.main(make_cfg(tiny_llama_dir, {"train": bad, "val": bad}, tmp_path / "c"))


def test_dry_run_prints_the_estimate_and_runs_nothing(tiny_llama_dir, prompt_data, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama_dir}\ndata:\n  train: {prompt_data['train']}\n"
                      f"output_dir: {tmp_path / 'out'}\ndevice: cpu\n")
    assert cli.main(["grpo_single_device", "--config", str(config), "--dry-run", "num_generations=4"]) == 0
    out = capsys.readouterr().out
    assert "num_generations: 4" in out
    for term in ("weights", "adapters", "optimizer", "activations", "logits", "total"):
        assert term in out
    assert not (tmp_path / "out").exists()


def test_shipped_rewards_follow_their_definitions():
    assert exact_match(None, [" 7.", "7 apples", "Paris"], ["7", "7", "paris"]) == [1.0, 0.0, 1.0]
    assert number_match(None, ["3 + 4 = 7", "It is 1,200.", "none"], ["7", "1200", "0"]) == [1.0, 1.0, 0.0]
    assert format_json(None, ['{"a": 1}', '```json\n{"a": 1}\n```', "[1]", '{"a": 1} done']) == [1.0, 0.0, 0.0, 0.0]
    answer = {"name": "Mei", "age": 74, "city": "Porto"}
    got = json_match(None, ['{"name": "Mei", "age": 74, "city": "Porto"}', '{"name": "Mei", "age": "74", "city": "Porto"}',
                            'name: Mei', '{"name": "Mei"}'], [answer, answer, answer, json.dumps(answer)])
    assert got == pytest.approx([1.0, 2 / 3, 0.0, 1 / 3])
