"""The comparison driver (bench/compare*.py): its plan, resumability, transfer, tables, GPU import path."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402
from compare_plan import best_baseline, is_done, method_mixer, plan, run_unit  # noqa: E402
from compare_presets import PRESETS, Preset, tiny  # noqa: E402
from compare_tables import aggregate, collect, markdown  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    return compare.load_setup(str(ROOT / "params.yaml"))


def _summary(d: Path, worst: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"val_loss_worst": worst}))


def test_cpu_plan_every_method_three_seeds_offline_searched_once(tmp_path, setup):
    methods, base = setup
    units, unresolved = plan(PRESETS["cpu"], methods, base, tmp_path)
    keys = {u.key for u in units}
    for m in ("uniform", "natural", "doremi", "doge", "odm", "dograph_human", "dograph_model"):
        assert {f"nano/{m}/s{s}" for s in (0, 1, 2)} <= keys
    assert {"search/doremi", "search/doge"} <= keys
    assert unresolved == 1  # micro's best baseline waits for the nano baselines
    by = {u.key: u for u in units}
    assert by["nano/doremi/s1"].mixer == {"type": "static", "path": str(tmp_path / "search/doremi/weights.json")}
    assert by["nano/doremi/s1"].needs == ["search/doremi"]
    assert by["search/doremi"].kind == "search_doremi" and by["search/doge"].kind == "search_train"
    main = [u for u in units if u.role == "main"]
    assert len({u.train["steps"] for u in main}) == 1  # equal budget at every scale
    assert by["nano/uniform_2x/s0"].train["steps"] == 2 * main[0].train["steps"]
    assert {u.key for u in units if u.scale == "micro" and u.role == "main"} == {
        f"micro/{m}/s{s}" for m in ("uniform", "natural", "dograph_human", "dograph_model") for s in (0, 1, 2)}
    assert all(u.train["dtype"] == "auto" for u in main)  # bf16 on CUDA, fp32 on CPUs


def test_long_plan_searches_at_the_same_budget_it_trains(tmp_path, setup):
    methods, base = setup
    units, unresolved = plan(PRESETS["long"], methods, base, tmp_path)
    by = {u.key: u for u in units}
    assert unresolved == 0 and {u.scale for u in units} == {"nano"}
    assert {by[f"nano/{m}/s2"].train["steps"] for m in ("uniform", "doge", "dograph_model")} == {1000}
    assert by["search/doremi"].train["steps"] == by["search/doge"].train["steps"] == 1000
    assert by["nano/uniform_2x/s0"].train["steps"] == 2000


def test_best_baseline_resolves_from_nano_worst_domain_loss(tmp_path, setup):
    methods, base = setup
    p = PRESETS["cpu"]
    for m, w in (("doremi", 5.2), ("doge", 5.0), ("odm", 5.1)):
        for s in p.seeds["nano"]:
            _summary(tmp_path / "nano" / m / f"s{s}", w + 0.01 * s)
    assert best_baseline(tmp_path, p, "nano") == "doge"
    units, unresolved = plan(p, methods, base, tmp_path)
    assert unresolved == 0
    by = {u.key: u for u in units}
    assert by["micro/doge/s2"].mixer["type"] == "static" and by["micro/doge/s2"].needs == ["search/doge"]


def test_best_baseline_waits_for_every_seed(tmp_path):
    p = PRESETS["cpu"]
    for m in ("doremi", "doge", "odm"):
        _summary(tmp_path / "nano" / m / "s0", 5.0)
    assert best_baseline(tmp_path, p, "nano") is None


def test_unknown_method_names_the_method_and_where_to_define_it(setup):
    methods, _ = setup
    with pytest.raises(ValueError, match="'nope'.*methods"):
        method_mixer(methods, PRESETS["cpu"], "nope")


class _FakeProc:
    """Stands in for a unit's process: writes the unit's 'finished' marker at once."""

    launched: list[str] = []

    def __init__(self, cmd, **kw):
        spec = json.loads(Path(cmd[cmd.index("--run-unit") + 1]).read_text())
        work = Path(cmd[cmd.index("--work") + 1])
        _FakeProc.launched.append(spec["key"])
        d = work / spec["key"]
        d.mkdir(parents=True, exist_ok=True)
        (d / ("search_cost.json" if spec["key"].startswith("search/") else "summary.json")).write_text("{}")
        self.pid = 10**7 + len(_FakeProc.launched)

    def poll(self):
        return 0


def _small_preset() -> Preset:
    return Preset(name="t", scales={"nano": ["uniform", "doremi"]}, seeds={"nano": [0, 1]}, steps=3,
                  train={"threads": 1}, yardstick_seeds={"nano": [0]}, workers=2)


def test_schedule_runs_searches_first_then_skips_everything_on_a_rerun(tmp_path, setup, monkeypatch):
    methods, base = setup
    monkeypatch.setattr(compare.subprocess, "Popen", _FakeProc)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    _FakeProc.launched = []
    compare.schedule(_small_preset(), methods, base, tmp_path, "data", 2, None, echo=lambda *a: None)
    assert _FakeProc.launched[0] == "search/doremi"
    assert set(_FakeProc.launched) == {"search/doremi", "nano/uniform/s0", "nano/uniform/s1", "nano/doremi/s0",
                                       "nano/doremi/s1", "nano/uniform_2x/s0"}
    _FakeProc.launched = []
    compare.schedule(_small_preset(), methods, base, tmp_path, "data", 2, None, echo=lambda *a: None)
    assert _FakeProc.launched == []  # resumable: a finished run (summary.json) is skipped


def test_schedule_stops_dependents_of_a_failed_search(tmp_path, setup, monkeypatch):
    methods, base = setup

    class Failing(_FakeProc):
        def __init__(self, cmd, **kw):
            spec = json.loads(Path(cmd[cmd.index("--run-unit") + 1]).read_text())
            if spec["key"] == "search/doremi":
                _FakeProc.launched.append(spec["key"])
                self.pid = 1
                self._rc = 3
                return
            super().__init__(cmd, **kw)
            self._rc = 0

        def poll(self):
            return self._rc

    monkeypatch.setattr(compare.subprocess, "Popen", Failing)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    _FakeProc.launched = []
    msgs = []
    compare.schedule(_small_preset(), methods, base, tmp_path, "data", 1, None, echo=msgs.append)
    assert not any(k.startswith("nano/doremi") for k in _FakeProc.launched)
    assert is_done(tmp_path, "nano/uniform/s1")
    assert any("FAILED search/doremi" in m for m in msgs)


def test_a_unit_running_in_another_driver_is_not_started_twice(tmp_path, setup, monkeypatch):
    methods, base = setup
    p = Preset(name="t", scales={"nano": ["uniform"]}, seeds={"nano": [0]}, steps=3, train={})
    (tmp_path / "locks").mkdir(parents=True)
    (tmp_path / "locks" / "nano__uniform__s0.pid").write_text(str(subprocess.os.getpid()))  # alive
    calls = []
    monkeypatch.setattr(compare.subprocess, "Popen", _FakeProc)

    def sleep(s):
        calls.append(s)
        _summary(tmp_path / "nano/uniform/s0", 5.0)  # the other driver finishes it

    monkeypatch.setattr(compare.time, "sleep", sleep)
    _FakeProc.launched = []
    compare.schedule(p, methods, base, tmp_path, "data", 2, None, echo=lambda *a: None)
    assert _FakeProc.launched == [] and calls


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from _engine_fixture import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_search_then_static_transfer_then_tables_on_a_real_tiny_run(tmp_path, corpus, setup):
    import torch

    torch.set_num_threads(1)
    methods, base = setup
    p = Preset(name="t", scales={"nano": ["uniform", "doremi"]}, seeds={"nano": [0]}, steps=3,
               train={"seq_len": 32, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_windows": 2,
                      "progress": False, "device": "cpu", "threads": 1},
               search_steps=2, yardstick_seeds={"nano": [0]})
    units, _ = plan(p, methods, base, tmp_path)
    by = {u.key: u for u in units}
    run_unit(by["search/doremi"], str(corpus), tmp_path)
    cost = json.loads((tmp_path / "search/doremi/search_cost.json").read_text())
    assert cost["runs"] == ["round1/reference", "round1/proxy"] and cost["wall_time_s"] > 0
    for key in ("nano/uniform/s0", "nano/doremi/s0", "nano/uniform_2x/s0"):
        run_unit(by[key], str(corpus), tmp_path)
        assert is_done(tmp_path, key)
    recs = collect(tmp_path, units, compare.search_cost)
    assert {r["method"] for r in recs} == {"uniform", "doremi", "uniform_2x"}
    dor = next(r for r in recs if r["method"] == "doremi")
    w = json.loads((tmp_path / "search/doremi/weights.json").read_text())["weights"]
    assert dor["weights"] == pytest.approx(w)  # the searched mixture, transferred unchanged
    assert dor["search_time_s"] == pytest.approx(cost["wall_time_s"])
    assert [c["step"] for c in dor["curves"]] == [2, 3]
    text = markdown(aggregate(recs))
    assert "| doremi | 1 |" in text and "uniform_2x" not in text.split("paired")[0].split("|---|")[1]


def _rec(method, seed, mean, worst, held, curve=None, role="main"):
    return {"method": method, "scale": "nano", "seed": seed, "role": role, "val_mean": mean, "val_worst": worst,
            "heldout": held, "last_word": 0.1, "wall_time_s": 10.0, "train_time_s": 8.0 if method != "dograph_human" else 12.0,
            "search_time_s": math.nan, "curves": curve or [{"step": 100, "val_mean": mean}]}


def test_aggregate_by_hand():
    recs = [
        _rec("uniform", 0, 5.00, 5.50, 6.00), _rec("uniform", 1, 5.02, 5.52, 6.02),
        _rec("natural", 0, 5.01, 5.40, 6.10), _rec("natural", 1, 5.03, 5.44, 6.08),
        _rec("dograph_human", 0, 5.00, 5.30, 5.90, [{"step": 50, "val_mean": 5.2}, {"step": 100, "val_mean": 4.9}]),
        _rec("dograph_human", 1, 5.02, 5.34, 5.94, [{"step": 50, "val_mean": 5.2}, {"step": 100, "val_mean": 4.9}]),
        _rec("uniform_2x", 0, 4.60, 5.10, 5.61, role="yardstick"),
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


def test_second_scale_is_also_compared_with_the_first_scales_best_and_overhead_is_a_median_ratio():
    def at(scale, *a, **k):
        return {**_rec(*a, **k), "scale": scale}

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
    assert "nano's best (odm)" in markdown(agg)


def test_dry_tiny_keeps_the_plan_and_the_gpu_solver_choice():
    t = tiny(PRESETS["gpu"])
    assert list(t.scales) == ["nano", "micro"] and t.steps == 6 and t.train["device"] == "cpu"
    assert t.method_overrides["dograph_human"]["solver"] == "numpy"


def test_gpu_import_path_needs_no_pyomo_prefect_mlflow_or_datasets():
    code = (
        "import sys; sys.path.insert(0, 'bench'); import compare, compare_plan, compare_tables; "
        "import dograph_core.train, dograph_core.mixers.dograph, dograph_core.mixers.doremi, dograph_core.mixers.doge, "
        "dograph_core.mixers.odm, dograph_core.mixers.simple, dograph_core.analysis, dograph_core.report; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'pyomo', 'prefect', 'mlflow', 'datasets', 'dvc'}); "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ablation_takes_a_budget_preset_and_a_subset_of_variants():
    import ablate

    p = ablate.ablation_preset([0, 1], False, "long", ["dograph_model_loss"])
    assert p.steps == 1000 and p.scales == {"nano": [*ablate.DEFAULTS, "dograph_model_loss"]}
    assert p.seeds == {"nano": [0, 1]} and not p.yardstick_seeds
    assert len(ablate.ablation_preset([0], False).scales["nano"]) == len(ablate.DEFAULTS) + len(ablate.VARIANTS)
    with pytest.raises(SystemExit, match="unknown variants"):
        ablate.ablation_preset([0], False, "cpu", ["dograph_model_k5"])
    # a variant built on a variant has its parent's settings plus its own change
    m = ablate.ablation_methods({"dograph_human": {"type": "dograph", "nodes": "human"},
                                 "dograph_model": {"type": "dograph", "nodes": "model"}}, p)
    assert m["dograph_model_prior_uniform"] == {"type": "dograph", "nodes": "model", "apply": "loss", "rho": 1.0,
                                                "prior": "uniform"}
    assert m["dograph_human_F2"] == {"type": "dograph", "nodes": "human", "rho": 1.0, "objective": "F2"}


def test_narrow_gives_more_seeds_to_a_subset_of_methods_and_names_bad_input():
    errors = []

    def error(msg):
        errors.append(msg)
        raise SystemExit(2)

    p = compare.narrow(PRESETS["long"], "0,1,2,3,4", "uniform,odm,dograph_human", error)
    assert p.scales == {"nano": ["uniform", "odm", "dograph_human"]} and p.seeds == {"nano": [0, 1, 2, 3, 4]}
    assert p.yardstick_seeds == PRESETS["long"].yardstick_seeds
    for seeds, methods, match in (("0,x", None, "comma-separated integers"), (None, "uniform,dograph", "dograph")):
        with pytest.raises(SystemExit):
            compare.narrow(PRESETS["long"], seeds, methods, error)
        assert match in errors[-1]
