"""DoGraph's progress signal: which nodes lag, with a noise-aware contrast.

At each update the mixer hands in every node's loss and whether that loss is *fresh* (measured on
enough sequences in this window). The relative change of a node between two consecutive updates is

    r_j(t) = (L_j(t) - L_j(t-1)) / L_j(t-1)                  (negative = the node is learning)

and is recorded only when the node was fresh at **both** updates: a node without data gets no
score and ends up *neutral* (``u = 0``), never the largest, which a frozen loss (``r = 0`` while every
learning node has ``r < 0``) would give it.

The lag of node j is its change relative to the others, ``d_j(t) = r_j(t) - mean_i r_i(t)`` (the
common trend of the learning-rate schedule cancels), averaged over the last ``horizon`` updates:
``dbar_j``, with standard error ``se_j = sd_t(d_j) / sqrt(n_j)`` (the across-window spread of the
node's own relative change). The contrast is shrunk towards zero by the positive-part
James-Stein factor

    s = max(0, 1 - mean_j se_j^2 / mean_j dbar_j^2)

so when the differences between nodes are within their noise (late in a cosine schedule, say)
``s`` is 0 and beta is the prior; when they stand well above it ``s`` is 1. Finally

    u_j = s * dbar_j / mean_i |dbar_i|,        beta_j = prior_j exp(u_j / tau) / Z

(the division keeps ``tau`` acting on *relative* differences of progress, whatever the loss
scale). ``prior`` is what the mixer trains on when progress says nothing: uniform for human
sources, the clusters' frequencies under the base sampler for model nodes (a uniform prior over
clusters would reweight towards the small ones on no evidence). Before ``min_windows`` changes
exist the noise cannot be estimated and beta is the prior.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

import numpy as np


class ProgressError(ValueError):
    """Bad input to the progress tracker."""


class Progress:
    """Relative loss changes per node over the last ``horizon`` updates, and the targets beta."""

    def __init__(self, k: int, horizon: int = 5, min_windows: int = 3, shrink: bool = True):
        if k < 1 or horizon < 2 or min_windows < 2 or min_windows > horizon:
            raise ProgressError(f"need k >= 1 and 2 <= min_windows <= horizon; got k={k}, horizon={horizon}, "
                                f"min_windows={min_windows}")
        self.k, self.horizon, self.min_windows, self.shrink = k, horizon, min_windows, shrink
        self.prev: Optional[np.ndarray] = None       # last fresh loss per node (NaN = none)
        self.changes: deque[np.ndarray] = deque(maxlen=horizon)  # d_j(t), NaN where not fresh twice

    def record(self, loss: np.ndarray, fresh: np.ndarray, prev: Optional[np.ndarray] = None) -> np.ndarray:
        """Add one update's node losses; returns this update's relative changes ``r`` (NaN = no score).

        ``prev`` overrides the previous losses (the probe path re-scores the *same* sequences, so the
        previous loss of a node is that of its current members at the last update).
        """
        loss = np.asarray(loss, dtype=np.float64)
        fresh = np.asarray(fresh, dtype=bool)
        if loss.shape != (self.k,) or fresh.shape != (self.k,):
            raise ProgressError(f"expected {self.k} node losses and fresh flags, got {loss.shape} and {fresh.shape}")
        ok_now = fresh & np.isfinite(loss) & (loss > 0)
        ref = self.prev if prev is None else np.asarray(prev, dtype=np.float64)
        r = np.full(self.k, np.nan)
        if ref is not None:
            both = ok_now & np.isfinite(ref) & (ref > 0)
            r[both] = (loss[both] - ref[both]) / ref[both]
            if both.sum() >= 2:
                d = np.full(self.k, np.nan)
                d[both] = r[both] - r[both].mean()
                self.changes.append(d)
        if prev is None:
            self.prev = np.where(ok_now, loss, np.nan)
        return r

    def targets(self, tau: float, prior: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, float]:
        """``(beta, u, s)``: targets on the simplex (``prior`` when there is no signal; None = uniform),
        lag scores (0 = neutral) and the shrinkage factor."""
        u = np.zeros(self.k)
        s = 0.0
        if len(self.changes) >= 1:
            d = np.stack(list(self.changes))
            n = np.sum(np.isfinite(d), axis=0)
            scored = n >= 1
            dbar = np.zeros(self.k)
            dbar[scored] = np.nanmean(d[:, scored], axis=0)
            noisy = n >= 2
            if len(self.changes) >= self.min_windows and noisy.sum() >= 2:
                var = np.nanvar(d[:, noisy], axis=0, ddof=1) / n[noisy]
                signal = float(np.mean(dbar[noisy] ** 2))
                s = max(0.0, 1.0 - float(np.mean(var)) / signal) if signal > 0 else 0.0
                if not self.shrink:
                    s = 1.0
            scale = float(np.mean(np.abs(dbar[scored]))) if scored.any() else 0.0
            if s > 0 and scale > 1e-12:
                u[scored] = s * dbar[scored] / scale
        z = u / max(tau, 1e-12)
        beta = np.exp(z - z.max())
        if prior is not None:
            prior = np.asarray(prior, dtype=np.float64)
            if prior.shape != (self.k,) or not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
                raise ProgressError(f"prior must be {self.k} non-negative finite numbers with a positive sum, got {prior}")
            beta = beta * prior
        return beta / beta.sum(), u, s

    def state_dict(self) -> dict[str, Any]:
        return {"prev": None if self.prev is None else self.prev.tolist(),
                "changes": [d.tolist() for d in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = None if state["prev"] is None else np.asarray(state["prev"], dtype=np.float64)
        self.changes = deque((np.asarray(d, dtype=np.float64) for d in state["changes"]), maxlen=self.horizon)
