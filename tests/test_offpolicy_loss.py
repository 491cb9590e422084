"""The off-policy (decoupled PPO) objective: behaviour = the engine's per-token log-probs,
proximal = the trainer's recomputed old log-probs, the clipped AGPO surrogate on the proximal
ratio times a truncated or masked importance weight proximal / behaviour.

Checked against the formula written out here token by token in float64 (value and gradient),
through `token_loss` / `policy_loss` and through the fused ops (both producers), and exact
(bit for bit) against today's loss when nothing is stale (k = 0)."""

import math

import pytest
import torch

from megatron_agpo.algorithms import (
    PolicyLossConfig,
    importance_weight,
    importance_weight_stats,
    policy_loss,
    token_loss,
)
from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss

EPS_LOW, EPS_HIGH, DUAL_C, CAP = 0.2, 0.28, 3.0, 2.0


def _token_reference(logp, prox, behav, adv, mode, cap=CAP, low=None):
    """(L_t, dL_t/dlogp_t) for one token, in Python floats: the decoupled objective as
    AReaL writes it, with AGPO's clip-higher and dual clip."""
    r = math.exp(max(-20.0, min(20.0, logp - prox)))
    clipped_r = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
    unclipped, clipped = -adv * r, -adv * clipped_r
    surr = max(unclipped, clipped)
    in_range = 1 - EPS_LOW <= r <= 1 + EPS_HIGH
    grad = -adv * r if (in_range or unclipped > clipped) else 0.0
    if adv < 0 and surr > -DUAL_C * adv:
        surr, grad = -DUAL_C * adv, 0.0
    w = math.exp(prox - behav)
    if mode == "truncate":
        w = min(w, cap)
    elif not (w <= cap and (low is None or w >= low)):
        w = 0.0
    return w * surr, w * grad


def _problem(seed, b=6, t=9, stale=0.6):
    g = torch.Generator().manual_seed(seed)
    prox = -2.0 * torch.rand(b, t, generator=g, dtype=torch.float64) - 0.05
    logp = prox + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    # Behaviour log-probs of older versions: spread so that weights fall on both sides of
    # the cap and below a lower bound.
    behav = prox + stale * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    for i, n in enumerate(torch.randint(1, t + 1, (b,), generator=g).tolist()):
        mask[i, n:] = 0
    return logp, prox, behav, adv, mask


