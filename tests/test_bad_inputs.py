"""The battery: ordinary mistakes, each an exit code 2 with a message that says what, where and what to do.

Every case runs ``tune-run`` in-process (``cli.main``) and asserts exit code 2, no traceback, and
the words the message must contain (the key, the value, what is allowed / the file and line).
Most fail in the config checks, before any model loads; data and checkpoint cases load the tiny
model. A few run the real entry point in a subprocess, and one shows that a bug (not a user
error) still ends in its traceback.

The table is driven by ``RECIPES``: a new recipe is one line there (and joins every case of its
kind); a new case is one ``Bad(...)`` row.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from recipe_helpers import make_prompts, write_splits
from tunesmith.training import cli

# recipe → the kind of base config it runs with
RECIPES = {
    "lora_single_device": "sft",
    "qlora_single_device": "sft",
    "lora_distributed": "sft",
    "qlora_distributed": "sft",
    "full_finetune_distributed": "full",
    "dpo_single_device": "pref",
    "dpo_distributed": "pref",
    "grpo_single_device": "grpo",
    "knowledge_distillation_single_device": "kd",
    "generate": "generate",
}
TRAINING = [r for r, kind in RECIPES.items() if kind != "generate"]
WITH_LORA = [r for r, kind in RECIPES.items() if kind in ("sft", "pref", "grpo", "kd")]
SFT = [r for r, kind in RECIPES.items() if kind in ("sft", "full")]
ALL = list(RECIPES)


@dataclass
class Env:
    """Paths the cases use: the tiny model, good and bad files, base configs per kind."""

    tmp: Path
    model: Path
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.files[name])


Args = Callable[[Env], list[str]]


@dataclass
class Bad:
    """One bad input, given to each of ``recipes``: ``tune-run RECIPE --config BASE *args`` (no base
    config when ``base=False``; ``args`` is the whole command line when ``raw``)."""

    id: str
    category: str
    recipes: list[str]
    args: Args
    words: Callable[[Env], list[str]] | list[str]
    raw: bool = False
    base: bool = True


def a(*items: str) -> Args:
    return lambda env: list(items)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


INSTRUCT = {"instruction": "Repeat the words twice.", "input": "red cat", "output": "red cat red cat"}
PAIR = {"prompt": "Say red.", "chosen": "red", "rejected": "blue"}


@pytest.fixture(scope="module")
def env(tiny_llama_dir, tiny_data, tmp_path_factory) -> Env:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    e = Env(tmp, tiny_llama_dir)
    f = e.files
    f["train"] = tiny_data["train"]
    (tmp / "pref").mkdir()
    pref = write_splits(tmp / "pref", lambda n, seed: [{**PAIR, "prompt": f"Say red {i}."} for i in range(n)])
    (tmp / "prompts").mkdir()
    prompts = write_splits(tmp / "prompts", make_prompts)
    common = {"model": str(tiny_llama_dir), "output_dir": str(tmp / "never_written"), "device": "cpu", "dtype": "fp32",
              "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "sample_max_new_tokens": 0, "logger": "none",
              "eval_batches": 1}
    sft_data = {"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "max_seq_len": 64}
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}
    bases = {
        "sft": {**common, "data": sft_data, "lora": lora},
        "full": {**common, "data": sft_data},
        "pref": {**common, "data": {"train": str(pref["train"]), "val": str(pref["val"]), "max_seq_len": 64},
                 "lora": lora, "loss_args": {"beta": 0.5}},
        "grpo": {**common, "data": {"train": str(prompts["train"]), "val": str(prompts["val"]), "max_prompt_len": 64},
                 "lora": lora, "rewards": ["exact_match"], "num_generations": 2, "max_new_tokens": 4},
        "kd": {**common, "data": sft_data, "lora": lora, "teacher": str(tiny_llama_dir)},
        "generate": {**common, "data": sft_data, "lora": lora},  # a training config, as users pass it
    }
    for kind, values in bases.items():
        f[f"base_{kind}"] = tmp / f"{kind}.yaml"
        f[f"base_{kind}"].write_text(yaml.safe_dump(values))

    # -- bad config files
    (tmp / "broken.yaml").write_text("model: x\ndata:\n  train: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    f["broken_yaml"], f["list_yaml"] = tmp / "broken.yaml", tmp / "list.yaml"
    f["typo_yaml"] = tmp / "typo.yaml"
    f["typo_yaml"].write_text(yaml.safe_dump({**bases["sft"], "learning_rate": 0.1}))
    f["nomodel_yaml"] = tmp / "nomodel.yaml"
    f["nomodel_yaml"].write_text(yaml.safe_dump({k: v for k, v in bases["sft"].items() if k != "model"}))
    f["float_batch_yaml"] = tmp / "float_batch.yaml"
    f["float_batch_yaml"].write_text(yaml.safe_dump({**bases["sft"], "batch_size": 4.5}))
    f["group_value_yaml"] = tmp / "group_value.yaml"
    f["group_value_yaml"].write_text(yaml.safe_dump({**bases["sft"], "lora": 3}))
    f["a_dir"] = tmp / "a_dir"
    f["a_dir"].mkdir()
    f["some_file"] = write_jsonl(tmp / "some_file.jsonl", [INSTRUCT])

    # -- bad data
    f["bad_json"] = write_jsonl(tmp / "bad_json.jsonl", [INSTRUCT, '{"instruction": "x", "output": '])
    f["missing_output"] = write_jsonl(tmp / "missing_output.jsonl", [INSTRUCT, {"instruction": "x", "answer": "y"}])
    f["int_output"] = write_jsonl(tmp / "int_output.jsonl", [INSTRUCT, {"instruction": "x", "output": 5}])
    f["chat_data"] = write_jsonl(tmp / "chat_data.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                      {"role": "assistant", "content": "b"}]}] * 8)
    f["bad_role"] = write_jsonl(tmp / "bad_role.jsonl", [{"messages": [{"role": "bot", "content": "b"}]}])
    f["bad_sharegpt"] = write_jsonl(tmp / "bad_sharegpt.jsonl", [{"conversations": [{"from": "robot", "value": "b"}]}])
    f["no_answer"] = write_jsonl(tmp / "no_answer.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    f["empty"] = tmp / "empty.jsonl"
    f["empty"].write_text("")
    f["blank_lines"] = tmp / "blank_lines.jsonl"
    f["blank_lines"].write_text("\n\n")
    f["txt"] = tmp / "data.txt"
    f["txt"].write_text("hello\n")
    f["three"] = write_jsonl(tmp / "three.jsonl", [INSTRUCT] * 3)
    f["text_not_str"] = write_jsonl(tmp / "text_not_str.jsonl", [{"text": ["a", "b"]}])
    f["pairs_differ"] = write_jsonl(tmp / "pairs_differ.jsonl", [PAIR, {
        "prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "another q"}, {"role": "assistant", "content": "b"}]}])
    f["pair_missing"] = write_jsonl(tmp / "pair_missing.jsonl", [PAIR, {"prompt": "q", "chosen": "a"}])

    # -- bad models and tokenizers
    f["no_config"] = tmp / "no_config"
    f["no_config"].mkdir()
    (f["no_config"] / "model.safetensors").write_bytes(b"")
    f["bert"] = tmp / "bert"
    f["bert"].mkdir()
    (f["bert"] / "config.json").write_text(json.dumps({"model_type": "bert"}))
    f["no_weights"] = tmp / "no_weights"
    shutil.copytree(tiny_llama_dir, f["no_weights"])
    (f["no_weights"] / "model.safetensors").unlink()
    f["bad_config_json"] = tmp / "bad_config_json"
    f["bad_config_json"].mkdir()
    (f["bad_config_json"] / "config.json").write_text("{not json")
    f["fake_gguf"] = tmp / "fake.gguf"
    f["fake_gguf"].write_text("not a gguf")
    f["adapter_dir"] = tmp / "adapter_dir"
    f["adapter_dir"].mkdir()
    (f["adapter_dir"] / "adapter_config.json").write_text("{}")
    f["weights_only"] = tmp / "weights_only"
    f["weights_only"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, f["weights_only"] / name)
    f["bad_tok_config"] = tmp / "bad_tok_config"
    f["bad_tok_config"].mkdir()
    shutil.copy(tiny_llama_dir / "tokenizer.json", f["bad_tok_config"])
    (f["bad_tok_config"] / "tokenizer_config.json").write_text("{oops")
    f["no_template"] = tmp / "no_template"
    f["no_template"].mkdir()
    shutil.copy(tiny_llama_dir / "tokenizer.json", f["no_template"])
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    (f["no_template"] / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                       if k != "chat_template"}))
    f["bad_jinja"] = tmp / "bad.jinja"
    f["bad_jinja"].write_text("{% for m in messages %}{{ m['content'] }")
    f["raising_jinja"] = tmp / "raising.jinja"
    f["raising_jinja"].write_text("{{ raise_exception('this template takes no system message') }}")

    # -- bad recipes and output folders
    f["not_a_recipe"] = tmp / "not_a_recipe.py"
    f["not_a_recipe"].write_text("x = 1\n")
    f["file_parent"] = tmp / "a_file"
    f["file_parent"].write_text("x")
    return e


CASES = [
    # ---- config keys, types, ranges, enums (on the command line) -------------------------------------
    Bad("key_typo", "config", ["generate"], a("max_new_tokes=3"), ["'max_new_tokes'", "did you mean max_new_tokens?"]),
    Bad("training_key_typo", "config", TRAINING, a("bach_size=4"), ["unknown config key 'bach_size'", "did you mean batch_size?"]),
    Bad("nested_key_typo", "config", WITH_LORA, a("lora.rnak=4"), ["lora.rnak", "did you mean lora.rank?"]),
    Bad("batch_size_zero", "config", TRAINING, a("batch_size=0"), ["'batch_size'", ">= 1", "0"]),
    Bad("batch_size_word", "config", TRAINING, a("batch_size=four"), ["'batch_size'", "expects int", "'four'"]),
    Bad("grad_accum_zero", "config", TRAINING, a("grad_accum_steps=0"), ["'grad_accum_steps'", ">= 1"]),
    Bad("max_steps_negative", "config", TRAINING, a("max_steps=-5"), ["'max_steps'", ">= 0", "-5"]),
    Bad("lr_negative", "config", TRAINING, a("lr=-1"), ["'lr'", "> 0", "-1"]),
    Bad("lr_word", "config", ["lora_single_device"], a("lr=fast"), ["'lr'", "expects float", "'fast'"]),
    Bad("lr_nan", "config", ["lora_single_device"], a("lr=nan"), ["'lr'", "finite"]),
    Bad("epochs_zero", "config", ["lora_single_device"], a("epochs=0"), ["'epochs'", ">= 1"]),
    Bad("warmup_negative", "config", ["dpo_single_device"], a("warmup_steps=-1"), ["'warmup_steps'", ">= 0"]),
    Bad("keep_last_negative", "config", ["full_finetune_distributed"], a("keep_last=-1"), ["'keep_last'", ">= 0"]),
    Bad("weight_decay_negative", "config", ["lora_single_device"], a("weight_decay=-0.1"), ["'weight_decay'", ">= 0"]),
    Bad("seed_negative", "config", ALL, a("seed=-3"), ["'seed'", ">= 0"]),
    Bad("dtype_fp16", "config", TRAINING, a("dtype=fp16"), ["'dtype'", "fp16", "loss scaling", "bf16"]),
    Bad("dtype_typo", "config", ALL, a("dtype=bf61"), ["'dtype'", "auto, fp32, bf16", "did you mean bf16?"]),
    Bad("optimizer_typo", "config", TRAINING, a("optimizer=adam"), ["'optimizer'", "adamw8bit", "did you mean adamw?"]),
    Bad("attention_unknown", "config", ["lora_single_device"], a("attention=flash"), ["'attention'", "sdpa, matmul"]),
    Bad("device_unknown", "config", ALL, a("device=gpu"), ["'device'", "cuda:N", "'gpu'"]),
    Bad("device_no_cuda", "config", ["lora_single_device", "generate"], a("device=cuda"),
        ["'device'", "CUDA is not available", "device=cpu"]),
    Bad("bool_word", "config", TRAINING, a("resume=maybe"), ["'resume'", "expects bool", "'maybe'"]),
    Bad("gguf_type_unknown", "config", TRAINING, a("save_gguf=q4_k_m"),
        ["'save_gguf'", "'q4_k_m'", "K-quant", "f32, f16, bf16, q8_0, q4_0, q4_1"]),
    Bad("gguf_type_in_list", "config", ["lora_single_device"], a("save_gguf=[f32,q8]"),
        ["'save_gguf'", "item 1", "'q8'", "f32, f16, bf16, q8_0, q4_0, q4_1"]),
    Bad("hub_repo_no_owner", "config", TRAINING, a("push_to_hub=my-model"),
        ["'push_to_hub'", "a Hub repo id: user/name or org/name", "'my-model'"]),
    Bad("max_seq_len_one", "config", [r for r in TRAINING if RECIPES[r] != "grpo"], a("data.max_seq_len=1"),
        ["'data.max_seq_len'", ">= 2"]),
    Bad("max_prompt_len_zero", "config", ["grpo_single_device"], a("data.max_prompt_len=0"), ["'data.max_prompt_len'", ">= 1"]),
    Bad("one_generation", "config", ["grpo_single_device"], a("num_generations=1"),
        ["'num_generations'", ">= 2", "compares completions within a group"]),
    Bad("greedy_sampling", "config", ["grpo_single_device"], a("temperature=0"), ["'temperature'", "> 0", "no signal"]),
    Bad("reward_typo", "config", ["grpo_single_device"], a("rewards=[exact_mach]"),
        ["'rewards'", "exact_mach", "did you mean exact_match?"]),
    Bad("reward_weights_count", "config", ["grpo_single_device"], a("reward_weights=[1.0,2.0]"),
        ["'reward_weights'", "2 values for 1 rewards"]),
    Bad("policy_loss_typo", "config", ["grpo_single_device"], a("loss=dapoo"), ["'loss'", "did you mean dapo?"]),
    Bad("kd_ratio_above_one", "config", ["knowledge_distillation_single_device"], a("kd_ratio=1.5"),
        ["'kd_ratio'", "<= 1"]),
    Bad("kd_loss_args_typo", "config", ["knowledge_distillation_single_device"], a("loss_args.temprature=2"),
        ["loss_args.temprature", "did you mean temperature?"]),
    Bad("kd_full_and_nf4", "config", ["knowledge_distillation_single_device"], a("full=true", "quantize_base=true"),
        ["quantize_base=true", "full=true"]),
    Bad("val_fraction_above_one", "config", ["lora_single_device", "dpo_single_device"], a("data.val_fraction=1.5"),
        ["'data.val_fraction'", "< 1"]),
    Bad("format_typo", "config", SFT, a("data.format=chta"), ["'data.format'", "instruct, chat, text", "did you mean chat?"]),
    Bad("train_on_unknown", "config", ["lora_single_device"], a("data.train_on=answers"), ["'data.train_on'", "assistant, all"]),
    Bad("column_map_key_typo", "config", SFT, a("data.column_map.ouput=response"),
        ["data.column_map.ouput", "did you mean output?", "instruction, input, output"]),
    Bad("lora_rank_zero", "config", WITH_LORA, a("lora.rank=0"), ["'lora.rank'", ">= 1"]),
    Bad("lora_alpha_zero", "config", ["lora_single_device"], a("lora.alpha=0"), ["'lora.alpha'", "> 0"]),
    Bad("lora_dropout_one", "config", ["lora_single_device"], a("lora.dropout=1.0"), ["'lora.dropout'", "< 1"]),
    Bad("lora_target_typo", "config", WITH_LORA, a("lora.targets=[q_proj,v_prj]"),
        ["'lora.targets'", "'v_prj'", "did you mean v_proj?", "gate_proj"]),
    Bad("lora_targets_empty", "config", ["lora_single_device"], a("lora.targets=[]"), ["lora.targets", "empty"]),
    Bad("loss_args_unknown", "config", SFT, a("loss_args.chunk_sze=64"),
        ["loss_args.chunk_sze", "did you mean chunk_size?", "CrossEntropyLoss"]),
    Bad("loss_args_type", "config", ["lora_single_device"], a("loss_args.chunk_size=many"),
        ["loss_args.chunk_size", "expects int", "'many'"]),
    Bad("loss_not_importable", "config", ["lora_single_device", "dpo_single_device"], a("loss=no_such_module.Loss"),
        ["'loss'", "no_such_module"]),
    Bad("pref_loss_typo", "config", ["dpo_single_device"], a("loss=dpp"), ["'loss'", "did you mean dpo?", "simpo"]),
    Bad("pref_loss_args_typo", "config", ["dpo_single_device"], a("loss_args.bta=0.1"), ["loss_args.bta", "did you mean beta?"]),
    Bad("pref_beta_negative", "config", ["dpo_single_device"], a("loss_args.beta=-1"), ["loss_args", "beta must be > 0"]),
    Bad("pref_label_smoothing", "config", ["dpo_single_device"], a("loss=ipo", "loss_args.label_smoothing=0.1"),
        ["loss_args.label_smoothing", "IPOLoss", "beta"]),
    Bad("fsdp_dtype_fp16", "config", ["full_finetune_distributed"], a("compute_dtype=fp16"), ["'compute_dtype'", "bf16"]),
    Bad("fsdp_reduce_dtype", "config", ["full_finetune_distributed"], a("reduce_dtype=fp8"), ["'reduce_dtype'", "fp32, bf16"]),
    Bad("offloading_on_cpu", "config", ["lora_single_device"], a("activation_offloading=true"),
        ["activation_offloading", "CUDA"]),
    Bad("group_as_value", "config", TRAINING, a("data=x"), ["'data'", "group of options", "data.train"]),
    Bad("training_key_on_generate", "config", ["generate"], a("lora.rank=4"), ["unknown config key 'lora'", "top_p"]),
    Bad("max_new_tokens_zero", "config", ["generate"], a("max_new_tokens=0"), ["'max_new_tokens'", ">= 1"]),
    Bad("temperature_negative", "config", ["generate"], a("temperature=-1"), ["'temperature'", ">= 0"]),
    Bad("top_p_zero", "config", ["generate"], a("top_p=0"), ["'top_p'", "> 0"]),
    Bad("top_p_above_one", "config", ["generate"], a("top_p=1.5"), ["'top_p'", "<= 1"]),
    Bad("adapter_missing", "config", ["generate"], lambda e: [f"adapter={e.tmp / 'nope'}"], ["'adapter'", "adapter_config.json"]),
    Bad("batch_not_multiple_of_processes", "config", ["full_finetune_distributed"],
        a("batch_size=3", "--nproc-per-node", "2"), ["'batch_size'", "multiple", "(2)"]),
    # ---- command-line syntax -----------------------------------------------------------------------
    Bad("no_equals", "cli", ALL, a("batch_size"), ["'batch_size'", "key=value"]),
    Bad("empty_key", "cli", ["lora_single_device"], a("=4"), ["'=4'", "not a config key"]),
    Bad("key_twice", "cli", ["lora_single_device"], a("batch_size=4", "batch_size=8"), ["'batch_size'", "twice"]),
    Bad("flag_typo", "cli", ALL, a("--dryrun"), ["--dryrun", "did you mean --dry-run?"]),
    Bad("no_config", "cli", ["lora_single_device"], a("lora_single_device"), ["missing --config"], raw=True),
    Bad("config_without_value", "cli", ["lora_single_device"], a("lora_single_device", "--config"),
        ["--config needs a value"], raw=True),
    Bad("config_twice", "cli", ["lora_single_device"], a("--config", "llama3_8b"), ["--config is given twice"]),
    Bad("config_name_typo", "cli", ["lora_single_device"], a("lora_single_device", "--config", "smollm2_135"),
        ["no config named 'smollm2_135'", "did you mean smollm2_135m?"], raw=True),
    Bad("recipe_typo", "cli", ["lora_single_device"], a("lora_single_devce", "--config", "llama3_8b"),
        ["no recipe named 'lora_single_devce'", "did you mean lora_single_device?"], raw=True),
    Bad("recipe_file_missing", "cli", ["lora_single_device"], a("my_recipe.py", "--config", "llama3_8b"),
        ["my_recipe.py does not exist"], raw=True),
    Bad("recipe_file_not_a_recipe", "cli", ["lora_single_device"],
        lambda e: [e["not_a_recipe"], "--config", e["base_sft"]], ["is not a recipe", "Config"], raw=True),
    Bad("launch_single_device", "cli", ["lora_single_device", "dpo_single_device", "generate"],
        a("--nproc-per-node", "2"), ["runs in one process", "--nproc-per-node"]),
    Bad("launch_bad_value", "cli", ["full_finetune_distributed"], a("--nproc-per-node", "two"),
        ["--nproc-per-node 'two'", "not a valid value"]),
    Bad("cp_arguments", "cli", ["lora_single_device"], a("cp", "lora_single_device"), ["cp takes NAME and DEST"], raw=True),
    Bad("cp_unknown", "cli", ["lora_single_device"], lambda e: ["cp", "lora_singel_device", str(e.tmp)],
        ["did you mean lora_single_device?"], raw=True),
    Bad("cp_no_overwrite", "cli", ["lora_single_device"], lambda e: ["cp", "smollm2_135m", e["some_file"]],
        ["already exists"], raw=True),
    Bad("ls_arguments", "cli", ["lora_single_device"], a("ls", "extra"), ["ls takes no arguments"], raw=True),
    # ---- config files ------------------------------------------------------------------------------
    Bad("config_file_missing", "config file", ALL, lambda e: ["--config", str(e.tmp / "nope.yaml")],
        ["nope.yaml does not exist"], base=False),
    Bad("config_file_broken", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["broken_yaml"]], lambda e: [e["broken_yaml"], "line", "not valid YAML"],
        raw=True),
    Bad("config_file_list", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["list_yaml"]], ["must hold a mapping"], raw=True),
    Bad("config_file_key_typo", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["typo_yaml"]], lambda e: [e["typo_yaml"], "'learning_rate'"], raw=True),
    Bad("config_file_no_model", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["nomodel_yaml"]], ["'model' has no value", "model=..."], raw=True),
    Bad("config_file_float_int", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["float_batch_yaml"]], ["'batch_size'", "expects int", "4.5"], raw=True),
    Bad("config_file_group_value", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["group_value_yaml"]], ["'lora'", "group of options"], raw=True),
    Bad("config_file_is_dir", "config file", ["lora_single_device"],
        lambda e: ["lora_single_device", "--config", e["a_dir"]], ["is a folder", "YAML file"], raw=True),
    # ---- data files --------------------------------------------------------------------------------
    Bad("data_missing", "data", TRAINING, lambda e: [f"data.train={e.tmp / 'missing.jsonl'}"],
        ["'data.train'", "missing.jsonl", "no such file"]),
    Bad("val_missing", "data", ["lora_single_device"], lambda e: [f"data.val={e.tmp / 'val_missing.jsonl'}"],
        ["'data.val'", "no such file"]),
    Bad("data_wrong_type", "data", ["lora_single_device"], lambda e: [f"data.train={e['txt']}"],
        ["'data.train'", "unsupported data file type", ".jsonl"]),
    Bad("data_empty_file", "data", ["lora_single_device", "dpo_single_device"], lambda e: [f"data.train={e['empty']}"],
        ["'data.train'", "empty"]),
    Bad("data_only_blank_lines", "data", ["lora_single_device"], lambda e: [f"data.train={e['blank_lines']}"],
        lambda e: [e["blank_lines"], "holds no records"]),
    Bad("data_bad_json", "data", ["lora_single_device"], lambda e: [f"data.train={e['bad_json']}"],
        lambda e: [f"{e['bad_json']} line 2", "not valid JSON"]),
    Bad("data_missing_field", "data", ["lora_single_device"], lambda e: [f"data.train={e['missing_output']}"],
        lambda e: [f"{e['missing_output']} line 2", "missing field 'output'", "data.column_map.output"]),
    Bad("data_field_type", "data", ["lora_single_device"], lambda e: [f"data.train={e['int_output']}"],
        lambda e: [f"{e['int_output']} line 2", "'output' must be a string"]),
    Bad("data_wrong_format", "data", ["lora_single_device"], lambda e: [f"data.train={e['chat_data']}"],
        ["missing field 'instruction'", "set data.format=chat"]),
    Bad("data_bad_role", "data", ["lora_single_device"], lambda e: [f"data.train={e['bad_role']}", "data.format=chat"],
        lambda e: [f"{e['bad_role']} line 1", "messages[0]", "'bot'"]),
    Bad("data_bad_sharegpt_speaker", "data", ["lora_single_device"],
        lambda e: [f"data.train={e['bad_sharegpt']}", "data.format=chat"],
        lambda e: [f"{e['bad_sharegpt']} line 1", "conversations[0]", "'robot'", "human"]),
    Bad("data_no_assistant", "data", ["lora_single_device"], lambda e: [f"data.train={e['no_answer']}", "data.format=chat"],
        ["no assistant message"]),
    Bad("data_text_not_string", "data", ["lora_single_device"], lambda e: [f"data.train={e['text_not_str']}", "data.format=text"],
        lambda e: [f"{e['text_not_str']} line 1", "'text' must be a string"]),
    Bad("column_map_unseen", "data", ["lora_single_device"], a("data.column_map.input=context"),
        ["data.column_map.input='context'", "no record has a field 'context'"]),
    Bad("fewer_than_batch", "data", ["lora_single_device"], lambda e: [f"data.train={e['three']}"],
        lambda e: [e["three"], "3 usable example(s)", "batch_size=4"]),
    Bad("pair_prompts_differ", "data", ["dpo_single_device"], lambda e: [f"data.train={e['pairs_differ']}"],
        lambda e: [f"{e['pairs_differ']} line 2", "different conversations"]),
    Bad("pair_missing_field", "data", ["dpo_single_device"], lambda e: [f"data.train={e['pair_missing']}"],
        lambda e: [f"{e['pair_missing']} line 2", "missing field 'rejected'"]),
    Bad("template_refuses_data", "data", ["lora_single_device"], lambda e: [f"chat_template={e['raising_jinja']}"],
        lambda e: [f"{e['train']} line 1", "this template takes no system message"]),
    # ---- model path --------------------------------------------------------------------------------
    Bad("model_missing_dir", "model", ALL, lambda e: [f"model={e.tmp / 'no_such_model'}"],
        ["'model'", "no_such_model", "no such file or folder"]),
    Bad("model_is_a_file", "model", ["lora_single_device", "generate"], lambda e: [f"model={e['some_file']}"],
        ["'model'", "is a file, not a model"]),
    Bad("model_no_config_json", "model", TRAINING, lambda e: [f"model={e['no_config']}"], ["'model'", "no config.json"]),
    Bad("model_unsupported_type", "model", ["lora_single_device", "generate"], lambda e: [f"model={e['bert']}"],
        ["model_type 'bert' is not supported", "llama"]),
    Bad("model_no_weights", "model", ["lora_single_device"], lambda e: [f"model={e['no_weights']}"],
        ["'model'", "no safetensors weights"]),
    Bad("model_config_not_json", "model", ["lora_single_device"], lambda e: [f"model={e['bad_config_json']}"],
        ["'model'", "config.json", "not valid JSON"]),
    Bad("model_fake_gguf", "model", ["lora_single_device", "generate"], lambda e: [f"model={e['fake_gguf']}"],
        ["'model'", "not a GGUF file"]),
    Bad("model_gguf_missing", "model", ["lora_single_device"], lambda e: [f"model={e.tmp / 'missing.gguf'}"],
        ["'model'", "no such file"]),
    Bad("model_package_missing", "model", ["lora_single_device"], a("model=package:no_such_package/m.gguf"),
        ["'model'", "'no_such_package' is not installed"]),
    Bad("model_is_an_adapter", "model", ["generate"], lambda e: [f"model={e['adapter_dir']}"], ["adapter="]),
    # ---- tokenizer ---------------------------------------------------------------------------------
    Bad("model_without_tokenizer", "tokenizer", TRAINING, lambda e: [f"model={e['weights_only']}"],
        ["'model'", "no tokenizer.json", "tokenizer="]),
    Bad("tokenizer_missing", "tokenizer", ["lora_single_device", "generate"], lambda e: [f"tokenizer={e.tmp / 'no_tok'}"],
        ["'tokenizer'", "no such file"]),
    Bad("tokenizer_dir_empty", "tokenizer", ["lora_single_device"], lambda e: [f"tokenizer={e['a_dir']}"],
        ["'tokenizer'", "no tokenizer.json or tokenizer.model"]),
    Bad("tokenizer_config_broken", "tokenizer", ["lora_single_device"], lambda e: [f"tokenizer={e['bad_tok_config']}"],
        ["tokenizer_config.json", "invalid JSON"]),
    Bad("chat_template_typo", "tokenizer", ALL, a("chat_template=chatmll"), ["'chat_template'", "did you mean chatml?"]),
    Bad("chat_template_broken_file", "tokenizer", ["lora_single_device"], lambda e: [f"chat_template={e['bad_jinja']}"],
        ["'chat_template'", "does not parse"]),
    Bad("no_chat_template", "tokenizer", ["lora_single_device"], lambda e: [f"tokenizer={e['no_template']}"],
        ["has no chat template", "chat_template=chatml"]),
    # ---- output folder -----------------------------------------------------------------------------
    Bad("output_dir_is_file", "output", TRAINING, lambda e: [f"output_dir={e['some_file']}"],
        ["'output_dir'", "is a file, not a folder"]),
    Bad("output_dir_below_file", "output", ["lora_single_device"], lambda e: [f"output_dir={e['file_parent']}/run"],
        ["'output_dir'", "is a file, so no folder"]),
]

PARAMS = [pytest.param(case, recipe, id=f"{case.category}-{case.id}-{recipe}") for case in CASES for recipe in case.recipes]


def command(case: Bad, recipe: str, env: Env) -> list[str]:
    args = case.args(env)
    if case.raw:
        return args
    base = ["--config", env[f"base_{RECIPES[recipe]}"]] if case.base else []
    return [recipe, *base, *args]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cases that load the tiny model share 2 busy cores
    yield
    torch.set_num_threads(threads)


def assert_refused(code: int, err: str, words: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("tune-run: error: "), err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"


@pytest.mark.parametrize("case,recipe", PARAMS)
def test_bad_input_exits_2_with_a_message(case, recipe, env, capsys, one_thread, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = cli.main(command(case, recipe, env))
    err = capsys.readouterr().err
    words = case.words(env) if callable(case.words) else case.words
    assert_refused(code, err, [w for w in words if w])


def test_battery_size():
    by_category: dict[str, int] = {}
    for case in CASES:
        by_category[case.category] = by_category.get(case.category, 0) + len(case.recipes)
    assert sum(by_category.values()) >= 60, by_category
    print(by_category)


# ---- checkpoints: resume refuses what does not fit, and changes nothing --------------------------------
def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_runs(env, tmp_path_factory) -> dict[str, Path]:
    """A LoRA run and a full fine-tune (DCP) run of 2 steps, each saving both steps."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for recipe, kind in (("lora_single_device", "sft"), ("full_finetune_distributed", "full")):
            out[recipe] = tmp_path_factory.mktemp("run") / recipe
            code = cli.main([recipe, "--config", env[f"base_{kind}"], f"output_dir={out[recipe]}", "save_every=1",
                             "keep_last=0"])
            assert code == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run.name
    shutil.copytree(run, dest)
    return dest


