"""The report from a synthetic results document, the MLflow tracker alone, and caching by inputs."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

DOMAINS = ["code", "docs", "math"]


def _run(method: str, scale: str, val: list[float], held: float, seed: int = 0) -> dict:
    return {
        "method": method, "scale": scale, "seed": seed, "steps": 20,
        "val_loss": dict(zip(DOMAINS, val)), "heldout_loss": {"email": held},
        "wall_time_s": 12.0, "search_time_s": None,
        "weights": [0.5, 0.3, 0.2], "weights_history": [[0, [1 / 3] * 3], [10, [0.5, 0.3, 0.2]]],
        "curves": [{"step": 10, "val_loss": {d: v + 1 for d, v in zip(DOMAINS, val)}},
                   {"step": 20, "val_loss": dict(zip(DOMAINS, val))}],
    }


def results() -> dict:
    return {"run_id": "t", "domains": DOMAINS, "heldout": ["email"], "runs": [
        _run("uniform", "nano", [3.0, 4.0, 5.0], 6.0),
        _run("dograph", "nano", [3.2, 3.9, 4.4], 5.5, seed=0),
        _run("dograph", "nano", [3.0, 4.1, 4.6], 5.7, seed=1),
        _run("uniform", "micro", [2.5, 3.5, 4.5], 5.0),
    ]}


def test_rows_average_seeds_and_find_the_worst_domain():
    from dograph_core.report import comparison_rows

    rows = {(r["method"], r["scale"]): r for r in comparison_rows(results())}
    d = rows[("dograph", "nano")]
    assert d["seeds"] == 2
    assert d["val_mean"] == pytest.approx(((3.2 + 3.9 + 4.4) / 3 + (3.0 + 4.1 + 4.6) / 3) / 2)
    assert d["val_worst"] == pytest.approx(4.5) and d["worst_domain"] == "math"
    assert d["heldout"] == pytest.approx(5.6)
    assert rows[("uniform", "nano")]["val_worst"] == 5.0


def test_markdown_marks_the_best_per_scale(tmp_path):
    from dograph_core.report import write_report

    res = results()
    res["runs"][1]["plots"] = [str(tmp_path / "train" / "dograph" / "plots" / "graph.png")]
    path = write_report(res, tmp_path)
    text = path.read_text()
    assert "- dograph@nano: [graph](train/dograph/plots/graph.png)" in text  # the method's own figures
    rows = [ln.split("|") for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[2].strip() in ("nano", "micro")]
    lines = {f"{r[1].strip()}@{r[2].strip()}": "|".join(r) for r in rows}
    assert "**3.867**" in lines["dograph@nano"]          # best mean at nano (uniform: 4.000)
    assert "**4.500** ± 0.141 (math)" in lines["dograph@nano"]   # best worst-domain loss at nano, sd over seeds
    assert "**5.600**" in lines["dograph@nano"]          # best held-out at nano
    assert "**" not in lines["uniform@nano"]
    assert lines["uniform@micro"].count("**") == 6       # alone at its scale: best of all three
    for png in ("comparison.png", "weights.png", "loss_curves.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{png}" in text
    assert json.loads((tmp_path / "results.json").read_text())["run_id"] == "t"


def test_paired_differences_by_seed_against_uniform_the_best_baseline_and_an_ablations_parent(tmp_path):
    from scipy.stats import sem, ttest_rel
    from scipy.stats import t as student_t

    from dograph_core.report import write_report

    uni = [[3.0, 4.0, 5.0], [3.1, 4.2, 5.3], [2.9, 3.9, 4.8]]
    odm = [[3.0, 4.0, 4.9], [3.1, 4.1, 5.1], [2.9, 3.9, 4.7]]  # the best baseline: lowest worst-domain loss
    nat = [[3.0, 4.0, 5.2], [3.1, 4.2, 5.4], [2.9, 3.9, 5.0]]
    dg = [[3.0, 4.0, 4.6], [3.1, 4.1, 5.0], [2.9, 3.9, 4.4]]
    off = [[3.0, 4.0, 4.5], [3.1, 4.1, 4.5], [2.9, 3.9, 4.5]]  # an ablation of "mine": better than every baseline
    runs = [_run(m, "nano", v, 6.0 - 0.1 * i, seed=i) for m, vals in
            (("uniform", uni), ("odm", odm), ("natural", nat), ("mine", dg), ("mine_off", off))
            for i, v in enumerate(vals)]
    runs.append(_run("mine", "micro", [1.0, 1.0, 1.0], 2.0))  # one seed, no uniform: nothing to pair
    runs.append({**_run("uniform_2x", "nano", [2.0, 3.0, 4.0], 5.0), "role": "yardstick"})
    res = {"run_id": "p", "domains": DOMAINS, "heldout": ["email"], "runs": runs,
           "params": {"methods": {"mine": {"type": "dograph"}, "mine_off": {"type": "dograph"}, "odm": {"type": "odm"}},
                      "pipeline": {"parents": {"mine_off": "mine"}}}}
    text = write_report(res, tmp_path).read_text()
    study = json.loads((tmp_path / "results.json").read_text())["study"]
    nano = study["nano"]
    assert nano["best_baseline"] == "odm"  # neither DoGraph, nor the ablation, nor the yardstick competes
    refs = {m: {k for k in d if k in ("uniform", "best", "parent")} for m, d in nano["diffs"].items()}
    assert refs == {"uniform": {"best"}, "odm": {"uniform"}, "natural": {"uniform", "best"},
                    "mine": {"uniform", "best"}, "mine_off": {"uniform", "best", "parent"}}
    d = nano["diffs"]["mine"]["best"]["val_worst"]
    a, b = [v[2] for v in dg], [v[2] for v in odm]
    diffs = [x - y for x, y in zip(a, b)]
    assert d["diffs"] == pytest.approx(diffs)
    assert d["p"] == pytest.approx(ttest_rel(a, b).pvalue)
    assert d["ci"] == pytest.approx(student_t.interval(0.95, 2, loc=sum(diffs) / 3, scale=sem(diffs)))
    assert nano["diffs"]["mine"]["uniform"]["heldout"]["mean"] == pytest.approx(0.0)  # same held-out loss per seed
    parent = nano["diffs"]["mine_off"]["parent"]["val_worst"]
    assert parent["diffs"] == pytest.approx([x[2] - y[2] for x, y in zip(off, dg)])
    # the yardstick: uniform at 2x tokens is a reference, not a row of the comparison
    assert nano["yardstick"]["delta"]["val_worst"] == pytest.approx(4.0 - (5.0 + 5.3 + 4.8) / 3)
    assert "uniform_2x" not in nano["rows"] and "| uniform_2x |" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| mine | best (odm) |"))
    lo, hi = d["ci"]
    assert f"{d['mean']:+.3f} ± {d['std']:.3f} [{lo:+.3f}, {hi:+.3f}]" in line
    assert "| mine_off | parent (mine) |" in text


def test_report_refuses_results_without_runs_or_losses(tmp_path):
    from dograph_core.report import ReportError, write_report

    with pytest.raises(ReportError, match="no runs"):
        write_report({"runs": []}, tmp_path)
    bad = results()
    bad["runs"][0]["val_loss"] = {}
    with pytest.raises(ReportError, match="uniform@nano"):
        write_report(bad, tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_mlflow_tracker_logs_nested_runs_to_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    from dograph_core.tracking import Tracker
    from tasks.tracking import MLflowTracker, tracker_for

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent = MLflowTracker(uri, "exp", run_name="pipeline", tags={"pipeline_run": "x"})
    child = tracker_for(parent.spec(), "uniform@nano", {"method": "uniform", "scale": "nano"})
    assert isinstance(child, Tracker) and child.ok
    child.log_params({"train": {"lr": 0.001, "steps": 5}, "tracking": {"uri": "http://me:hunter2@host"}})
    for s in range(1, 4):
        child.log_metrics({"loss": 1.0 / s, "val_loss/code": 2.0, "bad": float("nan")}, step=s)
    f = tmp_path / "weights.json"
    f.write_text("{}")
    child.log_artifact(f, "weights")
    child.end()
    parent.end()
    c = MlflowClient(uri)
    run = c.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["method"] == "uniform"
    assert run.data.params["train.lr"] == "0.001"
    assert "hunter2" not in run.data.params["tracking.uri"]
    assert [m.value for m in c.get_metric_history(child.run_id, "loss")] == pytest.approx([1, 0.5, 1 / 3])
    assert "bad" not in run.data.metrics
    assert [a.path for a in c.list_artifacts(child.run_id, "weights")] == ["weights/weights.json"]
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the database, not in the working directory


def test_tracking_server_down_warns_and_training_goes_on():
    from tasks.tracking import MLflowTracker, TrackingWarning

    with pytest.warns(TrackingWarning, match="127.0.0.1:9.*training goes on"):
        t = MLflowTracker("http://127.0.0.1:9", "exp", run_name="r")
    assert not t.ok and "MlflowException" in t.error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls are dropped quietly, never raised
        t.log_metrics({"loss": 1.0}, step=1)
        t.log_params({"a": 1})
        t.end()
    assert t.dropped == 2


def test_done_markers_follow_the_inputs(tmp_path):
    from tasks.cache import is_done, mark_done, stable_hash

    out = tmp_path / "unit"
    key = stable_hash({"b": 1, "a": [1, 2]})
    assert key == stable_hash({"a": [1, 2], "b": 1})
    assert not is_done(out, key)
    out.mkdir()
    mark_done(out, key)
    assert is_done(out, key) and not is_done(out, stable_hash({"a": [1, 2], "b": 2}))
    (out.parent / "unit.done.json").write_text("{broken")
    assert not is_done(out, key)


def test_run_lock_refuses_a_second_holder(tmp_path):
    import subprocess
    import sys

    from tasks.cache import RunLock, RunLockedError

    with RunLock(tmp_path):
        code = ("import sys; sys.path.insert(0, %r); from tasks.cache import RunLock\n"
                "try:\n    RunLock(%r).__enter__()\nexcept Exception as e:\n    print(type(e).__name__, e)") % (
            str(Path(__file__).resolve().parent.parent), str(tmp_path))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert "RunLockedError" in out and f"pid {os.getpid()}" in out
    with RunLock(tmp_path):  # released
        pass
    del RunLockedError
