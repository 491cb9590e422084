"""Forward/backward through megatron's schedules with the fused vocab-parallel AGPO loss.

`get_forward_backward_func` runs the micro-batches; our forward step returns the decoder's
output and `partial(loss_fn, micro_batch)`, as megatron's own examples do. The loss is
`sum(w * L_t)` with aggregation weights w computed over the whole (global) mini-batch, so
summing the micro-batches and the data-parallel ranks gives exactly the chosen aggregation
(megatron divides each micro-batch's loss by their number and DDP averages over DP; we
multiply both back).

GPU shape of the step:
- only response tokens reach the output layer and the loss: the decoder's output is
  gathered at the micro-batch's loss positions ([N, H]) before the vocabulary;
- micro-batches are packed (`MicroBatch`): no padding inside a micro-batch;
- no host syncs per micro-batch: metrics are sums in one device tensor per micro-batch,
  added on the device, reduced over DP and sent from the last pipeline stage once per
  update; `StepMetrics.to_dict` is the one device-to-host copy, made when the step logs.
  The other host syncs of an update, each a decision the host must make: the finiteness
  verdict (skip the update or not) and megatron's optimizer step (its grad norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig, token_loss
from megatron_agpo.ops import fused_output_layer_agpo_loss, fused_vocab_parallel_agpo_loss
from megatron_agpo.trainer.batch import MicroBatch, TokenBatch
from megatron_agpo.trainer.context_parallel import (
    ContextParallelMicroBatch,
    context_parallel_size_and_rank,
    split_micro_batch,
)


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def model_device(model) -> torch.device:
    """The device this rank's model lives on (every tensor the step creates goes there)."""
    return next(model.parameters()).device


def dp_size_and_rank() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return not ps.model_parallel_is_initialized() or ps.is_pipeline_last_stage()


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
    cp = getattr(config, "context_parallel_size", 1) or 1
    if cp > 1:  # 2 x CP load-balanced chunks, each a multiple of the above
        multiple *= 2 * cp
    return multiple


def _micro_batches(model, batch: TokenBatch, shape: StepShape) -> list[MicroBatch]:
    """This rank's micro-batches; with context parallelism, this CP rank's share of each
    (`context_parallel.split_micro_batch`: megatron's load-balanced split)."""
    multiple = sequence_multiple(model)
    micro = batch.micro_batches(shape.micro_batch_size, shape.token_budget, multiple,
                                shape.packing)  # fmt: skip
    cp, cp_rank = context_parallel_size_and_rank()
    if cp == 1:
        return micro
    return [split_micro_batch(m, batch.lengths.select(m.rows), cp, cp_rank, multiple)
            for m in micro]  # fmt: skip


# ------------------------------------------------------------------------ metrics
def metric_names(cfg: PolicyLossConfig) -> list[str]:
    """The fixed layout of a micro-batch's metric sums; the same on every rank and stage
    (decided from the config on the host, never from values)."""
    return list(metric_layout(cfg))


def metric_layout(cfg: PolicyLossConfig) -> dict[str, str | None]:
    """Each metric of the layout and how it aggregates: the count it is a token mean over
    (its sum divided by that count's sum over every micro-batch and rank), or None for a
    count, logged as the sum itself. Declared here, not read off the name."""
    layout: dict[str, str | None] = {}
    for pol in ("pos", "neg", "all"):
        layout[f"{pol}/tokens"] = None
        for k in ("loss", "clip_frac", "dual_clip_frac", "ratio", "entropy"):
            layout[f"{pol}/{k}"] = f"{pol}/tokens"
    if cfg.kl_coef != 0.0:  # the trainer gives reference log-probs exactly then
        layout["all/kl"] = "all/tokens"
    if cfg.tis_cap is not None:  # rollout log-probs are always given
        layout["all/tis_weight"] = "all/tokens"
    layout["logp_gap"] = "all/tokens"
    return layout


@dataclass
class StepMetrics:
    """Metric sums of an update as one float64 device tensor: `sums[i]` is the token-sum of
    `names[i]` (for a count, the count). `per[i]` is the count it is a mean over (None: a
    count); means are taken in `to_dict`, on the host."""

    names: list[str]
    sums: torch.Tensor
    per: list[str | None]

    def to_dict(self) -> dict[str, float]:
        """Token-weighted means, over every micro-batch and DP rank: the one host copy."""
        values = dict(zip(self.names, self.sums.tolist(), strict=True))
        out: dict[str, float] = {}
        for name, per in zip(self.names, self.per, strict=True):
            if per is None:
                out[name] = values[name]
            else:
                n = values[per]
                out[name] = values[name] / n if n else float("nan")
        return out


