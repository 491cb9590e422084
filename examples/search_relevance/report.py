"""Tables and plots of the search-relevance experiment (results.json -> report.md, PNGs).

Annotators and students of the RL algorithms are summarised over seeds (mean and a 95%
Student-t interval, n = number of seeds); AGPO - GRPO is also given per seed (paired: same
seed, same warm start, same prompts order) with its t interval. Single models (the base
annotator, the gold-label student) get a bootstrap interval over test queries for NDCG@10.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_agpo.relevance.metrics import bootstrap_interval, t_interval

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ALGOS = ("grpo", "agpo")


def _seeds(names, prefix: str) -> list[str]:
    return sorted(n for n in names if n.startswith(prefix + "-s") and "+" not in n)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m, lo, hi = t_interval(values)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _annotator_rows(annot: dict, k: int) -> list[tuple[str, dict[str, list[float]]]]:
    top = max(int(j) for j in annot["base"]["gold"]["pass@k"])  # pass@j for j = 1, 2, 4 .. <= k

    def metrics(name: str) -> dict[str, float]:
        g = annot[name]["gold"]
        return {
            "macro-F1": g["macro_f1"],
            f"majority@{k}": g[f"majority@{k}"],
            "pass@1": g["pass@k"]["1"],
            f"pass@{top}": g["pass@k"][str(top)],
            "malformed": g["malformed_share"],
            "pool confidence": annot[name].get("mean_confidence", math.nan),
        }

    rows = [("base (warm start)", {k_: [v] for k_, v in metrics("base").items()})]
    for algo in ALGOS:
        names = _seeds(annot, algo)
        if names:
            per = [metrics(n) for n in names]
            rows.append(
                (f"{algo.upper()} ({len(names)} seeds)", {c: [p[c] for p in per] for c in per[0]})
            )
    return rows


def _student_rows(students: dict) -> list[tuple[str, dict[str, list[float]]]]:
    cols = ("accuracy", "macro_f1", "p_gold", "ndcg@10", "f1/Exact", "f1/Substitute",
            "f1/Complement", "f1/Irrelevant")  # fmt: skip
    # p_gold (the mean probability of the gold label) is recorded since 2026-12-05.
    cols = tuple(c for c in cols if all(c in m for m in students.values()))

    def pick(name: str) -> dict[str, float]:
        return {c: students[name][c] for c in cols}

    rows = []
    for label, names in (
        ("gold labels (ceiling)", ["gold"]),
        ("base annotator", ["base"]),
        ("base annotator, confidence-weighted", ["base+conf"]),
        *[
            (f"{a.upper()} annotators{suffix}", [n + ("+conf" if suffix else "") for n in
                                                _seeds(students, a)])
            for a in ALGOS for suffix in ("", ", confidence-weighted")
        ],
    ):  # fmt: skip
        names = [n for n in names if n in students]
        if names:
            per = [pick(n) for n in names]
            rows.append((f"{label} (n={len(names)})", {c: [p[c] for p in per] for c in cols}))
    return rows


def _table(rows, header: str = "") -> str:
    cols = list(rows[0][1])
    out = [f"| {header} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, vals in rows:
        out.append(f"| {name} | " + " | ".join(_fmt(vals[c]) for c in cols) + " |")
    return "\n".join(out)


def _paired(results: dict) -> str:
    annot, students = results["annotators"], results["students"]
    lines = ["| AGPO - GRPO, paired by seed | per seed | mean [95% CI] |", "|---|---|---|"]
    pairs = [
        (a, g) for a, g in zip(_seeds(annot, "agpo"), _seeds(annot, "grpo"), strict=False)
        if a.split("-s")[1] == g.split("-s")[1] and a in students and g in students
    ]  # fmt: skip
    if not pairs:
        return ""
    k = results["settings"]["k"]
    for what, get in (
        ("annotator macro-F1", lambda n: annot[n]["gold"]["macro_f1"]),
        (f"annotator majority@{k}", lambda n: annot[n]["gold"][f"majority@{k}"]),
        ("student macro-F1", lambda n: students[n]["macro_f1"]),
        ("student NDCG@10", lambda n: students[n]["ndcg@10"]),
    ):
        d = [get(a) - get(g) for a, g in pairs]
        per = ", ".join(f"{x:+.3f}" for x in d)
        if len(d) > 1:
            m, lo, hi = t_interval(d)
            lines.append(f"| {what} | {per} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
        else:
            lines.append(f"| {what} | {per} | (one seed) |")
    return "\n".join(lines)


def reading(results: dict) -> str:
    """A mechanical, conservative reading of the paired AGPO - GRPO intervals and of the
    students against the ceiling; the caveats hold whatever the numbers."""
    annot, students, k = results["annotators"], results["students"], results["settings"]["k"]
    pairs = [
        (a, g) for a, g in zip(_seeds(annot, "agpo"), _seeds(annot, "grpo"), strict=False)
        if a.split("-s")[1] == g.split("-s")[1] and a in students and g in students
    ]  # fmt: skip
    lines = []
    for what, get in (
        ("annotator macro-F1", lambda n: annot[n]["gold"]["macro_f1"]),
        (f"annotator majority@{k}", lambda n: annot[n]["gold"][f"majority@{k}"]),
        ("student macro-F1", lambda n: students[n]["macro_f1"]),
    ):
        d = [get(a) - get(g) for a, g in pairs]
        if len(d) < 2:
            lines.append(f"- {what}: one seed, no interval; nothing can be concluded.")
            continue
        m, lo, hi = t_interval(d)
        if lo > 0:
            verdict = "AGPO above GRPO in these runs (the 95% interval excludes 0)"
        elif hi < 0:
            verdict = "AGPO below GRPO in these runs (the 95% interval excludes 0)"
        else:
            verdict = "no difference shown (the 95% interval includes 0)"
        lines.append(f"- {what}, AGPO - GRPO: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}.")
    if "base" in annot:
        b = annot["base"]["gold"]["macro_f1"]
        rl = [annot[n]["gold"]["macro_f1"] for a in ALGOS for n in _seeds(annot, a)]
        if rl:
            lines.append(
                f"- RL against the warm start: annotator macro-F1 {b:.3f} (base) vs "
                f"{min(rl):.3f}-{max(rl):.3f} (every RL run)."
            )
    if "gold" in students:
        lines.append(
            f"- Ceiling: the student on gold labels reaches macro-F1 "
            f"{students['gold']['macro_f1']:.3f}; the gap to it is what annotation errors cost."
        )
    lines.append(
        "- Scope: one synthetic catalogue (one data seed), one tiny character-level model, "
        f"{len(pairs)} paired seeds, a few RL steps on CPU. An interval over seeds covers "
        "the RL and sampling noise of this set-up only, not other data, models or scales; the "
        "paper's JD result is not tested here, only its mechanism in miniature."
    )
    return "\n".join(lines)


def _bootstrap(students: dict) -> str:
    out = []
    for name in ("gold", "base"):
        if name in students and students[name]["ndcg_per_query"]:
            m, lo, hi = bootstrap_interval(students[name]["ndcg_per_query"])
            out.append(f"{name}: {m:.3f} [{lo:.3f}, {hi:.3f}]")
    return "; ".join(out)


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    annot, students, k = results["annotators"], results["students"], results["settings"]["k"]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (title, get) in zip(
        axes,
        (("annotator macro-F1 on gold test", lambda n: annot[n]["gold"]["macro_f1"]),
         (f"annotator majority@{k} on gold test", lambda n: annot[n]["gold"][f"majority@{k}"])),
        strict=True,
    ):  # fmt: skip
        groups = [("base", ["base"])] + [(a.upper(), _seeds(annot, a)) for a in ALGOS]
        _bars(ax, [(g, [get(n) for n in names]) for g, names in groups if names], title)
    fig.tight_layout()
    paths.append(out / "relevance_annotators.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (title, key) in zip(
        axes, (("student macro-F1 on gold test", "macro_f1"), ("student NDCG@10", "ndcg@10")),
        strict=True,
    ):  # fmt: skip
        groups = [("gold", ["gold"]), ("base", ["base"])]
        groups += [(a.upper(), _seeds(students, a)) for a in ALGOS]
        groups += [(a.upper() + "+conf", [n + "+conf" for n in _seeds(students, a)]) for a in ALGOS]
        data = [(g, [students[n][key] for n in names if n in students]) for g, names in groups]
        _bars(ax, [(g, v) for g, v in data if v], title)
    fig.tight_layout()
    paths.append(out / "relevance_students.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rl = sorted((out / "rl").glob("*/metrics.jsonl")) if (out / "rl").exists() else []
    if rl:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for p in rl:
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            rows = [r for r in rows if "reward/mean" in r]
            name = p.parent.name
            ax.plot([r["step"] for r in rows], [r["reward/mean"] for r in rows], label=name,
                    color="C0" if name.startswith("grpo") else "C3", alpha=0.8)  # fmt: skip
        ax.set_xlabel("RL step")
        ax.set_ylabel("training reward (label accuracy)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "relevance_rl.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _bars(ax, groups: list[tuple[str, list[float]]], title: str) -> None:
    for i, (_, vals) in enumerate(groups):
        m, lo, hi = t_interval(vals)
        err = None if math.isnan(lo) else [[m - lo], [hi - m]]
        ax.bar(i, m, yerr=err, capsize=4, color="C3" if "AGPO" in groups[i][0] else "C0",
               alpha=0.6)  # fmt: skip
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
    lows = [min(v) for _, v in groups]
    ax.set_ylim(max(0.0, min(lows) - 0.1), 1.0)
    ax.set_title(title, fontsize=9)


def render(results: dict) -> str:
    s, k = results["settings"], results["settings"]["k"]
    t = results["times_s"]
    test_pairs = next(iter(results["annotators"].values())).get("gold", {}).get("pairs", 0)
    parts = [
        f"Run: `{results['command']}` on {results['machine']}, {results['date']}; "
        f"total {t['total'] / 60:.1f} min (data {t['data']:.0f} s, warm start "
        f"{t['warm_start']:.0f} s, RL {t['rl']:.0f} s, annotation {t['annotation']:.0f} s, "
        f"students {t['students']:.0f} s).",
        "",
        f"Sizes: queries per split (warmstart, train, eval, pool, test) {s['queries']}, 10 pairs "
        f"each; warm start {s['warmstart_steps']} steps; RL {s['rl_steps']} steps x "
        f"{s['prompts_per_step']} prompts x {s['n']} samples, seeds {s['seeds']}; annotation "
        f"k={k}; students {s['student_epochs']} epochs. Gold test set: {test_pairs} pairs.",
        "",
        f"### Annotators on the gold test set (majority of k={k} samples)",
        "",
        "Mean over seeds [95% t interval over seeds]; one value: a single model.",
        "",
        _table(_annotator_rows(results["annotators"], k), "annotator"),
        "",
        "### Students on the gold test set",
        "",
        "Each student is the same cross-encoder (same seed), trained on one annotator's labels "
        "of the same unlabelled pool; `+conf` weights each pair by the annotator's vote share.",
        "",
        _table(_student_rows(results["students"]), "student trained on"),
        "",
        (
            f"No student for {', '.join(results['students_skipped'])}: that annotator gave no "
            "valid answer."
            if results.get("students_skipped")
            else ""
        ),
        "",
        f"NDCG@10, bootstrap over test queries: {_bootstrap(results['students'])}. "
        f"A random ranking scores {results.get('ndcg_random', math.nan):.3f} on this test set "
        "(most items have some gain), so NDCG differences are small by construction.",
        "",
        _paired(results),
        "",
        "### Reading (generated from the intervals above)",
        "",
        reading(results),
        "",
        "![annotators](relevance_annotators.png)",
        "![students](relevance_students.png)",
    ]
    if "rl_plot" in results:
        parts.append("![RL](relevance_rl.png)")
    return "\n".join(parts) + "\n"


def write_report(results: dict, out: Path) -> Path:
    paths = plot(results, out)
    if any(p.name == "relevance_rl.png" for p in paths):
        results["rl_plot"] = True
    md = out / "report.md"
    md.write_text(render(results))
    return md


def update_doc(path: Path, table_md: str) -> None:
    """Put the generated tables between the markers of `path`, keeping the text around them
    (the hand-written reading of the numbers); a new file gets the markers only."""
    block = f"{BEGIN}\n{table_md}{END}"
    if path.exists() and BEGIN in (text := path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.write_text(f"# Search-ads relevance\n\n{block}\n")
