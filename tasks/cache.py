"""Caching by inputs, done markers and run locks: how a re-run skips finished work.

Every unit of work (prepare, tokenize, one search, one training run) is keyed by a hash
of its *resolved* inputs (its config section, the method's params, the corpus version,
the weights file it reads). When the unit finishes it writes a small done marker that
records the key; a later call with the same key finds the marker and the outputs and
returns without running. A changed input changes the key, so the unit runs again.

A run directory is locked (``fcntl.flock``) while a pipeline works in it, so two
pipelines started with the same run id cannot write over each other.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from dograph_core.io import RunLock, RunLockedError, read_json, try_flock, write_json  # noqa: F401 - the locks live in the core

MARKER_FORMAT = "dograph-done/1"


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hash of a JSON-able object that does not depend on key order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def file_hash(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def marker_path(out: str | Path) -> Path:
    """The done marker of an output: beside a directory (``data/prepared.done.json``) or inside a run dir."""
    out = Path(out)
    return out.with_name(out.name + ".done.json")


def is_done(out: str | Path, key: str, marker: Optional[Path] = None) -> bool:
    """True when ``out`` exists and its marker records ``key``."""
    out = Path(out)
    m = marker or marker_path(out)
    if not out.exists() or not m.exists():
        return False
    try:
        doc = read_json(m)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT and doc.get("key") == key


def mark_done(out: str | Path, key: str, info: Optional[dict] = None, marker: Optional[Path] = None) -> None:
    write_json(marker or marker_path(out), {"format": MARKER_FORMAT, "key": key, "info": info or {}})


def clear_done(out: str | Path, marker: Optional[Path] = None) -> None:
    m = marker or marker_path(out)
    if m.exists():
        m.unlink()


class DataLock:
    """Shared/exclusive locks on data directories (``<dir>.lock``) that several runs read.

    A pipeline (and ``dograph train``, ``search``, ``evaluate``) holds them shared while it reads the
    data; a pipeline, ``dograph prepare`` and ``dograph tokenize`` hold them exclusive while they
    (re)write it, so nothing replaces the corpus under a run that is training on it.
    """

    def __init__(self, *dirs: str | Path):
        self.paths = [Path(str(d).rstrip("/") + ".lock") for d in dirs]
        self._fds: list[int] = []

    def acquire(self, exclusive: bool) -> "DataLock":
        self.release()
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = not try_flock(fd, exclusive)
            except OSError:
                self.release()
                raise
            if held:
                self.release()
                data = path.with_suffix("") if path.suffix == ".lock" else path
                raise RunLockedError(
                    f"{data} is being {'read' if exclusive else 'written'} by another pipeline run or dograph "
                    f"command, and this one would {'rewrite' if exclusive else 'read'} it; wait for it, or give this run its own "
                    f"data directories (--set prepare.out_dir=... --set tokenize.out_dir=...)"
                )
            self._fds.append(fd)
        return self

    def share(self) -> None:
        """Turn exclusive locks into shared ones (after writing, while reading)."""
        import fcntl

        for fd in self._fds:
            fcntl.flock(fd, fcntl.LOCK_SH)

    def release(self) -> None:
        import fcntl

        for fd in self._fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds = []

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __enter__(self) -> "DataLock":
        return self
