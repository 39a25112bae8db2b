"""The gradient graph over domains (nodes = human sources or model-perceived clusters).

Node ``k`` carries ``m_k``, the mean projected per-example gradient of its sequences. Its Gram
matrix ``G_jk = <m_j, m_k>`` is the graph; by the paper's identity (see :func:`mmd2_from_kernel`)
``G_jj + G_kk - 2 G_jk = ||m_j - m_k||^2 = MMD^2`` under the gradient kernel. Late in training the
per-window means are noisy (feasibility note C: split-half reliability 0.33 from 256 sequences per
node at d = 512), so :class:`NodeMeans` accumulates a window of batches and then smooths windows
with an EMA.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


class GraphError(ValueError):
    """Bad input to the graph (shapes, NaN)."""


class NodeMeans:
    """Per-node mean features: sums over the current window, then an EMA across windows.

    Memory is O(K x d) whatever the number of steps. ``commit()`` closes a window: nodes with at
    least ``min_count`` samples move their EMA towards the window mean; the others keep their
    previous EMA (and are reported), so a node with no samples never gets a made-up mean.
    """

    def __init__(self, k: int, dim: int, ema: float = 0.9, min_count: int = 1):
        if not 0.0 <= ema < 1.0:
            raise GraphError(f"ema must be in [0, 1), got {ema}")
        self.k, self.dim, self.ema, self.min_count = k, dim, float(ema), int(min_count)
        self.sums = torch.zeros(k, dim, dtype=torch.float64)
        self.counts = torch.zeros(k, dtype=torch.float64)
        self.loss_sums = torch.zeros(k, dtype=torch.float64)
        self.means = torch.zeros(k, dim, dtype=torch.float64)    # EMA of window means (bias-corrected below)
        self.loss = torch.zeros(k, dtype=torch.float64)          # EMA of the mean loss per node
        self.weight = torch.zeros(k, dtype=torch.float64)        # EMA bias correction: 1 - ema^n per node
        self.total = torch.zeros(k, dtype=torch.float64)         # all samples ever seen per node
        self.last = torch.zeros(k, dim, dtype=torch.float64)     # the latest window's plain mean (any samples)

    def add(self, z: torch.Tensor, nodes: torch.Tensor, loss: Optional[torch.Tensor] = None) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim or nodes.shape != (z.shape[0],):
            raise GraphError(f"expected z [N, {self.dim}] and nodes [N]; got {tuple(z.shape)}, {tuple(nodes.shape)}")
        nodes = nodes.long().cpu()
        self.sums.index_add_(0, nodes, z.detach().double().cpu())
        self.counts += torch.bincount(nodes, minlength=self.k).double()
        if loss is not None:
            self.loss_sums.index_add_(0, nodes, loss.detach().double().cpu())

    def commit(self) -> list[int]:
        """Fold the window into the EMA; returns the nodes that were skipped (too few samples)."""
        ok = self.counts >= self.min_count
        skipped = [int(i) for i in torch.nonzero(~ok).flatten()]
        if skipped:
            log.info("graph window: nodes %s had fewer than %d samples; their means are kept", skipped, self.min_count)
        c = self.counts.clamp_min(1.0)[:, None]
        any_ = self.counts > 0
        self.last[any_] = self.sums[any_] / c[any_]
        a = self.ema
        self.means[ok] = a * self.means[ok] + (1 - a) * (self.sums[ok] / c[ok])
        self.loss[ok] = a * self.loss[ok] + (1 - a) * (self.loss_sums[ok] / c[ok, 0])
        self.weight[ok] = a * self.weight[ok] + (1 - a)
        self.total += self.counts
        self.sums.zero_(), self.counts.zero_(), self.loss_sums.zero_()
        return skipped

    def mean_matrix(self) -> torch.Tensor:
        """Bias-corrected EMA means ``[K, d]`` (rows of never-seen nodes are zero)."""
        return self.means / self.weight.clamp_min(1e-12)[:, None]

    def mean_loss(self) -> torch.Tensor:
        return self.loss / self.weight.clamp_min(1e-12)

    @property
    def seen(self) -> torch.Tensor:
        return self.weight > 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).clone()
                for k in ("sums", "counts", "loss_sums", "means", "loss", "weight", "total", "last")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            cur = getattr(self, k)
            if cur.shape != v.shape:
                raise GraphError(f"node-mean state {k}: shape {tuple(v.shape)} does not match {tuple(cur.shape)}")
            setattr(self, k, v.clone().double())


def gram(m: np.ndarray) -> np.ndarray:
    """``G = M M^T`` for node means ``M [K, d]``."""
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise GraphError("node means contain NaN or infinity")
    return m @ m.T


def cosine_affinity(g: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``W_jk = G_jk / sqrt(G_jj G_kk)``; nodes with a zero mean get zero rows/columns (diagonal 1)."""
    d = np.sqrt(np.clip(np.diag(g), 0, None))
    inv = np.where(d > eps, 1.0 / np.maximum(d, eps), 0.0)
    w = g * inv[:, None] * inv[None, :]
    np.fill_diagonal(w, 1.0)
    return w


def mmd2_matrix(g: np.ndarray) -> np.ndarray:
    """``MMD^2_jk = G_jj + G_kk - 2 G_jk`` = squared distance of the node means."""
    d = np.diag(g)
    return np.clip(d[:, None] + d[None, :] - 2 * g, 0, None)


def mmd2_from_kernel(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Biased MMD^2 estimate from kernel sums: ``mean(Kxx) + mean(Kyy) - 2 mean(Kxy)``.

    With the linear gradient kernel ``k(x, y) = <z_x, z_y>`` this equals ``||mean z_x - mean z_y||^2``
    exactly (the paper's identity; tested).
    """
    return float(np.mean(kxx) + np.mean(kyy) - 2 * np.mean(kxy))


def knn_sparsify(w: np.ndarray, k: int) -> np.ndarray:
    """Keep, per node, its ``k`` largest off-diagonal affinities; symmetric (an edge kept by either end)."""
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    if k >= n - 1:
        return w.copy()
    off = w.copy()
    np.fill_diagonal(off, -np.inf)
    idx = np.argpartition(-off, k, axis=1)[:, :k]
    mask = np.zeros_like(w, dtype=bool)
    mask[np.arange(n)[:, None], idx] = True
    mask |= mask.T
    np.fill_diagonal(mask, True)
    return np.where(mask, w, 0.0)


def laplacian(w: np.ndarray) -> np.ndarray:
    """``L = diag(W+ 1) - W+`` with ``W+`` the off-diagonal affinities clipped at 0 (PSD)."""
    wp = np.clip(np.asarray(w, dtype=np.float64), 0, None)
    np.fill_diagonal(wp, 0.0)
    return np.diag(wp.sum(1)) - wp
