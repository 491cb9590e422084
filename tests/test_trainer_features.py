"""DAPO filters, dynamic batch size, the lr schedule and dynamic sampling, against hand-worked
values and closed forms (no engine: the rollout is a stub returning chosen rewards)."""

import math
import types

import pytest
import torch

from megatron_agpo.algorithms import advantages, group_rows, informative_groups
from megatron_agpo.data.iterator import PromptIterator
from megatron_agpo.train import load_config
from megatron_agpo.trainer.batch import build_token_batch_from_lists, plan_micro_batches
from megatron_agpo.trainer.loop import Timer, Trainer, build_scheduler
from megatron_agpo.trainer.records import ScoredRollouts

pytestmark = pytest.mark.unit

# Three groups of n=4: all wrong, mixed, all right.
REWARDS = torch.tensor([0.0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float64)


def test_informative_groups_agpo_keeps_all_wrong_groups():
    adv = advantages(REWARDS, 4, "agpo")
    # AGPO: all-wrong -> -w_neg (signal), all-right -> 0 (none).
    assert informative_groups(REWARDS, adv, 4, "zero_advantage").tolist() == [True, True, False]
    assert informative_groups(REWARDS, adv, 4, "identical_rewards").tolist() == [False, True, False]
    grpo = advantages(REWARDS, 4, "grpo")
    assert informative_groups(REWARDS, grpo, 4, "zero_advantage").tolist() == [False, True, False]


def test_informative_groups_errors_and_rows():
    adv = advantages(REWARDS, 4, "agpo")
    with pytest.raises(ValueError, match="groups of n=5"):
        informative_groups(REWARDS, adv, 5, "zero_advantage")
    with pytest.raises(ValueError, match="unknown group filter 'x'"):
        informative_groups(REWARDS, adv, 4, "x")
    with pytest.raises(ValueError, match=r"rewards \(12,\) and advantages \(11,\)"):
        informative_groups(REWARDS, adv[:11], 4, "zero_advantage")
    assert group_rows(torch.tensor([False, True, True]), 2).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("budget,max_rows", [(1, 4), (12, 3), (20, 8), (1000, 3), (1000, 100)])
def test_plan_micro_batches_covers_every_row_within_budget(budget, max_rows):
    lengths = [5, 9, 3, 9, 7, 2, 11, 4, 6, 8]
    plan = plan_micro_batches(lengths, max_rows, budget)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    for g in plan:
        assert len(g) <= max_rows
        cost = len(g) * max(lengths[i] for i in g)
        assert cost <= budget or len(g) == 1  # a row over budget runs alone, uncut
    # Greedy longest-first is optimal for this cost on sorted input: no two neighbouring
    # groups could be merged.
    for a, b in zip(plan, plan[1:], strict=False):
        merged = len(a) + len(b)
        assert merged > max_rows or merged * lengths[a[0]] > budget


def test_micro_batches_hold_the_rows_trimmed():
    b = build_token_batch_from_lists(
        [[1, 2], [1], [1, 2, 3]], [[4], [5, 6, 7, 8], [9]], [[-1.0], [-1.0] * 4, [-1.0]],
        torch.tensor([1.0, 2.0, 3.0]), pad_id=0,
    )  # fmt: skip
    micro = b.micro_batches(max_rows=2, token_budget=8, packing=False)
    assert [m.rows for m in micro] == [[1], [2, 0]]
    assert micro[0].input_ids.tolist() == [[1, 5, 6, 7, 8]]
    assert micro[1].input_ids.tolist() == [[1, 2, 3, 9], [1, 2, 4, 0]]
    # Only response positions reach the loss: row 2's token 9 is predicted at t=2, row 0's 4
    # at t=1 ([T, b] flattened: t * b + row).
    assert micro[1].advantages.tolist() == [3.0, 1.0]
    assert micro[1].positions.tolist() == [2 * 2 + 0, 1 * 2 + 1]
    assert micro[1].target.tolist() == [9, 4]
    plain = b.micro_batches(max_rows=2, packing=False)
    assert [m.rows for m in plain] == [[0, 1], [2]] and plain[1].input_ids.shape == (1, 4)
    # Packed: the sequences back to back in one row, first-fit decreasing within the budget.
    packed = b.micro_batches(max_rows=2, token_budget=8, packing=True)
    assert [m.rows for m in packed] == [[1, 0], [2]]
    assert packed[0].input_ids.tolist() == [[1, 5, 6, 7, 8, 1, 2, 4]]
    assert packed[0].cu_seqlens.tolist() == [0, 5, 8]
    assert packed[0].positions.tolist() == [0, 1, 2, 3, 6] and packed[0].target.tolist() == [
        5, 6, 7, 8, 4,
    ]  # fmt: skip


class _Opt:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0, "wd_mult": 1.0}, {"lr": 0.0, "wd_mult": 0.0}]


