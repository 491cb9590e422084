"""Data and sequence parallelism in the trainer's step, and the device rule.

- DP=2 (and TP=2 x DP=2): each data-parallel rank runs forward/backward on its own half of the
  rows (counted at the embedding), and the summed gradient equals the float64 transformers
  reference on the whole batch, i.e. DP=1's gradient.
- TP=2 with sequence parallelism: log-probs and gradients equal the same reference (and so
  TP=2 without it).
- The background weight sync's gather over mirrored groups (TP=2 x PP=2) beside collectives
  on megatron's groups: both right.
- Device rule: with `torch.set_default_device("meta")` every tensor created without an
  explicit device lands on `meta`, and the first op mixing it with the CPU model's tensors
  raises; the step must run unharmed and give the same numbers.
"""

import pytest
import torch

from megatron_agpo.algorithms import PolicyLossConfig, aggregation_weights
from tests.dist_utils import run_distributed
from tests.test_trainer_step import hf_logp, make_batch, reference_grads


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    """Output layer tied to the embedding (SmolLM2's layout): one parameter gets both the
    lookup's gradient and the fused output layer's."""
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True))


def _count_rows(model) -> list[int]:
    """Tokens each forward of `model` sees (a pre-hook on the embedding); packed micro-batches
    hold no padding, so these are exactly the rows' tokens."""
    seen: list[int] = []
    model.module.embedding.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    return seen


def _body(rank, world, hf_dir, tp, sp, token_budget, fuse=False):
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import build_model_from_hf, megatron_to_hf_tensors
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.batch import balanced_partition
    from megatron_agpo.trainer.step import StepShape, compute_logp, forward_backward

    # A plain all-reduce of the gradients, so every rank holds the whole gradient to compare
    # (the distributed optimizer reduce-scatters: each rank would hold only its shard).
    pc = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp, use_distributed_optimizer=False)
    init_parallel(pc)
    dp = ps.get_data_parallel_world_size()
    assert dp == world // tp
    model, mcfg = build_model_from_hf(hf_dir, sequence_parallel=sp)
    ddp, _ = wrap_for_training(model, pc)
    seen = _count_rows(ddp)
    cfg = PolicyLossConfig(agg_mode="seq-mean-token-mean", fuse_output_layer=fuse)
    v = mcfg.vocab_size
    # 12 rows; with sequence parallelism the padded length must split over the TP ranks.
    batch = make_batch(v, pad_multiple=tp if sp else 1)
    ref_lp = hf_logp(hf_dir, batch)
    batch.old_logp = ref_lp.float() + 0.2 * torch.sin(torch.arange(ref_lp.numel())).view_as(ref_lp)
    batch.old_logp = batch.old_logp * batch.loss_mask
    # The aggregation weights normalise over the whole batch; each DP rank takes its share of
    # the rows, balanced by tokens.
    batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)
    shares = balanced_partition(list(batch.lengths.seq), dp)
    mine = shares[ps.get_data_parallel_rank()]
    local = batch.select(mine)
    shape = StepShape(4, token_budget)
    logp = compute_logp(ddp, local, shape, v, fuse_output_layer=fuse)
    # This rank's rows only, packed: the embedding sees their tokens and nothing else.
    # (a packed row is rounded up to a multiple of TP under sequence parallelism).
    tokens, multiple = sum(batch.lengths.seq[i] for i in mine), tp if sp else 1
    assert 0 <= sum(seen) - tokens < multiple * len(seen), (seen, mine)
    torch.testing.assert_close(logp.double(), ref_lp[mine], rtol=0, atol=2e-5)
    seen.clear()
    ddp.zero_grad_buffer()
    metrics = forward_backward(ddp, local, cfg, shape, v).to_dict()
    assert 0 <= sum(seen) - tokens < multiple * len(seen), (seen, mine)
    # Metrics are merged over every DP rank: all the batch's tokens are counted.
    assert metrics["all/tokens"] == batch.loss_mask.sum().item()
    grads = {n: p.main_grad for n, p in ddp.module.named_parameters()}
    ours = dict(megatron_to_hf_tensors(grads, mcfg))
    ref_loss, ref = reference_grads(hf_dir, batch, cfg)
    for name in ours:
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.dist
@pytest.mark.parametrize(
    "world,tp,sp,token_budget,fuse,tied",
    [
        (2, 1, False, 0, False, False),  # DP=2
        (2, 1, False, 24, False, False),  # DP=2 with the token-budget micro-batches
        (2, 2, True, 0, False, False),  # TP=2 with sequence parallelism
        (2, 2, False, 0, True, True),  # TP=2, the (tied) output layer fused into the loss
        (2, 2, True, 24, True, False),  # ... under sequence parallelism, token budget
        pytest.param(4, 2, False, 0, False, False, marks=pytest.mark.slow),  # TP=2 x DP=2
    ],
)
def test_parallel_step_gradient_equals_reference(
    tiny_hf, tiny_tied, world, tp, sp, token_budget, fuse, tied
):
    hf = tiny_tied if tied else tiny_hf
    run_distributed(_body, world, hf, tp, sp, token_budget, fuse)


