"""Preference losses for DPO-style training, one small class per paper.

Every loss has the same call signature, so the recipe never changes when you swap one::

    loss_fn(logps: PreferenceLogProbs) -> (losses [b], chosen_rewards [b], rejected_rewards [b])

``PreferenceLogProbs`` holds, per pair in the batch, the SUMMED log-probability of the chosen and of
the rejected response under the policy and under the reference model, and how many response tokens
each has (for length-normalised losses). ``losses`` is per pair (the recipe averages them); the
rewards are what the metrics report (reward accuracy = share of pairs with chosen > rejected), and
are returned detached.

A loss that needs no reference model (SimPO, ORPO) sets ``needs_reference = False`` and the recipe
skips the reference forward pass; its ``reference_*`` fields are then zeros.

Pick one by name in the config (``loss=ipo loss_args.beta=0.5``) or write your own class in a file of
yours and name it by import path (``loss=my_losses.MyLoss``); its constructor's keyword arguments
come from ``loss_args``.

Notation below: ``π`` = policy summed log-prob, ``ρ`` = reference summed log-prob, ``w`` = chosen
("winner"), ``l`` = rejected ("loser"), ``h = (π_w − ρ_w) − (π_l − ρ_l)`` the difference of the
implicit rewards' log-ratios, ``σ`` the logistic function, ``|y|`` the response's token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PreferenceLogProbs:
    """Sequence log-probabilities of a batch of preference pairs (every field is [b]).

    Attributes:
        policy_chosen: Σ log π(token) over the chosen response's tokens.
        policy_rejected: The same for the rejected response.
        reference_chosen: Σ log π_ref(token) over the chosen response (zeros for reference-free losses).
        reference_rejected: The same for the rejected response.
        chosen_tokens: Number of response tokens in the chosen response (float, ≥ 1).
        rejected_tokens: Number of response tokens in the rejected response.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def log_ratio_margin(self) -> Tensor:
        """``h = (π_w − ρ_w) − (π_l − ρ_l)``."""
        return (self.policy_chosen - self.reference_chosen) - (self.policy_rejected - self.reference_rejected)

    def implicit_rewards(self, beta: float) -> tuple[Tensor, Tensor]:
        """DPO's implicit rewards ``β (π − ρ)`` for chosen and rejected, detached."""
        return (beta * (self.policy_chosen - self.reference_chosen).detach(),
                beta * (self.policy_rejected - self.reference_rejected).detach())


LossOutput = tuple[Tensor, Tensor, Tensor]


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"loss_args.beta must be > 0, got {beta}")


class DPOLoss:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), with conservative label smoothing.

    ``loss = −(1 − ε) log σ(β h) − ε log σ(−β h)``

    ``ε = label_smoothing`` > 0 is conservative DPO (Mitchell 2023): each label is taken to be flipped
    with probability ε, which keeps the loss from pushing ``h`` to infinity.

    Args:
        beta: Strength of the KL penalty to the reference (smaller: move further from it).
        label_smoothing: ε in [0, 0.5).
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        _check_beta(beta)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_args.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        z = self.beta * logps.log_ratio_margin()
        losses = -(1 - self.label_smoothing) * F.logsigmoid(z) - self.label_smoothing * F.logsigmoid(-z)
        return (losses, *logps.implicit_rewards(self.beta))


class RobustDPOLoss:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8): unbiased under label noise ε.

    ``loss = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)``

    Args:
        beta: KL strength.
        label_smoothing: Assumed rate ε in [0, 0.5) of flipped preference labels.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        _check_beta(beta)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_args.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        z, eps = self.beta * logps.log_ratio_margin(), self.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        return (losses, *logps.implicit_rewards(self.beta))


class IPOLoss:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17): regress the log-ratio margin onto 1/(2τ).

    ``loss = (h̄ − 1 / (2 β))²`` with ``h̄`` the margin of *per-token average* log-probs
    (``π/|y|``), the length normalisation the IPO authors use (and ``trl``), so β means the same for
    short and long answers.

    Args:
        beta: τ in the paper; the target margin is 1/(2β).
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        _check_beta(beta)
        self.beta = beta

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        chosen = (logps.policy_chosen - logps.reference_chosen) / logps.chosen_tokens
        rejected = (logps.policy_rejected - logps.reference_rejected) / logps.rejected_tokens
        losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        return (losses, *logps.implicit_rewards(self.beta))


class HingeLoss:
    """SLiC-HF's calibration hinge (Zhao et al. 2023, arXiv:2305.10425, Eq. 1, with the reference log-ratio).

    ``loss = max(0, 1 − β h)``: zero once the chosen log-ratio beats the rejected one by 1/β.

    Args:
        beta: 1/β is the margin δ.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        _check_beta(beta)
        self.beta = beta

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        losses = torch.relu(1 - self.beta * logps.log_ratio_margin())
        return (losses, *logps.implicit_rewards(self.beta))


class SimPOLoss:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised.

    ``loss = −log σ(β π_w/|y_w| − β π_l/|y_l| − γ)``; rewards are ``β π/|y|``.

    Args:
        beta: Reward scale (the paper uses 2–2.5).
        gamma: Target reward margin γ.
    """

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        _check_beta(beta)
        self.beta, self.gamma = beta, gamma

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        chosen = self.beta * logps.policy_chosen / logps.chosen_tokens
        rejected = self.beta * logps.policy_rejected / logps.rejected_tokens
        losses = -F.logsigmoid(chosen - rejected - self.gamma)
        return losses, chosen.detach(), rejected.detach()


class ORPOLoss:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4–7): SFT loss plus an odds-ratio penalty.

    With ``p̄ = π/|y|`` the per-token average log-prob and ``odds(y) = P/(1 − P)`` for ``P = exp(p̄)``:

    ``loss = −p̄_w − λ log σ(log odds(y_w) − log odds(y_l))``

    where ``log odds = p̄ − log(1 − exp(p̄))``. The first term is the usual NLL on the chosen response;
    no reference model is involved. Rewards are ``λ p̄``.

    Args:
        beta: λ, the weight of the odds-ratio term (the paper's 0.1).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1) -> None:
        _check_beta(beta)
        self.beta = beta

    def __call__(self, logps: PreferenceLogProbs) -> LossOutput:
        chosen = logps.policy_chosen / logps.chosen_tokens
        rejected = logps.policy_rejected / logps.rejected_tokens
        # log(1 − exp(p)) for p < 0, computed stably (p → 0⁻ would give log(0) naively).
        log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
        losses = -chosen - self.beta * F.logsigmoid(log_odds)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


# Names a config can use; anything else is an import path to your own class.
LOSSES: dict[str, type] = {
    "dpo": DPOLoss,
    "robust_dpo": RobustDPOLoss,
    "ipo": IPOLoss,
    "hinge": HingeLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
}


def preference_loss_class(name: str) -> type:
    """A loss class from a built-in name (``dpo``, ``robust_dpo``, ``ipo``, ``hinge``, ``simpo``, ``orpo``) or an import path.

    Raises:
        ConfigError: naming the ``loss`` key, for an unknown name that is not an importable path.
    """
    from tunesmith.training.plugins import resolve

    return resolve(name, LOSSES, "loss")


def build_preference_loss(name: str, args: dict[str, Any]) -> Any:
    """An instance of ``preference_loss_class(name)`` with ``args``.

    Raises:
        ConfigError: For an unknown name that is not an import path, or arguments the class does not take.
    """
    from tunesmith.training.plugins import instantiate

    return instantiate(preference_loss_class(name), args)
