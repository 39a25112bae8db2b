"""The whole flow on a nano preset: local corpus -> prepare -> tokenize -> search -> train -> report.

One pipeline run (uniform + DoGE, so one offline search feeds a static training) is shared by
the tests of this module; it tracks to a SQLite MLflow store under the test's directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _orch_fixture import ROOT, nano_overrides, write_local_corpus

PARAMS = str(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("pipe")
    corpus = write_local_corpus(tmp / "corpus")
    ov = nano_overrides(tmp, corpus, methods="[uniform,doge]")
    res = pipeline(params=PARAMS, preset="nano", overrides=ov)
    return {"tmp": tmp, "ov": ov, "res": res}


def test_pipeline_writes_report_results_and_models(run):
    res = run["res"]
    run_dir = Path(res["run_dir"])
    assert res["failed"] == [] and res["tracking_error"] is None
    assert {(r["method"], r["scale"]) for r in res["rows"]} == {("uniform", "nano"), ("doge", "nano")}
    report = Path(res["report"]).read_text()
    assert "| uniform | nano |" in report and "| doge | nano |" in report
    assert (run_dir / "plots" / "weights.png").stat().st_size > 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["domains"] == ["code", "notes", "prose"] and results["heldout"] == ["letters"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"uniform", "doge"} and metrics["doge"]["nano"]["val_loss_mean"] > 0
    # the offline method searched once at the proxy scale and trained on that mixture as a file
    search = json.loads((run_dir / "search" / "doge" / "weights.json").read_text())
    trained = json.loads((run_dir / "train" / "doge__nano__s0" / "weights.json").read_text())
    assert trained["weights"] == pytest.approx(search["weights"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "train" / "uniform__nano__s0" / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.n_layer == 2
    assert AutoTokenizer.from_pretrained(final)("def f(): pass")["input_ids"]


def test_pipeline_logs_parent_and_nested_runs_to_mlflow(run):
    from mlflow.tracking import MlflowClient

    tmp = run["tmp"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dograph")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.info.run_name for r in kids)
    assert names == ["doge@nano", "doge@nano/search", "uniform@nano"]
    uni = next(r for r in kids if r.info.run_name == "uniform@nano")
    assert uni.data.tags["method"] == "uniform" and uni.data.tags["scale"] == "nano"
    assert len(uni.data.tags["git_commit"]) >= 7 and uni.data.tags["data_version"]
    assert uni.data.params["train.steps"] == "6"
    assert "val_loss_mean" in uni.data.metrics and "weight/code" in uni.data.metrics
    assert len(client.get_metric_history(uni.info.run_id, "loss")) == 6
    arts = {a.path for a in client.list_artifacts(uni.info.run_id)}
    assert {"weights.json", "eval.json", "summary.json"} <= arts
    (model,) = uni.outputs.model_outputs  # the final model: MLflow's transformers flavor, a LoggedModel of the run
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(client.get_logged_model(model.model_id).artifact_location,
                               tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", dst_path=str(tmp / "dl"))
    assert (Path(local) / "MLmodel").exists() and (Path(local) / "model" / "config.json").exists()
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.info.status == "FINISHED"


def test_rerun_skips_finished_work_and_a_busy_run_dir_is_refused(run):
    from flows.pipeline import pipeline
    from tasks.cache import RunLock, RunLockedError

    again = pipeline(params=PARAMS, preset="nano", overrides=run["ov"], track=False)
    assert again["run_id"] == run["res"]["run_id"]
    assert again["cached"] == 2  # both trainings (and the search) reused
    with RunLock(Path(again["run_dir"])):
        with pytest.raises(RunLockedError, match="--run-id"):
            pipeline(params=PARAMS, preset="nano", overrides=run["ov"], track=False)
    # another run id gets its own directory
    other = pipeline(params=PARAMS, preset="nano", overrides=run["ov"] + ["pipeline.methods=[uniform]"], track=False)
    assert other["run_dir"] != again["run_dir"]


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_rerun_resumes(run, monkeypatch):
    import dograph_core.train as engine
    from flows.pipeline import pipeline

    real = engine.train

    def flaky(cfg, corpus, method, *a, **k):
        if method == "natural":
            raise RuntimeError("simulated crash in natural")
        return real(cfg, corpus, method, *a, **k)

    ov = run["ov"] + ["pipeline.methods=[uniform,natural]", "pipeline.max_parallel=2"]
    monkeypatch.setattr(engine, "train", flaky)
    with pytest.raises(RuntimeError) as e:
        pipeline(params=PARAMS, preset="nano", overrides=ov, track=False)
    msg = str(e.value)
    assert "natural@nano seed 0" in msg and "simulated crash" in msg and "run the same command again" in msg
    monkeypatch.setattr(engine, "train", real)
    res = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False)
    assert res["failed"] == [] and res["cached"] == 1  # uniform finished before; only natural trains
    assert {r["method"] for r in res["rows"]} == {"uniform", "natural"}


@pytest.mark.slow
def test_cli_train_resume_evaluate_and_report(run, capsys):
    from flows.cli import main

    common = ["--params", PARAMS, "--preset", "nano", "--quiet"] + [x for o in run["ov"] for x in ("--set", o)]
    out = run["tmp"] / "manual" / "odm"
    assert main(["train", "--method", "odm", "--out", str(out), *common, "--set", "train.ckpt_every=2"]) == 0
    assert (out / "final" / "config.json").exists()
    # training into a finished directory again needs --resume, which finds the final checkpoint
    assert main(["train", "--method", "odm", "--out", str(out), *common]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--method", "odm", "--out", str(out), "--resume", *common]) == 0
    weights = Path(run["res"]["run_dir"]) / "search" / "doge" / "weights.json"
    static = run["tmp"] / "manual" / "doge_static"
    assert main(["train", "--method", "doge", "--weights", str(weights), "--out", str(static), *common]) == 0
    assert json.loads((static / "summary.json").read_text())["mixer"] == "static"
    capsys.readouterr()
    assert main(["evaluate", str(out), *common, "--out", str(run["tmp"] / "ev.json")]) == 0
    shown = capsys.readouterr().out
    assert "code" in shown and "letters" in shown and "(held out)" in shown and "worst" in shown
    assert main(["report", "--run-dir", run["res"]["run_dir"], *common]) == 0
    assert "report:" in capsys.readouterr().out


def test_a_run_cannot_rewrite_data_another_run_reads(tmp_path):
    from flows.pipeline import pipeline
    from tasks.cache import DataLock, RunLockedError

    corpus = write_local_corpus(tmp_path / "corpus")
    ov = nano_overrides(tmp_path, corpus)
    with DataLock(tmp_path / "data" / "prepared", tmp_path / "data" / "tokenized").acquire(exclusive=False):
        with pytest.raises(RunLockedError, match="being read by another pipeline run.*prepare.out_dir"):
            pipeline(params=PARAMS, preset="nano", overrides=ov, track=False)
    assert not (tmp_path / "data" / "prepared").exists()
