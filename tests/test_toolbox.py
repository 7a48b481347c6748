"""The memory / speed switches leave training unchanged: same losses, only cost differs.

Each switch is run through the LoRA recipe on the tiny random Llama (fp32, CPU) against a plain
run with the same seed and data:

* ``compile`` + ``activation_checkpointing`` + ``attention: matmul`` + a small CE ``chunk_size``
  together: the step losses
  must match the plain run to 1e-5 (they compute the same function; only the order of floating-point
  operations may change). Each of checkpointing and chunking is also checked alone, cheaply, on
  loss *and* adapter gradients.
* packing: the summed per-token loss over the training set is the same packed (per-document
  attention, positions restarting) as one example per row.
* 8-bit AdamW: its optimizer state really is 8-bit, and 20 steps track AdamW's losses closely.
* activation offloading: refused on CPU with a clear error; on CUDA (skipped here) same loss.
* keeping freed host memory (CPU): large buffers freed and re-allocated every step are not
  faulted in again (page-fault counts, against glibc's pinned initial thresholds).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tunesmith.data import pack_items, packed_collate, pad_collate
from tunesmith.models import apply_lora
from tunesmith.models.host_memory import keep_freed_host_memory
from tunesmith.recipes import lora_single_device as recipe
from tunesmith.training.config import ConfigError, build_config
from tunesmith.training.losses import CrossEntropyLoss
from tunesmith.training.options import DataOptions
from tunesmith.training.setup import (
    activation_offloading,
    build_optimizer,
    load_model_and_tokenizer,
    load_sft_data,
)


def make_cfg(model_dir, data, out, **overrides) -> recipe.Config:
    values = {
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "val": str(data["val"]), "max_seq_len": 64},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj", "down_proj", "output"]},
        "output_dir": str(out), "device": "cpu", "dtype": "fp32", "batch_size": 4, "max_steps": 4, "lr": 1e-2,
        "warmup_steps": 1, "sample_max_new_tokens": 0, "logger": "none", "eval_batches": 1,
    }
    values.update(overrides)
    return build_config(recipe.Config, values, [])


def tiny_lora_model(model_dir, seed=0):
    torch.manual_seed(seed)
    base = load_model_and_tokenizer(str(model_dir), None, torch.float32, torch.device("cpu"))
    apply_lora(base.model, ["q_proj", "v_proj", "output"], rank=8, alpha=16.0)
    with torch.no_grad():  # non-zero B, so the adapters matter for the loss and its gradient
        for name, p in base.model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    return base


def loss_and_grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model.hidden_states(batch["tokens"]), batch["labels"], model.logits)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compile_checkpointing_matmul_attention_and_chunked_ce_leave_recipe_losses_unchanged(tiny_llama_dir, tiny_data, tmp_path):
    plain = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "plain", loss_args={"chunk_size": 0}))
    switched = recipe.main(make_cfg(
        tiny_llama_dir, tiny_data, tmp_path / "switched",
        compile=True, activation_checkpointing=True, attention="matmul", loss_args={"chunk_size": 7},
    ))
    torch.testing.assert_close(torch.tensor(switched["losses"]), torch.tensor(plain["losses"]), atol=1e-5, rtol=0)
    assert abs(switched["held_out_after"] - plain["held_out_after"]) <= 1e-5


@pytest.mark.parametrize("switch", ["activation_checkpointing", "chunked_ce"])
def test_each_switch_alone_gives_the_same_loss_and_gradients(tiny_llama_dir, tiny_data, switch):
    base = tiny_lora_model(tiny_llama_dir)
    model = base.model.train()
    train, _ = load_sft_data(DataOptions(train=str(tiny_data["train"]), val=str(tiny_data["val"]), max_seq_len=64),
                             base.tokenizer, seed=0)
    batch = pad_collate([train[i] for i in range(8)], pad_id=base.tokenizer.pad_id)
    ref_loss, ref_grads = loss_and_grads(model, batch, CrossEntropyLoss(chunk_size=0))
    if switch == "activation_checkpointing":
        model.activation_checkpointing = True
        loss, grads = loss_and_grads(model, batch, CrossEntropyLoss(chunk_size=0))
    else:
        loss, grads = loss_and_grads(model, batch, CrossEntropyLoss(chunk_size=5))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_packing_gives_the_same_per_token_loss(tiny_llama_dir, tiny_data):
    base = tiny_lora_model(tiny_llama_dir)
    model = base.model.eval()
    train, _ = load_sft_data(DataOptions(train=str(tiny_data["train"]), val=str(tiny_data["val"]), max_seq_len=64),
                             base.tokenizer, seed=0)
    items = [train[i] for i in range(24)]
    loss_fn = CrossEntropyLoss()
    with torch.no_grad():
        padded = pad_collate(items, pad_id=base.tokenizer.pad_id)
        unpacked = loss_fn(model.hidden_states(padded["tokens"]), padded["labels"], model.logits)
        rows = pack_items(items, 64)
        assert len(rows) < len(items)  # several examples really share a row
        packed = packed_collate(rows, pad_id=base.tokenizer.pad_id)
        hidden = model.hidden_states(packed["tokens"], positions=packed["positions"], document_ids=packed["document_ids"])
        packed_loss = loss_fn(hidden, packed["labels"], model.logits)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    torch.testing.assert_close(packed_loss, unpacked, rtol=1e-5, atol=1e-4)


def test_adamw8bit_keeps_8bit_state_and_tracks_adamw(tiny_llama_dir, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    # Rank 64: bitsandbytes keeps tensors under 4096 values in 32-bit state, so adapters must be
    # this big for the 8-bit path to be exercised at all.
    lora = {"rank": 64, "alpha": 64.0, "targets": ["q_proj", "v_proj", "output"]}
    common = dict(max_steps=20, lr=2e-3, lora=lora, loss_args={"chunk_size": 0})
    ref = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "adamw", **common))["losses"]
    q8 = recipe.main(make_cfg(tiny_llama_dir, tiny_data, tmp_path / "adamw8bit", optimizer="adamw8bit", **common))

    # The state of a large tensor is uint8 (with per-block scales), not fp32.
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = build_optimizer([p], "adamw8bit", lr=1e-3, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert {opt.state[p]["state1"].dtype, opt.state[p]["state2"].dtype} == {torch.uint8}

    losses = torch.tensor(q8["losses"])
    assert losses[-3:].mean() < 0.8 * losses[:3].mean()  # it trains (AdamW itself: 0.71 in these 20 steps)
    # Same trajectory within a few percent: 8-bit state quantization perturbs each update slightly.
    rel = ((losses - torch.tensor(ref)).abs() / torch.tensor(ref)).max()
    assert rel < 0.05, f"8-bit AdamW losses drift {rel:.3f} from AdamW's"


def test_activation_offloading_is_refused_on_cpu():
    assert activation_offloading(False, torch.device("cpu"))() is not None  # a no-op context
    with pytest.raises(ConfigError, match="activation_offloading"):
        activation_offloading(True, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offloading is CUDA-only")
def test_activation_offloading_gives_the_same_loss_on_cuda(tiny_llama_dir):
    base = tiny_lora_model(tiny_llama_dir)
    model = base.model.cuda().train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), device="cuda")
    labels = tokens.roll(-1, dims=1)
    ref_loss, ref_grads = loss_and_grads(model, {"tokens": tokens, "labels": labels}, CrossEntropyLoss())
    with activation_offloading(True, torch.device("cuda"))():
        loss, grads = loss_and_grads(model, {"tokens": tokens, "labels": labels}, CrossEntropyLoss())
    torch.testing.assert_close(loss, ref_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name])


_REALLOCATE = """
import ctypes, resource, statistics, sys, torch
from tunesmith.models.host_memory import keep_freed_host_memory
# Start from glibc's initial thresholds, pinned (its adaptive ones make the default run vary):
# blocks over 128 KiB are mmapped and unmapped on free; the heap is trimmed above 128 KiB free.
mallopt = ctypes.CDLL("libc.so.6").mallopt
assert mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1
applied = keep_freed_host_memory(torch.device("cpu")) if sys.argv[1] == "keep" else False
faults = []
for _ in range(10):  # three 24 MiB buffers live at once, then freed: like a step's logits and their gradient
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [torch.ones(6 * 2**20) for _ in range(3)]
    del bufs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_host_memory_stops_refaulting_buffers_every_step():
    # Each variant in a fresh process: the allocator's settings are process-wide and sticky.
    def page_faults_per_step(mode: str) -> tuple[str, float]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _REALLOCATE, mode], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        return out[0], float(out[1])

    applied, kept = page_faults_per_step("keep")
    _, default = page_faults_per_step("default")
    assert applied == "True"
    # Without the setting the 72 MiB go back to the OS and are faulted in again every step
    # (~18k pages); with it the pages stay mapped and a typical step faults none.
    assert default > 6_000, default
    assert kept < default / 10, (kept, default)


def test_keep_freed_host_memory_leaves_gpus_and_users_own_malloc_settings_alone(monkeypatch):
    assert keep_freed_host_memory(torch.device("meta")) is False  # only the CPU allocator is glibc's
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # a user's own setting wins
    assert keep_freed_host_memory(torch.device("cpu")) is False