RESUME = [  # (recipe, override, mutate the copy (or None), words)
    ("lora_single_device", "batch_size=2", None, ["batch_size: 4 → 2", "step_000002", "config.yaml", "Nothing was changed"]),
    ("lora_single_device", "lora.rank=8", None, ["lora.rank: 4 → 8"]),
    ("lora_single_device", "seed=1", None, ["seed: 0 → 1"]),
    ("lora_single_device", "data.max_seq_len=32", None, ["data.max_seq_len: 64 → 32"]),
    ("lora_single_device", "lr=0.5", None, ["lr: 0.0002 → 0.5"]),
    ("lora_single_device", "max_steps=3",
     lambda run: (run / "step_000002" / "trainable.safetensors").write_bytes(
         (run / "step_000002" / "trainable.safetensors").read_bytes()[:100]),
     ["step_000002/trainable.safetensors", "unreadable", "previous checkpoint", "step_000001", "mv "]),
    ("lora_single_device", "max_steps=3",
     lambda run: (run / "step_000002" / "training_state.pt").write_bytes(b"garbage"),
     ["step_000002/training_state.pt", "unreadable", "step_000001"]),
    ("lora_single_device", "max_steps=3", lambda run: (run / "step_000002" / "config.yaml").unlink(),
     ["step_000002/config.yaml is missing"]),
    ("lora_single_device", "max_steps=3",
     lambda run: [p.write_bytes(p.read_bytes()[:50]) for p in run.glob("step_*/trainable.safetensors")],
     ["unreadable", "no earlier complete checkpoint"]),
    ("full_finetune_distributed", "grad_accum_steps=2", None, ["grad_accum_steps: 1 → 2"]),
    ("full_finetune_distributed", "max_steps=3",
     lambda run: [p.write_bytes(p.read_bytes()[:64]) for p in (run / "step_000002" / "sharded").glob("*.distcp")],
     ["step_000002/sharded", "unreadable", "step_000001"]),
    ("full_finetune_distributed", "max_steps=3",
     lambda run: [p.unlink() for p in (run / "step_000002" / "sharded").glob("*.distcp")],
     ["step_000002/sharded", "shard file is missing"]),
]


