"""Helpers of the DoGraph mixer: probe sets, time averages and the diagnostics log."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


class ProbeError(ValueError):
    """A probe set that cannot be drawn (domains too small, nothing left)."""


def draw_probe(corpus, domains: list[str], n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` training windows of ``seq_len + 1`` tokens, stratified over ``domains`` (equal shares).

    Returns (token ids ``[N, seq_len + 1]`` long, source index per row). A domain with fewer tokens
    than one window is skipped with a logged warning; if every domain is, :class:`ProbeError`.
    """
    rng = np.random.default_rng(seed)
    per = [n // len(domains) + (1 if i < n % len(domains) else 0) for i in range(len(domains))]
    rows, src = [], []
    skipped = []
    for i, d in enumerate(domains):
        toks = corpus.tokens("train", d)
        span = int(toks.shape[0]) - (seq_len + 1)
        if span < 0:
            skipped.append(d)
            continue
        starts = rng.integers(0, span + 1, size=per[i])
        for s in starts:
            rows.append(np.asarray(toks[s: s + seq_len + 1], dtype=np.int64))
        src.extend([i] * per[i])
    if skipped:
        log.warning("probe: domains %s have fewer than %d training tokens and are left out", skipped, seq_len + 1)
    if not rows:
        raise ProbeError(f"probe: no domain of {domains} has a full window of {seq_len + 1} tokens")
    return torch.from_numpy(np.stack(rows)), np.asarray(src, dtype=np.int64)


def time_average(history: list[tuple[int, list[float]]], total_steps: int) -> np.ndarray:
    """Average of a weights schedule, each entry weighted by how many steps it was in force."""
    if not history:
        raise ValueError("empty weights history")
    steps = [int(s) for s, _ in history] + [max(total_steps, int(history[-1][0]))]
    acc = np.zeros(len(history[0][1]))
    dur_total = 0.0
    for (s, w), nxt in zip(history, steps[1:]):
        dur = max(nxt - int(s), 0)
        acc += dur * np.asarray(w, dtype=np.float64)
        dur_total += dur
    if dur_total <= 0:
        return np.asarray(history[-1][1], dtype=np.float64)
    return acc / dur_total


class EventLog:
    """``dograph_log.jsonl`` in the mixer's output directory: one JSON line per update or clustering.

    Kept out of the checkpointed state (it grows with the run). On resume, lines of steps after
    the checkpoint are dropped (:meth:`truncate`), so a resumed run's log equals an uninterrupted one's.
    """

    def __init__(self, out_dir: Optional[Path], enabled: bool):
        self.path = Path(out_dir) / "dograph_log.jsonl" if (out_dir is not None and enabled) else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def truncate(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except ValueError:
                break
        self.path.write_text("".join(f"{x}\n" for x in keep))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
