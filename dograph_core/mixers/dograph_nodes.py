"""One set of DoGraph nodes (the human sources, or the model-perceived clusters) and its weights.

A :class:`NodeSet` owns the node means and losses of a window (:class:`~dograph_core.graph.NodeMeans`),
the progress signal (:class:`~dograph_core.progress.Progress`), the weights ``alpha`` over its nodes
and their history. :func:`build_problem` turns its state into the optimisation of
:mod:`dograph_core.optimize`:

* ``T``, the transfer matrix: ``T_jk = <m_j, m_k> / ||m_j||^2`` (``graph: gram``: the Gram matrix of
  node mean gradients *with magnitudes*, each row divided by its diagonal, so that ``(T a)_j`` is node
  j's first-order predicted loss decrease per unit of its own weight), clipped to ``[-T_MAX, T_MAX]``;
  ``graph: cosine`` drops the magnitudes; ``graph: off`` is the identity (the ablation);
* the F3 constraint ``a^T L a <= rho`` with ``L`` the Laplacian of the positive cosine affinities and
  ``rho = (cfg.rho / K)^2 * sum_{j<k} W+_jk``: neighbours' weights may differ by about ``cfg.rho / K``
  (weighted RMS), so the constraint binds only when beta is rough across neighbours.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dograph_core import graph as gr
from dograph_core import optimize as opt
from dograph_core.progress import Progress

T_MAX = 4.0  # |T_jk| bound: a node whose mean gradient is near zero would otherwise get unbounded rows


class NodeSet:
    """Node statistics, progress and weights of one node set."""

    def __init__(self, k: int, dim: int, cfg: Any):
        self.k = k
        self.means = gr.NodeMeans(k, dim, cfg.ema, cfg.min_node_samples)
        self.progress = Progress(k, cfg.horizon, cfg.min_windows, cfg.shrink, cfg.trend)
        self.alpha = np.full(k, 1.0 / k)
        self.history: list[tuple[int, list[float]]] = [(0, self.alpha.tolist())]
        self.fresh = np.zeros(k, dtype=bool)
        self.window_loss = np.full(k, np.nan)
        self.lo = np.full(k, 0.1 / k if cfg.floor is None else cfg.floor)
        self.hi = np.full(k, cfg.cap)
        opt.check_bounds(self.lo, self.hi)

    def commit(self) -> list[int]:
        """Close the window: fold node means and losses in; returns the nodes without enough samples."""
        counts = self.means.counts.numpy()
        self.fresh = counts >= self.means.min_count
        self.window_loss = self.means.loss_sums.numpy() / np.maximum(counts, 1.0)
        return self.means.commit()

    def record_batch_progress(self) -> None:
        """Progress from the training windows' own mean losses (human nodes). The raw window means, not
        the EMA: a node back from a window without data would otherwise slide from its stale EMA loss
        down to its current one over several windows and look like the fastest learner."""
        self.progress.record(self.window_loss, self.fresh)

    def set_alpha(self, a: np.ndarray, step: int) -> None:
        self.alpha = a
        self.history.append((step, a.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.state_dict(), "progress": self.progress.state_dict(),
                "alpha": self.alpha.tolist(), "history": [[s, w] for s, w in self.history],
                "fresh": self.fresh.tolist()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if len(s["alpha"]) != self.k:
            raise ValueError(f"checkpoint has {len(s['alpha'])} nodes, this run {self.k} (nodes/k changed?)")
        self.means.load_state_dict(s["means"])
        self.progress.load_state_dict(s["progress"])
        self.alpha = np.asarray(s["alpha"], dtype=np.float64)
        self.history = [(int(t), list(w)) for t, w in s["history"]]
        self.fresh = np.asarray(s["fresh"], dtype=bool)


def transfer(g: np.ndarray, kind: str, knn: Optional[int] = None) -> np.ndarray:
    """The transfer matrix ``T`` from the Gram matrix ``g`` (see the module docstring)."""
    k = g.shape[0]
    if kind == "off":
        return np.eye(k)
    d = np.diag(g)
    if kind == "cosine":
        t = gr.cosine_affinity(g)
    else:  # each row over its own squared norm, floored at a tenth of the median (a near-zero mean gradient
        #    would otherwise give a row of +-T_MAX and, through F1's common shift, flatten every other row)
        seen = d > 1e-30
        floor = 0.1 * float(np.median(d[seen])) if seen.any() else 1.0
        t = g / np.maximum(d, floor)[:, None]
        t[~seen] = 0.0
        np.fill_diagonal(t, 1.0)
    if knn:
        mask = gr.knn_sparsify(np.abs(gr.cosine_affinity(g)), knn) != 0
        t = np.where(mask, t, 0.0)
    return np.clip(t, -T_MAX, T_MAX)


def build_problem(cfg: Any, means: np.ndarray, beta: np.ndarray, prev: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  target: Optional[np.ndarray] = None) -> opt.Problem:
    """The optimisation for one update. ``target`` (A1): the target's mean gradient ``m_target``.

    The KL anchor of F1/F2 is the progress target ``beta`` itself (``prev`` only for A1): ``tau_kl``
    prices how far the graph may move the weights from the target, so with the graph off the answer
    is beta whatever ``tau_kl``, and with it the move is bounded at every update. (Anchored to the
    previous weights instead, repeated updates walk to F1's own optimum even under a uniform beta:
    the weights then follow gradient norms, not progress.)"""
    g = gr.gram(means)
    k = g.shape[0]
    if cfg.objective == "A1":
        if target is None:
            raise opt.OptimizationError("objective A1 needs a target mixture (methods.<name>.target)")
        scale = max(float(np.max(np.diag(g))), 1e-30)
        return opt.Problem(T=np.eye(k), prev=prev, objective="A1", G=g / scale, b=means @ target / scale,
                           tau_kl=cfg.tau_kl, lo=lo, hi=hi)
    T = transfer(g, cfg.graph, cfg.knn)
    # F1's shift: one constant for every row, large enough that every argument stays positive on the
    # simplex. A per-row shift (c_j = delta - min_k T_jk) would make each row scale-free and F1 blind to
    # conflict; a common one keeps it: a node whose gradient hurts the others' progress costs them.
    shift = np.full(k, opt.F1_DELTA + max(0.0, -float(T.min())))
    L = rho = None
    if cfg.graph != "off" and cfg.rho is not None:
        w = np.clip(gr.cosine_affinity(g), 0, None)
        np.fill_diagonal(w, 0.0)
        L, rho = gr.laplacian(w), (cfg.rho / k) ** 2 * 0.5 * float(w.sum())
    return opt.Problem(T=T, prev=beta, objective=cfg.objective, beta=beta, L=L, rho=rho, tau_kl=cfg.tau_kl,
                       lo=lo, hi=hi, shift=shift if cfg.objective == "F1" else None)
