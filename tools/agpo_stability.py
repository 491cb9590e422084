"""AGPO's stability: grids of short runs on the graded task, their trajectories and a table.

    .venv/bin/python tools/agpo_stability.py --grid lr --seeds 3 --jobs 2
    .venv/bin/python tools/agpo_stability.py --run kl=algorithm=agpo,algorithm.loss.kl_coef=0.05
    .venv/bin/python tools/agpo_stability.py --grid lr --report-only
    .venv/bin/python tools/agpo_stability.py --study runs/study_graded   # the study's runs
    .venv/bin/python tools/agpo_stability.py --snr docs/results/study_graded.json

Every run is a full `agpo-train` run with the study's setting (tools/agpo_study.py: the
warm-started tiny Llama, the graded task's 4000 training problems, TP=2, a vLLM replica) plus
the run's overrides, with the trainer's own held-out evaluation (pass@k on --held-out problems
with --eval-n samples) before the first step and after the last. The table gives, per run,
held-out pass@1 and pass@16 before and after, the training pass rate early and late, and the
sign-split metrics of the last steps (negative-sample entropy, response length, gradient
norm); "collapsed" is a final held-out pass@1 below half the starting one. The trajectories
stay in <out>/<name>_seed<k>/metrics.jsonl; a rerun skips the finished runs.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from agpo_study import ARMS, _stage, read_rows  # noqa: E402

GRIDS: dict[str, dict[str, list[str]]] = {
    # The learning rate around the study's 1e-4: below it, and above it, where Adam's fixed
    # step size makes a noisy gradient (the negative-dominant presets') a random walk.
    "lr": {
        f"{arm}_lr{lr}": [*ARMS[arm], f"optimizer.lr={lr}"]
        for lr in ("3e-5", "3e-4", "1e-3")
        for arm in ("grpo", "agpo")
    },
    # Candidate remedies and a diagnostic at a learning rate where both GRPO and AGPO
    # collapse within 30 steps (3e-4): a KL anchor to the starting policy, a warmup (Adam's
    # first steps are sign-like: every parameter moves by about lr), a larger Adam epsilon
    # (it damps the normalisation that makes a noisy gradient's step as large as a clean
    # one's), and AGPO's advantages whitened over the batch: the batch mean as the baseline
    # instead of the top reward, the variance source of docs/ALGORITHM.md ("Gradient noise");
    # it also rebalances them (about -0.2 wrong, +0.9 right at a 0.18 pass rate). Last, four
    # times the prompts per step.
    "remedies": {
        f"{arm}_lr3e-4_{tag}": [*ARMS[arm], "optimizer.lr=3e-4", *extra]
        for arm, tag, extra in (
            ("agpo", "kl0.05", ["algorithm.loss.kl_coef=0.05"]),
            ("grpo", "kl0.05", ["algorithm.loss.kl_coef=0.05"]),
            ("agpo", "warmup10", ["scheduler.warmup_steps=10"]),
            ("agpo", "eps1e-4", ["optimizer.adam_eps=1e-4"]),
            ("agpo", "centred", ["algorithm.batch_norm=true"]),
            # The noise account's own prediction: 4 times the samples per step, 4 times the SNR.
            ("agpo", "batch64", ["data.prompts_per_step=64"]),
        )
    },
}  # fmt: skip
EARLY_LATE = 5
"""Steps averaged for 'early' (the first) and 'late' (the last) training metrics."""


def overrides(extra: list[str], seed: int, a: argparse.Namespace, run_dir: Path) -> list[str]:
    levels = "[6,7,8,9,10]"
    return [
        f"data.levels={levels}", "data.num_train=4000", f"data.num_eval={a.held_out}",
        f"trainer.seed={seed}", f"trainer.steps={a.steps}", f"trainer.eval_every={a.steps}",
        f"trainer.eval_n={a.eval_n}", f"logging.run_dir={run_dir}", "logging.progress=false",
        "checkpoint.resume=none", "checkpoint.save_final=false", *extra,
    ]  # fmt: skip


def run_one(name: str, extra: list[str], seed: int, a: argparse.Namespace) -> None:
    run_dir = Path(a.out) / f"{name}_seed{seed}"
    if (run_dir / "DONE").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "megatron_agpo.train", *overrides(extra, seed, a, run_dir)]
    timing: dict = {}
    rc = _stage(cmd, run_dir / "stability.log", timing, "train")
    if rc:
        print(f"{name} seed {seed}: exit {rc}, see {run_dir / 'stability.log'}", flush=True)
        return
    (run_dir / "DONE").write_text(f"{timing['train_wall_s']:.0f} s\n")
    print(f"{name} seed {seed}: {timing['train_wall_s']:.0f} s", flush=True)


def m(key: str, rows: list[dict]) -> float:
    """Mean of a metric over rows that have it (a polarity with no tokens logs null)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: list[dict]) -> dict | None:
    evals = [r for r in rows if "eval/pass@1" in r]
    train = [r for r in rows if "reward/pass_rate" in r]
    if len(evals) < 2 or not train:
        return None
    late = train[-EARLY_LATE:]
    k = max(int(key.split("@")[1]) for key in evals[-1] if key.startswith("eval/pass@"))
    return {
        "pass1": (evals[0]["eval/pass@1"], evals[-1]["eval/pass@1"]),
        "passk": (evals[0][f"eval/pass@{k}"], evals[-1][f"eval/pass@{k}"]), "k": k,
        "train": (m("reward/pass_rate", train[:EARLY_LATE]), m("reward/pass_rate", late)),
        "neg_entropy": m("neg/entropy", late), "len": m("response/len_mean", late),
        "grad_norm": m("grad_norm", late), "pos_loss": m("pos/loss", late),
        "neg_loss": m("neg/loss", late),
        "collapsed": evals[-1]["eval/pass@1"] < 0.5 * evals[0]["eval/pass@1"],
    }  # fmt: skip


