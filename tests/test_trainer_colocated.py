"""The trainer with the colocated engine: vLLM inside rank 0 of a TP=2 gloo job.

vLLM's worker used to join the trainer's default process group and hang at start-up; the
engine now keeps its own groups (megatron_agpo/rollout/colocated.py). This runs the real
trainer for 2 steps and checks weight-sync parity from the TP=2 trainer to the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

TOL = 1e-4  # fp32 on CPU


def _body(rank: int, world: int, run_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_agpo.train import load_config
    from megatron_agpo.trainer.loop import Trainer

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    cfg = load_config(
        [
            "rollout=colocated",
            "trainer.steps=2",
            "trainer.eval_every=0",
            "model.warmstart_steps=30",
            "data.prompts_per_step=4",
            "rollout.n=4",
            "rollout.max_new_tokens=8",
            "optimizer.lr=1e-3",  # a visible move of the policy per step
            "checkpoint.save_every=0",
            f"logging.run_dir={run_dir}",
            "logging.progress=false",
            "logging.tensorboard=false",
        ]
    )
    assert cfg.parallel.tensor_parallel == world == 2
    trainer = Trainer(cfg)  # rank 0 starts the engine here: this used to hang
    try:
        probe = [list(ex.prompt_ids) for ex in trainer.train_prompts[:4]]
        if rank == 0:
            assert dist.get_world_size() == 2  # the trainer's group is untouched
            before = trainer.engine.prompt_logprobs(probe)[0]
        trainer.run()
        if rank == 0:
            engine = trainer.engine
            assert engine.weight_version == trainer.version == 2
            after = engine.prompt_logprobs(probe)[0]
            pairs = zip(before, after, strict=True)
            moved = max(abs(a - b) for xs, ys in pairs for a, b in zip(xs, ys, strict=True))
            print(f"engine log-probs moved by up to {moved:.3g} over 2 syncs", flush=True)
            assert moved > 10 * TOL, "the engine still serves the starting weights"
            engine.close()
            assert dist.is_initialized() and dist.get_world_size() == 2
        # The trainer's groups still work after the engine is gone.
        x = torch.ones(1)
        dist.all_reduce(x)
        assert x.item() == world
    finally:
        if rank == 0:
            for service in (trainer.engine, trainer.reward, trainer.metrics):
                if service is not None:
                    service.close()


@pytest.mark.engine
@pytest.mark.dist
def test_colocated_trainer_sync_parity_tp2(tmp_path):
    """2 steps at TP=2 with vLLM in rank 0: after each sync the trainer's recomputed
    log-probs equal the engine's (logp_gap < 1e-4) and the engine serves the new version."""
    run_dir = tmp_path / "run"
    run_distributed(_body, 2, str(run_dir), timeout=600)
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "logp_gap" in r]
    print("logp_gap per step:", [(r["step"], r["logp_gap"]) for r in steps])
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["weight_version"] for r in steps] == [1, 2]
    assert all(r["updated"] == 1 for r in steps)
    # Step 1 samples the engine's start weights; step 2 samples what the TP=2 trainer synced
    # after step 1 (the rollout asks for expected_version=1, so a stale engine would refuse).
    assert max(r["logp_gap"] for r in steps) < TOL, steps
