"""Tiny random Hugging Face models of the families built on Llama (Qwen2/2.5, Qwen3, Mistral, Phi-3),
shared by the parity, GGUF and recipe tests.

Each case exercises one family feature with odd sizes: GQA, tied and untied heads, Qwen2's q/k/v
biases, Qwen3's QK-norm with head_dim ≠ hidden / heads, sliding windows shorter than the test
sequences, Phi-3's fused projections with partial rotary and LongRoPE (an original context shorter
than the sequence, so the long factors are in play).
"""

from __future__ import annotations

from typing import Any

import torch

SEQ = 29  # longer than every sliding window and every LongRoPE original context below
VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# case → (transformers class, config class, config overrides)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2_bias_gqa": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2)),
    # Qwen2.5's small sizes: tied head; local attention on the layers from max_window_layers on
    "qwen2_tied_sliding": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_key_value_heads=1, tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
        max_window_layers=1)),
    # head_dim 12 ≠ 40 / 4; odd MLP width
    "qwen3_qk_norm": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_key_value_heads=2, head_dim=12, intermediate_size=37)),
    "qwen3_tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_key_value_heads=4, head_dim=8, tie_word_embeddings=True)),
    "mistral_sliding": ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2, sliding_window=7)),
    "mistral_v03": ("MistralForCausalLM", "MistralConfig", dict(
        num_key_value_heads=1, sliding_window=None, head_dim=16, rope_theta=1e6)),
    "phi3_sliding": ("Phi3ForCausalLM", "Phi3Config", dict(num_key_value_heads=4, sliding_window=9,
                                                           original_max_position_embeddings=128)),
    # Phi-4-mini's features: GQA, RoPE on 6 of each head's 12 dims, LongRoPE (3 factors), tied head
    "phi3_partial_longrope": ("Phi3ForCausalLM", "Phi3Config", dict(
        hidden_size=48, num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=True,
        max_position_embeddings=64, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7], "long_factor": [1.5, 4.0, 9.0]})),
}


def make_hf(case: str, seed: int = 0, **changes: Any):
    """A random ``transformers`` model for ``case`` (config keys ``changes`` on top), in eval mode, with
    norms and biases far from their init (so a swapped, skipped or doubled one cannot hide)."""
    import transformers

    cls_name, cfg_name, overrides = CASES[case]
    config = getattr(transformers, cfg_name)(**{**COMMON, **overrides, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model


def tokens(seq: int = SEQ, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_cached_decoding_matches_full_forward(model, seq: torch.Tensor, prefill: int) -> None:
    """Prefill ``prefill`` tokens, then decode the rest of ``seq`` [b, s] one at a time through the KV
    cache: the logits must be the full forward's."""
    with torch.no_grad():
        full = model(seq)
        model.setup_kv_cache(batch=seq.shape[0], max_len=seq.shape[1] + 1)
        steps = [model(seq[:, :prefill])] + [model(seq[:, t : t + 1]) for t in range(prefill, seq.shape[1])]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def assert_packing_matches_separate_runs(model, documents: list[torch.Tensor]) -> None:
    """The documents packed into one row (positions restarting, attention per document) give each
    document's own logits."""
    packed = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    doc_ids = torch.cat([torch.full((len(d),), k) for k, d in enumerate(documents)])[None]
    with torch.no_grad():
        out = model(packed, positions=positions, document_ids=doc_ids)[0]
        for k, d in enumerate(documents):
            start = sum(len(x) for x in documents[:k])
            torch.testing.assert_close(out[start : start + len(d)], model(d[None])[0], atol=1e-5, rtol=1e-5)
