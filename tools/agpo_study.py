"""The reasoning-boundary study: does RLVR narrow pass@k at large k, and does AGPO keep it?

    .venv/bin/python tools/agpo_study.py --dry-run     # the plan and its sampling budget
    .venv/bin/python tools/agpo_study.py --jobs 4      # runs what is not finished, then reports
    .venv/bin/python tools/agpo_study.py --report-only # the report of the finished runs

Each arm is a full `agpo-train` run (the warm-started tiny Llama, TP=2, a vLLM replica) on the
graded arithmetic task (megatron_agpo/data/arithmetic.py, levels 6-10, version 1: 4000
training problems; held out, the first --held-out, default 300, of its 400 pinned problems)
for --steps steps, over --seeds seeds.
The held-out set is evaluated with n samples per problem before the first step and after the
last: n = --n-large (pass@k up to 256) for base, GRPO and AGPO, --n-small (up to 64) for the
other arms. The base policy is the step-0 evaluation of the --n-large runs (one per seed; runs
with the same seed share it, so it is counted once per seed).

Confidence intervals: 95% percentile bootstrap over problems (paired across arms) and seeds
(`megatron_agpo.eval.passk.bootstrap_pass_at_k`); each arm's difference to the base comes
with its own interval. Every run's per-step metrics (the trajectories) are kept in
<out>/<arm>_seed<k>/metrics.jsonl and summarised in study.json.

Resumable: a run whose last evaluation is at --steps is not repeated; a killed run is
restarted from scratch (checkpoint.resume=none). --jobs runs that many arms at once, each in
its own process group (each run uses 2 trainer ranks and a vLLM replica: size --jobs to the
machine's cores). The report records the wall and CPU time of every run (os.wait4 rusage of
the run's process tree) and their total.

Needs per-problem evaluation counts in metrics.jsonl (`eval/correct`: correct samples per
held-out problem, in order, and `eval/n`), logged by the trainer's evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_agpo.data.arithmetic import GRADED_LEVELS, GRADED_VERSION  # noqa: E402
from megatron_agpo.eval.passk import bootstrap_pass_at_k  # noqa: E402

ARMS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "dr_grpo": ["algorithm=dr_grpo"],
    "agpo": ["algorithm=agpo"],
    "agpo_wpos0.25": ["algorithm=agpo", "algorithm.pos_weight=0.25"],
    "agpo_wpos0.5": ["algorithm=agpo", "algorithm.pos_weight=0.5"],
    "w_reinforce": ["algorithm=w_reinforce"],
    "nsr": ["algorithm=nsr"],
    "psr": ["algorithm=psr"],
}
LARGE_N_ARMS = ("grpo", "agpo")
"""Arms evaluated with --n-large samples (pass@k up to 256); their step-0 evaluations are
the base policy's."""
TRAJECTORY_KEYS = (
    "reward/mean", "reward/pass_rate", "response/len_mean", "response/truncated",
    "pos/loss", "neg/loss", "pos/entropy", "neg/entropy", "all/entropy",
    "pos/clip_frac", "neg/clip_frac", "neg/dual_clip_frac", "all/kl", "grad_norm",
    "groups/zero_advantage",
)  # fmt: skip
"""Per-step metrics kept in study.json for the stability analysis."""
TOKENS_PER_RESPONSE = 10
"""Budget estimate: tokens of a graded-task response ("\\boxed{125}" and EOS)."""


@dataclass
class StudyArgs:
    """What the study runs: one record, saved with the results."""

    steps: int = 30
    seeds: int = 5
    held_out: int = 300
    n_small: int = 64
    n_large: int = 256
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    jobs: int = 1
    extra: list[str] = field(default_factory=list)
    """Overrides added to every run (e.g. optimizer.lr=5e-5 for a stability sweep)."""
    out: str = str(REPO / "runs" / "study_graded")
    resamples: int = 2000
    docs: str = str(REPO / "docs" / "results")


def eval_n(arm: str, a: StudyArgs) -> int:
    return a.n_large if arm in LARGE_N_ARMS else a.n_small


def run_overrides(arm: str, seed: int, a: StudyArgs, run_dir: Path) -> list[str]:
    levels = ",".join(str(lv) for lv in GRADED_LEVELS)
    return [
        *ARMS[arm],
        f"data.levels=[{levels}]", "data.num_train=4000", f"data.num_eval={a.held_out}",
        f"trainer.seed={seed}", f"trainer.steps={a.steps}", f"trainer.eval_every={a.steps}",
        f"trainer.eval_n={eval_n(arm, a)}", f"logging.run_dir={run_dir}",
        "logging.progress=false", "checkpoint.resume=none", "checkpoint.save_final=false",
        *a.extra,
    ]  # fmt: skip


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed run
            break
    return rows


def eval_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/pass@1" in r]


def finished(run_dir: Path, steps: int) -> bool:
    ev = eval_rows(read_rows(run_dir))
    return bool(ev) and ev[-1]["step"] == steps


