"""Prefect tasks: thin wrappers over :mod:`tasks.steps` that add retries (I/O errors only) and names.

Caching is by inputs, done by the steps themselves (a done marker keyed by a hash of the resolved
params beside each output), so it survives a new Prefect database and works from the CLI and DVC
too; Prefect's own result cache is therefore off (``NO_CACHE``).
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import steps
from tasks.results import collect_results, dvc_metrics


def io_errors_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed task only when it failed on I/O (network, disk), never on bad input or a bug."""
    try:
        state.result()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except BaseException:  # noqa: BLE001 - anything else is not worth retrying
        return False
    return False


_common = dict(cache_policy=NO_CACHE, persist_result=False)

prepare_task = task(steps.prepare_step, name="prepare", retries=2, retry_delay_seconds=10,
                    retry_condition_fn=io_errors_only, **_common)
tokenize_task = task(steps.tokenize_step, name="tokenize", retries=1, retry_delay_seconds=5,
                     retry_condition_fn=io_errors_only, **_common)
search_task = task(steps.search_step, name="search", task_run_name="search-{method}", **_common)
train_task = task(steps.train_step, name="train", task_run_name="train-{method}@{scale}-s{seed}", **_common)


@task(name="report", retries=1, retry_delay_seconds=2, retry_condition_fn=io_errors_only, **_common)
def report_task(run_id: str, units: list[dict], run_dir: str, tokenized_dir: str, params: dict,
                tracker: Any = None) -> dict[str, Any]:
    """Write report.md, results.json, metrics.json and plots; log them to the pipeline's MLflow run."""
    from pathlib import Path

    from dograph_core.io import write_json
    from dograph_core.report import comparison_rows, markdown_table, write_report

    results = collect_results(run_id, units, tokenized_dir, params)
    report = write_report(results, run_dir, title=f"dograph comparison, run {run_id}")
    write_json(Path(run_dir) / "metrics.json", dvc_metrics(results))
    rows = comparison_rows(results)
    if tracker is not None:
        for r in rows:
            tracker.log_metrics({f"{r['method']}.{r['scale']}.val_loss_mean": r["val_mean"],
                                 f"{r['method']}.{r['scale']}.val_loss_worst": r["val_worst"],
                                 f"{r['method']}.{r['scale']}.heldout_loss": r["heldout"]})
        for name in ("report.md", "results.json", "metrics.json"):
            tracker.log_artifact(Path(run_dir) / name, "report")
        tracker.log_artifact(Path(run_dir) / "plots", "report/plots")
    return {"report": str(report), "rows": rows, "table": markdown_table(rows)}
