"""What a student learns from an annotator's labels: the evidence of issue 27.

    python examples/search_relevance/diagnose.py --run runs/search_relevance --annotator base \\
        [--seeds 0 1 2] [--poolings cls cls+mean] [--epochs 6]

Reads the experiment's data (pool_gold, test) and one annotator's labels of the pool
(annotations/<name>/annotations.jsonl) and of the gold test set (gold_annotations.jsonl),
and prints as markdown:

- the annotator's labels against gold on the pool (confusion matrix, class balance);
- the best rule that sees only the item's shape (a product or an accessory: no query) fitted
  to the annotator's labels, and its log loss on them: the plateau the [CLS]-only student sat
  on;
- per pooling and seed, a student trained on the annotator's pool labels: its final training
  loss, its predictions on the gold test set (confusion against gold, macro-F1, p_gold) and
  its agreement with the annotator's own majority labels of the test pairs (does the student
  reproduce its teacher, beyond the item's shape?).

Writes <run>/diagnose-<annotator>.json as well.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path


def shape(rec) -> str:
    return "accessory" if rec.category == "accessories" else "product"


def matrix_md(rows: list[list[int]], names, row_title: str) -> str:
    head = f"| {row_title} | " + " | ".join(names) + " | total |"
    out = [head, "|---" * (len(names) + 2) + "|"]
    for n, r in zip(names, rows, strict=True):
        out.append(f"| {n} | " + " | ".join(str(x) for x in r) + f" | {sum(r)} |")
    return "\n".join(out)


def confusion(gold: list[int], pred: list[int], k: int) -> list[list[int]]:
    m = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred, strict=True):
        m[g][p] += 1
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", required=True, help="the experiment's --out folder")
    ap.add_argument("--annotator", default="base")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--poolings", nargs="+", default=["cls", "cls+mean"])
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args(argv)

    from megatron_agpo.data.relevance import LabelSet, load_records
    from megatron_agpo.relevance.annotate import read_annotations
    from megatron_agpo.relevance.student import StudentConfig, train_student

    labels = LabelSet()
    names, k = labels.names, len(labels)
    run = Path(args.run)
    pool_gold = {r.id: r for r in load_records(run / "data/pool_gold.jsonl", labels)}
    test = load_records(run / "data/test.jsonl", labels)
    adir = run / "annotations" / args.annotator
    recs, _ = read_annotations(adir / "annotations.jsonl", labels)
    test_annot = {
        r.id: r.label for r in load_records(adir / "gold_annotations.jsonl", labels, False)
    }
    lines = [f"### Annotator `{args.annotator}`: its pool labels against gold", ""]
    g = [labels.lookup(pool_gold[r.id].label) for r in recs]
    a = [labels.lookup(r.label) for r in recs]
    lines.append(matrix_md(confusion(g, a, k), names, "gold \\ annotator"))
    balance = Counter(r.label for r in recs)
    gold_balance = ", ".join(f"{n} {sum(x == i for x in g)}" for i, n in enumerate(names))
    lines += ["", "Class balance of its labels: "
              + ", ".join(f"{n} {balance[n]}" for n in names)
              + f" ({len(recs)} pairs labelled; gold: {gold_balance})."]  # fmt: skip
    # The best query-blind rule: per item shape, the annotator's label distribution.
    by_shape: dict[str, Counter] = {}
    for r in recs:
        by_shape.setdefault(shape(pool_gold[r.id]), Counter())[r.label] += 1
    loss = -sum(c * math.log(c / sum(cnt.values())) for cnt in by_shape.values()
                for c in cnt.values()) / len(recs)  # fmt: skip
    plural = {s: cnt.most_common(1)[0][0] for s, cnt in by_shape.items()}
    lines += ["", "Query-blind rule (the item's shape only) fitted to these labels: "
              + ", ".join(f"{s} -> {plural[s]}" for s in sorted(plural))
              + f"; its log loss on them {loss:.3f}."]  # fmt: skip
    record = {"annotator": args.annotator, "pool_confusion": confusion(g, a, k),
              "label_counts": dict(balance), "shape_rule": plural, "shape_rule_loss": loss,
              "students": []}  # fmt: skip
    gold_test = [labels.lookup(r.label) for r in test]
    annot_test = [labels.lookup(test_annot[r.id]) if test_annot.get(r.id) else None for r in test]
    lines += ["", "### Students on these labels, on the gold test set", "",
              "| pooling | seed | final train loss | macro-F1 | p_gold | predicted E/S/C/I | "
              "agreement with the annotator's test labels | agreement of the shape rule |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shape_pred = [labels.lookup(plural[shape(r)]) for r in test]
    agree_shape = sum(p == t for p, t in zip(shape_pred, annot_test, strict=True)) / len(test)
    for pooling in args.poolings:
        for seed in args.seeds:
            losses: list[str] = []
            t0 = time.perf_counter()
            cfg = StudentConfig(epochs=args.epochs, seed=seed, pooling=pooling)
            st = train_student(recs, labels, cfg, log=losses.append)
            m = st.evaluate(test)
            pred = st.predict_proba(test).argmax(-1).tolist()
            agree = sum(p == t for p, t in zip(pred, annot_test, strict=True)) / len(test)
            counts = Counter(pred)
            final = float(losses[-1].rsplit(" ", 1)[1])
            lines.append(
                f"| {pooling} | {seed} | {final:.3f} | {m['macro_f1']:.3f} | {m['p_gold']:.3f} | "
                + "/".join(str(counts[i]) for i in range(k))
                + f" | {agree:.3f} | {agree_shape:.3f} |"
            )
            record["students"].append({
                "pooling": pooling, "seed": seed, "train_loss": [float(x.rsplit(" ", 1)[1])
                                                                for x in losses],
                "macro_f1": m["macro_f1"], "p_gold": m["p_gold"], "accuracy": m["accuracy"],
                "confusion": confusion(gold_test, pred, k), "agreement": agree,
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip
    record["shape_rule_agreement"] = agree_shape
    (run / f"diagnose-{args.annotator}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
