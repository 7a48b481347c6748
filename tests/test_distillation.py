"""Distillation: each divergence against its formula (plain Python) and trl's GKD loss; chunked ==
unchunked; the KL of a model to itself is 0; the recipe moves a tiny student toward a tiny teacher,
resumes exactly, and refuses a teacher with another vocabulary or a missing one with the command to run."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.models import load_pretrained
from tunesmith.recipes import knowledge_distillation_single_device as recipe
from recipe_helpers import run_until_checkpoint, with_overrides
from tunesmith.training import cli
from tunesmith.training.batching import BatchStream
from tunesmith.training.config import ConfigError, build_config
from tunesmith.training.distillation import evaluate_distillation, missing_teacher_message
from tunesmith.training.distillation_losses import ForwardKL, GeneralizedJSD, ReverseKL, build_distillation_loss

STUDENT = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -4.0], [-1.0, 3.0, 0.0, 1.0]]
TEACHER = [[1.0, 1.5, -2.0, 0.5], [0.0, 0.0, 2.0, -1.0], [-1.0, 2.5, 0.5, 1.0]]


def softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def identity_heads(s, t):
    """Hidden states that ARE the logits (head = identity), so losses see exactly STUDENT/TEACHER."""
    return torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), lambda h: h


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name", ["forward", "reverse", "jsd"])
def test_each_divergence_follows_its_formula(name, tau):
    h, h_t, head = identity_heads(STUDENT, TEACHER)
    labels = torch.tensor([[1, -100, 2]])  # the middle position carries no label: not counted
    loss = {"forward": ForwardKL(tau), "reverse": ReverseKL(tau), "jsd": GeneralizedJSD(0.3, tau)}[name]
    expected = 0.0
    for i in (0, 2):
        p, q = softmax(TEACHER[i], tau), softmax(STUDENT[i], tau)
        expected += tau**2 * {"forward": kl(p, q), "reverse": kl(q, p), "jsd": jsd(p, q, 0.3)}[name]
    assert loss(h, h_t, labels, head, head).item() == pytest.approx(expected, rel=1e-6)  # computed in fp32


def test_generalized_jsd_matches_trl():
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    student = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    for beta in (0.1, 0.5, 0.9):
        ref = trl_gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=1.0, reduction="sum")
        ours = GeneralizedJSD(beta)(student, teacher, torch.zeros(2, 5, dtype=torch.long), lambda h: h, lambda h: h)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("cls", [ForwardKL, ReverseKL, GeneralizedJSD])
def test_chunked_equals_unchunked_in_value_and_gradient(cls):
    g = torch.Generator().manual_seed(0)
    head, teacher_head = torch.nn.Linear(8, 40, bias=False), torch.nn.Linear(6, 40, bias=False)
    hidden = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(3, 7, 6, generator=g)
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[0, :3] = -100
    results = []
    for chunk in (0, 1, 4):
        value = cls(chunk_size=chunk)(hidden, teacher_hidden, labels, head, teacher_head)
        results.append((value, *torch.autograd.grad(value, [hidden, head.weight])))
    for value, grad_h, grad_w in results[1:]:
        assert torch.allclose(value, results[0][0], atol=1e-5)
        assert torch.allclose(grad_h, results[0][1], atol=1e-6) and torch.allclose(grad_w, results[0][2], atol=1e-6)
    assert results[0][1][0, :3].abs().max() == 0  # unlabelled positions get no gradient


def test_kl_of_a_model_to_itself_is_zero(tiny_llama_dir, tiny_data):
    from tunesmith.data import load_tokenizer, pad_collate
    from tunesmith.training.setup import load_sft_data
    from tunesmith.training.options import DataOptions

    model = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    _, val = load_sft_data(DataOptions(train=str(tiny_data["train"]), val=str(tiny_data["val"])), tokenizer, 0)
    batches = BatchStream(val, 4, lambda items: pad_collate(items, tokenizer.pad_id), shuffle=False)
    metrics = evaluate_distillation(model, model, batches, torch.device("cpu"))
    assert abs(metrics["kl"]) < 1e-6 and metrics["loss"] > 1.0
    h = torch.randn(1, 4, 64)
    labels = torch.ones(1, 4, dtype=torch.long)
    for loss in (ForwardKL(), ReverseKL(), GeneralizedJSD(0.5, temperature=2.0)):
        assert abs(loss(h, h, labels, model.logits, model.logits).item()) < 1e-5


@pytest.fixture(scope="module")
def teacher_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """Another tiny Llama with the student's tokenizer, with peaked distributions far from the student's."""
    import transformers

    path = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tiny_llama_dir))
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, path / name)
    return path


def make_cfg(model_dir: Path, teacher: Path, data: dict[str, Path], out: Path, **overrides) -> recipe.Config:
    values = {
        "model": str(model_dir), "teacher": str(teacher),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_seq_len": 64},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "output"]},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 4, "max_steps": 20, "lr": 1e-2,
        "warmup_steps": 2, "sample_max_new_tokens": 0, "logger": "none", "kd_ratio": 1.0,
    }
    return build_config(recipe.Config, with_overrides(values, overrides), [])


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_tiny_student_moves_toward_tiny_teacher(tiny_llama_dir, teacher_dir, tiny_data, tmp_path, loss):
    result = recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data, tmp_path / "run", loss=loss))
    assert result["held_out_after"]["kl"] < 0.7 * result["held_out_before"]["kl"]
    assert result["losses"][-1] < result["losses"][0]


def test_full_student_with_cross_entropy_mix_and_tensorboard(tiny_llama_dir, teacher_dir, tiny_data, tmp_path):
    result = recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data, tmp_path / "run", full=True, lr=2e-3,
                                  kd_ratio=0.5, max_steps=8, logger="tensorboard"))
    assert result["held_out_after"]["kl"] < result["held_out_before"]["kl"]
    assert "layers.0.mlp.up_proj.weight" in load_file(result["checkpoint"] / "trainable.safetensors")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/kd_loss", "train/ce_loss", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_nf4_teacher_is_quantized_and_still_teaches(tiny_llama_dir, teacher_dir, tiny_data, tmp_path):
    from tunesmith.data import load_tokenizer
    from tunesmith.models.nf4 import is_nf4
    from tunesmith.training.distillation import load_teacher

    student = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=torch.device("cpu"))
    teacher = load_teacher(str(teacher_dir), None, student, load_tokenizer(str(tiny_llama_dir)), torch.float32,
                           torch.device("cpu"), quantize=True)
    assert is_nf4(teacher.layers[0].attn.q_proj.weight) and is_nf4(teacher.layers[1].mlp.down_proj.weight)
    assert not any(p.requires_grad for p in teacher.parameters())
    result = recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data, tmp_path / "run", teacher_quantize=True,
                                  max_steps=10))
    assert result["held_out_after"]["kl"] < 0.9 * result["held_out_before"]["kl"]


def test_lora_checkpoint_teacher_is_its_base_with_the_adapter_merged(tiny_llama_dir, teacher_dir, tmp_path):
    """teacher=OUTPUT_DIR/step_N (what a LoRA run writes) loads the run's base and folds the adapter in."""
    from tunesmith.data import load_tokenizer
    from tunesmith.models import load_peft_adapter, save_peft_adapter
    from tunesmith.models.lora import apply_lora, merge_lora
    from tunesmith.training.distillation import load_teacher

    cpu = torch.device("cpu")
    trained = load_pretrained(str(teacher_dir), dtype=torch.float32, device=cpu)
    apply_lora(trained, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    for name, p in trained.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so the merge is visible in the logits
    step = tmp_path / "run" / "step_000003"
    save_peft_adapter(trained, step / "adapter", base_model="recorded-but-overridden", rank=4, alpha=8.0,
                      dropout=0.0, targets=["q_proj", "v_proj"])
    (step / "config.yaml").write_text(f"model: {teacher_dir}\n")
    student = load_pretrained(str(tiny_llama_dir), dtype=torch.float32, device=cpu)
    teacher = load_teacher(str(step), None, student, load_tokenizer(str(tiny_llama_dir)), torch.float32, cpu)

    expected = load_peft_adapter(load_pretrained(str(teacher_dir), dtype=torch.float32, device=cpu), step / "adapter")
    merge_lora(expected)
    base = load_pretrained(str(teacher_dir), dtype=torch.float32, device=cpu)
    tokens = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = teacher(tokens), expected(tokens), base(tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter did change the teacher
    assert not any(p.requires_grad for p in teacher.parameters())


def test_resume_after_stop_is_exact(tiny_llama_dir, teacher_dir, tiny_data, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=3, kd_ratio=0.5, **{"lora.dropout": 0.1})
    full = recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data, tmp_path / "full", **kw))
    run_until_checkpoint(monkeypatch, lambda: recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data,
                                                                  tmp_path / "split", **kw)), stop_step=3)
    resumed = recipe.main(make_cfg(tiny_llama_dir, teacher_dir, tiny_data, tmp_path / "split", resume=True, **kw))
    assert resumed["losses"] == full["losses"][3:]
    a = load_file(full["checkpoint"] / "trainable.safetensors")
    b = load_file(resumed["checkpoint"] / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_with_another_vocabulary_or_missing_is_refused(tiny_llama_dir, tiny_data, tmp_path):
    import transformers

    other = tmp_path / "other_vocab"
    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    config.vocab_size = 512
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(ConfigError, match="vocabulary of 512 tokens.*same tokenizer"):
        recipe.main(make_cfg(tiny_llama_dir, other, tiny_data, tmp_path / "a"))
    with pytest.raises(ConfigError, match="does not exist"):
        recipe.main(make_cfg(tiny_llama_dir, tmp_path / "nowhere", tiny_data, tmp_path / "b"))
    message = missing_teacher_message("output/smollm2_135m/step_000060/merged")
    assert "tune-run lora_single_device --config smollm2_135m save_merged=true" in message
    assert message.endswith("save_merged=true")  # 60 is that config's max_steps: no override needed
    assert "max_steps=20" in missing_teacher_message("output/smollm2_135m/step_000020/merged")
    checkpoint = missing_teacher_message("output/smollm2_135m/step_000060")  # the KD demo's teacher: the LoRA demo
    assert checkpoint.endswith("tune-run lora_single_device --config smollm2_135m") and "save_merged" not in checkpoint


def test_unknown_key_bad_loss_args_and_dry_run(tiny_llama_dir, teacher_dir, tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean kd_ratio"):
        build_config(recipe.Config, {"model": "m", "teacher": "t", "data": {"train": "x"}, "kd_rato": 0.5}, [])
    with pytest.raises(ConfigError, match="loss_args"):
        build_distillation_loss("jsd", {"beta": 1.5})
    config = tmp_path / "kd.yaml"
    config.write_text(f"model: {tiny_llama_dir}\nteacher: {teacher_dir}\ndata:\n  train: {tiny_data['train']}\n"
                      f"output_dir: {tmp_path / 'out'}\ndevice: cpu\n")
    assert cli.main(["knowledge_distillation_single_device", "--config", str(config), "--dry-run", "teacher_quantize=true"]) == 0
    out = capsys.readouterr().out
    assert "teacher_quantize: true" in out and "total" in out
    assert not (tmp_path / "out").exists()
