"""Library pieces the recipes call: LR schedule, chunked loss, batch stream, atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunesmith.training.batching import BatchStream
from tunesmith.training.checkpointing import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from tunesmith.training.losses import CrossEntropyLoss
from tunesmith.training.schedules import warmup_cosine


def test_warmup_cosine_follows_its_formula():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_ratio=0.1)
    seen = []
    for _ in range(16):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear warmup reaches the peak
    mid = 4 + 5  # halfway through the decay: cos(pi/2) = 0
    assert seen[mid] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert seen[14] == pytest.approx(0.2) and seen[15] == pytest.approx(0.2)  # floor after the end


@pytest.mark.parametrize("chunk", [0, 3, 1024])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, -2:] = -100
    ours = CrossEntropyLoss(chunk_size=chunk)(hidden, labels, head)
    ours.backward()
    g_ours, gw_ours = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref = F.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(g_ours, hidden.grad, atol=1e-6)
    assert torch.allclose(gw_ours, head.weight.grad, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_frozen_head_cross_entropy_matches_full_logits(compiled):
    """The usual LoRA case: the head is the model's frozen output layer, so the loss computes the
    hidden states' gradient chunk by chunk in forward (fused into one pass when compiled)."""
    from tunesmith.models.llama import Llama, LlamaConfig
    from tunesmith.training.losses import frozen_linear_head

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=32)).requires_grad_(False)
    assert frozen_linear_head(model.logits) is model.output.weight  # the path under test is taken
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    loss_fn = CrossEntropyLoss(chunk_size=4)
    if compiled:
        loss_fn.compile()
    ours = loss_fn(hidden, labels, model.logits)
    (2.0 * ours).backward()  # a non-unit upstream gradient must scale the stored one
    g_ours, hidden.grad = hidden.grad.clone(), None
    ref = F.cross_entropy(model.logits(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    (2.0 * ref).backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_ours, hidden.grad, atol=1e-6, rtol=1e-5)


def test_frozen_head_fast_path_covers_the_llama_derived_families_only():
    """Qwen, Mistral and Phi-3 inherit Llama's plain head, so they get the chunked frozen-head loss;
    Gemma overrides ``logits`` (soft-capping) and must take the general path."""
    from tunesmith.models.gemma import Gemma, GemmaConfig
    from tunesmith.models.mistral import Mistral, MistralConfig
    from tunesmith.models.phi3 import Phi3, Phi3Config
    from tunesmith.models.qwen import Qwen, QwenConfig
    from tunesmith.training.losses import frozen_linear_head

    shape = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    for cls, cfg in ((Qwen, QwenConfig(version=3, **shape)), (Mistral, MistralConfig(**shape)), (Phi3, Phi3Config(**shape))):
        model = cls(cfg).requires_grad_(False)
        assert frozen_linear_head(model.logits) is model.output.weight, cls.__name__
    gemma = Gemma(GemmaConfig(version=1, head_dim=8, **shape)).requires_grad_(False)
    assert frozen_linear_head(gemma.logits) is None


def test_batch_stream_is_a_pure_function_of_the_index():
    data = [{"i": i} for i in range(10)]
    stream = BatchStream(data, 3, collate=lambda items: [x["i"] for x in items], seed=5)
    assert stream.per_epoch == 3
    first_epoch = [stream[i] for i in range(3)]
    assert len(set(sum(first_epoch, []))) == 9  # no repeats within an epoch
    again = BatchStream(data, 3, collate=lambda items: [x["i"] for x in items], seed=5)
    assert [again[i] for i in (4, 1, 0)] == [stream[4], stream[1], stream[0]]  # any order, same batches
    assert [stream[i] for i in range(3, 6)] != first_epoch  # reshuffled next epoch


def _state(step: int) -> TrainingState:
    return TrainingState(step=step, micro_batches=step, optimizer={}, scheduler={}, rng={"python": None})


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path):
    w = {"a": torch.nn.Parameter(torch.zeros(3))}
    for step in (1, 2, 3):
        with torch.no_grad():
            w["a"].fill_(step)
        save_checkpoint(tmp_path, step, trainable=dict(w), state=_state(step), config_yaml="x: 1\n", keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert (tmp_path / "LATEST").read_text().strip() == "step_000003"

    # A save that crashes half way leaves the previous checkpoint as the latest, intact.
    def explode(path):
        path.mkdir()
        (path / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, trainable=dict(w), state=_state(4), config_yaml="", extra_writers={"adapter": explode})
    assert latest_checkpoint(tmp_path).name == "step_000003"
    target = {"a": torch.nn.Parameter(torch.zeros(3))}
    state = load_checkpoint(latest_checkpoint(tmp_path), target)
    assert state.step == 3 and torch.equal(target["a"], torch.full((3,), 3.0))
    remove_stale_temp_dirs(tmp_path)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_checkpoint_that_does_not_fit_names_file_and_key(tmp_path):
    save_checkpoint(tmp_path, 1, trainable={"a": torch.zeros(3)}, state=_state(1), config_yaml="")
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors.*'a' has shape \(3,\).*\(4,\)"):
        load_checkpoint(latest_checkpoint(tmp_path), {"a": torch.nn.Parameter(torch.zeros(4))})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(latest_checkpoint(tmp_path), {"b": torch.nn.Parameter(torch.zeros(3))})
