"""The study's tables by hand (dograph_core.study): paired differences, the yardstick, steps to reach, overhead."""
from __future__ import annotations

import math

import pytest

from dograph_core.stats import fmt_p
from dograph_core.study import aggregate, markdown


def _rec(method, seed, mean, worst, held, curve=None, role="main", scale="nano", mixer=None):
    return {"method": method, "scale": scale, "seed": seed, "role": role, "mixer": mixer or method,
            "val_mean": mean, "val_worst": worst, "heldout": held, "last_word": 0.1, "wall_time_s": 10.0,
            "train_time_s": 8.0 if method != "dograph_human" else 12.0,
            "search_time_s": math.nan, "curves": curve or [{"step": 100, "val_mean": mean}]}


def test_aggregate_by_hand():
    recs = [
        _rec("uniform", 0, 5.00, 5.50, 6.00), _rec("uniform", 1, 5.02, 5.52, 6.02),
        _rec("natural", 0, 5.01, 5.40, 6.10), _rec("natural", 1, 5.03, 5.44, 6.08),
        _rec("dograph_human", 0, 5.00, 5.30, 5.90, [{"step": 50, "val_mean": 5.2}, {"step": 100, "val_mean": 4.9}]),
        _rec("dograph_human", 1, 5.02, 5.34, 5.94, [{"step": 50, "val_mean": 5.2}, {"step": 100, "val_mean": 4.9}]),
        _rec("uniform_2x", 0, 4.60, 5.10, 5.61, role="yardstick", mixer="uniform"),
    ]
    a = aggregate(recs)["nano"]
    assert a["best_baseline"] == "natural"  # lowest worst-domain loss among non-DoGraph methods
    d = a["diffs"]["dograph_human"]
    assert d["best"]["val_worst"]["diffs"] == pytest.approx([-0.10, -0.10])
    assert d["uniform"]["heldout"]["mean"] == pytest.approx(-0.09)
    # yardstick: 4.60 - 5.01 = -0.41 on the mean; dograph's gain 0.0 of it; worst: -0.19 / -0.41
    assert a["yardstick"]["delta"]["val_mean"] == pytest.approx(-0.41)
    assert d["gain_fraction"]["val_worst"] == pytest.approx(-0.19 / -0.41)
    # uniform's final mean 5.01 is crossed between 5.2 (step 50) and 4.9 (step 100): step 50 + 50 * 0.19/0.3
    assert d["steps_to_uniform"]["mean"] == pytest.approx(50 + 50 * 0.19 / 0.3)
    assert a["rows"]["dograph_human"]["overhead"] == pytest.approx(1.5)
    text = markdown(aggregate(recs))
    assert "best (natural)" in text and "| dograph_human | 2 | 5.010 ± 0.014 |" in text


def test_a_dograph_variant_or_an_ablation_is_never_the_best_baseline():
    recs = [_rec("uniform", s, 5.0, 5.5, 6.0) for s in (0, 1)]
    recs += [_rec("odm", s, 5.0, 5.45, 6.0) for s in (0, 1)]
    recs += [_rec("mine", s, 5.0, 5.2, 6.0, mixer="dograph") for s in (0, 1)]      # DoGraph by its mixer type
    recs += [_rec("odm_fast", s, 5.0, 5.1, 6.0, mixer="odm") for s in (0, 1)]      # an ablation of odm
    a = aggregate(recs, parents={"odm_fast": "odm"})["nano"]
    assert a["best_baseline"] == "odm"
    assert a["diffs"]["odm_fast"]["parent"]["val_worst"]["mean"] == pytest.approx(-0.35)
    assert "parent" not in a["diffs"]["mine"]
    assert "| odm_fast | parent (odm) |" in markdown({"nano": a})


def test_second_scale_is_also_compared_with_the_first_scales_best_and_overhead_is_a_median_ratio():
    def at(scale, *a, **k):
        return _rec(*a, scale=scale, **k)

    recs = [at("nano", "uniform", s, 5.0, 5.5, 6.0) for s in (0, 1, 2)]
    recs += [at("nano", "odm", s, 5.0, 5.4, 6.0) for s in (0, 1, 2)]
    recs += [at("micro", "uniform", s, 4.0, 4.5, 5.0) for s in (0, 1, 2)]
    recs += [at("micro", "odm", s, 4.1, 4.6, 5.1) for s in (0, 1, 2)]
    recs += [at("micro", "dograph_human", s, 4.0, 4.4, 5.0) for s in (0, 1, 2)]
    recs[-3]["train_time_s"] = 800.0  # seed 0 shared the machine: the median ratio ignores it
    agg = aggregate(recs)
    micro = agg["micro"]
    assert micro["best_baseline"] == "uniform" and micro["first_scale_best"] == "odm"
    assert micro["diffs"]["dograph_human"]["first_best"]["val_worst"]["mean"] == pytest.approx(-0.2)
    assert micro["rows"]["dograph_human"]["overhead"] == pytest.approx(1.5)
    assert "nano's carried best (odm)" in markdown(agg)


