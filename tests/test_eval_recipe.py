"""The eval recipe against lm-eval's own Hugging Face backend, on local tasks shipped in lm_eval_tasks/.

The Hub's datasets are out of reach here, so the tasks are three small YAMLs over one JSONL file on
the test vocabulary: multiple choice (loglikelihood), perplexity (loglikelihood_rolling, windows of
16 tokens so texts span several) and generation (generate_until).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from tunesmith.training import cli  # noqa: E402

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tasks_dir():
    """The tasks' data_files are relative paths: lm-eval reads them from the working directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(TASKS_DIR)
        yield TASKS_DIR


@pytest.fixture(scope="module")
def adapter_run(tiny_llama_dir, tiny_data, tmp_path_factory) -> Path:
    """A LoRA run on the tiny model (3 steps, large lr) whose adapter the eval recipe picks up."""
    from tunesmith.recipes import lora_single_device
    from tunesmith.training.config import build_config

    out = tmp_path_factory.mktemp("lora_run")
    cfg = build_config(lora_single_device.Config, {
        "model": str(tiny_llama_dir), "data": {"train": str(tiny_data["train"]), "val": str(tiny_data["val"]),
                                               "max_seq_len": 64},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "max_steps": 3, "lr": 3e-2, "warmup_steps": 0,
        "sample_max_new_tokens": 0, "logger": "none", "eval_batches": 1}, [])
    lora_single_device.main(cfg)
    return out


def training_yaml(path: Path, model_dir: Path, output_dir: Path) -> Path:
    """A training run's config file: eval must read model/output_dir from it and skip lr, lora, data."""
    path.write_text(yaml.safe_dump({"model": str(model_dir), "output_dir": str(output_dir), "device": "cpu",
                                    "dtype": "fp32", "lr": 0.03, "max_steps": 3, "lora": {"rank": 8},
                                    "data": {"train": "train.jsonl"}, "logger": "none"}))
    return path


