"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", the Codex paper), and its average over problems.

With n samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k): the probability
that k samples drawn without replacement from the n contain at least one correct one. The
binomials overflow floats long before n = 4096, so it is computed in the product form

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

taken in the log domain: pass@k = -expm1(sum_i log1p(-k / i)). Every term has the same sign,
so `math.fsum` adds them with a relative error of about one ulp per term's own rounding, and
`expm1` keeps full relative precision when the result is small (k = 1, c = 1: 1/n), where the
plain `1 - prod` would cancel.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import numpy as np


def _as_count(name: str, value: object) -> int:
    """value as a non-negative int (numpy integers included), or a ValueError naming it."""
    if isinstance(value, bool):
        # bool is an int subclass; True as a sample count is a bug at the call site.
        raise ValueError(f"pass_at_k: {name}={value!r} must be an integer, not a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"pass_at_k: {name}={value!r} must be an integer") from None
    if v < 0:
        raise ValueError(f"pass_at_k: {name}={v} must be >= 0")
    return v


def _validate(n: object, c: object, k: object) -> tuple[int, int, int]:
    n, c, k = _as_count("n", n), _as_count("c", c), _as_count("k", k)
    if n == 0:
        raise ValueError("pass_at_k: n=0: need at least one sample")
    if k == 0:
        raise ValueError("pass_at_k: k=0 must be >= 1")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} exceeds n={n} (more correct samples than samples)")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds n={n} (cannot draw k of n samples)")
    return n, c, k


