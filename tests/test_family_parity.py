"""Qwen2/2.5, Qwen3, Mistral and Phi-3/Phi-4-mini against transformers, on tiny random checkpoints.

The HF models (tests/family_helpers.py) are the reference: built by ``transformers``, saved with
``save_pretrained`` (single file and sharded), loaded by our ``load_pretrained``; fp32 logits agree to
1e-4. A LoRA'd model saved merged reloads in ``transformers`` to our logits, and its PEFT adapter
loads in ``peft`` onto the HF model to our logits. The real-size builders have the published
parameter counts, and what these families' MoE / multimodal relatives are is refused by name.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from family_helpers import (  # noqa: E402
    CASES, SEQ, assert_cached_decoding_matches_full_forward, assert_packing_matches_separate_runs, make_hf, tokens,
)
from test_peft_adapter import lora_model  # noqa: E402
from tunesmith.models import (  # noqa: E402
    CheckpointFormatError, apply_lora, builders, load_peft_adapter, load_pretrained, save_hf_checkpoint,
    save_peft_adapter,
)
from tunesmith.models import mistral_hf, phi3_hf, qwen_hf  # noqa: E402
from tunesmith.models.hf_checkpoint import HF_FAMILIES  # noqa: E402
from tunesmith.models.lora import lora_state_dict  # noqa: E402
from tunesmith.models.mistral import Mistral  # noqa: E402
from tunesmith.models.phi3 import Phi3  # noqa: E402
from tunesmith.models.qwen import Qwen  # noqa: E402

OUR_CLASS = {"Qwen2ForCausalLM": Qwen, "Qwen3ForCausalLM": Qwen, "MistralForCausalLM": Mistral, "Phi3ForCausalLM": Phi3}
TOKENS = tokens()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case → (HF model, single-file dir, sharded dir), each built and saved once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = make_hf(case)
            single, sharded = tmp_path_factory.mktemp(f"{case}_single"), tmp_path_factory.mktemp(f"{case}_sharded")
            model.save_pretrained(single)
            model.save_pretrained(sharded, max_shard_size="30KB")
            assert (sharded / "model.safetensors.index.json").is_file()
            cache[case] = (model, single, sharded)
        return cache[case]

    return get


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, layout, saved):
    hf, single, sharded = saved(case)
    ours = load_pretrained(str(single if layout == "single" else sharded))
    assert type(ours) is OUR_CLASS[CASES[case][0]]
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    if ours.config.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    with torch.no_grad():
        expected = hf(TOKENS).logits
        got = ours(TOKENS)
        ours.set_attention("matmul")  # the CPU speed option computes the same function
        got_matmul = ours(TOKENS)
    assert max_diff(got, expected) <= 1e-4
    assert max_diff(got_matmul, expected) <= 1e-4


@pytest.mark.parametrize("case", [c for c, (_, _, kw) in CASES.items() if kw.get("sliding_window")])
def test_sliding_window_is_in_play_past_the_window(case, saved):
    """The sequence is longer than the window: attending globally would give other logits."""
    hf, single, _ = saved(case)
    ours = load_pretrained(str(single))
    windows = {layer.attn.sliding_window for layer in ours.layers}
    assert max(w or 0 for w in windows) < SEQ
    with torch.no_grad():
        expected = hf(TOKENS).logits
        for layer in ours.layers:
            layer.attn.sliding_window = None
        assert max_diff(ours(TOKENS), expected) > 1e-3


def test_qwen2_window_only_from_max_window_layers(saved):
    ours = load_pretrained(str(saved("qwen2_tied_sliding")[1]))
    assert [layer.attn.sliding_window for layer in ours.layers] == [None, 6, 6]
    assert ours.layers[0].attn.q_proj.bias is not None and ours.layers[0].attn.o_proj.bias is None


def test_longrope_short_factors_below_the_original_context(saved):
    """Up to 16 positions (the original context) the short factors apply, above it the long ones."""
    hf, single, _ = saved("phi3_partial_longrope")
    ours = load_pretrained(str(single))
    assert ours.config.rotary_dim == 6 and ours.config.attention_factor > 1.0
    short = TOKENS[:, :16]
    with torch.no_grad():
        assert max_diff(ours(short), hf(short).logits) <= 1e-4
        cos_short, _ = ours.rope(torch.arange(16)[None], torch.float32)
        cos_long, _ = ours.rope(torch.arange(17)[None], torch.float32)
    assert cos_short.shape[-1] == 6  # partial rotary: tables only for the rotated dimensions
    assert not torch.allclose(cos_short[..., 1, :], cos_long[..., 1, :])  # factors switch at 17 positions


# -- saving: merged HF folder and PEFT adapter -------------------------------------------------------------
def family_targets(model) -> list[str]:
    """Every LoRA target the family has (Phi-3: its fused names), plus the head."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(leaves)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_checkpoint_reloads_in_transformers(case, saved, tmp_path):
    hf, single, _ = saved(case)
    model = lora_model(single, family_targets(load_pretrained(str(single))), alpha=8.0)  # nonzero B
    with torch.no_grad():
        ours = model(TOKENS)
    assert max_diff(ours, hf(TOKENS).logits) > 1e-3  # the adapter matters
    save_hf_checkpoint(model, tmp_path / "merged", max_shard_bytes=50_000)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["tie_word_embeddings"] is False  # a LoRA on a tied head saves it untied
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(ref).__name__ == CASES[case][0]
    with torch.no_grad():
        assert max_diff(ref(TOKENS).logits, ours) <= 1e-4
        assert max_diff(load_pretrained(str(tmp_path / "merged"))(TOKENS), ours) <= 1e-4


