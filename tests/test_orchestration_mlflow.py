"""MLflow that a user can compare in, against a real tracking server on 127.0.0.1 (nano preset, 6 steps).

One study, run three times with the same params: interrupted at step 5 (checkpoints every 2 steps),
resumed, then run again with everything finished. Then one training under torchrun (2 CPU processes).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _orch_fixture import ROOT, nano_overrides, write_local_corpus
from test_orchestration_services import mlflow_server

pytestmark = pytest.mark.slow
PARAMS = str(ROOT / "params.yaml")
DOMAINS = ("code", "notes", "prose")
TRAININGS = ("uniform@nano", "odm@nano", "doge@nano")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def _children(client, parent_id: str) -> dict:
    exp = client.get_experiment_by_name("dograph").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def _parent(client, run_id: str, before: set[str]):
    exp = client.get_experiment_by_name("dograph").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.pipeline_run = '{run_id}'")
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_id not in before)


@pytest.fixture(scope="module")
def study(server, tmp_path_factory):
    """Interrupted at step 5 (DoGE's 4-step search finishes), resumed, then re-run with every unit finished."""
    import dograph_core.train as engine
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("study")
    corpus = write_local_corpus(tmp / "corpus")
    ov = nano_overrides(tmp, corpus, "[uniform,odm,doge]", server) + ["train.ckpt_every=2"]
    real = engine.micro_step

    def crash_at_5(fwd, model, mixer, x, dom, step, *a, **k):
        if step == 5:
            raise OSError("simulated crash at step 5")
        return real(fwd, model, mixer, x, dom, step, *a, **k)

    engine.micro_step = crash_at_5
    try:
        with pytest.raises(Exception, match="simulated crash"):
            pipeline(params=PARAMS, preset="nano", overrides=ov, run_id="study")
    finally:
        engine.micro_step = real
    client = MlflowClient(server)
    first = _parent(client, "study", set())
    runs1 = _children(client, first.info.run_id)
    resumed = pipeline(params=PARAMS, preset="nano", overrides=ov, run_id="study")
    second = _parent(client, "study", {first.info.run_id})
    cached = pipeline(params=PARAMS, preset="nano", overrides=ov, run_id="study")
    third = _parent(client, "study", {first.info.run_id, second.info.run_id})
    return {"client": client, "server": server, "tmp": tmp, "runs1": runs1, "resumed": resumed, "cached": cached,
            "parents": (first, second, third)}


def test_a_resumed_training_continues_its_run(study):
    client, (first, second, _) = study["client"], study["parents"]
    assert set(study["runs1"]) == {"uniform@nano", "odm@nano", "doge@nano", "doge@nano/search"}
    assert study["resumed"]["tracking_error"] is None and study["resumed"]["cached"] == 0
    exp = client.get_experiment_by_name("dograph").experiment_id
    for name in TRAININGS:
        before = study["runs1"][name]
        same = client.search_runs([exp], filter_string=f"attributes.run_name = '{name}'")
        same = [r for r in same if r.data.tags.get("dograph.cached") != "true"]
        assert [r.info.run_id for r in same] == [before.info.run_id], f"{name}: a second run was opened"
        run = same[0]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == second.info.run_id  # the pipeline run that finished it
        assert run.data.tags["dograph.previous_parent_run_id"] == first.info.run_id
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps  # the whole curve, once
        unit = Path(study["tmp"]) / "runs" / "study" / "train" / f"{name.split('@')[0]}__nano__s0"
        assert (unit / "mlflow_run.json").exists()


def test_a_unit_skipped_as_finished_is_linked_to_the_new_pipeline_run(study):
    client, (_, second, third) = study["client"], study["parents"]
    assert study["cached"]["cached"] == 3
    trained = _children(client, second.info.run_id)
    links = _children(client, third.info.run_id)
    assert set(links) == {"uniform@nano", "odm@nano", "doge@nano", "doge@nano/search"}
    search = study["runs1"]["doge@nano/search"].info.run_id  # finished in the interrupted run, skipped since
    assert trained["doge@nano/search"].data.tags["dograph.original_run_id"] == search
    assert links["doge@nano/search"].data.tags["dograph.original_run_id"] == search
    for name in TRAININGS:
        link = links[name]
        assert link.data.tags["dograph.cached"] == "true"
        assert link.data.tags["dograph.original_run_id"] == trained[name].info.run_id
        assert link.data.params["method.type"] == name.split("@")[0]
        assert len(client.get_metric_history(link.info.run_id, "loss")) == 6
        assert link.data.metrics["val_loss_mean"] == pytest.approx(trained[name].data.metrics["val_loss_mean"])


def test_per_domain_losses_and_weights_over_time_in_every_pipeline_run(study):
    client, parents = study["client"], study["parents"]
    for parent in parents[1:]:
        kids = _children(client, parent.info.run_id)
        for run in (kids[n] for n in TRAININGS):
            for d in DOMAINS:
                assert len(client.get_metric_history(run.info.run_id, f"weight/{d}")) == 6
                assert len(client.get_metric_history(run.info.run_id, f"val_loss/{d}")) >= 2  # step 3 and final
        odm = [m.value for m in client.get_metric_history(kids["odm@nano"].info.run_id, "weight/code")]
        assert len(set(odm)) > 1  # ODM's weights move; uniform's do not
        assert len({m.value for m in client.get_metric_history(kids["uniform@nano"].info.run_id, "weight/code")}) == 1


def test_the_experiment_opens_as_model_training_with_dataset_source_and_model(study, tmp_path):
    import mlflow.artifacts
    import mlflow.transformers

    client, (_, second, _) = study["client"], study["parents"]
    exp = client.get_experiment_by_name("dograph")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = _children(client, second.info.run_id)["odm@nano"]
    assert run.data.tags["mlflow.source.name"] == "dograph" and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    # Dataset: the tokenized corpus, its digest the pipeline's data_version
    (ds,) = [i for i in run.inputs.dataset_inputs]
    dv = run.data.tags["data_version"]
    assert ds.dataset.digest == dv and ds.dataset.name == f"corpus-{dv}"
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert "domain" in ds.dataset.schema and "tokens_train" in ds.dataset.schema
    (pds,) = client.get_run(second.info.run_id).inputs.dataset_inputs  # the pipeline run's row too
    assert pds.dataset.digest == dv
    # Model: the transformers flavor, a LoggedModel of this run
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].name == "model"
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(study["server"]):
        pipe = mlflow.transformers.load_model(f"models:/{models[0].model_id}")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{models[0].model_id}", dst_path=str(tmp_path)))
    assert pipe.task == "text-generation" and pipe.model.config.vocab_size > 256
    out = pipe("def", max_new_tokens=3, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    # its card says what it is (never looked up on the Hub under the local folder's name)
    card = (local / "model_card.md").read_text()
    assert "# odm at nano" in card and f"mean validation loss: {run.data.metrics['val_loss_mean']:.4f}" in card


def test_torchrun_metrics_stream_while_training_and_the_model_is_registered(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    corpus = write_local_corpus(tmp_path / "corpus")
    ov = nano_overrides(tmp_path, corpus, "[uniform]", server) + [
        "pipeline.nproc_per_node=2", "train.device=cpu", "tracking.registered_model=dograph-nano"]
    res = pipeline(params=PARAMS, preset="nano", overrides=ov, run_id="ddp")
    assert res["tracking_error"] is None and res["failed"] == []
    client = MlflowClient(server)
    parent = _parent(client, "ddp", set())
    run = _children(client, parent.info.run_id)["uniform@nano"]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    # streamed: step 1 reached the server before the training wrote its final files (a replay comes after)
    final = Path(tmp_path) / "runs" / "ddp" / "train" / "uniform__nano__s0" / "summary.json"
    first = min(m.timestamp for m in loss if m.step == 1) / 1000
    assert first < os.path.getmtime(final), (first, os.path.getmtime(final))
    assert {"summary.json", "eval.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    versions = client.search_model_versions("name = 'dograph-nano'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