def _pass_at_k_unchecked(n: int, c: int, k: int) -> float:
    # Edges exactly: no correct sample never passes; if fewer than k samples are wrong, every
    # draw of k contains a correct one (C(n - c, k) = 0).
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return -math.expm1(math.fsum(np.log1p(-k / i).tolist()))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct (1 <= k <= n).

    Exact at the edges (c = 0 gives 0.0; c = n or k > n - c gives 1.0); relative error about
    1e-15 elsewhere, for n up to several thousand. Raises ValueError naming the bad argument.
    """
    return _pass_at_k_unchecked(*_validate(n, c, k))


def pass_at_k_array(
    n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray, k: int
) -> np.ndarray:
    """pass@k of many problems at once: n and c are per-problem arrays of equal length.

    Each problem's value is bit-identical to `pass_at_k(n[j], c[j], k)`. Problems sharing an
    (n, c) pair are computed once (c takes at most n + 1 values, so a benchmark of hundreds of
    problems has few distinct pairs).
    """
    n_arr = np.asarray(n)
    c_arr = np.asarray(c)
    if n_arr.ndim != 1 or c_arr.shape != n_arr.shape:
        raise ValueError(
            f"pass_at_k_array: n and c must be 1-d of equal length, got shapes "
            f"{n_arr.shape} and {c_arr.shape}"
        )
    cache: dict[tuple[int, int], float] = {}
    out = np.empty(n_arr.shape, dtype=np.float64)
    for j, (nj, cj) in enumerate(zip(n_arr.tolist(), c_arr.tolist(), strict=True)):
        key = (nj, cj)
        if key not in cache:
            try:
                cache[key] = _pass_at_k_unchecked(*_validate(nj, cj, k))
            except ValueError as e:
                raise ValueError(f"problem {j}: {e}") from None
        out[j] = cache[key]
    return out


def default_ks(n: int) -> list[int]:
    """The ks reported for n samples: 1, 2, 4, ... up to the largest power of two <= n."""
    n = _as_count("n", n)
    if n == 0:
        raise ValueError("default_ks: n=0: need at least one sample")
    return [1 << e for e in range(n.bit_length())]


def pass_at_k_curve(
    counts: Iterable[tuple[int, int]], ks: Iterable[int] | None = None
) -> dict[int, float]:
    """Mean pass@k over problems, for each k: {k: mean over problems of pass@k(n, c)}.

    counts holds one (n, c) pair per problem. ks defaults to `default_ks` of the smallest n,
    so every k is defined for every problem.
    """
    pairs = list(counts)
    if not pairs:
        raise ValueError("pass_at_k_curve: counts is empty (no problems)")
    n = np.array([p[0] for p in pairs])
    c = np.array([p[1] for p in pairs])
    ks = default_ks(int(n.min())) if ks is None else list(ks)
    # math.fsum: the mean of hundreds of values in [0, 1] then does not depend on their order.
    return {int(k): math.fsum(pass_at_k_array(n, c, k).tolist()) / len(pairs) for k in ks}


# ---- confidence intervals: bootstrap over problems and seeds ----


def pass_at_k_grid(n: int, correct: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """[S, P, K] pass@k of every (seed, problem) for each k: `correct` is [S, P] counts of
    correct samples out of n (S seeds, i.e. independent runs, each evaluated on P problems)."""
    c = np.asarray(correct)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"correct must be a non-empty [seeds, problems] array, got {c.shape}")
    flat = c.reshape(-1)
    out = np.stack([pass_at_k_array(np.full(flat.shape, n), flat, k) for k in ks], axis=-1)
    return out.reshape(*c.shape, len(ks))


def bootstrap_pass_at_k(
    arms: dict[str, tuple[int, np.ndarray]],
    ks: Sequence[int],
    *,
    reference: str | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Mean pass@k per arm with a percentile bootstrap interval over problems and seeds, and
    each arm's difference to `reference` with its interval.

    arms: name -> (n, correct[S, P]); every arm is evaluated on the same P problems, in the
    same order (S may differ). One resample draws P problems with replacement, shared by all
    arms (the problems are common, so differences are paired over problems), and, per arm,
    S of its seeds with replacement (the runs are independent). Only the ks <= n of an arm
    are reported for it; differences use the ks both arms have.

    Returns {arm: {"seeds": S, "pass": {k: (mean, low, high)}, "diff": {k: (d, low, high)}}}.
    """
    if not arms:
        raise ValueError("bootstrap_pass_at_k: no arms")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_pass_at_k: level={level} must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"bootstrap_pass_at_k: resamples={resamples} must be >= 1")
    problems = {name: np.asarray(c).shape[-1] for name, (_, c) in arms.items()}
    if len(set(problems.values())) != 1:
        raise ValueError(f"bootstrap_pass_at_k: arms differ in problem count: {problems}")
    if reference is not None and reference not in arms:
        raise ValueError(f"bootstrap_pass_at_k: reference {reference!r} is not an arm")
    n_problems = next(iter(problems.values()))
    arm_ks = {name: [k for k in ks if k <= n] for name, (n, _) in arms.items()}
    grids = {name: pass_at_k_grid(n, c, arm_ks[name]) for name, (n, c) in arms.items()}
    rng = np.random.default_rng(seed)
    # Multinomial counts are the resampling weights: a problem drawn twice counts twice.
    u = rng.multinomial(n_problems, np.full(n_problems, 1.0 / n_problems), size=resamples)
    boots: dict[str, np.ndarray] = {}
    for name, g in grids.items():
        s = g.shape[0]
        w = rng.multinomial(s, np.full(s, 1.0 / s), size=resamples)  # [R, S]
        # mean over the resampled grid: sum_s sum_p w_s u_p g[s, p, k] / (S P), for each r
        per_seed = np.einsum("rp,spk->rsk", u, g)  # [R, S, K]
        boots[name] = np.einsum("rs,rsk->rk", w, per_seed) / (s * n_problems)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out: dict[str, dict] = {}
    for name, g in grids.items():
        means = g.mean(axis=(0, 1))
        b = boots[name]
        out[name] = {
            "seeds": g.shape[0],
            "pass": {
                k: (
                    float(means[j]),
                    float(np.quantile(b[:, j], lo_q)),
                    float(np.quantile(b[:, j], hi_q)),
                )
                for j, k in enumerate(arm_ks[name])
            },
            "diff": {},
        }
        if reference is None or name == reference:
            continue
        ref_ks = arm_ks[reference]
        ref_means = grids[reference].mean(axis=(0, 1))
        for j, k in enumerate(arm_ks[name]):
            if k not in ref_ks:
                continue
            jr = ref_ks.index(k)
            d = boots[name][:, j] - boots[reference][:, jr]
            out[name]["diff"][k] = (
                float(means[j] - ref_means[jr]),
                float(np.quantile(d, lo_q)),
                float(np.quantile(d, hi_q)),
            )
    return out
