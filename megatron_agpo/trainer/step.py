"""Forward/backward through megatron's schedules with the fused vocab-parallel AGPO loss.

`get_forward_backward_func` runs the micro-batches; our forward step returns the logits and
`partial(loss_fn, micro_batch)`, as megatron's own examples do. The loss is
`sum(w * L_t)` with aggregation weights w computed over the whole mini-batch, so summing the
micro-batches gives exactly the chosen aggregation (megatron divides each micro-batch's loss
by their number; we multiply it back).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_agpo.algorithms import (
    PolicyLossConfig,
    polarity_metrics,
    sequence_log_ratio,
    token_loss,
)
from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss
from megatron_agpo.trainer.batch import MicroBatch, TokenBatch


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _from_last_stage(outputs: list[dict], device: torch.device) -> list[dict]:
    """The last pipeline stage's per-micro-batch outputs (dicts of numbers and tensors) on
    every stage: the loss and its outputs live there. A JSON header (keys, shapes, dtypes),
    then one float64 payload: the numbers first, then the tensors. Never pickled."""
    from megatron.core import parallel_state as ps

    from megatron_agpo.parallel import broadcast_bytes

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return outputs
    src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
    last = ps.is_pipeline_last_stage()
    header = None
    if last:
        spec, numbers, tensors = [], [], []
        for out in outputs:
            entry = {}
            for key, v in out.items():
                if isinstance(v, torch.Tensor):
                    entry[key] = [list(v.shape), str(v.dtype).removeprefix("torch.")]
                    tensors.append(v.detach().reshape(-1).to(device, torch.float64))
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    entry[key] = None  # a number
                    numbers.append(float(v))
                else:
                    raise TypeError(f"pipeline output {key!r}: {type(v).__name__} is not sent")
            spec.append(entry)
        header = json.dumps(spec).encode()
    spec = json.loads(broadcast_bytes(header, src, group, device))
    metas = [meta for entry in spec for meta in entry.values()]
    n_numbers = sum(meta is None for meta in metas)
    if last:
        numbers_t = torch.tensor(numbers, dtype=torch.float64, device=device)
        payload = torch.cat([numbers_t, *tensors])
    else:  # its size follows from the header
        size = n_numbers + sum(math.prod(m[0]) for m in metas if m is not None)
        payload = torch.empty(size, dtype=torch.float64, device=device)
    dist.broadcast(payload, src=src, group=group)
    if last:
        return outputs
    numbers = iter(payload[:n_numbers].tolist())  # one device-to-host copy for all of them
    result, at = [], n_numbers
    for entry in spec:
        out = {}
        for key, meta in entry.items():
            if meta is None:
                out[key] = next(numbers)
            else:
                shape, dtype = meta
                n = math.prod(shape)
                out[key] = payload[at : at + n].view(shape).to(getattr(torch, dtype))
                at += n
        result.append(out)
    return result


def model_device(model) -> torch.device:
    """The device this rank's model lives on (every tensor the step creates goes there)."""
    return next(model.parameters()).device


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def dp_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def sequence_multiple(model) -> int:
    """Micro-batch lengths must be a multiple of this: with sequence parallelism the TP ranks
    each hold S / TP positions of the activations."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if getattr(config, "fp8", None):
        # Transformer Engine's FP8 GEMMs want token counts in multiples of 16.
        from megatron_agpo.models.precision import FP8_SEQUENCE_MULTIPLE

        multiple = math.lcm(multiple, FP8_SEQUENCE_MULTIPLE)
    return multiple


@dataclass
class OutputHead:
    """What the loss needs to apply the output layer itself (algorithm.loss.fuse_output_layer)."""

    weight: torch.Tensor
    """[Vp/TP, H] this rank's vocabulary rows of the output layer (the embedding when tied)."""
    sequence_parallel: bool
    """The hidden states arrive split along the sequence over the TP ranks."""


def _output_head(model) -> OutputHead:
    gpt = getattr(model, "module", model)
    # megatron's shared_embedding_or_output_weight() returns the embedding on the first stage
    # even when the output layer is not tied to it.
    tied = gpt.share_embeddings_and_output_weights
    weight = gpt.shared_embedding_or_output_weight() if tied else gpt.output_layer.weight
    return OutputHead(weight, gpt.config.sequence_parallel)


def _forward(model, mb: TokenBatch, fuse_output: bool = False) -> torch.Tensor:
    """Logits [b, S, Vl]; with fuse_output, on the last stage, the decoder's output [S, b, H]
    instead (final norm applied), for the loss to apply the output layer chunk by chunk."""
    ids = mb.input_ids
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    gpt = getattr(model, "module", model)
    if not (fuse_output and gpt.post_process):
        return model(input_ids=ids, position_ids=pos, attention_mask=None)
    # GPTModel's own pipeline-stage flag: without post-processing it returns the decoder's
    # output (as a stage before the last does) and never materialises the logits.
    gpt.post_process = False
    try:
        return model(input_ids=ids, position_ids=pos, attention_mask=None)
    finally:
        gpt.post_process = True


