"""What the Prefect UI shows of a pipeline run, checked on a temporary Prefect server (the ephemeral one
``pipeline(...)`` starts, on 127.0.0.1): skipped units are ``Cached``; the comparison table and the
report are artifacts of the flow run; the core's warnings are in the run's logs; parallel units lease
their own GPU (faked device count); retries cover network errors and an incomplete download is never
marked done; the process-pool runner runs the flow.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from _orch_fixture import ROOT, nano_overrides, write_local_corpus

PARAMS = str(ROOT / "params.yaml")


# -- helpers --------------------------------------------------------------------------------------

def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_runs(flow_run_id) -> list:
    """Task runs of a flow run and of its subflows (the units run in the ``dograph-runs`` subflow)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with _client() as c:
        subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id] + [s.id for s in subs]
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))


def _logs(flow_run_id, needle: str, timeout: float = 20.0) -> list[str]:
    """Messages of a flow run's logs that contain ``needle`` (logs arrive in batches: poll a little)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.time() + timeout
    while True:
        with _client() as c:
            msgs = [l.message for l in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        hits = [m for m in msgs if needle in m]
        if hits or time.time() > deadline:
            return hits
        time.sleep(0.5)


def _fake_gpus(monkeypatch, n: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


# -- retries: which failures are transient ----------------------------------------------------------

def test_retry_condition_covers_network_errors_only():
    from prefect.states import Failed

    from dograph_core.data.sources import FetchError
    from dograph_core.data.text import PrepareError
    from tasks.prefect_tasks import io_errors_only

    def failed(exc):
        return Failed(data=exc)

    network = PrepareError("could not load Hugging Face dataset 'x'")
    network.transient = True
    assert io_errors_only(None, None, failed(FetchError("npm:a@1", "`npm` exited with 1: ETIMEDOUT", "npm pack a@1")))
    assert io_errors_only(None, None, failed(network))
    assert io_errors_only(None, None, failed(ConnectionError("reset")))
    assert not io_errors_only(None, None, failed(FetchError("npm:a@1", "sha256 mismatch", "npm pack a@1", transient=False)))
    assert not io_errors_only(None, None, failed(PrepareError("prepare.local.path does not exist")))
    assert not io_errors_only(None, None, failed(FileNotFoundError("nope")))
    assert not io_errors_only(None, None, failed(ValueError("a bug")))


def test_hf_load_errors_say_whether_they_are_transient(monkeypatch):
    import datasets

    from dograph_core.config import HFSourceConfig
    from dograph_core.data.local import iter_hf
    from dograph_core.data.text import Issues, PrepareError

    for exc, transient in ((ConnectionError("Couldn't reach the Hub"), True), (FileNotFoundError("no such dataset"), False)):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(datasets, "load_dataset", boom)
        with pytest.raises(PrepareError) as e:
            list(iter_hf(HFSourceConfig(name="someone/some-data"), Issues()))
        assert e.value.transient is transient


# -- a default domain that failed to fetch ----------------------------------------------------------

def _default_catalogue(monkeypatch, tmp_path, failures: int):
    """A default catalogue of three domains, one behind a package whose fetch fails ``failures`` times."""
    import dograph_core.data.prepare as prep
    from dograph_core.data.default_corpus import DomainSpec
    from dograph_core.data.sources import FetchError, Package
    from tests._prepare_fixture import gen_text

    def gen(seed, chars):
        def extract(paths, issues):
            yield "gen.txt", gen_text(seed, chars)
        return extract

    specs = {s.name: s for s in (
        DomainSpec("big", (), gen(1, 40_000), description="generated"),
        DomainSpec("small", (), gen(2, 8_000), description="generated"),
        DomainSpec("remote", (Package("npm", "flaky-pkg", "1.0.0"),), gen(3, 20_000)),
    )}
    calls = []

    def fetch(pkg, cache_dir, timeout=600.0):
        calls.append(pkg.spec)
        if len(calls) <= failures:
            raise FetchError(pkg.spec, "`npm` exited with 1: npm ERR! network ETIMEDOUT", "npm pack flaky-pkg@1.0.0")
        return tmp_path

    monkeypatch.setattr(prep, "default_catalogue", lambda: specs)
    monkeypatch.setattr(prep, "fetch", fetch)
    from dograph_core.config import load_params

    p = load_params(PARAMS, "nano", [
        "prepare.source=default", f"prepare.out_dir={tmp_path / 'prepared'}", f"prepare.cache_dir={tmp_path / 'raw'}",
        "prepare.total_mb=0.05", "prepare.heldout=[]", "prepare.heldout_mb=0.01", "prepare.min_ratio=1",
        "prepare.doc_chars=1000", "prepare.min_domain_chars=500"])
    return p, calls


def _run_prepare(p):
    from prefect import flow

    from tasks.prefect_tasks import prepare_task

    @flow(name="dograph-test-prepare")
    def f():
        return prepare_task.with_options(retry_delay_seconds=0)(p, return_state=True)

    return f()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failed_fetch_is_retried_and_then_marked_done(tmp_path, monkeypatch):
    from tasks.cache import marker_path

    p, calls = _default_catalogue(monkeypatch, tmp_path, failures=1)
    state = _run_prepare(p)
    assert state.is_completed() and state.name == "Completed"
    assert calls == ["npm:flaky-pkg@1.0.0"] * 2  # the network error was retried
    assert marker_path(p.prepare.out_dir).exists()
    assert state.result()["cached"] is False and "unfetched" not in state.result()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_domain_that_never_fetched_is_never_marked_done(tmp_path, monkeypatch):
    import json

    from tasks import steps
    from tasks.cache import marker_path

    p, calls = _default_catalogue(monkeypatch, tmp_path, failures=99)
    state = _run_prepare(p)
    assert len(calls) == 3  # prepare has 2 retries
    assert state.is_completed() and state.result()["unfetched"] == ["remote"]  # the run goes on without it...
    assert not marker_path(p.prepare.out_dir).exists()  # ...but the incomplete corpus is not done
    assert json.loads((Path(p.prepare.out_dir) / "manifest.json").read_text())["unfetched"] == ["remote"]
    # the same from the CLI's path (no Prefect): fetched again, then done
    monkeypatch.setattr("dograph_core.data.prepare.fetch", lambda pkg, cache_dir, timeout=600.0: tmp_path)
    assert steps.prepare_step(p, progress=False)["cached"] is False
    assert marker_path(p.prepare.out_dir).exists()
    assert steps.prepare_step(p, progress=False)["cached"] is True


# -- GPUs for parallel units ----------------------------------------------------------------------

def test_device_leases_go_round_robin_over_visible_gpus(tmp_path, monkeypatch):
    from dograph_core.config import load_params
    from tasks.devices import device_lease

    _fake_gpus(monkeypatch, 3)
    p = load_params(PARAMS, "nano", ["pipeline.max_parallel=3"])
    with device_lease(p, tmp_path, 0) as a, device_lease(p, tmp_path, 1) as b, device_lease(p, tmp_path, 2) as c:
        assert (a, b, c) == ("cuda:0", "cuda:1", "cuda:2")
        with device_lease(p, tmp_path, 3) as d:  # every GPU busy: shares, round-robin
            assert d == "cuda:0"
    with device_lease(p, tmp_path, 1) as b:
        with device_lease(p, tmp_path, 4) as e:  # slot 4 starts at cuda:1, which is busy: the next free one
            assert (b, e) == ("cuda:1", "cuda:2")
    # one unit at a time, an explicit device, torchrun or no second GPU: train.device is left alone
    for ov in (["pipeline.max_parallel=1"], ["pipeline.max_parallel=3", "train.device=cpu"],
               ["pipeline.max_parallel=3", "pipeline.nproc_per_node=2"]):
        with device_lease(load_params(PARAMS, "nano", ov), tmp_path, 1) as dev:
            assert dev is None
    _fake_gpus(monkeypatch, 1)
    with device_lease(p, tmp_path, 1) as dev:
        assert dev is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_local_corpus(tmp_path_factory.mktemp("corpus"))


def test_parallel_units_each_train_on_their_own_gpu(tmp_path, corpus, monkeypatch):
    import dograph_core.train as engine
    from flows.pipeline import pipeline

    _fake_gpus(monkeypatch, 2)
    both_in = threading.Barrier(2, timeout=60)
    seen: dict[str, str] = {}

    def fake_train(cfg, corpus, method, *a, **k):  # records where it would train; no CUDA here
        seen[method] = cfg.device
        both_in.wait()  # the two units run at the same time
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "train", fake_train)
    ov = nano_overrides(tmp_path, corpus, "[uniform,natural]") + ["pipeline.max_parallel=2"]
    with pytest.raises(RuntimeError, match="every run failed"):
        pipeline(params=PARAMS, preset="nano", overrides=ov, track=False)
    assert sorted(seen.values()) == ["cuda:0", "cuda:1"]


# -- states, artifacts and logs of a pipeline run -------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus):
    """The same pipeline twice: the second finds every unit done. total_mb above what the corpus holds
    makes the core warn (DataWarning) in the prepare stage."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("prefect-ui")
    ov = nano_overrides(tmp, corpus, "[uniform,natural]") + ["prepare.total_mb=50"]
    first = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False, return_state=True)
    second = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False, return_state=True)
    assert first.is_completed() and second.is_completed()
    return first, second