def _metric_sums(tl, adv_N, entropy_N, gap_N, names: list[str]) -> torch.Tensor:
    """[len(names)] float64 sums over a micro-batch's tokens (all of them count: the loss
    positions are exactly the micro-batch's response tokens)."""
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    cols = []
    for sel in (adv_N > 0, adv_N < 0, None):
        m = torch.ones_like(f(adv_N)) if sel is None else f(sel)
        cols += [m, f(tl.loss) * m, f(tl.clipped) * m, f(tl.dual_clipped) * m,
                 f(tl.ratio) * m, f(entropy_N) * m]  # fmt: skip
    if "all/kl" in names:
        cols.append(f(tl.kl))
    if "all/tis_weight" in names:
        cols.append(f(tl.tis_weight))
    cols.append(f(gap_N))
    return torch.stack(cols).sum(dim=1)


# ------------------------------------------------------------------------ forward and loss
@dataclass
class OutputHead:
    """The output layer as the loss applies it to the selected positions."""

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


def _packed_seq_params(mb: MicroBatch):
    """Transformer Engine's THD layout for a packed row (GPU path; not run on a CPU)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    # Context parallelism: cu_seqlens are the real lengths, the padded offsets say where each
    # sequence's 2 x CP chunks start (Transformer Engine splits on those).
    padded = getattr(mb, "cu_seqlens_padded", None)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def _uses_te_attention(model) -> bool:
    """Whether the model's attention is Transformer Engine's (packed rows then go in THD)."""
    gpt = getattr(model, "module", model)
    found = getattr(gpt, "_agpo_te_attention", None)
    if found is None:
        found = any(
            type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
            for m in gpt.modules()
        )
        gpt._agpo_te_attention = found  # checked once per model
    return found


def _forward(model, mb: MicroBatch) -> torch.Tensor:
    """The decoder's output [T, b, H] (the last stage's with its final norm; never logits:
    the loss applies the output layer at the loss positions only)."""
    ids = mb.input_ids
    # Rotary scores depend only on relative positions inside a sequence, so one continuous
    # range over a packed row gives each sequence exactly its own attention scores.
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    kwargs = dict(input_ids=ids, position_ids=pos, attention_mask=None)
    if mb.cu_seqlens is not None:
        if _uses_te_attention(model):
            kwargs["packed_seq_params"] = _packed_seq_params(mb)
        else:  # local attention: the block-diagonal causal mask (exact, checked in float64)
            kwargs["attention_mask"] = mb.attention_mask
    gpt = getattr(model, "module", model)
    if getattr(gpt.config, "num_moe_experts", None):
        # Router replay: the engine's experts for this micro-batch's tokens, or (None) the
        # trainer's router chooses (model.router_replay; megatron_agpo.models.moe).
        from megatron_agpo.models.moe import replay_for_forward

        replay_for_forward(gpt, mb.routes)
    if not gpt.post_process:
        return model(**kwargs)
    # GPTModel's own pipeline-stage flag: without post-processing it returns the decoder's
    # output (as a stage before the last does) and never materialises the logits.
    gpt.post_process = False
    try:
        return model(**kwargs)
    finally:
        gpt.post_process = True


def _per_token(
    hidden,
    mb: MicroBatch,
    head: OutputHead,
    cfg: PolicyLossConfig,
    vocab_size: int,
    old_logp,
    fuse: bool,
    compute_entropy: bool = True,
):
    """The fused per-token loss at the micro-batch's N loss positions, from the decoder's
    output [T, b, H] (split along T over the TP ranks under sequence parallelism)."""
    from megatron.core import tensor_parallel

    if head.sequence_parallel:
        # As megatron's output layer does: all-gather the sequence; the backward
        # reduce-scatters the hidden gradient (so no separate TP all-reduce of it).
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=_tp_group())
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])[mb.positions]
    common = dict(
        old_logp=old_logp,
        ref_logp=mb.ref_logp,
        rollout_logp=mb.rollout_logp,
        row=mb.seq_index if cfg.ratio_level == "sequence" else None,
        num_rows=len(mb.rows) if cfg.ratio_level == "sequence" else None,
        tp_group=_tp_group(),
        vocab_size=vocab_size,
        compute_entropy=compute_entropy,
    )
    if fuse:
        return fused_output_layer_agpo_loss(
            hidden_NH, head.weight, mb.target, mb.advantages, cfg,
            reduce_hidden_grad=not head.sequence_parallel, **common,
        )  # fmt: skip
    if not head.sequence_parallel:  # identity forward, TP all-reduce of the hidden gradient
        hidden_NH = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_NH)
    logits = torch.nn.functional.linear(hidden_NH, head.weight)
    # The logits are fresh and read by nothing else: the softmax, then the gradient, can be
    # written over them.
    return fused_vocab_parallel_agpo_loss(
        logits, mb.target, mb.advantages, cfg, inplace=True, producer=cfg.producer, **common
    )  # fmt: skip


def _loss_fn(
    mb: MicroBatch,
    head: OutputHead,
    output,
    *,
    cfg: PolicyLossConfig,
    vocab_size: int,
    scale: float,
    names: list[str],
):
    out = _per_token(output, mb, head, cfg, vocab_size, mb.old_logp, cfg.fuse_output_layer)
    # megatron divides each micro-batch's loss by their number and DDP averages gradients over
    # the data-parallel ranks; the weights already normalise over the global mini-batch, so
    # `scale` (micro-batches x DP size) undoes both.
    loss = (out.loss * mb.agg_weights).sum() * scale
    with torch.no_grad():
        logp = out.logp.detach()
        slr = None
        if cfg.ratio_level == "sequence":
            old = logp if mb.old_logp is None else mb.old_logp
            slr = _sequence_log_ratio(logp - old, mb.seq_index, len(mb.rows))
        tl = token_loss(
            logp, mb.old_logp, mb.advantages, cfg, ref_logp=mb.ref_logp,
            rollout_logp=mb.rollout_logp, seq_log_ratio=slr,
        )  # fmt: skip
        gap = (logp - mb.rollout_logp).abs()
        sums = _metric_sums(tl, mb.advantages, out.entropy, gap, names)
    return loss, {"sums": sums}


def _sequence_log_ratio(diff_N: torch.Tensor, seq_N: torch.Tensor, n_seq: int) -> torch.Tensor:
    """GSPO's per-token sequence mean log-ratio [N]; the number of sequences comes from the
    host (no `max()` read back from the device)."""
    zeros = diff_N.new_zeros(n_seq)
    num = zeros.index_add(0, seq_N, diff_N)
    den = zeros.index_add(0, seq_N, torch.ones_like(diff_N))
    return (num / den.clamp(min=1.0))[seq_N]


def _logp_fn(
    mb: MicroBatch,
    head: OutputHead,
    output,
    *,
    vocab_size: int,
    fuse: bool,
    with_entropy: bool,
    producer: str = "torch",
):
    # No entropy by default: the old/reference passes never read it, and it costs a pass over
    # the vocabulary.
    cfg = PolicyLossConfig(producer=producer)  # the same producer as the update
    out = _per_token(output.detach(), _without_ref(mb), head, cfg, vocab_size, None, fuse,
                     with_entropy)  # fmt: skip
    return torch.zeros((), device=output.device), {"logp": out.logp}


def _without_ref(mb: MicroBatch) -> MicroBatch:
    import dataclasses

    return dataclasses.replace(mb, ref_logp=None)  # a plain forward: no KL term


def _run(model, micro: list[MicroBatch], loss_factory, forward_only: bool) -> list[dict]:
    """megatron's schedule over the micro-batches; the loss outputs (last stage only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Micro-batches differ in rows and length (packed, token budget): the stages send
        # each activation's shape before it instead of assuming one fixed shape.
        get_model_config(model).variable_seq_lengths = True

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        mb = next(data_iterator)
        gpt = getattr(model, "module", model)
        head = _output_head(model) if gpt.post_process else None  # the last stage's
        return _forward(model, mb), partial(loss_factory, mb, head)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=micro[0].input_ids.shape[1],
        micro_batch_size=micro[0].input_ids.shape[0],
        forward_only=forward_only,
    )


