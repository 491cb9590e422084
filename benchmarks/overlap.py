"""Generation overlapping training on this machine: the same run synchronous
(trainer.max_staleness=0) and overlapped (k=1, 2), the trainer on core 0 and the vLLM replica
on core 1, over several seeds. Reports per k: wall seconds per step (steps 2.. : the first
step has nothing in flight yet), trainer idle (waiting for samples) and sync wait, replica
idle, tokens/s end to end, the training reward per step and against wall time.

    .venv/bin/python benchmarks/overlap.py --steps 20 --seeds 0 1 2 --ks 0 1 2

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


def run(k: int, seed: int, steps: int, out_dir: Path, extra: list[str]) -> list[dict]:
    run_dir = out_dir / f"k{k}_seed{seed}"
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
    log_path = out_dir / f"k{k}_seed{seed}.log"
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
        raise SystemExit(f"k={k} seed={seed} failed:\n{log_path.read_text()[-3000:]}")
    if not moved:
        raise SystemExit(f"k={k} seed={seed}: no replica process seen to pin to core 1")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "time/step_wall" in r]


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


def summary(runs: dict, ks: list[int], seeds: list[int]) -> dict:
    """Per k over seeds: the steady-state times, the speed-up over k = 0 (per seed, then the
    spread), the reward early / late, and per step the mean reward and cumulative wall."""
    out = {}
    for k in ks:
        per = [runs[f"k{k}_seed{s}"] for s in seeds]
        row = {key: _spread([p[key] for p in per])
               for key in ("wall_per_step", "wall_per_step_median", "trainer_idle",
                           "trainer_idle_median", "sync_wait", "replica_idle",
                           "tokens_per_s_e2e", "staleness_mean")}  # fmt: skip
        if 0 in ks:
            for key in ("wall_per_step", "wall_per_step_median"):
                base = [runs[f"k0_seed{s}"][key] for s in seeds]
                name = "speedup_vs_k0" + key.removeprefix("wall_per_step")
                row[name] = _spread([b / p[key] for b, p in zip(base, per, strict=True)])
        steps = len(per[0]["reward"])
        row["reward_first5"] = _spread([statistics.fmean(p["reward"][:5]) for p in per])
        row["reward_last5"] = _spread([statistics.fmean(p["reward"][-5:]) for p in per])
        row["reward_by_step"] = [statistics.fmean(p["reward"][i] for p in per)
                                 for i in range(steps)]  # fmt: skip
        row["cum_wall_by_step"] = [statistics.fmean(p["cum_wall"][i] for p in per)
                                   for i in range(steps)]  # fmt: skip
        out[f"k{k}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/agpo_overlap_bench"))
    ap.add_argument("extra", nargs="*", help="more agpo-train overrides")
    args = ap.parse_args()
    # The command as it reproduces the numbers (--out only says where the runs' folders go).
    seeds, ks = " ".join(map(str, args.seeds)), " ".join(map(str, args.ks))
    command = f"benchmarks/overlap.py --steps {args.steps} --seeds {seeds} --ks {ks}"
    command = " ".join([command, *args.extra])
    results: dict = {"command": command,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "runs": {}}  # fmt: skip
    for seed in args.seeds:
        for k in args.ks:
            s = summarise(run(k, seed, args.steps, args.out, args.extra))
            results["runs"][f"k{k}_seed{seed}"] = s
            print(f"k={k} seed={seed}: {s['wall_per_step']:.3f} s/step, trainer idle "
                  f"{s['trainer_idle']:.3f} s, sync wait {s['sync_wait']:.3f} s, replica idle "
                  f"{s['replica_idle']:.3f} s, {s['tokens_per_s_e2e']:.0f} tok/s, reward "
                  f"{statistics.fmean(s['reward'][:5]):.3f} -> "
                  f"{statistics.fmean(s['reward'][-5:]):.3f}", flush=True)  # fmt: skip
    results["summary"] = summary(results["runs"], args.ks, args.seeds)
    for k in args.ks:
        row = results["summary"][f"k{k}"]
        w = row["wall_per_step"]
        line = f"k={k}: {w['mean']:.3f} s/step [{w['min']:.3f}, {w['max']:.3f}]"
        if "speedup_vs_k0" in row:
            r, m = row["speedup_vs_k0"], row["speedup_vs_k0_median"]
            line += (f", k=0 / k={k} {r['mean']:.2f}x [{r['min']:.2f}, {r['max']:.2f}] "
                     f"(medians {m['mean']:.2f}x)")  # fmt: skip
        print(line)
    out = REPO / "benchmarks" / "results" / "overlap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
