"""The AGPO policy loss fused into the vocab-parallel cross-entropy path.

Shape legend: N tokens (flattened micro-batch), V the full vocabulary, Vl = V / TP the slice
this rank holds, H the hidden size.

Per token the loss needs only ``logp = z[y] - logsumexp(z)`` (and the entropy, as a metric or
a term). Its gradient with respect to the logits is

    dLoss/dz = a * (onehot(y) - p) - b * p * (log p + H)

with ``a = dLoss/dlogp`` and ``b = dLoss/dH`` known per token once the forward has the
ratio, the advantage and the clip masks. So, like megatron's ``vocab_parallel_cross_entropy``:

- the max and three per-token sums (sum exp, sum exp*z for the entropy, the target logit)
  are all-reduced over the TP group: O(N) traffic, never the vocabulary;
- one ``[N, Vl]`` buffer of exp(z - max) is kept (written over the logits when
  ``inplace=True``) and the backward turns it into the gradient in place, one elementwise
  pass per chunk;
- tokens are processed in chunks so the temporaries are ``[chunk, Vl]``, whatever N is.

``fused_output_layer_agpo_loss`` goes one step further and takes the hidden states and the
vocab-parallel output weight: logits exist only chunk by chunk (recomputed in the backward),
so nothing of size ``[N, Vl]`` is ever allocated.

The per-token surrogate is `megatron_agpo.algorithms.token_loss` itself; its derivative in
logp is taken by autograd on ``[N]`` vectors, so the fused and unfused paths share one
definition of the objective.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_agpo.algorithms.policy_loss import (
    PolicyLossConfig,
    check_same_shape,
    sequence_log_ratio_flat,
    token_loss,
)

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20
"""Default size of one [chunk, Vl] float32 temporary: the chunk's token count follows from it,
so extra memory is bounded whatever the micro-batch and the vocabulary."""


def _chunk_tokens(chunk_size: int | None, v_local: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_BYTES // (4 * v_local))
    return chunk_size


class FusedLossOutput(NamedTuple):
    """Per-token results, each ``[N]`` float32 (0 at ignored tokens)."""

    loss: torch.Tensor
    """L_t: aggregate it with `megatron_agpo.algorithms.aggregate` (or any weights)."""
    logp: torch.Tensor
    """log pi(y_t) under the current policy (differentiable)."""
    entropy: torch.Tensor
    """Entropy of the full-vocabulary distribution (differentiable)."""


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group, tp_size: int) -> None:
    if tp_size > 1:
        dist.all_reduce(t, op=op, group=tp_group)


def _check_inputs(n, vocab, target, advantages, old_logp, ref_logp, rollout_logp):
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
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"target ids out of range [0, {vocab}) at token "
            f"index {idx}: values {target[idx].tolist()} (use {IGNORE_INDEX} for padding)"
        )


def _seq_log_ratio(cfg, logp, old_logp, row, valid):
    """GSPO's per-token sequence log-ratio (None for a token-level ratio). The rows' tokens
    are all in this call: the trainer's micro-batches hold whole rows, and with TP every rank
    has every token's log-prob after the vocabulary reduction."""
    if cfg.ratio_level != "sequence":
        return None
    if row is None:
        raise ValueError(
            "PolicyLossConfig.ratio_level='sequence' (GSPO) needs row, each token's sequence "
            "index [N], to average the log-ratio over a sequence"
        )
    if row.shape != logp.shape:
        raise ValueError(f"row{list(row.shape)} must match the tokens [{logp.shape[0]}]")
    old = logp if old_logp is None else old_logp.to(logp.dtype)
    return sequence_log_ratio_flat(logp, old, row.long(), valid)