def resolve_packing(model, setting: bool | None) -> bool:
    """trainer.packing: the setting, or (null) packed exactly where the attention keeps its
    cost per sequence (Transformer Engine's THD); megatron's local attention would compute
    the whole packed row's scores."""
    return _uses_te_attention(model) if setting is None else bool(setting)


@dataclass
class StepShape:
    """How a rank's rows become micro-batches (trainer.micro_batch_size / token_budget /
    packing)."""

    micro_batch_size: int
    token_budget: int = 0
    packing: bool = True


@torch.no_grad()
def compute_logp(
    model,
    batch: TokenBatch,
    shape: StepShape,
    vocab_size: int,
    fuse_output_layer: bool = False,
    with_entropy: bool = False,
    producer: str = "torch",
):
    """The model's log-prob of every target token of this rank's rows, [B, S] (0 at ignored
    positions), on the last pipeline stage, the only one that reads it; None on the others."""
    micro = _micro_batches(model, batch, shape)
    fn = partial(_logp_fn, vocab_size=vocab_size, fuse=fuse_output_layer,
                 with_entropy=with_entropy, producer=producer)  # fmt: skip
    outs = _run(model, micro, fn, True) if len(batch) else []
    if not is_last_stage():
        return None
    logp = torch.zeros_like(batch.rollout_logp)
    if micro and len(batch):
        flat = logp.view(-1)
        for m, o in zip(micro, outs, strict=True):
            flat[m.source] = o["logp"].to(flat.dtype)
    if micro and isinstance(micro[0], ContextParallelMicroBatch):
        # Each CP rank wrote its own positions (disjoint), zeros elsewhere: the sum is all.
        from megatron.core import parallel_state as ps

        dist.all_reduce(logp, group=ps.get_context_parallel_group())
    return logp


