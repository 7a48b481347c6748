"""Phi-3 and Phi-4-mini: the Llama decoder with fused projections, partial rotary and LongRoPE.

    tokens ─► tok_embeddings ─► [ Block ] × num_layers ─► norm ─► output ─► logits      (as Llama)
                                   │
                 attention: q, k, v = split(qkv_proj(x))         one [(h + 2·kvh)·hd, d] matrix
                 mlp:       gate, up = chunk(gate_up_proj(x))    one [2·I, d] matrix; down(silu(gate) * up)

What differs from ``llama.py``, each visible below:

* ``qkv_proj`` and ``gate_up_proj`` are fused exactly as in the HF checkpoint (rows [q | k | v] and
  [gate | up]): one GEMM each, and every parameter is one HF tensor, so a sharded loader reads rows
  of the file straight into its shard. LoRA targets are these names (``qkv_proj``, ``gate_up_proj``,
  ``o_proj``, ``down_proj``, ``output``) — what PEFT calls them on Phi-3 too; a LoRA on
  ``qkv_proj`` adapts queries, keys and values with one rank-r update of the fused output.
* partial rotary (``partial_rotary_factor``, 0.75 in Phi-4-mini): RoPE turns only the first
  ``rotary_dim`` dimensions of each head; ``apply_rope`` passes the rest through.
* LongRoPE (``rope_scaling.rope_type == "longrope"``, the 128k models): per-frequency divisors,
  ``short_factor`` while the sequence fits the pre-training context and ``long_factor`` once it
  outgrows it (decided, as in HF, by the largest position in the forward), and cos/sin scaled by
  ``attention_factor`` = √(1 + ln(max_seq_len / original) / ln(original)).
* a sliding window on every layer when the config sets one (Phi-3-mini-4k: 2047).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunesmith.models.llama import Attention, Block, Llama, LlamaConfig, rope_cos_sin, rope_inv_freq


@dataclass(kw_only=True)
class Phi3Config(LlamaConfig):
    """Shape of a Phi-3 / Phi-4-mini model: ``LlamaConfig`` plus these.

    Attributes:
        partial_rotary_factor: Share of each head's dimensions RoPE rotates (1.0: all).
        sliding_window: Every layer attends to the last ``sliding_window`` positions; ``None``: off.
        rope_scaling: ``None`` or LongRoPE: ``{"rope_type": "longrope", "short_factor": [...],
            "long_factor": [...], "original_max_position_embeddings": 4096}`` with ``rotary_dim / 2``
            factors each, optionally ``"attention_factor"`` (else derived from ``max_seq_len``).
        pad_token_id: Padding id, when known; carried only so a saved ``config.json`` keeps it
            (transformers' Phi-3 defaults it to 32000, not a token of every Phi vocabulary).
    """

    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    pad_token_id: int | None = None
    family: str = field(default="phi3")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rope_scaling:
            return
        if self.rope_scaling.get("rope_type") != "longrope":
            raise ValueError(f"Phi-3 rope_scaling must be longrope, got {self.rope_scaling.get('rope_type')!r}")
        for key in ("short_factor", "long_factor"):
            if len(self.rope_scaling[key]) != self.rotary_dim // 2:
                raise ValueError(
                    f"rope_scaling.{key} has {len(self.rope_scaling[key])} entries; rotary_dim "
                    f"{self.rotary_dim} needs {self.rotary_dim // 2}"
                )
        if "original_max_position_embeddings" not in self.rope_scaling:
            raise ValueError("longrope rope_scaling needs original_max_position_embeddings")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_factor(self) -> float:
        """LongRoPE's cos/sin scale: √(1 + ln s / ln L) for s = max_seq_len / L > 1 (L: original context)."""
        if not self.rope_scaling:
            return 1.0
        if self.rope_scaling.get("attention_factor") is not None:
            return float(self.rope_scaling["attention_factor"])
        original = self.rope_scaling["original_max_position_embeddings"]
        factor = self.rope_scaling.get("factor") or self.max_seq_len / original
        return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


class Phi3Attention(Attention):
    """Llama's attention with q, k and v computed by one fused projection, as Phi-3 stores them."""

    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__(cfg, sliding_window=cfg.sliding_window)
        # One [q | k | v] projection replaces Llama's three: HF's qkv_proj tensor, one GEMM.
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, hd]
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, s, hd]
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v


class Phi3MLP(nn.Module):
    """SwiGLU with gate and up fused: ``gate, up = chunk(gate_up_proj(x))``, ``down(silu(gate) * up)``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each [..., I]
        return self.down_proj(F.silu(gate) * up)


class Phi3(Llama):
    """A Phi-3 / Phi-4-mini causal LM with ``Llama``'s interface: ``model(tokens)`` [b, s] → logits [b, s, v]."""

    config: Phi3Config

    def make_block(self, layer: int) -> nn.Module:
        cfg = self.config
        return Block(cfg, attn=Phi3Attention(cfg), mlp=Phi3MLP(cfg.hidden_size, cfg.intermediate_size))

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE frequencies of the rotated dimensions, in fp32 on the model's device.

        ``inv_freq`` holds the short-context frequencies and ``inv_freq_long`` the long-context ones
        (LongRoPE divides the plain frequencies by ``short_factor`` / ``long_factor``; without
        LongRoPE both are the plain frequencies).
        """
        cfg, device = self.config, self.tok_embeddings.weight.device
        plain = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta)  # [rotary_dim / 2]
        short = long = plain
        if cfg.rope_scaling:
            short = plain / torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32)
            long = plain / torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32)
        self.inv_freq = short.to(device)
        self.register_buffer("inv_freq_long", long.to(device), persistent=False)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [b, 1, s, rotary_dim]: LongRoPE's long factors once a position reaches the
        pre-training context (picked on the device, without a host sync), scaled by its attention factor.

        Decoding with a KV cache across that boundary keeps the earlier keys as they were rotated
        (short factors); transformers recomputes its cache there instead. Training and prompts that
        stay on one side of the boundary are unaffected.
        """
        inv_freq = self.inv_freq
        if self.config.rope_scaling:
            original = self.config.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(positions.max() + 1 > original, self.inv_freq_long, self.inv_freq)
        return rope_cos_sin(inv_freq, positions, dtype, scale=self.config.attention_factor)
