"""Forward/backward through megatron's schedules with the fused vocab-parallel AGPO loss.

`get_forward_backward_func` runs the micro-batches; our forward step returns the logits and
`partial(loss_fn, micro_batch)`, as megatron's own examples do. The loss is
`sum(w * L_t)` with aggregation weights w computed over the whole mini-batch, so summing the
micro-batches gives exactly the chosen aggregation (megatron divides each micro-batch's loss
by their number; we multiply it back).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig, polarity_metrics, token_loss
from megatron_agpo.ops import fused_vocab_parallel_agpo_loss
from megatron_agpo.trainer.batch import TokenBatch


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _forward(model, mb: TokenBatch) -> torch.Tensor:
    pos = torch.arange(mb.input_ids.shape[1]).expand_as(mb.input_ids)
    return model(input_ids=mb.input_ids, position_ids=pos, attention_mask=None)  # [b, S, Vl]


def _per_token(logits_BSV, mb: TokenBatch, cfg: PolicyLossConfig, vocab_size: int, old_logp):
    b, s, vl = logits_BSV.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return fused_vocab_parallel_agpo_loss(
        logits_BSV.reshape(b * s, vl),
        mb.target.reshape(-1),
        mb.advantages_per_token.reshape(-1),
        cfg,
        old_logp=flat(old_logp),
        rollout_logp=flat(mb.rollout_logp),
        tp_group=_tp_group(),
        # The logits are the output layer's fresh output and are read by nothing else: the
        # softmax, then the gradient, can be written over them.
        inplace=True,
        vocab_size=vocab_size,
    )


def _loss_fn(mb: TokenBatch, logits, *, cfg: PolicyLossConfig, vocab_size: int, n_micro: int):
    out = _per_token(logits, mb, cfg, vocab_size, mb.old_logp)
    b, s = mb.loss_mask.shape
    loss = (out.loss.view(b, s) * mb.agg_weights).sum() * n_micro
    with torch.no_grad():
        adv = mb.advantages_per_token
        tl = token_loss(
            out.logp.detach().view(b, s),
            None if mb.old_logp is None else mb.old_logp,
            adv, cfg, rollout_logp=mb.rollout_logp,
        )  # fmt: skip
        metrics = polarity_metrics(tl, adv, mb.loss_mask, out.entropy.detach().view(b, s))
        gap = (out.logp.detach().view(b, s) - mb.rollout_logp).abs() * mb.loss_mask
        metrics["logp_gap_sum"] = float(gap.sum())
    return loss, metrics


def _logp_fn(mb: TokenBatch, logits, *, vocab_size: int):
    out = _per_token(logits.detach(), mb, PolicyLossConfig(), vocab_size, None)
    return torch.zeros(()), {"logp": out.logp.view(mb.loss_mask.shape)}


def _run(model, micro: list[TokenBatch], loss_factory, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Iterator[TokenBatch], model):
        mb = next(data_iterator)
        return _forward(model, mb), partial(loss_factory, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=micro[0].input_ids.shape[1],
        micro_batch_size=len(micro[0]),
        forward_only=forward_only,
    )


@torch.no_grad()
def compute_logp(model, batch: TokenBatch, micro_batch_size: int, vocab_size: int) -> torch.Tensor:
    """The policy's log-prob of every target token, [B, S] (0 at ignored positions)."""
    micro = list(batch.chunks(micro_batch_size))
    outs = _run(model, micro, partial(_logp_fn, vocab_size=vocab_size), forward_only=True)
    return torch.cat([o["logp"] for o in outs])


def forward_backward(
    model, batch: TokenBatch, cfg: PolicyLossConfig, micro_batch_size: int, vocab_size: int
) -> dict[str, float]:
    """Accumulate gradients of the mini-batch's aggregated loss; returns its metrics."""
    micro = list(batch.chunks(micro_batch_size))
    fn = partial(_loss_fn, cfg=cfg, vocab_size=vocab_size, n_micro=len(micro))
    outs = _run(model, micro, fn, forward_only=False)
    return merge_metrics(outs, [mb.loss_mask for mb in micro])


def merge_metrics(outs: list[dict], masks: list[torch.Tensor]) -> dict[str, float]:
    """Token-weighted means of per-micro-batch metrics (each already a mean over its tokens)."""
    merged: dict[str, float] = {}
    for prefix in ("pos", "neg", "all"):
        tokens = [o[f"{prefix}/tokens"] for o in outs]
        total = sum(tokens)
        merged[f"{prefix}/tokens"] = total
        for key in outs[0]:
            if not key.startswith(prefix + "/") or key.endswith("/tokens"):
                continue
            vals = [(o[key], n) for o, n in zip(outs, tokens, strict=True) if n > 0]
            merged[key] = sum(v * n for v, n in vals) / total if total else float("nan")
    n_tok = sum(float(m.sum()) for m in masks)
    merged["logp_gap"] = sum(o["logp_gap_sum"] for o in outs) / max(n_tok, 1.0)
    return merged


def grads_are_finite(model) -> bool:
    """True on every rank iff no rank's gradient holds inf/NaN (one all-reduce)."""
    bad = torch.zeros(1)
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None and not torch.isfinite(g).all():
            bad[0] = 1.0
            break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