def forward_backward(
    model, batch: TokenBatch, cfg: PolicyLossConfig, shape: StepShape, vocab_size: int,
) -> StepMetrics:  # fmt: skip
    """Accumulate gradients of this rank's share of a mini-batch's aggregated loss; returns
    the update's metric sums, merged over every micro-batch and DP rank, on every rank.

    batch.agg_weights already normalise over the whole mini-batch, so how it is split into
    micro-batches or over data-parallel ranks does not change the gradient.
    A rank with no row of the mini-batch gets one with no loss token from the trainer
    (`Trainer.token_batch`), so it still joins the collectives.
    """
    from megatron.core import parallel_state as ps

    dp_size, _ = dp_size_and_rank()
    if not len(batch):
        raise ValueError(
            "forward_backward needs at least one row (a row without loss tokens will do)"
        )
    cp, _ = context_parallel_size_and_rank()
    if cp > 1 and cfg.ratio_level == "sequence":
        raise ValueError(
            "algorithm.loss.ratio_level=sequence (GSPO) needs every token of a sequence on one "
            "rank; with parallel.context_parallel > 1 they are split: use ratio_level=token"
        )
    micro = _micro_batches(model, batch, shape)
    layout = metric_layout(cfg)
    names = list(layout)
    # DDP averages gradients over data-parallel x context-parallel ranks; the CP ranks hold
    # disjoint loss positions of the same sequences, so their sum is wanted: x CP as well.
    fn = partial(_loss_fn, cfg=cfg, vocab_size=vocab_size, scale=len(micro) * dp_size * cp,
                 names=names)  # fmt: skip
    outs = _run(model, micro, fn, False)
    device = model_device(model)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    for o in outs:  # device adds, no host copy
        sums += o["sums"]
    if dp_size * cp > 1:
        dist.all_reduce(sums, group=ps.get_data_parallel_group(with_context_parallel=cp > 1))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # The loss lives on the last stage; rank 0 (the first stage) logs it.
        dist.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())  # fmt: skip
    return StepMetrics(names, sums, [layout[n] for n in names])


def grads_are_finite(model) -> bool:
    """True on every rank iff no rank's gradient holds inf/NaN: one device reduction per
    contiguous gradient buffer, one all-reduce, one host copy (the skip decision needs it)."""
    buffers = [b.grad_data for b in getattr(model, "buffers", [])]
    buffers += [b.grad_data for b in getattr(model, "expert_parallel_buffers", [])]
    if not buffers:  # not wrapped in megatron's DDP: the parameters' own gradients
        buffers = [p.grad for p in model.parameters() if p.grad is not None]
    device = model_device(model)
    if buffers:
        bad = torch.stack([~torch.isfinite(g).all() for g in buffers]).any().to(torch.float32)
    else:
        bad = torch.zeros((), device=device)
    bad = bad.reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
