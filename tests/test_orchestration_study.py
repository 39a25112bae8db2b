"""The study is the flow: per-scale methods, the best baseline carried to a later scale, the compute
yardstick, ablations against their parents, the published report, and a re-run that trains nothing.

One tiny study on the local corpus (nano and micro, 2 seeds, a few steps) is shared by the tests here.
"""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from _orch_fixture import ROOT, nano_overrides, write_local_corpus

PARAMS = str(ROOT / "params.yaml")
TINY_DOGRAPH = "{type: dograph, nodes: human, update_every: 2, r1: 4, r2: 4}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("study")
    corpus = write_local_corpus(tmp / "corpus")
    ov = nano_overrides(tmp, corpus, methods="[uniform,odm,doge,dograph_human,dograph_human_off]") + [
        f"methods.dograph_human={TINY_DOGRAPH}",
        f"methods.dograph_human_off={TINY_DOGRAPH[:-1]}, graph: 'off'}}",
        "pipeline.parents={dograph_human_off: dograph_human}",
        "pipeline.target_scales=[nano,micro]", "pipeline.scale_methods={micro: [uniform, '@best']}",
        "pipeline.seeds=[0,1]", "pipeline.yardstick_seeds=[0]", "pipeline.reorder_seeds=[1]", "pipeline.max_parallel=2",
    ]
    res = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False, publish=str(tmp / "published"))
    return {"tmp": tmp, "ov": ov, "res": res}


def test_the_study_trains_each_scales_methods_the_best_baseline_and_the_yardstick(study):
    res = study["res"]
    run_dir = Path(res["run_dir"])
    assert res["failed"] == []
    rows = {(r["method"], r["scale"]) for r in res["rows"]}
    results = json.loads((run_dir / "results.json").read_text())
    nano, micro = results["study"]["nano"], results["study"]["micro"]
    # @best: the nano baseline (not uniform, natural, DoGraph or an ablation) with the lowest worst-domain loss
    worst = {m: nano["rows"][m]["val_worst"]["mean"] for m in ("odm", "doge")}
    expected = min(worst, key=lambda m: (worst[m], m))
    assert rows == {(m, "nano") for m in ("uniform", "odm", "doge", "dograph_human", "dograph_human_off")} | {
        ("uniform", "micro"), (expected, "micro")}
    assert micro["first_scale_best"] == expected  # the report compares micro with what @best trained there
    # the yardstick: uniform at twice the steps, one seed per scale, a reference and not a row
    for scale in ("nano", "micro"):
        summary = json.loads((run_dir / "train" / f"uniform_2x__{scale}__s0" / "summary.json").read_text())
        assert summary["steps"] == 12
        assert results["study"][scale]["yardstick"]["seeds"] == [0]
    assert math.isfinite(nano["diffs"]["dograph_human"]["gain_fraction"]["val_worst"])
    # the data-order noise: uniform again at seed 1 with data_seed 1001, paired with uniform at seed 1
    for scale in ("nano", "micro"):
        unit = run_dir / "train" / f"uniform_reorder__{scale}__s1"
        ck = sorted((unit / "checkpoints").glob("*.pt"))[-1]
        assert torch.load(ck, weights_only=True)["sampler"]["seed"] == 1001
        noise = results["study"][scale]["data_order"]["val_mean"]
        assert noise["seeds"] == [1] and noise["rms"] > 0        # another data order: another loss
        assert "uniform_reorder" not in results["study"][scale]["rows"]
    # the ablation is compared with its parent, paired by seed
    parent = nano["diffs"]["dograph_human_off"]["parent"]["val_worst"]
    assert parent["seeds"] == [0, 1] and len(parent["diffs"]) == 2
    report = Path(res["report"]).read_text()
    assert "| dograph_human_off | parent (dograph_human) |" in report
    assert "**Data-order noise** (uniform again with another data order, seeds [1]" in report
    assert f"Carried to the later scales as `@best` (the same, uniform and natural left out): **{expected}**" in report
    assert ("nano's carried best" in report) == (expected != micro["best_baseline"])