def test_skipped_units_are_cached_in_prefect(two_runs):
    first, second = two_runs
    assert second.result()["cached"] == 2
    states = {}
    for which, st in (("first", first), ("second", second)):
        states[which] = {tr.name if tr.name.startswith(("train-", "search-")) else tr.name.rsplit("-", 1)[0]:
                         tr.state.name for tr in _task_runs(st.state_details.flow_run_id)}
    trains = [k for k in states["first"] if k.startswith("train-")]
    assert sorted(trains) == ["train-natural@nano-s0", "train-uniform@nano-s0"]
    assert {states["first"][k] for k in trains} == {"Completed"}
    assert {states["second"][k] for k in trains} == {"Cached"}
    assert states["second"]["prepare"] == "Cached" and states["second"]["tokenize"] == "Cached"
    assert states["second"]["report"] == "Completed"


def test_comparison_table_and_report_are_artifacts_of_the_flow_run(two_runs):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    first, _ = two_runs
    with _client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert by_key["dograph-comparison"].type == "table" and by_key["dograph-report"].type == "markdown"
    table = by_key["dograph-comparison"].data
    table = __import__("json").loads(table) if isinstance(table, str) else table
    assert {r["method"] for r in table} == {"uniform", "natural"} and all(r["val_mean"] > 0 for r in table)
    assert "| uniform | nano |" in by_key["dograph-report"].data


