"""Policy-gradient losses for GRPO-style online RL, one small class per paper.

Every loss has the same call signature, so the recipe never changes when you swap one::

    loss_fn(x: PolicyLogProbs) -> (loss, clipped)

``PolicyLogProbs`` holds, for one micro-batch of sampled completions, token by token ([r, t]: r
completions, t = the longest one): the log-probability of each sampled token under the policy
being trained (with grad), under the policy that sampled it (``old``), and under the reference
model; each completion's advantage; and a mask of real (non-padding) tokens. ``loss`` is this
micro-batch's share of the optimizer step's loss: the recipe sums the shares of all micro-batches
(``loss.backward()`` on each), so every loss normalises by counts of the whole step, which
``PolicyLogProbs`` also carries. ``clipped`` [r, t] marks the tokens whose gradient the clip
removed (logged as the clip fraction).

Two attributes tell the recipe what to prepare:

- ``needs_reference``: compute reference log-probs (one no-grad pass with the LoRA adapters off);
  False (e.g. ``beta=0``) skips that pass and ``reference`` is zeros.
- ``scale_rewards``: divide each group's centred rewards by the group's standard deviation when
  turning rewards into advantages (``group_advantages``); Dr. GRPO does not.

Pick one by name (``loss=dapo loss_args.epsilon_high=0.28``) or write your own class in a file of
yours and name it by import path (``loss=my_losses.MyLoss``); its constructor's keyword arguments
come from ``loss_args``.

Notation: ``ρ_t = π_θ(o_t) / π_old(o_t)`` the token's importance ratio, ``A`` the completion's
advantage, ``ε`` the clip range, ``|o|`` a completion's length, ``G`` completions per prompt, ``N``
completions in the step, ``T`` completion tokens in the step, ``L`` = ``max_new_tokens``.
The per-token objective shared by all three is PPO's clipped surrogate plus a KL penalty::

    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β KL_t
    KL_t = exp(r_t) − r_t − 1,   r_t = log π_ref(o_t) − log π_θ(o_t)     (Schulman's k3 estimator, ≥ 0)

and they differ in how the ℓ_t are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class PolicyLogProbs:
    """One micro-batch of sampled completions, token by token (every tensor [r, t] unless noted).

    Attributes:
        policy: log π_θ(o_t | q, o_<t) of each sampled token under the policy being trained, with grad.
        old: The same under the policy that sampled the completions (no grad). With one update per
            batch of samples it is ``policy.detach()``, so every ratio is exactly 1.
        reference: The same under the reference model (no grad); zeros when the loss needs none.
        advantages: [r] each completion's advantage.
        mask: 1.0 on completion tokens, 0.0 on padding (float, same dtype as ``policy``).
        step_completions: N, completions in the whole optimizer step (all micro-batches).
        step_tokens: T, completion tokens in the whole optimizer step.
        max_new_tokens: L, the sampling length limit (Dr. GRPO's constant normaliser).
    """

    policy: Tensor
    old: Tensor
    reference: Tensor
    advantages: Tensor
    mask: Tensor
    step_completions: int
    step_tokens: int
    max_new_tokens: int

    def ratio(self) -> Tensor:
        """ρ_t = π_θ / π_old per token [r, t]."""
        return torch.exp(self.policy - self.old)

    def kl(self) -> Tensor:
        """Per-token KL(π_θ ‖ π_ref) estimate [r, t]: ``exp(r) − r − 1`` with ``r = log π_ref − log π_θ``."""
        r = self.reference - self.policy
        return torch.exp(r) - r - 1


def clipped_surrogate(x: PolicyLogProbs, epsilon_low: float, epsilon_high: float, beta: float) -> tuple[Tensor, Tensor]:
    """Per-token ℓ_t (see the module docstring) [r, t] and the tokens whose clip is active [r, t] (bool).

    A token is clipped when the ratio left the trust region in the direction the advantage pushes
    it (ρ < 1 − ε_low with A < 0, or ρ > 1 + ε_high with A > 0): its gradient is then zero.
    """
    ratio = x.ratio()
    adv = x.advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)
    if beta != 0:
        per_token = per_token + beta * x.kl()
    is_clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return per_token, is_clipped & (x.mask > 0)


class GRPOLoss:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Eq. 3): sequence-mean of token losses.

    ``loss = (1/N) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}``, advantages ``(r − mean_G) / (std_G + 1e-4)``.

    Args:
        beta: KL penalty weight β (the paper's 0.04); 0 drops the reference pass.
        epsilon: Symmetric clip range ε.
    """

    scale_rewards = True

    def __init__(self, beta: float = 0.04, epsilon: float = 0.2) -> None:
        self.beta, self.epsilon = beta, epsilon
        self.needs_reference = beta != 0

    def __call__(self, x: PolicyLogProbs) -> tuple[Tensor, Tensor]:
        per_token, clipped = clipped_surrogate(x, self.epsilon, self.epsilon, self.beta)
        per_sequence = (per_token * x.mask).sum(dim=1) / x.mask.sum(dim=1).clamp(min=1)
        return per_sequence.sum() / x.step_completions, clipped


class DrGRPOLoss:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, Eq. 4).

    GRPO without its two biases: no division by each completion's length (which favours long wrong
    answers) and no division by the group's reward std (``scale_rewards = False``):
    ``loss = (1/(N L)) Σ_i Σ_t ℓ_{i,t}``, advantages ``r − mean_G``. With one update per batch its
    gradient is exactly REINFORCE's with the group mean as baseline.

    Args:
        beta: KL penalty weight (0 in the paper: no reference pass).
        epsilon: Symmetric clip range ε.
    """

    scale_rewards = False

    def __init__(self, beta: float = 0.0, epsilon: float = 0.2) -> None:
        self.beta, self.epsilon = beta, epsilon
        self.needs_reference = beta != 0

    def __call__(self, x: PolicyLogProbs) -> tuple[Tensor, Tensor]:
        per_token, clipped = clipped_surrogate(x, self.epsilon, self.epsilon, self.beta)
        return (per_token * x.mask).sum() / (x.step_completions * x.max_new_tokens), clipped


class DAPOLoss:
    """DAPO (Yu et al. 2025, arXiv:2503.14476, Eq. 8): token-level mean and clip-higher.

    Every token of the step weighs the same, so long completions count by their length:
    ``loss = (1/T) Σ_i Σ_t ℓ_{i,t}``, with an asymmetric clip range (``ε_high > ε_low`` lets
    unlikely tokens with positive advantage grow, against entropy collapse).

    Args:
        beta: KL penalty weight (DAPO drops the KL term: 0).
        epsilon_low: Lower clip range (the paper's 0.2).
        epsilon_high: Upper clip range (the paper's 0.28).
    """

    scale_rewards = True

    def __init__(self, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.28) -> None:
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.needs_reference = beta != 0

    def __call__(self, x: PolicyLogProbs) -> tuple[Tensor, Tensor]:
        per_token, clipped = clipped_surrogate(x, self.epsilon_low, self.epsilon_high, self.beta)
        return (per_token * x.mask).sum() / max(1, x.step_tokens), clipped


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Advantages from rewards [p, G] (p prompts × G completions each): each group centred on its mean.

    ``A = r − mean_G`` and, with ``scale``, ``A / (std_G + eps)`` (std with Bessel's correction, as in
    TRL). A group whose rewards are all equal carries no signal: its advantages are exactly 0.

    Returns:
        [p, G] advantages.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    same = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(same, torch.zeros_like(centred), centred)


# Names a config can use; anything else is an import path to your own class.
LOSSES: dict[str, type] = {"grpo": GRPOLoss, "dr_grpo": DrGRPOLoss, "dapo": DAPOLoss}


def policy_loss_class(name: str) -> type:
    """The class of a built-in name (``grpo``, ``dr_grpo``, ``dapo``) or of an import path.

    Raises:
        ConfigError: naming the ``loss`` key, for an unknown name that is not an importable path.
    """
    from tunesmith.training.plugins import resolve

    return resolve(name, LOSSES, "loss")


def build_policy_loss(name: str, args: dict[str, Any]) -> Any:
    """A loss from a built-in name (``grpo``, ``dr_grpo``, ``dapo``) or an import path, built with ``args``.

    Raises:
        ConfigError: For an unknown name that is not an import path, or arguments the class does not take.
    """
    from tunesmith.training.plugins import instantiate

    return instantiate(policy_loss_class(name), args)