def _token_coefficients(
    logp, entropy, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row=None
):
    """L_t and its derivatives in logp (g) and in H (h), by autograd on [N] vectors. With
    GSPO's sequence ratio the ratio's value is the (detached) sequence mean and its gradient
    the token's own log-prob's, so the coefficients stay per token."""
    cast = lambda t: None if t is None else t.to(logp.dtype)  # noqa: E731
    slr = _seq_log_ratio(cfg, logp, old_logp, row, valid)
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 in, float64 throughout (for exact checks); otherwise float32 statistics."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_stats(z_CV, tgt_C, vocab_start, tp_group, tp_size, exp_out, want_entropy, work):
    """Max-shifted exp of one chunk and the per-token all-reduced stats.

    Returns (max [C], sum_exp [C], target_logit_shifted [C], entropy [C] or None, exp [C, Vl]).
    The exp is written to `exp_out` (the saved buffer; it may be `z_CV` itself, in place),
    or over `z_CV` when `exp_out` is None. Per element that is max, shift, exp, sum: the passes
    megatron's cross entropy makes. The entropy adds a dot product and a copy through `work`, a
    [C, Vl] workspace allocated once per call (a fresh chunk-sized allocation per chunk would be
    returned to the OS and page-faulted back in every time).
    """
    mx = z_CV.max(dim=-1).values
    _all_reduce(mx, dist.ReduceOp.MAX, tp_group, tp_size)
    out = z_CV if exp_out is None else exp_out
    zs = torch.sub(z_CV, mx[:, None], out=out)
    local = tgt_C - vocab_start
    in_range = (local >= 0) & (local < z_CV.shape[1])
    pred = zs.gather(1, local.clamp(0, z_CV.shape[1] - 1)[:, None]).squeeze(1)
    pred = torch.where(in_range, pred, torch.zeros_like(pred))
    stats = torch.empty(3, z_CV.shape[0], dtype=z_CV.dtype, device=z_CV.device)
    if want_entropy:
        # sum(e * (z - max)), the entropy's numerator, as one batched dot product (no
        # [C, Vl] product tensor); the exp then moves into the buffer.
        e = torch.exp(zs, out=work)
        stats[2] = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(-1)
        e = zs.copy_(e)
    else:
        e = zs.exp_()
        stats[2] = 0.0
    stats[0] = e.sum(dim=-1)
    stats[1] = pred
    _all_reduce(stats, dist.ReduceOp.SUM, tp_group, tp_size)
    sum_exp, pred, sez = stats[0], stats[1], stats[2]
    ent = torch.log(sum_exp) - sez / sum_exp if want_entropy else None
    return mx, sum_exp, pred, ent, e


def _chunk_logits(h_CH, w_VH, out_CV, cdt) -> torch.Tensor:
    """h @ w^T for one chunk, into the reused workspace when the dtypes allow it."""
    if h_CH.dtype == cdt and w_VH.dtype == cdt:
        return torch.mm(h_CH, w_VH.t(), out=out_CV)
    return (h_CH @ w_VH.t()).to(cdt)


def _grad_from_exp(e_CV, sum_exp, ent, a, b, tgt_C, vocab_start) -> torch.Tensor:
    """In place: e = exp(z - max) becomes a*(onehot - p) - b*p*(log p + H), p = e / sum_exp."""
    if bool((b != 0).any()):
        e_CV.div_(sum_exp[:, None])  # now p
        plogp = torch.xlogy(e_CV, e_CV)  # 0 where p underflowed to 0, not NaN
        plogp.mul_(b[:, None])
        e_CV.mul_(-(a + b * ent)[:, None]).sub_(plogp)
    else:
        e_CV.mul_((-a / sum_exp)[:, None])
    local = tgt_C - vocab_start
    in_range = (local >= 0) & (local < e_CV.shape[1])
    rows = in_range.nonzero().squeeze(1)
    e_CV[rows, local[rows]] += a[rows].to(e_CV.dtype)
    return e_CV


def _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, dtype):
    """a = dLoss/dlogp and b = dLoss/dH per token, from the output grads and the saved g, h."""
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


def _check_options(cfg: PolicyLossConfig, chunk_size: int, compute_entropy: bool) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None: from CHUNK_BYTES)")
    if not compute_entropy and cfg.needs_entropy_grad:
        raise ValueError(
            f"compute_entropy=False but entropy_coef={cfg.entropy_coef}: the entropy term needs it"
        )


