"""Qwen2 / Qwen2.5 and Qwen3 dense decoders: the Llama decoder with two small changes.

    tokens ─► tok_embeddings ─► [ Block ] × num_layers ─► norm ─► output ─► logits      (as Llama)

What differs from ``llama.py``, each visible in ``QwenAttention``:

* Qwen2 / 2.5: the q, k and v projections carry a bias (o_proj does not);
* Qwen3: no biases; instead each head's query and key vector is RMS-normalised before RoPE
  (QK-norm), and ``head_dim`` is its own setting (128 for every size: ≠ hidden / heads on most).

Both can run some layers with sliding-window attention (``use_sliding_window`` in config.json; off
in every released checkpoint): in HF's layout, the layers from ``max_window_layers`` on attend only
to the last ``sliding_window`` positions. Which layer does what is ``QwenConfig.layer_types``; the
mask is Llama's (``Llama.layer_mask``). The small sizes tie the output head to the embeddings
(``tie_embeddings``, as Llama 3.2). Everything else — RMSNorm, SwiGLU, RoPE, GQA, the KV cache,
packing — is Llama's, and so are the layer names, so ``apply_lora`` targets read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tunesmith.models.llama import GLOBAL, SLIDING, Attention, Block, Llama, LlamaConfig, RMSNorm, check_layer_types


@dataclass(kw_only=True)
class QwenConfig(LlamaConfig):
    """Shape of a Qwen2/2.5 or Qwen3 dense model: ``LlamaConfig`` plus these.

    Attributes:
        version: 2 (Qwen2 and Qwen2.5: q/k/v biases) or 3 (Qwen3: QK-norm, no biases).
        sliding_window: Window of the local layers in tokens (a query sees itself and the
            ``sliding_window - 1`` positions before it); ``None`` when no layer is local.
        layer_types: ``"sliding_attention"`` / ``"full_attention"`` per layer; all full by default.
    """

    version: int
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    family: str = field(default="qwen")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version not in (2, 3):
            raise ValueError(f"QwenConfig.version must be 2 or 3, got {self.version!r}")
        if self.layer_types is None:
            self.layer_types = [GLOBAL] * self.num_layers
        check_layer_types(self.layer_types, self.num_layers, self.sliding_window)


class QwenAttention(Attention):
    """Llama's attention with Qwen's change: q/k/v biases (Qwen2) or per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: QwenConfig, sliding_window: int | None) -> None:
        super().__init__(cfg, qkv_bias=cfg.version == 2, sliding_window=sliding_window)
        # Qwen3: normalise each head's query and key over head_dim, before RoPE (in place of the biases).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.version == 3 else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.version == 3 else None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project(x)  # [b, h, s, hd], [b, kvh, s, hd] ×2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class Qwen(Llama):
    """A Qwen2/2.5/3 dense causal LM with ``Llama``'s interface: ``model(tokens)`` [b, s] → logits [b, s, v]."""

    config: QwenConfig

    def make_block(self, layer: int) -> nn.Module:
        cfg = self.config
        window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None
        return Block(cfg, attn=QwenAttention(cfg, window))