def samples(output_dir: Path, label: str, task: str) -> list[dict]:
    lines = (output_dir / "eval" / f"samples_{label}.jsonl").read_text().splitlines()
    return sorted((s for s in map(json.loads, lines) if s["task"] == task), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def ours(tasks_dir, tiny_llama_dir, adapter_run, tmp_path_factory) -> Path:
    """``tune-run eval --config <the training config> ... compare_base=true log_samples=true``, in process."""
    config = training_yaml(tmp_path_factory.mktemp("cfg") / "run.yaml", tiny_llama_dir, adapter_run)
    code = cli.main(["eval", "--config", str(config), f"tasks=[{','.join(TASKS)}]", f"include_path={tasks_dir}",
                     f"max_length={MAX_LENGTH}", "batch_size=3", "compare_base=true", "log_samples=true"])
    assert code == 0
    return adapter_run


@pytest.fixture(scope="module")
def reference(tasks_dir, tiny_llama_dir) -> dict:
    """lm-eval's HFLM (transformers) on the same base model and tasks, another batch size."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=str(tiny_llama_dir), batch_size=2, device="cpu", dtype="float32", max_length=MAX_LENGTH)
    return lm_eval.simple_evaluate(model=hf, tasks=TASKS, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))


def loglikelihoods(sample: dict) -> list[float]:
    """Per-request log-likelihoods of a sample (multiple choice: one per choice; rolling: one)."""
    return [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]


def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_backend(ours, reference):
    results = json.loads((ours / "eval" / "RESULTS.json").read_text())["results"]
    assert set(results) == {"base", "tuned"}
    for task in ("tiny_mc", "tiny_rolling"):
        theirs = sorted(reference["samples"][task], key=lambda s: s["doc_id"])
        mine = samples(ours, "base", task)
        assert len(mine) == len(theirs) == 12
        for a, b in zip(mine, theirs):
            assert a["arguments"] == [list(x) for x in b["arguments"]]
            torch.testing.assert_close(torch.tensor(loglikelihoods(a)), torch.tensor(loglikelihoods(b)),
                                       atol=1e-4, rtol=1e-5)
        if task == "tiny_mc":  # greedy flags too
            assert [[r[0][1] for r in s["resps"]] for s in mine] == [[r[0][1] for r in s["resps"]] for s in theirs]
    ref = reference["results"]
    assert results["base"]["tiny_mc"]["acc,none"] == ref["tiny_mc"]["acc,none"]
    assert results["base"]["tiny_mc"]["acc_norm,none"] == ref["tiny_mc"]["acc_norm,none"]
    assert results["base"]["tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        ref["tiny_rolling"]["word_perplexity,none"], rel=1e-5)
    # The rolling texts are longer than one window: several windows were scored.
    assert max(len(s["doc"]["text"].split()) for s in samples(ours, "base", "tiny_rolling")) > MAX_LENGTH
    # The tuned column is the adapter's: its log-likelihoods moved.
    tuned, base = samples(ours, "tuned", "tiny_mc"), samples(ours, "base", "tiny_mc")
    assert max(abs(x - y) for a, b in zip(tuned, base) for x, y in zip(loglikelihoods(a), loglikelihoods(b))) > 1e-2


def test_generate_until_is_our_greedy_generate(ours, reference, tiny_llama_dir):
    from tunesmith.models import load_peft_adapter
    from tunesmith.models.generation import generate
    from tunesmith.training.checkpointing import latest_checkpoint
    from tunesmith.training.setup import load_model_and_tokenizer

    base = load_model_and_tokenizer(str(tiny_llama_dir), None, torch.float32, torch.device("cpu"))
    tok = base.tokenizer
    hf_texts = [s["resps"][0][0] for s in sorted(reference["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert [s["resps"][0][0] for s in samples(ours, "base", "tiny_gen")] == hf_texts  # transformers' generate agrees

    load_peft_adapter(base.model, latest_checkpoint(ours) / "adapter")
    for sample in samples(ours, "tuned", "tiny_gen"):
        context, kwargs = sample["arguments"][0]
        prompt = tok.encode(context)[-(MAX_LENGTH - kwargs["max_gen_toks"]):]  # lm-eval's left truncation
        text = tok.decode(generate(base.model, prompt, max_new_tokens=kwargs["max_gen_toks"], stop_ids=tok.stop_ids))
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text


def test_qlora_base_evaluates_in_nf4(tasks_dir, tiny_llama_dir, ours, tmp_path):
    from tunesmith.recipes import eval as recipe
    from tunesmith.training.checkpointing import latest_checkpoint
    from tunesmith.training.config import build_config

    step_dir = latest_checkpoint(ours)
    cfg = build_config(recipe.Config, {"model": str(tiny_llama_dir), "output_dir": str(tmp_path), "device": "cpu",
                                       "dtype": "fp32", "tasks": ["tiny_mc"], "include_path": str(tasks_dir),
                                       "max_length": MAX_LENGTH, "quantize_base": True, "checkpoint": str(step_dir),
                                       "log_samples": True}, [])
    assert recipe.main(cfg)["adapter"] == step_dir / "adapter"
    gaps = [abs(x - y) for a, b in zip(samples(tmp_path, "tuned", "tiny_mc"), samples(ours, "tuned", "tiny_mc"))
            for x, y in zip(loglikelihoods(a), loglikelihoods(b))]
    assert len(gaps) == 48 and 1e-3 < max(gaps) < 1.0  # NF4 rounding of the adapted layers moves them, a little


def test_without_lm_eval_it_exits_2_saying_how_to_install(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    config = training_yaml(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "out")
    assert cli.main(["eval", "--config", str(config), "tasks=[arc_easy]"]) == 2
    assert 'pip install "tunesmith[eval]"' in capsys.readouterr().err


def test_unknown_task_names_the_closest_ones():
    from tunesmith.recipes.eval import open_tasks
    from tunesmith.training.config import ConfigError

    class Tasks:  # stands in for lm-eval's TaskManager (indexing its 15k task files takes tens of seconds)
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["arc_easy", "arc_challenge", "hellaswag"] + (["mine"] if include_path else [])

    assert open_tasks(Tasks, "my_tasks", ["mine"]).all_tasks[-1] == "mine"
    with pytest.raises(ConfigError, match="no task or group named 'arc_esay' — did you mean arc_easy"):
        open_tasks(Tasks, None, ["arc_esay"])


def test_a_training_configs_typo_is_still_an_error(tiny_llama_dir, tmp_path, capsys):
    config = training_yaml(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "out")
    config.write_text(config.read_text() + "limt: 100\n")
    assert cli.main(["eval", "--config", str(config), "tasks=[tiny_mc]"]) == 2
    assert "unknown config key 'limt'" in capsys.readouterr().err


def test_unreachable_hub_exits_2_pointing_to_local_tasks(tasks_dir, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import lm_eval

    def offline(**_):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    config = training_yaml(tmp_path / "run.yaml", tiny_llama_dir, tmp_path / "out")
    assert cli.main(["eval", "--config", str(config), "tasks=[tiny_mc]", f"include_path={tasks_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Couldn't reach 'allenai/ai2_arc'" in err and "include_path=DIR" in err