def run_one(arm: str, seed: int, a: StudyArgs, lock: threading.Lock) -> None:
    """One training run in its own process group; records wall and CPU seconds."""
    run_dir = Path(a.out) / f"{arm}_seed{seed}"
    if finished(run_dir, a.steps):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "megatron_agpo.train", *run_overrides(arm, seed, a, run_dir)]
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        # wait4: the CPU time of the run and every descendant it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    cpu = usage.ru_utime + usage.ru_stime
    record = {"arm": arm, "seed": seed, "wall_s": wall, "cpu_s": cpu, "cmd": cmd[2:]}
    (run_dir / "study_run.json").write_text(json.dumps(record, indent=1))
    with lock:
        print(f"{arm} seed {seed}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    if proc.returncode != 0 or not finished(run_dir, a.steps):
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{arm} seed {seed} failed (exit {proc.returncode}):\n{tail}")


def counts_of(row: dict, where: str) -> tuple[int, list[int]]:
    if "eval/correct" not in row or "eval/n" not in row:
        raise SystemExit(
            f"{where}: the evaluation row of step {row.get('step')} has no per-problem counts "
            "(eval/correct, eval/n); the bootstrap over problems needs the trainer to log them"
        )
    return int(row["eval/n"]), [int(c) for c in row["eval/correct"]]


@dataclass
class Collected:
    """Every finished run's evaluations and trajectories."""

    final: dict[str, dict[int, tuple[int, list[int]]]] = field(default_factory=dict)
    """arm -> seed -> (n, correct per problem) after the last step."""
    base: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    """seed -> the base policy's (n, correct), from the step-0 evaluation of a large-n run."""
    trajectories: dict[str, dict[int, dict[str, list]]] = field(default_factory=dict)
    timing: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)


def collect(a: StudyArgs) -> Collected:
    out, col = Path(a.out), Collected()
    for arm in ARMS:
        for run_dir in sorted(out.glob(f"{arm}_seed*")):
            seed = int(run_dir.name.rsplit("seed", 1)[1])
            rows = read_rows(run_dir)
            ev = eval_rows(rows)
            if not (ev and ev[-1]["step"] == a.steps):
                continue
            col.final.setdefault(arm, {})[seed] = counts_of(ev[-1], str(run_dir))
            if arm in LARGE_N_ARMS and ev[0]["step"] == 0 and seed not in col.base:
                col.base[seed] = counts_of(ev[0], str(run_dir))
            train = [r for r in rows if "reward/mean" in r]
            col.trajectories.setdefault(arm, {})[seed] = {
                "step": [r["step"] for r in train],
                **{k: [r.get(k) for r in train] for k in TRAJECTORY_KEYS},
            }
            rec = run_dir / "study_run.json"
            if rec.exists():
                t = json.loads(rec.read_text())
                col.timing.setdefault(arm, {})[seed] = {"wall_s": t["wall_s"], "cpu_s": t["cpu_s"]}
    return col


def power_ks(n: int) -> list[int]:
    return [1 << e for e in range(n.bit_length())]


def summarize(col: Collected, a: StudyArgs) -> dict:
    """Bootstrap means and 95% intervals per arm and k, differences to base."""
    groups = {"base": col.base, **col.final}
    arms = {}
    for name, by_seed in groups.items():
        if not by_seed:
            continue
        ns = {n for n, _ in by_seed.values()}
        if len(ns) != 1:
            raise SystemExit(f"{name}: runs evaluated with different n {sorted(ns)}")
        arms[name] = (ns.pop(), np.array([c for _, c in by_seed.values()]))
    if not arms:
        raise SystemExit(f"no finished run in {a.out}")
    ks = power_ks(max(n for n, _ in arms.values()))
    ref = "base" if "base" in arms else None
    return bootstrap_pass_at_k(arms, ks, reference=ref, resamples=a.resamples, seed=0)


