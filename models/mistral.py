"""Mistral 7B: the Llama decoder, with sliding-window attention when its config sets a window.

Mistral-7B-v0.1 attends, in every layer, only to the last ``sliding_window`` = 4096 positions;
v0.2 and v0.3 (``sliding_window: null``, a 32k context and RoPE base 10⁶) are exactly Llama-shaped.
Nothing else differs from ``llama.py``: the window is the one change, and the mask that enforces
it is Llama's own (``Llama.layer_mask`` → ``attention_mask(..., sliding_window=)``), so packing and
the KV cache compose with it as they do for Gemma's local layers.

In GGUF, llama.cpp stores Mistral under the ``llama`` architecture with no window in its metadata;
such a file loads as a ``Llama`` (the same function for v0.2 / v0.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tunesmith.models.llama import Attention, Block, Llama, LlamaConfig


@dataclass(kw_only=True)
class MistralConfig(LlamaConfig):
    """Shape of a Mistral model: ``LlamaConfig`` plus the window.

    Attributes:
        sliding_window: Every layer attends to the last ``sliding_window`` positions (a query sees
            itself and the ``sliding_window - 1`` before it); ``None``: full causal attention.
    """

    sliding_window: int | None = None
    family: str = field(default="mistral")


class Mistral(Llama):
    """Mistral with ``Llama``'s interface: ``model(tokens)`` [b, s] → logits [b, s, v]."""

    config: MistralConfig

    def make_block(self, layer: int) -> nn.Module:
        return Block(self.config, attn=Attention(self.config, sliding_window=self.config.sliding_window))