def _gather_beside_the_step(rank, world, hf):
    import threading

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_agpo.models import GatherGroups, build_model_from_hf, gather_hf_tensors_to_rank0
    from megatron_agpo.parallel import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    model, mcfg = build_model_from_hf(hf)
    ref = {n: t.clone() for n, t in gather_hf_tensors_to_rank0(model, mcfg)}
    groups = GatherGroups.mirror(mcfg)
    tp, pp = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    members = {"tp": dist.get_process_group_ranks(tp), "pp": dist.get_process_group_ranks(pp)}
    assert groups.tp is not tp and groups.pp is not pp and groups.ep is None
    assert dist.get_process_group_ranks(groups.tp) == members["tp"]
    assert dist.get_process_group_ranks(groups.pp) == members["pp"]
    got, errors = {}, []

    def gather():
        try:
            for n, t in gather_hf_tensors_to_rank0(model, mcfg, groups):
                got[n] = t.clone()
        except Exception as e:  # noqa: BLE001 - checked below
            errors.append(e)

    thread = threading.Thread(target=gather)
    thread.start()
    # Meanwhile the step's own collectives on megatron's groups and the default group.
    for i in range(300):
        for name, group in (("tp", tp), ("pp", pp), ("world", None)):
            ranks = members.get(name, list(range(world)))
            x = torch.full((256,), float(rank + i))
            dist.all_reduce(x, group=group)
            assert torch.equal(x, torch.full((256,), float(sum(ranks) + len(ranks) * i))), name
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
    if rank == 0:  # every tensor, bit for bit those of a gather alone
        assert sorted(got) == sorted(ref) and len(ref) > 10
        for n, t in ref.items():
            assert torch.equal(got[n], t), n
    else:
        assert not got


@pytest.mark.dist
def test_weight_gather_on_mirrored_groups_runs_beside_the_steps_collectives(tiny_hf):
    """The background sync's gather (TP all-gathers, pipeline sends to rank 0) runs in a
    thread over `GatherGroups` (groups with the members of megatron's TP and pipeline
    groups) while the main thread drives collectives on megatron's groups and the default
    group: both finish, each with the right values (TP=2 x PP=2, 4 gloo ranks; after the
    TP=2 x DP=2 step above, whose processes it reuses)."""
    run_distributed(_gather_beside_the_step, 4, tiny_hf, timeout=240)


def _meta_body(rank, world, hf_dir):
    from megatron_agpo.algorithms import advantages
    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import ParallelConfig, init_parallel, wrap_for_training
    from megatron_agpo.trainer.step import (
        StepShape,
        compute_logp,
        forward_backward,
        grads_are_finite,
    )

    pc = ParallelConfig(tensor_parallel=1)
    init_parallel(pc)
    model, mcfg = build_model_from_hf(hf_dir)
    ddp, _ = wrap_for_training(model, pc)
    v, cfg = mcfg.vocab_size, PolicyLossConfig()
    cpu = torch.device("cpu")

    def step(batch):
        rewards = torch.tensor([1.0, 0, 0, 1] * 3, dtype=torch.float64, device=cpu)
        batch.advantages = advantages(rewards, 4, "agpo").float()
        batch = batch.without_loss([i == 1 for i in range(len(batch))])
        shape = StepShape(5, 24)
        batch.old_logp = compute_logp(ddp, batch, shape, v)
        batch.agg_weights = aggregation_weights(batch.loss_mask, cfg.agg_mode)
        ddp.zero_grad_buffer()
        m = forward_backward(ddp, batch, cfg, shape, v).to_dict()
        finite = grads_are_finite(ddp)
        return batch.old_logp.clone(), m, finite, [p.main_grad.clone() for p in ddp.parameters()]

    want = step(make_batch(v).to(cpu))
    batch = make_batch(v).to(cpu)  # built before the default device changes
    torch.set_default_device("meta")
    try:
        got = step(batch)
    finally:
        torch.set_default_device(None)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1] == want[1] and got[2] and want[2]
    for a, b in zip(got[3], want[3], strict=True):
        assert a.device == cpu
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.dist
def test_step_creates_no_tensor_off_the_model_device(tiny_hf):
    """Fails when any hot-path tensor is created with an implicit device (it lands on meta)."""
    run_distributed(_meta_body, 1, tiny_hf)


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_data_parallel_run_with_dynamic_sampling_and_token_budget(tmp_path):
    """The whole trainer at DP=2 (TP=1, two ranks, a vLLM replica): dynamic sampling drops the
    groups without signal and refills to the full batch (GRPO: all-wrong and all-right groups
    have advantage 0; at the warm-started policy's pass rate, about 0.13, a round of 6 groups
    of 8 keeps about 4), token-budget micro-batches run on each rank's shard, and after every
    sync the engine's log-probs equal the trainer's (the DP ranks stayed in step)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    run = tmp_path / "dp2"
    cmd = [
        sys.executable, "-m", "megatron_agpo.train", "trainer.steps=2", "algorithm=grpo",
        "parallel.tensor_parallel=1", "trainer.eval_every=0", "data.prompts_per_step=6",
        "trainer.dynamic_sampling=zero_advantage", "trainer.token_budget=200",
        f"logging.run_dir={run}", "logging.progress=false", "checkpoint.save_final=false",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DP=2" in res.stdout, res.stdout[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "updated" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["groups/kept"] == 6 and r["all/tokens"] > 0
        # Every round samples data.prompts_per_step prompts.
        assert r["groups/sampled"] == 6 * r["sampling/rounds"], r
    # A refill happened: some step dropped groups and sampled another round to replace them.
    refilled = [r for r in steps if r["sampling/rounds"] > 1]
    assert refilled and all(r["groups/sampled"] > r["groups/kept"] for r in refilled), steps
    assert max(r["logp_gap"] for r in steps) < 1e-4
