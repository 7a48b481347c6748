"""LoRA: adapters, merging, freezing, state dicts; forward checked against PEFT on HF Llama."""

import copy
import math

import pytest
import torch

from tunesmith.models.llama import Llama, LlamaConfig
from tunesmith.models.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    disable_adapters,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
)

ALL_TARGETS = list(LORA_TARGETS)


def tiny_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=80, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        tie_embeddings=tie,
    )


def tiny_model(tie: bool = False, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(tiny_config(tie)).eval()


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B so adapters actually change the output (fresh ones are exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * std)


TOKENS = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(42))


def test_fresh_adapter_is_exactly_the_base_model_and_init():
    base = tiny_model()
    expected = base(TOKENS)
    model = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8)
    assert torch.equal(model(TOKENS), expected)  # B = 0 → update is exactly zero

    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.scaling == 2.0
    assert torch.count_nonzero(q.lora_b.weight) == 0
    # Kaiming-uniform with a=√5 (nn.Linear / PEFT): U(-1/√fan_in, 1/√fan_in).
    bound = 1 / math.sqrt(q.in_dim)
    a = q.lora_a.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.2 * bound  # uniform, not e.g. normal(0, 1)


def test_every_target_is_swapped_and_base_keys_unchanged():
    base = tiny_model()
    base_sd = base.state_dict()
    model = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8)
    sd = model.state_dict()
    for key, value in base_sd.items():
        assert torch.equal(sd[key], value), key
    extra = set(sd) - set(base_sd)
    assert extra and all(k.endswith((".lora_a.weight", ".lora_b.weight")) for k in extra)
    # 7 linears per block × 2 blocks + output, each with A and B.
    assert len(extra) == 2 * (7 * 2 + 1)
    assert isinstance(model.output, LoRALinear)
    # The base weight Parameter is reused, not copied.
    fresh = tiny_model()
    w = fresh.layers[1].mlp.down_proj.weight
    apply_lora(fresh, ["down_proj"], rank=2, alpha=2)
    assert fresh.layers[1].mlp.down_proj.weight is w


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_merged_equals_unmerged_and_unmerge_restores(target):
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), [target], rank=4, alpha=16)
    randomize_lora_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(TOKENS)
    assert not torch.allclose(unmerged, base(TOKENS), atol=1e-4)  # the adapter matters

    merged_weights = {n: m.merged_weight() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # merged_weight() is pure
    merge_lora(model)
    assert torch.allclose(model(TOKENS), unmerged, atol=1e-5, rtol=0)
    for name, w in merged_weights.items():
        assert torch.allclose(model.get_submodule(name).weight, w, atol=1e-7)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6, rtol=0), k
    assert torch.allclose(model(TOKENS), unmerged, atol=1e-6, rtol=0)


def test_disabled_adapter_is_exactly_the_base_model():
    base = tiny_model()
    expected = base(TOKENS)
    model = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8)
    randomize_lora_b(model)
    with_adapter = model(TOKENS)
    with disable_adapters(model):
        assert torch.equal(model(TOKENS), expected)
    assert torch.equal(model(TOKENS), with_adapter)  # re-enabled afterwards
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapters(model):
            pass


def test_only_adapters_train():
    model = apply_lora(tiny_model(), ["q_proj", "v_proj", "down_proj", "output"], rank=4, alpha=8)
    randomize_lora_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if ".lora_" in n}
    assert len(trainable_parameters(model)) == len(trainable)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    opt.step()
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"{k} changed but should be frozen"


def test_count_parameters():
    model = apply_lora(tiny_model(), ["q_proj", "gate_proj"], rank=3, alpha=3)
    cfg = model.config
    q = 3 * (cfg.hidden_size + cfg.num_heads * cfg.head_dim)
    gate = 3 * (cfg.hidden_size + cfg.intermediate_size)
    base_total = sum(p.numel() for p in tiny_model().parameters())
    assert count_parameters(model) == (cfg.num_layers * (q + gate), base_total + cfg.num_layers * (q + gate))


