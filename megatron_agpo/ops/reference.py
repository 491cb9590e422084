"""The unfused path the fused kernel replaces: gather the vocabulary, log_softmax, gather.

Kept as the reference for tests and as the benchmark's baseline. It holds several full
``[N, V]`` tensors; do not use it for training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_agpo.algorithms.policy_loss import PolicyLossConfig, token_loss
from megatron_agpo.ops.fused_agpo_loss import (
    IGNORE_INDEX,
    FusedLossOutput,
    _seq_log_ratio,
    _tp_info,
)


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab slices into [N, V]; the backward keeps this rank's slice of the grad."""

    @staticmethod
    def forward(ctx, x, tp_group, tp_size, tp_rank):
        ctx.tp_rank, ctx.v_local = tp_rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(tp_size)]
        dist.all_gather(parts, x.contiguous(), group=tp_group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        s = ctx.tp_rank * ctx.v_local
        return grad[..., s : s + ctx.v_local].contiguous(), None, None, None


def gather_vocab(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    tp_size, tp_rank = _tp_info(tp_group)
    if tp_size == 1:
        return logits
    return _GatherVocab.apply(logits, tp_group, tp_size, tp_rank)


def naive_agpo_loss(
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
    dtype: torch.dtype = torch.float32,
) -> FusedLossOutput:
    """Same contract as `fused_vocab_parallel_agpo_loss`, computed the obvious way in `dtype`."""
    full = gather_vocab(logits, tp_group).to(dtype)
    logprobs = torch.log_softmax(full, dim=-1)
    valid = target != IGNORE_INDEX
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = logprobs.gather(1, safe_target[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    slr = _seq_log_ratio(cfg, logp, old_logp, row, valid)
    tl = token_loss(
        logp,
        cast(old_logp),
        advantages.to(dtype),
        cfg,
        entropy=entropy if cfg.needs_entropy_grad else None,
        ref_logp=cast(ref_logp),
        rollout_logp=cast(rollout_logp),
        seq_log_ratio=slr,
    )
    zero = torch.zeros_like(logp)
    return FusedLossOutput(
        torch.where(valid, tl.loss, zero),
        torch.where(valid, logp, zero),
        torch.where(valid, entropy, zero),
    )
