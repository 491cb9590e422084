"""The fused vocab-parallel AGPO loss equals the naive float64 path, at TP=1 and TP=2, in
every aggregation mode, in bf16 (gradients too), for GSPO's row ids and tied or untied output
layers; and it never synchronises with the host (counted, and run on the meta device)."""

import pytest
import torch
import torch.distributed as dist

from megatron_agpo.algorithms import AGG_MODES, PolicyLossConfig, aggregate
from megatron_agpo.ops import (
    IGNORE_INDEX,
    fused_output_layer_agpo_loss,
    fused_vocab_parallel_agpo_loss,
    naive_agpo_loss,
)
from tests.dist_utils import run_distributed

MODES = list(AGG_MODES)
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
    # Vocabulary chunks of 16 columns in the backward: several, the last one short.
    out2 = fused_output_layer_agpo_loss(
        h, w, target, adv, cfg, chunk_size=chunk, vocab_chunk_size=16, **extra
    )
    loss2 = objective(out2, mask, mode)
    loss2.backward()
    torch.testing.assert_close(loss2, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)


def _rel_err(x, ref):
    """Largest error relative to the reference's largest entry (bf16 rounds each entry to
    about 2^-9 of itself, so this is the scale on which its error is judged)."""
    return float((x.detach().double() - ref).abs().max() / ref.abs().max())


def test_fp32_inplace_close_to_float64():
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 32, 301, 16, 3)
    ref_loss, _, _, _, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    z = (hidden @ weight.t()).float().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z.clone(), target, adv, cfg, chunk_size=16, **extra)
    z_ip = (hidden @ weight.t()).float().requires_grad_()
    # In place: the logits storage holds the softmax and then the gradient.
    out_ip = fused_vocab_parallel_agpo_loss(
        z_ip, target, adv, cfg, chunk_size=16, inplace=True, **extra
    )
    objective(out, mask, cfg.agg_mode).backward()
    objective(out_ip, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(z.grad.double(), gz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z_ip.grad, z.grad, rtol=0, atol=0)


class _Float32Sizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest float32 tensor any op produces (to catch a silent [N, V] copy)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_logits_gradient_close_to_float64(inplace):
    # The float64 reference is taken at the bf16-rounded logits, so what is measured is the
    # kernel's own error: it must stay near bf16's rounding of the result itself.
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 32, 301, 16, 3)
    zb = (hidden @ weight.t()).bfloat16()
    zr = zb.double().requires_grad_()
    ref_out = naive_agpo_loss(zr, target, adv, cfg, dtype=torch.float64, **extra)
    ref_loss = objective(ref_out, mask, cfg.agg_mode)
    ref_loss.backward()
    z = zb.clone().requires_grad_()
    chunk = 16
    with _Float32Sizes() as sizes:
        logits = z.clone() if inplace else z
        out = fused_vocab_parallel_agpo_loss(
            logits, target, adv, cfg, chunk_size=chunk, inplace=inplace, **extra
        )
        loss = objective(out, mask, cfg.agg_mode)
        (grad,) = torch.autograd.grad(loss, [z])
    assert grad.dtype == torch.bfloat16
    # No float32 copy of the logits: float32 temporaries are one chunk at most.
    assert sizes.largest <= chunk * z.shape[1] < z.numel()
    if inplace:  # the gradient lives in the logits' own storage
        assert grad.data_ptr() == logits.data_ptr()
    rounding = _rel_err(zr.grad.bfloat16(), zr.grad)
    assert _rel_err(grad, zr.grad) < 1.5 * rounding, (_rel_err(grad, zr.grad), rounding)
    assert abs(float(loss.detach()) - float(ref_loss)) < 1e-3 * max(1.0, abs(float(ref_loss)))
    torch.testing.assert_close(out.logp.double(), ref_out.logp.detach(), rtol=0, atol=2e-5)


