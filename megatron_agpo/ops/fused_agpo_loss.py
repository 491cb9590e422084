"""The AGPO policy loss fused into the vocab-parallel cross-entropy path.

Shape legend: N tokens (the response tokens of a micro-batch, flat), V the full vocabulary,
Vl = V / TP the slice this rank holds, c <= Vl its real (unpadded) columns, C tokens of one
chunk, Vc vocabulary columns of one chunk, H the hidden size.

Per token the loss needs only ``logp = z[y] - logsumexp(z)`` (and the entropy, as a metric or
a term). Its gradient with respect to the logits is

    dLoss/dz = a * (onehot(y) - p) - b * p * (log p + H)

with ``a = dLoss/dlogp`` and ``b = dLoss/dH`` known per token once the forward has the
ratio, the advantage and the clip masks. The per-token surrogate is
`megatron_agpo.algorithms.token_loss` itself; its derivative in logp is taken by autograd on
``[N]`` vectors, so the fused and unfused paths share one definition of the objective.

Which path runs where. This module is the pure-PyTorch implementation; it runs on every
device (CPU, CUDA, and the meta device, which the tests use to prove it never reads a value
on the host) and is the reference for any faster producer:

- No host synchronisation in forward or backward: every branch is decided on the host from
  the config and the shapes; the target-range check is a device-side assert
  (``torch._assert_async``; on CUDA a bad id stops the process at the next sync with the
  message below, on CPU it raises at once). ``validate=True`` adds a host check that names
  the offending token indices: it syncs, so the trainer's hot path does not pass it.
- Chunking is per device: a ``[C, c]`` float32 temporary of ``CHUNK_BYTES`` (64 MiB) on the
  CPU, where it stays near the caches, and of ``CUDA_CHUNK_BYTES`` (2 GiB) on CUDA, where a
  chunk must be large enough that launches do not dominate (4 to 8 chunks at N = 16k,
  V = 152k; one chunk below about 3.5k tokens).
- Tensor parallelism costs two collectives per call in the forward, whatever the chunk count:
  each rank keeps its own per-token max, and the statistics are combined once at the end
  (one MAX all-reduce of ``[N]``, one SUM all-reduce of a stacked ``[3, N]``); the output-layer
  backward adds one all-reduce of dLoss/dhidden. Traffic is O(N), never the vocabulary.
- bf16/fp16 logits are never copied to float32 as a whole: the saved softmax numerator
  ``exp(z - max)`` is stored in the logits' own dtype (over the logits with ``inplace=True``,
  else in a workspace of that dtype), and the arithmetic is float32 chunk by chunk.

``fused_output_layer_agpo_loss`` takes the hidden states and the vocab-parallel output weight
instead, so nothing of size ``[N, Vl]`` is ever allocated: the forward computes the logits
token chunk by token chunk; the backward recomputes them vocabulary chunk by vocabulary chunk,
so each row block of the weight gradient is produced by one GEMM and added to megatron's
float32 ``main_grad`` once per call (on CUDA by apex's ``wgrad_gemm_accum_fp32``, megatron's
gradient-accumulation-fusion kernel, where it is installed, else by ``torch.addmm`` with a
float32 output from bf16 inputs; on the CPU by ``addmm_`` into the float32 buffer).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_agpo.algorithms.policy_loss import PolicyLossConfig, check_same_shape, token_loss

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20
"""CPU: size of one [C, c] float32 temporary; the chunk's token count follows from it, so
extra memory is bounded whatever the micro-batch and the vocabulary."""
CUDA_CHUNK_BYTES = 2 * 2**30
"""CUDA: the same bound, large enough that a micro-batch takes a handful of chunks."""
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class FusedLossOutput(NamedTuple):
    """Per-token results, each ``[N]`` in the compute dtype (float64 for float64 inputs, else
    float32; 0 at ignored tokens)."""

    loss: torch.Tensor
    """L_t: aggregate it with `megatron_agpo.algorithms.aggregate` (or any weights)."""
    logp: torch.Tensor
    """log pi(y_t) under the current policy (differentiable)."""
    entropy: torch.Tensor
    """Entropy of the full-vocabulary distribution (differentiable)."""


def chunk_bytes(device: torch.device) -> int:
    """The per-chunk float32 temporary's size on this device (see the module docstring)."""
    return CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES


def chunk_tokens(chunk_size: int | None, cols: int, device: torch.device) -> int:
    """Tokens per chunk: `chunk_size`, or as many as fit the device's chunk bytes."""
    if chunk_size is not None:
        return chunk_size
    return max(1, chunk_bytes(device) // (4 * max(cols, 1)))


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group, tp_size: int) -> None:
    if tp_size > 1:
        dist.all_reduce(t, op=op, group=tp_group)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 in, float64 throughout (for exact checks); otherwise float32 statistics."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(n, vocab, target, advantages, old_logp, ref_logp, rollout_logp, validate):
    """Shapes on the host; the id range on the device (a host check only with `validate`)."""
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")
    check_same_shape(
        target=target,
        advantages=advantages,
        old_logp=old_logp,
        ref_logp=ref_logp,
        rollout_logp=rollout_logp,
    )
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target{list(target.shape)} must be [N] with N = logits rows = {n}")
    bad = (target >= vocab) | ((target < 0) & (target != IGNORE_INDEX))
    if validate:  # host sync: names the tokens, for debugging
        if bad.any():
            idx = bad.nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"target ids out of range [0, {vocab}) at token "
                f"index {idx}: values {target[idx].tolist()} (use {IGNORE_INDEX} for padding)"
            )
        return
    torch._assert_async(
        torch.logical_not(bad.any()),
        f"target ids out of range [0, {vocab}) (use {IGNORE_INDEX} for padding; "
        "validate=True names the tokens)",
    )


def _seq_log_ratio(cfg, logp, old_logp, row, valid, num_rows=None):
    """GSPO's per-token sequence log-ratio (None for a token-level ratio), [N], detached.

    The rows' tokens are all in this call: the trainer's micro-batches hold whole rows, and
    with TP every rank has every token's log-prob after the vocabulary reduction. Without a
    host sync: with `num_rows`, row ids index a [num_rows] buffer directly (any order);
    without it, a row's tokens must be contiguous (the flat layout) and are numbered by where
    the id changes, so the buffer is [N]. Both conditions are device-side asserts.
    """
    if cfg.ratio_level != "sequence":
        return None
    if row is None:
        raise ValueError(
            "PolicyLossConfig.ratio_level='sequence' (GSPO) needs row, each token's sequence "
            "index [N], to average the log-ratio over a sequence"
        )
    if row.shape != logp.shape:
        raise ValueError(f"row{list(row.shape)} must match the tokens [{logp.shape[0]}]")
    n = logp.shape[0]
    row = row.long()
    if num_rows is not None:
        torch._assert_async(
            ((row >= 0) & (row < num_rows)).all(), f"row ids must be in [0, num_rows={num_rows})"
        )
        seg, size = row, num_rows
    else:
        torch._assert_async(
            (row[1:] >= row[:-1]).all(),
            "row ids must be non-decreasing (a row's tokens contiguous); or pass num_rows",
        )
        change = torch.ones_like(row)
        change[1:] = (row[1:] != row[:-1]).long()
        seg, size = torch.cumsum(change, 0) - 1, n
    old = logp if old_logp is None else old_logp.to(logp.dtype)
    diff = torch.where(valid, (logp - old).detach(), torch.zeros_like(logp))
    zeros = torch.zeros(size, dtype=logp.dtype, device=logp.device)
    num = zeros.index_add(0, seg, diff)
    den = zeros.index_add(0, seg, valid.to(logp.dtype))
    return (num / den.clamp(min=1.0)).index_select(0, seg)


def _token_coefficients(
    logp, entropy, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row, num_rows
):
    """L_t and its derivatives in logp (g) and in H (h), by autograd on [N] vectors. With
    GSPO's sequence ratio the ratio's value is the (detached) sequence mean and its gradient
    the token's own log-prob's, so the coefficients stay per token."""
    cast = lambda t: None if t is None else t.to(logp.dtype)  # noqa: E731
    slr = _seq_log_ratio(cfg, logp, old_logp, row, valid, num_rows)
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        ent = entropy.detach().requires_grad_(cfg.needs_entropy_grad)
        tl = token_loss(
            lp,
            cast(old_logp),
            cast(advantages),
            cfg,
            entropy=ent if cfg.needs_entropy_grad else None,
            ref_logp=cast(ref_logp),
            rollout_logp=cast(rollout_logp),
            seq_log_ratio=slr,
        )
        inputs = [lp, ent] if cfg.needs_entropy_grad else [lp]
        grads = torch.autograd.grad(tl.loss.sum(), inputs, allow_unused=True)
    zero = torch.zeros_like(logp)
    g = torch.where(valid, grads[0], zero)
    h = torch.where(valid, grads[1], zero) if cfg.needs_entropy_grad else zero
    return torch.where(valid, tl.loss.detach(), zero), g, h


