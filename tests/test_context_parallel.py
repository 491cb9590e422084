"""Context parallelism (parallel.context_parallel): the load-balanced split megatron expects,
and the AGPO loss and its gradient unchanged when a sequence's loss positions are spread over
CP ranks (two gloo ranks, float64, against the unsplit loss). Transformer Engine's attention,
which does the CP exchange, does not run here; without it the setting is refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_agpo.algorithms import PolicyLossConfig
from megatron_agpo.ops import fused_vocab_parallel_agpo_loss
from megatron_agpo.parallel import ParallelConfig
from megatron_agpo.trainer.batch import build_token_batch_from_lists, row_scales
from megatron_agpo.trainer.context_parallel import chunk_indices, split_micro_batch, thd_indices
from tests.dist_utils import run_distributed

V = 11


def test_chunk_indices_closed_form_and_balance():
    # CP=2, 8 positions: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert chunk_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    # Every CP: the ranks' shares partition the sequence and carry equal causal work
    # (position t attends to t + 1 keys).
    for cp in (1, 2, 3, 4):
        t = 2 * cp * 5
        parts = [chunk_indices(t, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(t))
        work = {int((p + 1).sum()) for p in parts}
        assert len(work) == 1, (cp, work)
    # A packed row: each sequence on its own (Transformer Engine's THD split).
    assert thd_indices([4, 8], 2, 1).tolist() == [1, 2, 4 + 2, 4 + 3, 4 + 4, 4 + 5]
    with pytest.raises(ValueError, match="multiple of 2 x context_parallel"):
        chunk_indices(6, 2, 0)


def test_context_parallel_without_transformer_engine_is_one_line():
    from megatron_agpo.backends import detect

    if detect().transformer_engine:
        pytest.skip("Transformer Engine is available here")
    found = ParallelConfig(context_parallel=2).problems("parallel.")
    assert len(found) == 1
    assert found[0].startswith("parallel.context_parallel=2 needs Transformer Engine")
    assert ParallelConfig(context_parallel=1).problems("parallel.") == []
    assert ParallelConfig(context_parallel=0).problems("parallel.") == [
        "parallel.context_parallel=0: must be >= 1"
    ]
    with pytest.raises(ValueError, match="TP\\*PP\\*CP"):
        ParallelConfig(tensor_parallel=2, context_parallel=2).validate(6)
    assert ParallelConfig(tensor_parallel=2, context_parallel=2).data_parallel(8) == 2


def _batch(seed: int):
    """Six sequences of uneven prompt and response lengths, float64 everything."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1 + (i + j) % 7 for j in range(p)] for i, p in enumerate([3, 1, 5, 2, 4, 1])]
    responses = [[1 + (3 * i + j) % 9 for j in range(r)] for i, r in enumerate([7, 4, 9, 1, 6, 12])]
    logps = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    adv = torch.randn(len(prompts), generator=g)
    b = build_token_batch_from_lists(prompts, responses, logps, adv, pad_id=0)
    b.old_logp = b.rollout_logp + 0.1 * torch.randn(b.rollout_logp.shape, generator=g) * b.loss_mask
    # Global aggregation weights (seq-mean-token-mean), as the trainer sets them.
    w = row_scales(list(b.lengths.loss), "seq-mean-token-mean", None)
    b.agg_weights = b.loss_mask * w[:, None]
    for k in ("rollout_logp", "old_logp", "agg_weights", "advantages"):
        setattr(b, k, getattr(b, k).double())
    return b