def test_bf16_output_layer_gradients_close_to_float64():
    # bf16 GEMMs, float32 accumulation of dLoss/dhidden and of main_grad; the reference is
    # float64 at the bf16-rounded hidden states and weight.
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 32, 301, 16, 3)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    _, _, gh, gw, _ = reference(hb.double(), wb.double(), target, adv, mask, extra, cfg)
    h, w = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    w.main_grad = torch.zeros(w.shape)  # megatron's float32 buffer
    out = fused_output_layer_agpo_loss(
        h, w, target, adv, cfg, chunk_size=16, vocab_chunk_size=64, **extra
    )
    objective(out, mask, cfg.agg_mode).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad is None
    # The bf16 logits (as megatron's output layer rounds them) and the bf16 dz fed to the
    # GEMMs cost a few bf16 roundings; float32 accumulation keeps it from growing with N.
    assert _rel_err(h.grad, gh) < 3 * _rel_err(gh.bfloat16(), gh) + 4e-3
    assert _rel_err(w.main_grad, gw) < 8e-3
    # Without main_grad: a bf16 .grad, each row block written once.
    h2, w2 = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(
        h2, w2, target, adv, cfg, chunk_size=16, vocab_chunk_size=64, **extra
    )
    objective(out2, mask, cfg.agg_mode).backward()
    assert w2.grad.dtype == torch.bfloat16
    assert _rel_err(w2.grad, gw) < 8e-3 + _rel_err(gw.bfloat16(), gw)


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
        h, w, target, adv, cfg, chunk_size=5, vocab_size=45, vocab_chunk_size=7, **extra
    )
    objective(out2, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(h.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad[:45], gw, rtol=1e-10, atol=1e-12)
    assert torch.all(w.grad[45:] == 0)
    bad = target.clone()
    bad[0] = 46
    with pytest.raises(RuntimeError, match=r"out of range \[0, 45\)"):
        fused_vocab_parallel_agpo_loss(z.detach(), bad, adv, cfg, vocab_size=45, **extra)
    with pytest.raises(ValueError, match=r"out of range \[0, 45\) at token index \[0\]"):
        fused_vocab_parallel_agpo_loss(
            z.detach(), bad, adv, cfg, vocab_size=45, validate=True, **extra
        )


def test_main_grad_accumulation():
    cfg = PolicyLossConfig()
    hidden, weight, target, adv, mask, extra = make_problem(2, 8, 40, 8, 5)
    _, _, _, gw, _ = reference(hidden, weight, target, adv, mask, extra, cfg)
    w = weight.clone().requires_grad_()
    w.main_grad = torch.ones_like(w)
    w.grad_added_to_main_grad = False
    out = fused_output_layer_agpo_loss(
        hidden, w, target, adv, cfg, chunk_size=3, vocab_chunk_size=9, **extra
    )
    objective(out, mask, cfg.agg_mode).backward()
    # Accumulated into main_grad, no autograd .grad; the flag stays off, so a tied embedding's
    # own lookup gradient (an ordinary .grad) is still added by megatron's DDP hook.
    assert w.grad is None and not w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad, gw + 1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("main_grad", [False, True])
def test_tied_and_untied_output_layer(tied, main_grad):
    # A two-layer model: embedding lookup, a tanh layer, the output layer. Tied: the output
    # weight is the embedding table, so its gradient is the lookup's plus the output layer's
    # (with main_grad, the output layer's part goes there and the lookup's to .grad, as
    # megatron's DDP then adds them).
    cfg = PolicyLossConfig(**CFG_FULL)
    b, t, v, hdim = 3, 6, 31, 8
    _, weight, target, adv, mask, extra = make_problem(b, t, v, hdim, 9)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (b * t,), generator=g)
    emb0 = 0.5 * torch.randn(v, hdim, generator=g, dtype=torch.float64)
    a0 = 0.5 * torch.randn(hdim, hdim, generator=g, dtype=torch.float64)

    def run(fused):
        emb, a = emb0.clone().requires_grad_(), a0.clone().requires_grad_()
        out_w = emb if tied else weight.clone().requires_grad_()
        if fused and main_grad:
            for p in {id(emb): emb, id(out_w): out_w}.values():
                p.main_grad = torch.zeros_like(p)
        hidden = torch.tanh(emb[ids] @ a)
        if fused:
            out = fused_output_layer_agpo_loss(
                hidden, out_w, target, adv, cfg, chunk_size=4, vocab_chunk_size=8, **extra
            )
        else:
            out = naive_agpo_loss(hidden @ out_w.t(), target, adv, cfg, dtype=torch.float64,
                                  **extra)  # fmt: skip
        objective(out, mask, cfg.agg_mode).backward()
        total = lambda p: (p.grad if p.grad is not None else 0) + getattr(p, "main_grad", 0)  # noqa: E731
        return total(emb), a.grad, (None if tied else total(out_w))

    ref, got = run(False), run(True)
    for r, x in zip(ref, got, strict=True):
        if r is not None:
            torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-12)


