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
