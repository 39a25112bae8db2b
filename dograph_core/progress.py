"""DoGraph's progress signal: which nodes lag, with a noise-aware contrast.

At each update the mixer hands in every node's loss and whether that loss is *fresh* (measured on
enough sequences in this window). A node without data gets no score and ends up *neutral*
(``u = 0``), never the largest, which a frozen loss (no change while every learning node falls) would
give it. Two ways to turn losses into each node's lag ``dbar_j`` with a standard error ``se_j``:

* **Levels** (``trend: slope``; the training windows' losses, or the human nodes' fixed probe): each
  update's loss is a *level*, with noise of its own (a window's sampling, the model's fluctuation from
  one update to the next). The log losses of the last ``horizon + 1`` updates are fitted by least squares as
  ``log L_j(t) = a_j + c(t) + b_j t`` over the (node, update) pairs that were fresh: ``c(t)`` is the
  schedule's common curve (it cancels in the contrast), ``b_j`` the node's own relative change per
  update, and the lag ``dbar_j = b_j - mean_i b_i``. Its standard error comes from the node's residuals,
  ``se_j^2 = (RSS_j / df_j) / sum_t (t - tbar_j)^2``: a window's noise is counted once.
* **Changes** (``trend: mean_change``, the mixer's default, see ``docs/method.md`` section 4; always
  on a probe re-scored at each update with ``prev`` given):
  ``r_j(t) = (L_j(t) - L_j(t-1)) / L_j(t-1)`` when the node was fresh at both updates,
  ``d_j(t) = r_j(t) - mean_i r_i(t)``, ``dbar_j`` its mean over the last ``horizon`` updates and
  ``se_j = sd_t(d_j) / sqrt(n_j)``. The model nodes' probe regroups its sequences by their current
  clusters at every update, so only the change of the current members is defined there. On window
  losses (the default) consecutive changes share a window with opposite signs: their mean telescopes
  to ``(noise_T - noise_{T-h}) / h`` while ``sd / sqrt(h)`` counts every window's noise twice, so
  ``se^2`` overstates the noise about ``h``-fold and the contrast is shrunk to nothing almost always
  (the lag target, let act by the slope, cost the mean loss in our runs: hence the default).
  A probe has no sampling noise of its own, but the model's own fluctuation from one update to the
  next telescopes the same way, so paired changes still overstate that part.

The contrast is shrunk towards zero by the positive-part James-Stein factor

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


TRENDS = ("slope", "mean_change")


def _slopes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log L_j(t) = a_j + c(t) + b_j t`` by least squares over the finite entries of ``y`` [T, K].

    Returns (``b - mean b`` over the nodes with a slope, NaN elsewhere; each node's ``se^2``, NaN where its
    residual degrees of freedom are used up; the number of points per node). ``c`` is the common curve
    of the schedule; only the contrast of the slopes is identified, and only it is used."""
    t_n, k = y.shape
    ok = np.isfinite(y)
    n = ok.sum(0)
    has = n >= 2
    d, se2 = np.full(k, np.nan), np.full(k, np.nan)
    if has.sum() < 2:
        return d, se2, n
    tt, jj = np.nonzero(ok & has[None, :])
    m = len(tt)
    x = np.zeros((m, 2 * k + t_n))
    x[np.arange(m), jj] = 1.0                  # a_j
    x[np.arange(m), k + jj] = tt               # b_j
    x[np.arange(m), 2 * k + tt] = 1.0          # c(t)
    obs = y[tt, jj]
    theta = np.linalg.lstsq(x, obs, rcond=None)[0]
    b = theta[k:2 * k]
    d[has] = b[has] - b[has].mean()
    res2 = np.bincount(jj, weights=(obs - x @ theta) ** 2, minlength=k)
    # the fit's degrees of freedom (points - 2 per node - the common curve's, shared in proportion to points)
    times = len(np.unique(tt))
    df = n - 2.0 - (n / m) * max(times - 2, 0)
    for j in np.nonzero(has & (df > 0.5))[0]:
        tj = np.nonzero(ok[:, j])[0].astype(np.float64)
        sxx = float(np.sum((tj - tj.mean()) ** 2))
        se2[j] = res2[j] / df[j] / sxx
    return d, se2, n