def test_response_tokens_only_equal_the_padded_layout():
    # The trainer passes only response tokens, flat: their values and gradients equal those
    # of the same tokens inside the padded [B*T] layout.
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(3, 9, 40, 8, 2)
    keep = mask.view(-1).bool()
    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, chunk_size=4, **extra)
    (out.loss * keep).sum().backward()
    zr = (hidden @ weight.t())[keep].requires_grad_()
    sel = {k: x[keep] for k, x in extra.items()}
    out_r = fused_vocab_parallel_agpo_loss(zr, target[keep], adv[keep], cfg, chunk_size=4, **sel)
    out_r.loss.sum().backward()
    assert zr.shape[0] < z.shape[0] and not (target[keep] == IGNORE_INDEX).any()
    torch.testing.assert_close(out_r.loss.detach(), out.loss.detach()[keep], rtol=0, atol=1e-14)
    torch.testing.assert_close(zr.grad, z.grad[keep], rtol=0, atol=1e-14)


def test_empty_micro_batch():
    cfg = PolicyLossConfig()
    z = torch.randn(0, 10, requires_grad=True)
    out = fused_vocab_parallel_agpo_loss(z, torch.zeros(0, dtype=torch.long), torch.zeros(0), cfg)
    out.loss.sum().backward()
    assert out.loss.shape == (0,) and z.grad.shape == (0, 10)
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    out = fused_output_layer_agpo_loss(h, w, torch.zeros(0, dtype=torch.long), torch.zeros(0), cfg)
    out.loss.sum().backward()
    assert torch.all(w.grad == 0)


def test_bad_input_named(monkeypatch):
    cfg = PolicyLossConfig()
    z = torch.randn(6, 10)
    tgt = torch.tensor([0, 1, 10, 3, 4, 5])
    with pytest.raises(RuntimeError, match=r"target ids out of range \[0, 10\)"):
        fused_vocab_parallel_agpo_loss(z, tgt, torch.zeros(6), cfg)
    with pytest.raises(
        ValueError, match=r"out of range \[0, 10\).*token index \[2\].*values \[10\]"
    ):
        fused_vocab_parallel_agpo_loss(z, tgt, torch.zeros(6), cfg, validate=True)
    with pytest.raises(ValueError, match=r"target\[6\], advantages\[5\]"):
        fused_vocab_parallel_agpo_loss(z, torch.zeros(6, dtype=torch.long), torch.zeros(5), cfg)
    with pytest.raises(ValueError, match=r"target\[5\] must be \[N\] with N = logits rows = 6"):
        fused_vocab_parallel_agpo_loss(z, torch.zeros(5, dtype=torch.long), torch.zeros(5), cfg)
    with pytest.raises(TypeError, match=r"logits must be float64, float32, bfloat16 or float16"):
        fused_vocab_parallel_agpo_loss(
            z.long(), torch.zeros(6, dtype=torch.long), torch.zeros(6), cfg
        )
    long6 = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden\[6, 4\].*weight\[10, 3\]"):
        fused_output_layer_agpo_loss(torch.randn(6, 4), torch.randn(10, 3), long6,
                                     torch.zeros(6), cfg)  # fmt: skip
    with pytest.raises(TypeError, match=r"hidden is torch.float32 but weight is torch.bfloat16"):
        fused_output_layer_agpo_loss(torch.randn(6, 4), torch.randn(10, 4).bfloat16(), long6,
                                     torch.zeros(6), cfg)  # fmt: skip
    with pytest.raises(ValueError, match=r"producer='cuda': must be 'torch' or 'triton'"):
        fused_vocab_parallel_agpo_loss(z, long6, torch.zeros(6), cfg, producer="cuda")
    try:  # CPU logits outside Triton's interpreter (whatever another test module loaded)
        from megatron_agpo.ops import triton_agpo

        monkeypatch.setattr(triton_agpo, "available_on", lambda t: t.is_cuda)
    except ImportError:
        pass  # no triton: the error says so instead
    with pytest.raises(RuntimeError, match=r"^producer='triton' needs (the triton|CUDA logits)"):
        fused_vocab_parallel_agpo_loss(z, long6, torch.zeros(6), cfg, producer="triton")
    with pytest.raises(ValueError, match=r"compute_entropy=False but entropy_coef=0.01"):
        fused_vocab_parallel_agpo_loss(z, long6, torch.zeros(6), PolicyLossConfig(
            entropy_coef=0.01), compute_entropy=False)  # fmt: skip