def _per_token(
    output, mb: TokenBatch, cfg: PolicyLossConfig, vocab_size: int, old_logp,
    compute_entropy: bool = True, head: OutputHead | None = None,
):  # fmt: skip
    """The fused per-token loss from logits [b, S, Vl], or from hidden states [S, b, H] and
    the output weight when `head` is given."""
    b, s = mb.loss_mask.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    row = None
    if cfg.ratio_level == "sequence":  # GSPO: each token's row, for the sequence mean
        row = torch.arange(b, device=mb.target.device).repeat_interleave(s)
    common = dict(
        old_logp=flat(old_logp),
        ref_logp=flat(mb.ref_logp),
        rollout_logp=flat(mb.rollout_logp),
        row=row,
        tp_group=_tp_group(),
        vocab_size=vocab_size,
        compute_entropy=compute_entropy,
    )
    target, adv = mb.target.reshape(-1), mb.advantages_per_token.reshape(-1)
    if head is None:
        # The logits are the output layer's fresh output and are read by nothing else: the
        # softmax, then the gradient, can be written over them.
        logits = output.reshape(b * s, output.shape[-1])
        return fused_vocab_parallel_agpo_loss(logits, target, adv, cfg, inplace=True, **common)
    hidden = output
    if head.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # As megatron's output layer does: all-gather the sequence; the backward
        # reduce-scatters the hidden gradient (so no separate TP all-reduce of it).
        hidden = gather_from_sequence_parallel_region(hidden, group=_tp_group())
    hidden_NH = hidden.transpose(0, 1).reshape(b * s, hidden.shape[-1])
    return fused_output_layer_agpo_loss(
        hidden_NH, head.weight, target, adv, cfg,
        reduce_hidden_grad=not head.sequence_parallel, **common,
    )  # fmt: skip


def _loss_fn(mb: TokenBatch, head, output, *, cfg: PolicyLossConfig, vocab_size: int, scale: float):
    out = _per_token(output, mb, cfg, vocab_size, mb.old_logp, head=head)
    b, s = mb.loss_mask.shape
    # megatron divides each micro-batch's loss by their number and DDP averages gradients over
    # the data-parallel ranks; the weights already normalise over the global mini-batch, so
    # `scale` (micro-batches x DP size) undoes both.
    loss = (out.loss.view(b, s) * mb.agg_weights).sum() * scale
    with torch.no_grad():
        adv = mb.advantages_per_token
        logp = out.logp.detach().view(b, s)
        slr = None
        if cfg.ratio_level == "sequence":
            old = logp if mb.old_logp is None else mb.old_logp
            slr = sequence_log_ratio(logp, old, mb.loss_mask)
        tl = token_loss(
            logp, mb.old_logp, adv, cfg, ref_logp=mb.ref_logp, rollout_logp=mb.rollout_logp,
            seq_log_ratio=slr,
        )  # fmt: skip
        metrics = polarity_metrics(tl, adv, mb.loss_mask, out.entropy.detach().view(b, s))
        gap = (logp - mb.rollout_logp).abs() * mb.loss_mask
        metrics["logp_gap_sum"] = float(gap.sum())
    return loss, metrics


def _logp_fn(mb: TokenBatch, head, output, *, vocab_size: int, with_entropy: bool = False):
    mb = dataclasses.replace(mb, ref_logp=None)  # a plain forward: no KL term
    # No entropy by default: the old/reference passes never read it, and it costs a pass over
    # the vocabulary (benchmarks/logprob_memory.py measures the difference).
    out = _per_token(output.detach(), mb, PolicyLossConfig(), vocab_size, None, with_entropy, head)
    return torch.zeros((), device=output.device), {"logp": out.logp.view(mb.loss_mask.shape)}


def _run(
    model, micro: list[TokenBatch], loss_factory, forward_only: bool, fuse_output: bool = False
) -> list[dict]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Micro-batches differ in rows and length (trimmed, token budget): the stages send
        # each activation's shape before it instead of assuming one fixed shape.
        get_model_config(model).variable_seq_lengths = True

    def forward_step(data_iterator: Iterator[TokenBatch], model):
        mb = next(data_iterator)
        head = _output_head(model) if fuse_output else None
        return _forward(model, mb, fuse_output), partial(loss_factory, mb, head)

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
        ),
        model_device(model),
    )


def dp_rows(n_rows: int, dp_size: int, dp_rank: int) -> torch.Tensor:
    """The rows of an n_rows batch this data-parallel rank works on: contiguous, near-equal
    shards (sizes differ by at most one, larger first). CPU indices: host-side bookkeeping."""
    return torch.arange(n_rows, device="cpu").tensor_split(dp_size)[dp_rank]


