"""The reasoning-boundary study: does RLVR narrow pass@k at large k, and does AGPO keep it?

    .venv/bin/python tools/agpo_study.py --dry-run     # the plan and its sampling budget
    .venv/bin/python tools/agpo_study.py --jobs 4      # runs what is not finished, then reports
    .venv/bin/python tools/agpo_study.py --report-only # the report of the finished runs

Each arm is a full `agpo-train` run (the warm-started tiny Llama, TP=2, a vLLM replica) on the
graded arithmetic task (megatron_agpo/data/arithmetic.py, levels 6-10, version 1: 4000
training problems) for --steps steps, over --seeds seeds, saved at the end and exported to HF
(<run>/hf). The study evaluates every policy itself, with vLLM at the rollout's sampling
settings, on the first --held-out (default 300) of the 400 pinned held-out problems, keeping
the per-problem counts: n = --n-large samples (pass@k up to 256) for the base policy, GRPO
and AGPO, --n-small (up to 64) for the other arms. The base policy (the same model for every
run) is evaluated once per seed, with that seed's sampling seeds, in <out>/base_seed<k>.
With --train-sample N, every policy is also evaluated on N training problems (eval_train.json,
the same n): the first N the trainer draws (its prompt order depends on data.seed only, so
every run of the study trains on them, in steps 1 .. N / 16), the problems RL trains on.
--run ARM SEED does one run only (no report): a driver can take a lock per run.

Confidence intervals: 95% percentile bootstrap over problems (paired across arms) and seeds
(`megatron_agpo.eval.passk.bootstrap_pass_at_k`); each arm's difference to the base comes
with its own interval. Every run's per-step metrics (the trajectories) are kept in
<out>/<arm>_seed<k>/metrics.jsonl and summarised in study_graded.json.

Resumable: each stage (train, export, evaluate) of each run is skipped when its output
exists; a killed training run is restarted from scratch. --jobs runs that many at once, each
in its own process group (a training run uses 2 ranks and a vLLM replica: size --jobs to the
machine's cores). The report records the wall and CPU time of every run (os.wait4 rusage of
each stage's process tree) and their total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
from megatron_agpo.eval.results import portable_paths  # noqa: E402

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
"""Arms evaluated with --n-large samples (pass@k up to 256), as the base policy is."""
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
    train_sample: int = 0
    """Also evaluate every policy on this many training problems (0: held-out only)."""
    tag: str = "study_graded"
    """Name of the report's files in docs (<tag>.json, <tag>_table.md; plots <tag>_*.png,
    except the default tag's historical passk_*.png names)."""


def eval_n(arm: str, a: StudyArgs) -> int:
    return a.n_large if arm in LARGE_N_ARMS else a.n_small


def run_overrides(arm: str, seed: int, a: StudyArgs, run_dir: Path) -> list[str]:
    levels = ",".join(str(lv) for lv in GRADED_LEVELS)
    return [
        *ARMS[arm],
        f"data.levels=[{levels}]", "data.num_train=4000", f"data.num_eval={a.held_out}",
        f"trainer.seed={seed}", f"trainer.steps={a.steps}", "trainer.eval_every=0",
        f"logging.run_dir={run_dir}", "logging.progress=false", "checkpoint.resume=none",
        "checkpoint.save_final=true", "checkpoint.keep_last=1",
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


def finished(run_dir: Path, train_sample: int = 0) -> bool:
    """The run's held-out evaluation is written (and its training-problem one, if asked)."""
    done = (run_dir / "eval.json").exists()
    return done and (not train_sample or (run_dir / "eval_train.json").exists())


def _stage(cmd: list[str], log: Path, timing: dict, name: str) -> int:
    """One stage in its own process group; adds its wall and CPU seconds to `timing`."""
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        # wait4: the CPU time of the stage and of every descendant it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
    timing[f"{name}_wall_s"] = time.time() - t0
    timing[f"{name}_cpu_s"] = usage.ru_utime + usage.ru_stime
    return os.waitstatus_to_exitcode(status)


def _eval_cmd(model: str, n: int, seed: int, a: StudyArgs, out: Path, train: int = 0) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--eval-model", model,
            "--eval-n", str(n), "--eval-seed", str(seed), "--held-out", str(a.held_out),
            "--eval-train", str(train), "--eval-out", str(out)]  # fmt: skip


