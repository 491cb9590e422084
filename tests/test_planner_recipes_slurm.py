"""The Qwen3 recipes' SLURM scripts (slurm/agpo_qwen3_8b_16k.sh, slurm/agpo_qwen3_30b_a3b.sh):
their dry-run layout, and the planner's check each runs before launching (a layout that does
not fit is refused)."""

from __future__ import annotations

import pytest

from tests.test_slurm import _dry_run, _opt, _overrides, _srun_lines


@pytest.mark.e2e
@pytest.mark.parametrize(
    "script,model,key,value,replicas,rollout_tp",
    [
        ("agpo_qwen3_8b_16k.sh", "qwen3_8b_16k", "parallel.context_parallel", "2", 8, 2),
        ("agpo_qwen3_30b_a3b.sh", "qwen3_30b_a3b", "parallel.expert_parallel", "8", 4, 4),
    ],
)
def test_qwen3_recipe_dry_run_and_plan_check(script, model, key, value, replicas, rollout_tp):
    res = _dry_run(script, AGPO_PLAN_CHECK="1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "agpo-plan: FITS" in res.stdout
    train, *reps = _srun_lines(res.stdout)
    # 4 nodes: the first 2 train (16 ranks), the last 2 run the replicas.
    assert _opt(train, "nodes") == "2" and _opt(train, "ntasks") == "16"
    ov = _overrides(train)
    assert ov["model"] == model and ov[key] == value
    assert ov["rollout.engine.launch"] == "external"
    assert ov["rollout.engine.num_replicas"] == str(replicas)
    assert ov["rollout.engine.tensor_parallel_size"] == str(rollout_tp)
    assert len(reps) == replicas
    assert {_opt(r, "nodelist") for r in reps} == {"node3", "node4"}


@pytest.mark.e2e
def test_qwen3_30b_a3b_plan_check_refuses_a_layout_that_does_not_fit():
    # TP2: 88 GiB per GPU during training (the preset's comment), over the H100's 79.6.
    res = _dry_run("agpo_qwen3_30b_a3b.sh", AGPO_TP="2", AGPO_PLAN_CHECK="1")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "agpo-plan: DOES NOT FIT" in res.stdout