def _reference_rank_positions(seq_lens, multiple, cp, rank, packed, t_len):
    """Where each of the row's positions goes, by megatron's own BSHD slicing
    (`get_batch_on_this_cp_rank`) applied to each packed sequence (THD) or to the row."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    class _Group:  # what get_pg_size / get_pg_rank read
        def size(self):
            return cp

        def rank(self):
            return rank

    def split(n):
        return get_batch_on_this_cp_rank({"t": torch.arange(n)[None]}, _Group())["t"][0]

    if not packed:
        return split(t_len)
    out, start = [], 0
    for s in seq_lens:
        n = -(-s // multiple) * multiple
        out.append(start + split(n))
        start += n
    return torch.cat(out)


def _cp_loss_matches(rank: int, world: int, packed: bool) -> None:
    from megatron.core import parallel_state as ps

    from megatron_agpo.parallel import init_parallel
    from megatron_agpo.trainer.context_parallel import context_parallel_size_and_rank

    init_parallel(ParallelConfig(tensor_parallel=1, context_parallel=world))
    cp, cp_rank = context_parallel_size_and_rank()
    assert (cp, cp_rank) == (world, rank)
    group = ps.get_context_parallel_group()
    batch = _batch(seed=3)
    multiple = 2 * cp
    cfg = PolicyLossConfig(eps_low=0.1, eps_high=0.15, tis_cap=1.5)
    for rows, budget in (([0, 1, 2, 3, 4, 5], 0), ([2, 5], 0)):
        mb = batch.select(rows).micro_batches(len(rows), budget, multiple, packing=packed)[0]
        lens = batch.lengths.select(rows)
        n = mb.target.numel()
        # The decoder's output of the whole (re-padded) row, one [V] vector per position; the
        # loss positions' logits in the unsplit micro-batch's order.
        seq = lens.seq
        if packed:
            padded = [-(-s // multiple) * multiple for s in seq]
            starts = torch.tensor([0, *padded]).cumsum(0)
            t_new = int(starts[-1])
        else:
            t_new = mb.input_ids.shape[1]
        g = torch.Generator().manual_seed(7)
        z_row = torch.randn(t_new * mb.input_ids.shape[0], V, generator=g, dtype=torch.float64)
        if packed:
            seq_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens.loss))
            col = torch.cat([torch.arange(p - 1, p - 1 + m)
                             for p, m in zip(lens.prompt, lens.loss, strict=True)])  # fmt: skip
            row_pos = starts[seq_of] + col
        else:
            row_pos = mb.positions  # t * b + row
        logits = z_row[row_pos].clone().requires_grad_()
        common = dict(old_logp=mb.old_logp, rollout_logp=mb.rollout_logp, vocab_size=V)
        full = fused_vocab_parallel_agpo_loss(logits, mb.target, mb.advantages, cfg, **common)
        want = (full.loss * mb.agg_weights).sum()
        want.backward()
        want_grad = logits.grad.clone()

        part = split_micro_batch(mb, lens, cp, cp_rank, multiple)
        b = mb.input_ids.shape[0]
        ref_pos = _reference_rank_positions(seq, multiple, cp, cp_rank, packed, t_new)
        # This rank's decoder output: the row's positions it holds, in megatron's order
        # ([T/CP, b] flattened; b = 1 when packed).
        z_local = z_row.view(t_new, b, V)[ref_pos].reshape(-1, V)
        if packed:
            ids = torch.zeros(t_new, dtype=torch.long)
            ids[
                torch.cat([s0 + torch.arange(s) for s0, s in zip(starts[:-1], seq, strict=True)])
            ] = mb.input_ids[0, : sum(seq)]
            assert torch.equal(part.input_ids[0], ids[ref_pos])
            assert part.cu_seqlens.tolist() == torch.tensor([0, *seq]).cumsum(0).tolist()
            assert part.cu_seqlens_padded.tolist() == starts.tolist()
        else:
            assert torch.equal(part.input_ids, mb.input_ids[:, ref_pos])
        assert part.input_ids.numel() * cp == t_new * b
        z_local = z_local.detach().clone().requires_grad_()
        mine = z_local[part.positions]
        common = dict(old_logp=part.old_logp, rollout_logp=part.rollout_logp, vocab_size=V)
        out = fused_vocab_parallel_agpo_loss(mine, part.target, part.advantages, cfg, **common)
        local = (out.loss * part.agg_weights).sum()
        local.backward()
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, want.detach(), rtol=1e-12, atol=1e-14)
        # The gradient w.r.t. the logits: this rank's part scattered back into the unsplit
        # order, summed over the CP ranks.
        grad = torch.zeros(n, V, dtype=torch.float64)
        grad[part.keep] = z_local.grad[part.positions]
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
        # Every loss position is on exactly one CP rank.
        count = torch.zeros(n, dtype=torch.float64)
        count[part.keep] = 1.0
        dist.all_reduce(count, group=group)
        assert torch.equal(count, torch.ones(n, dtype=torch.float64))


@pytest.mark.dist
@pytest.mark.parametrize("packed", [True, False], ids=["packed-thd", "padded-bshd"])
def test_cp2_loss_and_logits_gradient_equal_unsplit(packed):
    run_distributed(_cp_loss_matches, 2, packed)
