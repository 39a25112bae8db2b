"""The main flow: prepare -> tokenize -> searches -> the study's trainings -> evaluate -> report.

Run it with ``dograph run`` (or ``make run``), by a Prefect deployment (``prefect.yaml``), or
through ``dvc repro`` (dvc.yaml's ``pipeline`` stage calls ``dograph run``). This file owns the
stage graph; dvc.yaml only calls it.

* Offline methods (DoReMi, DoGE) search a mixture at ``pipeline.proxy_scale`` and every target
  scale trains on it as a static mixture (the weights file). Online methods (ODM, DoGraph) run
  their own updates at each target scale. uniform and natural just train.
* Independent runs go in parallel, at most ``pipeline.max_parallel`` at once, on threads
  (``pipeline.task_runner: thread``), in worker processes (``process``: Prefect's
  ``ProcessPoolTaskRunner``) or on a Dask cluster (``dask``; ``pipeline.dask_address`` or a local
  cluster). Parallel units on a machine with several GPUs each lease their own (:mod:`tasks.devices`).
* Units skipped as finished end in Prefect's ``Cached`` state; the comparison table and report.md
  are artifacts of the flow run (``dograph-comparison``, ``dograph-report``); the core's warnings go
  to the run's logs.
* Every run of the flow works in ``pipeline.out_dir/<run id>/``, locked while it runs. The run id
  defaults to ``<preset>-<hash of the resolved params>``: the same command resumes the same run and
  skips what finished; other params (or ``--run-id``) get their own directory.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from dograph_core.config import BEST, REORDER, YARDSTICK, Params, check_name, load_params
from tasks.cache import DataLock, RunLock, stable_hash
from tasks.params import check_params, method_spec
from tasks.prefect_tasks import (forward_core_logs, partition_task, prepare_task, process_worker_init, report_task,
                                 search_task, tokenize_task, train_task)
from tasks.steps import code_version, data_up_to_date, data_version, is_offline, require_corpus
from tasks.study import best_baseline, best_candidates, needs_best


def default_run_id(p: Params, preset: Optional[str]) -> str:
    """``<preset>-<hash>``: the resolved params minus what does not change results."""
    d = p.model_dump()
    for k in ("max_parallel", "task_runner", "dask_address"):
        d["pipeline"].pop(k, None)
    d["train"].pop("progress", None)
    d.pop("tracking", None)
    return f"{preset or 'default'}-{stable_hash(d, 8)}"


def task_runner(p: Params) -> Any:
    if p.pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if p.pipeline.dask_address:
            return DaskTaskRunner(address=p.pipeline.dask_address)
        # in-process workers share this process's Prefect API (a temporary server has no address that
        # other processes know); a cluster elsewhere needs a Prefect server its workers reach (PREFECT_API_URL)
        # its diagnostics pages (scheduler and worker dashboards) listen on loopback only, like everything else
        return DaskTaskRunner(cluster_kwargs={"n_workers": p.pipeline.max_parallel, "threads_per_worker": 1,
                                              "processes": False, "dashboard_address": "127.0.0.1:0",
                                              "worker_dashboard_address": "127.0.0.1:0"})
    if p.pipeline.task_runner == "process":  # one crash does not take the flow down; no GIL shared between runs
        return ProcessPoolTaskRunner(max_workers=p.pipeline.max_parallel, initializer=process_worker_init)
    return ThreadPoolTaskRunner(max_workers=p.pipeline.max_parallel)


@flow(name="dograph-runs")
def run_units(p: Params, data: dict, run_dir: str, tracking: Optional[dict]) -> list[dict]:
    """The study's searches and trainings, submitted so that independent ones run in parallel.

    Every method at every target scale and seed (``pipeline.scale_methods`` per scale), offline
    methods on the mixture their one proxy search found, and the compute yardstick; the ``@best``
    units of later scales are submitted once the first scale's baselines have finished.
    """
    seed0 = p.pipeline.seeds[0]
    searches: dict[str, Any] = {}
    futures: list[tuple[tuple[str, str, int], Any]] = []
    slot = 0  # the unit's index: where its round-robin choice of GPU starts (tasks.devices)

    def submit(method: str, scale: str, seed: int, reference: Optional[str] = None) -> None:
        nonlocal slot
        search = None
        if reference is None and is_offline(method_spec(p, method)["type"]):
            if method not in searches:
                searches[method] = search_task.submit(p, method, data, run_dir, tracking, seed0, slot=slot)
                slot += 1
            search = searches[method]
        label = reference or method
        t = train_task.with_options(task_run_name=f"train-{label}@{scale}-s{seed}")
        futures.append(((label, scale, seed), t.submit(p, method, scale, seed, data, run_dir, search, tracking,
                                                       slot=slot, reference=reference)))
        slot += 1

    for scale in p.pipeline.target_scales:
        for seed in p.pipeline.seeds:
            for method in p.pipeline.methods_at(scale):
                if method != BEST:
                    submit(method, scale, seed)
        for seed in p.pipeline.yardstick_seeds:
            submit("uniform", scale, seed, reference=YARDSTICK)
        for seed in p.pipeline.reorder_seeds:
            submit("uniform", scale, seed, reference=REORDER)
    later = needs_best(p)
    if later:  # as soon as the first scale's candidates have finished, not after everything else
        first, cands = p.pipeline.target_scales[0], set(best_candidates(p))
        finished, _ = collect([(k, f) for k, f in futures if k[1] == first and k[0] in cands])
        best = best_baseline(p, finished)
        if best is None:
            get_run_logger().error("%s at %s: no baseline of %s finished every seed (candidates: %s)",
                                   BEST, later, first, sorted(cands))
        else:
            get_run_logger().info("best baseline at %s: %s (trained at %s as %s)", first, best, later, BEST)
            for scale in later:
                if best not in p.pipeline.methods_at(scale):
                    for seed in p.pipeline.seeds:
                        submit(best, scale, seed)
    units, failed = collect(futures)
    if later and best is None:
        failed.append(f"{BEST} at {later}: no baseline of {p.pipeline.target_scales[0]} finished every seed")
    if failed and not units:
        raise RuntimeError("every run failed:\n  " + "\n  ".join(failed))
    return units + [{"failed": f} for f in failed]


def partitions(p: Params, data: dict, parent: Any, log: Any) -> None:
    """Compute the partitions the study's methods train over, once each, before any unit needs them;
    print each one's balance and agreement with the sources, and log them to the pipeline's MLflow run."""
    names = dict.fromkeys(n for m in p.pipeline.all_methods() if (n := method_spec(p, m).get("partition")))
    for name in names:
        r = partition_task(p, name, data, return_state=True).result()
        log.info("%s", r["table"])
        if parent:
            q = r["quality"]
            parent.log_metrics({f"partition.{name}.{k}": float(q[k]) for k in ("balance", "entropy", "ari", "nmi")})
            parent.log_artifact(Path(r["dir"]) / "partition.json", f"partitions/{name}")


def collect(futures: list[tuple[tuple[str, str, int], Any]]) -> tuple[list[dict], list[str]]:
    """The finished units' results, and a line for each one that failed."""
    units, failed = [], []
    for (method, scale, seed), fut in futures:
        try:
            units.append(fut.result())
        except Exception as e:  # noqa: BLE001 - collect, report the rest, then fail
            failed.append(f"{method}@{scale} seed {seed}: {type(e).__name__}: {e}")
    return units, failed


