"""``python -m tasks.train_entry`` = ``python -m dograph_core.train`` with MLflow on rank 0.

:func:`tasks.steps.train_torchrun` launches this under ``torchrun`` with ``$DOGRAPH_MLFLOW_RUN`` (the
unit's run, :meth:`tasks.tracking.MLflowTracker.run_spec`): rank 0 writes its step metrics into that
run while it trains, instead of the launcher replaying ``metrics.jsonl`` after the run. The launcher
owns the run and ends it; the core still never imports MLflow.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from dograph_core.train import main as train_main
    from dograph_core.tracking import NullTracker
    from tasks.logs import show_logs_from_env

    show_logs_from_env()  # every rank: the CLI's --log-level

    tracker = NullTracker()
    spec = os.environ.get("DOGRAPH_MLFLOW_RUN")
    if spec and int(os.environ.get("RANK", "0")) == 0:
        from tasks.tracking import attached_tracker

        tracker = attached_tracker(json.loads(spec))
    return train_main(argv, tracker=tracker)


if __name__ == "__main__":
    sys.exit(main())
