"""The algorithms verl users bring, each against a float64 reference written from its paper.

RLOO (Ahmadian et al., 2024), REINFORCE++ with baseline (Hu et al., 2025), GSPO (Zheng et al.,
2025), Dr. GRPO's constant normaliser (Liu et al., 2025), the token-sum aggregations, the one
rule for fully masked rows, and verl's clamp of the k3 estimator.
"""

import math

import pytest
import torch

from megatron_agpo.algorithms import (
    PolicyLossConfig,
    advantages,
    aggregate,
    informative_groups,
    kl_estimate,
    policy_loss,
    resolve,
    token_loss,
    whiten,
)
from megatron_agpo.algorithms.policy_loss import (
    AGG_MODES,
    aggregation_weights,
    resolve_norm_constant,
    sequence_log_ratio,
    sequence_log_ratio_flat,
)
from megatron_agpo.registry import require_valid


def rewards(n_groups: int, g: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(n_groups * g, generator=gen, dtype=torch.float64)
    r[:g] = 0.0  # one constant group
    return r


# ---------------------------------------------------------------- advantage estimators


def rloo_reference(r: list[float], g: int) -> list[float]:
    # Ahmadian et al. (2024), eq. for RLOO: A_i = r_i - 1/(k-1) * sum_{j != i} r_j.
    out = []
    for k in range(0, len(r), g):
        grp = r[k : k + g]
        out += [grp[i] - sum(grp[j] for j in range(g) if j != i) / (g - 1) for i in range(g)]
    return out


@pytest.mark.parametrize("g", [2, 3, 8])
def test_rloo_matches_paper(g):
    r = rewards(5, g)
    expect = torch.tensor(rloo_reference(r.tolist(), g), dtype=torch.float64)
    torch.testing.assert_close(advantages(r, g, "rloo"), expect, rtol=0, atol=1e-13)


def reinforce_pp_reference(r: list[float], g: int, eps: float = 1e-6) -> list[float]:
    # Hu et al. (2025), REINFORCE++-baseline: A = r - mean_group(r), then normalised over the
    # global batch, A_norm = (A - mean_batch(A)) / std_batch(A). The batch is the groups that
    # carry signal (docs/ALGORITHM.md, as verl with DAPO's group filter: advantages after the
    # filter); a group whose rewards are all equal gets 0 and is not in the statistics.
    centred, live = [], []
    for k in range(0, len(r), g):
        grp = r[k : k + g]
        mu = sum(grp) / g
        centred += [x - mu for x in grp]
        live += [len(set(grp)) > 1] * g
    vals = [x for x, keep in zip(centred, live, strict=True) if keep]
    if not vals:
        return [0.0] * len(r)
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1))
    return [(x - mean) / (sd + eps) if keep else 0.0 for x, keep in zip(centred, live, strict=True)]


@pytest.mark.parametrize("g", [2, 4, 8])
def test_reinforce_pp_baseline_matches_paper(g):
    r = rewards(6, g, seed=g)
    expect = torch.tensor(reinforce_pp_reference(r.tolist(), g), dtype=torch.float64)
    a = advantages(r, g, "reinforce_pp")
    torch.testing.assert_close(a, expect, rtol=0, atol=1e-12)
    assert torch.all(a[:g] == 0)  # the constant group
    assert a[g:].std().item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- GSPO


def gspo_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.25 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2], dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    mask[4, 5:] = 0
    old[1, 5] = old[1, 6] = float("nan")  # padding garbage must not leak
    return logp, old, adv, mask


