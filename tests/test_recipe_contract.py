"""One contract for every training recipe, checked by the same cases on each (torchtune's recipes drifted
apart: its issue #2305). A recipe that stops honouring a part of it fails here.

The contract: a typed config (an unknown key or a wrong type is refused), held-out evaluation before
and after training, packing (``data.packing=true`` really packs: several documents per row reach the
model; not for GRPO, whose rows are sampled completions), a custom loss named by import path, TensorBoard events with the recipe's tags, a progress
bar, and exact resume (a run stopped right after a checkpoint and resumed gives the same losses and
the same trained weights as the uninterrupted run).

Adding a recipe is one entry in ``CASES`` (and, for a new kind of data, one entry in ``KINDS``).
Distributed recipes run here as one plain process (no torchrun); tests/test_distributed_recipes.py
runs them on two processes. Each case shares three runs (module fixture): the full run, the run
stopped after its first checkpoint, and its resumption.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from hub_standin import standin_hub
from recipe_helpers import run_until_checkpoint
from tunesmith.models.llama import Llama
from tunesmith.training.config import ConfigError, build_config

STEPS, SAVE_AT = 4, 2

# Custom losses named by import path (``contract_losses.CountingCE``); each records its calls.
CONTRACT_LOSSES = '''
from tunesmith.training.losses import CrossEntropyLoss
from tunesmith.training.distillation_losses import ForwardKL
from tunesmith.training.policy_losses import GRPOLoss
from tunesmith.training.preference_losses import DPOLoss

CALLS = []


class CountingCE(CrossEntropyLoss):
    def __call__(self, hidden, labels, head):
        CALLS.append("sft")
        return super().__call__(hidden, labels, head)


class CountingDPO(DPOLoss):
    def __call__(self, logps):
        CALLS.append("preference")
        return super().__call__(logps)


class CountingGRPO(GRPOLoss):
    def __call__(self, x):
        CALLS.append("policy")
        return super().__call__(x)


class CountingKL(ForwardKL):
    def __call__(self, *args):
        CALLS.append("distillation")
        return super().__call__(*args)


def vowels(prompts, completions, **_):
    """A reward a tiny random model can move: the share of vowels in the completion."""
    return [sum(ch in "aeiou" for ch in text) / max(1, len(text)) for text in completions]
'''

SFT_TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib", "val/loss"}
PREFERENCE_TAGS = {"train/loss", "train/reward_acc", "train/margin", "train/lr", "train/grad_norm",
                   "train/tokens_per_s", "train/peak_mem_gib", "rewards/chosen", "rewards/rejected",
                   "logps/policy_chosen", "logps/reference_rejected", "val/reward_acc", "val/loss"}
POLICY_TAGS = {"train/loss", "train/reward", "train/kl", "train/clip_fraction", "train/completion_len",
               "train/gen_tokens_per_s", "train/train_tokens_per_s", "train/lr", "train/grad_norm",
               "rewards/vowels/mean", "rewards/vowels/std", "val/reward"}
DISTILLATION_TAGS = {"train/loss", "train/kd_loss", "train/ce_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                     "train/peak_mem_gib", "val/kl", "val/loss"}
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "output"]}
SEQUENCES = {"max_seq_len": 64, "packing": True}  # the data options of every kind trained on token sequences
# What the full run's final checkpoint also writes and uploads (the runs stopped and resumed write none).
FINAL_OUTPUTS = {"save_merged": True, "save_gguf": "f32", "push_to_hub": "me/contract-run"}


@dataclass(frozen=True)
class Kind:
    """What a family of recipes trains on and reports."""

    data: str  # the conftest fixture with its train/val files
    loss: str  # the custom loss (import path) the contract plugs in
    tags: frozenset[str]  # TensorBoard tags every run of the kind writes
    held_out: Callable[[Any], float]  # the number a held-out evaluation reports
    data_values: dict[str, Any] = field(default_factory=lambda: dict(SEQUENCES))  # beside data.train / data.val
    values: dict[str, Any] = field(default_factory=dict)  # what every recipe of the kind needs besides
    packs: bool = True  # data.packing applies (it does not to sampled completions)


KINDS = {
    "sft": Kind("tiny_data", "contract_losses.CountingCE", frozenset(SFT_TAGS), lambda v: v),
    "preference": Kind("tiny_pref_data", "contract_losses.CountingDPO", frozenset(PREFERENCE_TAGS), lambda v: v["loss"]),
    "policy": Kind("tiny_prompt_data", "contract_losses.CountingGRPO", frozenset(POLICY_TAGS), lambda v: v["reward"],
                   data_values={"max_prompt_len": 64}, packs=False,
                   values={"rewards": ["contract_losses.vowels"], "num_generations": 4, "max_new_tokens": 6}),
    "distillation": Kind("tiny_data", "contract_losses.CountingKL", frozenset(DISTILLATION_TAGS), lambda v: v["kl"]),
}


@dataclass(frozen=True)
class Case:
    """One recipe under the contract.

    Attributes:
        recipe: Module name under ``tunesmith.recipes``.
        kind: A key of ``KINDS``.
        values: Config values of this recipe (beside the common ones below).
        weights: Where the trained weights of a checkpoint are: ``trainable.safetensors`` (the
            single-device format), or a Hugging Face folder (``hf``, ``merged``) for DCP recipes.
        id: Test id (the recipe name unless one recipe has several cases).
    """

    recipe: str
    kind: str
    values: dict[str, Any] = field(default_factory=dict)
    weights: str = "trainable.safetensors"
    id: str = ""


CASES = [
    Case("lora_single_device", "sft", {"lora": LORA, "dtype": "fp32"}),
    Case("qlora_single_device", "sft", {"lora": LORA}),  # its defaults: NF4 base, bf16
    Case("lora_distributed", "sft", {"lora": LORA, "dtype": "fp32"}),
    Case("qlora_distributed", "sft", {"lora": LORA}),
    Case("full_finetune_distributed", "sft", {"dtype": "fp32", "lr": 1e-3}, weights="hf/model.safetensors"),
    Case("dpo_single_device", "preference", {"lora": LORA, "dtype": "fp32"}),
    Case("dpo_distributed", "preference", {"lora": LORA, "dtype": "fp32"}),
    Case("dpo_distributed", "preference", {"full": True, "dtype": "fp32", "lr": 1e-3, "save_merged": True},
         weights="merged/model.safetensors", id="dpo_distributed-full"),
    Case("grpo_single_device", "policy", {"lora": LORA, "dtype": "fp32"}),
    Case("knowledge_distillation_single_device", "distillation", {"lora": LORA, "dtype": "fp32", "teacher": "TEACHER"}),
]


def common_values(data: dict[str, Path], out: Path, kind: Kind) -> dict[str, Any]:
    return {
        "data": {"train": str(data["train"]), "val": str(data["val"]), **kind.data_values},
        "output_dir": str(out), "device": "cpu", "batch_size": 2, "max_steps": STEPS, "lr": 1e-2, "warmup_steps": 1,
        "save_every": SAVE_AT, "eval_every": SAVE_AT, "keep_last": 0, "eval_batches": 1, "sample_max_new_tokens": 3,
        "logger": "tensorboard", "loss": kind.loss, **kind.values,
    }


@dataclass
class Runs:
    case: Case
    module: Any
    values: Callable[[Path], dict[str, Any]]
    full: dict
    stdout: str
    stderr: str
    packed_rows: list[int]  # documents per row of every training forward (from a spy on the model)
    resumed: dict
    out: Path
    hub: dict  # what the stand-in Hub received from the full run


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id or c.recipe)
def runs(request, tiny_llama_dir, tmp_path_factory) -> Runs:
    case: Case = request.param
    kind = KINDS[case.kind]
    data = request.getfixturevalue(kind.data)
    module = importlib.import_module(f"tunesmith.recipes.{case.recipe}")
    tmp = tmp_path_factory.mktemp(case.id or case.recipe)
    (tmp / "contract_losses.py").write_text(CONTRACT_LOSSES)

    def values(out: Path) -> dict[str, Any]:
        extra = {k: (str(request.getfixturevalue("tiny_teacher_dir")) if v == "TEACHER" else v)
                 for k, v in case.values.items()}  # the distillation teacher: another tiny model
        return {"model": str(tiny_llama_dir), **common_values(data, out, kind), **extra}

    packed_rows: list[int] = []
    real_hidden_states = Llama.hidden_states

    def spy(self, tokens, *, positions=None, document_ids=None):
        if torch.is_grad_enabled() and document_ids is not None:
            packed_rows.extend(int(row.unique().numel()) for row in document_ids)
        return real_hidden_states(self, tokens, positions=positions, document_ids=document_ids)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: oversubscription makes a tiny run many times slower
    with pytest.MonkeyPatch.context() as patch:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            patch.delenv(key, raising=False)
        patch.syspath_prepend(str(tmp))
        sys.modules.pop("contract_losses", None)
        patch.setattr(Llama, "hidden_states", spy)
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), standin_hub(patch) as hub:
                full = module.main(build_config(module.Config, values(tmp / "full") | FINAL_OUTPUTS, []))
            spied = list(packed_rows)
            run_until_checkpoint(patch, lambda: module.main(build_config(module.Config, values(tmp / "split"), [])),
                                 stop_step=SAVE_AT)
            resumed = module.main(build_config(module.Config, values(tmp / "split") | {"resume": True}, []))
        finally:
            torch.set_num_threads(threads)
    return Runs(case, module, values, full, stdout.getvalue(), stderr.getvalue(), spied, resumed, tmp, dict(hub))


def test_config_is_typed_and_unknown_keys_are_refused(runs):
    good = runs.values(runs.out / "typed")
    build_config(runs.module.Config, good, [])
    with pytest.raises(ConfigError, match="unknown config key 'bach_size'.*did you mean batch_size"):
        build_config(runs.module.Config, good, ["bach_size=4"])
    with pytest.raises(ConfigError, match="config key 'max_steps'.*expects int, got 'four'"):
        build_config(runs.module.Config, good, ["max_steps=four"])


def test_held_out_evaluation_before_and_after(runs):
    kind = KINDS[runs.case.kind]
    before, after = kind.held_out(runs.full["held_out_before"]), kind.held_out(runs.full["held_out_after"])
    assert before > 0 and after > 0 and after != before  # both measured, and training moved the model
    assert "(before training)" in runs.stdout and "(after training)" in runs.stdout
    assert "answer (before)" in runs.stdout and "answer (after)" in runs.stdout  # the greedy held-out answers


def test_packing_puts_several_documents_in_a_row(runs):
    if not KINDS[runs.case.kind].packs:
        pytest.skip(f"{runs.case.recipe} trains on sampled completions: packing does not apply")
    assert runs.packed_rows, "data.packing=true but no training forward received document ids"
    assert max(runs.packed_rows) >= 3  # several documents (pairs: both responses) share a row


def test_custom_loss_by_import_path(runs):
    calls = sys.modules["contract_losses"].CALLS
    assert calls.count(runs.case.kind) >= STEPS, "the configured loss class was not the one the recipe called"


def test_tensorboard_has_the_expected_tags(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs.out / "full" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert KINDS[runs.case.kind].tags <= tags, sorted(KINDS[runs.case.kind].tags - tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_progress_bar(runs):
    assert "train:" in runs.stderr and "100%" in runs.stderr and "loss=" in runs.stderr


def test_resume_after_a_checkpoint_gives_the_same_losses_and_weights(runs):
    assert len(runs.resumed["losses"]) == STEPS - SAVE_AT
    torch.testing.assert_close(torch.tensor(runs.resumed["losses"]), torch.tensor(runs.full["losses"][SAVE_AT:]),
                               atol=1e-6, rtol=0)
    a = load_file(runs.full["checkpoint"] / runs.case.weights)
    b = load_file(runs.resumed["checkpoint"] / runs.case.weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert runs.full["losses"][-1] != runs.full["losses"][0]  # it trained


def merged_folder(runs: Runs) -> Path:
    """The final checkpoint's HF folder: ``hf/`` for the full fine-tune, ``merged/`` otherwise."""
    return runs.full["checkpoint"] / ("hf" if runs.case.recipe == "full_finetune_distributed" else "merged")


