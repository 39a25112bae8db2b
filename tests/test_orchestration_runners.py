"""Where the runs execute: a local Dask cluster (prefect-dask), and DDP training through torchrun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _orch_fixture import ROOT, nano_overrides, write_local_corpus

pytestmark = pytest.mark.slow
PARAMS = str(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_local_corpus(tmp_path_factory.mktemp("corpus"))


def test_runs_spread_over_a_local_dask_cluster(tmp_path, corpus):
    from flows.pipeline import pipeline

    ov = nano_overrides(tmp_path, corpus, "[uniform,natural]") + ["pipeline.task_runner=dask", "pipeline.max_parallel=2"]
    res = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False)
    assert res["failed"] == [] and {r["method"] for r in res["rows"]} == {"uniform", "natural"}
    for m in ("uniform", "natural"):
        summary = json.loads((Path(res["run_dir"]) / "train" / f"{m}__nano__s0" / "summary.json").read_text())
        assert summary["steps"] == 6


def test_training_under_torchrun_with_two_processes(tmp_path, corpus):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    ov = nano_overrides(tmp_path, corpus, "[uniform]") + ["pipeline.nproc_per_node=2"]
    res = pipeline(params=PARAMS, preset="nano", overrides=ov)
    unit = Path(res["run_dir"]) / "train" / "uniform__nano__s0"
    assert json.loads((unit / "summary.json").read_text())["world_size"] == 2
    assert '"final_loss"' in (unit / "torchrun.log").read_text()  # the ranks' output, kept beside the run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = next(r for r in client.search_runs([client.get_experiment_by_name("dograph").experiment_id])
               if r.info.run_name == "uniform@nano")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6 and "val_loss_mean" in run.data.metrics