class _Workspace:
    """Compute-dtype temporaries of at most `elems` elements each, allocated once per call (a
    fresh chunk-sized allocation per chunk would be returned to the OS and page-faulted back
    in every time). `get` returns a contiguous [rows, cols] view of one of them."""

    def __init__(self, elems: int, dtype: torch.dtype, device: torch.device):
        self.elems, self.dtype, self.device = elems, dtype, device
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty(self.elems, dtype=self.dtype, device=self.device)
        return self._bufs[name][: rows * cols].view(rows, cols)


def _chunk_stats(z_CV, store_CV, idx_C, in_range_C, want_entropy, cdt, ws: _Workspace):
    """Local statistics of one chunk of logits (any float dtype), relative to its own max.

    Returns (max m [C], sum e [C], sum e * (z - m) [C] or None, z[y] - m [C], 0 off-slice)
    with e = exp(z - m), computed in `cdt`. e is left in `store_CV` (rounded to its dtype;
    it may be `z_CV` itself, in place) for the backward; `store_CV` None discards it and may
    overwrite `z_CV` when that is already in `cdt`. Per element: max, shift, exp, sum (the
    passes megatron's cross entropy makes); the entropy adds an exp into a workspace and a
    batched dot product.
    """
    c, cols = z_CV.shape
    m = z_CV.amax(dim=1).to(cdt)
    if z_CV.dtype == cdt:
        zs = torch.sub(z_CV, m[:, None], out=z_CV if store_CV is None else store_CV)
    else:  # bf16/fp16: float32 arithmetic in a chunk-sized workspace
        zs = torch.sub(z_CV, m[:, None], out=ws.get("a", c, cols))
    pred = zs.gather(1, idx_C[:, None]).squeeze(1)
    pred = torch.where(in_range_C, pred, torch.zeros_like(pred))
    if want_entropy:
        # sum(e * (z - m)), the entropy's numerator, as one batched dot product (no [C, c]
        # product tensor).
        e = torch.exp(zs, out=ws.get("b", c, cols))
        sez = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(-1)
    else:
        e, sez = zs.exp_(), None
    se = e.sum(dim=1)
    if store_CV is not None and e is not store_CV:
        store_CV.copy_(e)
    return m, se, sez, pred


def _combine_stats(m, se, sez, pred, in_range, want_entropy, tp_group, tp_size):
    """Every rank's per-token statistics into global ones: one MAX and one SUM all-reduce
    per call. Returns (logp, entropy, lse, scale) with p = exp(z - m) * scale on this rank."""
    if tp_size > 1:
        gm = m.clone()
        _all_reduce(gm, dist.ReduceOp.MAX, tp_group, tp_size)
        shift = m - gm  # <= 0: rescales this rank's sums to the global max
        c = torch.exp(shift)
        ent_num = c * (sez + shift * se) if want_entropy else torch.zeros_like(se)
        # pred is 0 on the ranks that do not hold the target; the owner adds z[y] - gm.
        stats = torch.stack([c * se, ent_num, torch.where(in_range, pred + shift, pred)])
        _all_reduce(stats, dist.ReduceOp.SUM, tp_group, tp_size)
        sum_exp, ent_num, pred = stats[0], stats[1], stats[2]
    else:
        gm, c, sum_exp = m, None, se
        ent_num = sez if want_entropy else torch.zeros_like(se)
    log_s = torch.log(sum_exp)
    logp = pred - log_s
    ent = log_s - ent_num / sum_exp
    scale = 1.0 / sum_exp if c is None else c / sum_exp
    return logp, ent, gm + log_s, scale


