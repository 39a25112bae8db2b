"""Model-perceived domains: k-means of centred, unit-normalised gradient features, kept alive.

Two time scales:

* **Full re-clustering** (:func:`recluster`, every ``recluster_every`` steps, on a probe): k-means
  on the probe's features under two projection seeds, both runs started from the *same* probe rows
  (k-means++ picks them on the first), so the adjusted Rand index between them measures only how
  much the sketch's own distortion changes the clusters. It is also reported against the noise floor
  of k-means itself (two initialisations on the same features). A clustering is accepted only when
  the cross-projection ARI reaches ``min_ari``; the accepted one is matched to the live clusters
  (Hungarian assignment on centroid cosine), so cluster ``k`` keeps its meaning and its weight.
* **Online** (:class:`LiveClusters`, every update window): the centring mean and the centroids
  follow the model as a mini-batch k-means over the training sequences' own features, and a
  per-cluster price (the dual variable of a balanced assignment, as in online Sinkhorn) lowers the
  score of crowded clusters and raises that of starved ones, so occupancy cannot collapse onto a
  few clusters while the geometry drifts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import adjusted_rand_score

log = logging.getLogger(__name__)


class ClusteringError(ValueError):
    """Features that cannot be clustered into K groups."""


def prepare(z: np.ndarray, mean: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Centre (by ``mean``, or the features' own mean) and unit-normalise; returns (features, mean)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ClusteringError(f"expected features [N, d], got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ClusteringError("features contain NaN or infinity")
    mean = z.mean(0) if mean is None else np.asarray(mean, dtype=np.float64)
    x = z - mean
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12), mean


def _check_rows(x: np.ndarray, k: int) -> None:
    n = x.shape[0]
    if n < k:
        raise ClusteringError(f"probe of {n} sequences is smaller than K = {k}; raise probe_size or lower k")
    if np.count_nonzero(np.linalg.norm(x, axis=1) > 0) < k:
        raise ClusteringError(f"fewer than K = {k} non-zero feature rows: no gradient signal to cluster")


def kmeans(x: np.ndarray, k: int, init: Optional[np.ndarray] = None, seed: int = 0, n_init: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """k-means (scikit-learn) on prepared features; returns (labels [N], unit centroids [K, d])."""
    _check_rows(x, k)
    if init is not None and init.shape == (k, x.shape[1]):
        km = KMeans(k, init=init.astype(np.float32), n_init=1, random_state=seed)
    else:
        km = KMeans(k, init="k-means++", n_init=n_init, random_state=seed)
    labels = km.fit_predict(x.astype(np.float32))
    c = km.cluster_centers_.astype(np.float64)
    return labels.astype(np.int64), c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def match(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` such that new cluster ``perm[j]`` becomes cluster ``j`` (max total cosine)."""
    sim = old @ new.T
    rows, cols = linear_sum_assignment(-sim)
    perm = np.empty(old.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def assign(z: np.ndarray, mean: np.ndarray, centroids: np.ndarray, prices: Optional[np.ndarray] = None) -> np.ndarray:
    """Nearest centroid by cosine of the centred features, less each cluster's price."""
    x, _ = prepare(z, mean)
    s = x @ centroids.T
    return np.argmax(s - prices if prices is not None else s, axis=1)


def contingency(labels: np.ndarray, sources: np.ndarray, k: int, n_sources: int) -> np.ndarray:
    """Counts ``[K, n_sources]``: how many probe sequences of each source fall in each cluster."""
    table = np.zeros((k, n_sources), dtype=np.int64)
    np.add.at(table, (np.asarray(labels), np.asarray(sources)), 1)
    return table


@dataclass
class Clustering:
    """A clustering of a probe: feature mean (for centring), unit centroids, probe labels, its stability
    (ARI across projection seeds) and the k-means noise floor (ARI across initialisations)."""

    mean: np.ndarray
    centroids: np.ndarray
    labels: np.ndarray
    ari: float
    step: int
    ari_init: float = float("nan")


def recluster(z: np.ndarray, z_check: np.ndarray, k: int, step: int, seed: int = 0) -> Clustering:
    """Fresh k-means of the probe features ``z``; its stability against ``z_check`` (second projection).

    Both runs start from the same probe rows (k-means++ on ``z``), so the ARI between them is
    symmetric and measures the projection alone. ``ari_init`` runs k-means on ``z`` from another
    seed: the agreement k-means itself reaches on these features. The caller decides acceptance.
    """
    x, mean = prepare(z)
    xc, _ = prepare(z_check)
    if xc.shape[0] != x.shape[0]:
        raise ClusteringError(f"the check features have {xc.shape[0]} rows, the probe {x.shape[0]}")
    _check_rows(x, k)
    _, rows = kmeans_plusplus(x.astype(np.float32), k, random_state=seed)
    labels, cents = kmeans(x, k, init=x[rows], seed=seed)
    labels_c, _ = kmeans(xc, k, init=xc[rows], seed=seed)
    labels_s, _ = kmeans(x, k, seed=seed + 1, n_init=1)
    return Clustering(mean=mean, centroids=cents, labels=labels, step=step,
                      ari=float(adjusted_rand_score(labels, labels_c)),
                      ari_init=float(adjusted_rand_score(labels, labels_s)))


class LiveClusters:
    """Centroids, centring mean and balancing prices that follow the model between re-clusterings.

    ``add`` accumulates a window of training features (as torch sums, so the mixer can all-reduce
    them across ranks); ``commit`` moves the mean and every centroid a step ``lr`` towards the
    window's own (mini-batch k-means with a constant rate, so old geometry is forgotten) and updates
    the prices: ``p_k += balance * log(occupancy_k / target_k)``, clipped to ``[-max_price, max_price]``
    (cosine units). A crowded cluster's price rises and a starved one's falls until occupancy is near
    the target; ``balance = 0`` turns the guard off. With ``band > 1`` the guard acts only on the part of
    ``|log(occupancy / target)|`` beyond ``log(band)``: occupancy within a factor ``band`` of the target
    moves no price (a guard against collapse, not a force towards equal clusters). The occupancy
    balanced may be given in terms of another sampler than the one that drew the window (:meth:`commit`).
    """

    def __init__(self, c: Clustering, lr: float = 0.3, balance: float = 0.1, max_price: float = 0.5, band: float = 1.0):
        self.k, self.dim = c.centroids.shape
        self.mean = c.mean.copy()
        self.centroids = c.centroids.copy()
        self.prices = np.zeros(self.k)
        self.lr, self.balance, self.max_price = lr, balance, max_price
        self.band = band
        self.xsum = torch.zeros(self.k, self.dim, dtype=torch.float64)
        self.zsum = torch.zeros(self.dim, dtype=torch.float64)
        self.counts = torch.zeros(self.k, dtype=torch.float64)

    def assign(self, z: np.ndarray) -> np.ndarray:
        return assign(z, self.mean, self.centroids, self.prices)

    def add(self, z: np.ndarray, labels: np.ndarray) -> None:
        x, _ = prepare(z, self.mean)
        lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.xsum.index_add_(0, lab, torch.from_numpy(x))
        self.zsum += torch.from_numpy(np.asarray(z, dtype=np.float64)).sum(0)
        self.counts += torch.bincount(lab, minlength=self.k).double()

    def window(self) -> list[torch.Tensor]:
        """The window's sums (reduce these across ranks before :meth:`commit`)."""
        return [self.xsum, self.zsum, self.counts]

    def commit(self, target: np.ndarray, occupancy: Optional[np.ndarray] = None) -> np.ndarray:
        """Fold the window in; returns the window's occupancy (share of sequences per cluster).

        The prices balance ``occupancy`` when it is given (for example the clusters' frequency under
        another sampler than the one that drew the window), else the window's own occupancy."""
        n = float(self.counts.sum())
        occ = (self.counts / max(n, 1.0)).numpy().copy()
        guard = occ if occupancy is None else np.asarray(occupancy, dtype=np.float64)
        if n > 0:
            a = self.lr
            self.mean = (1 - a) * self.mean + a * (self.zsum.numpy() / n)
            seen = self.counts.numpy() > 0
            win = self.xsum.numpy()[seen] / self.counts.numpy()[seen, None]
            c = (1 - a) * self.centroids[seen] + a * win
            self.centroids[seen] = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            if self.balance > 0:
                g = np.log((guard + 1e-3) / (np.asarray(target) + 1e-3))
                step = self.balance * np.sign(g) * np.maximum(np.abs(g) - np.log(self.band), 0.0)
                self.prices = np.clip(self.prices + step, -self.max_price, self.max_price)
        self.xsum.zero_(), self.zsum.zero_(), self.counts.zero_()
        return occ

    def replace(self, c: Clustering) -> np.ndarray:
        """Adopt an accepted re-clustering, matched to the live clusters; returns ``perm`` (new cluster
        ``perm[j]`` became cluster ``j``) and relabels ``c`` in place."""
        perm = match(self.centroids, c.centroids)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(self.k)
        c.centroids, c.labels = c.centroids[perm], inv[c.labels]
        self.mean, self.centroids = c.mean.copy(), c.centroids.copy()
        self.prices = np.zeros(self.k)
        return perm

    def state_dict(self) -> dict:
        return {"mean": torch.from_numpy(self.mean.copy()), "centroids": torch.from_numpy(self.centroids.copy()),
                "prices": torch.from_numpy(self.prices.copy()), "xsum": self.xsum.clone(),
                "zsum": self.zsum.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.centroids = _np(s["mean"]), _np(s["centroids"])
        self.prices = _np(s["prices"])
        self.xsum, self.zsum, self.counts = (s[k].clone().double() for k in ("xsum", "zsum", "counts"))


def _np(x) -> np.ndarray:
    return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64).copy()
