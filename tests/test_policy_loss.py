"""The per-token surrogate, the aggregation modes and the polarity metrics."""

import math

import pytest
import torch

from megatron_agpo.algorithms import (
    PolicyLossConfig,
    aggregate,
    kl_estimate,
    policy_loss,
    token_loss,
)
from megatron_agpo.algorithms.policy_loss import AGG_MODES
from megatron_agpo.registry import require_valid


def textbook_token_loss(lp, old, a, eps_low=0.2, eps_high=0.28, c=3.0):
    """PPO clip-higher + dual clip, one token, plain Python."""
    rho = math.exp(lp - old)
    l1 = -a * rho
    l2 = -a * min(max(rho, 1 - eps_low), 1 + eps_high)
    loss = max(l1, l2)
    if a < 0 and c is not None:
        loss = min(loss, -c * a)
    return loss


def sample(b=4, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return logp, old, adv, mask


def test_token_loss_matches_textbook():
    logp, old, adv, _ = sample()
    cfg = PolicyLossConfig()
    tl = token_loss(logp, old, adv[:, None].expand_as(logp), cfg)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            expect = textbook_token_loss(float(logp[i, j]), float(old[i, j]), float(adv[i]))
            assert tl.loss[i, j].item() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_dual_clip_caps_negative_advantage_loss():
    cfg = PolicyLossConfig()
    lp, old, a = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([-1.0])  # rho = e^2
    tl = token_loss(lp, old, a, cfg)
    assert tl.loss.item() == pytest.approx(3.0) and tl.dual_clipped.item()
    off = token_loss(lp, old, a, PolicyLossConfig(dual_clip_c=None))
    assert off.loss.item() == pytest.approx(math.exp(2.0))


def test_clip_higher_is_asymmetric():
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28)
    a = torch.tensor([1.0, 1.0])
    old = torch.zeros(2)
    lp = torch.log(torch.tensor([1.5, 1.1]))
    tl = token_loss(lp, old, a, cfg)
    assert tl.loss.tolist() == pytest.approx([-1.28, -1.1])
    assert tl.clipped.tolist() == [True, False]


def test_on_policy_gradient_is_minus_advantage():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.5, -2.0], dtype=torch.float64)
    token_loss(lp, None, a, PolicyLossConfig()).loss.sum().backward()
    assert lp.grad.tolist() == [-0.5, 2.0]


def test_kl_estimators_closed_form():
    lp = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -0.5], dtype=torch.float64)
    assert kl_estimate(lp, ref, "k1").tolist() == [0.5, 0.0]
    k3 = kl_estimate(lp, ref, "k3")
    assert k3[0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1) and k3[1].item() == 0.0


def test_kl_and_entropy_terms_add_to_the_loss():
    logp, old, adv, _ = sample()
    a = adv[:, None].expand_as(logp)
    ref = logp - 0.1
    ent = torch.rand_like(logp)
    base = token_loss(logp, old, a, PolicyLossConfig()).loss
    full = token_loss(
        logp,
        old,
        a,
        PolicyLossConfig(kl_coef=0.3, kl_estimator="k1", entropy_coef=0.01),
        entropy=ent,
        ref_logp=ref,
    ).loss
    assert torch.allclose(full, base + 0.3 * 0.1 - 0.01 * ent, atol=1e-12)


def test_truncated_importance_weight():
    logp, old, adv, _ = sample()
    a = adv[:, None].expand_as(logp)
    rollout = old + torch.linspace(-2, 2, logp.numel(), dtype=torch.float64).view_as(logp)
    tl = token_loss(logp, old, a, PolicyLossConfig(tis_cap=2.0), rollout_logp=rollout)
    w = torch.exp(old - rollout).clamp(max=2.0)
    assert torch.allclose(tl.loss, token_loss(logp, old, a, PolicyLossConfig()).loss * w)
    assert tl.tis_weight.max().item() == 2.0


def test_aggregation_modes_closed_forms():
    vals = torch.arange(12, dtype=torch.float64).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    vals[0, 3] = float("nan")  # padding garbage must not leak
    assert aggregate(vals, mask, "token-mean").item() == pytest.approx(
        (0 + 1 + 4 + 5 + 6 + 7 + 8) / 7
    )
    assert aggregate(vals, mask, "seq-mean-token-mean").item() == pytest.approx((0.5 + 5.5 + 8) / 3)
    assert aggregate(vals, mask, "seq-sum-constant").item() == pytest.approx(31 / (3 * 4))
    assert aggregate(vals, mask, "seq-sum-constant", 10).item() == pytest.approx(31 / 30)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gradcheck_float64(mode):
    logp, old, adv, mask = sample()
    cfg = PolicyLossConfig(agg_mode=mode, kl_coef=0.05, entropy_coef=0.01, eps_low=0.3)
    ref = logp.detach() + 0.2
    ent = torch.rand_like(logp).requires_grad_()
    # Keep ratios off the clip boundaries, where the loss is not differentiable.
    lp = logp.clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, h: policy_loss(x, old, adv, mask, cfg, entropy=h, ref_logp=ref)[0], (lp, ent)
    )


def test_polarity_metrics_split():
    logp, old, adv, mask = sample()
    adv = torch.tensor([1.0, -1.0, 0.0, -0.5], dtype=torch.float64)
    ent = torch.rand_like(logp)
    loss, m = policy_loss(logp, old, adv, mask, PolicyLossConfig(), entropy=ent)
    assert m["pos/tokens"] == 4 and m["neg/tokens"] == 6 + 6 and m["all/tokens"] == 4 + 6 + 1 + 6
    pos_ent = (ent[0, :4]).mean().item()
    assert m["pos/entropy"] == pytest.approx(pos_ent)
    tl = token_loss(logp, old, adv[:, None].expand_as(logp), PolicyLossConfig())
    neg = torch.cat([tl.loss[1], tl.loss[3]])
    assert m["neg/loss"] == pytest.approx(neg.mean().item())
    assert m["neg/clip_frac"] == pytest.approx(
        torch.cat([tl.clipped[1], tl.clipped[3]]).double().mean().item()
    )


def test_shape_mismatch_names_both_shapes():
    logp, old, adv, mask = sample()
    with pytest.raises(ValueError, match=r"logp\[4, 6\], mask\[4, 5\]"):
        policy_loss(logp, old, adv, mask[:, :5], PolicyLossConfig())
    with pytest.raises(ValueError, match=r"advantages\[3\].*mask\[4, 6\]"):
        policy_loss(logp, old, adv[:3], mask, PolicyLossConfig())
    with pytest.raises(ValueError, match=r"logp\[4, 6\], old_logp\[4, 5\]"):
        token_loss(logp, old[:, :5], logp, PolicyLossConfig())


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="agg_mode='mean'"):
        require_valid(PolicyLossConfig(agg_mode="mean"), "algorithm.loss.")
    with pytest.raises(ValueError, match="eps_low=1.5"):
        require_valid(PolicyLossConfig(eps_low=1.5), "algorithm.loss.")
