"""Gemma 1, 2 and 3 text decoders, built from the Llama pieces so the differences stand out.

    tokens ─► tok_embeddings × √d ─► [ Block ] × num_layers ─► norm ─► output ─► (soft-cap) ─► logits
                                        │
          Gemma 1:  x = x + attn(attn_norm(x))                      like Llama, but GeGLU and (1 + w) norms
                    x = x + mlp(mlp_norm(x))
          Gemma 2/3: x = x + post_attn_norm(attn(attn_norm(x)))     a norm before *and* after each sub-layer
                    x = x + post_mlp_norm(mlp(mlp_norm(x)))

What differs from ``llama.py``, each visible below:

* the token embeddings are multiplied by √hidden_size (rounded to the model dtype first, as HF does);
* ``GemmaRMSNorm`` scales by ``(1 + weight)`` (weights are stored as offsets from 1, initialised at 0);
* the MLP is GeGLU with the tanh-approximate GELU instead of SwiGLU;
* ``head_dim`` is its own setting (256 for most sizes), not ``hidden_size // num_heads``;
* Gemma 1 2B uses multi-query attention (one key/value head);
* Gemma 2 soft-caps attention logits (``c · tanh(s / c)``) and the final logits, scales queries by
  ``query_pre_attn_scalar ** -0.5`` and alternates sliding-window (local) and global layers;
* Gemma 3 drops the soft-capping, RMS-normalises queries and keys per head (QK-norm), uses five local
  layers per global one, and gives local and global layers their own RoPE base (10k vs 1M, plus linear
  RoPE scaling on the global layers of the 4B/12B/27B models).

Sliding-window attention is a real mask (``llama.attention_mask(..., sliding_window=w)``): it composes
with packing's ``document_ids`` and with the KV cache, which keeps every position and lets the mask
hide the ones that fell out of the window.

Leaf names (``q_proj`` … ``down_proj``, ``output``) match Llama's, so ``apply_lora`` works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tunesmith.models.llama import (
    GLOBAL, SLIDING, CausalLM, KVCache, apply_rope, attention_mask, check_layer_types, matmul_attention, rope_cos_sin,
    rope_inv_freq, soft_cap,
)


def default_layer_types(version: int, num_layers: int, sliding_window_pattern: int = 6) -> list[str]:
    """Which layers attend locally (sliding window) and which globally, as HF's ``layer_types``.

    Gemma 1: all global. Gemma 2: local, global, local, global, … Gemma 3: every
    ``sliding_window_pattern``-th layer is global (5 local : 1 global by default).
    """
    if version == 1:
        return [GLOBAL] * num_layers
    pattern = 2 if version == 2 else sliding_window_pattern
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


@dataclass
class GemmaConfig:
    """Shape of a Gemma 1, 2 or 3 text model. Field names follow ``LlamaConfig`` / HF ``config.json``.

    Attributes:
        version: 1, 2 or 3; picks the block layout (post-norms from 2, QK-norm in 3).
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream (d).
        num_layers: Number of transformer blocks.
        num_heads: Query heads (h).
        num_kv_heads: Key/value heads (kvh); 1 is multi-query attention.
        intermediate_size: Width of the GeGLU hidden layer.
        head_dim: Per-head width, independent of ``hidden_size / num_heads``.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base of global layers (all layers in Gemma 1 and 2).
        rope_local_theta: RoPE base of sliding-window layers (Gemma 3: 10,000).
        rope_scaling: HF ``rope_scaling`` dict applied to global layers only (Gemma 3 4B+:
            ``{"rope_type": "linear", "factor": 8.0}``).
        query_pre_attn_scalar: Attention scores are scaled by ``query_pre_attn_scalar ** -0.5``;
            defaults to ``head_dim`` (plain scaled dot product, as Gemma 1).
        sliding_window: Window of the local layers, in tokens (a query sees itself and the
            ``sliding_window - 1`` positions before it).
        layer_types: ``"sliding_attention"`` / ``"full_attention"`` per layer; defaults from ``version``.
        attn_logit_softcapping: Gemma 2's cap ``c`` in ``c · tanh(scores / c)``; ``None`` for off.
        final_logit_softcapping: Same, on the output logits.
        max_seq_len: Longest sequence the model was trained for (sizes KV caches by default).
        tie_embeddings: Output head shares the token-embedding matrix (true for every Gemma).
        bos_token_id: Beginning-of-sequence id, when known; carried only so a saved
            ``config.json`` keeps it (the tokenizer is what uses it).
        eos_token_id: End-of-sequence id (or ids), when known; as above.
    """

    version: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_local_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    family: str = field(default="gemma")

    def __post_init__(self) -> None:
        if self.version not in (1, 2, 3):
            raise ValueError(f"GemmaConfig.version must be 1, 2 or 3, got {self.version!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.version, self.num_layers)
        check_layer_types(self.layer_types, self.num_layers, self.sliding_window)


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by ``(1 + weight)``, all in fp32, cast back at the end.

    Gemma stores the scale as an offset from 1 (so a fresh norm is the identity with weight 0) and,
    unlike Llama, multiplies before casting back to the model dtype, which matters in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    """Self-attention with Gemma's options: QK-norm, query_pre_attn_scalar, soft-capping, local window.

    The mask arrives from the model already built for this layer's kind (local or global), and so do
    the RoPE tables (local and global layers may use different bases).
    """

    def __init__(self, cfg: GemmaConfig, sliding: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding = sliding
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        # Gemma 3: normalise each head's query and key vector before RoPE (replaces soft-capping).
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.version == 3 else None
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.version == 3 else None
        self.kv_cache: KVCache | None = None
        self.use_sdpa = True  # SDPA cannot soft-cap: Gemma 2 always takes matmul_attention

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, hd]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, s, hd]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v)
        if self.use_sdpa and self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # [b, h, s, hd]
        else:
            out = matmul_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class GeGLU(nn.Module):
    """Gemma's MLP: ``down(gelu_tanh(gate(x)) * up(x))`` — Llama's SwiGLU with GELU for SiLU."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaBlock(nn.Module):
    """One decoder layer; from Gemma 2 on, each sub-layer's output is normed before the residual add."""

    def __init__(self, cfg: GemmaConfig, sliding: bool) -> None:
        super().__init__()
        self.sliding = sliding
        self.attn_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GemmaAttention(cfg, sliding)
        self.mlp_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size)
        post_norms = cfg.version >= 2
        self.post_attn_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps) if post_norms else nn.Identity()
        self.post_mlp_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps) if post_norms else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, mask))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class Gemma(CausalLM):
    """A Gemma 1/2/3 causal LM with ``Llama``'s interface: ``model(tokens)`` [b, s] → logits [b, s, v]."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaBlock(cfg, kind == SLIDING) for kind in cfg.layer_types)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_local", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()
        self.activation_checkpointing = False  # recompute each block in backward to save memory

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE frequencies, in fp32 on the model's device.

        Global layers use ``rope_theta`` (+ ``rope_scaling``). Local layers have their own base and
        no scaling in Gemma 3; in Gemma 1 and 2 every layer uses the global table. Checkpoint
        loading calls this after materialising a meta-device model; it also undoes a
        ``model.to(bf16)`` that rounded the frequencies.
        """
        cfg, device = self.config, self.tok_embeddings.weight.device
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        local_theta = cfg.rope_local_theta if cfg.version == 3 else cfg.rope_theta
        local_scaling = None if cfg.version == 3 else cfg.rope_scaling
        self.inv_freq_local = rope_inv_freq(cfg.head_dim, local_theta, local_scaling).to(device)

    def hidden_states(
        self, tokens: Tensor, *, positions: Tensor | None = None, document_ids: Tensor | None = None
    ) -> Tensor:
        """Final-normed hidden states [b, s, d].

        Args:
            tokens: Token ids [b, s].
            positions: Position of each token [b, s]. Defaults to 0..s-1, or continues after the
                KV cache when one is set up. Packed sequences restart positions per document.
            document_ids: Document index of each token [b, s] for packed sequences; attention then
                stays within a document. ``None`` means one document per row.
        """
        b, s = tokens.shape
        kv_pos, default_positions, real = self.cache_slots(b, s, tokens.device)
        positions = default_positions if positions is None else positions
        if document_ids is not None and kv_pos.shape[1] > s:
            raise ValueError("document_ids (packing) cannot be combined with a KV cache; clear_kv_cache() first")

        # Two masks: global layers are plain causal (None → SDPA's causal fast path when nothing else
        # restricts attention); local layers also drop keys more than sliding_window - 1 positions back.
        # The window counts slots in the row (= position distance inside one packed document).
        # Pads and real tokens of a left-padded row (batched generation) never see each other.
        q_pos = kv_pos[:, -s:]
        q_doc, kv_doc = (document_ids, document_ids) if real is None else (real[:, -s:], real)
        global_mask = None
        if document_ids is not None or kv_pos.shape[1] > s or real is not None:
            global_mask = attention_mask(q_pos, kv_pos, q_doc, kv_doc)
        local_mask = global_mask
        window = self.config.sliding_window
        if window is not None and kv_pos.shape[1] > window:
            local_mask = attention_mask(q_pos, kv_pos, q_doc, kv_doc, sliding_window=window)

        x = self.tok_embeddings(tokens)
        # √d rounded to the model dtype before the multiply, as the reference implementation does.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        rope_global = rope_cos_sin(self.inv_freq, positions, x.dtype)
        rope_local = rope_cos_sin(self.inv_freq_local, positions, x.dtype)
        for layer in self.layers:
            cos, sin = rope_local if layer.sliding else rope_global
            mask = local_mask if layer.sliding else global_mask
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """Project hidden states [..., d] to vocabulary logits [..., v] (soft-capped in Gemma 2)."""
        logits = self.output(h)
        if self.config.final_logit_softcapping is not None:
            logits = soft_cap(logits, self.config.final_logit_softcapping)
        return logits
