"""Gemma 1/2/3: our native model against transformers' on tiny random checkpoints.

The HF models are the reference: built by ``transformers``, saved with ``save_pretrained``, loaded by
our ``load_pretrained``. The configs are chosen so every Gemma feature is exercised: multi-query
attention, head_dim ≠ hidden / heads, odd sizes, sequences longer than the sliding window,
soft-capping that actually bites, a non-default ``query_pre_attn_scalar``, Gemma 3's 5:1 layer
pattern with linear RoPE scaling on the global layers.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tunesmith.models import apply_lora, load_pretrained, save_hf_checkpoint, save_peft_adapter  # noqa: E402
from tunesmith.models import gemma_builders, gemma_hf  # noqa: E402
from tunesmith.models.gemma import GLOBAL, SLIDING, Gemma, GemmaConfig  # noqa: E402
from tunesmith.models.lora import LoRALinear, merge_lora  # noqa: E402

VOCAB = 103
SEQ = 29  # longer than every sliding window below
COMMON = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_attention_heads=4, head_dim=12,
              max_position_embeddings=128, rms_norm_eps=1e-6)


def hf_config(version: int):
    if version == 1:  # Gemma 1 2B-style multi-query attention
        return transformers.GemmaConfig(**COMMON, num_hidden_layers=3, num_key_value_heads=1)
    if version == 2:
        return transformers.Gemma2Config(
            **COMMON, num_hidden_layers=4, num_key_value_heads=2, sliding_window=6, query_pre_attn_scalar=21,
            attn_logit_softcapping=4.0, final_logit_softcapping=1.5,
        )
    return transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=7, num_key_value_heads=2, sliding_window=5, query_pre_attn_scalar=17,
        rope_theta=50000.0, rope_local_base_freq=800.0, rope_scaling={"rope_type": "linear", "factor": 3.0},
    )


HF_CLASSES = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}


def hf_model(version: int, path=None):
    """A random HF Gemma with weights large enough that soft-caps bite and norms are not ~identity."""
    torch.manual_seed(version)
    cfg = hf_config(version)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, HF_CLASSES[version])(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.15)
    if path is not None:
        model.save_pretrained(path)
    return model


TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_logits_match_transformers(version, tmp_path):
    ref = hf_model(version, tmp_path)
    ours = load_pretrained(str(tmp_path))
    assert isinstance(ours, Gemma) and ours.config.version == version
    with torch.no_grad():
        expected = ref(TOKENS).logits
        got = ours(TOKENS)
        ours.set_attention("matmul")
        got_matmul = ours(TOKENS)
        ours.set_attention("sdpa")
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got_matmul - expected).abs().max().item() <= 1e-4
    if version == 2:  # the caps were really in play
        with torch.no_grad():
            raw = ours.output(ours.hidden_states(TOKENS))
        assert raw.abs().max() > 2 * ours.config.final_logit_softcapping  # far into tanh's flat part
    if version == 3:
        assert ours.config.layer_types == [SLIDING] * 5 + [GLOBAL, SLIDING]


def test_gemma3_rope_bases_differ_per_layer_kind():
    cfg = gemma_hf.config_from_hf(hf_config(3).to_dict())
    assert (cfg.rope_theta, cfg.rope_local_theta) == (50000.0, 800.0)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    model = Gemma(cfg)
    expected_global = 1.0 / (50000.0 ** (torch.arange(0, 12, 2).float() / 12)) / 3.0
    expected_local = 1.0 / (800.0 ** (torch.arange(0, 12, 2).float() / 12))
    torch.testing.assert_close(model.inv_freq, expected_global)
    torch.testing.assert_close(model.inv_freq_local, expected_local)


def tiny(version: int, **overrides) -> GemmaConfig:
    base = dict(version=version, vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                intermediate_size=48, head_dim=8, sliding_window=4 if version > 1 else None,
                attn_logit_softcapping=3.0 if version == 2 else None)
    return GemmaConfig(**{**base, **overrides})


def random_model(cfg: GemmaConfig) -> Gemma:
    torch.manual_seed(0)
    model = Gemma(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.2)
    return model


def test_sliding_window_limits_attention():
    # Every layer local: after L layers position p depends only on positions ≥ p - L·(w - 1).
    layers, window = 2, 4
    model = random_model(tiny(3, num_layers=layers, layer_types=[SLIDING] * layers, sliding_window=window))
    tokens = TOKENS[:1, :20]
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % VOCAB
    with torch.no_grad():
        diff = (model(tokens) - model(changed)).abs().amax(-1)[0]  # [s]
    reach = layers * (window - 1)
    assert (diff[: reach + 1] > 1e-4).all()  # within reach: influenced
    assert (diff[reach + 1 :] == 0).all()  # beyond: exactly nothing


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
@pytest.mark.parametrize("version", [1, 2, 3])
def test_kv_cache_decoding_matches_full_forward(version, attention):
    model = random_model(tiny(version))
    model.set_attention(attention)
    tokens = TOKENS[:, :14]  # longer than the window: the cache must mask old positions
    with torch.no_grad():
        full = model(tokens)
        model.setup_kv_cache(batch=2, max_len=16)
        steps = [model(tokens[:, :6])] + [model(tokens[:, t : t + 1]) for t in range(6, 14)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
@pytest.mark.parametrize("version", [2, 3])
def test_packed_documents_match_separate_runs(version, attention):
    model = random_model(tiny(version))
    model.set_attention(attention)
    a, b = TOKENS[0, :9], TOKENS[1, :7]  # each longer than the window of 4
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    docs = torch.cat([torch.zeros(9, dtype=torch.long), torch.ones(7, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(packed, positions=positions, document_ids=docs)[0]
        torch.testing.assert_close(out[:9], model(a[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[9:], model(b[None])[0], atol=1e-5, rtol=1e-5)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_gemma(path, version: int, targets=TARGETS) -> Gemma:
    model = load_pretrained(str(path))
    apply_lora(model, targets, rank=4, alpha=8.0)
    torch.manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.1)  # nonzero B: the adapter changes the output
    return model.eval()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_lora_merged_equals_unmerged_and_merged_checkpoint_loads_in_transformers(version, tmp_path):
    hf_model(version, tmp_path / "base")
    model = lora_gemma(tmp_path / "base", version)
    with torch.no_grad():
        base = load_pretrained(str(tmp_path / "base"))(TOKENS)
        unmerged = model(TOKENS)
        assert (unmerged - base).abs().max() > 1e-2  # the adapter matters
        save_hf_checkpoint(model, tmp_path / "merged")
        merge_lora(model)
        merged = model(TOKENS)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == gemma_hf.HF_MODEL_TYPES[version]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(ref).__name__ == HF_CLASSES[version]
    with torch.no_grad():
        assert (ref(TOKENS).logits - unmerged).abs().max().item() <= 1e-4


@pytest.mark.parametrize("version", [2, 3])
def test_peft_adapter_loads_in_peft(version, tmp_path):
    ref = hf_model(version, tmp_path / "base")
    model = lora_gemma(tmp_path / "base", version, targets=["q_proj", "v_proj", "up_proj"])
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"), rank=4, alpha=8.0,
                      dropout=0.0, targets=["q_proj", "v_proj", "up_proj"])
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(TOKENS).logits - model(TOKENS)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(gemma_builders.HUB_IDS))
def test_builders_round_trip_through_hf_config(name):
    cfg = getattr(gemma_builders, name)()
    back = gemma_hf.config_from_hf(gemma_hf.config_to_hf(cfg))
    assert back == cfg
    # transformers reads our config.json into the matching config class with the same values.
    hf_cfg = transformers.AutoConfig.for_model(**gemma_hf.config_to_hf(cfg))
    assert (hf_cfg.hidden_size, hf_cfg.num_attention_heads, hf_cfg.head_dim) == (cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    if cfg.version >= 2:
        assert list(hf_cfg.layer_types) == cfg.layer_types
        assert hf_cfg.query_pre_attn_scalar == cfg.query_pre_attn_scalar


def test_builders_real_shapes():
    # Parameter counts on the meta device against the published sizes (embedding included once).
    def count(cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in Gemma(cfg).parameters())

    assert count(gemma_builders.gemma3_270m()) == 268_098_176
    assert count(gemma_builders.gemma3_1b()) == 999_885_952
    assert count(gemma_builders.gemma2_2b()) == 2_614_341_888
    assert count(gemma_builders.gemma_2b()) == 2_506_172_416
    assert gemma_builders.gemma2_27b().query_pre_attn_scalar == 144
    assert gemma_builders.gemma3_4b().layer_types.count(GLOBAL) == 34 // 6


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="hidden_activation"):
        gemma_hf.config_from_hf({**hf_config(2).to_dict(), "hidden_activation": "relu"})
    with pytest.raises(ValueError, match="multimodal"):
        gemma_hf.config_from_hf({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ValueError, match="sliding_window"):
        dataclasses.replace(tiny(2), sliding_window=None)