def test_cosine_schedule_with_warmup_matches_closed_form():
    cfg = load_config(
        ["trainer.steps=20", "optimizer.lr=1e-3", "scheduler.warmup_steps=4",
         "scheduler.decay_style=cosine", "scheduler.min_lr=1e-4"]
    )  # fmt: skip
    opt = _Opt()
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == lrs[-1]
        sched.step(1)
    for k, lr in enumerate(lrs):
        if k <= 4:
            want = 1e-3 * k / 4
        else:
            want = 1e-4 + 0.5 * (1 + math.cos(math.pi * (k - 4) / 16)) * (1e-3 - 1e-4)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), k
    # Restoring the update count restores the lr (the config wins for everything else).
    again = build_scheduler(_Opt(), cfg)
    again.load_state_dict(sched.state_dict())
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-12)


def test_constant_schedule_keeps_lr_and_config_errors():
    opt = _Opt()
    sched = build_scheduler(opt, load_config([]))
    for _ in range(5):
        sched.step(1)
    assert opt.param_groups[0]["lr"] == 1e-4
    with pytest.raises(ValueError, match="scheduler.warmup_steps=60 must be below"):
        load_config(["scheduler.warmup_steps=60"]).validate()
    with pytest.raises(ValueError, match="scheduler.decay_style='step'"):
        load_config(["scheduler.decay_style=step"]).validate()
    with pytest.raises(ValueError, match="trainer.dynamic_sampling='on'"):
        load_config(["trainer.dynamic_sampling=on"]).validate()


def _stub_trainer(overrides, reward_rounds):
    """A Trainer with only what `collect` reads: generation returns the prompts, scoring the
    given rewards per round."""
    cfg = load_config(["data.prompts_per_step=3", "rollout.n=4", *overrides])
    t = Trainer.__new__(Trainer)
    t.cfg, t.step, t.rank, t.device = cfg, 0, 0, torch.device("cpu")
    t.data = PromptIterator(list(range(100)), batch_size=3, shuffle=False)
    t.engine = types.SimpleNamespace(sleep=lambda: None)
    calls = iter(reward_rounds)

    def score(prompts, samples, n):
        r = next(calls)
        ids = [p for p in prompts for _ in range(n)]
        return ScoredRollouts.from_lists(
            [(p,) for p in ids], [(p, j) for j, p in enumerate(ids)],
            [(-1.0, -1.0) for _ in ids], [False] * len(ids), r, 0, n,
        )  # fmt: skip

    t.generate = lambda prompts, n, step_seed, round_=0: prompts
    t.score = score
    return t


def test_dynamic_sampling_refills_with_informative_groups_only():
    w, m, r = [0.0] * 4, [1.0, 0, 0, 0], [1.0] * 4  # wrong, mixed, right groups
    rounds = [w + r + r, m + w + r, m + m + w]
    t = _stub_trainer(["trainer.dynamic_sampling=identical_rewards"], rounds)
    out, stats = t.collect(Timer())
    rewards, adv = out.rewards, out.advantages
    # Round 1 keeps nothing, round 2 the mixed group (prompt 3), round 3 its two mixed ones.
    assert out.prompt_tokens[::4].tolist() == [3, 6, 7]
    assert len(rewards) == 12 and stats == {
        "groups/sampled": 9, "sampling/rounds": 3, "groups/kept": 3,
        "reward/mean_sampled": pytest.approx(15 / 36, rel=1e-12),  # all 9 groups, not the kept
    }  # fmt: skip
    # Advantages are the groups' own: the same as computing them on the kept groups alone.
    kept = torch.tensor(m + m + m, dtype=torch.float64)
    torch.testing.assert_close(adv, advantages(kept, 4, "agpo"))
    # A round with more informative groups than needed is cut to the step's size.
    t = _stub_trainer(["trainer.dynamic_sampling=identical_rewards"], [m + r + m, m + m + m])
    out, stats = t.collect(Timer())
    assert out.prompt_tokens[::4].tolist() == [0, 2, 3] and stats["groups/sampled"] == 6
    t = _stub_trainer(["trainer.dynamic_sampling=zero_advantage"], rounds)
    out, stats = t.collect(Timer())
    assert out.prompt_tokens[::4].tolist() == [0, 3, 4]  # AGPO keeps all-wrong groups
    assert stats["sampling/rounds"] == 2 and t.data.state_dict()["offset"] == 6


