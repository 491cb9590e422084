"""Checkpoint/resume: exact equality of model and optimizer, killed writers, whole runs."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.runs import TP2_OPTS
from tests.runs import train as _train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.tiny_models import tiny_hf_model

    return str(tiny_hf_model(tmp_path_factory.mktemp("tiny")))


def _body(rank, world, hf, root):
    from megatron.core import dist_checkpointing
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_agpo.models import build_model_from_hf
    from megatron_agpo.parallel import (
        OptimizerSettings,
        ParallelConfig,
        init_parallel,
        wrap_for_training,
    )
    from megatron_agpo.trainer import checkpoint as ck

    pc = ParallelConfig(tensor_parallel=world)
    init_parallel(pc)
    root = Path(root)

    def make():
        model, _ = build_model_from_hf(hf)
        return wrap_for_training(model, pc, OptimizerSettings(lr=1e-3))

    def step(model, opt, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 60, (4, 10), generator=g)
        model.zero_grad_buffer()
        opt.zero_grad()
        pos = torch.arange(10).expand(4, 10)
        model(input_ids=ids, position_ids=pos, attention_mask=None).pow(2).mean().backward()
        finalize_model_grads([model])
        opt.step()

    m1, o1 = make()
    step(m1, o1, 0)
    ck.save(root, 1, m1, o1, {"step": 1}, keep_last=2)

    # A writer that dies mid-save (here: the shard write raises after the temp folder exists)
    # leaves no step_2 and the previous checkpoint intact.
    real = dist_checkpointing.save
    dist_checkpointing.save = lambda *a, **k: (_ for _ in ()).throw(OSError("killed"))
    with pytest.raises(OSError):
        ck.save(root, 2, m1, o1, {"step": 2}, keep_last=2)
    dist_checkpointing.save = real
    torch.distributed.barrier()
    assert ck.latest(root).name == "step_0000001"

    m2, o2 = make()
    assert ck.load(ck.latest(root), m2, o2)["step"] == 1
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # The next update is bit-identical: Adam moments and step count came back too.
    step(m1, o1, 1)
    step(m2, o2, 1)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(a, b), f"{n} differs after the first step past the resume"


@pytest.mark.dist
def test_checkpoint_round_trip_tp2(tiny_hf, tmp_path):
    run_distributed(_body, 2, tiny_hf, str(tmp_path / "ckpt"))


def _stopped_at(run: Path, dst: Path, step: int) -> None:
    """`dst`: a copy of the finished run `run` as it was when it stopped right after step
    `step`'s checkpoint (later checkpoints and metrics rows left out)."""
    shutil.copytree(run, dst)
    for ck in (dst / "checkpoints").glob("step_*"):
        if int(ck.name.removeprefix("step_")) > step:
            shutil.rmtree(ck)
    metrics = dst / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tp2_run, tmp_path):
    """4 steps == 2 steps, a restart, 2 more (world size 2, TP=2, real vLLM replica), with a
    cosine lr schedule (restored from the checkpoint) and token-budget micro-batches. The
    uninterrupted 4 steps are the shared TP=2 run (tests/conftest.py); the run stopped after
    step 2 is that run's folder as it was then (its step-2 checkpoint, its first rows)."""
    opts = TP2_OPTS
    run, straight = tp2_run
    _stopped_at(run, tmp_path / "b", 2)
    _stopped_at(run, tmp_path / "c", 2)
    resumed = _train(tmp_path / "b", 4, *opts)
    keys = ("step", "loss", "grad_norm", "reward/mean", "eval/pass@1", "neg/entropy", "lr")
    pick = lambda rows: [{k: r.get(k) for k in keys} for r in rows]  # noqa: E731
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert pick(resumed[3:]) == pick(straight[3:])
    # The TP=2 checkpoint resumed at TP=1 in one process (model and optimizer resharded): the
    # next steps equal the TP=2 run's up to float rounding (other GEMM splits).
    at_tp1 = _train(tmp_path / "c", 4, *opts, "nproc=1", "parallel.tensor_parallel=1")
    assert [r["step"] for r in at_tp1] == [0, 1, 2, 3, 4]
    for got, want in zip(at_tp1[3:], straight[3:], strict=True):
        assert got["reward/mean"] == want["reward/mean"]
        for k in ("loss", "grad_norm", "neg/entropy", "lr"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (got["step"], k)
    assert [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    # Weight-sync parity from the TP=2 trainer to the vLLM replica: after every sync the
    # engine's log-probs of the tokens it sampled equal the trainer's own (fp32).
    gaps = [r["logp_gap"] for r in straight + resumed[3:] if "logp_gap" in r]
    assert len(gaps) == 6 and max(gaps) < 1e-4, gaps


@pytest.mark.engine
@pytest.mark.e2e
@pytest.mark.dist
def test_pipeline_parallel_trainer_syncs_the_engine(tmp_path):
    """PP=2 (two stages, one process each): the weight sync gathers both stages into the vLLM
    replica, whose log-probs then equal the trainer's; dynamic sampling and overlong filtering
    run on the way."""
    rows = _train(
        tmp_path / "pp", 2, "parallel.tensor_parallel=1", "parallel.pipeline_parallel=2",
        "trainer.eval_every=0", "trainer.dynamic_sampling=zero_advantage",
        "trainer.overlong_filter=true", "rollout.max_new_tokens=6", "trainer.token_budget=200",
    )  # fmt: skip
    assert [r["weight_version"] for r in rows] == [1, 2]
    # max_new_tokens=6 cuts most answers: they are filtered out of the loss, and counted.
    assert all(0 < r["response/overlong_filtered"] <= 1 for r in rows)
    assert all(r["groups/kept"] == 8 for r in rows)
    assert rows[1]["logp_gap"] < 1e-4, rows[1]["logp_gap"]  # sampled with synced weights
