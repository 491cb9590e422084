"""The study's boundary on the training problems (issue 27): the training sample is the
problems the trainer draws first, and the report gives pass@k on them beside the held-out
ones, from the per-problem counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic
from megatron_agpo.data.iterator import PromptIterator
from megatron_agpo.eval.passk import pass_at_k

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("agpo_study", REPO / "tools" / "agpo_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["agpo_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_training_sample_is_what_the_trainer_draws_first(study):
    levels = (6, 7, 8, 9, 10)
    task = ArithmeticConfig(levels=levels, num_train=4000, num_eval=400)
    train = generate_arithmetic(task, "train")
    # The trainer's own iterator (data.seed 0, 16 prompts per step): its first 20 batches.
    it = PromptIterator(train, batch_size=16, seed=0)
    drawn = [ex.problem for _ in range(20) for ex in it.next_batch()]
    sample = study.training_sample(300)
    assert [ex.problem for ex in sample] == drawn[:300]
    held = {ex.problem for ex in generate_arithmetic(task, "eval")}
    assert not held & {ex.problem for ex in sample}
    assert levels == study.GRADED_LEVELS


def fake_run(out: Path, arm: str, seed: int, n: int, held, train):
    d = out / f"{arm}_seed{seed}"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"n": n, "correct": held}))
    if train is not None:
        (d / "eval_train.json").write_text(json.dumps({"n": n, "correct": train}))
    (d / "study_run.json").write_text(json.dumps({"wall_s": 1.0, "cpu_s": 1.0}))


def test_report_gives_training_and_held_out_pass_at_k(study, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    held_base, train_base = [0, 1, 2, 8], [1, 2, 3, 4]
    train_grpo = [8, 8, 0, 16]  # sharper on some training problems, lost on one
    for seed in range(2):
        fake_run(out, "base", seed, 16, held_base, train_base)
        fake_run(out, "grpo", seed, 16, [0, 1, 3, 8], train_grpo)
    fake_run(out, "agpo", 0, 16, [0, 1, 2, 8], None)  # no training-sample evaluation yet
    a = study.StudyArgs(steps=3, seeds=2, held_out=4, train_sample=4, out=str(out),
                        docs=str(docs), resamples=200, tag="boundary",
                        arms=["grpo", "agpo"])  # fmt: skip
    text = study.report(a)
    rec = json.loads((docs / "boundary.json").read_text())
    assert set(rec["train_summary"]) == {"base", "grpo"}  # agpo is unfinished: left out
    for arm, counts in (("base", train_base), ("grpo", train_grpo)):
        for k in (1, 4, 16):
            expect = np.mean([pass_at_k(16, c, k) for c in counts])
            assert rec["train_summary"][arm]["pass"][str(k)][0] == pytest.approx(expect)
    d1 = np.mean([pass_at_k(16, c, 1) for c in train_grpo]) - np.mean(
        [pass_at_k(16, c, 1) for c in train_base]
    )
    assert rec["train_summary"]["grpo"]["diff_to_base"]["1"][0] == pytest.approx(d1)
    # pass@16 on the training problems: base solves all 4, GRPO loses the third.
    assert rec["train_summary"]["grpo"]["diff_to_base"]["16"][0] == pytest.approx(-0.25)
    assert rec["summary"]["base"]["pass"]["1"][0] == pytest.approx(
        np.mean([pass_at_k(16, c, 1) for c in held_base])
    )
    assert "Training problems (4" in text and "Held-out problems (4)" in text
    assert (docs / "boundary_train_vs_heldout.png").exists()
    assert (docs / "boundary_passk_1-64.png").exists()
    assert not (docs / "passk_1-64.png").exists()  # the main study's plots are not touched
    assert not study.finished(out / "agpo_seed0", 4) and study.finished(out / "agpo_seed0")