@pytest.mark.parametrize("mode,low", [("truncate", None), ("mask", None), ("mask", 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_loss_equals_the_decoupled_formula(mode, low, seed):
    logp, prox, behav, adv, mask = _problem(seed)
    cfg = PolicyLossConfig(tis_cap=CAP, tis_mode=mode, tis_low=low)
    a = adv[:, None].expand_as(logp)
    x = logp.clone().requires_grad_()
    tl = token_loss(x, prox, a, cfg, rollout_logp=behav)
    tl.loss.sum().backward()
    ref = [
        _token_reference(lp, p, bh, ad, mode, low=low)
        for lp, p, bh, ad in zip(logp.flatten().tolist(), prox.flatten().tolist(),
                                 behav.flatten().tolist(), a.flatten().tolist(), strict=True)
    ]  # fmt: skip
    ref_loss = torch.tensor([r[0] for r in ref], dtype=torch.float64).view_as(logp)
    ref_grad = torch.tensor([r[1] for r in ref], dtype=torch.float64).view_as(logp)
    torch.testing.assert_close(tl.loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-12, atol=1e-12)
    w = torch.exp(prox - behav)
    bounded = (w > CAP) if mode == "truncate" else ~((w <= CAP) & (w >= (low or 0.0)))
    assert bounded.any() and not bounded.all()  # the data exercise both sides
    assert torch.equal(tl.tis_bounded, bounded)

    # Aggregated (token-mean), the unfused path the trainer's fused loss is checked against.
    y = logp.clone().requires_grad_()
    loss, metrics = policy_loss(y, prox, adv, mask, cfg, rollout_logp=behav)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(loss.detach(), (ref_loss * mask).sum() / n, rtol=1e-12, atol=0)
    torch.testing.assert_close(y.grad, ref_grad * mask / n, rtol=1e-12, atol=1e-15)
    share = float((bounded.double() * mask).sum() / n)
    assert metrics["all/tis_bounded"] == pytest.approx(share, abs=1e-15)


def test_k0_is_todays_loss_bit_for_bit():
    """max_staleness=0 (or overlap off): the default objective is the loss as it was before
    the off-policy objective existed (its expression, frozen here), bit for bit; and when
    the engine's log-probs equal the trainer's the weight is exactly 1, so the loss is the
    plain clipped surrogate."""
    logp, prox, behav, adv, _ = _problem(3, stale=0.05)
    a = adv[:, None].expand_as(logp)
    cfg = PolicyLossConfig()
    assert cfg.tis_mode == "truncate" and cfg.tis_cap == 2.0
    tl = token_loss(logp, prox, a, cfg, rollout_logp=behav)
    # Today's loss (before this change), literally: surrogate, dual clip, then TIS.
    ratio = torch.exp((logp - prox).clamp(-20.0, 20.0))
    surr = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    surr = torch.where((a < 0) & (surr > -a * 3.0), -a * 3.0, surr)
    today = surr * torch.exp(prox - behav).clamp(max=2.0)
    assert torch.equal(tl.loss, today)
    # No gap between engine and trainer: w = exp(0) = 1 exactly, in both modes.
    for mode in ("truncate", "mask"):
        on = token_loss(logp, prox, a, PolicyLossConfig(tis_mode=mode), rollout_logp=prox)
        assert torch.equal(on.tis_weight, torch.ones_like(logp))
        assert torch.equal(on.loss, surr)
    # Nothing above the cap: masking and truncating are the same weight, bit for bit.
    big = PolicyLossConfig(tis_cap=1e6)
    masked = token_loss(logp, prox, a, PolicyLossConfig(tis_cap=1e6, tis_mode="mask"),
                        rollout_logp=behav)  # fmt: skip
    assert torch.equal(masked.loss, token_loss(logp, prox, a, big, rollout_logp=behav).loss)


def _fused_reference(z, target, adv, prox, behav, mode, low):
    """Token-mean of the decoupled objective and its gradient in the logits, by hand:
    dL/dz = dL/dlogp * (onehot - softmax)."""
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1).gather(1, target[:, None])[:, 0]
    ref = [
        _token_reference(lp, pr, bh, ad, mode, low=low)
        for lp, pr, bh, ad in zip(logp.tolist(), prox.tolist(), behav.tolist(), adv.tolist(),
                                  strict=True)
    ]  # fmt: skip
    n = z.shape[0]
    loss = sum(r[0] for r in ref) / n
    g = torch.tensor([r[1] for r in ref], dtype=torch.float64) / n
    onehot = torch.nn.functional.one_hot(target, z.shape[1]).double()
    return loss, g[:, None] * (onehot - p), logp


def _fused_problem(seed, n=40, v=37, h=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = 0.7 * torch.randn(v, h, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, target[:, None])[:, 0]
    prox = lp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    behav = prox + 0.6 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, target, adv, prox, behav


@pytest.mark.parametrize("mode,low", [("truncate", None), ("mask", None), ("mask", 0.5)])
def test_fused_ops_equal_the_decoupled_formula(mode, low):
    hidden, weight, target, adv, prox, behav = _fused_problem(4)
    cfg = PolicyLossConfig(tis_mode=mode, tis_low=low)
    ref_loss, ref_gz, ref_logp = _fused_reference(
        hidden @ weight.t(), target, adv, prox, behav, mode, low
    )
    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(
        z, target, adv, cfg, old_logp=prox, rollout_logp=behav, chunk_size=7
    )
    out.loss.mean().backward()
    torch.testing.assert_close(out.logp.detach(), ref_logp, rtol=1e-12, atol=1e-12)
    assert abs(float(out.loss.detach().mean()) - ref_loss) < 1e-12
    torch.testing.assert_close(z.grad, ref_gz, rtol=1e-10, atol=1e-13)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(
        h, w, target, adv, cfg, old_logp=prox, rollout_logp=behav, vocab_chunk_size=10
    )
    out2.loss.mean().backward()
    assert abs(float(out2.loss.detach().mean()) - ref_loss) < 1e-12
    torch.testing.assert_close(h.grad, ref_gz @ weight, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(w.grad, ref_gz.t() @ hidden, rtol=1e-10, atol=1e-13)


def test_fused_k0_is_todays_fused_loss_bit_for_bit():
    """The fused op at k=0 (default config, the engine's log-probs a rounding away from the
    trainer's): its per-token loss is today's expression on its own log-probs, bit for bit."""
    hidden, weight, target, adv, prox, behav = _fused_problem(5)
    behav = prox + 0.01 * (behav - prox)  # k = 0: the engine's numerics, same version
    z1 = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z1, target, adv, PolicyLossConfig(), old_logp=prox,
                                         rollout_logp=behav)  # fmt: skip
    out.loss.sum().backward()
    ratio = torch.exp((out.logp.detach() - prox).clamp(-20.0, 20.0))
    a = adv
    surr = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    surr = torch.where((a < 0) & (surr > -a * 3.0), -a * 3.0, surr)
    assert torch.equal(out.loss.detach(), surr * torch.exp(prox - behav).clamp(max=2.0))


def test_importance_weight_and_its_statistics():
    prox = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    behav = torch.log(torch.tensor([1.0, 0.25, 0.5, 4.0, 0.1], dtype=torch.float64)).neg()
    # raw weights exp(prox - behav): 1, 0.25, 0.5, 4, 0.1 -> reversed sign of log
    raw = torch.exp(prox - behav)
    torch.testing.assert_close(raw, torch.tensor([1.0, 0.25, 0.5, 4.0, 0.1], dtype=torch.float64))
    w, b = importance_weight(prox, behav, PolicyLossConfig(tis_cap=2.0))
    assert w.tolist() == pytest.approx([1.0, 0.25, 0.5, 2.0, 0.1], abs=1e-15)
    assert b.tolist() == [False, False, False, True, False]
    w, b = importance_weight(prox, behav, PolicyLossConfig(tis_cap=2.0, tis_mode="mask",
                                                            tis_low=0.3))  # fmt: skip
    assert w.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.0], abs=1e-15)
    mask = torch.tensor([1, 1, 1, 1, 0])
    s = importance_weight_stats(prox, behav, mask, PolicyLossConfig(tis_cap=2.0, tis_mode="mask",
                                                                     tis_low=0.3))  # fmt: skip
    assert s["is/raw_mean"] == pytest.approx((1 + 0.25 + 0.5 + 4) / 4)
    assert s["is/raw_max"] == pytest.approx(4.0)
    assert s["is/weight_mean"] == pytest.approx(1.5 / 4)
    assert s["is/masked"] == pytest.approx(0.5)
    s = importance_weight_stats(prox, behav, mask, PolicyLossConfig())
    assert s["is/truncated"] == pytest.approx(0.25)
    assert s["is/weight_max"] == pytest.approx(2.0)


def test_config_problems_name_the_key():
    assert PolicyLossConfig().problems("algorithm.loss.") == []
    bad = PolicyLossConfig.__new__(PolicyLossConfig)
    bad.__dict__.update(PolicyLossConfig().__dict__, tis_mode="clip", tis_low=5.0)
    found = bad.problems("algorithm.loss.")
    assert found[0].startswith("algorithm.loss.tis_mode='clip'")
    assert any(f.startswith("algorithm.loss.tis_low=5.0 must be below tis_cap=2.0") for f in found)


def _triton_body(rank, world):
    from megatron_agpo.ops import triton_agpo

    assert triton_agpo.interpreted()
    triton_agpo.BLOCK = 16  # several blocks per row
    for mode, low in (("truncate", None), ("mask", 0.5)):
        hidden, weight, target, adv, prox, behav = _fused_problem(6)
        cfg = PolicyLossConfig(tis_mode=mode, tis_low=low)
        ref_loss, ref_gz, _ = _fused_reference(
            hidden @ weight.t(), target, adv, prox, behav, mode, low
        )
        z = (hidden @ weight.t()).float().requires_grad_()
        out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, old_logp=prox,
                                             rollout_logp=behav, producer="triton")  # fmt: skip
        out.loss.mean().backward()
        # float32 logits: float32's rounding of the float64 formula.
        assert abs(float(out.loss.detach().mean()) - ref_loss) < 1e-5
        torch.testing.assert_close(z.grad.double(), ref_gz, rtol=1e-4, atol=1e-6)


def test_triton_producer_equals_the_decoupled_formula():
    pytest.importorskip("triton")
    from tests.dist_utils import run_distributed
    from tests.test_fused_loss_triton import _interpreter_env

    with _interpreter_env():
        run_distributed(_triton_body, 1)