def gspo_reference_loss(logp, old, adv, mask, eps_low, eps_high):
    # Zheng et al. (2025), eq. (5)-(7), written per sequence:
    #   s_i = exp(1/|y_i| sum_t log(pi(y_it) / pi_old(y_it)))
    #   J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i);  loss = -J
    terms = []
    for i in range(logp.shape[0]):
        idx = mask[i].nonzero().flatten()
        s = torch.exp((logp[i, idx] - old[i, idx]).sum() / len(idx))
        a = adv[i]
        terms.append(torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    return -torch.stack(terms).mean()


@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.03, 0.04)])
def test_gspo_value_and_gradient_match_paper(eps):
    logp, old, adv, mask = gspo_batch()
    cfg = PolicyLossConfig(
        ratio_level="sequence",
        agg_mode="seq-mean-token-mean",
        eps_low=eps[0],
        eps_high=eps[1],
        dual_clip_c=None,
    )
    lp = logp.clone().requires_grad_()
    loss, m = policy_loss(lp, old, adv, mask, cfg)
    loss.backward()
    lp_ref = logp.clone().requires_grad_()
    ref = gspo_reference_loss(lp_ref, old, adv, mask, *eps)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-13, abs=1e-15)
    valid = mask.bool()
    torch.testing.assert_close(lp.grad[valid], lp_ref.grad[valid], rtol=1e-12, atol=1e-15)
    assert torch.all(lp.grad[~valid] == 0)
    if eps[0] < 0.1:  # the tight ranges clip some sequences (zero gradient there)
        assert 0 < m["all/clip_frac"] < 1


def test_gspo_ratio_is_per_sequence():
    logp, old, adv, mask = gspo_batch()
    slr = sequence_log_ratio(logp, old, mask)
    for i in range(logp.shape[0]):
        idx = mask[i].nonzero().flatten()
        expect = sum(float(logp[i, j] - old[i, j]) for j in idx) / len(idx)
        assert torch.all((slr[i] - expect).abs() < 1e-14)
    tl = token_loss(
        logp, old, adv[:, None].expand_as(logp),
        PolicyLossConfig(ratio_level="sequence"), seq_log_ratio=slr,
    )  # fmt: skip
    torch.testing.assert_close(tl.ratio[:, 0], slr[:, 0].exp(), rtol=1e-14, atol=0)


def test_gspo_flat_layout_matches_the_padded_one():
    # The fused kernel sees [N] token vectors with a row id per token.
    logp, old, _, mask = gspo_batch()
    row = torch.arange(logp.shape[0])[:, None].expand_as(logp).reshape(-1)
    flat = sequence_log_ratio_flat(logp.reshape(-1), old.reshape(-1), row, mask.reshape(-1))
    expect = sequence_log_ratio(logp, old, mask).reshape(-1)
    torch.testing.assert_close(flat, expect, rtol=0, atol=1e-14)


def test_gspo_without_the_sequence_ratio_is_a_clear_error():
    logp, old, adv, _ = gspo_batch()
    with pytest.raises(ValueError, match="ratio_level='sequence'.*needs seq_log_ratio"):
        cfg = PolicyLossConfig(ratio_level="sequence")
        token_loss(logp, old, adv[:, None].expand_as(logp), cfg)
    with pytest.raises(ValueError, match="ratio_level='seq'"):
        require_valid(PolicyLossConfig(ratio_level="seq"), "algorithm.loss.")


# ---------------------------------------------------------------- aggregation


def loss_matrix(b=4, t=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randn(b, t, generator=gen, dtype=torch.float64)
    lengths = [6, 2, 4, 1][:b]
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return vals, mask, lengths


def test_dr_grpo_constant_is_the_max_response_length():
    # Liu et al. (2025), Dr. GRPO: loss = 1/G sum_i sum_t L_it / MAX_TOKENS.
    vals, mask, lengths = loss_matrix()
    cfg = PolicyLossConfig(agg_mode="seq-sum-constant")
    c = resolve_norm_constant(cfg, 16)
    assert c == 16.0
    expect = sum(float(vals[i, :n].sum()) for i, n in enumerate(lengths)) / (len(lengths) * 16)
    assert aggregate(vals, mask, cfg.agg_mode, c).item() == pytest.approx(expect, rel=1e-14)
    # The same responses padded to a longer batch: the same loss (with T as the constant, the
    # old default, the loss would shrink by 6/9).
    pad_v = torch.cat([vals, torch.full((4, 3), float("nan"), dtype=torch.float64)], dim=1)
    pad_m = torch.cat([mask, torch.zeros(4, 3, dtype=torch.float64)], dim=1)
    assert aggregate(pad_v, pad_m, cfg.agg_mode, c).item() == pytest.approx(expect, rel=1e-14)
    assert resolve_norm_constant(PolicyLossConfig(norm_constant=100.0), 16) == 100.0
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        resolve_norm_constant(cfg, 0)


def test_token_sum_modes_closed_forms():
    vals, mask, lengths = loss_matrix()
    sums = [float(vals[i, :n].sum()) for i, n in enumerate(lengths)]
    assert aggregate(vals, mask, "token-sum").item() == pytest.approx(sum(sums), rel=1e-14)
    assert aggregate(vals, mask, "seq-mean-token-sum").item() == pytest.approx(
        sum(sums) / 4, rel=1e-14
    )


SEQ_MODES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-constant")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_rows_one_rule(mode):
    # verl's rule: a fully masked row counts in every sequence-level divisor and adds 0.
    vals, mask, _ = loss_matrix()
    base = aggregate(vals, mask, mode, 8.0).item()
    vals2 = torch.cat([vals, torch.full((1, 6), float("nan"), dtype=torch.float64)])
    mask2 = torch.cat([mask, torch.zeros(1, 6, dtype=torch.float64)])
    with_masked = aggregate(vals2, mask2, mode, 8.0).item()
    factor = 4 / 5 if mode in SEQ_MODES else 1.0
    assert with_masked == pytest.approx(base * factor, rel=1e-14)
    w = aggregation_weights(mask2, mode, 8.0)
    assert torch.all(w[-1] == 0)


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="token-sum"):
        require_valid(PolicyLossConfig(agg_mode="sum"), "algorithm.loss.")


