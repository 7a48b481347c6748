"""GGUF in for the qwen2, qwen3, llama (Mistral) and phi3 architectures, on files written in llama.cpp's layout.

Each tiny HF model (tests/family_helpers.py) is written as a GGUF file the way llama.cpp's
``convert_hf_to_gguf.py`` writes that architecture: tensor names from gguf-py's own name map (the one
the converter uses), Q/K rows permuted for ``llama`` only (Qwen and Phi-3 run "rotate half" RoPE in
llama.cpp), Phi-3's fused ``attn_qkv`` / ``ffn_up`` kept fused, the tied head left out, and the
metadata keys the converter sets (Phi-3: rotated dims, LongRoPE factor tensors, attention factor,
original context, sliding window). Our load must give the HF model's logits, and — where
transformers' own GGUF loader supports the architecture and features — the same logits as
``from_pretrained(dir, gguf_file=...)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from family_helpers import SEQ, make_hf, tokens  # noqa: E402
from test_gguf_smollm2 import llama_cpp_permute  # noqa: E402
from tunesmith.models import CheckpointFormatError, load_pretrained  # noqa: E402
from tunesmith.models.mistral import Mistral  # noqa: E402
from tunesmith.models.llama import Llama  # noqa: E402
from tunesmith.models.phi3 import Phi3  # noqa: E402
from tunesmith.models.qwen import Qwen  # noqa: E402

TOKENS = tokens()
ARCH = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "llama": gguf.MODEL_ARCH.LLAMA,
        "phi3": gguf.MODEL_ARCH.PHI3}


def write_gguf(hf, path, arch: str, name: str = "tiny") -> None:
    """``hf`` as an F32 GGUF file in llama.cpp's layout for ``arch``."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch in ("qwen3", "llama") and getattr(c, "head_dim", None):  # the converter writes config.json's head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters / generate_extra_tensors
        rope = c.rope_parameters
        rotary = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        original = rope.get("original_max_position_embeddings", c.max_position_embeddings)
        w.add_rope_dimension_count(rotary)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_sliding_window(c.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    names = gguf.get_tensor_name_map(ARCH[arch], c.num_hidden_layers)
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp leaves a tied head out of the file
        t = t.float()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in hf_name else c.num_key_value_heads
            t = llama_cpp_permute(t, heads)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def diff(a, b) -> float:
    return (a - b).abs().max().item()


# case, GGUF architecture, our class, transformers' GGUF loader gives the same model on this many tokens
# (0: it cannot represent the case: partial rotary / LongRoPE; phi3's sliding window it drops)
GGUF_CASES = [
    ("qwen2_bias_gqa", "qwen2", Qwen, SEQ),
    ("qwen3_gguf", "qwen3", Qwen, SEQ),
    ("mistral_v03", "llama", Llama, SEQ),
    ("phi3_sliding", "phi3", Phi3, 9),
    ("phi3_partial_longrope", "phi3", Phi3, 0),
]


def hf_model(case: str):
    if case == "qwen3_gguf":  # transformers' GGUF loader reads no head_dim for qwen3: its default, 128
        return make_hf_qwen3_head_dim_128()
    return make_hf(case)


def make_hf_qwen3_head_dim_128():
    config = transformers.Qwen3Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                      max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("case,arch,cls,hf_gguf_tokens", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_loads_to_the_hf_models_logits(case, arch, cls, hf_gguf_tokens, tmp_path):
    hf = hf_model(case)
    path = tmp_path / f"{case}.gguf"
    write_gguf(hf, path, arch, name="Mistral tiny" if case.startswith("mistral") else "tiny")
    ours = load_pretrained(path)
    assert type(ours) is cls
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        assert diff(ours(TOKENS), hf(TOKENS).logits) <= 1e-4
        if hf_gguf_tokens:
            ref = transformers_gguf(path)
            short = TOKENS[:, :hf_gguf_tokens]
            assert diff(ours(short), ref(short).logits) <= 1e-4


def test_phi3_gguf_metadata_becomes_partial_rotary_longrope_and_window(tmp_path):
    hf = make_hf("phi3_partial_longrope")
    write_gguf(hf, tmp_path / "phi.gguf", "phi3")
    cfg = load_pretrained(tmp_path / "phi.gguf").config
    assert (cfg.head_dim, cfg.rotary_dim, cfg.partial_rotary_factor) == (12, 6, 0.5)
    assert cfg.rope_scaling["original_max_position_embeddings"] == 16
    assert cfg.rope_scaling["long_factor"] == [1.5, 4.0, 9.0]
    write_gguf(make_hf("phi3_sliding"), tmp_path / "window.gguf", "phi3")
    assert load_pretrained(tmp_path / "window.gguf").config.sliding_window == 9


def metadata_only_gguf(path, arch: str, **extra) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for key, value in extra.items():
        w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,extra,what", [
    ("qwen3moe", {}, "Qwen3-MoE"), ("qwen2moe", {}, "MoE"), ("qwen2vl", {}, "Qwen2-VL"),
    ("phimoe", {}, "Phi-3.5-MoE"), ("llama", {"llama.expert_count": 8}, "Mixtral"),
])
def test_moe_and_multimodal_gguf_are_refused_by_name(arch, extra, what, tmp_path):
    metadata_only_gguf(tmp_path / "x.gguf", arch, **extra)
    with pytest.raises(CheckpointFormatError, match=rf"{what}.*out of scope"):
        load_pretrained(tmp_path / "x.gguf")


def test_mistral_gguf_is_a_llama_and_saves_as_one(tmp_path):
    """llama.cpp writes Mistral as "llama" (no window in the metadata): the same function as Mistral v0.3."""
    from tunesmith.models import save_hf_checkpoint

    hf = make_hf("mistral_v03")
    write_gguf(hf, tmp_path / "m.gguf", "llama", name="Mistral tiny")
    ours = load_pretrained(tmp_path / "m.gguf")
    assert type(ours) is Llama and not isinstance(ours, Mistral)
    save_hf_checkpoint(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert diff(back(TOKENS).logits, hf(TOKENS).logits) <= 1e-4
