"""The search-relevance experiment, end to end: data, warm start, RL annotators (GRPO and
AGPO, several seeds), annotation of an unlabelled pool, students, report.

    python examples/search_relevance/experiment.py --out runs/search_relevance [--smoke]

Stages (each skipped when its output exists, so a killed run resumes):

1. data: the seeded synthetic catalogue as JSONL (make_data.py);
2. warm start: the tiny character-level Llama, supervised on the small labelled warm-start
   split (the same `tiny_policy_dir` the trainer calls; cached);
3. RL: `agpo-train data=relevance reward=relevance algorithm=<grpo|agpo>` from the warm
   start, on the labelled train split, one run per seed, same steps;
4. annotation: `agpo-annotate` of the unlabelled pool and the gold test split by the base
   (warm start) and every RL annotator, k samples per pair, majority vote;
5. students: a cross-encoder per annotator's pool labels, one on the pool's gold labels
   (the ceiling), evaluated on the gold test split;
6. report: results.json, tables (report.md) and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (this folder's report.py)

ALGOS = ("grpo", "agpo")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings(smoke: bool) -> dict:
    """Sizes: the full example (about 20 minutes on 2 cores) or the CI smoke (2 RL steps)."""
    if smoke:
        return dict(
            queries=[10, 10, 2, 6, 4], warmstart_steps=40, rl_steps=2, seeds=[1], k=2,
            student_epochs=1, prompts_per_step=4, n=4, eval_pairs=8,
        )  # fmt: skip
    return dict(
        queries=[60, 150, 30, 200, 60], warmstart_steps=150, rl_steps=20, seeds=[1, 2, 3], k=5,
        student_epochs=6, prompts_per_step=16, n=8, eval_pairs=64,
    )  # fmt: skip


def data_section(data_dir: Path, eval_pairs: int):
    from megatron_agpo.data.relevance import RelevanceDataConfig
    from megatron_agpo.trainer.config import DataSection

    rel = RelevanceDataConfig(
        source="file",
        path=str(data_dir / "train.jsonl"),
        eval_path=str(data_dir / "eval.jsonl"),
        warmstart_path=str(data_dir / "warmstart.jsonl"),
        num_eval=eval_pairs,
    )
    return DataSection(kind="relevance", relevance=rel)


def data_overrides(data_dir: Path, eval_pairs: int) -> list[str]:
    return [
        "data=relevance",
        "reward=relevance",
        "data.relevance.source=file",
        f"data.relevance.path={data_dir / 'train.jsonl'}",
        f"data.relevance.eval_path={data_dir / 'eval.jsonl'}",
        f"data.relevance.warmstart_path={data_dir / 'warmstart.jsonl'}",
        f"data.relevance.num_eval={eval_pairs}",
    ]


def run_cmd(cmd: list[str], logfile: Path) -> float:
    """Run a command, its output to logfile; seconds taken. A failure shows the log's tail."""
    t0 = time.perf_counter()
    with logfile.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n--- {logfile} (tail) ---\n{tail}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/search_relevance")
    ap.add_argument("--smoke", action="store_true", help="CI: tiny sizes, 2 RL steps, one seed")
    ap.add_argument("--docs", help="also write the report and plots here (docs/results)")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--rl-steps", type=int, help="RL steps per annotator (default: the size's)")
    ap.add_argument("--rl-seeds", type=int, nargs="+", help="RL seeds (default: the size's)")
    ap.add_argument(
        "--max-new", type=int, default=0,
        help="do at most this many new RL runs / annotations, then exit 3 (rerun to go on): "
        "chunks for a shared machine, e.g. one per lock hold",
    )  # fmt: skip
    args = ap.parse_args(argv)
    s = settings(args.smoke)
    if args.rl_steps:
        s["rl_steps"] = args.rl_steps
    if args.rl_seeds:
        s["seeds"] = list(args.rl_seeds)
    new_units = 0

    def record(unit: str, seconds: float) -> None:
        units[unit] = seconds
        units_path.write_text(json.dumps(units, indent=1))

    def chunk_done() -> None:
        nonlocal new_units
        new_units += 1
        if args.max_new and new_units >= args.max_new:
            log(f"--max-new {args.max_new} reached; rerun the same command to go on")
            raise SystemExit(3)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, logs = out / "data", out / "logs"
    logs.mkdir(exist_ok=True)
    # Seconds of each RL run and annotation, kept across resumed invocations (--max-new).
    units_path = out / "units_s.json"
    units: dict[str, float] = json.loads(units_path.read_text()) if units_path.exists() else {}
    times: dict[str, float] = {}
    py = sys.executable

    # 1. data
    t0 = time.perf_counter()
    if not (data_dir / "stats.json").exists():
        qs = [str(q) for q in s["queries"]]
        run_cmd([py, str(HERE / "make_data.py"), "--out", str(data_dir), "--seed",
                 str(args.seed), "--queries", *qs], logs / "data.log")  # fmt: skip
    times["data"] = time.perf_counter() - t0
    log(f"data: {data_dir}")

    # 2. warm start (in this process: the same function the trainer calls, so it is cached)
    from megatron_agpo.trainer.config import ModelSection
    from megatron_agpo.trainer.warmstart import tiny_policy_dir

    t0 = time.perf_counter()
    model = ModelSection(warmstart_steps=s["warmstart_steps"])
    base_dir = tiny_policy_dir(model, data_section(data_dir, s["eval_pairs"]), log=log)
    times["warm_start"] = time.perf_counter() - t0
    log(f"warm start: {base_dir} ({times['warm_start']:.0f} s)")

    # 3. RL annotators
    annotators: dict[str, Path] = {"base": base_dir}
    t0 = time.perf_counter()
    for algo in ALGOS:
        for seed in s["seeds"]:
            name = f"{algo}-s{seed}"
            run_dir = out / "rl" / name
            hf = run_dir / "hf"
            if not (hf / "config.json").exists():
                cmd = [
                    py, "-m", "megatron_agpo.train", *data_overrides(data_dir, s["eval_pairs"]),
                    f"algorithm={algo}", f"model.hf_path={base_dir}",
                    f"trainer.steps={s['rl_steps']}", f"trainer.seed={seed}",
                    f"data.prompts_per_step={s['prompts_per_step']}", f"rollout.n={s['n']}",
                    "trainer.eval_every=0", "checkpoint.resume=none",
                    f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                    "logging.progress=false",
                ]  # fmt: skip
                dt = run_cmd(cmd, logs / f"rl-{name}.log")
                log(f"RL {name}: {dt:.0f} s")
                record(f"rl-{name}", dt)
                # Its latest complete checkpoint -> HF, in a child process: the export sets up
                # a one-process torch.distributed world whose variables must not leak into the
                # next agpo-train.
                run_cmd([py, str(ROOT / "tools/convert_megatron_to_hf.py"), "--ckpt",
                         str(run_dir), "--out", str(hf)], logs / f"export-{name}.log")  # fmt: skip
                annotators[name] = hf
                chunk_done()
            annotators[name] = hf
    times["rl"] = sum(v for k, v in units.items() if k.startswith("rl-")) or (
        time.perf_counter() - t0
    )

    # 4. annotation (one process per annotator: vLLM's engine is released with it)
    t0 = time.perf_counter()
    for name, path in annotators.items():
        adir = out / "annotations" / name
        if (adir / "summary.json").exists():
            continue
        cmd = [
            py, "-m", "megatron_agpo.relevance.annotate", "--model", str(path),
            "--input", str(data_dir / "pool.jsonl"), "--gold", str(data_dir / "test.jsonl"),
            "--out", str(adir), "--k", str(s["k"]), "--seed", "0", "--dtype", "float32",
            "--batch-size", "256",
        ]  # fmt: skip
        dt = run_cmd(cmd, logs / f"annotate-{name}.log")
        log(f"annotate {name}: {dt:.0f} s")
        record(f"annotate-{name}", dt)
        chunk_done()
    times["annotation"] = sum(v for k, v in units.items() if k.startswith("annotate-")) or (
        time.perf_counter() - t0
    )

    # 5. students
    from megatron_agpo.data.relevance import LabelSet, load_records
    from megatron_agpo.relevance.annotate import read_annotations
    from megatron_agpo.relevance.student import StudentConfig, train_student

    t0 = time.perf_counter()
    labels = LabelSet()
    test = load_records(data_dir / "test.jsonl", labels)
    scfg = StudentConfig(epochs=s["student_epochs"])
    students: dict[str, dict] = {}
    sources = {"gold": (load_records(data_dir / "pool_gold.jsonl", labels), None)}
    for name in annotators:
        sources[name] = read_annotations(out / "annotations" / name / "annotations.jsonl", labels)
    skipped = []
    for name, (recs, conf) in sources.items():
        if not recs:  # an annotator with no valid answer at all (e.g. the smoke's warm start)
            skipped.append(name)
            log(f"student {name}: skipped, the annotator labelled no pair")
            continue
        variants = [("", scfg)]
        if name != "gold":  # the annotators' labels also with confidence weighting
            variants.append(("+conf", replace(scfg, confidence_weighting=True)))
        for suffix, cfg in variants:
            st = train_student(recs, labels, cfg, weights=conf)
            m = st.evaluate(test)
            m["train_pairs"] = len(recs)
            students[name + suffix] = m
            log(f"student {name + suffix}: macro-F1 {m['macro_f1']:.3f} ndcg@10 {m['ndcg@10']:.3f}")
    # What NDCG@10 means on this test set: a random ranking's (mean of 20 shuffles).
    import random

    from megatron_agpo.relevance.metrics import ndcg_per_query

    gains = [labels.gain(labels.lookup(r.label)) for r in test]
    rng = random.Random(0)
    shuffles = [ndcg_per_query([r.group for r in test], gains, [rng.random() for _ in test])
                for _ in range(20)]  # fmt: skip
    ndcg_random = sum(sum(d.values()) / len(d) for d in shuffles) / len(shuffles)
    times["students"] = time.perf_counter() - t0
    # The stages' sum: RL and annotation may have run over several invocations (--max-new).
    times["total"] = sum(times.values())

    # 6. report
    annot = {
        name: json.loads((out / "annotations" / name / "summary.json").read_text())
        for name in annotators
    }
    results = {
        "settings": s,
        "data_seed": args.seed,
        "annotators": annot,
        "students": students,
        "ndcg_random": ndcg_random,
        "students_skipped": skipped,
        "times_s": times,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["examples/search_relevance/run.sh", *(argv or sys.argv[1:])]),
    }
    # Committed (docs/results/relevance.json): repository-relative or ~ paths, not this
    # machine's folders.
    from megatron_agpo.eval.results import portable_paths

    results = portable_paths(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = report.write_report(results, out)
    log(f"report: {md} (total {times['total']:.0f} s)")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for f in out.glob("relevance_*.png"):
            shutil.copy(f, docs / f.name)
        shutil.copy(out / "results.json", docs / "relevance.json")
        report.update_doc(docs / "relevance.md", (out / "report.md").read_text())
        log(f"docs: {docs / 'relevance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
