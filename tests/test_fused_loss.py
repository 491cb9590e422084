"""The fused vocab-parallel AGPO loss equals the naive float64 path, at TP=1 and TP=2."""

import pytest
import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig, aggregate
from megatron_agpo.ops import (
    IGNORE_INDEX,
    fused_output_layer_agpo_loss,
    fused_vocab_parallel_agpo_loss,
    naive_agpo_loss,
)
from tests.dist_utils import run_distributed

MODES = ["token-mean", "seq-mean-token-mean", "seq-sum-constant"]
CFG_FULL = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, tis_cap=2.0)


def make_problem(b, t, v, h, seed):
    """A random [B, T] batch, as float64: hidden, weight, logits, targets with padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = 0.5 * torch.randn(b * t, h, generator=g, dtype=torch.float64)
    weight = 0.5 * torch.randn(v, h, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (b * t,), generator=g)
    mask = torch.ones(b, t, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = 0
    target[mask.view(-1) == 0] = IGNORE_INDEX
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, target.clamp(0)[:, None])[:, 0]
    noise = lambda s: s * torch.randn(b * t, generator=g, dtype=torch.float64)  # noqa: E731
    extra = dict(old_logp=lp + noise(0.3), ref_logp=lp + noise(0.3))
    extra["rollout_logp"] = extra["old_logp"] + noise(0.2)
    adv = torch.randn(b, generator=g, dtype=torch.float64)[:, None].expand(b, t).reshape(-1)
    return hidden, weight, target, adv, mask, extra


def objective(out, mask, mode):
    """Aggregated loss plus terms that give logp and entropy their own upstream gradients."""
    b, t = mask.shape
    valid = mask.view(-1)
    return (
        aggregate(out.loss.view(b, t), mask, mode)
        + 0.3 * (out.entropy * valid).sum()
        + 0.2 * (out.logp * valid).sum()
    )


def reference(hidden, weight, target, adv, mask, extra, cfg):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = naive_agpo_loss(h @ w.t(), target, adv, cfg, dtype=torch.float64, **extra)
    loss = objective(out, mask, cfg.agg_mode)
    loss.backward()
    z = (hidden @ weight.t()).requires_grad_()
    objective(
        naive_agpo_loss(z, target, adv, cfg, dtype=torch.float64, **extra), mask, cfg.agg_mode
    ).backward()
    return loss.detach(), out, h.grad, w.grad, z.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed,shape,chunk", [(0, (3, 7, 50, 8), 5), (1, (2, 16, 97, 12), 64)])
@pytest.mark.parametrize("full", [False, True])
def test_tp1_float64_equals_naive(mode, seed, shape, chunk, full):
    cfg = PolicyLossConfig(agg_mode=mode, **(CFG_FULL if full else {}))
    hidden, weight, target, adv, mask, extra = make_problem(*shape, seed)
    if not full:
        extra = dict(old_logp=extra["old_logp"])
    ref_loss, ref_out, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra, cfg)

    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, chunk_size=chunk, **extra)
    loss = objective(out, mask, mode)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logp.detach(), ref_out.logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, gz, rtol=1e-10, atol=1e-12)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(h, w, target, adv, cfg, chunk_size=chunk, **extra)
    loss2 = objective(out2, mask, mode)
    loss2.backward()
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)


def test_fp32_inplace_and_bf16_close_to_float64():
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 32, 301, 16, 3)
    ref_loss, _, _, _, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    z = (hidden @ weight.t()).float().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z.clone(), target, adv, cfg, chunk_size=16, **extra)
    buf = (hidden @ weight.t()).float()
    z_ip = buf.clone().requires_grad_()
    # In place: the logits storage holds the softmax and then the gradient.
    out_ip = fused_vocab_parallel_agpo_loss(
        z_ip, target, adv, cfg, chunk_size=16, inplace=True, **extra
    )
    objective(out, mask, cfg.agg_mode).backward()
    objective(out_ip, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(z.grad.double(), gz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z_ip.grad, z.grad, rtol=0, atol=0)
    zb = (hidden @ weight.t()).bfloat16().requires_grad_()
    outb = fused_vocab_parallel_agpo_loss(zb, target, adv, cfg, chunk_size=16, **extra)
    lb = objective(outb, mask, cfg.agg_mode)
    lb.backward()
    assert zb.grad.dtype == torch.bfloat16
    assert abs(lb.item() - ref_loss.item()) < 2e-2 * max(1.0, abs(ref_loss.item()))


def test_padded_vocabulary_is_left_out():
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(2, 8, 45, 8, 7)
    _, ref_out, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    junk = 5.0 * torch.randn(3, 8, dtype=torch.float64)  # padded rows: large, random
    w_pad = torch.cat([weight, junk])
    z = (hidden @ w_pad.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, chunk_size=5, vocab_size=45, **extra)
    objective(out, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(out.logp.detach(), ref_out.logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad[:, :45], gz, rtol=1e-10, atol=1e-12)
    assert torch.all(z.grad[:, 45:] == 0)
    h = hidden.clone().requires_grad_()
    w = w_pad.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(
        h, w, target, adv, cfg, chunk_size=5, vocab_size=45, **extra
    )
    objective(out2, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(h.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad[:45], gw, rtol=1e-10, atol=1e-12)
    assert torch.all(w.grad[45:] == 0)
    with pytest.raises(ValueError, match=r"out of range \[0, 45\)"):
        bad = target.clone()
        bad[0] = 46
        fused_vocab_parallel_agpo_loss(z.detach(), bad, adv, cfg, vocab_size=45, **extra)


def test_main_grad_accumulation():
    cfg = PolicyLossConfig()
    hidden, weight, target, adv, mask, extra = make_problem(2, 8, 40, 8, 5)
    _, _, _, gw, _ = reference(hidden, weight, target, adv, mask, extra, cfg)
    w = weight.clone().requires_grad_()
    w.main_grad = torch.ones_like(w)
    w.grad_added_to_main_grad = False
    out = fused_output_layer_agpo_loss(hidden, w, target, adv, cfg, chunk_size=3, **extra)
    objective(out, mask, cfg.agg_mode).backward()
    # Accumulated into main_grad, no autograd .grad; the flag stays off, so a tied embedding's
    # own lookup gradient (an ordinary .grad) is still added by megatron's DDP hook.
    assert w.grad is None and not w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad, gw + 1, rtol=1e-10, atol=1e-12)


def test_bad_input_named():
    cfg = PolicyLossConfig()
    z = torch.randn(6, 10)
    with pytest.raises(
        ValueError, match=r"out of range \[0, 10\).*token index \[2\].*values \[10\]"
    ):
        fused_vocab_parallel_agpo_loss(z, torch.tensor([0, 1, 10, 3, 4, 5]), torch.zeros(6), cfg)
    with pytest.raises(ValueError, match=r"target\[6\], advantages\[5\]"):
        fused_vocab_parallel_agpo_loss(z, torch.zeros(6, dtype=torch.long), torch.zeros(5), cfg)
    with pytest.raises(ValueError, match=r"target\[5\] must be \[N\] with N = logits rows = 6"):
        fused_vocab_parallel_agpo_loss(z, torch.zeros(5, dtype=torch.long), torch.zeros(5), cfg)
    with pytest.raises(ValueError, match=r"hidden\[6, 4\].*weight\[10, 3\]"):
        fused_output_layer_agpo_loss(
            torch.randn(6, 4),
            torch.randn(10, 3),
            torch.zeros(6, dtype=torch.long),
            torch.zeros(6),
            cfg,
        )


def _tp2_body(rank, world, mode, full, seed):
    torch.manual_seed(0)
    cfg = PolicyLossConfig(agg_mode=mode, **(CFG_FULL if full else {}))
    b, t, v, h = 3, 9, 2 * 37, 8  # each rank holds 37 vocabulary entries; chunk 4 splits 27 tokens
    hidden, weight, target, adv, mask, extra = make_problem(b, t, v, h, seed)
    ref_loss, ref_out, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    vl = v // world
    sl = slice(rank * vl, (rank + 1) * vl)
    group = dist.group.WORLD

    z = (hidden @ weight[sl].t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, tp_group=group, chunk_size=4, **extra)
    loss = objective(out, mask, mode)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out.entropy.detach(), ref_out.entropy.detach(), rtol=1e-11, atol=1e-12
    )
    torch.testing.assert_close(z.grad, gz[:, sl], rtol=1e-10, atol=1e-12)

    hh = hidden.clone().requires_grad_()
    w = weight[sl].clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(
        hh, w, target, adv, cfg, tp_group=group, chunk_size=4, **extra
    )
    objective(out2, mask, mode).backward()
    torch.testing.assert_close(hh.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, gw[sl], rtol=1e-10, atol=1e-12)

    # A padded vocabulary: the last 4 columns of rank 1 are padding, holding junk.
    real = v - 4
    _, ref_p, gh_p, _, gz_p = reference(
        hidden, weight[:real], target.clamp(max=real - 1), adv, mask, extra, cfg
    )
    w_pad = torch.cat([weight[:real], 7.0 * torch.ones(4, h, dtype=torch.float64)])
    zp = (hidden @ w_pad[sl].t()).requires_grad_()
    outp = fused_vocab_parallel_agpo_loss(
        zp,
        target.clamp(max=real - 1),
        adv,
        cfg,
        tp_group=group,
        chunk_size=4,
        vocab_size=real,
        **extra,
    )
    objective(outp, mask, mode).backward()
    torch.testing.assert_close(outp.logp.detach(), ref_p.logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        zp.grad[:, : min(vl, real - rank * vl)],
        gz_p[:, sl][:, : min(vl, real - rank * vl)],
        rtol=1e-10,
        atol=1e-12,
    )

    # The naive path with a real vocabulary all-gather agrees too.
    zn = (hidden @ weight[sl].t()).requires_grad_()
    outn = naive_agpo_loss(zn, target, adv, cfg, tp_group=group, dtype=torch.float64, **extra)
    objective(outn, mask, mode).backward()
    torch.testing.assert_close(zn.grad, gz[:, sl], rtol=1e-10, atol=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_tp2_gloo_equals_float64_reference(mode):
    run_distributed(_tp2_body, 2, mode, mode == "token-mean", 11)


@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.03, 0.04)])
def test_gspo_sequence_ratio_equals_the_paper(eps):
    # Both fused ops against GSPO's formula (Zheng et al., 2025, per sequence; float64):
    # value and gradient, with padded rows, and ranges that clip some sequences.
    from tests.test_algorithms_parity import gspo_reference_loss

    b, t, v, h = 5, 6, 40, 8
    hidden, weight, target, adv, mask, extra = make_problem(b, t, v, h, 4)
    old = extra["old_logp"]
    cfg = PolicyLossConfig(
        ratio_level="sequence", agg_mode="seq-mean-token-mean",
        eps_low=eps[0], eps_high=eps[1], dual_clip_c=None,
    )  # fmt: skip
    row = torch.arange(b).repeat_interleave(t)
    z_ref = (hidden @ weight.t()).requires_grad_()
    logp = torch.log_softmax(z_ref, -1).gather(1, target.clamp(0)[:, None])[:, 0]
    ref = gspo_reference_loss(
        logp.view(b, t), old.view(b, t), adv.view(b, t)[:, 0], mask, *eps
    )  # fmt: skip
    ref.backward()

    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, old_logp=old, row=row, chunk_size=7)
    loss = aggregate(out.loss.view(b, t), mask, cfg.agg_mode)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-13)

    hh, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(hh, w, target, adv, cfg, old_logp=old, row=row)
    loss2 = aggregate(out2.loss.view(b, t), mask, cfg.agg_mode)
    loss2.backward()
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hh.grad, z_ref.grad @ weight, rtol=1e-10, atol=1e-13)
    # The tight ranges clip some sequences and not others.
    s = torch.exp(((logp.detach() - old) * mask.view(-1)).view(b, t).sum(1) / mask.sum(1))
    if eps[0] < 0.1:
        outside = (s < 1 - eps[0]) | (s > 1 + eps[1])
        assert 0 < outside.sum() < b, s


def test_gspo_without_row_ids_is_a_clear_error():
    hidden, weight, target, adv, _, extra = make_problem(2, 3, 10, 4, 0)
    cfg = PolicyLossConfig(ratio_level="sequence")
    with pytest.raises(ValueError, match="needs row, each token's sequence index"):
        fused_vocab_parallel_agpo_loss(hidden @ weight.t(), target, adv, cfg, **extra)
