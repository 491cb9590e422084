"""The paper's claim in miniature: does RLVR narrow the reasoning boundary, and does AGPO keep it?

    .venv/bin/python tools/agpo_study.py    # runs what is not finished yet, then the report

Each arm is a full `agpo-train` run (the CPU default world: the warm-started tiny Llama on
level-1 arithmetic, TP=2, vLLM replica) for --steps steps; the held-out prompts are evaluated
with n samples each (pass@1 ... pass@n) before the first step (the base policy) and after the
last. Arms: GRPO, AGPO (w_pos 0.1), W-REINFORCE, NSR, and AGPO with w_pos 0.25 / 0.5 / 1.0,
each over --seeds seeds. Runs already finished are not repeated. Writes docs/results/study.json,
docs/results/passk.png and the table in docs/results/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "grpo": ["algorithm=grpo"],
    "agpo": ["algorithm=agpo"],
    "w_reinforce": ["algorithm=w_reinforce"],
    "nsr": ["algorithm=nsr"],
    "agpo_wpos0.25": ["algorithm=agpo", "algorithm.pos_weight=0.25"],
    "agpo_wpos0.5": ["algorithm=agpo", "algorithm.pos_weight=0.5"],
    "agpo_wpos1.0": ["algorithm=agpo", "algorithm.pos_weight=1.0"],
}


def run_arm(out: Path, arm: str, seed: int, args) -> dict:
    run_dir = out / f"{arm}_seed{seed}"
    done = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in done.read_text().splitlines()] if done.exists() else []
    evals = [r for r in rows if "eval/pass@1" in r]
    if not (evals and evals[-1]["step"] == args.steps):
        cmd = [
            sys.executable, "-m", "megatron_agpo.train", *ARMS[arm],
            f"trainer.seed={seed}", f"trainer.steps={args.steps}",
            f"trainer.eval_every={args.steps}", f"trainer.eval_n={args.n}",
            f"logging.run_dir={run_dir}", "logging.progress=false", "checkpoint.resume=none",
        ]  # fmt: skip
        t0 = time.time()
        res = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        if res.returncode != 0:
            raise RuntimeError(f"{arm} seed {seed} failed:\n{res.stderr[-3000:]}")
        print(f"{arm} seed {seed}: {time.time() - t0:.0f} s", flush=True)
        rows = [json.loads(x) for x in done.read_text().splitlines()]
        evals = [r for r in rows if "eval/pass@1" in r]
    curve = lambda r: {int(k.split("@")[1]): v for k, v in r.items() if k.startswith("eval/pass@")}  # noqa: E731
    return {"base": curve(evals[0]), "final": curve(evals[-1])}


def summarize(results: dict) -> dict:
    """mean and std over seeds of pass@k, per arm (and the base policy, pooled over runs)."""
    out = {}
    base = [r["base"] for runs in results.values() for r in runs]
    arms = {"base": base, **{a: [r["final"] for r in runs] for a, runs in results.items()}}
    for arm, curves in arms.items():
        ks = sorted(curves[0])
        out[arm] = {"runs": len(curves)}
        out[arm] |= {
            k: (
                statistics.mean(c[k] for c in curves),
                statistics.pstdev(c[k] for c in curves) if len(curves) > 1 else 0.0,
            )
            for k in ks
        }
    return out


def report(summary: dict, args, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(k for k in next(iter(summary.values())) if k != "runs")
    head = "| arm | runs | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [head, "|---|---|" + "---|" * len(ks)]
    for arm, s in summary.items():
        cells = " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ks)
        lines.append(f"| {arm} | {s['runs']} | {cells} |")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, s in summary.items():
        ax.errorbar(
            ks,
            [s[k][0] for k in ks],
            yerr=[s[k][1] for k in ks],
            marker=".",
            capsize=2,
            label=arm,
            lw=2.5 if arm in ("base", "agpo", "grpo") else 1,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.legend(fontsize=7)
    ax.set_title(f"{args.steps} RL steps, mean ± std over seeds, n={args.n}")
    fig.tight_layout()
    fig.savefig(out / "passk.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=256, help="samples per held-out prompt")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default=str(REPO / "runs" / "study"))
    args = p.parse_args()
    out = Path(args.out)
    for a in args.arms:
        for seed in range(args.seeds):
            run_arm(out, a, seed, args)
    # The report covers every finished run in --out (earlier invocations included, e.g. a
    # w_pos sweep run with fewer seeds).
    results = {}
    for a in ARMS:
        seeds = sorted(int(d.name.rsplit("seed", 1)[1]) for d in out.glob(f"{a}_seed*"))
        runs = [run_arm(out, a, seed, args) for seed in seeds]
        if runs:
            results[a] = runs
    summary = summarize(results)
    docs = REPO / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "study.json").write_text(json.dumps(
        {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": results,
         "summary": {a: {str(k): v for k, v in s.items()} for a, s in summary.items()},
        "runs_per_arm": {a: len(r) for a, r in results.items()}},
        indent=1))  # fmt: skip
    print(report(summary, args, docs))


if __name__ == "__main__":
    main()
