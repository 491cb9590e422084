"""Context parallelism (parallel.context_parallel): each sequence's tokens split over the CP
ranks the way megatron and Transformer Engine expect, and the loss positions that fall on each.

Shape legend: T a micro-batch row's length (all CP ranks together), T/CP one rank's share, b
rows, N a micro-batch's loss positions, n one CP rank's share of them.

With causal attention the end of a sequence costs more than its start, so megatron splits a
sequence into 2 x CP chunks and gives rank r chunks r and 2CP-1-r (one cheap, one expensive):
- padded rows (BSHD, `megatron.core.utils.get_batch_on_this_cp_rank`): the row's T columns,
  T a multiple of 2 x CP;
- a packed row (THD, Transformer Engine's `thd_get_partitioned_indices`): each sequence on
  its own, padded to a multiple of 2 x CP (x TP with sequence parallelism); `cu_seqlens` keep
  the real lengths and `cu_seqlens_padded` the padded offsets.

The loss needs nothing new: a loss position's output lives on exactly one CP rank, the
aggregation weights are global (`TokenBatch.agg_weights`: loss = sum(w * L_t) over the whole
mini-batch), so each rank sums w * L_t over its own positions and megatron's DDP sums the
gradients over data-parallel x context-parallel ranks (dividing by DP x CP, which the step
multiplies back). What does need the whole sequence: GSPO's sequence-level ratio (a mean
over the sequence's tokens), refused with CP > 1 here. Every index is computed on the host
from host lengths (no device read), as `MicroBatch.build` does.

Transformer Engine's attention runs the CP exchange; it does not exist on a CPU, so only the
split and the loss side are tested here (tests/test_context_parallel.py, gloo).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_agpo.trainer.batch import MicroBatch, RowLengths


def chunk_indices(length: int, cp: int, rank: int) -> torch.Tensor:
    """[length / CP] positions of a sequence of `length` (a multiple of 2 x CP) held by CP
    rank `rank`: chunk `rank` then chunk `2CP - 1 - rank` of the 2 x CP equal chunks."""
    if length % (2 * cp):
        raise ValueError(f"length {length} is not a multiple of 2 x context_parallel = {2 * cp}")
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is not in [0, {cp})")
    c = length // (2 * cp)
    ar = torch.arange(c, dtype=torch.long, device="cpu")
    return torch.cat([rank * c + ar, (2 * cp - 1 - rank) * c + ar])


def thd_indices(padded_lens: Sequence[int], cp: int, rank: int) -> torch.Tensor:
    """[sum(padded_lens) / CP] positions of a packed row (sequences of `padded_lens` one after
    another) held by `rank`: each sequence's two chunks, in row order (Transformer Engine's
    `thd_get_partitioned_indices`)."""
    out, start = [], 0
    for n in padded_lens:
        out.append(start + chunk_indices(n, cp, rank))
        start += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device="cpu")


def sequence_multiple(cp: int, tp: int, sequence_parallel: bool) -> int:
    """What each packed sequence (or a padded row) is padded to a multiple of: 2 x CP chunks,
    each split over the TP ranks under sequence parallelism."""
    return 2 * cp * (tp if sequence_parallel else 1)


@dataclass
class ContextParallelMicroBatch(MicroBatch):
    """One CP rank's share of a micro-batch. `input_ids` [b, T/CP] are this rank's tokens in
    megatron's order; `positions` [n] index this rank's decoder output flattened as
    [T/CP * b]; the per-token vectors hold its n loss positions; `source` still points into
    the parent's [B, S] (log-probs go back there, then sum over the CP ranks)."""

    cu_seqlens_padded: torch.Tensor | None = None
    """[n_seq + 1] int32 offsets of each sequence in the padded packed row (the whole row,
    every CP rank's part); `cu_seqlens` then holds the real lengths. None for padded rows."""
    keep: torch.Tensor | None = None
    """[n] which of the unsplit micro-batch's N loss positions this rank holds."""
    context_parallel: int = 1


