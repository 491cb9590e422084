"""Generation overlapping training on this machine: the same run synchronous
(trainer.max_staleness=0) and overlapped (k=1, 2), the trainer on core 0 and the vLLM replica
on core 1, over several seeds. Reports per k: wall seconds per step (steps 2.. : the first
step has nothing in flight yet), trainer idle (waiting for samples) and sync wait, replica
idle, tokens/s end to end, the training reward per step and against wall time.

    .venv/bin/python benchmarks/overlap.py --steps 20 --seeds 0 1 2 --ks 0 1 2
    .venv/bin/python benchmarks/overlap.py --steps 20 --seeds 0 1 2 --ks 0 1 --sync-ab

With --sync-ab every k >= 1 also runs with the weight sync blocking the step
(trainer.background_sync=false, as `k<k>_blocking`) beside the default (the sync in the
background), and the results go to benchmarks/results/overlap_sync.json. With --partial-ab
every k >= 1 also runs with rollout.partial=resume (`k<k>_resume`: a weight update interrupts
the responses in flight; its sync blocks the step) beside the default (finish), results in
benchmarks/results/overlap_partial.json.

One trainer process (TP=1) so that trainer and replica each have one core: the trainer is
started under `taskset -c 0`; the replica is spawned by it and moved to core 1 (all its
threads) as soon as it appears, and vLLM's CPU worker is told to bind its thread to core 1
(VLLM_CPU_OMP_THREADS_BIND). Writes benchmarks/results/overlap.json.
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


def _replica_pids(root: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    kids: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines()[1:]:
        pid, ppid, *args = line.split(None, 2)
        kids.setdefault(int(ppid), []).append((int(pid), args[0] if args else ""))
    found, todo = [], [root]
    while todo:
        for pid, cmd in kids.get(todo.pop(), []):
            todo.append(pid)
            if "replica_worker" in cmd:
                found.append(pid)
    return found


AB = {
    # flag: (variant suffix, its overrides, what its step over the default's is, the summary
    # row and key that keep that ratio, the results file)
    "sync_ab": ("blocking", ["trainer.background_sync=false"], "blocking / background sync",
                "k{k}", "speedup_vs_blocking_median", "overlap_sync.json"),
    "partial_ab": ("resume", ["rollout.partial=resume"], "resume / finish",
                   "k{k}_resume", "step_over_finish_median", "overlap_partial.json"),
}  # fmt: skip
"""The A/B runs beside each overlapped k: --sync-ab (the sync blocking the step against the
default, in the background) and --partial-ab (rollout.partial=resume against finish)."""


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "time/step_wall" in r]


def run(
    name: str, k: int, seed: int, steps: int, out_dir: Path, extra: list[str], reuse: bool = False
) -> list[dict]:
    run_dir = out_dir / f"{name}_seed{seed}"
    if reuse:  # the run this command made before (its metrics), not a new one
        rows = _rows(run_dir)
        if len(rows) != steps:
            raise SystemExit(f"{run_dir}: {len(rows)} steps logged, not {steps}: run it again")
        return rows
    cmd = [
        "taskset", "-c", "0", sys.executable, "-m", "megatron_agpo.train", "nproc=1",
        "parallel.tensor_parallel=1", f"trainer.steps={steps}", f"trainer.seed={seed}",
        f"trainer.max_staleness={k}", "trainer.eval_every=0", "logging.progress=false",
        "logging.existing=overwrite", "checkpoint.save_final=false",
        f"logging.run_dir={run_dir}", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="1")
    # The run's output goes to a file: a pipe nobody reads while the run lasts would fill
    # and stall the trainer.
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}_seed{seed}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    moved: set[int] = set()
    while proc.poll() is None:
        for pid in _replica_pids(proc.pid):
            if pid not in moved:
                subprocess.run(["taskset", "-a", "-p", "-c", "1", str(pid)],
                               capture_output=True)  # fmt: skip
                moved.add(pid)
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed={seed} failed:\n{log_path.read_text()[-3000:]}")
    if not moved:
        raise SystemExit(f"{name} seed={seed}: no replica process seen to pin to core 1")
    return _rows(run_dir)


def summarise(rows: list[dict]) -> dict:
    steady = rows[1:]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in steady)  # noqa: E731
    wall = [r["time/step_wall"] for r in rows]
    return {
        "wall_per_step": mean("time/step_wall"),
        # A shared machine: a step slowed by someone else's process moves the mean, not this.
        "wall_per_step_median": statistics.median(r["time/step_wall"] for r in steady),
        "trainer_idle_median": statistics.median(r.get("time/trainer_idle", 0.0) for r in steady),
        "trainer_idle": mean("time/trainer_idle"),
        "sync_wait": mean("time/sync_wait"),
        # Background sync: its seconds in its thread, and the trainer's wait at the joins.
        "sync_background": mean("time/sync_background"),
        "sync_exposed": mean("time/sync_exposed"),
        "sync_stage": mean("time/sync"),
        "replica_idle": mean("time/replica_idle"),
        "tokens_per_s_e2e": mean("tokens_per_s_e2e"),
        "reward": [r["reward/mean"] for r in rows],
        "cum_wall": [sum(wall[: i + 1]) for i in range(len(wall))],
        "staleness_mean": mean("staleness/mean") if "staleness/mean" in rows[-1] else 0.0,
    }


def _spread(values: list[float]) -> dict:
    """Mean and range over seeds (with 3 seeds the range says more than a t-interval)."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "per_seed": values}  # fmt: skip