def _grad_in_place(e_CV, scale, ent, a, b, idx, in_range, entropy_grad, ws: _Workspace):
    """In place: e = p / scale becomes a*(onehot - p) - b*p*(log p + H) (scale None: e is p).
    `entropy_grad` is decided on the host (the config, and whether the entropy output got a
    gradient), never from b's values."""
    if entropy_grad:
        p = e_CV if scale is None else e_CV.mul_(scale[:, None])
        plogp = torch.xlogy(p, p, out=ws.get("b", *p.shape))  # 0 where p underflowed to 0
        plogp.mul_(b[:, None])
        p.mul_(-(a + b * ent)[:, None]).sub_(plogp)
    else:
        e_CV.mul_((-a if scale is None else -a * scale)[:, None])
    # The onehot term: a scatter into the target column (0 added off this rank's slice), not
    # an index of the in-range rows, which would need their count on the host.
    add = torch.where(in_range, a, torch.zeros_like(a)).to(e_CV.dtype)
    return e_CV.scatter_add_(1, idx[:, None], add[:, None])


def _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, dtype):
    """a = dLoss/dlogp and b = dLoss/dH per token, from the output grads and the saved g, h.
    An output that got no gradient arrives as None (materialize_grads is off)."""
    zeros = torch.zeros(ctx.g.shape[0], dtype=dtype, device=ctx.g.device)
    as_cdt = lambda t: zeros if t is None else t.to(dtype)  # noqa: E731
    gl = as_cdt(grad_loss)
    a = gl * ctx.g + as_cdt(grad_logp)
    b = gl * ctx.h + as_cdt(grad_ent)
    return torch.where(ctx.valid, a, zeros), torch.where(ctx.valid, b, zeros)


def _local_columns(vocab_size, vocab_start: int, v_local: int, tp_size: int) -> int:
    """Columns of this rank's slice that are real vocabulary (the rest is TP padding)."""
    if vocab_size is None:
        return v_local
    if not 0 < vocab_size <= v_local * tp_size:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {v_local * tp_size}] (V/TP={v_local} x TP)"
        )
    cols = min(max(vocab_size - vocab_start, 0), v_local)
    if cols < 1:
        raise ValueError(
            f"this rank's vocabulary slice [{vocab_start}, {vocab_start + v_local}) is all "
            f"padding (vocab_size={vocab_size}); pad the vocabulary less"
        )
    return cols


def _check_options(cfg, chunk_size, compute_entropy, num_rows, dtype, name) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None: per device)")
    if num_rows is not None and num_rows < 1:
        raise ValueError(f"num_rows={num_rows} must be >= 1 (or None: rows contiguous)")
    if not compute_entropy and cfg.needs_entropy_grad:
        raise ValueError(
            f"compute_entropy=False but entropy_coef={cfg.entropy_coef}: the entropy term needs it"
        )


def _target_columns(target, vocab_start, cols):
    """Each token's column on this rank (clamped into range) and whether this rank holds it."""
    local = target - vocab_start
    in_range = (local >= 0) & (local < cols)
    return local.clamp(0, cols - 1), in_range