def run_one(arm: str, seed: int, a: StudyArgs, lock: threading.Lock) -> None:
    """Train (arm) or take the base policy (arm "base"), export, evaluate; records times."""
    run_dir = Path(a.out) / f"{arm}_seed{seed}"
    if finished(run_dir, a.train_sample):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    rec_path = run_dir / "study_run.json"
    timing = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    log = run_dir / "study.log"

    def fail(stage: str, rc: int) -> None:
        raise RuntimeError(f"{arm} seed {seed}: {stage} failed (exit {rc}); see {log}")

    model = "base"
    if arm != "base":
        if not (run_dir / "trained").exists():
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "megatron_agpo.train",
                   *run_overrides(arm, seed, a, run_dir)]  # fmt: skip
            if rc := _stage(cmd, log, timing, "train"):
                fail("training", rc)
            (run_dir / "trained").touch()
        hf = run_dir / "hf"
        if not (hf / "config.json").exists():
            shutil.rmtree(hf, ignore_errors=True)
            cmd = [sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"),
                   "--ckpt", str(run_dir), "--out", str(hf)]  # fmt: skip
            if rc := _stage(cmd, log, timing, "export"):
                fail("export", rc)
        model = str(hf)
    n = a.n_large if arm == "base" else eval_n(arm, a)
    held_cmd = _eval_cmd(model, n, seed, a, run_dir / "eval.json")
    if not (run_dir / "eval.json").exists() and (rc := _stage(held_cmd, log, timing, "eval")):
        fail("evaluation", rc)
    if a.train_sample and not (run_dir / "eval_train.json").exists():
        cmd = _eval_cmd(model, n, seed, a, run_dir / "eval_train.json", a.train_sample)
        if rc := _stage(cmd, log, timing, "eval_train"):
            fail("evaluation on training problems", rc)
    timing.update(arm=arm, seed=seed)
    timing["wall_s"] = sum(v for k, v in timing.items() if k.endswith("_wall_s"))
    timing["cpu_s"] = sum(v for k, v in timing.items() if k.endswith("_cpu_s"))
    rec_path.write_text(json.dumps(timing, indent=1))
    with lock:
        print(f"{arm} seed {seed}: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU",
              flush=True)  # fmt: skip


@dataclass
class Collected:
    """Every finished run's evaluation, trajectories and times."""

    evals: dict[str, dict[int, tuple[int, list[int]]]] = field(default_factory=dict)
    """arm ("base" included) -> seed -> (n, correct samples per held-out problem)."""
    train_evals: dict[str, dict[int, tuple[int, list[int]]]] = field(default_factory=dict)
    """The same on the training sample (--train-sample), where evaluated."""
    trajectories: dict[str, dict[int, dict[str, list]]] = field(default_factory=dict)
    timing: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)


def collect(a: StudyArgs) -> Collected:
    out, col = Path(a.out), Collected()
    for arm in ("base", *ARMS):
        for run_dir in sorted(out.glob(f"{arm}_seed*")):
            if not finished(run_dir, a.train_sample):
                continue
            seed = int(run_dir.name.rsplit("seed", 1)[1])
            ev = json.loads((run_dir / "eval.json").read_text())
            if len(ev["correct"]) != a.held_out:
                raise SystemExit(
                    f"{run_dir}/eval.json has {len(ev['correct'])} problems, the study "
                    f"{a.held_out} (--held-out): use the --held-out it was run with"
                )
            col.evals.setdefault(arm, {})[seed] = (int(ev["n"]), [int(c) for c in ev["correct"]])
            if a.train_sample:
                tr = json.loads((run_dir / "eval_train.json").read_text())
                if len(tr["correct"]) != a.train_sample:
                    raise SystemExit(
                        f"{run_dir}/eval_train.json has {len(tr['correct'])} problems, the "
                        f"study {a.train_sample} (--train-sample)"
                    )
                col.train_evals.setdefault(arm, {})[seed] = (
                    int(tr["n"]), [int(c) for c in tr["correct"]]
                )  # fmt: skip
            train = [r for r in read_rows(run_dir) if "reward/mean" in r]
            if train:
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