@pytest.mark.parametrize("case", ["qwen2_bias_gqa", "qwen3_qk_norm", "mistral_sliding", "phi3_partial_longrope"])
def test_peft_adapter_loads_in_peft(case, saved, tmp_path):
    hf, single, _ = saved(case)
    targets = [t for t in family_targets(load_pretrained(str(single))) if t != "output"]
    model = lora_model(single, targets, alpha=8.0)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(single), rank=4, alpha=8.0, dropout=0.0,
                      targets=targets)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(targets)
    if case.startswith("phi3"):  # PEFT's own names for Phi-3's fused layers
        assert {"qkv_proj", "gate_up_proj"} <= set(targets) and "q_proj" not in targets
    peft_model = peft.PeftModel.from_pretrained(make_hf(case), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(TOKENS)
        assert max_diff(peft_model(TOKENS).logits, ours) <= 1e-4
    # And back into a plain model of ours.
    back = load_peft_adapter(load_pretrained(str(single)), tmp_path / "adapter").eval()
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(back).values(), lora_state_dict(model).values()))


def test_phi3_default_lora_targets_are_refused_with_its_own_names(saved):
    model = load_pretrained(str(saved("phi3_sliding")[1]))
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\].*Phi3.*qkv_proj.*gate_up_proj"):
        apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0)


# -- our own consistency: KV cache and packing with windows, partial rotary, LongRoPE ----------------------
@pytest.mark.parametrize("case", ["qwen2_tied_sliding", "qwen3_qk_norm", "mistral_sliding", "phi3_partial_longrope"])
def test_kv_cache_decoding_matches_full_forward(case, saved):
    model = load_pretrained(str(saved(case)[1]))
    # past the windows; LongRoPE stays on its short factors (≤ 16 positions)
    assert_cached_decoding_matches_full_forward(model, TOKENS[:, :15], prefill=5)


@pytest.mark.parametrize("case", ["qwen2_tied_sliding", "mistral_sliding", "phi3_sliding"])
def test_packed_documents_match_separate_runs(case, saved):
    model = load_pretrained(str(saved(case)[1]))
    assert_packing_matches_separate_runs(model, [TOKENS[0, :12], TOKENS[1, :10]])  # each longer than the windows


# -- configs and builders ----------------------------------------------------------------------------------
FAMILY_OF_BUILDER = {"qwen": qwen_hf, "mistral": mistral_hf, "phi3": phi3_hf}
NEW_BUILDERS = [n for n, b in builders.BUILDERS.items() if b().family in FAMILY_OF_BUILDER]


@pytest.mark.parametrize("name", NEW_BUILDERS)
def test_builders_round_trip_through_transformers_config(name):
    cfg = builders.BUILDERS[name]()
    family = FAMILY_OF_BUILDER[cfg.family]
    d = family.config_to_hf(cfg)
    assert family.config_from_hf(d) == cfg
    back = transformers.AutoConfig.for_model(**d)  # transformers reads our config.json to the same model
    # (special-token ids: transformers fills in its class defaults where the builder leaves them unset)
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hasattr(cfg, k)}
    assert dataclasses.replace(family.config_from_hf(back.to_dict()), **ids) == cfg