# ---------------------------------------------------------------- k3 clamp


def verl_k3(logp: float, ref: float, clamp: float = 10.0) -> float:
    # verl's low_var_kl: kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10).
    kl = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(kl) - kl - 1.0, -clamp), clamp)


def test_k3_clamp_matches_verl():
    lp = torch.tensor([-1.0, -4.0, -0.5, -30.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -0.5, -0.5, -1.0], dtype=torch.float64)
    k = kl_estimate(lp, ref, "k3", clamp=10.0)
    expect = [verl_k3(float(a), float(b)) for a, b in zip(lp.detach(), ref, strict=True)]
    assert k.tolist() == pytest.approx(expect, rel=1e-14)
    assert k[1].item() == 10.0 and kl_estimate(lp, ref, "k3")[1].item() > 10  # e^3.5 - 4.5
    k.sum().backward()
    assert lp.grad[1].item() == 0.0 and lp.grad[0].item() != 0.0
    # Through the config: the clamped KL enters the loss.
    cfg = PolicyLossConfig(kl_coef=0.5, kl_clamp=10.0)
    a = torch.zeros(4, dtype=torch.float64)
    tl = token_loss(lp.detach(), None, a, cfg, ref_logp=ref)
    assert tl.loss.tolist() == pytest.approx([0.5 * e for e in expect], rel=1e-14)
    with pytest.raises(ValueError, match="kl_clamp=0"):
        require_valid(PolicyLossConfig(kl_clamp=0), "algorithm.loss.")


# ------------------------------------------- REINFORCE++ under dynamic sampling (issue 25)