def summarize(col: Collected, a: StudyArgs, which: str = "evals") -> dict:
    """Bootstrap means and 95% intervals per arm and k, differences to base (`which`: evals,
    the held-out problems, or train_evals, the training sample)."""
    arms = {}
    for name, by_seed in getattr(col, which).items():
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
    summary = bootstrap_pass_at_k(arms, ks, reference=ref, resamples=a.resamples, seed=0)
    # Every arm against GRPO too (the paper's comparison), with the same problem draws.
    vs = bootstrap_pass_at_k(arms, ks, reference="grpo", resamples=a.resamples, seed=0) if (
        "grpo" in arms
    ) else {}  # fmt: skip
    for arm, s in summary.items():
        s["diff_grpo"] = vs[arm]["diff"] if vs and arm not in ("grpo", "base") else {}
    return summary


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
    for key, ref in (("diff", "base"), ("diff_grpo", "GRPO")):
        diffs = [(arm, s[key]) for arm, s in summary.items() if s.get(key)]
        if not diffs:
            continue
        lines += ["", f"Difference to {ref} (95% interval; * where it excludes 0):", ""]
        lines.append("| arm | " + " | ".join(f"pass@{k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for arm, d in diffs:
            cells = [
                (fmt(d[k]) + (" *" if d[k][1] > 0 or d[k][2] < 0 else "")) if k in d else ""
                for k in ks
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_names(tag: str) -> tuple[str, str]:
    """The two k-range plots' file names (the default tag keeps its historical names)."""
    if tag == StudyArgs.tag:
        return "passk_1-64.png", "passk_16-256.png"
    return f"{tag}_passk_1-64.png", f"{tag}_passk_16-256.png"


def plot_side_by_side(held: dict, train: dict, path: Path, arms: list[str]) -> Path:
    """pass@k (k = 1 .. 256) of `arms` on the training sample and on the held-out problems,
    side by side on one y scale (top), and each arm's difference to the base (bottom), each
    with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey="row")
    panels = (
        ("training problems (the first the trainer draws)", train),
        ("held-out problems", held),
    )
    for col, (title, summary) in enumerate(panels):
        for i, arm in enumerate(a for a in arms if a in summary):
            s = summary[arm]
            lw = 2.5 if arm == "base" else 1.3
            for row, key in ((0, "pass"), (1, "diff")):
                if not s.get(key):
                    continue
                ks = sorted(s[key])
                m = [s[key][k][0] for k in ks]
                err = [[m[j] - s[key][k][1] for j, k in enumerate(ks)],
                       [s[key][k][2] - m[j] for j, k in enumerate(ks)]]  # fmt: skip
                axes[row, col].errorbar(ks, m, yerr=err, marker=".", capsize=2, color=f"C{i}",
                                        label=f"{arm} ({s['seeds']})", lw=lw)  # fmt: skip
        axes[0, col].set_title(title, fontsize=10)
        axes[1, col].axhline(0.0, color="C0", lw=1)
        for row in (0, 1):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].grid(alpha=0.3)
        axes[1, col].set_xlabel("k")
    axes[0, 0].set_ylabel("pass@k (mean, 95% bootstrap over problems x seeds)")
    axes[1, 0].set_ylabel("pass@k - base (paired, 95% bootstrap)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(summary: dict, docs: Path, tag: str = "study_graded") -> list[Path]:
    """One plot per k-range: every arm up to 64, base / GRPO / AGPO from 16 to 256."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    small, large = plot_names(tag)
    for name, lo, hi, only in (
        (small, 1, 64, None),
        (large, 16, 256, ("base", "grpo", "agpo")),
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
    train_summary = summarize(col, a, "train_evals") if a.train_sample else {}
    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    cpu = sum(t["cpu_s"] for runs in col.timing.values() for t in runs.values())
    wall = sum(t["wall_s"] for runs in col.timing.values() for t in runs.values())
    record = {
        "task": {
            "levels": list(GRADED_LEVELS),
            "version": GRADED_VERSION,
            "held_out": a.held_out,
            "train_sample": a.train_sample,
        },  # fmt: skip
        "args": asdict(a),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": {
            arm: {
                "seeds": s["seeds"],
                "pass": {str(k): v for k, v in s["pass"].items()},
                "diff_to_base": {str(k): v for k, v in s["diff"].items()},
                "diff_to_grpo": {str(k): v for k, v in s.get("diff_grpo", {}).items()},
            }
            for arm, s in summary.items()
        },
        "counts": {arm: {str(s): v for s, v in r.items()} for arm, r in col.evals.items()},
        "train_summary": {
            arm: {
                "seeds": s["seeds"],
                "pass": {str(k): v for k, v in s["pass"].items()},
                "diff_to_base": {str(k): v for k, v in s["diff"].items()},
                "diff_to_grpo": {str(k): v for k, v in s.get("diff_grpo", {}).items()},
            }
            for arm, s in train_summary.items()
        },
        "train_counts": {
            arm: {str(s): v for s, v in r.items()} for arm, r in col.train_evals.items()
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
    # Committed results name no folder of this machine: repository-relative or ~ paths.
    record = portable_paths(record)
    (docs / f"{a.tag}.json").write_text(json.dumps(record, indent=1))
    text = table(summary)
    if train_summary:
        text = (
            f"Held-out problems ({a.held_out}):\n\n{text}\n\nTraining problems ({a.train_sample}, "
            f"the first the trainer draws):\n\n{table(train_summary)}"
        )
    text += f"\n\nRuns: {sum(len(r) for r in col.evals.values())}; total CPU {cpu / 3600:.2f} h, "
    text += f"wall {wall / 3600:.2f} h (sum over runs)."
    (docs / f"{a.tag}_table.md").write_text(text + "\n")
    plots(summary, docs, a.tag)
    if train_summary:
        plot_side_by_side(
            summary, train_summary, docs / f"{a.tag}_train_vs_heldout.png", ["base", *a.arms]
        )
    return text


def plan(a: StudyArgs) -> str:
    """The runs and the sampled tokens they need (an estimate: TOKENS_PER_RESPONSE each)."""
    prompts_per_step, group = 16, 8  # the default run's data.prompts_per_step x rollout.n
    lines, total = [], 0
    for arm in ("base", *a.arms):
        n = a.n_large if arm == "base" else eval_n(arm, a)
        train = 0 if arm == "base" else a.steps * prompts_per_step * group
        per_run = (train + (a.held_out + a.train_sample) * n) * TOKENS_PER_RESPONSE
        todo = sum(
            not finished(Path(a.out) / f"{arm}_seed{s}", a.train_sample) for s in range(a.seeds)
        )
        total += per_run * todo
        lines.append(
            f"{arm}: eval n={n}, {todo}/{a.seeds} runs to do, ~{per_run / 1e6:.2f} M tokens each"
        )
    lines.append(
        f"total ~{total / 1e6:.1f} M sampled tokens: ~{total / 4600 / 3600:.1f} h of sampling "
        "at 4,600 tokens/s (training steps, exports and engine starts come on top)"
    )
    return "\n".join(lines)


def training_sample(count: int, data_seed: int = 0) -> list:
    """The first `count` graded training problems in the order the trainer draws them (the
    study's 4000, `PromptIterator`'s first epoch: the order depends on data.seed only)."""
    from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic
    from megatron_agpo.data.iterator import epoch_order

    task = ArithmeticConfig(levels=GRADED_LEVELS, seed=data_seed, num_train=4000, num_eval=1)
    train = generate_arithmetic(task, "train")
    return [train[i] for i in epoch_order(len(train), data_seed, 0)[:count]]


def sample_counts(model: str, n: int, seed: int, held_out: int, train: int = 0) -> dict:
    """Correct samples per graded held-out problem for the HF policy `model` ("base": the
    warm-started tiny policy), sampled with vLLM as the trainer samples (rollout temperature,
    top-p, response limit), one sampling seed per (seed, problem). train > 0: on that many
    training problems instead (`training_sample`)."""
    import dataclasses

    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from megatron_agpo.data.arithmetic import ArithmeticConfig, generate_arithmetic
    from megatron_agpo.data.loaders import prompt_token_ids
    from megatron_agpo.eval.driver import problem_seed
    from megatron_agpo.rewards import score_batch
    from megatron_agpo.rollout.vllm_engine import build_llm
    from megatron_agpo.trainer.compose import load_config
    from megatron_agpo.trainer.warmstart import tiny_policy_dir

    levels = ",".join(str(lv) for lv in GRADED_LEVELS)
    cfg = load_config([f"data.levels=[{levels}]", f"data.num_eval={held_out}"])
    path = str(tiny_policy_dir(cfg.model, cfg.data)) if model == "base" else model
    tok = AutoTokenizer.from_pretrained(path)
    task = ArithmeticConfig(levels=GRADED_LEVELS, num_train=1, num_eval=held_out)
    held = training_sample(train) if train else generate_arithmetic(task, "eval")
    stream = f"graded-v{GRADED_VERSION}" + ("-train" if train else "")
    llm = build_llm(dataclasses.replace(cfg.rollout.engine, model_path=path))
    r = cfg.rollout
    params = [
        SamplingParams(n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                       seed=problem_seed(seed, stream, str(ex.index)))
        for ex in held
    ]  # fmt: skip
    chat = cfg.data.prompt.use_chat_template  # tokenized as the trainer tokenizes
    prompts = [TokensPrompt(prompt_token_ids=prompt_token_ids(ex, tok, chat)) for ex in held]
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sample_s = time.time() - t0
    # Score each distinct (response, answer) once: the tiny policy repeats itself a lot.
    pairs = sorted(
        {(c.text, ex.ground_truth) for ex, o in zip(held, outs, strict=True) for c in o.outputs}
    )
    rewards = score_batch([p[0] for p in pairs], [p[1] for p in pairs])
    scores = dict(zip(pairs, rewards, strict=True))
    tau = cfg.algorithm.advantage_config().tau
    correct = [
        sum(scores[(c.text, ex.ground_truth)] > tau for c in o.outputs)
        for ex, o in zip(held, outs, strict=True)
    ]
    return {
        "task": {"levels": list(GRADED_LEVELS), "version": GRADED_VERSION,
                 "split": "train" if train else "held-out", "problems": len(held)},
        "policy": path, "n": n, "seed": seed, "correct": correct,
        "levels": [ex.metadata["level"] for ex in held], "problems": [ex.problem for ex in held],
        "tokens": sum(len(c.token_ids) for o in outs for c in o.outputs), "sample_s": sample_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def measure_base(a: StudyArgs, n: int) -> str:
    """The base policy's pass@k on the graded held-out set, overall and per level, with
    bootstrap intervals over problems; writes <docs>/base_graded.json."""
    rec = sample_counts("base", n, 0, a.held_out)
    ks = power_ks(n)
    by_level = {"all": list(range(len(rec["correct"])))}
    for lv in GRADED_LEVELS:
        by_level[f"level {lv}"] = [i for i, x in enumerate(rec["levels"]) if x == lv]
    rows = {}
    for name, idx in by_level.items():
        c = np.array([[rec["correct"][i] for i in idx]])
        boot = bootstrap_pass_at_k({name: (n, c)}, ks, resamples=a.resamples)
        rows[name] = (len(idx), boot[name])
    lines = ["| problems | count | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]  # fmt: skip
    for name, (count, s) in rows.items():
        lines.append(f"| {name} | {count} | " + " | ".join(fmt(s["pass"][k]) for k in ks) + " |")
    rate = rec["tokens"] / rec["sample_s"]
    text = "\n".join(lines) + (
        f"\n\n{len(rec['correct'])} problems x {n} samples: {rec['tokens']} tokens sampled in "
        f"{rec['sample_s']:.0f} s ({rate:.0f} tokens/s)."
    )
    rec["policy"] = Path(rec["policy"]).name
    rec["pass"] = {name: {str(k): v for k, v in s["pass"].items()} for name, (_, s) in rows.items()}
    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "base_graded.json").write_text(json.dumps(rec, indent=1))
    return text


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
    p.add_argument(
        "--train-sample",
        type=int,
        default=d.train_sample,
        help="also evaluate on this many training problems (the first drawn)",
    )
    p.add_argument("--tag", default=d.tag, help="name of the report's files in --docs")
    p.add_argument(
        "--run",
        nargs=2,
        metavar=("ARM", "SEED"),
        help="do this one run (ARM: base or an arm) and exit, no report",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and budget only")
    p.add_argument("--report-only", action="store_true", help="no runs, only the report")
    p.add_argument(
        "--measure-base",
        type=int,
        metavar="N",
        help="only sample the base policy N times per held-out problem (vLLM) and report",
    )
    # One evaluation, in its own process (run_one starts it): not for direct use.
    p.add_argument("--eval-model", help=argparse.SUPPRESS)
    p.add_argument("--eval-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eval-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eval-out", help=argparse.SUPPRESS)
    p.add_argument("--eval-train", type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if not 1 <= ns.held_out <= 400:
        p.error(f"--held-out={ns.held_out}: 1..400 (the pinned graded held-out set)")
    if ns.jobs < 1:
        p.error(f"--jobs={ns.jobs} must be >= 1")
    keys = ("steps", "seeds", "held_out", "n_small", "n_large", "arms", "jobs", "extra", "out",
            "resamples", "docs", "train_sample", "tag")  # fmt: skip
    return StudyArgs(**{k: getattr(ns, k) for k in keys}), ns


def main(argv: list[str] | None = None) -> None:
    a, ns = parse(argv)
    if ns.eval_model:
        rec = sample_counts(ns.eval_model, ns.eval_n, ns.eval_seed, a.held_out, ns.eval_train)
        tmp = Path(ns.eval_out + ".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, ns.eval_out)  # atomic: a killed evaluation leaves no eval.json
        return
    if ns.measure_base:
        print(measure_base(a, ns.measure_base))
        return
    if ns.run:
        arm, seed = ns.run[0], int(ns.run[1])
        if arm != "base" and arm not in ARMS:
            raise SystemExit(f"--run {arm}: base or one of {', '.join(ARMS)}")
        from megatron_agpo.trainer.compose import load_config
        from megatron_agpo.trainer.warmstart import tiny_policy_dir

        cfg = load_config([])
        tiny_policy_dir(cfg.model, cfg.data)
        run_one(arm, seed, a, threading.Lock())
        return
    print(plan(a), flush=True)
    if ns.dry_run:
        return
    if not ns.report_only:
        from megatron_agpo.trainer.compose import load_config
        from megatron_agpo.trainer.warmstart import tiny_policy_dir

        # The warm start once, here: parallel runs would otherwise each build it.
        cfg = load_config([])
        tiny_policy_dir(cfg.model, cfg.data)
        lock = threading.Lock()
        todo = [(arm, s) for s in range(a.seeds) for arm in ("base", *a.arms)]
        with ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(run_one, arm, s, a, lock) for arm, s in todo]:
                f.result()
    print(report(a))


if __name__ == "__main__":
    main()