def test_lora_state_dict_round_trip_and_strictness():
    model = apply_lora(tiny_model(), ["k_proj", "up_proj"], rank=4, alpha=8)
    randomize_lora_b(model, seed=3)
    sd = lora_state_dict(model)
    layers = ("attn.k_proj", "mlp.up_proj")
    assert set(sd) == {f"layers.{i}.{p}.lora_{ab}.weight" for i in range(2) for p in layers for ab in "ab"}

    other = apply_lora(tiny_model(), ["k_proj", "up_proj"], rank=4, alpha=8)
    assert not torch.allclose(other(TOKENS), model(TOKENS))
    load_lora_state_dict(other, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(other(TOKENS), model(TOKENS))

    missing = dict(sd)
    missing.pop("layers.0.attn.k_proj.lora_a.weight")
    with pytest.raises(KeyError, match="layers.0.attn.k_proj.lora_a.weight"):
        load_lora_state_dict(other, missing)
    wrong_rank = lora_state_dict(apply_lora(tiny_model(), ["k_proj", "up_proj"], rank=2, alpha=8))
    with pytest.raises(ValueError, match="lora_.\\.weight.*rank"):
        load_lora_state_dict(other, wrong_rank)


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match="qkv_proj.*gate_proj"):
        apply_lora(tiny_model(), ["q_proj", "qkv_proj"], rank=2, alpha=2)


def test_dropout_only_on_adapter_path():
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), ALL_TARGETS, rank=4, alpha=8, dropout=0.9).train()
    assert torch.equal(model(TOKENS), base(TOKENS))  # B = 0: dropout must not touch the base path
    randomize_lora_b(model)
    assert not torch.equal(model(TOKENS), model(TOKENS))  # train: adapter input is dropped at random
    model.eval()
    assert torch.equal(model(TOKENS), model(TOKENS))


def test_tied_output_trains_but_refuses_merge():
    model = apply_lora(tiny_model(tie=True), ["q_proj", "output"], rank=4, alpha=8)
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    randomize_lora_b(model)
    model(TOKENS).sum().backward()
    assert model.output.lora_b.weight.grad is not None
    with pytest.raises(RuntimeError, match="tied|shared"):
        model.output.merge()
    model.layers[0].attn.q_proj.merge()  # untied layers still merge


def to_hf_name(key: str) -> str:
    """Our parameter name → HF Llama's, written out here so the test does not rely on the checkpoint code."""
    if key.startswith("layers."):
        key = key.replace(".attn.", ".self_attn.").replace("attn_norm", "input_layernorm")
        return "model." + key.replace("mlp_norm", "post_attention_layernorm")
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}[key]


def test_matches_peft_on_hf_llama():
    import peft  # test-only references; imported here so the other tests skip their import time
    import transformers

    ours = tiny_model()
    cfg = ours.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        )
    ).eval()
    hf.load_state_dict({to_hf_name(k): v for k, v in ours.state_dict().items()}, strict=True)

    hf_targets = [t if t != "output" else "lm_head" for t in ALL_TARGETS]
    peft_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=hf_targets, lora_dropout=0.0)
    peft_model = peft.get_peft_model(hf, peft_config)
    apply_lora(ours, ALL_TARGETS, rank=4, alpha=12)
    randomize_lora_b(ours)
    with torch.no_grad():
        for name, m in ours.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            pm = peft_model.base_model.model.get_submodule(to_hf_name(name + ".weight").removesuffix(".weight"))
            pm.lora_A["default"].weight.copy_(m.lora_a.weight)
            pm.lora_B["default"].weight.copy_(m.lora_b.weight)
    expected = peft_model(TOKENS).logits
    assert torch.allclose(ours(TOKENS), expected, atol=1e-5, rtol=0)
