"""Statistics of a method comparison: seed spread, paired differences, the compute yardstick.

Pure functions over plain numbers, so every one can be checked by hand:

* :func:`mean_std` - mean and sample standard deviation (ddof 1) over seeds;
* :func:`paired` - differences ``a - b`` of two arms matched by seed, their mean, spread and a
  two-sided paired t-test (:func:`scipy.stats.ttest_rel`); pairing removes the part of the seed
  noise both arms share (same initialisation, same evaluation windows);
* :func:`gain_fraction` - a method's gain as a fraction of the gain from doubling uniform's
  budget (the compute yardstick of ``reference/effect-size.md``);
* :func:`steps_to_reach` - the first step at which a validation curve reaches a target loss,
  linearly interpolated between evaluations.

Losses are "lower is better" everywhere: a negative difference means the first arm is better.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence


def _finite(xs: Iterable[Any]) -> list[float]:
    out = []
    for x in xs:
        try:
            v = float(x)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def mean_std(xs: Iterable[Any]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite values; ``std`` is the sample sd (NaN with one value)."""
    v = _finite(xs)
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return {"mean": m, "std": sd, "n": n}


def paired(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> dict[str, Any]:
    """Paired differences ``a[s] - b[s]`` over the seeds ``s`` both arms have (finite values only).

    Returns ``{"mean", "std", "n", "diffs", "seeds", "t", "p", "ci"}``; ``t`` and ``p`` (two-sided
    paired t-test) are NaN with fewer than two pairs, and ``p`` is 1.0 when every difference is zero;
    ``ci`` is the 95% confidence interval of the mean difference (Student's t), NaNs below two pairs.
    """
    seeds = sorted(s for s in set(a) & set(b) if _finite([a[s]]) and _finite([b[s]]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    ms = mean_std(diffs)
    t = p = math.nan
    ci = (math.nan, math.nan)
    if len(diffs) >= 2:
        from scipy.stats import t as student_t
        from scipy.stats import ttest_rel

        if max(diffs) - min(diffs) <= 1e-12 * max(1.0, abs(ms["mean"])):  # constant: no spread to test
            t, p = (0.0, 1.0) if abs(ms["mean"]) <= 1e-12 else (math.copysign(math.inf, ms["mean"]), 0.0)
        else:
            res = ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds])
            t, p = float(res.statistic), float(res.pvalue)
        half = float(student_t.ppf(0.975, len(diffs) - 1)) * ms["std"] / math.sqrt(len(diffs))
        ci = (ms["mean"] - half, ms["mean"] + half)
    return {**ms, "diffs": diffs, "seeds": seeds, "t": t, "p": p, "ci": ci}


def gain_fraction(delta: float, yardstick: float) -> float:
    """``delta / yardstick``: a loss change as a fraction of the 2x-budget change.

    Both are "method minus uniform" differences (negative = better), so a method that gains as
    much as doubling the budget scores 1.0 and one that hurts scores below 0. NaN when the
    yardstick is missing or not an improvement (>= 0).
    """
    try:
        d, y = float(delta), float(yardstick)
    except (TypeError, ValueError):
        return math.nan
    if not (math.isfinite(d) and math.isfinite(y)) or y >= 0:
        return math.nan
    return d / y


def steps_to_reach(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """First step at which ``curve`` (``[(step, loss), ...]``, any order) is at or below ``target``.

    Between two evaluations the loss is interpolated linearly, so the answer may fall between
    them. ``None`` if the curve never reaches the target.
    """
    pts = sorted((float(s), float(v)) for s, v in curve if _finite([s]) and _finite([v]))
    prev: Optional[tuple[float, float]] = None
    for s, v in pts:
        if v <= target:
            if prev is None or prev[1] == v:
                return s
            s0, v0 = prev
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
        prev = (s, v)
    return None


def fmt_pm(ms: Mapping[str, float], digits: int = 3) -> str:
    """``"4.686 ± 0.008"`` (or just the mean with one value, ``"–"`` with none)."""
    m, sd = ms.get("mean", math.nan), ms.get("std", math.nan)
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{m:.{digits}f}"


def fmt_p(p: float) -> str:
    """A p-value for a table: ``"0.012"``, ``"<0.001"`` or ``"–"``."""
    if p is None or not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