def test_a_single_scale_has_no_carried_best():
    """With one scale nothing is carried to a later one: a static mixture (the type @best trains as) is an
    ordinary baseline, not "micro's carried best", even when uniform has the lowest worst-domain loss."""
    recs = [_rec(m, s, 5.0, w, 6.0, scale="micro", mixer=t) for s in (0, 1)
            for m, w, t in (("uniform", 5.4, "uniform"), ("near_uniform", 5.5, "static"), ("dograph_model", 5.3, "dograph"))]
    agg = aggregate(recs)
    assert agg["micro"]["first_scale_best"] is None and agg["micro"]["best_baseline"] == "uniform"
    assert "first_best" not in agg["micro"]["diffs"]["dograph_model"] and "carried best" not in markdown(agg)


def test_dograph_record_reports_the_realised_gap_of_the_windows_model_nodes_drew(tmp_path):
    """The realised gap is averaged over the updates that log it (the windows drawn by the model nodes'
    weights, including the last one before a fall-back to human nodes; a fall-back window logs none), and its
    tolerance is the expected gap plus the window's sampling noise."""
    import json

    from dograph_core.study import dograph_record

    (tmp_path / "mixer").mkdir()
    (tmp_path / "weights.json").write_text(json.dumps({"meta": {"nodes": "model", "model_nodes_in_force_share": 2 / 3}}))
    log = [{"event": "cluster", "accepted": True},
           {"event": "update", "nodes_in_force": "model", "realised_gap_l1": 0.5, "expected_gap_l1": 0.1,
            "noise_l1": 0.2, "model": {"graph_effect_l1": 0.1}},
           {"event": "update", "nodes_in_force": "human", "realised_gap_l1": 0.3, "expected_gap_l1": 0.2,
            "noise_l1": 0.2, "human": {"graph_effect_l1": 0.3}},
           {"event": "update", "nodes_in_force": "human", "human": {"graph_effect_l1": 0.2}}]
    (tmp_path / "mixer" / "dograph_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    rec = dograph_record(tmp_path)
    assert rec["realised_gap"] == pytest.approx(0.4)
    assert rec["realised_tolerance"] == pytest.approx(0.35)
    assert rec["graph_effect"] == pytest.approx(0.2) and rec["in_force"] == pytest.approx(2 / 3)


def test_data_order_noise_by_hand_and_kept_out_of_the_method_rows():
    """uniform_reorder (role reorder) is paired with uniform by seed: differences +0.03 and -0.04 on the mean
    give rms sqrt((0.03^2 + 0.04^2) / 2); the run is no method row and no baseline, and the report says it."""
    recs = [_rec("uniform", 0, 5.00, 5.50, 6.00), _rec("uniform", 1, 5.02, 5.52, 6.02),
            _rec("odm", 0, 4.99, 5.45, 6.00), _rec("odm", 1, 5.00, 5.47, 6.01),
            _rec("uniform_reorder", 0, 5.03, 5.49, 6.00, role="reorder", mixer="uniform"),
            _rec("uniform_reorder", 1, 4.98, 5.56, 6.02, role="reorder", mixer="uniform")]
    a = aggregate(recs)["nano"]
    assert set(a["rows"]) == {"uniform", "odm"} and a["best_baseline"] == "odm"
    n = a["data_order"]
    assert n["val_mean"]["diffs"] == pytest.approx([0.03, -0.04])
    assert n["val_mean"]["rms"] == pytest.approx(math.sqrt((0.03 ** 2 + 0.04 ** 2) / 2))
    assert n["val_worst"]["rms"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.04 ** 2) / 2))
    assert n["heldout"]["rms"] == pytest.approx(0.0)
    text = markdown(aggregate(recs))
    assert "**Data-order noise** (uniform again with another data order, seeds [0, 1]" in text
    assert "mean 0.035 (+0.030, -0.040)" in text
    assert "Data-order noise" not in markdown(aggregate(recs[:4]))   # not measured: not claimed


def test_q_adjusts_each_reference_and_column_over_the_methods_by_benjamini_hochberg():
    # three methods against uniform; worst-domain p-values by hand, then BH: sorted p_(i) * m / i, made
    # monotone from the largest down
    recs = [_rec("uniform", s, 5.0, 5.5, 6.0) for s in range(3)]
    offsets = {"a": [-0.10, -0.11, -0.09], "b": [-0.02, 0.01, -0.05], "c": [0.03, -0.03, 0.001]}
    for m, off in offsets.items():
        recs += [_rec(m, s, 5.0, 5.5 + off[s], 6.0) for s in range(3)]
    d = aggregate(recs)["nano"]["diffs"]
    p = {m: d[m]["uniform"]["val_worst"]["p"] for m in offsets}
    order = sorted(p, key=p.get)
    raw = {m: p[m] * 3 / (i + 1) for i, m in enumerate(order)}
    want = {order[2]: min(1.0, raw[order[2]])}
    want[order[1]] = min(raw[order[1]], want[order[2]])
    want[order[0]] = min(raw[order[0]], want[order[1]])
    for m in offsets:
        assert d[m]["uniform"]["val_worst"]["q"] == pytest.approx(want[m])
        assert d[m]["uniform"]["val_worst"]["q"] >= p[m]  # never more significant than unadjusted
    assert d["a"]["uniform"]["val_mean"]["q"] == pytest.approx(1.0)  # equal means: p 1 for all, q 1
    text = markdown(aggregate(recs))
    assert f"(p {fmt_p(p['a'])}, q {fmt_p(want['a'])})" in text and "Benjamini-Hochberg" in text
