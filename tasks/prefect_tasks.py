"""Prefect tasks: thin wrappers over :mod:`tasks.steps` that add retries, names, states and artifacts.

Caching is by inputs, done by the steps themselves (a done marker keyed by a hash of the resolved
params beside each output), so it survives a new Prefect database and works from the CLI and DVC
too; Prefect's own result cache is therefore off (``NO_CACHE``). A unit the steps skip because its
done marker holds the same key ends in a ``Cached`` state (``Completed`` type, name ``Cached``), so
the Prefect UI tells skipped units from trained ones.

Retries cover transient failures only: I/O and network errors, and errors the core marks
``transient`` (a package download that failed, a Hugging Face dataset that did not load over the
network). A default-corpus domain that could not be fetched makes ``prepare`` retry; after the last
attempt the run goes on without it, and the prepared data is not marked done, so the next run
fetches again.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from dograph_core.config import Params
from dograph_core.io import is_transient
from tasks import steps
from tasks.devices import device_lease
from tasks.results import write_outputs

CORE_LOGGER = "dograph_core"
WARNINGS_LOGGER = "dograph.warnings"  # the core's warnings.warn(...), sent to the run's logs only


def io_errors_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed task only on a transient failure (network, disk), never on bad input or a bug."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - classified below
        transient = getattr(e, "transient", None)  # FetchError, PrepareError of a network failure
        if transient is not None:
            return bool(transient)
        return is_transient(e)
    return False


class IncompleteDataError(RuntimeError):
    """Default-corpus domains that could not be fetched (worth another attempt)."""

    transient = True


def cached_state(result: Mapping[str, Any], what: str) -> Any:
    """``result`` as is for a unit that ran; a ``Cached`` state carrying it for one that was skipped."""
    if result.get("cached"):
        key = result.get("key")
        return Completed(name="Cached", data=dict(result),
                         message=f"{what}: up to date" + (f" (key {key})" if key else "") + ", skipped")
    return result


# -- the core's logs and warnings in the run's logs -----------------------------------------------

class _InRun(logging.Filter):
    """Pass records made inside a Prefect flow or task run (others have no run to go to)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return bool(getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get())


def forward_core_logs() -> Callable[[], None]:
    """Send the core's log records (``dograph_core.*``, at their level: WARNING by default) and its
    warnings (categories of ``dograph_core``) to the logs of the Prefect run they happen in.

    Idempotent; returns a function that undoes what this call did. ``PREFECT_LOGGING_EXTRA_LOGGERS=
    dograph_core`` does the same for the records; the warnings need this.
    """
    from prefect.logging.handlers import APILogHandler

    undo: list[Callable[[], None]] = []
    core = logging.getLogger(CORE_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in core.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRun())
        core.addHandler(handler)
        undo.append(lambda: core.removeHandler(handler))
    wlog = logging.getLogger(WARNINGS_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in wlog.handlers):
        whandler = APILogHandler()
        whandler.addFilter(_InRun())
        wlog.addHandler(whandler)
        wlog.propagate = False  # the warning itself is still printed as before; no second console line
        undo.append(lambda: wlog.removeHandler(whandler))
    if not getattr(warnings.showwarning, "_dograph", False):
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if getattr(category, "__module__", "").startswith(CORE_LOGGER):
                wlog.warning("%s: %s", category.__name__, message)
            shown(message, category, filename, lineno, file, line)

        showwarning._dograph = True  # type: ignore[attr-defined]
        warnings.showwarning = showwarning

        def restore() -> None:
            if warnings.showwarning is showwarning:
                warnings.showwarning = shown
        undo.append(restore)

    def undo_all() -> None:
        for u in reversed(undo):
            u()
    return undo_all


def process_worker_init() -> None:
    """Initializer of the process-pool workers: the core's logs go to the run's logs there too, and to
    stderr from the CLI's ``--log-level`` on."""
    from tasks.logs import show_logs_from_env

    forward_core_logs()
    show_logs_from_env()


# -- the tasks ------------------------------------------------------------------------------------

