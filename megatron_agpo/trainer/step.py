"""Forward/backward through megatron's schedules with the fused vocab-parallel AGPO loss.

`get_forward_backward_func` runs the micro-batches; our forward step returns the logits and
`partial(loss_fn, micro_batch)`, as megatron's own examples do. The loss is
`sum(w * L_t)` with aggregation weights w computed over the whole mini-batch, so summing the
micro-batches gives exactly the chosen aggregation (megatron divides each micro-batch's loss
by their number; we multiply it back).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig, polarity_metrics, token_loss
from megatron_agpo.ops import fused_vocab_parallel_agpo_loss
from megatron_agpo.trainer.batch import MicroBatch, TokenBatch


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _from_last_stage(obj):
    """The last pipeline stage's obj on every stage (the loss and its outputs live there)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(
        box,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return box[0]


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
        ref_logp=flat(mb.ref_logp),
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
            mb.old_logp, adv, cfg, ref_logp=mb.ref_logp, rollout_logp=mb.rollout_logp,
        )  # fmt: skip
        metrics = polarity_metrics(tl, adv, mb.loss_mask, out.entropy.detach().view(b, s))
        gap = (out.logp.detach().view(b, s) - mb.rollout_logp).abs() * mb.loss_mask
        metrics["logp_gap_sum"] = float(gap.sum())
    return loss, metrics


def _logp_fn(mb: TokenBatch, logits, *, vocab_size: int):
    mb = dataclasses.replace(mb, ref_logp=None)  # a plain forward: no KL term
    out = _per_token(logits.detach(), mb, PolicyLossConfig(), vocab_size, None)
    return torch.zeros(()), {"logp": out.logp.view(mb.loss_mask.shape)}


def _run(model, micro: list[TokenBatch], loss_factory, forward_only: bool) -> list[dict]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Micro-batches differ in rows and length (trimmed, token budget): the stages send
        # each activation's shape before it instead of assuming one fixed shape.
        get_model_config(model).variable_seq_lengths = True

    def forward_step(data_iterator: Iterator[TokenBatch], model):
        mb = next(data_iterator)
        return _forward(model, mb), partial(loss_factory, mb)

    # On stages before the last the schedule returns no outputs: the last stage's are
    # broadcast so every rank sees the log-probs and metrics.
    return _from_last_stage(
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[model],
            num_microbatches=len(micro),
            seq_length=micro[0].input_ids.shape[1],
            micro_batch_size=len(micro[0]),
            forward_only=forward_only,
        )
    )


@torch.no_grad()
def compute_logp(
    model, batch: TokenBatch, micro_batch_size: int, vocab_size: int, token_budget: int = 0
) -> torch.Tensor:
    """The model's log-prob of every target token, [B, S] (0 at ignored positions)."""
    micro = batch.micro_batches(micro_batch_size, token_budget)
    fn = partial(_logp_fn, vocab_size=vocab_size)
    outs = _run(model, [m.batch for m in micro], fn, forward_only=True)
    logp = torch.zeros_like(batch.rollout_logp)
    for m, o in zip(micro, outs, strict=True):
        logp[m.rows, : o["logp"].shape[1]] = o["logp"]
    return logp


def forward_backward(
    model,
    batch: TokenBatch,
    cfg: PolicyLossConfig,
    micro_batch_size: int,
    vocab_size: int,
    token_budget: int = 0,
) -> dict[str, float]:
    """Accumulate gradients of the mini-batch's aggregated loss; returns its metrics.

    batch.agg_weights already normalise over the whole mini-batch, so how it is split into
    micro-batches (fixed rows or a token budget) does not change the gradient.
    """
    micro: list[MicroBatch] = batch.micro_batches(micro_batch_size, token_budget)
    fn = partial(_loss_fn, cfg=cfg, vocab_size=vocab_size, n_micro=len(micro))
    outs = _run(model, [m.batch for m in micro], fn, forward_only=False)
    return merge_metrics(outs, [m.batch.loss_mask for m in micro])


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