class _FusedVocabParallelAGPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        advantages,
        old_logp,
        ref_logp,
        rollout_logp,
        row,
        cfg,
        tp_group,
        chunk_size,
        inplace,
        vocab_start,
        vocab_size,
        compute_entropy,
    ):
        tp_size, tp_rank = _tp_info(tp_group)
        n, v_local = logits.shape
        if vocab_start is None:
            vocab_start = tp_rank * v_local
        cols = _local_columns(vocab_size, vocab_start, v_local, tp_size)
        chunk_size = _chunk_tokens(chunk_size, v_local)
        _check_inputs(
            n,
            vocab_size or v_local * tp_size,
            target,
            advantages,
            old_logp,
            ref_logp,
            rollout_logp,
        )
        # The saved buffer holds exp(z - max). In place it reuses the logits' storage (their
        # only other consumer, the output layer's matmul, saves its inputs, not its output).
        cdt = _compute_dtype(logits)
        inplace = inplace and logits.dtype == cdt
        dev = logits.device
        buf = logits if inplace else torch.empty(n, v_local, dtype=cdt, device=dev)
        target = target.long()
        sum_exp, pred, ent = (torch.empty(n, dtype=cdt, device=dev) for _ in range(3))
        rows_w = min(chunk_size, n) if compute_entropy else 0
        work = torch.empty(rows_w, cols, dtype=cdt, device=dev)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = logits[s:e, :cols].to(cdt)  # a view when already cdt: never written to
            _, se, pr, en, _ = _chunk_stats(
                z,
                target[s:e],
                vocab_start,
                tp_group,
                tp_size,
                buf[s:e, :cols],
                compute_entropy,
                work[: e - s],
            )
            if cols < v_local:
                buf[s:e, cols:] = 0.0  # padded vocabulary: no probability, no gradient
            sum_exp[s:e], pred[s:e] = se, pr
            ent[s:e] = en if compute_entropy else 0.0
        valid = target != IGNORE_INDEX
        logp = torch.where(valid, pred - torch.log(sum_exp), torch.zeros_like(pred))
        ent = torch.where(valid, ent, torch.zeros_like(ent))
        loss, g, h = _token_coefficients(
            logp, ent, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row
        )
        ctx.buf, ctx.sum_exp, ctx.ent, ctx.g, ctx.h = buf, sum_exp, ent, g, h
        ctx.target, ctx.valid, ctx.vocab_start, ctx.cols = target, valid, vocab_start, cols
        ctx.chunk_size, ctx.out_dtype = chunk_size, logits.dtype
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        buf = ctx.buf
        a, b = _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, buf.dtype)
        n = buf.shape[0]
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            _grad_from_exp(
                buf[s:e, : ctx.cols],
                ctx.sum_exp[s:e],
                ctx.ent[s:e],
                a[s:e],
                b[s:e],
                ctx.target[s:e],
                ctx.vocab_start,
            )
        grad = buf if buf.dtype == ctx.out_dtype else buf.to(ctx.out_dtype)
        ctx.buf = None
        return (grad,) + (None,) * 13


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
) -> FusedLossOutput:
    """Per-token AGPO loss from vocab-parallel logits ``[N, Vl]``.

    target: ``[N]`` global token ids, IGNORE_INDEX (-100) for padding. advantages, old_logp,
    ref_logp, rollout_logp: ``[N]`` (old_logp None: on-policy). row: ``[N]`` each token's
    sequence index, needed by GSPO's sequence ratio (cfg.ratio_level="sequence"); every token
    of a sequence must be in the call. tp_group: the tensor-parallel
    group the vocabulary is split over (None: no TP). inplace: write the softmax and then the
    gradient over the logits, as megatron's cross entropy does; only for fp32 logits that
    nothing else reads afterwards. vocab_size: the real vocabulary; columns at or past it are
    TP padding, left out of the softmax (their gradient is 0). compute_entropy=False saves a
    multiply-add pass; the entropy output is then 0 and cfg.entropy_coef must be 0.
    chunk_size: tokens per chunk; None sizes a chunk's [chunk, Vl] float32 temporary to
    CHUNK_BYTES.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V/TP], got shape {tuple(logits.shape)}")
    _check_options(cfg, chunk_size, compute_entropy)
    out = _FusedVocabParallelAGPOLoss.apply(
        logits,
        target,
        advantages,
        old_logp,
        ref_logp,
        rollout_logp,
        row,
        cfg,
        tp_group,
        chunk_size,
        inplace,
        vocab_start,
        vocab_size,
        compute_entropy,
    )
    return FusedLossOutput(*out)


class _FusedOutputLayerAGPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        advantages,
        old_logp,
        ref_logp,
        rollout_logp,
        row,
        cfg,
        tp_group,
        chunk_size,
        vocab_start,
        reduce_hidden_grad,
        vocab_size,
        compute_entropy,
    ):
        tp_size, tp_rank = _tp_info(tp_group)
        n = hidden.shape[0]
        v_local = weight.shape[0]
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"hidden{list(hidden.shape)} must be [N, H] and weight{list(weight.shape)} "
                "[V/TP, H] with the same H"
            )
        if vocab_start is None:
            vocab_start = tp_rank * v_local
        cols = _local_columns(vocab_size, vocab_start, v_local, tp_size)
        chunk_size = _chunk_tokens(chunk_size, v_local)
        _check_inputs(
            n,
            vocab_size or v_local * tp_size,
            target,
            advantages,
            old_logp,
            ref_logp,
            rollout_logp,
        )
        target = target.long()
        cdt = _compute_dtype(hidden)
        w_valid = weight[:cols]
        # [chunk, Vl] workspaces (logits; x log x for the entropy), reused by every chunk.
        dev = hidden.device
        zbuf = torch.empty(min(chunk_size, n), cols, dtype=cdt, device=dev)
        rows_w = min(chunk_size, n) if compute_entropy else 0
        work = torch.empty(rows_w, cols, dtype=cdt, device=dev)
        lse, pred, ent = (torch.empty(n, dtype=cdt, device=dev) for _ in range(3))
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_logits(hidden[s:e], w_valid, zbuf[: e - s], cdt)
            mx, se, pr, en, _ = _chunk_stats(
                z,
                target[s:e],
                vocab_start,
                tp_group,
                tp_size,
                None,
                compute_entropy,
                work[: e - s],
            )
            lse[s:e] = mx + torch.log(se)
            pred[s:e] = pr + mx
            ent[s:e] = en if compute_entropy else 0.0
            del z
        valid = target != IGNORE_INDEX
        logp = torch.where(valid, pred - lse, torch.zeros_like(pred))
        ent = torch.where(valid, ent, torch.zeros_like(ent))
        loss, g, h = _token_coefficients(
            logp, ent, valid, advantages, old_logp, ref_logp, rollout_logp, cfg, row
        )
        ctx.save_for_backward(hidden, weight)
        ctx.lse, ctx.ent, ctx.g, ctx.h, ctx.target, ctx.valid = lse, ent, g, h, target, valid
        ctx.vocab_start, ctx.chunk_size, ctx.cols = vocab_start, chunk_size, cols
        ctx.tp_group, ctx.tp_size, ctx.reduce_hidden_grad = tp_group, tp_size, reduce_hidden_grad
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_ent):
        hidden, weight = ctx.saved_tensors
        n = hidden.shape[0]
        cdt = _compute_dtype(hidden)
        a, b = _backward_coefficients(ctx, grad_loss, grad_logp, grad_ent, cdt)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_w = ctx.needs_input_grad[1]
        main_grad = getattr(weight, "main_grad", None) if want_w else None
        # Megatron's DDP gives parameters a `main_grad` buffer (gradient accumulation fusion):
        # accumulating there avoids a second [Vl, H] tensor.
        grad_weight = None
        if want_w:
            grad_weight = main_grad if main_grad is not None else torch.zeros_like(weight)
        w_valid = weight[: ctx.cols]  # padded vocabulary rows get no gradient
        zbuf = torch.empty(min(ctx.chunk_size, n), ctx.cols, dtype=cdt, device=hidden.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h_c = hidden[s:e]
            z = _chunk_logits(h_c, w_valid, zbuf[: e - s], cdt)
            z.sub_(ctx.lse[s:e, None]).exp_()  # p, normalised: lse is already global
            dz = _grad_from_exp(
                z,
                torch.ones(e - s, dtype=cdt, device=hidden.device),
                ctx.ent[s:e],
                a[s:e],
                b[s:e],
                ctx.target[s:e],
                ctx.vocab_start,
            ).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(dz, w_valid, out=grad_hidden[s:e])
            if want_w:
                grad_weight[: ctx.cols].addmm_(
                    dz.t().to(grad_weight.dtype), h_c.to(grad_weight.dtype)
                )
        if grad_hidden is not None and ctx.reduce_hidden_grad:
            # Each rank's logits slice contributes a partial dLoss/dhidden; the hidden states
            # were replicated over TP, so their gradient is the sum.
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.tp_group, ctx.tp_size)
        if main_grad is not None:
            # Accumulated into main_grad above; no autograd grad. grad_added_to_main_grad is
            # left alone: with tied embeddings the same parameter also gets the embedding
            # lookup's ordinary .grad, which megatron's DDP hook would skip if it were set.
            grad_weight = None
        return (grad_hidden, grad_weight) + (None,) * 13


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
) -> FusedLossOutput:
    """Per-token AGPO loss from hidden states ``[N, H]`` and the output weight ``[Vl, H]``.

    Logits are computed chunk by chunk in the forward and again in the backward (one extra
    matmul), never as a whole. reduce_hidden_grad: all-reduce dLoss/dhidden over the TP group
    here; pass False when the caller's own TP region (megatron's
    ``copy_to_tensor_model_parallel_region``) already does it.
    """
    _check_options(cfg, chunk_size, compute_entropy)
    out = _FusedOutputLayerAGPOLoss.apply(
        hidden,
        weight,
        target,
        advantages,
        old_logp,
        ref_logp,
        rollout_logp,
        row,
        cfg,
        tp_group,
        chunk_size,
        vocab_start,
        reduce_hidden_grad,
        vocab_size,
        compute_entropy,
    )
    return FusedLossOutput(*out)
