"""The student's calibration: students trained on the pool's gold labels with a known share
replaced at random must score in that order on the gold test set.

    python examples/search_relevance/calibrate.py --data runs/search_relevance/data \\
        [--rates 0 0.1 0.25 0.5] [--seeds 0 1 2 3 4] [--poolings cls+mean cls] [--docs docs/results]

For each rate r and seed s, every pool label is replaced with probability r by one of the
four labels drawn uniformly (itself included, so 1 - 0.75 r of the labels stay right; the
seed draws the corruption and initialises the student). Each student is scored on the gold
test split: accuracy, macro-F1, and the mean probability it gives the gold label (`p_gold`;
a student that learns its labels' distribution puts about 1 - 0.75 r there, while its argmax
stays the gold label for every rate below 1). Means over seeds with 95% t intervals; every
pooling given (the student's default and the [CLS]-only one it replaced) is run, so the
curve shows the old student too. Results: <out>/calibration.json and, with --docs, the
section between the calibration markers of <docs>/relevance.md and relevance_calibration.png.
Resumable: finished (pooling, rate, seed) cells are read back from calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- calibration:begin -->", "<!-- calibration:end -->"


def corrupt(records, rate: float, seed: int, names):
    """Each label replaced with probability `rate` by one drawn uniformly from `names`."""
    rng = random.Random(f"corrupt:{seed}")
    return [replace(r, label=rng.choice(names)) if rng.random() < rate else r for r in records]


def cell(pool, test, labels, rate: float, seed: int, pooling: str, epochs: int) -> dict:
    from megatron_agpo.relevance.student import StudentConfig, train_student

    noisy = corrupt(pool, rate, seed, labels.names)
    right = sum(a.label == b.label for a, b in zip(noisy, pool, strict=True)) / len(pool)
    losses: list[str] = []
    t0 = time.perf_counter()
    cfg = StudentConfig(epochs=epochs, seed=seed, pooling=pooling)
    student = train_student(noisy, labels, cfg, log=losses.append)
    m = student.evaluate(test)
    proba = student.predict_proba(test)
    gold = [labels.lookup(r.label) for r in test]
    pred = proba.argmax(-1).tolist()
    confusion = [[sum(1 for g, p in zip(gold, pred, strict=True) if g == i and p == j)
                  for j in range(len(labels))] for i in range(len(labels))]  # fmt: skip
    return {
        "pooling": pooling, "rate": rate, "seed": seed, "right_labels": right,
        "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "p_gold": m["p_gold"],
        "nll": m["nll"], "ndcg@10": m["ndcg@10"],
        **{k: v for k, v in m.items() if k.startswith("f1/")},
        "confusion": confusion,
        "train_loss": [float(x.rsplit(" ", 1)[1]) for x in losses],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def summary_table(cells: list[dict], rates, poolings) -> str:
    from megatron_agpo.relevance.metrics import t_interval

    def fmt(vals):
        m, lo, hi = t_interval(vals)
        return f"{m:.3f}" if len(vals) < 2 else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    cols = ("right_labels", "p_gold", "macro_f1", "accuracy", "f1/Exact", "f1/Complement")
    out = ["| student | labels replaced | seeds | " + " | ".join(cols) + " | final train loss |",
           "|---" * (len(cols) + 4) + "|"]  # fmt: skip
    for pooling in poolings:
        for rate in rates:
            cs = [c for c in cells if c["pooling"] == pooling and c["rate"] == rate]
            if not cs:
                continue
            cells_txt = " | ".join(fmt([c[k] for c in cs]) for k in cols)
            loss = fmt([c["train_loss"][-1] for c in cs])
            out.append(f"| {pooling} | {rate:.0%} | {len(cs)} | {cells_txt} | {loss} |")
    return "\n".join(out)


def order_reading(cells: list[dict], rates, pooling: str, key: str) -> str:
    """Whether the means are in the corruption order and adjacent rates' intervals apart."""
    from megatron_agpo.relevance.metrics import t_interval

    stats = []
    for rate in rates:
        vals = [c[key] for c in cells if c["pooling"] == pooling and c["rate"] == rate]
        if vals:
            stats.append((rate, *t_interval(vals)))
    if len(stats) < 2:
        return f"{pooling}, {key}: fewer than two rates."
    ordered = all(a[1] >= b[1] for a, b in zip(stats, stats[1:], strict=False))
    apart = [f"{a[0]:.0%} > {b[0]:.0%}" for a, b in zip(stats, stats[1:], strict=False)
             if a[2] > b[3]]  # fmt: skip
    txt = "in the corruption order" if ordered else "NOT in the corruption order"
    sep = ", ".join(apart) if apart else "none"
    return (f"{pooling}, {key}: means {txt} "
            f"({', '.join(f'{s[1]:.3f}' for s in stats)}); adjacent rates whose 95% intervals "
            f"do not overlap: {sep}.")  # fmt: skip


