"""Each preference loss equals its paper's formula, written out here independently (plain Python
floats, one pair at a time), and trl's implementation where trl is installed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tunesmith.training.config import ConfigError
from tunesmith.training.preference_losses import (
    DPOLoss,
    HingeLoss,
    IPOLoss,
    ORPOLoss,
    PreferenceLogProbs,
    RobustDPOLoss,
    SimPOLoss,
    build_preference_loss,
)

# Fixed summed log-probs of 5 pairs (policy/reference × chosen/rejected) and response lengths.
PC = [-12.0, -30.5, -7.25, -50.0, -3.0]
PR = [-14.0, -28.0, -9.5, -41.0, -3.0]
RC = [-13.0, -29.0, -8.0, -47.5, -3.5]
RR = [-13.5, -29.5, -8.0, -44.0, -2.5]
NC = [6.0, 15.0, 4.0, 20.0, 2.0]
NR = [7.0, 12.0, 5.0, 18.0, 3.0]


def logps() -> PreferenceLogProbs:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return PreferenceLogProbs(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def margins() -> list[float]:
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def check(out, expected_losses, expected_chosen, expected_rejected):
    losses, chosen, rejected = out
    assert torch.allclose(losses, torch.tensor(expected_losses, dtype=torch.float64), atol=1e-10, rtol=1e-10)
    assert torch.allclose(chosen, torch.tensor(expected_chosen, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(rejected, torch.tensor(expected_rejected, dtype=torch.float64), atol=1e-10)
    assert not chosen.requires_grad and not rejected.requires_grad


def dpo_rewards(beta):
    return [beta * (p - r) for p, r in zip(PC, RC)], [beta * (p - r) for p, r in zip(PR, RR)]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_and_conservative_dpo(beta, eps):
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    check(DPOLoss(beta, eps)(logps()), expected, *dpo_rewards(beta))


def test_robust_dpo():
    beta, eps = 0.3, 0.1
    expected = [(-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in margins()]
    check(RobustDPOLoss(beta, eps)(logps()), expected, *dpo_rewards(beta))


def test_ipo_on_per_token_log_ratios():
    beta = 0.25
    expected = [((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2 for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR)]
    check(IPOLoss(beta)(logps()), expected, *dpo_rewards(beta))


def test_hinge():
    beta = 0.2
    check(HingeLoss(beta)(logps()), [max(0.0, 1 - beta * h) for h in margins()], *dpo_rewards(beta))


def test_simpo_is_reference_free_and_length_normalised():
    beta, gamma = 2.0, 0.7
    chosen = [beta * p / n for p, n in zip(PC, NC)]
    rejected = [beta * p / n for p, n in zip(PR, NR)]
    check(SimPOLoss(beta, gamma)(logps()), [-log_sigmoid(c - r - gamma) for c, r in zip(chosen, rejected)], chosen, rejected)
    assert SimPOLoss.needs_reference is False


def test_orpo_nll_plus_odds_ratio():
    lam = 0.1
    expected, chosen, rejected = [], [], []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR):
        a, b = pc / nc, pr / nr
        odds = lambda p: math.exp(p) / (1 - math.exp(p))  # noqa: E731
        expected.append(-a - lam * log_sigmoid(math.log(odds(a) / odds(b))))
        chosen.append(lam * a)
        rejected.append(lam * b)
    check(ORPOLoss(lam)(logps()), expected, chosen, rejected)
    assert ORPOLoss.needs_reference is False


def test_gradients_push_chosen_up_and_rejected_down():
    lp = logps()
    lp.policy_chosen.requires_grad_(True)
    lp.policy_rejected.requires_grad_(True)
    for loss in (DPOLoss(0.1), RobustDPOLoss(0.1, 0.1), IPOLoss(0.1), SimPOLoss(), ORPOLoss()):
        lp.policy_chosen.grad = lp.policy_rejected.grad = None
        loss(lp)[0].sum().backward()
        assert (lp.policy_chosen.grad <= 0).all() and (lp.policy_rejected.grad >= 0).all(), type(loss).__name__


def test_build_by_name_and_errors():
    assert isinstance(build_preference_loss("ipo", {"beta": 0.3}), IPOLoss)
    assert isinstance(build_preference_loss("tunesmith.training.preference_losses.HingeLoss", {}), HingeLoss)
    with pytest.raises(ConfigError, match="not one of dpo"):
        build_preference_loss("dpoo", {})
    with pytest.raises(ConfigError, match="do not fit DPOLoss"):
        build_preference_loss("dpo", {"gamma": 1.0})
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(label_smoothing=0.5)


# -- against trl -------------------------------------------------------------------------------------
def trl_cpo(loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    """trl's CPO loss (sigmoid / hinge / ipo / simpo on the log-probs it is given), without a trainer."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    fake = SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=simpo_gamma,
                           alpha=0.0, accelerator=SimpleNamespace(device="cpu"))
    return lambda chosen, rejected: cpo.CPOTrainer.cpo_loss(fake, chosen, rejected)


def test_dpo_family_matches_trl():
    lp = logps()
    ratio_c, ratio_r = lp.policy_chosen - lp.reference_chosen, lp.policy_rejected - lp.reference_rejected
    # Fed the policy/reference log-ratios, trl's sigmoid/hinge/ipo reduce to DPO (with cDPO smoothing), SLiC, IPO.
    for ours, (kind, beta, eps) in ((DPOLoss(0.3, 0.15), ("sigmoid", 0.3, 0.15)), (HingeLoss(0.2), ("hinge", 0.2, 0.0))):
        expected = trl_cpo(kind, beta, eps)(ratio_c, ratio_r)
        for a, b in zip(ours(lp), expected):
            assert torch.allclose(a, b, atol=1e-10), kind
    expected_ipo = trl_cpo("ipo", 0.25)(ratio_c / lp.chosen_tokens, ratio_r / lp.rejected_tokens)[0]
    assert torch.allclose(IPOLoss(0.25)(lp)[0], expected_ipo, atol=1e-10)


def test_simpo_matches_trl():
    lp = logps()
    beta, gamma = 2.0, 0.8
    expected = trl_cpo("simpo", beta, simpo_gamma=gamma)(lp.policy_chosen / lp.chosen_tokens,
                                                                 lp.policy_rejected / lp.rejected_tokens)
    for a, b in zip(SimPOLoss(beta, gamma)(lp), expected):
        assert torch.allclose(a, b, atol=1e-10)


def test_orpo_odds_ratio_term_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    lp = logps()
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    avg_c, avg_r = lp.policy_chosen / lp.chosen_tokens, lp.policy_rejected / lp.rejected_tokens
    trl_ratio_term, trl_chosen, trl_rejected, _, _ = orpo.ORPOTrainer.odds_ratio_loss(fake, avg_c, avg_r)
    losses, chosen, rejected = ORPOLoss(0.1)(lp)
    # trl returns λ·log σ(log odds ratio) and adds the NLL separately (token-averaged over the batch).
    assert torch.allclose(losses + avg_c, -trl_ratio_term.double(), atol=1e-6)
    assert torch.allclose(chosen, trl_chosen.double(), atol=1e-6) and torch.allclose(rejected, trl_rejected.double(), atol=1e-6)
