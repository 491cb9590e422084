"""Pass@k results of one or more checkpoints: a JSON summary, a markdown table and a plot.

Input: per checkpoint, per benchmark, the (n, c) counts of every problem. Output:

- results.json: per problem counts, pass@k for k = 1, 2, 4, ... per benchmark, and the
  unweighted mean over benchmarks ("average", the paper's Avg column);
- results.md: one table, rows (checkpoint, k), a column per benchmark and the average;
- passk.png: one panel per benchmark plus the average, a curve per checkpoint, log2 k axis.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_agpo.eval.benchmarks import DISPLAY_NAMES
from megatron_agpo.eval.passk import default_ks, pass_at_k_curve

AVERAGE = "average"


@dataclass(frozen=True)
class ProblemResult:
    """The outcome of sampling one problem n times."""

    benchmark: str
    """Canonical benchmark name."""
    id: str
    """Problem id within the benchmark."""
    n: int
    """Number of samples drawn."""
    c: int
    """Number of correct samples (score above the threshold)."""
    scores: tuple[float, ...] = ()
    """score_fn of each sample, in sample order (empty when only counts are known)."""
    completions: tuple[str, ...] = ()
    """The sampled texts, when the run kept them (empty otherwise)."""


def group_by_benchmark(results: Iterable[ProblemResult]) -> dict[str, list[ProblemResult]]:
    """results split per benchmark, each in its original order; benchmarks in first-seen order."""
    out: dict[str, list[ProblemResult]] = {}
    for r in results:
        out.setdefault(r.benchmark, []).append(r)
    return out


def summarize(runs: Mapping[str, Mapping[str, Sequence[ProblemResult]]]) -> dict[str, Any]:
    """The results.json payload for runs = {checkpoint: {benchmark: [ProblemResult, ...]}}.

    Each benchmark reports k = 1, 2, 4, ... up to its smallest n; the average over benchmarks
    reports the ks every benchmark has. k keys are strings (JSON object keys).
    """
    if not runs:
        raise ValueError("summarize: no checkpoints")
    checkpoints: dict[str, Any] = {}
    for ckpt, datasets in runs.items():
        if not datasets:
            raise ValueError(f"summarize: checkpoint {ckpt!r} has no benchmarks")
        per_ds: dict[str, Any] = {}
        for bench, results in datasets.items():
            if not results:
                raise ValueError(f"summarize: {ckpt!r}/{bench!r} has no problems")
            ns = [r.n for r in results]
            curve = pass_at_k_curve([(r.n, r.c) for r in results], default_ks(min(ns)))
            per_ds[bench] = {
                "num_problems": len(results),
                "n_min": min(ns),
                "n_max": max(ns),
                "pass_at_k": {str(k): v for k, v in curve.items()},
                "problems": [{"id": r.id, "n": r.n, "c": r.c} for r in results],
            }
        common = set.intersection(*(set(d["pass_at_k"]) for d in per_ds.values()))
        ks = sorted(common, key=int)
        checkpoints[ckpt] = {
            "datasets": per_ds,
            AVERAGE: {
                "datasets": list(per_ds),
                "pass_at_k": {
                    k: math.fsum(d["pass_at_k"][k] for d in per_ds.values()) / len(per_ds)
                    for k in ks
                },
            },
        }
    all_ks = sorted(
        {
            int(k)
            for c in checkpoints.values()
            for d in c["datasets"].values()
            for k in d["pass_at_k"]
        }
    )
    return {"ks": all_ks, "checkpoints": checkpoints}


def _benchmarks(summary: Mapping[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for c in summary["checkpoints"].values():
        seen.update(dict.fromkeys(c["datasets"]))
    return list(seen)


def _display(bench: str) -> str:
    return "Avg" if bench == AVERAGE else DISPLAY_NAMES.get(bench, bench)


def markdown_table(summary: Mapping[str, Any], ks: Iterable[int] | None = None) -> str:
    """pass@k in percent: a row per (checkpoint, k), a column per benchmark and the average.

    A cell is "-" where the benchmark was not run or its n is below k.
    """
    benches = _benchmarks(summary)
    ks = list(summary["ks"] if ks is None else ks)
    header = ["checkpoint", "k", *(_display(b) for b in benches), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ckpt, c in summary["checkpoints"].items():
        for k in ks:
            cells = []
            for b in [*benches, AVERAGE]:
                block = c[AVERAGE] if b == AVERAGE else c["datasets"].get(b)
                v = None if block is None else block["pass_at_k"].get(str(k))
                cells.append("-" if v is None else f"{100 * v:.1f}")
            lines.append("| " + " | ".join([ckpt, str(k), *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Save pass@k curves: a panel per benchmark plus the average, a line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes and CI
    import matplotlib.pyplot as plt

    panels = [*_benchmarks(summary), AVERAGE]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, b in zip(axes[0], panels, strict=True):
        for ckpt, c in summary["checkpoints"].items():
            block = c[AVERAGE] if b == AVERAGE else c["datasets"].get(b)
            if not block or not block["pass_at_k"]:
                continue
            ks = sorted(int(k) for k in block["pass_at_k"])
            ax.plot(
                ks,
                [100 * block["pass_at_k"][str(k)] for k in ks],
                marker="o",
                markersize=3,
                label=ckpt,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(_display(b))
        ax.set_xlabel("k")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("pass@k (%)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (what `portable_paths` makes paths relative to)."""


def portable_paths(obj: Any, repo: str | Path | None = None, home: str | Path | None = None):
    """`obj` (JSON-like: dicts, lists, strings, numbers) with the machine's folders taken out
    of every string, for results that get committed: a path in the repository becomes relative
    to it ("runs/study"; the repository itself "."), one in the home folder starts with "~"
    ("~/.cache/megatron_agpo/..."). Paths inside longer strings (a recorded command) are
    rewritten too; other absolute paths are left as they are."""
    repo_s = str(Path(repo or REPO_ROOT).resolve())
    home_s = str(Path(home or os.path.expanduser("~")).resolve())

    def fix(s: str) -> str:
        if s in (repo_s, home_s):
            return "." if s == repo_s else "~"
        # The repository first: it may lie inside the home folder.
        s = s.replace(repo_s + "/", "")
        if home_s != "/":
            s = s.replace(home_s + "/", "~/")
        return s

    if isinstance(obj, str):
        return fix(obj)
    if isinstance(obj, Mapping):
        return {fix(k) if isinstance(k, str) else k: portable_paths(v, repo_s, home_s)
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v, repo_s, home_s) for v in obj]
    return obj


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temporary file and a rename, so a reader or a crash never
    sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(
    runs: Mapping[str, Mapping[str, Sequence[ProblemResult]]],
    out_dir: str | Path,
    plot: bool = True,
) -> dict[str, Any]:
    """Write results.json, results.md and (plot=True) passk.png into out_dir; return the summary."""
    out_dir = Path(out_dir)
    summary = summarize(runs)
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out_dir / "results.md", markdown_table(summary))
    if plot:
        plot_curves(summary, out_dir / "passk.png")
    return summary