class _FusedVocabParallelAGPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, advantages, old_logp, ref_logp, rollout_logp, row, opts):
        (cfg, tp_group, chunk_size, inplace, vocab_start, vocab_size, compute_entropy,
         num_rows, validate) = opts  # fmt: skip
        ctx.set_materialize_grads(False)
        tp_size, tp_rank = _tp_info(tp_group)
        n, v_local = logits.shape
        if vocab_start is None:
            vocab_start = tp_rank * v_local
        cols = _local_columns(vocab_size, vocab_start, v_local, tp_size)
        chunk = chunk_tokens(chunk_size, cols, logits.device)
        _check_inputs(
            n, vocab_size or v_local * tp_size, target, advantages, old_logp, ref_logp,
            rollout_logp, validate,
        )  # fmt: skip
        cdt, dev = _compute_dtype(logits), logits.device
        # The saved buffer holds exp(z - max) in the logits' dtype. In place it reuses the
        # logits' storage (their only other consumer, the output layer's matmul, saves its
        # inputs, not its output); otherwise a workspace of the same dtype, never float32
        # for bf16 logits.
        buf = logits if inplace else torch.empty_like(logits)
        target = target.long()
        idx, in_range = _target_columns(target, vocab_start, cols)
        m, se, sez, pred = (torch.empty(n, dtype=cdt, device=dev) for _ in range(4))
        ws = _Workspace(min(chunk, n) * cols, cdt, dev)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            cm, cse, csez, cpred = _chunk_stats(
                logits[s:e, :cols], buf[s:e, :cols], idx[s:e], in_range[s:e],
                compute_entropy, cdt, ws,
            )  # fmt: skip
            m[s:e], se[s:e], pred[s:e] = cm, cse, cpred
            if compute_entropy:
                sez[s:e] = csez
        if cols < v_local:
            buf[:, cols:] = 0.0  # padded vocabulary: no probability, no gradient
        logp, ent, _, scale = _combine_stats(
            m, se, sez, pred, in_range, compute_entropy, tp_group, tp_size
        )
        valid = target != IGNORE_INDEX
        zero = torch.zeros_like(logp)
        logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
        loss, g, h = _token_coefficients(
            logp, ent, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row, num_rows
        )
        ctx.buf, ctx.scale, ctx.ent, ctx.g, ctx.h, ctx.valid = buf, scale, ent, g, h, valid
        ctx.idx, ctx.in_range, ctx.cols, ctx.chunk, ctx.cdt = idx, in_range, cols, chunk, cdt
        ctx.entropy_term = cfg.needs_entropy_grad
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        buf, cdt = ctx.buf, ctx.cdt
        a, b = _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, cdt)
        entropy_grad = ctx.entropy_term or grad_ent is not None
        n = buf.shape[0]
        ws = _Workspace(min(ctx.chunk, n) * ctx.cols, cdt, buf.device)
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            stored = buf[s:e, : ctx.cols]
            # bf16: the gradient is formed in float32 and rounded once, into the same storage.
            work = stored if stored.dtype == cdt else ws.get("a", e - s, ctx.cols).copy_(stored)
            _grad_in_place(
                work, ctx.scale[s:e], ctx.ent[s:e], a[s:e], b[s:e], ctx.idx[s:e],
                ctx.in_range[s:e], entropy_grad, ws,
            )  # fmt: skip
            if work is not stored:
                stored.copy_(work)
        ctx.buf = None
        return buf, None, None, None, None, None, None, None


class _TritonVocabParallelAGPOLoss(torch.autograd.Function):
    """The same loss with the one-pass Triton producer (`triton_agpo`): logits are read once
    forward and once backward; statistics, TP combination and surrogate are shared."""

    @staticmethod
    def forward(ctx, logits, target, advantages, old_logp, ref_logp, rollout_logp, row, opts):
        from megatron_agpo.ops import triton_agpo

        (cfg, tp_group, _, inplace, vocab_start, vocab_size, compute_entropy, num_rows,
         validate) = opts  # fmt: skip
        ctx.set_materialize_grads(False)
        tp_size, tp_rank = _tp_info(tp_group)
        n, v_local = logits.shape
        if vocab_start is None:
            vocab_start = tp_rank * v_local
        cols = _local_columns(vocab_size, vocab_start, v_local, tp_size)
        _check_inputs(
            n, vocab_size or v_local * tp_size, target, advantages, old_logp, ref_logp,
            rollout_logp, validate,
        )  # fmt: skip
        target = target.long()
        idx, in_range = _target_columns(target, vocab_start, cols)
        m, se, sez, pred = triton_agpo.local_stats(logits, cols, idx, in_range, compute_entropy)
        logp, ent, lse, _ = _combine_stats(
            m, se, sez, pred, in_range, compute_entropy, tp_group, tp_size
        )
        valid = target != IGNORE_INDEX
        zero = torch.zeros_like(logp)
        logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
        loss, g, h = _token_coefficients(
            logp, ent, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row, num_rows
        )
        ctx.logits, ctx.inplace = logits, inplace  # unchanged until the backward writes it
        ctx.lse, ctx.ent, ctx.g, ctx.h, ctx.valid = lse, ent, g, h, valid
        ctx.idx, ctx.in_range, ctx.cols = idx, in_range, cols
        ctx.entropy_term = cfg.needs_entropy_grad
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        from megatron_agpo.ops import triton_agpo

        z = ctx.logits
        a, b = _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, torch.float32)
        grad = z if ctx.inplace else torch.empty_like(z)
        triton_agpo.logits_grad(
            z, grad, ctx.cols, ctx.lse, ctx.ent, a, b, ctx.idx, ctx.in_range,
            ctx.entropy_term or grad_ent is not None,
        )  # fmt: skip
        ctx.logits = None
        return grad, None, None, None, None, None, None, None