def test_the_published_report_stands_alone(study):
    pub = study["tmp"] / "published"
    text = (pub / "report.md").read_text()
    assert "## The evidence, per scale" in text and "Method diagnostics" in text
    links = [ln.split("](")[1].split(")")[0] for ln in text.splitlines() if "](" in ln]
    for link in links:  # every link points inside the published directory
        assert (pub / link).is_file() and (pub / link).resolve().is_relative_to(pub.resolve()), link
    assert "plots/dograph_human__nano/pca_by_source.png" in links and "plots/figure1.png" in links
    runs = json.loads((pub / "results.json").read_text())["runs"]
    assert {r["dir"] for r in runs} >= {"train/uniform__nano__s0", "train/uniform_2x__micro__s0"}  # no local paths
    with tarfile.open(pub / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "train/dograph_human__nano__s0/mixer/dograph_log.jsonl" in names
    assert "search/doge/weights.json" in names and "train/uniform__micro__s1/metrics.jsonl" in names


def test_report_rewrites_the_study_in_the_params_scale_order(study, capsys):
    from flows.cli import main

    run_dir = Path(study["res"]["run_dir"])
    (run_dir / "report.md").unlink()
    sets = [x for o in study["ov"] for x in ("--set", o)]
    assert main(["report", "--run-dir", str(run_dir), "--params", PARAMS, "--preset", "nano", *sets]) == 0
    heads = [ln for ln in (run_dir / "report.md").read_text().splitlines() if ln.startswith("### ")]
    assert heads[0].startswith("### nano") and any(h.startswith("### micro") for h in heads)  # not sorted by name
    assert "| dograph_human_off | parent (dograph_human) |" in (run_dir / "report.md").read_text()


def test_a_rerun_of_the_study_trains_nothing(study):
    from flows.pipeline import pipeline

    again = pipeline(params=PARAMS, preset="nano", overrides=study["ov"], track=False)
    assert again["run_id"] == study["res"]["run_id"] and again["failed"] == []
    assert again["cached"] == 2 * 5 + 2 * 2 + 2 + 2  # every training of both scales, both yardsticks and reorders


def test_study_settings_are_checked_at_config_time(tmp_path):
    from dograph_core.config import ConfigError, load_params
    from tasks.params import check_params

    for bad, match in (
        (["pipeline.scale_methods={nano: [uniform, '@best']}"], "'@best' is the best baseline of the first target scale"),
        (["pipeline.methods=[uniform, odm, '@best']"], "'@best' is the best baseline of the first target scale"),
        (["pipeline.seeds=[0, 1, 0]"], r"seeds lists \['0'\] more than once"),
        (["pipeline.parents={odm: odm}"], "name themselves"),
        (["pipeline.search_train={bach_size: 3}"], r"pipeline.search_train: bach_size = 3: Extra inputs"),
        (["pipeline.search_train={steps: 3}"], "search_train sets \\['steps'\\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_params(PARAMS, None, bad)
    with pytest.raises(ConfigError, match="needs a baseline at nano to carry"):
        check_params(load_params(PARAMS, None, ["pipeline.methods=[uniform, natural, dograph_human]",
                                                "pipeline.target_scales=[nano, micro]",
                                                "pipeline.scale_methods={micro: [uniform, '@best']}"]))
    with pytest.raises(ConfigError, match=r"not defined under 'methods'"):
        load_params(PARAMS, None, ["pipeline.parents={dograph_human: dograph_humane}"])
    with pytest.raises(ConfigError, match="reserved for the compute yardstick"):
        load_params(PARAMS, None, ["methods.uniform_2x={type: uniform}"])
    with pytest.raises(ConfigError, match=r"reserved for the data-order noise \(pipeline.reorder_seeds\)"):
        load_params(PARAMS, None, ["methods.uniform_reorder={type: uniform}"])
    with pytest.raises(ConfigError, match=r"reorder_seeds \[3\] are not in seeds \[0, 1\]"):
        load_params(PARAMS, None, ["pipeline.seeds=[0, 1]", "pipeline.reorder_seeds=[1, 3]"])
    with pytest.raises(ConfigError, match=r"uniform, which is not trained at \['micro'\]"):
        load_params(PARAMS, None, ["pipeline.reorder_seeds=[0]", "pipeline.target_scales=[nano, micro]",
                                   "pipeline.scale_methods={micro: [odm]}"])
    with pytest.raises(ConfigError, match=r"pipeline.scale_methods.mikro = 'mikro': unknown scale"):
        check_params(load_params(PARAMS, None, ["pipeline.scale_methods={mikro: [uniform]}"]))
    # the presets the README quotes load and name only defined methods
    for preset in ("cpu", "long", "ablation", "gpu-check"):
        check_params(load_params(PARAMS, preset))
    assert load_params(PARAMS, "cpu").pipeline.methods_at("micro") == ["uniform", "dograph_human", "dograph_model",
                                                                       "@best", "natural"]
