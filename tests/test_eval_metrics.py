"""The held-out report's metrics: built-ins against hand-computed values, a user's metric by import path,
and the report's answers against our own ``generate``."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tunesmith.training.config import ConfigError
from tunesmith.training.eval_metrics import load_eval_metrics
from tunesmith.training.rewards import exact_match, format_json, json_all_match, json_match

TARGET = ['{"name": "Mei", "age": 74, "city": "Porto"}'] * 4 + [{"name": "Mei", "age": 74, "city": "Porto"}]
ANSWERS = [
    '{"name": "Mei", "age": 74, "city": "Porto"}',  # all right
    '{\n  "name": "Mei",\n  "age": 74,\n  "city": "Gaulice"\n}',  # valid, 2 of 3 fields
    '{"name": "Mei", "age": "74", "city": "Porto", "job": "nurse"}',  # age is a string: 2 of 3; extra key ignored
    'Sure! Here is the JSON: {"name": "Mei"}',  # not JSON as a whole
    '["Mei", 74, "Porto"]',  # JSON, but not an object
]


def test_json_metrics_against_hand_computed_scores():
    prompts = ["p"] * 5
    assert format_json(prompts, ANSWERS) == [1, 1, 1, 0, 0]
    assert json_match(prompts, ANSWERS, answer=TARGET) == pytest.approx([1, 2 / 3, 2 / 3, 0, 0])  # target: text or dict
    assert json_all_match(prompts, ANSWERS, answer=TARGET) == [1, 0, 0, 0, 0]


def test_exact_match_ignores_case_outer_spaces_and_a_final_full_stop():
    answers = [" Porto\n", "porto", "Porto.", "Porto!", "Oporto"]
    assert exact_match(["p"] * 5, answers, answer=["Porto"] * 5) == [1, 1, 1, 0, 0]


def test_json_metric_on_non_json_references_is_a_config_error():
    with pytest.raises(ConfigError, match="json_match needs JSON-object answers.*example 1"):
        json_match(["p", "p"], ["{}", "{}"], answer=['{"a": 1}', "Porto"])


def test_metrics_by_name_and_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text("def length(prompts, completions, **_):\n    return [len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = load_eval_metrics(["format_json", "my_metrics.length"])
    assert list(metrics) == ["format_json", "length"] and metrics["length"](["p"], ["abc"]) == [3]
    assert load_eval_metrics("none") == {} and list(load_eval_metrics("exact_match")) == ["exact_match"]
    with pytest.raises(ConfigError, match="config key 'eval_metric' = 'exact_mtch'.*did you mean exact_match"):
        load_eval_metrics("exact_mtch")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_eval_metrics("no_such_module.fn")


def test_report_scores_our_greedy_answers_and_passes_record_fields(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    """A training run with a custom metric by import path: the metric gets the prompts, our ``generate``'s
    answers and every record field; the report's means and the JSON file follow from them."""
    from tunesmith.models.generation import generate
    from tunesmith.recipes import lora_single_device as recipe
    from tunesmith.training.config import build_config

    (tmp_path / "probe_metrics.py").write_text(textwrap.dedent("""
        CALLS = []

        def words(prompts, completions, answer, instruction, input, output, **_):
            CALLS.append(dict(prompts=prompts, completions=completions, answer=answer,
                              instruction=instruction, input=input, output=output))
            return [float(len(c.split())) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config(recipe.Config, {
        "model": str(tiny_llama_dir), "data": {"train": str(tiny_data["train"]), "val": str(tiny_data["val"]),
                                               "max_seq_len": 64},
        "output_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "fp32", "max_steps": 2, "lr": 1e-2,
        "warmup_steps": 0, "logger": "none", "eval_batches": 1, "sample_max_new_tokens": 6, "eval_examples": 5,
        "batch_size": 2, "eval_metric": ["exact_match", "probe_metrics.words"]}, [])
    result = recipe.main(cfg)
    import probe_metrics

    before, after = result["held_out"]
    assert len(probe_metrics.CALLS) == 2  # before and after
    call = probe_metrics.CALLS[1]
    records = [json.loads(line) for line in tiny_data["val"].read_text().splitlines()[:5]]
    assert call["output"] == call["answer"] == [r["output"] for r in records]  # answer: the target
    assert call["input"] == [r["input"] for r in records] and call["instruction"] == [r["instruction"] for r in records]
    assert call["prompts"] == [f"{r['instruction']}\n\n{r['input']}" for r in records]

    # The answers are our plain greedy generate's, with the trained adapter (result's model state at the end).
    from tunesmith.models import load_peft_adapter
    from tunesmith.training.setup import load_model_and_tokenizer

    base = load_model_and_tokenizer(str(tiny_llama_dir), None, torch.float32, torch.device("cpu"))
    load_peft_adapter(base.model, result["checkpoint"] / "adapter")
    tok = base.tokenizer
    for sample, record in zip(after.samples, records):
        prompt = tok.apply_chat_template([{"role": "user", "content": sample["prompt"]}], add_generation_prompt=True)
        assert sample["completion"] == tok.decode(generate(base.model, prompt, max_new_tokens=6,
                                                           stop_ids=tok.stop_ids, use_cache=False))
    assert call["completions"] == [s["completion"] for s in after.samples]
    assert after.scores["words"] == pytest.approx(sum(len(s["completion"].split()) for s in after.samples) / 5)
    assert after.scores["exact_match"] == sum(s["completion"].strip() == s["reference"] for s in after.samples) / 5
    assert "words" not in after.percent and "exact_match" in after.percent  # word counts are not shares

    saved = json.loads((tmp_path / "run" / "held_out_report.json").read_text())
    assert saved["before"]["scores"] == pytest.approx(before.scores) and saved["after"]["samples"] == after.samples


def test_demo_config_scores_json():
    from tunesmith.recipes import lora_single_device as recipe
    from tunesmith.training.cli import CONFIGS_DIR
    from tunesmith.training.config import build_config, load_yaml

    cfg = build_config(recipe.Config, load_yaml(CONFIGS_DIR / "smollm2_135m.yaml"), [])
    assert list(load_eval_metrics(cfg.eval_metric)) == ["format_json", "json_match", "json_all_match"]
    assert cfg.eval_examples == 30 and cfg.sample_max_new_tokens > 0