# Host synchronisation. Each of these reads a tensor's value on the host (on CUDA: waits for
# the device); none may run inside the loss.
_SYNC_METHODS = ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__")


def _full_problem(dtype=torch.float64, device="cpu"):
    """Every feature on: KL, TIS, an entropy term, GSPO row ids, padded vocabulary."""
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", **CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(3, 5, 23, 8, 6)
    row = torch.arange(3).repeat_interleave(5)
    on = lambda x: x.to(device)  # noqa: E731
    ex = {k: on(x) for k, x in extra.items()}
    w_pad = torch.cat([weight, torch.zeros(2, 8, dtype=weight.dtype)])
    args = (on(target), on(adv), cfg)
    kw = dict(row=on(row), vocab_size=23, chunk_size=4, **ex)
    return on(hidden.to(dtype)), on(w_pad.to(dtype)), args, kw, on(mask)


def _run_both(hidden, weight, args, kw, mask):
    """One forward and backward of each fused function; the upstream gradients reach loss,
    logp and entropy, so every backward branch runs."""
    z = (hidden @ weight.t()).detach().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, *args, **kw)
    objective(out, mask, args[2].agg_mode).backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(h, w, *args, vocab_chunk_size=5, **kw)
    objective(out2, mask, args[2].agg_mode).backward()
    return z.grad, h.grad, w.grad


def test_no_host_sync_in_forward_or_backward(monkeypatch):
    hidden, weight, args, kw, _ = _full_problem()
    calls = []

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            calls.append(name)
            return orig(self, *a, **k)

        return wrapper

    def count(fn):
        calls.clear()
        with monkeypatch.context() as m:
            for name in _SYNC_METHODS:
                m.setattr(torch.Tensor, name, counting(name))
            fn()
        return list(calls)

    z = (hidden @ weight.t()).detach().requires_grad_()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = {}

    def forward_backward():
        outs["z"] = fused_vocab_parallel_agpo_loss(z, *args, **kw)
        outs["h"] = fused_output_layer_agpo_loss(h, w, *args, vocab_chunk_size=5, **kw)
        grads = [torch.ones_like(outs["z"].loss), torch.ones_like(outs["z"].logp)]
        torch.autograd.backward(
            [outs["z"].loss, outs["z"].logp, outs["z"].entropy,
             outs["h"].loss, outs["h"].logp, outs["h"].entropy],
            [grads[0], 0.3 * grads[1], 0.2 * grads[1]] * 2,
        )  # fmt: skip

    assert count(forward_backward) == []
    assert z.grad is not None and w.grad is not None and h.grad is not None
    # The counter sees syncs where there are some: the debugging check makes them.
    assert "__bool__" in count(lambda: fused_vocab_parallel_agpo_loss(z, *args, validate=True,
                                                                      **kw))  # fmt: skip


def test_runs_on_the_meta_device():
    # Meta tensors have shapes and no values: any op that needs a value on the host (a sync
    # on CUDA, in C++ as well as in Python) raises here.
    hidden, weight, args, kw, mask = _full_problem(torch.float32, "meta")
    zg, hg, wg = _run_both(hidden, weight, args, kw, mask)
    assert zg.device.type == hg.device.type == wg.device.type == "meta"
    assert zg.shape == (15, 25) and wg.shape == (25, 8)
    zb = (hidden @ weight.t()).bfloat16().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(zb, *args, inplace=False, **kw)
    out.loss.sum().backward()
    assert zb.grad.dtype == torch.bfloat16