def summary(runs: dict, names: list[str], seeds: list[int]) -> dict:
    """Per variant over seeds: the steady-state times, the speed-up over k = 0 (per seed, then
    the spread), the reward early / late, and per step the mean reward and cumulative wall."""
    out = {}
    for name in names:
        per = [runs[f"{name}_seed{s}"] for s in seeds]
        row = {key: _spread([p[key] for p in per])
               for key in ("wall_per_step", "wall_per_step_median", "trainer_idle",
                           "trainer_idle_median", "sync_wait", "sync_background",
                           "sync_exposed", "sync_stage", "replica_idle", "tokens_per_s_e2e",
                           "staleness_mean")}  # fmt: skip
        if "k0" in names:
            for key in ("wall_per_step", "wall_per_step_median"):
                base = [runs[f"k0_seed{s}"][key] for s in seeds]
                ratio = "speedup_vs_k0" + key.removeprefix("wall_per_step")
                row[ratio] = _spread([b / p[key] for b, p in zip(base, per, strict=True)])
        steps = len(per[0]["reward"])
        row["reward_first5"] = _spread([statistics.fmean(p["reward"][:5]) for p in per])
        row["reward_last5"] = _spread([statistics.fmean(p["reward"][-5:]) for p in per])
        row["reward_by_step"] = [statistics.fmean(p["reward"][i] for p in per)
                                 for i in range(steps)]  # fmt: skip
        row["cum_wall_by_step"] = [statistics.fmean(p["cum_wall"][i] for p in per)
                                   for i in range(steps)]  # fmt: skip
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/agpo_overlap_bench"))
    ap.add_argument(
        "--sync-ab",
        action="store_true",
        help="every k >= 1 also with trainer.background_sync=false",
    )
    ap.add_argument(
        "--partial-ab",
        action="store_true",
        help="every k >= 1 also with rollout.partial=resume",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="summarise the runs already in --out (the same arguments) again",
    )
    ap.add_argument("extra", nargs="*", help="more agpo-train overrides")
    args = ap.parse_args()
    # The command as it reproduces the numbers (--out only says where the runs' folders go).
    seeds, ks = " ".join(map(str, args.seeds)), " ".join(map(str, args.ks))
    command = f"benchmarks/overlap.py --steps {args.steps} --seeds {seeds} --ks {ks}"
    abs_ = [flag for flag in AB if getattr(args, flag)]
    command += "".join(f" --{flag.replace('_', '-')}" for flag in abs_)
    command = " ".join([command, *args.extra])
    results: dict = {"command": command,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "runs": {}}  # fmt: skip
    variants = [(f"k{k}", k, []) for k in args.ks]
    for flag in abs_:
        suffix, more = AB[flag][:2]
        variants += [(f"k{k}_{suffix}", k, more) for k in args.ks if k >= 1]
    names = [v[0] for v in variants]
    for seed in args.seeds:
        for name, k, more in variants:
            rows = run(name, k, seed, args.steps, args.out, [*args.extra, *more], args.reuse)
            s = summarise(rows)
            results["runs"][f"{name}_seed{seed}"] = s
            print(f"{name} seed={seed}: {s['wall_per_step']:.3f} s/step, trainer idle "
                  f"{s['trainer_idle']:.3f} s, sync wait {s['sync_wait']:.3f} s (exposed "
                  f"{s['sync_exposed']:.3f} s), replica idle "
                  f"{s['replica_idle']:.3f} s, {s['tokens_per_s_e2e']:.0f} tok/s, reward "
                  f"{statistics.fmean(s['reward'][:5]):.3f} -> "
                  f"{statistics.fmean(s['reward'][-5:]):.3f}", flush=True)  # fmt: skip
    results["summary"] = summary(results["runs"], names, args.seeds)
    for name in names:
        row = results["summary"][name]
        w = row["wall_per_step"]
        line = f"{name}: {w['mean']:.3f} s/step [{w['min']:.3f}, {w['max']:.3f}]"
        if "speedup_vs_k0" in row:
            r, m = row["speedup_vs_k0"], row["speedup_vs_k0_median"]
            line += (f", k0 / {name} {r['mean']:.2f}x [{r['min']:.2f}, {r['max']:.2f}] "
                     f"(medians {m['mean']:.2f}x)")  # fmt: skip
        print(line)
    name = "overlap.json"
    for flag in abs_:  # per seed: the variant's step over the default's (medians)
        suffix, _, what, row, key, name = AB[flag]
        for k in (k for k in args.ks if k >= 1):
            med = lambda name: results["runs"][name]["wall_per_step_median"]  # noqa: E731
            ratio = [med(f"k{k}_{suffix}_seed{s}") / med(f"k{k}_seed{s}") for s in args.seeds]
            results["summary"][row.format(k=k)][key] = _spread(ratio)
            print(f"k={k}: {what} (step medians) {statistics.fmean(ratio):.3f}x "
                  f"[{min(ratio):.3f}, {max(ratio):.3f}]")  # fmt: skip
    out = REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
