"""Metrics of labels against gold: accuracy, macro-F1 and per-class F1, NDCG@k per query,
majority voting, and confidence intervals. Pure functions.

Written out here rather than taken from scikit-learn (with its definitions: zero_division=0,
tie-averaged NDCG): with scikit-learn installed, every process that imports transformers'
generation utilities (each rank, each vLLM replica) also imports it and SciPy's statistics,
about a CPU-second of start-up each (`from transformers import AutoTokenizer`: 5.4 -> 4.0 CPU-s)."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from megatron_agpo.data.relevance import LabelSet


def classification_metrics(
    gold: Sequence[int], pred: Sequence[int | None], labels: LabelSet
) -> dict[str, float]:
    """accuracy, macro_f1 and f1/<name> per class over label indices. A missing prediction
    (None: no valid answer) counts as wrong for every class. Classes absent from both gold
    and predictions score F1 0 (as scikit-learn's zero_division=0) and still count in the macro
    average, so a label set's score does not depend on which classes a test set happens to
    hold."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no labels to score")
    k = len(labels)
    p = [k if x is None else x for x in pred]  # an extra "no answer" class, never gold
    per = [_f1(gold, p, c) for c in range(k)]
    out = {
        "accuracy": sum(g == x for g, x in zip(gold, p, strict=True)) / len(gold),
        "macro_f1": sum(per) / k,
        "n": float(len(gold)),
    }
    out.update({f"f1/{name}": f for name, f in zip(labels.names, per, strict=True)})
    return out


def _f1(gold: Sequence[int], pred: Sequence[int], c: int) -> float:
    """F1 of class c: 2 TP / (2 TP + FP + FN), 0 when the class is in neither."""
    tp = sum(g == c and x == c for g, x in zip(gold, pred, strict=True))
    wrong = sum((g == c) != (x == c) for g, x in zip(gold, pred, strict=True))  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def _dcg(gains: Sequence[float], scores: Sequence[float], k: int) -> float:
    """DCG@k of items ranked by `scores`, each run of tied scores given its members' mean
    gain at each of its positions (the order within a tie is not information)."""
    disc = [1 / math.log2(i + 2) if i < k else 0.0 for i in range(len(gains))]
    order = sorted(range(len(gains)), key=lambda i: -scores[i])
    total, i = 0.0, 0
    while i < len(order):
        j = i + 1
        while j < len(order) and scores[order[j]] == scores[order[i]]:
            j += 1
        mean_gain = sum(gains[order[t]] for t in range(i, j)) / (j - i)
        total += mean_gain * sum(disc[i:j])
        i = j
    return total


def ndcg_per_query(
    groups: Sequence[str], gains: Sequence[float], scores: Sequence[float], k: int = 10
) -> dict[str, float]:
    """NDCG@k of each query (group): items ranked by `scores`, judged by their gold `gains`
    (linear gains, log2 discount, tied scores averaged, as scikit-learn's ndcg_score). Queries
    with fewer than 2 items or no item of positive gain have no defined NDCG and are left
    out."""
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for g, gain, s in zip(groups, gains, scores, strict=True):
        by[g].append((gain, s))
    out = {}
    for g, rows in by.items():
        if len(rows) < 2 or max(r[0] for r in rows) <= 0:
            continue
        gain = [r[0] for r in rows]
        out[g] = _dcg(gain, [r[1] for r in rows], k) / _dcg(gain, gain, k)  # over the ideal
    return out


def majority_vote(votes: Sequence[int | None], k: int) -> tuple[int | None, float]:
    """(label, vote share) of k samples' labels (None: a malformed answer, which votes for
    nothing but counts in the share's denominator). Ties go to the label listed first in the
    label set (the more relevant one). No valid vote: (None, 0.0)."""
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None, 0.0
    top = max(counts.values())
    winner = min(label for label, c in counts.items() if c == top)
    return winner, top / k


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of independent runs (seeds). One
    value: (v, nan, nan)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_interval(
    per_group: dict[str, float], level: float = 0.95, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high) of the mean over groups (queries), percentile bootstrap resampling
    the groups: the test set's sampling error of one model's score."""
    vals = list(per_group.values())
    mean = sum(vals) / len(vals)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(vals, k=len(vals))) / len(vals) for _ in range(draws))
    lo = means[int((1 - level) / 2 * draws)]
    hi = means[min(draws - 1, int((1 + level) / 2 * draws))]
    return mean, lo, hi
