"""dograph's own log messages on stderr (``dograph --log-level``), in the CLI's process and in the
processes it starts (process-pool workers, torchrun ranks), which read the level from the environment."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

LOG_LEVEL_ENV = "DOGRAPH_LOG_LEVEL"
LOGGERS = ("dograph_core", "tasks", "flows")


def show_logs(level: Optional[str]) -> None:
    """dograph's loggers (the core, the tasks, the flow) to stderr from ``level`` on, here and in every
    process started from here; other libraries' loggers keep their own settings (a root handler at INFO
    would print MLflow's and alembic's too). Nothing when ``level`` is None."""
    if not level:
        return
    os.environ[LOG_LEVEL_ENV] = level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._dograph = True  # type: ignore[attr-defined]  # replaced, not doubled, by a second call
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = [h for h in lg.handlers if not getattr(h, "_dograph", False)] + [handler]
        lg.propagate = False


def show_logs_from_env() -> None:
    """In a process started by the CLI: the level it was given, if any."""
    show_logs(os.environ.get(LOG_LEVEL_ENV))
