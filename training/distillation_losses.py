"""Distillation losses: how far the student's next-token distribution is from a frozen teacher's.

Every loss has the same call signature as the SFT losses, plus the teacher's side::

    loss_fn(hidden, teacher_hidden, labels, head, teacher_head) -> Tensor

- ``hidden`` [b, s, d] / ``teacher_hidden`` [b, s, d_T]: final hidden states of student and teacher
  on the same tokens (the teacher's without grad)
- ``labels`` [b, s]: shifted targets, -100 where no loss is taken (prompt, padding)
- ``head`` / ``teacher_head``: ``model.logits`` of each, [..., d] → [..., v]

and returns the SUM over labelled positions of a per-token divergence (the recipe divides by the
labelled tokens of the step and mixes it with the cross-entropy by ``kd_ratio``). Only labelled
positions are projected, ``chunk_size`` at a time, student and teacher side by side, and each
chunk is recomputed in backward: one chunk's [chunk_size, v] logits of each model exist at once,
never the full [tokens × vocab] of either.

A new divergence is a subclass that writes ``divergence(student_logits, teacher_logits) -> [c]``
on one chunk's fp32 logits (``DistillationLoss`` does the chunking); name it by import path
(``loss=my_kd.MyDivergence``), its constructor's keyword arguments come from ``loss_args``.

Notation: ``p = softmax(z_T / τ)`` the teacher's, ``q = softmax(z_S / τ)`` the student's
distribution over the vocabulary at one position, ``τ`` the temperature.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tunesmith.training.losses import IGNORE_INDEX

Head = Callable[[Tensor], Tensor]


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q) per row [c], from log-probabilities [c, v] (0 · log 0 = 0)."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(dim=-1)


class DistillationLoss:
    """Base class: the chunked sum of ``divergence`` over labelled positions.

    Args:
        temperature: τ: both models' logits are divided by it before the softmax; the divergence is
            multiplied by τ² so its gradient keeps its scale (Hinton et al. 2015).
        chunk_size: Labelled positions projected to the vocabulary at once (0: all at once).
    """

    def __init__(self, temperature: float = 1.0, chunk_size: int = 1024) -> None:
        if temperature <= 0:
            raise ValueError(f"loss_args.temperature must be > 0, got {temperature}")
        self.temperature, self.chunk_size = temperature, chunk_size

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-position divergence [c] of fp32 logits [c, v] (already divided by τ)."""
        raise NotImplementedError

    def _chunk(self, h: Tensor, h_t: Tensor, head: Head, teacher_head: Head) -> Tensor:
        z = head(h).float() / self.temperature
        with torch.no_grad():
            z_t = teacher_head(h_t).float() / self.temperature
        if z.shape[-1] != z_t.shape[-1]:
            raise ValueError(f"student logits have {z.shape[-1]} entries, the teacher's {z_t.shape[-1]}: "
                             "distillation needs both models to share one vocabulary")
        return self.divergence(z, z_t).sum() * self.temperature**2

    def __call__(self, hidden: Tensor, teacher_hidden: Tensor, labels: Tensor, head: Head, teacher_head: Head) -> Tensor:
        keep = labels != IGNORE_INDEX
        h, h_t = hidden[keep], teacher_hidden[keep]  # [n, d], [n, d_T]: only labelled positions
        if self.chunk_size <= 0 or h.shape[0] <= self.chunk_size:
            return self._chunk(h, h_t, head, teacher_head)
        total = hidden.new_zeros((), dtype=torch.float32)
        for h_c, h_t_c in zip(h.split(self.chunk_size), h_t.split(self.chunk_size)):
            total = total + checkpoint(self._chunk, h_c, h_t_c, head, teacher_head, use_reentrant=False)
        return total


class ForwardKL(DistillationLoss):
    """Forward KL(p ‖ q) = Σ p (log p − log q): classic distillation (Hinton et al. 2015); mode-covering.

    Its gradient equals that of the cross-entropy to the teacher's soft labels, −Σ p log q (what
    torchtune's ``ForwardKLLoss`` computes); the teacher's entropy is added so the value is a true
    KL, 0 when the student matches the teacher.
    """

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kl_divergence(F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1))


class ReverseKL(DistillationLoss):
    """Reverse KL(q ‖ p) = Σ q (log q − log p): mode-seeking (MiniLLM, Gu et al. 2024, arXiv:2306.08543).

    The student puts its mass where the teacher is confident rather than spreading it over
    everything the teacher allows; computed here on the data's tokens (the off-policy variant).
    """

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kl_divergence(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1))


class GeneralizedJSD(DistillationLoss):
    """Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024, arXiv:2306.13649, Eq. 5).

    ``JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, ``m = β p + (1 − β) q``: bounded by ln 2 at β = ½
    (the symmetric JSD); it moves from forward-KL-like (β → 0, scaled by β) to reverse-KL-like (β → 1).

    Args:
        beta: β in (0, 1).
        temperature: See ``DistillationLoss``.
        chunk_size: See ``DistillationLoss``.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 1024) -> None:
        super().__init__(temperature, chunk_size)
        if not 0 < beta < 1:
            raise ValueError(f"loss_args.beta must be in (0, 1), got {beta}")
        self.beta = beta

    def divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        log_p, log_q = F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(self.beta), log_q + math.log(1 - self.beta)]), dim=0)
        return self.beta * kl_divergence(log_p, log_m) + (1 - self.beta) * kl_divergence(log_q, log_m)


# Names a config can use; anything else is an import path to your own class.
LOSSES: dict[str, type] = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": GeneralizedJSD}


def distillation_loss_class(name: str) -> type:
    """The class of a built-in name (``forward_kl``, ``reverse_kl``, ``jsd``) or of an import path.

    Raises:
        ConfigError: naming the ``loss`` key, for an unknown name that is not an importable path.
    """
    from tunesmith.training.plugins import resolve

    return resolve(name, LOSSES, "loss")


def build_distillation_loss(name: str, args: dict[str, Any]) -> Any:
    """A loss from a built-in name (``forward_kl``, ``reverse_kl``, ``jsd``) or an import path, built with ``args``.

    Raises:
        ConfigError: For an unknown name that is not an import path, or arguments the class does not take.
    """
    from tunesmith.training.plugins import instantiate

    return instantiate(distillation_loss_class(name), args)
