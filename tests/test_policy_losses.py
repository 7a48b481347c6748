"""Each GRPO-family loss equals its paper's formula, written out here independently (plain Python,
token by token); group advantages; and, on a tiny model, the one-update-per-batch case: ratio
exactly 1 and the surrogate's gradient equal to REINFORCE's with the group baseline."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.models import apply_lora
from tunesmith.models.llama import Llama, LlamaConfig
from tunesmith.training.config import ConfigError
from tunesmith.training.grpo import Group, completion_logprobs, rollout_batch, token_logprobs
from tunesmith.training.policy_losses import (
    DAPOLoss,
    DrGRPOLoss,
    GRPOLoss,
    PolicyLogProbs,
    build_policy_loss,
    group_advantages,
)

# Three completions of lengths 4, 2, 3 (padding after), token log-probs under π_θ, π_old, π_ref.
LENGTHS = [4, 2, 3]
POLICY = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 0.0, 0.0], [-0.7, -0.05, -3.0, 0.0]]
OLD = [[-1.3, -0.4, -1.5, -0.32], [-0.3, -0.9, 0.0, 0.0], [-0.2, -0.06, -2.9, 0.0]]
REF = [[-0.9, -0.8, -2.5, -0.3], [-0.5, -1.0, 0.0, 0.0], [-0.6, -0.2, -2.0, 0.0]]
ADV = [1.5, -0.8, -0.4]
L = 6  # max_new_tokens


def inputs() -> PolicyLogProbs:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    mask = t([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    return PolicyLogProbs(policy=t(POLICY), old=t(OLD), reference=t(REF), advantages=t(ADV), mask=mask,
                          step_completions=3, step_tokens=sum(LENGTHS), max_new_tokens=L)


def token_loss(i: int, t: int, eps_low: float, eps_high: float, beta: float) -> float:
    """ℓ_t = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β(e^r − r − 1), r = log π_ref − log π_θ."""
    ratio = math.exp(POLICY[i][t] - OLD[i][t])
    a = ADV[i]
    surrogate = min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
    r = REF[i][t] - POLICY[i][t]
    return -surrogate + beta * (math.exp(r) - r - 1)


def clip_active(i: int, t: int, eps_low: float, eps_high: float) -> bool:
    ratio = math.exp(POLICY[i][t] - OLD[i][t])
    return (ratio < 1 - eps_low and ADV[i] < 0) or (ratio > 1 + eps_high and ADV[i] > 0)


def expected_clipped(eps_low, eps_high):
    return torch.tensor([[t < n and clip_active(i, t, eps_low, eps_high) for t in range(4)] for i, n in enumerate(LENGTHS)])


def test_grpo_is_the_mean_over_completions_of_each_completions_token_mean():
    beta, eps = 0.04, 0.2
    expected = sum(sum(token_loss(i, t, eps, eps, beta) for t in range(n)) / n for i, n in enumerate(LENGTHS)) / 3
    loss, clipped = GRPOLoss(beta=beta, epsilon=eps)(inputs())
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(clipped, expected_clipped(eps, eps))
    assert clipped.any()  # the fixture does exercise the clip (token 0 of row 0: ρ = e^0.3 > 1.2, A > 0)


def test_dr_grpo_divides_by_completions_times_max_new_tokens():
    beta, eps = 0.1, 0.2
    expected = sum(token_loss(i, t, eps, eps, beta) for i, n in enumerate(LENGTHS) for t in range(n)) / (3 * L)
    loss, clipped = DrGRPOLoss(beta=beta, epsilon=eps)(inputs())
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(clipped, expected_clipped(eps, eps))
    assert not DrGRPOLoss.scale_rewards and GRPOLoss.scale_rewards and DAPOLoss.scale_rewards


def test_dapo_is_a_token_mean_with_asymmetric_clip():
    lo, hi = 0.2, 0.28
    expected = sum(token_loss(i, t, lo, hi, 0.0) for i, n in enumerate(LENGTHS) for t in range(n)) / sum(LENGTHS)
    loss, clipped = DAPOLoss(epsilon_low=lo, epsilon_high=hi)(inputs())
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(clipped, expected_clipped(lo, hi))
    # ρ = e^0.22 = 1.25 (row 0, token 3) is clipped at 1.2 but not at 1.28: the upper range really is ε_high.
    assert not torch.equal(expected_clipped(lo, hi), expected_clipped(lo, lo))


def test_beta_zero_needs_no_reference_and_drops_the_kl_term():
    assert GRPOLoss(beta=0.0).needs_reference is False and GRPOLoss().needs_reference is True
    assert DAPOLoss().needs_reference is False and DrGRPOLoss(beta=0.5).needs_reference is True
    x = inputs()
    no_kl, _ = GRPOLoss(beta=0.0)(x)
    x.reference = x.reference + 5.0  # a different reference changes nothing without the KL term
    assert GRPOLoss(beta=0.0)(x)[0].item() == no_kl.item()
    assert torch.all(inputs().kl()[inputs().mask > 0] >= 0)  # the k3 estimator is never negative


def test_group_advantages_formula_and_zero_variance_groups():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of [0, 1, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))  # exactly 0, no NaN
    std3 = math.sqrt((2.25**2 + 3 * 0.75**2) / 3)
    assert torch.allclose(adv[3], torch.tensor([2.25, -0.75, -0.75, -0.75]) / (std3 + 1e-4))
    assert torch.equal(group_advantages(rewards, scale=False)[0], torch.tensor([-0.5, 0.5, -0.5, 0.5]))
    assert not torch.isnan(adv).any()


def test_unknown_loss_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="grpo, dr_grpo, dapo"):
        build_policy_loss("ppo", {})
    with pytest.raises(ConfigError, match="loss_args"):
        build_policy_loss("grpo", {"gamma": 1.0})
    assert isinstance(build_policy_loss("dapo", {"epsilon_high": 0.3}), DAPOLoss)


# ---------------------------------------------------------------------------------------------
# On a tiny model: log-probs, ratio 1 and the REINFORCE gradient
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy() -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64, max_seq_len=64))
    apply_lora(model, ["q_proj", "v_proj", "output"], rank=4, alpha=8.0)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so its gradient involves every layer
    return model


def rollout(G: int = 4) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    groups = []
    for prompt_len in (5, 3):
        prompt = torch.randint(0, 50, (prompt_len,), generator=g).tolist()
        completions = [torch.randint(0, 50, (int(n),), generator=g).tolist()
                       for n in torch.randint(1, 7, (G,), generator=g)]
        groups.append(Group({"prompt_ids": prompt}, completions, [""] * G))
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]])
    return groups, rewards


def test_completion_logprobs_are_log_softmax_of_each_completion_token(policy):
    groups, rewards = rollout()
    batch = rollout_batch(groups, group_advantages(rewards), pad_id=0)
    with torch.no_grad():
        got = completion_logprobs(policy, batch, chunk_size=3)  # chunked: 3 positions at a time
        for row, (g, c) in enumerate((g, c) for g in groups for c in g.completions):
            tokens = torch.tensor([g.item["prompt_ids"] + c])
            logp = torch.log_softmax(policy(tokens)[0].float(), dim=-1)
            p = len(g.item["prompt_ids"])
            expected = torch.stack([logp[p - 1 + j, tok] for j, tok in enumerate(c)])
            assert torch.allclose(got[row, :len(c)], expected, atol=1e-5)
            assert torch.all(got[row, len(c):] == 0)
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    labels = torch.tensor([[3, -100, 7, 1, -100], [-100, 4, 4, 9, 2]])
    chunked = token_logprobs(hidden, labels, policy.logits, chunk_size=2)
    whole = token_logprobs(hidden, labels, policy.logits, chunk_size=0)
    assert torch.allclose(chunked, whole, atol=1e-6)
    g1 = torch.autograd.grad(chunked.sum(), hidden)[0]
    g2 = torch.autograd.grad(whole.sum(), hidden)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("loss_cls", [GRPOLoss, DrGRPOLoss, DAPOLoss])
def test_one_update_per_batch_is_reinforce_with_the_group_baseline(policy, loss_cls):
    groups, rewards = rollout()
    loss_fn = loss_cls(beta=0.0)
    adv = group_advantages(rewards, scale=loss_fn.scale_rewards)
    batch = rollout_batch(groups, adv, pad_id=0)
    params = [p for p in policy.parameters() if p.requires_grad]
    logps = completion_logprobs(policy, batch)
    n, T, lengths = logps.shape[0], int(batch["mask"].sum()), batch["mask"].sum(dim=1)
    x = PolicyLogProbs(policy=logps, old=logps.detach(), reference=torch.zeros_like(logps), advantages=batch["advantages"],
                       mask=batch["mask"], step_completions=n, step_tokens=T, max_new_tokens=6)
    assert torch.equal(x.ratio(), torch.ones_like(logps))  # exactly 1: π_old is the policy itself
    loss, clipped = loss_fn(x)
    assert not clipped.any()
    surrogate_grad = torch.autograd.grad(loss, params)

    # REINFORCE: ∇ −Σ_i w_i A_i log π(o_i), A_i = r_i − mean(group) (÷ std for GRPO/DAPO), the loss's weights w_i.
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1)
    if loss_fn.scale_rewards:
        centred = centred / (rewards.std(dim=1, keepdim=True).repeat(1, 4).reshape(-1) + 1e-4)
    weights = {GRPOLoss: 1 / (n * lengths), DrGRPOLoss: torch.full((n,), 1 / (n * 6)), DAPOLoss: torch.full((n,), 1 / T)}
    sequence_logp = (completion_logprobs(policy, batch) * batch["mask"]).sum(dim=1)
    reinforce = -(weights[loss_cls] * centred * sequence_logp).sum()
    reinforce_grad = torch.autograd.grad(reinforce, params)
    for a, b in zip(surrogate_grad, reinforce_grad):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert any(a.abs().max() > 0 for a in surrogate_grad)