def test_dynamic_sampling_with_nothing_kept_is_an_error():
    r = [1.0] * 12
    t = _stub_trainer(
        ["trainer.dynamic_sampling=zero_advantage", "trainer.max_sampling_rounds=2"], [r, r]
    )
    with pytest.raises(RuntimeError, match="kept no group in 2 rounds"):
        t.collect(Timer())


def test_collect_without_dynamic_sampling_is_one_round():
    t = _stub_trainer([], [[1.0] * 12])
    out, stats = t.collect(Timer())
    assert len(out.rewards) == 12 and stats["groups/kept"] == 3


def _scored(rows, truncated):
    n = len(rows)
    out = ScoredRollouts.from_lists(
        [(5, 6, 7)] * n, rows, [tuple(-1.0 for _ in r) for r in rows], truncated, [0.0] * n, 0, n
    )
    out.advantages = torch.tensor([1.0, -1.0, 0.5, -1.0][:n], dtype=torch.float64)
    return out


def _token_mean_loss(batch, logits):
    """sum(w * -A * log p(target)) with token-mean weights: written out by hand (float64)."""
    logp = torch.log_softmax(logits, -1).gather(-1, batch.target.clamp(min=0)[..., None])[..., 0]
    w = batch.loss_mask / batch.loss_mask.sum()
    return (w * -batch.advantages[:, None].double() * logp).sum()


@pytest.mark.parametrize("on", [True, False])
def test_overlong_filter_takes_truncated_rows_out_of_the_loss(on):
    t = Trainer.__new__(Trainer)
    t.cfg = load_config([f"trainer.overlong_filter={str(on).lower()}"])
    t.tokenizer, t.device, t.seq_multiple = types.SimpleNamespace(pad_token_id=0), "cpu", 1
    t.norm_constant = 16.0
    rows = [(8, 9, 10), (11, 12, 13, 14), (15, 16), (17, 18, 19)]
    truncated = [False, True, False, True]
    batch, _ = t.token_batch(_scored(rows, truncated))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 24, generator=g, dtype=torch.float64)
    logits.requires_grad_(True)
    loss = _token_mean_loss(batch, logits)
    loss.backward()
    row_grad = logits.grad.abs().sum(dim=(1, 2))
    if on:
        # The truncated rows get no gradient, and the loss is the kept rows' loss alone.
        assert row_grad[1] == 0 and row_grad[3] == 0 and (row_grad[[0, 2]] > 0).all()
        kept, _ = t.token_batch(_scored([rows[0], rows[2]], [False, False]))
        kept.advantages = torch.tensor([1.0, 0.5])
        s = kept.input_ids.shape[1]
        ref = _token_mean_loss(kept, logits.detach()[[0, 2], :s])
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    else:
        assert (row_grad > 0).all()


def test_tis_turned_on_when_engine_and_trainer_precisions_differ():
    """fp32 trainer with a bf16 engine: the samples come from another policy than the
    trainer's old one, so truncated IS is switched on (default cap) even if it was off."""
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(["algorithm.loss.tis_cap=null", "rollout.engine.dtype=bfloat16"])
    t._correct_precision_mismatch()
    assert t.cfg.algorithm.loss.tis_cap == 2.0
    t.cfg = load_config(["algorithm.loss.tis_cap=null"])  # fp32 on both sides: left off
    t._correct_precision_mismatch()
    assert t.cfg.algorithm.loss.tis_cap is None


def test_reinforce_pp_whitens_once_over_the_kept_groups():
    """REINFORCE++'s batch whitening over the kept batch of every round together: the same as
    computing the advantages of the kept groups' rewards in one call (not per round)."""
    m1, m2, w = [1.0, 0, 0, 0], [1.0, 1, 0, 1], [0.0] * 4
    t = _stub_trainer(
        ["algorithm=reinforce_pp", "trainer.dynamic_sampling=identical_rewards"],
        [m1 + w + w, m2 + m1 + w],
    )
    out, stats = t.collect(Timer())
    assert stats["sampling/rounds"] == 2
    kept = torch.tensor(m1 + m2 + m1, dtype=torch.float64)
    want = advantages(kept, 4, t.cfg.algorithm.advantage_config())
    torch.testing.assert_close(out.advantages, want, rtol=1e-12, atol=1e-12)