def _mixed_batch(g: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous rewards with some all-equal groups (including non-dyadic values, whose
    float mean is not exactly the value) interleaved with informative groups. Returns the
    rewards and the [groups] bool of the informative ones."""
    gen = torch.Generator().manual_seed(seed)
    groups, informative = [], []
    for k, level in enumerate([0.1, None, 0.7, None, None, 0.3, None, 1.0]):
        if level is None:
            groups.append(torch.rand(g, generator=gen, dtype=torch.float64))
        else:
            groups.append(torch.full((g,), level, dtype=torch.float64))
        informative.append(level is None)
        del k
    return torch.cat(groups), torch.tensor(informative)


@pytest.mark.parametrize("g", [3, 4, 5])
@pytest.mark.parametrize("name", ["reinforce_pp", "grpo", "dr_grpo", "rloo", "gspo"])
def test_groups_without_signal_get_exactly_zero(name, g):
    # All-equal groups carry no signal: their advantage must be exactly 0 (not 1e-17 from the
    # float group mean, nor a shift from REINFORCE++'s whitening), so that dynamic sampling's
    # zero_advantage filter, which tests != 0, drops exactly the groups identical_rewards drops.
    r, informative = _mixed_batch(g, seed=g)
    a = advantages(r, g, name)
    flat = informative.repeat_interleave(g)
    assert torch.all(a[~flat] == 0), a[~flat]
    keep = informative_groups(r, a, g, "zero_advantage")
    assert keep.tolist() == informative.tolist()
    assert keep.tolist() == informative_groups(r, a, g, "identical_rewards").tolist()


@pytest.mark.parametrize("g", [3, 4, 8])
def test_reinforce_pp_whitening_ignores_dropped_groups(g):
    # The whitening statistics are over the groups that carry signal: the kept groups'
    # advantages do not depend on how many all-equal groups the batch also held (and so on
    # how many dynamic sampling dropped), and equal the paper's formula over the kept batch.
    r, informative = _mixed_batch(g, seed=10 + g)
    flat = informative.repeat_interleave(g)
    kept_only = r[flat]
    expect = torch.tensor(reinforce_pp_reference(kept_only.tolist(), g), dtype=torch.float64)
    torch.testing.assert_close(advantages(kept_only, g, "reinforce_pp"), expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(advantages(r, g, "reinforce_pp")[flat], expect, rtol=0, atol=1e-12)
    # And whiten() over the concatenated kept rows of two sampling rounds equals the formula
    # over the concatenation (what the trainer's batch holds after dynamic sampling).
    r2, inf2 = _mixed_batch(g, seed=20 + g)
    both = torch.cat([kept_only, r2[inf2.repeat_interleave(g)]])
    cfg = resolve("reinforce_pp")
    pre = torch.cat(
        [
            advantages(kept_only, g, cfg, batch_norm=False),
            advantages(r2, g, cfg, batch_norm=False)[inf2.repeat_interleave(g)],
        ]
    )
    expect_both = torch.tensor(reinforce_pp_reference(both.tolist(), g), dtype=torch.float64)
    torch.testing.assert_close(whiten(pre, g, cfg), expect_both, rtol=0, atol=1e-12)


def test_reinforce_pp_all_groups_without_signal():
    r = torch.tensor([0.3] * 4 + [1.0] * 4, dtype=torch.float64)
    assert advantages(r, 4, "reinforce_pp").tolist() == [0.0] * 8


# ------------------------------------------- GSPO's sequence log-ratio clamp (issue 25)


def verl_gspo_token_loss(logp, old, adv, mask, eps_low, eps_high):
    # verl compute_policy_loss_gspo (core_algos.py), transcribed: the sequence log-ratio
    # log_prob - sg(log_prob) + sg(mean log-ratio) is clamped at max=10 (torch.clamp: zero
    # gradient above it), then the PPO clip on the ratio.
    neg_kl = logp - old
    neg_kl = torch.where(mask.bool(), neg_kl, torch.zeros_like(neg_kl))
    seq = (neg_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_r = logp - logp.detach() + seq.detach().unsqueeze(-1)
    log_r = torch.clamp(log_r, max=10.0)
    r = torch.exp(log_r)
    l1 = -adv[:, None] * r
    l2 = -adv[:, None] * torch.clamp(r, 1 - eps_low, 1 + eps_high)
    return torch.maximum(l1, l2)


def test_gspo_log_ratio_is_clamped_at_10_with_zero_gradient_above():
    # Row 0: mean log-ratio 12 and a negative advantage: the unclipped branch is active, so
    # without the clamp its gradient is e^12 |A| per token; verl clamps at 10 with no gradient.
    # Row 1: mean log-ratio 9.5, below the clamp: gradient e^9.5 |A| (verl's too).
    # Row 2: a normal row.
    t = 4
    old = torch.full((3, t), -15.0, dtype=torch.float64)
    logp = torch.stack(
        [
            torch.full((t,), -3.0, dtype=torch.float64),
            torch.full((t,), -5.5, dtype=torch.float64),
            torch.full((t,), -15.1, dtype=torch.float64),
        ]
    )
    adv = torch.tensor([-1.0, -0.5, 0.8], dtype=torch.float64)
    mask = torch.ones(3, t, dtype=torch.float64)
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", dual_clip_c=None)
    lp = logp.clone().requires_grad_()
    slr = sequence_log_ratio(lp, old, mask)
    tl = token_loss(lp, old, adv[:, None].expand(3, t), cfg, seq_log_ratio=slr)
    tl.loss.sum().backward()
    lp_v = logp.clone().requires_grad_()
    ref = verl_gspo_token_loss(lp_v, old, adv, mask, cfg.eps_low, cfg.eps_high)
    ref.sum().backward()
    torch.testing.assert_close(tl.loss.detach(), ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(lp.grad, lp_v.grad, rtol=1e-13, atol=0)
    assert torch.all(lp.grad[0] == 0)  # above the clamp: no gradient, however large the ratio
    assert tl.loss[0, 0].item() == pytest.approx(math.exp(10.0))  # the value is the clamped one
    assert lp.grad[1, 0].item() == pytest.approx(0.5 * math.exp(9.5), rel=1e-12)
    assert tl.ratio.max().item() <= math.exp(10.0) * (1 + 1e-12)


# ------------------------------------------- kl_clamp clamps k3 only, as verl (issue 25)


def test_kl_clamp_leaves_k1_alone_as_verl():
    # verl's kl_penalty: "kl" (k1) is logprob - ref_logprob, unclamped; only "low_var_kl" (k3)
    # is clamped to [-10, 10]. The k1 estimate of a far token stays its true value and keeps
    # its gradient.
    lp = torch.tensor([-1.0, -30.0, -0.2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -25.0], dtype=torch.float64)
    k1 = kl_estimate(lp, ref, "k1", clamp=10.0)
    assert k1.tolist() == pytest.approx([0.5, -29.0, 24.8], rel=1e-14)
    k1.sum().backward()
    assert lp.grad.tolist() == [1.0, 1.0, 1.0]
    cfg = PolicyLossConfig(kl_coef=1.0, kl_estimator="k1", kl_clamp=10.0)
    tl = token_loss(lp.detach(), None, torch.zeros(3, dtype=torch.float64), cfg, ref_logp=ref)
    assert tl.kl.tolist() == pytest.approx([0.5, -29.0, 24.8], rel=1e-14)


def test_gspo_clamp_holds_in_the_fused_ops():
    # The fused ops take their per-token derivative from token_loss by autograd, so the clamp
    # reaches them: a row above the clamp gets no logits gradient there either, and value and
    # gradient equal verl's formula through log_softmax.
    from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss

    gen = torch.Generator().manual_seed(3)
    b, t, v, h = 3, 4, 11, 5
    hidden = torch.randn(b * t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    target = torch.randint(0, v, (b * t,), generator=gen)
    logp0 = torch.log_softmax(hidden @ weight.t(), -1).gather(1, target[:, None])[:, 0]
    # Old log-probs 12 below (row 0: mean log-ratio 12 > 10), 9.5 below (row 1), near (row 2).
    old = logp0.detach() - torch.tensor([12.0, 9.5, 0.05]).repeat_interleave(t).double()
    adv = torch.tensor([-1.0, -0.5, 0.8], dtype=torch.float64).repeat_interleave(t)
    mask = torch.ones(b, t, dtype=torch.float64)
    row = torch.arange(b).repeat_interleave(t)
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", dual_clip_c=None)

    z_ref = (hidden @ weight.t()).requires_grad_()
    lp = torch.log_softmax(z_ref, -1).gather(1, target[:, None])[:, 0].view(b, t)
    ref_tok = verl_gspo_token_loss(lp, old.view(b, t), adv.view(b, t)[:, 0], mask, 0.2, 0.28)
    ref = aggregate(ref_tok, mask, cfg.agg_mode)
    ref.backward()
    assert torch.all(z_ref.grad[:t] == 0) and torch.any(z_ref.grad[t:] != 0)

    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, old_logp=old, row=row, chunk_size=5)
    loss = aggregate(out.loss.view(b, t), mask, cfg.agg_mode)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-13)
    assert torch.all(z.grad[:t] == 0)

    hh, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(hh, w, target, adv, cfg, old_logp=old, row=row)
    loss2 = aggregate(out2.loss.view(b, t), mask, cfg.agg_mode)
    loss2.backward()
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(hh.grad, z_ref.grad @ weight, rtol=1e-10, atol=1e-13)
