"""End to end against real services on 127.0.0.1: an MLflow tracking server, and a Prefect server
with a process worker running the deployment of prefect.yaml. Both on the nano preset, a few steps."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from _orch_fixture import ROOT, VENV_BIN, free_port, nano_overrides, service_env, write_local_corpus

pytestmark = pytest.mark.slow
PARAMS = str(ROOT / "params.yaml")


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy at {url} after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (twice: a Prefect worker ignores the first), then SIGKILL; the whole process group."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """An MLflow tracking server on 127.0.0.1 with its store under ``tmp``; yields its URI, stops it after."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**service_env(tmp), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tmp / "mlflow.log"
    proc = _start([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'srv.db'}",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], tmp, env, log)
    try:
        _wait_healthy(f"{uri}/health", proc, log)
        yield uri
    finally:
        _stop(proc)


def test_pipeline_tracks_to_an_mlflow_server(tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from flows.pipeline import pipeline

    corpus = write_local_corpus(tmp_path / "corpus")
    with mlflow_server(tmp_path) as uri:
        res = pipeline(params=PARAMS, preset="nano", overrides=nano_overrides(tmp_path, corpus, "[uniform,odm]", uri))
        client = MlflowClient(uri)
        exp_id = client.get_experiment_by_name("dograph").experiment_id
        assert res["tracking_error"] is None
        assert res["mlflow_ui"] == f"open {uri}/#/experiments/{exp_id}?workflowType=machine_learning in a browser"
        runs = client.search_runs([client.get_experiment_by_name("dograph").experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(kids) == {"uniform@nano", "odm@nano"}
        odm = kids["odm@nano"]
        assert odm.data.tags["method"] == "odm" and odm.data.params["method.type"] == "odm"
        assert len(client.get_metric_history(odm.info.run_id, "loss")) == 6
        assert {"weight/code", "weight/notes", "weight/prose", "val_loss_mean"} <= set(odm.data.metrics)
        (model,) = odm.outputs.model_outputs  # the transformers flavor (a LoggedModel); its weights load with HF too
        model_dir = download_artifacts(client.get_logged_model(model.model_id).artifact_location, tracking_uri=uri,
                                       dst_path=str(tmp_path / "dl"))
        assert AutoModelForCausalLM.from_pretrained(Path(model_dir) / "model").config.vocab_size > 256
        assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # with the server gone, the pipeline still trains and reports, and says tracking failed
    with pytest.warns(UserWarning, match="training goes on"):
        res = pipeline(params=PARAMS, preset="nano", overrides=nano_overrides(tmp_path, corpus, "[uniform]", uri),
                       run_id="server-down")
    assert res["tracking_error"] and Path(res["report"]).exists() and res["failed"] == []


def test_prefect_deployment_runs_on_a_process_worker(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**service_env(tmp_path), "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "INFO"}
    prefect = str(VENV_BIN / "prefect")
    log = tmp_path / "server.log"
    server = _start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env, log)
    worker = None
    corpus = write_local_corpus(tmp_path / "corpus")
    params = {"preset": "nano", "overrides": nano_overrides(tmp_path, corpus), "run_id": "deployed"}
    try:
        _wait_healthy(f"{api}/health", server, log)

        def sh(*args: str) -> str:
            out = subprocess.run([prefect, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
            return out.stdout

        sh("work-pool", "create", "dograph", "--type", "process")
        sh("deploy", "--name", "on-demand")
        sh("deployment", "run", "dograph-pipeline/on-demand", "--params", json.dumps(params))
        wlog = tmp_path / "worker.log"
        worker = _start([prefect, "worker", "start", "--pool", "dograph", "--run-once"], ROOT, env, wlog)
        try:
            worker.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish the flow run:\n{wlog.read_text()[-3000:]}")
        query = ("import json; from prefect.client.orchestration import get_client\n"
                 "with get_client(sync_client=True) as c:\n"
                 "    print(json.dumps([[r.flow_id and c.read_flow(r.flow_id).name, r.state_type.value, str(r.deployment_id)]"
                 " for r in c.read_flow_runs()]))")
        out = subprocess.run([sys.executable, "-c", query], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        runs = json.loads(out.stdout.strip().splitlines()[-1])
        main = [r for r in runs if r[0] == "dograph-pipeline"]
        assert len(main) == 1 and main[0][1] == "COMPLETED" and main[0][2] != "None", (runs, wlog.read_text()[-3000:])
        assert (tmp_path / "runs" / "deployed" / "report.md").exists()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