_common = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="prepare", retries=2, retry_delay_seconds=10, retry_condition_fn=io_errors_only, **_common)
def prepare_task(p: Params) -> Any:
    """Prepare the corpus; retried while default domains fail to fetch, never marked done without them."""
    out = steps.prepare_step(p)
    unfetched = out.get("unfetched")
    if unfetched:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        if ctx is not None and ctx.task_run.run_count <= ctx.task.retries:
            raise IncompleteDataError(f"default domain(s) {unfetched} could not be fetched (see the warnings above)")
        logging.getLogger(CORE_LOGGER).warning(
            "default domain(s) %s could not be fetched after %d attempt(s); going on without them. The prepared "
            "data is not marked done, so the next run fetches them again", unfetched, ctx.task_run.run_count if ctx else 1)
    return cached_state(out, "prepared data")


@task(name="tokenize", retries=1, retry_delay_seconds=5, retry_condition_fn=io_errors_only, **_common)
def tokenize_task(p: Params, prepared: Mapping[str, Any]) -> Any:
    return cached_state(steps.tokenize_step(p, prepared), "tokenized data")


@task(name="partition", task_run_name="partition-{name}", **_common)
def partition_task(p: Params, name: str, data: Mapping[str, Any]) -> Any:
    """A named partition of the corpus (computed once; a hidden-state partition trains its warm-up model here)."""
    return cached_state(steps.partition_step(p, name, data, progress=p.train.progress), f"partition {name}")


@task(name="search", task_run_name="search-{method}", **_common)
def search_task(p: Params, method: str, data: Mapping[str, Any], run_dir: str,
                tracking: Optional[Mapping[str, Any]] = None, seed: int = 0, slot: int = 0) -> Any:
    """An offline method's search, on its own GPU when parallel units share a machine with several."""
    with device_lease(p, Path(run_dir) / ".devices", slot) as device:
        out = steps.search_step(p, method, data, run_dir, tracking, seed, device=device)
    return cached_state(out, f"search of {method}")


@task(name="train", task_run_name="train-{method}@{scale}-s{seed}", **_common)
def train_task(p: Params, method: str, scale: str, seed: int, data: Mapping[str, Any], run_dir: str,
               search: Optional[Mapping[str, Any]] = None, tracking: Optional[Mapping[str, Any]] = None,
               slot: int = 0, reference: Optional[str] = None) -> Any:
    """One training run, on its own GPU when parallel units share a machine with several."""
    with device_lease(p, Path(run_dir) / ".devices", slot) as device:
        out = steps.train_step(p, method, scale, seed, data, run_dir, search, tracking, device=device,
                               reference=reference)
    return cached_state(out, f"{out['method']}@{scale} seed {seed}")


@task(name="report", retries=1, retry_delay_seconds=2, retry_condition_fn=io_errors_only, **_common)
def report_task(run_id: str, units: list[dict], run_dir: str, tokenized_dir: str, params: dict,
                tracker: Any = None, publish: Optional[str] = None) -> dict[str, Any]:
    """Write report.md, results.json, metrics.json and plots (and a copy under ``publish``); log them to
    the pipeline's MLflow run; publish the comparison table and the report as artifacts of the flow run."""
    from dograph_core.report import comparison_rows, markdown_table

    results, report = write_outputs(run_id, units, run_dir, tokenized_dir, params, publish)
    rows = comparison_rows(results)
    if tracker is not None:
        for r in rows:
            tracker.log_metrics({f"{r['method']}.{r['scale']}.val_loss_mean": r["val_mean"],
                                 f"{r['method']}.{r['scale']}.val_loss_worst": r["val_worst"],
                                 f"{r['method']}.{r['scale']}.heldout_loss": r["heldout"]})
        for name in ("report.md", "results.json", "metrics.json"):
            tracker.log_artifact(Path(run_dir) / name, "report")
        tracker.log_artifact(Path(run_dir) / "plots", "report/plots")
    publish_artifacts(run_id, rows, Path(report))
    return {"report": str(report), "rows": rows, "table": markdown_table(rows)}


def publish_artifacts(run_id: str, rows: list[dict], report: Path) -> None:
    """The comparison rows as a table artifact and report.md as a markdown artifact (keys ``dograph-comparison``
    and ``dograph-report``: the UI's Artifacts page keeps their history across runs)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(table=[{k: v for k, v in r.items()} for r in rows], key="dograph-comparison",
                          description=f"dograph comparison, run {run_id}: mean/worst validation loss and held-out "
                                      f"loss per method and scale")
    create_markdown_artifact(markdown=report.read_text(encoding="utf-8"), key="dograph-report",
                             description=f"report.md of run {run_id} ({report})")