def _tp2_body(rank, world, seed):
    torch.manual_seed(0)
    b, t, v, h = 3, 9, 2 * 37, 8  # each rank holds 37 vocabulary entries; chunk 4 splits 27 tokens
    vl = v // world
    sl = slice(rank * vl, (rank + 1) * vl)
    group = dist.group.WORLD
    # Count the collectives: a constant per call, whatever the number of chunks.
    calls = []
    orig_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):
        calls.append(tuple(tensor.shape))
        return orig_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting_all_reduce
    for mode in MODES:
        for full in (False, True):
            cfg = PolicyLossConfig(agg_mode=mode, **(CFG_FULL if full else {}))
            hidden, weight, target, adv, mask, extra = make_problem(b, t, v, h, seed)
            ref_loss, ref_out, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra,
                                                      cfg)  # fmt: skip
            z = (hidden @ weight[sl].t()).requires_grad_()
            calls.clear()
            out = fused_vocab_parallel_agpo_loss(
                z, target, adv, cfg, tp_group=group, chunk_size=4, **extra
            )
            assert calls == [(b * t,), (3, b * t)], calls  # 7 chunks, 2 collectives
            loss = objective(out, mask, mode)
            loss.backward()
            torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                out.entropy.detach(), ref_out.entropy.detach(), rtol=1e-11, atol=1e-12
            )
            torch.testing.assert_close(z.grad, gz[:, sl], rtol=1e-10, atol=1e-12)

            hh = hidden.clone().requires_grad_()
            w = weight[sl].clone().requires_grad_()
            calls.clear()
            out2 = fused_output_layer_agpo_loss(
                hh, w, target, adv, cfg, tp_group=group, chunk_size=4, vocab_chunk_size=10,
                **extra,
            )  # fmt: skip
            objective(out2, mask, mode).backward()
            assert calls == [(b * t,), (3, b * t), (b * t, h)], calls  # + dLoss/dhidden
            torch.testing.assert_close(hh.grad, gh, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(w.grad, gw[sl], rtol=1e-10, atol=1e-12)

    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(b, t, v, h, seed)
    _, _, gh, gw, gz = reference(hidden, weight, target, adv, mask, extra, cfg)
    # A target that is its rank's largest logit (z[y] - max = 0 on its owner).
    z_top = hidden @ weight.t()
    target = target.clone()
    target[0] = int(z_top[0, sl].argmax()) + rank * vl if rank == 0 else target[0]
    dist.broadcast(target, 0)
    _, ref_top, _, _, gz_top = reference(hidden, weight, target, adv, mask, extra, cfg)
    zt = (hidden @ weight[sl].t()).requires_grad_()
    outt = fused_vocab_parallel_agpo_loss(zt, target, adv, cfg, tp_group=group, **extra)
    objective(outt, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(outt.logp.detach(), ref_top.logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zt.grad, gz_top[:, sl], rtol=1e-10, atol=1e-12)

    # bf16 at TP=2: gradients against float64 at the rounded logits.
    zb = (hidden @ weight.t()).bfloat16()
    zr = zb.double().requires_grad_()
    objective(naive_agpo_loss(zr, target, adv, cfg, dtype=torch.float64, **extra), mask,
              cfg.agg_mode).backward()  # fmt: skip
    zl = zb[:, sl].clone().requires_grad_()
    outb = fused_vocab_parallel_agpo_loss(zl, target, adv, cfg, tp_group=group, chunk_size=4,
                                          **extra)  # fmt: skip
    objective(outb, mask, cfg.agg_mode).backward()
    assert zl.grad.dtype == torch.bfloat16
    assert _rel_err(zl.grad, zr.grad[:, sl]) < 1.5 * _rel_err(zr.grad.bfloat16(), zr.grad) + 1e-3

    # GSPO row ids at TP=2 (both row layouts).
    gcfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean")
    row = torch.arange(b).repeat_interleave(t)
    gref = reference(hidden, weight, target, adv, mask, dict(old_logp=extra["old_logp"], row=row),
                     gcfg)  # fmt: skip
    for kw in (dict(row=row), dict(row=row, num_rows=b)):
        zg = (hidden @ weight[sl].t()).requires_grad_()
        outg = fused_vocab_parallel_agpo_loss(
            zg, target, adv, gcfg, tp_group=group, chunk_size=4, old_logp=extra["old_logp"], **kw
        )
        lg = objective(outg, mask, gcfg.agg_mode)
        lg.backward()
        torch.testing.assert_close(lg, gref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zg.grad, gref[4][:, sl], rtol=1e-10, atol=1e-12)

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
    objective(outp, mask, cfg.agg_mode).backward()
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
    objective(outn, mask, cfg.agg_mode).backward()
    torch.testing.assert_close(zn.grad, gz_top[:, sl], rtol=1e-10, atol=1e-12)
    dist.all_reduce = orig_all_reduce


@pytest.mark.dist
def test_tp2_gloo_equals_float64_reference():
    # One pair of processes for every mode (process start-up dominates on a 2-core machine).
    run_distributed(_tp2_body, 2, 11)


@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.03, 0.04)])
@pytest.mark.parametrize("num_rows", [None, 5])
def test_gspo_sequence_ratio_equals_the_paper(eps, num_rows):
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

    kw = dict(old_logp=old, row=row, num_rows=num_rows)
    z = (hidden @ weight.t()).requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, target, adv, cfg, chunk_size=7, **kw)
    loss = aggregate(out.loss.view(b, t), mask, cfg.agg_mode)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-13)

    hh, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out2 = fused_output_layer_agpo_loss(hh, w, target, adv, cfg, vocab_chunk_size=9, **kw)
    loss2 = aggregate(out2.loss.view(b, t), mask, cfg.agg_mode)
    loss2.backward()
    torch.testing.assert_close(loss2, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hh.grad, z_ref.grad @ weight, rtol=1e-10, atol=1e-13)
    # The tight ranges clip some sequences and not others.
    s = torch.exp(((logp.detach() - old) * mask.view(-1)).view(b, t).sum(1) / mask.sum(1))
    if eps[0] < 0.1:
        outside = (s < 1 - eps[0]) | (s > 1 + eps[1])
        assert 0 < outside.sum() < b, s