@pytest.mark.parametrize("recipe,override,mutate,words", RESUME,
                         ids=[f"{r}-{o}-{'broken' if m else 'config'}" for r, o, m, _ in RESUME])
def test_refused_resume_names_the_problem_and_leaves_checkpoints_byte_identical(
        recipe, override, mutate, words, env, finished_runs, tmp_path, capsys, one_thread):
    run = copy_of(finished_runs[recipe], tmp_path)
    if mutate is not None:
        mutate(run)
    before = tree_digest(run)
    code = cli.main([recipe, "--config", env[f"base_{RECIPES[recipe]}"], f"output_dir={run}", "resume=true",
                     "save_every=1", "keep_last=1", override])
    assert_refused(code, capsys.readouterr().err, words)
    assert tree_digest(run) == before  # nothing modified, nothing pruned


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(env, finished_runs, capsys):
    run = finished_runs["lora_single_device"]
    before = tree_digest(run)
    code = cli.main(["lora_single_device", "--config", env["base_sft"], f"output_dir={run}"])
    assert_refused(code, capsys.readouterr().err, ["already holds checkpoints", "step_000002", "resume=true"])
    assert tree_digest(run) == before


def test_allowed_changes_resume(env, finished_runs, tmp_path, capsys, one_thread):
    run = copy_of(finished_runs["lora_single_device"], tmp_path)
    code = cli.main(["lora_single_device", "--config", env["base_sft"], f"output_dir={run}", "resume=true",
                     "max_steps=3", "eval_every=1", "save_every=0", "keep_last=5", "attention=matmul"])
    assert code == 0, capsys.readouterr().err
    assert (run / "step_000003").is_dir()


