"""Losses for supervised fine-tuning.

A loss is any callable ``loss_fn(hidden, labels, head) -> Tensor`` returning the SUM of per-token
losses (a scalar); the recipe divides by the number of labelled tokens in the whole optimizer step,
so gradient accumulation gives the same update as one large batch. Arguments:

- ``hidden``: final-normed hidden states [b, s, d] (``model.hidden_states(tokens)``)
- ``labels``: targets [b, s], already shifted (``labels[t]`` is the token after position t), -100 = no loss
- ``head``: ``model.logits``, mapping [..., d] → [..., v]

Handing the loss the hidden states and the head, rather than logits, lets it project only the
positions that carry a label, in chunks — the full fp32 [tokens × vocab] logits never exist. For a
262k-token vocabulary (Gemma 3) that is the difference between fitting on a laptop and not.

Write your own in a file of yours and name it in the config: ``loss=my_losses.FocalLoss``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_cross_entropy(h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


class CrossEntropyLoss:
    """Token cross-entropy over labelled positions, computed chunk by chunk.

    Args:
        chunk_size: Labelled positions projected to the vocabulary at once. Each chunk's logits are
            recomputed in backward (activation checkpointing of the head), so peak memory holds one
            chunk's [chunk_size, v] fp32 logits. ``0`` projects all labelled positions at once and
            keeps their logits for backward (fastest, most memory).
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = chunk_size
        self.chunk_loss: Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor] = _chunk_cross_entropy

    def compile(self) -> None:
        """Compile the per-chunk projection + cross-entropy (``torch.compile``).

        The fused kernel computes log-softmax without keeping a separate fp32 copy of the chunk's
        logits, so each chunk needs less memory and time; the first call pays the compilation.
        """
        self.chunk_loss = torch.compile(_chunk_cross_entropy, dynamic=True)

    def __call__(self, hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
        keep = labels != IGNORE_INDEX
        h, y = hidden[keep], labels[keep]  # [n, d], [n]: prompt and padding positions are never projected
        if self.chunk_size <= 0 or h.shape[0] <= self.chunk_size:
            return self.chunk_loss(h, y, head)
        total = hidden.new_zeros((), dtype=torch.float32)
        for h_chunk, y_chunk in zip(h.split(self.chunk_size), y.split(self.chunk_size)):
            total = total + checkpoint(self.chunk_loss, h_chunk, y_chunk, head, use_reentrant=False)
        return total