def split_micro_batch(
    mb: MicroBatch, lengths: RowLengths, cp: int, rank: int, multiple: int | None = None
) -> ContextParallelMicroBatch:
    """CP rank `rank`'s share of `mb` (built by `MicroBatch.build` from rows of `lengths`,
    i.e. `parent.lengths.select(mb.rows)`). Packed: each sequence re-padded to `multiple`
    (default 2 x CP) and split on its own (THD). Padded: the row length must already be a
    multiple of 2 x CP (build with `multiple` including it) and every row is split alike."""
    multiple = 2 * cp if multiple is None else multiple
    if multiple % (2 * cp):
        raise ValueError(f"multiple={multiple} is not a multiple of 2 x CP = {2 * cp}")
    dev = mb.input_ids.device
    seq, prompt, loss = lengths.seq, lengths.prompt, lengths.loss
    n_seq = len(seq)
    loss_t = torch.tensor(loss, dtype=torch.long, device="cpu")
    # The loss positions exactly as MicroBatch.build orders them: by sequence, then column.
    pos_seq = torch.repeat_interleave(torch.arange(n_seq, device="cpu"), loss_t)
    n_loss = int(sum(loss))
    pos_col = (
        torch.arange(n_loss, device="cpu")
        - torch.repeat_interleave(torch.cumsum(loss_t, 0) - loss_t, loss_t)
        + torch.tensor(prompt, dtype=torch.long, device="cpu")[pos_seq]
        - 1
    )
    packed = mb.cu_seqlens is not None
    b, t_len = mb.input_ids.shape
    if packed:
        padded = [math.ceil(s / multiple) * multiple for s in seq]
        new_start = torch.tensor([0, *padded], dtype=torch.long, device="cpu").cumsum(0)
        old_start = torch.tensor([0, *seq], dtype=torch.long, device="cpu").cumsum(0)
        t_new = int(new_start[-1])
        # Every real token of the old row, to its place in the re-padded row.
        seq_t = torch.tensor(seq, dtype=torch.long, device="cpu")
        tok_seq = torch.repeat_interleave(torch.arange(n_seq, device="cpu"), seq_t)
        tok_old = torch.arange(int(sum(seq)), device="cpu")
        tok_new = tok_old - old_start[tok_seq] + new_start[tok_seq]
        index = thd_indices(padded, cp, rank)
        pos_t = new_start[pos_seq] + pos_col
        pos_row = torch.zeros_like(pos_t)
    else:
        if t_len % (2 * cp):
            raise ValueError(
                f"padded rows of {t_len} tokens do not split into 2 x CP = {2 * cp} chunks: "
                "build the micro-batch with a multiple of 2 x CP"
            )
        t_new, index = t_len, chunk_indices(t_len, cp, rank)
        pos_t, pos_row = pos_col, pos_seq
    local = torch.full((t_new,), -1, dtype=torch.long, device="cpu")
    local[index] = torch.arange(index.numel(), device="cpu")
    on_rank = local[pos_t] >= 0
    keep = torch.nonzero(on_rank).flatten()  # host tensor: no device read
    t_local = index.numel()
    positions = local[pos_t[keep]] * b + pos_row[keep]
    # One transfer of the indices to the model's device.
    toks = [tok_new, tok_old] if packed else []
    moved = torch.cat([index, keep, positions, *toks]).to(dev)
    sizes = [t_local, keep.numel(), positions.numel(), *(t.numel() for t in toks)]
    index_d, keep_d, positions_d, *toks_d = torch.split(moved, sizes)
    if packed:
        row = torch.zeros(t_new, dtype=mb.input_ids.dtype, device=dev)
        row[toks_d[0]] = mb.input_ids.reshape(-1)[toks_d[1]]
        input_ids = row[index_d].view(1, t_local)
        real = torch.tensor([0, *seq], dtype=torch.long, device="cpu").cumsum(0)
        cu = real.to(device=dev, dtype=torch.int32)
        cu_padded = new_start.to(device=dev, dtype=torch.int32)
        max_seqlen = max(padded) if padded else 0
    else:
        input_ids = mb.input_ids.index_select(1, index_d)
        cu = cu_padded = None
        max_seqlen = mb.max_seqlen
    pick = lambda t: None if t is None else t.index_select(0, keep_d)  # noqa: E731
    fields = {f.name: getattr(mb, f.name) for f in dataclasses.fields(MicroBatch)}
    fields.update(
        input_ids=input_ids,
        attention_mask=None,  # Transformer Engine's attention: cu_seqlens or causal
        cu_seqlens=cu,
        positions=positions_d,
        target=pick(mb.target),
        advantages=pick(mb.advantages),
        rollout_logp=pick(mb.rollout_logp),
        old_logp=pick(mb.old_logp),
        ref_logp=pick(mb.ref_logp),
        agg_weights=pick(mb.agg_weights),
        seq_index=pick(mb.seq_index),
        max_seqlen=max_seqlen,
        source=pick(mb.source),
    )
    return ContextParallelMicroBatch(
        **fields, cu_seqlens_padded=cu_padded, keep=keep_d, context_parallel=cp
    )


def context_parallel_size_and_rank() -> tuple[int, int]:
    """(CP size, CP rank) from megatron's parallel state; (1, 0) without one."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