def fused_vocab_parallel_agpo_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    row: torch.Tensor | None = None,
    tp_group=None,
    chunk_size: int | None = None,
    inplace: bool = False,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    compute_entropy: bool = True,
    num_rows: int | None = None,
    validate: bool = False,
    producer: str = "torch",
) -> FusedLossOutput:
    """Per-token AGPO loss from vocab-parallel logits ``[N, Vl]`` (float64/32, bf16, fp16).

    Pure PyTorch, any device, no host sync (see the module docstring for what runs where).
    N is any set of tokens: the trainer passes only response tokens, flat.

    target: ``[N]`` global token ids, IGNORE_INDEX (-100) for padding. advantages, old_logp,
    ref_logp, rollout_logp: ``[N]`` (old_logp None: on-policy). row: ``[N]`` each token's
    sequence index, needed by GSPO's sequence ratio (cfg.ratio_level="sequence"); every token
    of a sequence must be in the call, and a row's tokens contiguous unless num_rows (an upper
    bound on the row ids) is given. tp_group: the tensor-parallel group the vocabulary is split
    over (None: no TP). inplace: write the softmax and then the gradient over the logits, as
    megatron's cross entropy does (any dtype); only for logits nothing else reads afterwards.
    vocab_size: the real vocabulary; columns at or past it are TP padding, left out of the
    softmax (their gradient is 0). compute_entropy=False saves an exp pass and a workspace;
    the entropy output is then 0 and cfg.entropy_coef must be 0. chunk_size: tokens per
    chunk; None sizes a chunk's float32 temporary per device (`chunk_bytes`). validate: check
    the target ids on the host and name the bad tokens (a host sync; for debugging).
    producer: "torch" (this module, every device) or "triton" (`triton_agpo`: one pass over
    the logits each way; CUDA, or the CPU under TRITON_INTERPRET=1; chunk_size is unused).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V/TP], got shape {tuple(logits.shape)}")
    _check_options(cfg, chunk_size, compute_entropy, num_rows, logits.dtype, "logits")
    opts = (cfg, tp_group, chunk_size, inplace, vocab_start, vocab_size, compute_entropy,
            num_rows, validate)  # fmt: skip
    fn = _FusedVocabParallelAGPOLoss
    if producer == "triton":
        fn = _triton_function(logits)
    elif producer != "torch":
        raise ValueError(f"producer={producer!r}: must be 'torch' or 'triton'")
    out = fn.apply(logits, target, advantages, old_logp, ref_logp, rollout_logp, row, opts)
    return FusedLossOutput(*out)


def _triton_function(logits: torch.Tensor):
    """The Triton autograd function, or a one-line error saying what is missing."""
    try:
        from megatron_agpo.ops import triton_agpo
    except ImportError as e:
        raise RuntimeError(
            f"producer='triton' needs the triton package, not in the default set-up ({e})"
        ) from None
    if not triton_agpo.available_on(logits):
        raise RuntimeError(
            "producer='triton' needs CUDA logits (or TRITON_INTERPRET=1 to run it on the CPU)"
        )
    if logits.stride(1) != 1:
        raise ValueError("producer='triton' needs logits with contiguous rows (stride 1)")
    return _TritonVocabParallelAGPOLoss


_WGRAD_KERNEL = None
_MIXED_ADDMM = True
"""torch.addmm(..., out_dtype=float32) works for bf16 inputs on this CUDA build (until it fails)."""
# apex's extension: megatron's gradient-accumulation-fusion kernel (CUDA builds only).
with contextlib.suppress(ImportError):
    import fused_weight_gradient_mlp_cuda as _WGRAD_KERNEL  # type: ignore[no-redef]


def _gemm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulated in acc's dtype (float32 main_grad from bf16 inputs).

    CUDA, bf16/fp16 inputs: one tensor-core GEMM whose output is the float32 buffer itself
    (torch.addmm with out_dtype, beta = 1). Elsewhere, or for inputs already in acc's dtype,
    addmm_ in acc's dtype (the CPU has no mixed-precision addmm; the inputs are cast, a
    [rows, k] copy, never [rows, cols] of acc)."""
    global _MIXED_ADDMM
    if a.dtype != acc.dtype and acc.is_cuda and _MIXED_ADDMM:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            # A torch without the mixed-precision addmm (it fails at dispatch, on the host,
            # before any kernel runs): fall back for the rest of the process.
            _MIXED_ADDMM = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _weight_grad_accumulate(main_grad_VH, dz_NV, hidden_NH) -> None:
    """main_grad += dz^T @ hidden: megatron's fused kernel where apex provides it."""
    if (
        _WGRAD_KERNEL is not None
        and main_grad_VH.is_cuda
        and main_grad_VH.dtype == torch.float32
        and dz_NV.dtype in (torch.bfloat16, torch.float16)
        and main_grad_VH.is_contiguous()
    ):
        _WGRAD_KERNEL.wgrad_gemm_accum_fp32(hidden_NH, dz_NV.contiguous(), main_grad_VH)
        return
    _gemm_accumulate(main_grad_VH, dz_NV.t(), hidden_NH)