def test_generate_reads_the_training_config_and_finds_the_newest_adapter(env, finished_runs, capsys, one_thread):
    run = finished_runs["lora_single_device"]
    code = cli.main(["generate", "--config", env["base_sft"], f"output_dir={run}", "prompt=red cat", "max_new_tokens=3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"+ adapter {run / 'step_000002' / 'adapter'}" in out.err and out.out.strip() != ""
    code = cli.main(["generate", "--config", env["base_full"], f"output_dir={finished_runs['full_finetune_distributed']}",
                     "prompt=hi"])
    assert_refused(code, capsys.readouterr().err, ["holds full models, not adapters", "/hf", "adapter=none"])


def test_dcp_shape_mismatch_is_named(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from tunesmith.training.checkpointing import explain_dcp_load_failure

    dcp.save({"w": torch.zeros(4, 4)}, checkpoint_id=str(tmp_path / "step_000001" / "sharded"), no_dist=True)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(5, 5)}, checkpoint_id=str(tmp_path / "step_000001" / "sharded"), no_dist=True)
    explained = explain_dcp_load_failure(info.value, tmp_path / "step_000001", [])
    assert explained is not None and "other shapes" in str(explained) and "[5, 5]" in str(explained)
    assert explain_dcp_load_failure(CheckpointException("x", {0: (TypeError("a bug"), [])}), tmp_path, []) is None


# ---- the real entry point -----------------------------------------------------------------------------
def tune_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.training.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("make_args,words", [
    (lambda e: ["lora_single_device", "--config", e["base_sft"], "lora.rank=0"], ["'lora.rank'", ">= 1"]),
    (lambda e: ["dpo_single_device", "--config", e["base_pref"], f"data.train={e['pairs_differ']}"], ["different conversations"]),
    (lambda e: ["generate", "--config", e["base_generate"], f"model={e['bert']}"], ["model_type 'bert'"]),
], ids=["config", "data", "model"])
def test_real_entry_point_prints_no_traceback(env, make_args, words):
    r = tune_run(*make_args(env))
    assert_refused(r.returncode, r.stderr, words)


def test_hub_repo_that_cannot_be_fetched_is_a_user_error(env):
    import os

    r = subprocess.run([sys.executable, "-m", "tunesmith.training.cli", "lora_single_device", "--config", env["base_sft"],
                        "model=nobody-here/no-such-model"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_refused(r.returncode, r.stderr, ["HF_HUB_OFFLINE"])


def test_a_bug_still_shows_its_traceback(env, tmp_path, monkeypatch):
    recipe = tmp_path / "buggy_recipe.py"
    recipe.write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Config:\n    steps: int = 1\n\n\n"
        "def main(cfg):\n    open('/definitely/not/here/state.json')  # a bug, not a user error\n")
    (tmp_path / "empty.yaml").write_text("steps: 2\n")
    r = tune_run(str(recipe), "--config", str(tmp_path / "empty.yaml"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
    # in-process too: an internal error is not swallowed into exit 2
    import tunesmith.training.cli as cli_module

    def broken(*args, **kwargs):
        raise FileNotFoundError("internal file went missing")

    monkeypatch.setattr(cli_module, "check_environment", broken)
    with pytest.raises(FileNotFoundError, match="internal file"):
        cli.main(["lora_single_device", "--config", env["base_sft"]])


def test_ls_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.training.cli", "ls"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before tune-run writes (like `tune-run ls | head -0`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
