"""The study's confidence intervals (bootstrap over problems and seeds) against closed forms,
and tools/agpo_study.py's report on a tiny fake result set."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_agpo.eval.passk import bootstrap_pass_at_k, pass_at_k, pass_at_k_grid

REPO = Path(__file__).resolve().parents[1]


def test_grid_is_pass_at_k_per_cell():
    c = np.array([[0, 3, 8], [1, 2, 5]])
    g = pass_at_k_grid(8, c, [1, 4])
    for s in range(2):
        for p in range(3):
            assert g[s, p, 1] == pass_at_k(8, int(c[s, p]), 4)
    assert g[0, 1, 0] == pytest.approx(3 / 8)


def test_constant_data_gives_a_point_interval():
    c = np.full((3, 50), 4)
    out = bootstrap_pass_at_k({"a": (8, c)}, [1, 8], resamples=200)
    mean, lo, hi = out["a"]["pass"][1]
    assert mean == lo == hi == pytest.approx(0.5)


def test_problem_resampling_matches_the_binomial_interval():
    # One seed, 400 problems each solved by all or none of its samples: pass@1 is a
    # proportion p, whose bootstrap interval is p +- 1.96 sqrt(p (1 - p) / P).
    P, p = 400, 0.3
    c = np.zeros((1, P), dtype=int)
    c[0, : int(P * p)] = 16
    mean, lo, hi = bootstrap_pass_at_k({"a": (16, c)}, [1], resamples=4000)["a"]["pass"][1]
    half = 1.96 * math.sqrt(p * (1 - p) / P)
    assert mean == pytest.approx(p)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < p < hi


def test_seed_resampling_two_seeds_spans_both():
    # Two seeds, one problem: the bootstrap distribution of the seed mean is exactly
    # {v1: 1/4, (v1 + v2) / 2: 1/2, v2: 1/4}, so its 95% interval is [v1, v2].
    c = np.array([[2], [6]])
    mean, lo, hi = bootstrap_pass_at_k({"a": (8, c)}, [1], resamples=4000)["a"]["pass"][1]
    assert (mean, lo, hi) == pytest.approx((0.5, 0.25, 0.75))


def test_differences_are_paired_over_problems():
    # Arm b solves the same problems as the base plus 20 of 400: the paired difference of
    # pass@1 is 0.05 with the narrow interval of a 20/400 proportion; unpaired it would be
    # about twice as wide.
    P = 400
    base = np.zeros((1, P), dtype=int)
    base[0, :120] = 8
    b = base.copy()
    b[0, 120:140] = 8
    out = bootstrap_pass_at_k({"base": (8, base), "b": (8, b)}, [1], reference="base")
    d, lo, hi = out["b"]["diff"][1]
    assert d == pytest.approx(0.05)
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.05 * 0.95 / P), rel=0.15)
    same = bootstrap_pass_at_k({"base": (8, base), "c": (8, base)}, [1], reference="base")
    assert same["c"]["diff"][1] == (0.0, 0.0, 0.0)


def test_arms_with_fewer_samples_report_fewer_ks():
    c = np.ones((2, 10), dtype=int)
    out = bootstrap_pass_at_k(
        {"base": (256, c), "small": (64, c)}, [1, 64, 256], reference="base", resamples=50
    )
    assert sorted(out["base"]["pass"]) == [1, 64, 256]
    assert sorted(out["small"]["pass"]) == [1, 64] == sorted(out["small"]["diff"])


def test_bad_input_is_named():
    c = np.ones((2, 10), dtype=int)
    with pytest.raises(ValueError, match="differ in problem count"):
        bootstrap_pass_at_k({"a": (8, c), "b": (8, c[:, :5])}, [1])
    with pytest.raises(ValueError, match="reference 'x' is not an arm"):
        bootstrap_pass_at_k({"a": (8, c)}, [1], reference="x")


# ---------------------------------------------------------------- the study tool


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("agpo_study", REPO / "tools" / "agpo_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["agpo_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def fake_run(out: Path, arm: str, seed: int, n: int, correct, steps: int = 3):
    d = out / f"{arm}_seed{seed}"
    d.mkdir(parents=True)
    if arm != "base":
        rows = [{"step": s, "reward/mean": 0.1 * s, "pos/loss": -0.1} for s in range(1, steps + 1)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.json").write_text(json.dumps({"n": n, "correct": correct}))
    (d / "study_run.json").write_text(json.dumps({"wall_s": 10.0, "cpu_s": 15.0}))


def test_study_report_on_fake_runs(study, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    base = [0, 1, 2, 4, 8, 16]
    for seed in range(2):
        fake_run(out, "base", seed, 32, base)
        fake_run(out, "grpo", seed, 32, [0, 2, 4, 8, 16, 16])
        fake_run(out, "agpo", seed, 32, [1, 1, 2, 4, 8, 16])
        fake_run(out, "nsr", seed, 4, [0, 1, 1, 1, 2, 4])
    # An unfinished run (trained, not evaluated) is left out of the report.
    (out / "psr_seed0").mkdir()
    (out / "psr_seed0" / "trained").touch()
    a = study.StudyArgs(steps=3, seeds=2, held_out=6, out=str(out), docs=str(docs), resamples=200)
    text = study.report(a)
    rec = json.loads((docs / "study_graded.json").read_text())
    assert set(rec["summary"]) == {"base", "grpo", "agpo", "nsr"}
    assert rec["summary"]["base"]["seeds"] == 2
    expect = np.mean([pass_at_k(32, c, 1) for c in base])
    assert rec["summary"]["base"]["pass"]["1"][0] == pytest.approx(expect)
    assert sorted(rec["summary"]["nsr"]["pass"], key=int) == ["1", "2", "4"]
    assert rec["summary"]["grpo"]["diff_to_base"]["1"][0] == pytest.approx(
        np.mean([pass_at_k(32, c, 1) for c in [0, 2, 4, 8, 16, 16]]) - expect
    )
    # Every arm against GRPO as well (the paper's comparison), only on the ks both have.
    grpo1 = np.mean([pass_at_k(32, c, 1) for c in [0, 2, 4, 8, 16, 16]])
    agpo1 = np.mean([pass_at_k(32, c, 1) for c in [1, 1, 2, 4, 8, 16]])
    assert rec["summary"]["agpo"]["diff_to_grpo"]["1"][0] == pytest.approx(agpo1 - grpo1)
    assert sorted(rec["summary"]["nsr"]["diff_to_grpo"], key=int) == ["1", "2", "4"]
    assert rec["summary"]["base"]["diff_to_grpo"] == {} == rec["summary"]["grpo"]["diff_to_grpo"]
    assert rec["timing"]["total_cpu_s"] == 8 * 15.0
    assert rec["trajectories"]["agpo"]["1"]["reward/mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert "| base | 2 |" in text and "Difference to base" in text and "Difference to GRPO" in text
    assert (docs / "passk_1-64.png").exists() and (docs / "passk_16-256.png").exists()
    assert not study.finished(out / "psr_seed0") and study.finished(out / "nsr_seed1")
    assert "psr: eval n=64, 2/2 runs to do" in study.plan(a)
    assert "nsr: eval n=64, 0/2 runs to do" in study.plan(a)


def test_study_refuses_a_different_held_out_size(study, tmp_path):
    fake_run(tmp_path / "runs", "grpo", 0, 8, [1, 2, 3])
    a = study.StudyArgs(held_out=300, out=str(tmp_path / "runs"), docs=str(tmp_path / "d"))
    with pytest.raises(SystemExit, match="has 3 problems, the study 300"):
        study.report(a)


def test_study_runs_use_the_graded_task(study):
    a = study.StudyArgs()
    o = study.run_overrides("agpo_wpos0.25", 3, a, Path("/tmp/x"))
    assert "data.levels=[6,7,8,9,10]" in o and "data.num_eval=300" in o
    assert "algorithm.pos_weight=0.25" in o and "trainer.seed=3" in o
    assert "trainer.eval_every=0" in o and "checkpoint.save_final=true" in o
    assert study.eval_n("agpo_wpos0.25", a) == 64 and study.eval_n("grpo", a) == 256
    assert set(study.ARMS) >= {"grpo", "dr_grpo", "agpo", "agpo_wpos0.25", "agpo_wpos0.5",
                                "w_reinforce", "nsr", "psr"}  # fmt: skip


# ---------------------------------------------------------------- the stability tool


@pytest.fixture(scope="module")
def stability(study):
    sys.path.insert(0, str(REPO / "tools"))  # it imports agpo_study's helpers by name
    spec = importlib.util.spec_from_file_location(
        "agpo_stability", REPO / "tools" / "agpo_stability.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stability_summary_of_a_run(stability):
    # Evaluations before and after, 7 training steps: early = the first 5, late = the last 5;
    # a polarity with no tokens logs null and is left out of its mean.
    rows = [{"step": 0, "eval/pass@1": 0.2, "eval/pass@16": 0.8}]
    for s in range(1, 8):
        rows.append({"step": s, "reward/pass_rate": s / 10, "neg/entropy": 0.1 * s,
                     "pos/loss": None if s == 7 else -1.0, "neg/loss": 1.0,
                     "response/len_mean": 11.0, "grad_norm": 0.5})  # fmt: skip
    rows.append({"step": 7, "eval/pass@1": 0.09, "eval/pass@16": 0.5})
    s = stability.summarize(rows)
    assert s["pass1"] == (0.2, 0.09) and s["passk"] == (0.8, 0.5) and s["k"] == 16
    assert s["train"] == pytest.approx((0.3, 0.5))  # mean of 1..5 and of 3..7, over 10
    assert s["neg_entropy"] == pytest.approx(0.5) and s["pos_loss"] == -1.0
    assert s["collapsed"]  # 0.09 < 0.2 / 2
    rows[-1]["eval/pass@1"] = 0.11
    assert not stability.summarize(rows)["collapsed"]
    assert stability.summarize(rows[:-1]) is None  # no second evaluation yet


def test_snr_ranks_against_losses(stability, tmp_path):
    # Losses ordered exactly as the closed model's SNR: rank correlation 1, and no random
    # permutation of 8 ranks reaches it but the identity (p = 1/8! in expectation).
    from megatron_agpo.algorithms.advantages import resolve
    from megatron_agpo.algorithms.diagnostics import NoiseModel, gradient_snr

    arms = stability.STUDY_ADVANTAGES
    snr = {a: gradient_snr(resolve(p, **o), 0.2, NoiseModel())["snr"]
           for a, (p, o) in arms.items()}  # fmt: skip
    summary = {"base": {"pass": {"1": [0.2, 0.19, 0.21]}}}
    for a in arms:
        d = -0.01 / snr[a]
        summary[a] = {"diff_to_base": {"1": [d, d - 0.01, d + 0.01]}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"summary": summary}))
    text = stability.snr_vs_loss(path, permutations=2000)
    assert "Spearman rank correlation 1.000 over 8 arms" in text
    assert "p = 0.0000" in text or "p = 0.0005" in text
    # Reversed losses: correlation -1.
    for a in arms:
        summary[a]["diff_to_base"]["1"][0] *= -1
    path.write_text(json.dumps({"summary": summary}))
    assert "Spearman rank correlation -1.000" in stability.snr_vs_loss(path, permutations=10)