class _FusedOutputLayerAGPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, advantages, old_logp, ref_logp, rollout_logp, row,
                opts):  # fmt: skip
        (cfg, tp_group, chunk_size, vocab_chunk_size, vocab_start, reduce_hidden_grad,
         vocab_size, compute_entropy, num_rows, validate) = opts  # fmt: skip
        ctx.set_materialize_grads(False)
        tp_size, tp_rank = _tp_info(tp_group)
        n = hidden.shape[0]
        v_local = weight.shape[0]
        if vocab_start is None:
            vocab_start = tp_rank * v_local
        cols = _local_columns(vocab_size, vocab_start, v_local, tp_size)
        chunk = chunk_tokens(chunk_size, cols, hidden.device)
        _check_inputs(
            n, vocab_size or v_local * tp_size, target, advantages, old_logp, ref_logp,
            rollout_logp, validate,
        )  # fmt: skip
        target = target.long()
        cdt, dev = _compute_dtype(hidden), hidden.device
        w_valid = weight[:cols]
        idx, in_range = _target_columns(target, vocab_start, cols)
        # The chunk's logits, in the weights' dtype (a bf16 GEMM gives bf16 logits, as
        # megatron's output layer does); the statistics are float32 either way.
        zbuf = torch.empty(min(chunk, n), cols, dtype=hidden.dtype, device=dev)
        ws = _Workspace(min(chunk, n) * cols, cdt, dev)
        m, se, sez, pred = (torch.empty(n, dtype=cdt, device=dev) for _ in range(4))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = torch.mm(hidden[s:e], w_valid.t(), out=zbuf[: e - s])
            cm, cse, csez, cpred = _chunk_stats(
                z, None, idx[s:e], in_range[s:e], compute_entropy, cdt, ws
            )
            m[s:e], se[s:e], pred[s:e] = cm, cse, cpred
            if compute_entropy:
                sez[s:e] = csez
        del zbuf, ws
        logp, ent, lse, _ = _combine_stats(
            m, se, sez, pred, in_range, compute_entropy, tp_group, tp_size
        )
        valid = target != IGNORE_INDEX
        zero = torch.zeros_like(logp)
        logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
        loss, g, h = _token_coefficients(
            logp, ent, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row, num_rows
        )
        ctx.save_for_backward(hidden, weight)
        ctx.lse, ctx.ent, ctx.g, ctx.h, ctx.valid = lse, ent, g, h, valid
        ctx.local, ctx.cols, ctx.cdt = target - vocab_start, cols, cdt
        ctx.vocab_chunk = vocab_chunk_size or chunk_tokens(None, n, dev)  # [N, Vc] per chunk
        ctx.tp_group, ctx.tp_size, ctx.reduce_hidden_grad = tp_group, tp_size, reduce_hidden_grad
        ctx.entropy_term = cfg.needs_entropy_grad
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        hidden, weight = ctx.saved_tensors
        n, cdt, cols, dev = hidden.shape[0], ctx.cdt, ctx.cols, hidden.device
        a, b = _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, cdt)
        entropy_grad = ctx.entropy_term or grad_ent is not None
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        main_grad = getattr(weight, "main_grad", None) if want_w else None
        # Megatron's DDP gives parameters a float32 `main_grad` (gradient accumulation
        # fusion): the weight gradient is added there, and no second [Vl, H] tensor exists.
        grad_weight = None
        if want_w and main_grad is None:
            grad_weight = torch.zeros_like(weight)  # padded rows stay 0
        # dLoss/dhidden sums over vocabulary chunks: accumulated in the compute dtype.
        dh = torch.zeros(n, hidden.shape[1], dtype=cdt, device=dev) if want_h else None
        vc = min(ctx.vocab_chunk, cols)
        ws = _Workspace(n * vc, cdt, dev)
        low = None if hidden.dtype == cdt else _Workspace(n * vc, hidden.dtype, dev)
        # Vocabulary chunks: each weight row block gets its gradient from one GEMM, added to
        # main_grad once per call; every chunk needs only per-token [N] statistics.
        for v0 in range(0, cols, vc):
            v1 = min(v0 + vc, cols)
            w_c = weight[v0:v1]
            z = ws.get("a", n, v1 - v0)
            if low is None:
                torch.mm(hidden, w_c.t(), out=z)
            else:  # a bf16 GEMM (tensor cores), then float32 arithmetic
                z.copy_(torch.mm(hidden, w_c.t(), out=low.get("z", n, v1 - v0)))
            z.sub_(ctx.lse[:, None]).exp_()  # p, normalised: lse is already global
            local = ctx.local - v0
            in_c = (local >= 0) & (local < v1 - v0)
            idx = local.clamp(0, v1 - v0 - 1)
            dz = _grad_in_place(z, None, ctx.ent, a, b, idx, in_c, entropy_grad, ws)
            if low is not None:  # rounded once, for the bf16 GEMMs
                dz = low.get("z", n, v1 - v0).copy_(dz)
            if dh is not None:
                _gemm_accumulate(dh, dz, w_c)
            if main_grad is not None:
                _weight_grad_accumulate(main_grad[v0:v1], dz, hidden)
            elif grad_weight is not None:
                torch.mm(dz.t(), hidden, out=grad_weight[v0:v1])
        grad_hidden = None
        if dh is not None:
            grad_hidden = dh if dh.dtype == hidden.dtype else dh.to(hidden.dtype)
            if ctx.reduce_hidden_grad:
                # Each rank's logits slice contributes a partial dLoss/dhidden; the hidden
                # states were replicated over TP, so their gradient is the sum.
                _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group, ctx.tp_size)
        # With main_grad, no autograd grad; grad_added_to_main_grad is left alone: with tied
        # embeddings the same parameter also gets the embedding lookup's ordinary .grad,
        # which megatron's DDP hook would skip if it were set.
        return (grad_hidden, grad_weight) + (None,) * 7