def fmt(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def table(summary: dict) -> str:
    ks = sorted({k for s in summary.values() for k in s["pass"]})
    lines = [
        "| arm | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for arm, s in summary.items():
        cells = [fmt(s["pass"][k]) if k in s["pass"] else "" for k in ks]
        lines.append(f"| {arm} | {s['seeds']} | " + " | ".join(cells) + " |")
    diffs = [(arm, s) for arm, s in summary.items() if s["diff"]]
    if diffs:
        lines += ["", "Difference to base (95% interval; excludes 0: supported):", ""]
        lines.append("| arm | " + " | ".join(f"pass@{k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for arm, s in diffs:
            cells = [
                (fmt(s["diff"][k]) + (" *" if s["diff"][k][1] > 0 or s["diff"][k][2] < 0 else ""))
                if k in s["diff"]
                else ""
                for k in ks
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(summary: dict, docs: Path) -> list[Path]:
    """One plot per k-range: every arm up to 64, base / GRPO / AGPO from 16 to 256."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, lo, hi, only in (
        ("passk_1-64.png", 1, 64, None),
        ("passk_16-256.png", 16, 256, ("base", "grpo", "agpo")),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = 0
        for arm, s in summary.items():
            ks = [k for k in sorted(s["pass"]) if lo <= k <= hi]
            if (only and arm not in only) or len(ks) < 2:
                continue
            m = [s["pass"][k][0] for k in ks]
            err = [[m[i] - s["pass"][k][1] for i, k in enumerate(ks)],
                   [s["pass"][k][2] - m[i] for i, k in enumerate(ks)]]  # fmt: skip
            ax.errorbar(ks, m, yerr=err, marker=".", capsize=2, label=f"{arm} ({s['seeds']})",
                        lw=2.5 if arm in ("base", "grpo", "agpo") else 1)  # fmt: skip
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (held-out)")
        ax.legend(fontsize=7)
        ax.set_title(f"pass@{lo}-{hi}: mean and 95% bootstrap interval (problems x seeds)")
        fig.tight_layout()
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)
        made.append(docs / name)
    return made


def report(a: StudyArgs) -> str:
    col = collect(a)
    summary = summarize(col, a)
    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    cpu = sum(t["cpu_s"] for runs in col.timing.values() for t in runs.values())
    wall = sum(t["wall_s"] for runs in col.timing.values() for t in runs.values())
    record = {
        "task": {"levels": list(GRADED_LEVELS), "version": GRADED_VERSION, "held_out": a.held_out},
        "args": asdict(a),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": {
            arm: {
                "seeds": s["seeds"],
                "pass": {str(k): v for k, v in s["pass"].items()},
                "diff_to_base": {str(k): v for k, v in s["diff"].items()},
            }
            for arm, s in summary.items()
        },
        "counts": {
            "base": {str(s): v for s, v in col.base.items()},
            **{arm: {str(s): v for s, v in runs.items()} for arm, runs in col.final.items()},
        },
        "trajectories": {
            arm: {str(s): t for s, t in runs.items()} for arm, runs in col.trajectories.items()
        },
        "timing": {
            "runs": {arm: {str(s): t for s, t in r.items()} for arm, r in col.timing.items()},
            "total_cpu_s": cpu,
            "total_wall_s": wall,
        },
    }
    (docs / "study_graded.json").write_text(json.dumps(record, indent=1))
    text = table(summary)
    text += f"\n\nRuns: {sum(len(r) for r in col.final.values())}; total CPU {cpu / 3600:.2f} h, "
    text += f"wall {wall / 3600:.2f} h (sum over runs)."
    (docs / "study_graded_table.md").write_text(text + "\n")
    plots(summary, docs)
    return text


def plan(a: StudyArgs) -> str:
    """The runs and the sampled tokens they need (an estimate: TOKENS_PER_RESPONSE each)."""
    prompts_per_step, group = 16, 8  # the default run's data.prompts_per_step x rollout.n
    lines, total = [], 0
    for arm in a.arms:
        n = eval_n(arm, a)
        per_run = (a.steps * prompts_per_step * group + 2 * a.held_out * n) * TOKENS_PER_RESPONSE
        todo = sum(not finished(Path(a.out) / f"{arm}_seed{s}", a.steps) for s in range(a.seeds))
        total += per_run * todo
        lines.append(
            f"{arm}: eval n={n}, {todo}/{a.seeds} runs to do, ~{per_run / 1e6:.2f} M tokens each"
        )
    lines.append(
        f"total ~{total / 1e6:.1f} M sampled tokens: ~{total / 4600 / 3600:.1f} h of sampling "
        "at 4,600 tokens/s (training steps come on top)"
    )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[StudyArgs, argparse.Namespace]:
    d = StudyArgs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--held-out", type=int, default=d.held_out, help="held-out problems (<= 400)")
    p.add_argument("--n-small", type=int, default=d.n_small)
    p.add_argument("--n-large", type=int, default=d.n_large)
    p.add_argument("--arms", nargs="+", default=d.arms, choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=d.jobs, help="runs at once")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    p.add_argument("--out", default=d.out)
    p.add_argument("--resamples", type=int, default=d.resamples)
    p.add_argument("--docs", default=d.docs, help="where the report goes")
    p.add_argument("--dry-run", action="store_true", help="print the plan and budget only")
    p.add_argument("--report-only", action="store_true", help="no runs, only the report")
    ns = p.parse_args(argv)
    if not 1 <= ns.held_out <= 400:
        p.error(f"--held-out={ns.held_out}: 1..400 (the pinned graded held-out set)")
    if ns.jobs < 1:
        p.error(f"--jobs={ns.jobs} must be >= 1")
    keys = ("steps", "seeds", "held_out", "n_small", "n_large", "arms", "jobs", "extra", "out",
            "resamples", "docs")  # fmt: skip
    return StudyArgs(**{k: getattr(ns, k) for k in keys}), ns


def main(argv: list[str] | None = None) -> None:
    a, ns = parse(argv)
    print(plan(a), flush=True)
    if ns.dry_run:
        return
    if not ns.report_only:
        lock = threading.Lock()
        todo = [(arm, s) for s in range(a.seeds) for arm in a.arms]
        with ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(run_one, arm, s, a, lock) for arm, s in todo]:
                f.result()
    print(report(a))


if __name__ == "__main__":
    main()
