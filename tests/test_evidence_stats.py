"""The comparison's statistics on hand-computed numbers (dograph_core/stats.py)."""
from __future__ import annotations

import math

import pytest

from dograph_core.stats import fmt_p, fmt_pm, gain_fraction, mean_std, paired, steps_to_reach


def test_mean_std_is_the_sample_sd():
    ms = mean_std([1.0, 2.0, 3.0, 4.0])
    assert ms["mean"] == pytest.approx(2.5)
    assert ms["std"] == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, ddof 1
    assert ms["n"] == 4


def test_mean_std_skips_missing_values_and_handles_one_or_none():
    assert mean_std([2.0, None, float("nan"), "x"]) == {"mean": 2.0, "std": pytest.approx(float("nan"), nan_ok=True), "n": 1}
    assert mean_std([])["n"] == 0 and math.isnan(mean_std([])["mean"])


def test_paired_differences_and_t_test_by_hand():
    a = {0: 4.70, 1: 4.66, 2: 4.69}
    b = {0: 4.68, 1: 4.67, 2: 4.66}
    r = paired(a, b)
    diffs = [0.02, -0.01, 0.03]
    assert r["seeds"] == [0, 1, 2]
    assert r["diffs"] == pytest.approx(diffs)
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    assert r["mean"] == pytest.approx(m) and r["std"] == pytest.approx(sd)
    t = m / (sd / math.sqrt(3))
    assert r["t"] == pytest.approx(t)
    # two-sided p of t with 2 degrees of freedom: 1 - t / sqrt(t^2 + 2)
    assert r["p"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-6)


def test_paired_uses_only_common_seeds():
    r = paired({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0})
    assert r["seeds"] == [0, 1] and r["diffs"] == [0.5, 1.0]


def test_paired_with_one_pair_or_constant_differences():
    one = paired({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and math.isnan(one["p"])
    const = paired({0: 1.0, 1: 2.0}, {0: 0.9, 1: 1.9})
    assert const["p"] == 0.0 or const["p"] < 1e-6  # the same non-zero difference every seed
    zero = paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert zero["p"] == 1.0 and zero["mean"] == 0.0


def test_gain_fraction_against_the_yardstick():
    assert gain_fraction(-0.042, -0.42) == pytest.approx(0.1)
    assert gain_fraction(0.021, -0.42) == pytest.approx(-0.05)  # a method that hurts is negative
    assert math.isnan(gain_fraction(-0.1, 0.0))  # no yardstick gain: undefined
    assert math.isnan(gain_fraction(None, -0.4))


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(100, 6.0), (200, 5.0), (300, 4.5)]
    assert steps_to_reach(curve, 5.5) == pytest.approx(150.0)
    assert steps_to_reach(curve, 4.5) == pytest.approx(300.0)
    assert steps_to_reach(curve, 6.5) == 100  # already below at the first evaluation
    assert steps_to_reach(curve, 4.0) is None
    assert steps_to_reach(list(reversed(curve)), 5.5) == pytest.approx(150.0)  # any order


def test_formatting():
    assert fmt_pm({"mean": 4.6861, "std": 0.0082}) == "4.686 ± 0.008"
    assert fmt_pm({"mean": 4.6861, "std": float("nan")}) == "4.686"
    assert fmt_pm({"mean": float("nan"), "std": 1.0}) == "–"
    assert fmt_p(0.0004) == "<0.001" and fmt_p(0.0123) == "0.012" and fmt_p(float("nan")) == "–"