@flow(name="dograph-pipeline")
def pipeline(params: str = "params.yaml", preset: Optional[str] = None, overrides: Optional[list[str]] = None,
             run_id: Optional[str] = None, skip_data: bool = False, track: bool = True,
             publish: Optional[str] = None) -> dict[str, Any]:
    """The whole pipeline on one params file; returns where everything went and the comparison rows.

    ``publish``: also write the report as a directory that stands alone there (``docs/results/<preset>``).
    """
    if run_id is not None:  # also a deployment's parameter: one directory under pipeline.out_dir, never a path
        check_name(run_id, "run id")
    log = get_run_logger()
    stop_forwarding = forward_core_logs()
    try:
        return _pipeline(log, params, preset, overrides, run_id, skip_data, track, publish)
    finally:
        stop_forwarding()


def _pipeline(log: Any, params: str, preset: Optional[str], overrides: Optional[list[str]], run_id: Optional[str],
              skip_data: bool, track: bool, publish: Optional[str]) -> dict[str, Any]:
    p = load_params(params, preset, overrides)
    check_params(p)
    if skip_data:
        require_corpus(p)  # before the run directory is made
    run_id = run_id or default_run_id(p, preset)
    run_dir = Path(p.pipeline.out_dir) / run_id
    t0 = time.time()
    with RunLock(run_dir), DataLock(p.prepare.out_dir, p.tokenize.out_dir) as data_lock:
        log.info("run %s in %s", run_id, run_dir)
        (run_dir / "search").mkdir(exist_ok=True)  # a declared DVC output, even with no offline method
        if skip_data:
            data_lock.acquire(exclusive=False)
            data = {"out_dir": p.tokenize.out_dir, "data_version": data_version(p.tokenize.out_dir)}
        else:  # rewrite the data only when no other run reads it; then read it shared
            data_lock.acquire(exclusive=not data_up_to_date(p))
            # return_state: a skipped stage ends in a Cached state, whose result is the stage's output
            prepared = prepare_task(p, return_state=True).result()
            data = tokenize_task(p, prepared, return_state=True).result()
            data_lock.share()
        data = {**data, "code": code_version("dograph_core")}  # one code version for every unit of this run
        parent = None
        if track:
            from tasks.tracking import MLflowTracker, git_commit

            parent = MLflowTracker(p.tracking.uri, p.tracking.experiment, run_name=f"pipeline {run_id}",
                                   tags={"pipeline_run": run_id, "preset": preset or "default",
                                         "git_commit": git_commit(), "data_version": data["data_version"]})
            parent.log_params(p.model_dump())
            parent.log_corpus(data["out_dir"], str(data["data_version"]))  # the runs table's Dataset column
        try:
            partitions(p, data, parent, log)
            units = run_units.with_options(task_runner=task_runner(p))(p, data, str(run_dir),
                                                                        parent.spec() if parent else None)
            ok = [u for u in units if "failed" not in u]
            failed = [u["failed"] for u in units if "failed" in u]
            if failed and publish:  # a published study is never one with rows missing
                log.error("not publishing to %s: %d run(s) failed", publish, len(failed))
            rep = report_task(run_id, ok, str(run_dir), data["out_dir"], p.model_dump(), parent,
                              None if failed else publish)
        except BaseException:
            if parent:
                parent.end("FAILED")
            raise
        if parent:
            parent.log_metrics({"pipeline_time_s": time.time() - t0})
            parent.end("FAILED" if failed else "FINISHED")
    log.info("comparison (run %s):\n%s\nreport: %s", run_id, rep["table"], rep["report"])
    out = {"run_id": run_id, "run_dir": str(run_dir), "report": rep["report"], "rows": rep["rows"],
           "table": rep["table"], "failed": failed, "time_s": time.time() - t0,
           "mlflow_ui": parent.ui_hint() if parent else None,
           "tracking_error": parent.error if parent else None,
           "cached": sum(1 for u in ok if u.get("cached")), "units": len(ok)}
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) failed (the others are in {rep['report']}):\n  " + "\n  ".join(failed)
            + f"\nfix the cause and run the same command again: finished runs are skipped (run id {run_id})"
        )
    return out


if __name__ == "__main__":
    pipeline()