def report(runs: dict[str, list[str]], a: argparse.Namespace) -> str:
    head = (
        "| run | seed | held-out pass@1, start -> end | pass@k | train pass rate, first -> "
        f"last {EARLY_LATE} steps | entropy of negatives | response length | grad norm | "
        "collapsed |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name in runs:
        for seed in range(a.seeds):
            s = summarize(read_rows(Path(a.out) / f"{name}_seed{seed}"))
            if s is None:
                lines.append(f"| {name} | {seed} | not run | | | | | | |")
                continue
            lines.append(
                f"| {name} | {seed} | {s['pass1'][0]:.3f} -> {s['pass1'][1]:.3f} | "
                f"@{s['k']}: {s['passk'][0]:.3f} -> {s['passk'][1]:.3f} | "
                f"{s['train'][0]:.3f} -> {s['train'][1]:.3f} | {s['neg_entropy']:.3f} | "
                f"{s['len']:.1f} | {s['grad_norm']:.2f} | {'yes' if s['collapsed'] else 'no'} |"
            )
    return "\n".join(lines)


def study_table(study_dir: Path) -> str:
    """The study's runs (tools/agpo_study.py) side by side: final held-out pass@1 from its
    own evaluation against each run's sign-split training metrics (first and last steps)."""
    import json

    lines = [
        "| arm | seed | held-out pass@1 | train pass rate, first -> last 5 | pos/loss | "
        "neg/loss | entropy of negatives, first -> last 5 | entropy of positives, last 5 | "
        "response length | grad norm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(study_dir.glob("*_seed*")):
        rows, ev = read_rows(run), run / "eval.json"
        if not rows or not ev.exists():
            continue
        arm, seed = run.name.rsplit("_seed", 1)
        rec = json.loads(ev.read_text())
        p1 = float(np.mean(rec["correct"])) / rec["n"]
        first, late = rows[:EARLY_LATE], rows[-EARLY_LATE:]
        lines.append(
            f"| {arm} | {seed} | {p1:.3f} | {m('reward/pass_rate', first):.3f} -> "
            f"{m('reward/pass_rate', late):.3f} | {m('pos/loss', late):+.3f} | "
            f"{m('neg/loss', late):+.3f} | {m('neg/entropy', first):.3f} -> "
            f"{m('neg/entropy', late):.3f} | {m('pos/entropy', late):.3f} | "
            f"{m('response/len_mean', late):.1f} | {m('grad_norm', late):.2f} |"
        )
    return "\n".join(lines)


STUDY_ADVANTAGES = {
    "grpo": ("grpo", {}), "dr_grpo": ("dr_grpo", {}), "agpo": ("agpo", {}),
    "agpo_wpos0.25": ("agpo", {"pos_weight": 0.25}), "agpo_wpos0.5": ("agpo", {"pos_weight": 0.5}),
    "w_reinforce": ("w_reinforce", {}), "nsr": ("nsr", {}), "psr": ("psr", {}),
}  # fmt: skip
"""The study's arms as advantage settings, for the closed noise model."""


def snr_vs_loss(study_json: Path, permutations: int = 100_000) -> str:
    """Each study arm's gradient SNR in the closed noise model (algorithms.diagnostics, at the
    base policy's pass@1) beside its pass@1 difference to the base, with their Spearman rank
    correlation and its one-sided permutation p-value."""
    import json

    from megatron_agpo.algorithms.advantages import resolve
    from megatron_agpo.algorithms.diagnostics import gradient_snr

    summary = json.loads(study_json.read_text())["summary"]
    p = summary["base"]["pass"]["1"][0]
    rows = []
    for arm, (preset, ovr) in STUDY_ADVANTAGES.items():
        if arm in summary:
            snr = gradient_snr(resolve(preset, **ovr), p)["snr"]
            rows.append((arm, snr, summary[arm]["diff_to_base"]["1"]))
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    snr_r, loss_r = rank([r[1] for r in rows]), rank([r[2][0] for r in rows])
    rho = float(np.corrcoef(snr_r, loss_r)[0, 1])
    rng = np.random.default_rng(0)
    null = np.array(
        [np.corrcoef(snr_r, rng.permutation(loss_r))[0, 1] for _ in range(permutations)]
    )
    lines = [f"| arm | SNR at p = {p:.3f} | pass@1 - base |", "|---|---|---|"]
    lines += [f"| {a} | {s:.1f} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |" for a, s, d in rows]
    lines.append(
        f"\nSpearman rank correlation {rho:.3f} over {len(rows)} arms; one-sided permutation "
        f"p = {float(np.mean(null >= rho - 1e-12)):.4f} ({permutations} permutations)."
    )
    return "\n".join(lines)


def plot(runs: dict[str, list[str]], a: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(runs):
        for seed in range(a.seeds):
            rows = [r for r in read_rows(Path(a.out) / f"{name}_seed{seed}") if "reward/mean" in r]
            if not rows:
                continue
            steps = [r["step"] for r in rows]
            label = name if seed == 0 else None
            c = colors[i % len(colors)]
            axes[0].plot(steps, [r["reward/pass_rate"] for r in rows], color=c, label=label)
            axes[1].plot(steps, [r.get("neg/entropy", np.nan) for r in rows], color=c)
    axes[0].set(xlabel="step", ylabel="training pass rate")
    axes[1].set(xlabel="step", ylabel="entropy of wrong responses")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", choices=list(GRIDS), help="a named grid of runs")
    p.add_argument("--run", action="append", default=[], metavar="NAME=OVR,OVR",
                   help="one more run: a name and its comma-separated overrides")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--held-out", type=int, default=300)
    p.add_argument("--eval-n", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "runs" / "stability"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--study", metavar="DIR", help="only the table of a study's runs (its --out)")
    p.add_argument("--snr", metavar="JSON", help="only the study's losses against the noise model")
    a = p.parse_args(argv)
    if a.study or a.snr:
        return a
    a.runs = dict(GRIDS[a.grid]) if a.grid else {}
    for spec in a.run:
        name, sep, ovr = spec.partition("=")
        if not sep or not name:
            p.error(f"--run {spec!r}: expected NAME=override,override")
        a.runs[name] = [o for o in ovr.split(",") if o]
    if not a.runs:
        p.error("nothing to run: give --grid or --run")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.study:
        print(study_table(Path(a.study)))
        return
    if a.snr:
        print(snr_vs_loss(Path(a.snr)))
        return
    if not a.report_only:
        todo = [(n, x, s) for s in range(a.seeds) for n, x in a.runs.items()]
        with ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(run_one, n, x, s, a) for n, x, s in todo]:
                f.result()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = a.grid or "runs"
    plot(a.runs, a, Path(a.out) / f"{name}.png")
    print(report(a.runs, a))


if __name__ == "__main__":
    main()
