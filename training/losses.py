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

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_cross_entropy(h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def _token_cross_entropy_and_grad(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position CE(logits, y) [c] (fp32) and its gradient w.r.t. the logits, softmax − onehot(y), in the logits' dtype.

    Written as whole-tensor ops so that ``torch.compile`` turns it into one reduction pass
    (log-sum-exp, in fp32) and one elementwise pass writing the gradient: no fp32 copy of the
    [c, v] logits is materialised (eager runs it as ~6 passes over them).
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # [c]
    loss = lse - z.gather(1, y[:, None]).squeeze(1)
    is_target = torch.arange(z.shape[-1], device=z.device)[None, :] == y[:, None]  # [c, v] one-hot, never stored
    grad = torch.exp(z - lse[:, None]) - is_target.to(z.dtype)
    return loss, grad.to(logits.dtype)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-position CE(h Wᵀ, y) [n] for a frozen head W, with the gradient for h computed chunk by chunk in forward.

    The gradient of position i's cross-entropy w.r.t. its hidden state h_i is (softmax(h_i Wᵀ) −
    onehot(y_i)) W, which needs nothing but the chunk's logits and depends on no other position.
    Computing it while the logits exist means backward only scales a saved [n, d] tensor row by
    row: no [n, v] logits are kept and none are recomputed (the checkpointed path recomputes every
    chunk's projection in backward, ~10% of a small model's step).
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, y: Tensor, chunk_size: int, chunk_grad: Callable[..., tuple[Tensor, Tensor]]
    ) -> Tensor:
        losses = h.new_empty(h.shape[0], dtype=torch.float32)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk_size):
            h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
            loss, grad_logits = chunk_grad(h_c @ weight.t(), y_c)  # logits [c, v] in the weight's dtype
            losses[start:start + chunk_size] = loss
            if grad_h is not None:
                grad_h[start:start + chunk_size] = grad_logits @ weight
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (grad_h,) = ctx.saved_tensors
        return grad_losses.to(grad_h.dtype)[:, None] * grad_h, None, None, None, None


def frozen_linear_head(head: Callable[[Tensor], Tensor]) -> Tensor | None:
    """The weight W when ``head`` is exactly ``h ↦ h Wᵀ`` with W frozen, else None.

    True for the plain ``CausalLM.logits`` (Llama and the families built on it: Qwen, Mistral,
    Phi-3) with an output layer that is a plain, frozen ``nn.Linear`` without bias (LoRA that does
    not target ``output``; QLoRA leaves a tied head dense). Heads that do more (Gemma's override for
    soft-capping, a LoRA'd or trained head) and FSDP-sharded heads take the general path.
    """
    from torch.distributed.tensor import DTensor

    from tunesmith.models.llama import CausalLM

    model = getattr(head, "__self__", None)
    if not isinstance(model, CausalLM) or getattr(head, "__func__", None) is not CausalLM.logits:
        return None
    out = model.output
    if type(out) is not torch.nn.Linear or out.bias is not None or out.weight.requires_grad:
        return None
    if isinstance(out.weight, DTensor):  # a sharded head (FSDP): its full weight exists only inside forward
        return None
    return out.weight


class CrossEntropyLoss:
    """Token cross-entropy over labelled positions, computed chunk by chunk.

    When the head is a frozen linear layer (the usual LoRA setup) the gradient for the hidden
    states is computed during the forward pass, chunk by chunk, so backward needs neither the
    logits nor a second projection (``_FrozenHeadCrossEntropy``). Otherwise each chunk's
    projection is checkpointed and recomputed in backward.

    Args:
        chunk_size: Labelled positions projected to the vocabulary at once. Each chunk's logits are
            recomputed in backward (activation checkpointing of the head), so peak memory holds one
            chunk's [chunk_size, v] fp32 logits. ``0`` projects all labelled positions at once and
            keeps their logits for backward (fastest, most memory).
    """

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = chunk_size
        self.chunk_loss: Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor] = _chunk_cross_entropy
        self.chunk_grad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = _token_cross_entropy_and_grad

    def compile(self) -> None:
        """Compile the per-chunk projection + cross-entropy (``torch.compile``).

        The fused kernel computes log-softmax without keeping a separate fp32 copy of the chunk's
        logits, so each chunk needs less memory and time; the first call pays the compilation.
        """
        self.chunk_loss = torch.compile(_chunk_cross_entropy, dynamic=True)
        self.chunk_grad = torch.compile(_token_cross_entropy_and_grad, dynamic=True)

    def __call__(self, hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
        keep = labels != IGNORE_INDEX
        h, y = hidden[keep], labels[keep]  # [n, d], [n]: prompt and padding positions are never projected
        weight = frozen_linear_head(head)
        if weight is not None and self.chunk_size > 0 and torch.is_grad_enabled():
            return _FrozenHeadCrossEntropy.apply(h, weight, y, self.chunk_size, self.chunk_grad).sum()
        if self.chunk_size <= 0 or h.shape[0] <= self.chunk_size:
            return self.chunk_loss(h, y, head)
        total = hidden.new_zeros((), dtype=torch.float32)
        for h_chunk, y_chunk in zip(h.split(self.chunk_size), y.split(self.chunk_size)):
            total = total + checkpoint(self.chunk_loss, h_chunk, y_chunk, head, use_reentrant=False)
        return total


def _chunk_logprobs(h: Tensor, y: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    return -F.cross_entropy(head(h).float(), y, reduction="none")


def token_logprobs(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], chunk_size: int = 1024) -> Tensor:
    """log p(label) of every labelled position [n] (fp32), in row-major order, ``chunk_size`` positions at a time.

    No [n, v] logits exist at once: a frozen linear head (LoRA) takes the path of the
    cross-entropy above (each chunk's gradient for the hidden states computed in forward, a saved
    [n, d] tensor scaled in backward); any other head, with grad, checkpoints each chunk's
    projection (recomputed in backward); without grad the chunks are simply projected in turn.

    Args:
        hidden: Final hidden states [r, s, d].
        labels: Shifted targets [r, s], -100 where not scored.
        head: ``model.logits`` ([..., d] → [..., v]).
        chunk_size: Positions per projection; 0 projects all at once.
    """
    keep = labels != IGNORE_INDEX
    h, y = hidden[keep], labels[keep]
    if chunk_size <= 0 or h.shape[0] <= chunk_size and not torch.is_grad_enabled():
        return _chunk_logprobs(h, y, head)
    weight = frozen_linear_head(head)
    if weight is not None and torch.is_grad_enabled():
        return -_FrozenHeadCrossEntropy.apply(h, weight, y, chunk_size, _token_cross_entropy_and_grad)
    if h.shape[0] <= chunk_size:
        return _chunk_logprobs(h, y, head)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(_chunk_logprobs, hc, yc, head, use_reentrant=False) if grad else _chunk_logprobs(hc, yc, head)
             for hc, yc in zip(h.split(chunk_size), y.split(chunk_size))]
    return torch.cat(parts)


def loss_class(name: str) -> type:
    """The loss class a config names: ``cross_entropy`` (``CrossEntropyLoss``) or an import path
    (``my_losses.FocalLoss``, found in the current folder too).

    Raises:
        ConfigError: naming the ``loss`` key when the path does not import.
    """
    from tunesmith.training.plugins import resolve

    return resolve(name, {"cross_entropy": CrossEntropyLoss}, "loss")
