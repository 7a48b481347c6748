"""PEFT-layout adapters: ours load in ``peft`` onto the HF model with our logits, and back into ours."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tunesmith.models import (  # noqa: E402
    CheckpointFormatError,
    Llama,
    apply_lora,
    load_peft_adapter,
    load_pretrained,
    save_hf_checkpoint,
    save_peft_adapter,
    tiny_llama,
)
from tunesmith.models.lora import LoRALinear, lora_state_dict  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output"]
TOKENS = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))


def base_checkpoint(path, tie: bool) -> None:
    torch.manual_seed(0)
    model = Llama(tiny_llama(vocab_size=101, hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=72,
                             tie_embeddings=tie, norm_eps=1e-5))
    save_hf_checkpoint(model, path)


def lora_model(base_dir, targets, rank=4, alpha=16.0, seed=1) -> Llama:
    model = load_pretrained(str(base_dir))
    apply_lora(model, targets, rank=rank, alpha=alpha)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.05)  # nonzero B: the adapter changes the logits
    return model.eval()


@pytest.mark.parametrize(
    "tie,targets",
    [(False, ALL_TARGETS), (True, ["q_proj", "v_proj", "down_proj"]), (True, ["k_proj", "output"])],
    ids=["untied-all", "tied-attn-mlp", "tied-output"],
)
def test_adapter_loads_in_peft_with_our_logits(tie, targets, tmp_path):
    base_checkpoint(tmp_path / "base", tie)
    model = lora_model(tmp_path / "base", targets)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"), rank=4, alpha=16.0,
                      dropout=0.0, targets=targets)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 16.0
    assert set(config["target_modules"]) == {"lm_head" if t == "output" else t for t in targets}
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(keys) == 2 * sum(isinstance(m, LoRALinear) for m in model.modules())
    if "q_proj" in targets:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = hf(TOKENS).logits
        ours = model(TOKENS)
        plain = load_pretrained(str(tmp_path / "base"))(TOKENS)
    assert (ours - plain).abs().max().item() > 1e-3  # the adapter matters
    assert (ours - expected).abs().max().item() <= 1e-4


def test_round_trip_into_plain_and_lora_models(tmp_path):
    base_checkpoint(tmp_path / "base", tie=False)
    targets = ["q_proj", "up_proj", "output"]
    model = lora_model(tmp_path / "base", targets, rank=3, alpha=6.0)
    save_peft_adapter(model, tmp_path / "adapter", base_model="org/base", rank=3, alpha=6.0, dropout=0.1,
                      targets=targets)
    want = lora_state_dict(model)
    with torch.no_grad():
        want_logits = model(TOKENS)

    # Into a plain model: LoRA layers are created from adapter_config.json.
    fresh = load_peft_adapter(load_pretrained(str(tmp_path / "base")), tmp_path / "adapter").eval()
    got = lora_state_dict(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    layer = fresh.layers[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.rank == 3 and layer.scaling == 2.0
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), want_logits)

    # Into a model that already has matching LoRA layers (e.g. to resume training).
    ready = apply_lora(load_pretrained(str(tmp_path / "base")), targets, rank=3, alpha=6.0)
    load_peft_adapter(ready, tmp_path / "adapter")
    assert all(torch.equal(lora_state_dict(ready)[k], want[k]) for k in want)


def test_peft_saved_adapter_loads_into_ours(tmp_path):
    """The reverse direction: an adapter that peft itself trained/saved."""
    base_checkpoint(tmp_path / "base", tie=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["o_proj", "gate_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM", init_lora_weights=False)  # random B, not zeros
    hf = peft.get_peft_model(hf, config).eval()
    hf.save_pretrained(tmp_path / "peft_adapter")

    ours = load_peft_adapter(load_pretrained(str(tmp_path / "base")), tmp_path / "peft_adapter").eval()
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-4


def test_rank_and_shape_mismatch_errors_name_the_key(tmp_path):
    base_checkpoint(tmp_path / "base", tie=False)
    model = lora_model(tmp_path / "base", ["q_proj"], rank=4, alpha=8.0)
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model="b", rank=4, alpha=8.0, dropout=0.0,
                                targets=["q_proj"])

    other_rank = apply_lora(load_pretrained(str(tmp_path / "base")), ["q_proj"], rank=2, alpha=4.0)
    with pytest.raises(CheckpointFormatError, match=r"r=4.*layers\.\d\.attn\.q_proj.*rank 2"):
        load_peft_adapter(other_rank, adapter)

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"q_proj\.lora_B\.weight.*\(47, 4\).*\(48, 4\)"):
        load_peft_adapter(load_pretrained(str(tmp_path / "base")), adapter)


def test_unsupported_peft_options_are_refused(tmp_path):
    base_checkpoint(tmp_path / "base", tie=False)
    model = lora_model(tmp_path / "base", ["q_proj"])
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model="b", rank=4, alpha=16.0, dropout=0.0,
                                targets=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="use_dora"):
        load_peft_adapter(load_pretrained(str(tmp_path / "base")), adapter)