def test_gspo_response_tokens_in_any_row_order():
    # Response tokens only (no padding), rows of different lengths, in a shuffled order:
    # with num_rows the row ids may come in any order; without it they must be grouped.
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean")
    hidden, weight, target, adv, mask, extra = make_problem(4, 6, 30, 8, 12)
    keep = mask.view(-1).bool()
    row = torch.arange(4).repeat_interleave(6)[keep]
    z0, tgt, a, old = (hidden @ weight.t())[keep], target[keep], adv[keep], extra["old_logp"][keep]
    z = z0.clone().requires_grad_()
    out = fused_vocab_parallel_agpo_loss(z, tgt, a, cfg, old_logp=old, row=row)
    out.loss.sum().backward()
    perm = torch.randperm(row.shape[0], generator=torch.Generator().manual_seed(0))
    zp = z0[perm].clone().requires_grad_()
    outp = fused_vocab_parallel_agpo_loss(
        zp, tgt[perm], a[perm], cfg, old_logp=old[perm], row=row[perm], num_rows=4
    )
    outp.loss.sum().backward()
    torch.testing.assert_close(outp.loss.detach(), out.loss.detach()[perm], rtol=0, atol=1e-14)
    torch.testing.assert_close(zp.grad, z.grad[perm], rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="row ids must be non-decreasing"):
        fused_vocab_parallel_agpo_loss(zp.detach(), tgt[perm], a[perm], cfg, old_logp=old[perm],
                                       row=row[perm])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"row ids must be in \[0, num_rows=3\)"):
        fused_vocab_parallel_agpo_loss(zp.detach(), tgt, a, cfg, old_logp=old, row=row,
                                       num_rows=3)  # fmt: skip


def test_gspo_without_row_ids_is_a_clear_error():
    hidden, weight, target, adv, _, extra = make_problem(2, 3, 10, 4, 0)
    cfg = PolicyLossConfig(ratio_level="sequence")
    with pytest.raises(ValueError, match="needs row, each token's sequence index"):
        fused_vocab_parallel_agpo_loss(hidden @ weight.t(), target, adv, cfg, **extra)


@pytest.mark.gpu
def test_cuda_bf16_paths_and_no_sync():
    # The CUDA-only code: bf16 GEMMs accumulating into a float32 main_grad (torch.addmm with
    # out_dtype, or apex's kernel), under CUDA's own sync detector.
    dev = torch.device("cuda")
    cfg = PolicyLossConfig(**CFG_FULL)
    hidden, weight, target, adv, mask, extra = make_problem(4, 32, 301, 16, 3)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    _, _, gh, gw, _ = reference(hb.double(), wb.double(), target, adv, mask, extra, cfg)
    h, w = hb.to(dev).requires_grad_(), wb.to(dev).requires_grad_()
    w.main_grad = torch.zeros(w.shape, device=dev)
    ex = {k: x.to(dev) for k, x in extra.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_output_layer_agpo_loss(
            h, w, target.to(dev), adv.to(dev), cfg, chunk_size=16, vocab_chunk_size=64, **ex
        )
        torch.autograd.backward([out.loss, out.logp], [torch.ones_like(out.loss)] * 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert w.main_grad.abs().sum().item() > 0
    out = fused_output_layer_agpo_loss(h, w, target.to(dev), adv.to(dev), cfg, **ex)
    w.main_grad.zero_()
    h.grad = None
    objective(out, mask.to(dev), cfg.agg_mode).backward()
    assert _rel_err(h.grad.cpu(), gh) < 3 * _rel_err(gh.bfloat16(), gh) + 4e-3
    assert _rel_err(w.main_grad.cpu(), gw) < 8e-3