def test_save_gguf_writes_the_merged_model_beside_the_merged_folder(runs):
    from tunesmith.models import load_pretrained

    final = runs.full["checkpoint"]
    gguf_file = final / "gguf" / "model-f32.gguf"
    assert gguf_file.is_file() and (final / "gguf" / "Modelfile").read_text().startswith("FROM ./model-f32.gguf\n")
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():  # the GGUF holds exactly the merged model (bf16 runs: bf16 values, read in fp32)
        ours = load_pretrained(str(gguf_file), dtype=torch.float32)(tokens)
        merged = load_pretrained(str(merged_folder(runs)), dtype=torch.float32)(tokens)
    assert (ours - merged).abs().max().item() <= 1e-4


def test_merged_folder_stands_alone_with_tokenizer_and_generation_config(runs):
    transformers = pytest.importorskip("transformers")
    from tunesmith.data import load_tokenizer

    folder = merged_folder(runs)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf("red green blue cat").input_ids == load_tokenizer(str(folder)).encode("red green blue cat")


def test_push_to_hub_uploads_adapter_merged_gguf_and_card(runs):
    hub = runs.hub
    assert hub["create"] == {"name": "contract-run", "organization": "me", "visibility": "private"}
    assert hub["commit_path"] == "/api/models/me/contract-run/commit/main"
    files = set(hub["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "model-f32.gguf",
            "Modelfile", "README.md"} <= files
    lora = "lora" in runs.values(runs.out) and not runs.case.values.get("full")
    assert ("adapter/adapter_config.json" in files) == lora
    card = hub["files"]["README.md"].decode()
    held_out = runs.full["held_out"]
    first = next(iter(held_out[1].scores))  # the kind's first held-out score, before and after
    assert f"| {first} (before) | {held_out[0].scores[first]:.4f} |" in card
    assert f"| {first} (after) | {held_out[1].scores[first]:.4f} |" in card
    assert "Training data: `" in card and "```yaml\n" in card and "save_gguf:" in card