def fused_output_layer_agpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    row: torch.Tensor | None = None,
    tp_group=None,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
    reduce_hidden_grad: bool = True,
    vocab_size: int | None = None,
    compute_entropy: bool = True,
    num_rows: int | None = None,
    validate: bool = False,
    vocab_chunk_size: int | None = None,
) -> FusedLossOutput:
    """Per-token AGPO loss from hidden states ``[N, H]`` and the output weight ``[Vl, H]``.

    Pure PyTorch, any device, no host sync. Logits are computed token chunk by token chunk in
    the forward and vocabulary chunk by vocabulary chunk in the backward (four GEMMs of
    N x Vl x H in all, against the unfused path's three), never as a whole. hidden and weight
    share one dtype; with bf16 the GEMMs run in bf16 and dLoss/dhidden and the weight gradient
    accumulate in float32 (into ``weight.main_grad`` when megatron's DDP gave it one, else
    into a bf16 ``.grad`` written once per row block). reduce_hidden_grad: all-reduce
    dLoss/dhidden over the TP group here; pass False when the caller's own TP region
    (megatron's ``copy_to_tensor_model_parallel_region``, or sequence parallelism's gather)
    already does it. vocab_chunk_size: columns per backward chunk (None: a float32 [N, Vc]
    temporary of the device's chunk bytes). Other arguments: `fused_vocab_parallel_agpo_loss`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden{list(hidden.shape)} must be [N, H] and weight{list(weight.shape)} "
            "[V/TP, H] with the same H"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one")
    _check_options(cfg, chunk_size, compute_entropy, num_rows, hidden.dtype, "hidden")
    if vocab_chunk_size is not None and vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size={vocab_chunk_size} must be >= 1 (or None)")
    opts = (cfg, tp_group, chunk_size, vocab_chunk_size, vocab_start, reduce_hidden_grad,
            vocab_size, compute_entropy, num_rows, validate)  # fmt: skip
    out = _FusedOutputLayerAGPOLoss.apply(
        hidden, weight, target, advantages, old_logp, ref_logp, rollout_logp, row, opts
    )
    return FusedLossOutput(*out)