class Progress:
    """A node's lag over the last ``horizon`` updates, its noise, and the targets beta."""

    def __init__(self, k: int, horizon: int = 5, min_windows: int = 3, shrink: bool = True,
                 trend: str = "slope"):
        if k < 1 or horizon < 2 or min_windows < 2 or min_windows > horizon:
            raise ProgressError(f"need k >= 1 and 2 <= min_windows <= horizon; got k={k}, horizon={horizon}, "
                                f"min_windows={min_windows}")
        if trend not in TRENDS:
            raise ProgressError(f"trend must be one of {TRENDS}, got {trend!r}")
        self.k, self.horizon, self.min_windows, self.shrink, self.trend = k, horizon, min_windows, shrink, trend
        self.prev: Optional[np.ndarray] = None       # last fresh loss per node (NaN = none)
        self.changes: deque[np.ndarray] = deque(maxlen=horizon)  # d_j(t), NaN where not fresh twice
        self.levels: deque[np.ndarray] = deque(maxlen=horizon + 1)  # log L_j(t), NaN where not fresh
        self.paired = False                          # changes of the same sequences (prev given)

    def record(self, loss: np.ndarray, fresh: np.ndarray, prev: Optional[np.ndarray] = None) -> np.ndarray:
        """Add one update's node losses; returns this update's relative changes ``r`` (NaN = no score).

        ``prev`` overrides the previous losses (the probe path re-scores the *same* sequences, so the
        previous loss of a node is that of its current members at the last update): the changes are then
        paired and the lag is their mean, whatever ``trend``.
        """
        loss = np.asarray(loss, dtype=np.float64)
        fresh = np.asarray(fresh, dtype=bool)
        if loss.shape != (self.k,) or fresh.shape != (self.k,):
            raise ProgressError(f"expected {self.k} node losses and fresh flags, got {loss.shape} and {fresh.shape}")
        ok_now = fresh & np.isfinite(loss) & (loss > 0)
        ref = self.prev if prev is None else np.asarray(prev, dtype=np.float64)
        self.paired = self.paired or prev is not None
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
        self.levels.append(np.where(ok_now, np.log(np.where(ok_now, loss, 1.0)), np.nan))
        return r

    def _lag(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(dbar with NaN = no score, se^2 with NaN = no noise estimate, scored, enough windows)."""
        if self.trend == "slope" and not self.paired:
            y = np.stack(list(self.levels)) if self.levels else np.full((0, self.k), np.nan)
            dbar, se2, _ = _slopes(y)
            return dbar, se2, np.isfinite(dbar), len(self.levels) > self.min_windows
        dbar, se2 = np.full(self.k, np.nan), np.full(self.k, np.nan)
        if self.changes:
            d = np.stack(list(self.changes))
            n = np.sum(np.isfinite(d), axis=0)
            dbar[n >= 1] = np.nanmean(d[:, n >= 1], axis=0)
            noisy = n >= 2
            se2[noisy] = np.nanvar(d[:, noisy], axis=0, ddof=1) / n[noisy]
        return dbar, se2, np.isfinite(dbar), len(self.changes) >= self.min_windows

    def targets(self, tau: float, prior: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, float]:
        """``(beta, u, s)``: targets on the simplex (``prior`` when there is no signal; None = uniform),
        lag scores (0 = neutral) and the shrinkage factor."""
        u = np.zeros(self.k)
        s = 0.0
        dbar, se2, scored, enough = self._lag()
        if scored.any():
            noisy = np.isfinite(se2)
            if enough and noisy.sum() >= 2:
                signal = float(np.mean(dbar[noisy] ** 2))
                s = max(0.0, 1.0 - float(np.mean(se2[noisy])) / signal) if signal > 0 else 0.0
                if not self.shrink:
                    s = 1.0
            scale = float(np.mean(np.abs(dbar[scored])))
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
                "changes": [d.tolist() for d in self.changes],
                "levels": [y.tolist() for y in self.levels], "paired": self.paired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = None if state["prev"] is None else np.asarray(state["prev"], dtype=np.float64)
        self.changes = deque((np.asarray(d, dtype=np.float64) for d in state["changes"]), maxlen=self.horizon)
        self.levels = deque((np.asarray(y, dtype=np.float64) for y in state.get("levels", [])),
                            maxlen=self.horizon + 1)
        self.paired = bool(state.get("paired", False))
