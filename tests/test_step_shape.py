"""The GPU-shaped step's host side, against independent references: the vectorised token batch
against a row-by-row build, flat rollouts against per-row lists, packed micro-batches that
count every loss token once and attend only inside their sequence, token-balanced data
parallelism, and per-row aggregation weights equal to the whole mini-batch's."""

import pytest
import torch

from megatron_agpo.algorithms import aggregation_weights
from megatron_agpo.ops import IGNORE_INDEX
from megatron_agpo.trainer.batch import (
    balanced_partition,
    build_token_batch_from_lists,
    packed_causal_mask,
    row_scales,
)
from megatron_agpo.trainer.records import ScoredRollouts

pytestmark = pytest.mark.unit


def _random_rows(seed: int, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, lps = [], [], []
    for _ in range(n):
        p = int(torch.randint(1, 9, (1,), generator=g))
        r = int(torch.randint(0, 13, (1,), generator=g))
        prompts.append(torch.randint(3, 50, (p,), generator=g).tolist())
        responses.append(torch.randint(3, 50, (r,), generator=g).tolist())
        lps.append((-torch.rand(r, generator=g)).tolist())
    return prompts, responses, lps


def _row_by_row(prompts, responses, lps, pad_id, multiple):
    """The definition, one row at a time: target[t] = seq[t + 1] where that is a response
    token."""
    s = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    s = -(-s // multiple) * multiple
    ids = torch.full((len(prompts), s), pad_id)
    tgt = torch.full((len(prompts), s), IGNORE_INDEX)
    lp = torch.zeros(len(prompts), s)
    for i, (p, r, q) in enumerate(zip(prompts, responses, lps, strict=True)):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        for j, tok in enumerate(r):
            tgt[i, len(p) - 1 + j] = tok
            lp[i, len(p) - 1 + j] = q[j]
    return ids, tgt, lp


@pytest.mark.parametrize("seed,multiple", [(0, 1), (1, 4)])
def test_vectorised_token_batch_equals_row_by_row(seed, multiple):
    prompts, responses, lps = _random_rows(seed)
    adv = torch.randn(len(prompts))
    b = build_token_batch_from_lists(prompts, responses, lps, adv, 7, pad_multiple=multiple)
    ids, tgt, lp = _row_by_row(prompts, responses, lps, 7, multiple)
    assert torch.equal(b.input_ids, ids) and torch.equal(b.target, tgt)
    torch.testing.assert_close(b.rollout_logp, lp, rtol=0, atol=0)
    assert torch.equal(b.loss_mask, (tgt != IGNORE_INDEX).float())
    assert b.lengths.loss == tuple(len(r) for r in responses)
    # The overlong filter keeps the tokens and takes the rows out of the loss, consistently.
    cut = [i % 3 == 0 for i in range(len(prompts))]
    f = b.without_loss(cut)
    assert torch.equal(f.input_ids, ids)
    for i, c in enumerate(cut):
        assert f.lengths.loss[i] == (0 if c else len(responses[i]))
        assert int(f.loss_mask[i].sum()) == f.lengths.loss[i]


def test_flat_rollouts_select_and_concat_equal_the_lists():
    prompts, responses, lps = _random_rows(2, n=12)
    scored = ScoredRollouts.from_lists(
        prompts, responses, lps, [False] * 12, [float(i) for i in range(12)], 3, 4
    )
    rows = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])
    sel = scored.select(rows)
    flat = lambda seqs: [x for s in seqs for x in s]  # noqa: E731
    assert sel.prompt_tokens.tolist() == flat(prompts[i] for i in rows.tolist())
    assert sel.response_tokens.tolist() == flat(responses[i] for i in rows.tolist())
    want_lp = torch.tensor(flat(lps[i] for i in rows.tolist()), dtype=torch.float32)
    torch.testing.assert_close(sel.rollout_logp, want_lp, rtol=0, atol=0)
    assert sel.rewards.tolist() == [float(i) for i in rows.tolist()]
    both = ScoredRollouts.concat([scored.select(rows[:4]), scored.select(rows[4:])])
    assert torch.equal(both.response_tokens, sel.response_tokens)
    with pytest.raises(ValueError, match="sample 1: 2 log-probs for 3 response tokens"):
        ScoredRollouts.from_lists([[1], [1]], [[2], [3, 4, 5]], [[-1.0], [-1.0, -1.0]],
                                  [False] * 2, [0.0] * 2, 0, 2)  # fmt: skip


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("budget", [0, 20, 64])
def test_micro_batches_count_every_loss_token_once(packing, budget):
    prompts, responses, lps = _random_rows(3)
    b = build_token_batch_from_lists(prompts, responses, lps, torch.randn(40), 0)
    b = b.without_loss([i % 7 == 0 for i in range(40)])
    micro = b.micro_batches(5, budget, multiple=2, packing=packing)
    assert sorted(r for m in micro for r in m.rows) == list(range(40))
    sources = torch.cat([m.source for m in micro])
    want = (b.loss_mask.reshape(-1) > 0).nonzero().squeeze(1)
    assert torch.equal(sources.sort().values, want)  # each loss position exactly once
    for m in micro:
        t = m.input_ids.shape[1]
        assert t % 2 == 0 and len(m.rows) <= 5
        if budget and packing and len(m.rows) > 1:
            assert sum(b.lengths.seq[r] for r in m.rows) <= budget
        # The model input at a loss position is the parent's token there (the target follows it).
        flat_in = m.input_ids.t().reshape(-1)  # [T * b], sequence first
        parent_in = b.input_ids.reshape(-1)[m.source]
        assert torch.equal(flat_in[m.positions], parent_in)
        assert torch.equal(m.target, b.target.reshape(-1)[m.source])
        if packing:
            assert m.input_ids.shape[0] == 1
            # THD boundaries: each sequence, then the row's padding as one segment.
            cu = m.cu_seqlens.tolist()
            seqs = [b.lengths.seq[r] for r in m.rows]
            assert cu[: len(seqs) + 1] == [sum(seqs[:k]) for k in range(len(seqs) + 1)]
            assert cu[-1] == t and len(cu) == len(seqs) + 1 + (sum(seqs) < t)


