"""Metrics of labels against gold: accuracy, macro-F1 and per-class F1 (scikit-learn),
NDCG@k per query, majority voting, and confidence intervals. Pure functions."""

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
    and predictions score F1 0 (scikit-learn's zero_division=0) and still count in the macro
    average, so a label set's score does not depend on which classes a test set happens to
    hold."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no labels to score")
    k = len(labels)
    p = [k if x is None else x for x in pred]  # an extra "no answer" class, never gold
    per = f1_score(gold, p, labels=list(range(k)), average=None, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(gold, p)),
        "macro_f1": float(sum(per) / k),
        "n": float(len(gold)),
    }
    out.update({f"f1/{name}": float(f) for name, f in zip(labels.names, per, strict=True)})
    return out


def ndcg_per_query(
    groups: Sequence[str], gains: Sequence[float], scores: Sequence[float], k: int = 10
) -> dict[str, float]:
    """NDCG@k of each query (group): items ranked by `scores`, judged by their gold `gains`
    (linear gains, log2 discount, tied scores averaged: scikit-learn's ndcg_score). Queries
    with fewer than 2 items or no item of positive gain have no defined NDCG and are left
    out."""
    from sklearn.metrics import ndcg_score

    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for g, gain, s in zip(groups, gains, scores, strict=True):
        by[g].append((gain, s))
    out = {}
    for g, rows in by.items():
        if len(rows) < 2 or max(r[0] for r in rows) <= 0:
            continue
        out[g] = float(ndcg_score([[r[0] for r in rows]], [[r[1] for r in rows]], k=k))
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
