"""The tracking seam: the core reports metrics through an object passed in.

The core never imports MLflow (or any tracker). ``tasks/`` passes an MLflow-backed
implementation; everything else gets :class:`NullTracker`, which does nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """What the core may call. Implementations must never raise into training."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """A tracker that records nothing (the default)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


class MemoryTracker(NullTracker):
    """Keeps everything in lists; used by tests and by the report when no server is configured."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)