def test_packed_mask_is_block_diagonal_causal():
    mask = packed_causal_mask([3, 2], 6, "cpu")[0, 0]
    seen = ~mask  # True = may attend
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    want[3:5, 3:5] = torch.ones(2, 2, dtype=torch.bool).tril()
    want[5, 5] = True  # the padding position: a block of its own
    assert torch.equal(seen, want)


@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-sum-constant"],
)  # fmt: skip
def test_row_scales_equal_the_whole_mini_batch_weights(mode):
    lens = [3, 0, 5, 1, 4]
    mask = torch.zeros(5, 8)
    for i, n in enumerate(lens):
        mask[i, 2 : 2 + n] = 1.0
    w = aggregation_weights(mask, mode, 16.0)
    scale = row_scales(lens, mode, 16.0)
    torch.testing.assert_close(mask * scale[:, None], w, rtol=0, atol=0)


def test_balanced_partition_on_a_skewed_length_distribution():
    """Long-tailed (lognormal) lengths, sorted so that contiguous shards are as unequal as
    they can be: the token-balanced shards stay within 1.1x of each other."""
    g = torch.Generator().manual_seed(0)
    lengths = sorted((torch.randn(256, generator=g) * 0.8 + 6.0).exp().long().add(1).tolist())
    for parts in (2, 4, 8):
        shares = balanced_partition(lengths, parts)
        assert sorted(i for s in shares for i in s) == list(range(256))
        tokens = [sum(lengths[i] for i in s) for s in shares]
        assert max(tokens) / min(tokens) <= 1.1, tokens
        contiguous = [sum(x) for x in torch.tensor(lengths).tensor_split(parts)]
        assert max(contiguous) / min(contiguous) > 2  # what the old contiguous rows gave
    assert balanced_partition([5], 3) == [[], [], [0]] or sorted(
        map(len, balanced_partition([5], 3))
    ) == [0, 0, 1]


def test_megatron_fusions_follow_the_device():
    from megatron_agpo.backends import Backends, megatron_fusions

    cpu = megatron_fusions(Backends(cuda=False, transformer_engine=False, apex=False, vllm=True))
    assert not any(vars(cpu).values()), cpu
    gpu = megatron_fusions(Backends(cuda=True, transformer_engine=True, apex=True, vllm=True))
    assert gpu.apply_rope_fusion and gpu.bias_activation_fusion and gpu.overlap_grad_reduce
    assert gpu.persist_layer_norm
    # Never on: packing's block-diagonal mask (the fused causal kernel ignores it) and the
    # weight sync reading parameters right after each update.
    assert not gpu.masked_softmax_fusion and not gpu.overlap_param_gather


def test_nothing_between_ranks_is_pickled():
    """torch.distributed's *_object_list collectives pickle (and unpickle what a peer sends):
    the step, the records and the weight gather use plain tensors only."""
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "megatron_agpo"
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        for call in ("send_object_list", "recv_object_list", "broadcast_object_list",
                     "all_gather_object", "gather_object", "scatter_object_list"):  # fmt: skip
            assert f"{call}(" not in text, f"{path.relative_to(pkg.parent)} calls {call}"