def test_core_warnings_reach_the_flow_run_logs(two_runs):
    first, _ = two_runs
    hits = _logs(first.state_details.flow_run_id, "asks for more than")
    assert hits and "DataWarning" in hits[0]


def test_core_logger_records_from_parallel_tasks_reach_the_logs():
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline  # noqa: F401 - the forwarding is installed by the pipeline flow
    from tasks.prefect_tasks import forward_core_logs

    @task
    def warn(i: int) -> None:
        logging.getLogger("dograph_core.optimize").warning("solver fell back (test %d)", i)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def f():
        undo = forward_core_logs()
        try:
            for fut in [warn.submit(i) for i in range(2)]:
                fut.result()
        finally:
            undo()

    state = f(return_state=True)
    assert len(_logs(state.state_details.flow_run_id, "solver fell back")) == 2
    assert not [h for h in logging.getLogger("dograph_core").handlers if type(h).__name__ == "APILogHandler"]


@pytest.mark.slow
def test_pipeline_on_the_process_pool(tmp_path, corpus):
    import json

    from flows.pipeline import pipeline

    ov = nano_overrides(tmp_path, corpus, "[uniform,natural]") + ["pipeline.task_runner=process",
                                                                 "pipeline.max_parallel=2"]
    state = pipeline(params=PARAMS, preset="nano", overrides=ov, track=False, return_state=True)
    res = state.result()
    assert res["failed"] == [] and {r["method"] for r in res["rows"]} == {"uniform", "natural"}
    for m in ("uniform", "natural"):
        assert json.loads((Path(res["run_dir"]) / "train" / f"{m}__nano__s0" / "summary.json").read_text())["steps"] == 6
    trains = {tr.name: tr.state.name for tr in _task_runs(state.state_details.flow_run_id) if tr.name.startswith("train")}
    assert trains == {"train-uniform@nano-s0": "Completed", "train-natural@nano-s0": "Completed"}