def plot(cells: list[dict], rates, poolings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_agpo.relevance.metrics import t_interval

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("macro_f1", "p_gold"), strict=True):
        for i, pooling in enumerate(poolings):
            xs, ms, errs = [], [], [[], []]
            for rate in rates:
                vals = [c[key] for c in cells if c["pooling"] == pooling and c["rate"] == rate]
                if not vals:
                    continue
                m, lo, hi = t_interval(vals)
                xs.append(rate * 100)
                ms.append(m)
                errs[0].append(0 if len(vals) < 2 else m - lo)
                errs[1].append(0 if len(vals) < 2 else hi - m)
                ax.scatter([rate * 100 + (i - 0.5) * 1.2] * len(vals), vals, s=8, color=f"C{i}",
                           alpha=0.5)  # fmt: skip
            ax.errorbar(xs, ms, yerr=errs, marker="o", capsize=3, color=f"C{i}",
                        label=f"pooling {pooling}")  # fmt: skip
        if key == "p_gold":
            ax.plot([r * 100 for r in rates], [1 - 0.75 * r for r in rates], "k--", lw=1,
                    label="1 - 0.75 r (labels right)")  # fmt: skip
        ax.set_xlabel("% of pool labels replaced at random")
        titles = {"macro_f1": "student macro-F1 on gold test",
                  "p_gold": "student's mean probability of the gold label"}  # fmt: skip
        ax.set_title(titles[key], fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(path: Path, block_md: str) -> None:
    """Put `block_md` between the calibration markers of `path` (appended if absent)."""
    block = f"{BEGIN}\n{block_md}{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="make_data.py's folder (pool_gold, test)")
    ap.add_argument("--out", help="results folder (default: --data's parent)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--poolings", nargs="+", default=["cls+mean", "cls"])
    ap.add_argument("--epochs", type=int, default=6, help="the experiment's student epochs")
    ap.add_argument("--max-cells", type=int, default=0, help="stop after this many new cells")
    ap.add_argument("--docs", help="also write the section and plot here (docs/results)")
    args = ap.parse_args(argv)
    from megatron_agpo.data.relevance import LabelSet, load_records
    from megatron_agpo.eval.results import portable_paths

    labels = LabelSet()
    data = Path(args.data)
    pool = load_records(data / "pool_gold.jsonl", labels)
    test = load_records(data / "test.jsonl", labels)
    out = Path(args.out) if args.out else data.parent
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "calibration.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"cells": [], "runs": []}
    done = {(c["pooling"], c["rate"], c["seed"]) for c in rec["cells"]}
    new = 0
    t0 = time.perf_counter()
    for pooling in args.poolings:
        for rate in args.rates:
            for seed in args.seeds:
                if (pooling, rate, seed) in done:
                    continue
                if args.max_cells and new >= args.max_cells:
                    break
                c = cell(pool, test, labels, rate, seed, pooling, args.epochs)
                rec["cells"].append(c)
                new += 1
                print(f"{pooling} rate {rate:.2f} seed {seed}: macro-F1 {c['macro_f1']:.3f} "
                      f"p_gold {c['p_gold']:.3f} ({c['seconds']:.0f} s)", flush=True)  # fmt: skip
                rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    if new:
        rec["runs"].append({
            "command": " ".join(["examples/search_relevance/calibrate.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cells": new, "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    rec = portable_paths(rec)
    rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    cells = rec["cells"]
    rates = sorted({c["rate"] for c in cells})
    poolings = [p for p in args.poolings if any(c["pooling"] == p for c in cells)]
    runs = "; ".join(f"`{r['command']}` on {r['machine']}, {r['date']} ({r['cells']} students, "
                     f"{r['seconds']:.0f} s)" for r in rec["runs"])  # fmt: skip
    md = "\n".join([
        f"Run: {runs}.",
        "",
        f"Pool: {len(pool)} pairs (gold labels, then corrupted); test: {len(test)} gold pairs; "
        f"students {args.epochs} epochs. Mean over seeds [95% t interval over seeds]; "
        "`right_labels`: the share of training labels still right after the corruption.",
        "",
        summary_table(cells, rates, poolings),
        "",
        *[f"- {order_reading(cells, rates, p, k)}" for p in poolings
          for k in ("p_gold", "macro_f1")],
        "",
        "![calibration](relevance_calibration.png)",
    ]) + "\n"  # fmt: skip
    (out / "calibration.md").write_text(md)
    plot(cells, rates, poolings, out / "relevance_calibration.png")
    print(md)
    if args.docs:
        import shutil

        docs = Path(args.docs)
        shutil.copy(out / "relevance_calibration.png", docs / "relevance_calibration.png")
        shutil.copy(rec_path, docs / "relevance_calibration.json")
        update_doc(docs / "relevance.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