# Total parameters on the Hub (the safetensors metadata each model page shows), as listed e.g. by the
# Hub API's safetensors.total. Qwen3-0.6B and -1.7B store a copy of their tied head in the file
# (lm_head.weight, which our loader reads past), so the Hub counts it twice; the others store it once.
PUBLISHED = {
    "qwen3_0_6b": (751_632_384, "head stored twice"), "qwen3_1_7b": (2_031_739_904, "head stored twice"),
    "qwen3_4b": (4_022_468_096, ""), "qwen3_8b": (8_190_735_360, ""), "qwen3_14b": (14_768_307_200, ""),
    "qwen3_32b": (32_762_123_264, ""), "qwen2_5_0_5b": (494_032_768, ""), "qwen2_5_3b": (3_085_938_688, ""),
    "qwen2_5_7b": (7_615_616_512, ""), "qwen2_5_14b": (14_770_033_664, ""), "qwen2_5_32b": (32_763_876_352, ""),
    "mistral_7b": (7_248_023_552, ""), "mistral_7b_v0_1": (7_241_732_096, ""),
    "phi3_mini_4k": (3_821_079_552, ""), "phi4_mini": (3_836_021_760, ""),
}


def test_builders_have_the_published_parameter_counts():
    assert set(PUBLISHED) == set(NEW_BUILDERS)
    cls = {"qwen": Qwen, "mistral": Mistral, "phi3": Phi3}
    for name, (published, note) in PUBLISHED.items():
        cfg = builders.BUILDERS[name]()
        with torch.device("meta"):  # no memory: shapes only
            count = sum(p.numel() for p in cls[cfg.family](cfg).parameters())  # tied weights once
        if note:
            count += cfg.vocab_size * cfg.hidden_size
        assert count == published, name
    assert builders.BUILDERS["phi4_mini"]().rotary_dim == 96  # 0.75 of 128


# -- what is refused --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,what", [
    ("qwen3_moe", "Qwen3-MoE"), ("qwen2_moe", "MoE"), ("qwen2_5_vl", "Qwen2.5-VL"), ("qwen2_vl", "Qwen2-VL"),
    ("phimoe", "Phi-3.5-MoE"), ("phi3_v", "vision"), ("mixtral", "Mixtral"),
])
def test_moe_and_multimodal_checkpoints_are_refused_by_name(model_type, what, saved, tmp_path):
    _, single, _ = saved("qwen2_bias_gqa")
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((single / "config.json").read_text()),
                                                      "model_type": model_type}))
    with pytest.raises(CheckpointFormatError, match=rf"model_type '{model_type}' is .*{what}.*out of scope"):
        load_pretrained(str(tmp_path))


def test_unsupported_family_options_name_the_key():
    qwen3 = make_hf("qwen3_tied").config.to_dict()
    with pytest.raises(ValueError, match="attention_bias"):
        qwen_hf.config_from_hf({**qwen3, "attention_bias": True})
    with pytest.raises(ValueError, match="rope_scaling.*'yarn'"):
        qwen_hf.config_from_hf({**qwen3, "rope_parameters": None,
                                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}})
    phi3 = make_hf("phi3_sliding").config.to_dict()
    with pytest.raises(ValueError, match="resid_pdrop"):
        phi3_hf.config_from_hf({**phi3, "resid_pdrop": 0.1})


def test_every_family_saves_by_its_own_model_type():
    """Qwen, Mistral and Phi-3 are Llama subclasses; the most specific family wins when saving."""
    from tunesmith.models.hf_checkpoint import family_of

    for model_type, (family, cls) in HF_FAMILIES.items():
        if cls in (Qwen, Mistral, Phi3):
            builder = {Qwen: builders.BUILDERS["qwen3_0_6b"], Mistral: builders.BUILDERS["mistral_7b"],
                       Phi3: builders.BUILDERS["phi4_mini"]}[cls]
            with torch.device("meta"):
                model = cls(builder(num_layers=1))
            assert family_of(model) is family, model_type