def _gather_rows(local_BS: torch.Tensor, n_rows: int, dp_size: int) -> torch.Tensor:
    """Every DP rank's shard of a [rows, S] tensor, reassembled as [n_rows, S] on every rank.

    Shards are padded to the largest size so one all_gather_into_tensor moves them (NCCL and
    gloo both take it; no pickling)."""
    if dp_size == 1:
        return local_BS
    sizes = [len(r) for r in torch.arange(n_rows, device="cpu").tensor_split(dp_size)]
    most = max(sizes)
    pad = local_BS.new_zeros((most, local_BS.shape[1]))
    pad[: local_BS.shape[0]] = local_BS
    out = local_BS.new_empty((dp_size * most, local_BS.shape[1]))
    dist.all_gather_into_tensor(out, pad, group=_dp_group())
    return torch.cat([out[d * most : d * most + n] for d, n in enumerate(sizes)])


@torch.no_grad()
def compute_logp(
    model,
    batch: TokenBatch,
    micro_batch_size: int,
    vocab_size: int,
    token_budget: int = 0,
    fuse_output_layer: bool = False,
    with_entropy: bool = False,
) -> torch.Tensor:
    """The model's log-prob of every target token, [B, S] (0 at ignored positions), on the
    batch's device. Each data-parallel rank computes its own shard of the rows; the shards
    are then gathered, so every rank returns the whole [B, S]."""
    dp_size, dp_rank = dp_size_and_rank()
    rows = dp_rows(len(batch), dp_size, dp_rank)
    local = batch.select(rows.to(batch.input_ids.device))
    logp = torch.zeros_like(local.rollout_logp)
    if len(local):  # an empty shard (fewer rows than DP ranks) has nothing to compute
        micro = local.micro_batches(micro_batch_size, token_budget, sequence_multiple(model))
        fn = partial(_logp_fn, vocab_size=vocab_size, with_entropy=with_entropy)
        outs = _run(model, [m.batch for m in micro], fn, True, fuse_output_layer)
        for m, o in zip(micro, outs, strict=True):
            idx = torch.tensor(m.rows, device=logp.device)
            logp[idx, : o["logp"].shape[1]] = o["logp"]
    return _gather_rows(logp, len(batch), dp_size)


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
    micro-batches (fixed rows or a token budget) or over data-parallel ranks (each takes its
    shard of the rows) does not change the gradient. Metrics are merged over all ranks.
    """
    dp_size, dp_rank = dp_size_and_rank()
    rows = dp_rows(len(batch), dp_size, dp_rank)
    local = batch.select(rows.to(batch.input_ids.device))
    if not len(local):
        # Fewer rows than DP ranks: this rank still joins DDP's gradient reduction, with one
        # row that weighs nothing (no tokens in the loss or the metrics).
        local = batch.select(torch.tensor([0], device=batch.input_ids.device))
        local.agg_weights = torch.zeros_like(local.agg_weights)
        local.loss_mask = torch.zeros_like(local.loss_mask)
    micro: list[MicroBatch] = local.micro_batches(
        micro_batch_size, token_budget, sequence_multiple(model)
    )
    fn = partial(_loss_fn, cfg=cfg, vocab_size=vocab_size, scale=len(micro) * dp_size)
    outs = _run(model, [m.batch for m in micro], fn, False, cfg.fuse_output_layer)
    return merge_metrics(outs, [m.batch.loss_mask for m in micro], model_device(model))


def merge_metrics(
    outs: list[dict], masks: list[torch.Tensor], device: torch.device | None = None
) -> dict[str, float]:
    """Token-weighted means of per-micro-batch metrics (each already a mean over its tokens),
    over this rank's micro-batches and, with data parallelism, over every DP rank's."""
    keys = sorted(k for k in outs[0] if k != "logp_gap_sum")
    sums: dict[str, float] = {}
    for prefix in ("pos", "neg", "all"):
        tokens = [o[f"{prefix}/tokens"] for o in outs]
        sums[f"{prefix}/tokens"] = sum(tokens)
        for key in keys:
            if not key.startswith(prefix + "/") or key.endswith("/tokens"):
                continue
            sums[key] = sum(o[key] * n for o, n in zip(outs, tokens, strict=True) if n > 0)
    sums["logp_gap_sum"] = sum(o["logp_gap_sum"] for o in outs)
    sums["response_tokens"] = sum(float(m.sum()) for m in masks)
    names = sorted(sums)
    dp_size, _ = dp_size_and_rank()
    if dp_size > 1:
        # Every key exists on every rank (same config), so one all-reduce of sums merges them.
        t = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=_dp_group())
        sums = dict(zip(names, t.tolist(), strict=True))
    merged: dict[str, float] = {}
    for prefix in ("pos", "neg", "all"):
        total = sums[f"{prefix}/tokens"]
        merged[f"{prefix}/tokens"] = total
        for key in keys:
            if key.startswith(prefix + "/") and not key.endswith("/tokens"):
                merged[key] = sums[key] / total if total else float("nan")
    merged["logp_gap"] = sums["logp_gap_sum"] / max(sums["response_tokens"], 1.0)
    return merged


def grads_are_finite(model) -> bool:
    """True on every rank iff no rank's gradient holds inf/NaN (one all-reduce)."""
    bad = torch.zeros(1, device=model_device(model))
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
