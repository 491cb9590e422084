"""Trainer pieces that need no engine: batch packing, configs, checkpoint discovery."""

import json
from pathlib import Path

import pytest
import torch

from megatron_agpo.ops import IGNORE_INDEX
from megatron_agpo.train import load_config
from megatron_agpo.trainer import checkpoint as ckpt
from megatron_agpo.trainer.batch import build_token_batch_from_lists as build_token_batch
from megatron_agpo.trainer.loop import sampling_seed


def test_token_batch_alignment_by_hand():
    b = build_token_batch(
        prompts=[[1, 5, 6], [1, 7]],
        responses=[[8, 9, 2], [3]],
        rollout_logprobs=[[-0.1, -0.2, -0.3], [-0.4]],
        advantages=torch.tensor([0.5, -1.0]),
        pad_id=0,
    )
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 3, 0, 0, 0]]
    i = IGNORE_INDEX
    # position t predicts token t+1; only response tokens are targets
    assert b.target.tolist() == [[i, i, 8, 9, 2, i], [i, 3, i, i, i, i]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
    torch.testing.assert_close(
        b.rollout_logp, torch.tensor([[0, 0, -0.1, -0.2, -0.3, 0], [0, -0.4, 0, 0, 0, 0]])
    )
    assert b.advantages_per_token[1].tolist() == [-1.0] * 6
    sub = b.select([1])
    assert sub.input_ids.tolist() == [[1, 7, 3, 0, 0, 0]] and sub.old_logp is None


def test_token_batch_errors_name_the_row():
    with pytest.raises(ValueError, match="sequence 1: 2 rollout log-probs for 1 tokens"):
        build_token_batch([[1], [1]], [[2], [3]], [[-1.0], [-1.0, -2.0]], torch.zeros(2), 0)
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        build_token_batch([[1], [1]], [[2]], [[-1.0]], torch.zeros(2), 0)


def test_default_config_and_groups():
    cfg = load_config([])
    assert cfg.algorithm.name == "agpo" and cfg.parallel.tensor_parallel == 2
    assert cfg.rollout.mode == "replicas" and cfg.nproc == 2
    adv = cfg.algorithm.advantage_config()
    assert adv.neg_rule == "constant" and adv.pos_weight == 0.1
    g = load_config(["algorithm=grpo"])
    assert g.algorithm.advantage_config().std == "bessel"
    assert g.algorithm.loss.agg_mode == "seq-mean-token-mean"
    d = load_config(["algorithm=dr_grpo"])
    assert d.algorithm.loss.agg_mode == "seq-sum-constant"
    w = load_config(["algorithm.pos_weight=0.5", "algorithm.loss.eps_high=0.3"])
    assert w.algorithm.advantage_config().pos_weight == 0.5 and w.algorithm.loss.eps_high == 0.3


def test_model_preset_wins_over_rollout_group():
    # The model group comes last: its context length and engine dtype are not replaced by the
    # rollout group's (which once set a 64-token fp32 engine for every model).
    q = load_config(["model=qwen2_5_math_7b", "rollout=colocated"])
    assert q.rollout.engine.max_model_len == 4096 and q.rollout.engine.dtype == "auto"
    assert q.rollout.mode == "colocated" and q.rollout.max_new_tokens == 3072
    s = load_config(["model=smollm2_135m"])
    assert s.rollout.engine.max_model_len == 512 and s.rollout.engine.dtype == "float32"
    t = load_config([])
    assert t.rollout.engine.max_model_len == 64 and t.rollout.engine.dtype == "float32"
    assert load_config(["model=llama3_70b", "rollout=colocated"]).rollout.mode == "colocated"


@pytest.mark.parametrize(
    "override,match",
    [
        ("trainer.stepz=3", "stepz"),
        ("algorithm.name=ppo", "unknown algorithm 'ppo'"),
        ("rollout.mode=remote", "rollout.mode='remote'"),
        ("trainer.mini_batches=3", "do not split into trainer.mini_batches=3"),
        ("algorithm.loss.agg_mode=mean", "agg_mode='mean'"),
    ],
)
def test_bad_config_is_named(override, match):
    with pytest.raises(Exception, match=match):
        load_config([override])


def test_sampling_seeds_are_stable_and_distinct():
    assert sampling_seed(1, 2, 3) == sampling_seed(1, 2, 3)
    seeds = {sampling_seed(1, s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400


def _fake_ckpt(root: Path, step: int, complete: bool) -> Path:
    d = root / f"step_{step:07d}"
    d.mkdir(parents=True)
    if complete:
        (d / ckpt.COMPLETE).write_text(str(step))
    return d


def test_latest_skips_partial_and_clean_removes_temp(tmp_path):
    assert ckpt.latest(tmp_path) is None
    _fake_ckpt(tmp_path, 2, True)
    _fake_ckpt(tmp_path, 10, True)
    _fake_ckpt(tmp_path, 12, False)  # a writer killed before the marker
    (tmp_path / ".tmp-step_0000014" / "dist").mkdir(parents=True)
    assert ckpt.latest(tmp_path).name == "step_0000010"
    removed = ckpt.clean_partial(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_0000014"]
    assert not (tmp_path / ".tmp-step_0000014").exists()


def test_metrics_writer_drops_lines_past_resume_point(tmp_path):
    from megatron_agpo.trainer.metrics import MetricsWriter, read_metrics

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6))
    )
    w = MetricsWriter(tmp_path, tensorboard=False, total_steps=10, progress=False, start_step=3)
    w.log({"step": 4, "x": float("nan")})
    w.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["x"] is None
    MetricsWriter(tmp_path, tensorboard=False, total_steps=10, progress=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # a fresh start: a fresh file


def test_metrics_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_agpo.trainer.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=True, total_steps=3, progress=False)
    for s in (1, 2, 3):
        w.log({"step": s, "reward/mean": 0.25 * s, "pos/loss": float("nan")})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert "pos/loss" not in acc.Tags()["scalars"]  # non-finite values are left out
