"""Model-perceived domains: k-means of centred, unit-normalised gradient features.

A re-clustering warm-starts from the previous centroids and is matched to the previous clusters
(Hungarian assignment on centroid cosine), so cluster ``k`` keeps its meaning and its weight.
It is accepted only when it is *stable*: k-means on the same probe under a second projection seed
must agree with it (adjusted Rand index >= ``min_ari``). Late in training per-example sketches carry
little cluster structure (feasibility note B: ARI across projection seeds 0.04-0.08 at step 1200),
and a clustering that changes with the projection seed is noise; then the previous one stays.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
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


def kmeans(x: np.ndarray, k: int, init: Optional[np.ndarray] = None, seed: int = 0, n_init: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """k-means (scikit-learn) on prepared features; returns (labels [N], unit centroids [K, d])."""
    n = x.shape[0]
    if n < k:
        raise ClusteringError(f"probe of {n} sequences is smaller than K = {k}; raise probe_size or lower k")
    if np.count_nonzero(np.linalg.norm(x, axis=1) > 0) < k:
        raise ClusteringError(f"fewer than K = {k} non-zero feature rows: no gradient signal to cluster")
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


def assign(z: np.ndarray, mean: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid by cosine of the centred features."""
    x, _ = prepare(z, mean)
    return np.argmax(x @ centroids.T, axis=1)


def contingency(labels: np.ndarray, sources: np.ndarray, k: int, n_sources: int) -> np.ndarray:
    """Counts ``[K, n_sources]``: how many probe sequences of each source fall in each cluster."""
    table = np.zeros((k, n_sources), dtype=np.int64)
    np.add.at(table, (np.asarray(labels), np.asarray(sources)), 1)
    return table


@dataclass
class Clustering:
    """An accepted clustering: feature mean (for centring), unit centroids, probe labels and its stability."""

    mean: np.ndarray
    centroids: np.ndarray
    labels: np.ndarray
    ari: float
    step: int


def recluster(
    z: np.ndarray,
    z_check: np.ndarray,
    k: int,
    prev: Optional[Clustering],
    step: int,
    min_ari: float = 0.2,
    seed: int = 0,
) -> tuple[Optional[Clustering], float]:
    """Cluster the probe features ``z``; accept only if stable against ``z_check`` (second projection).

    Returns (the clustering to use, the measured ARI). When unstable, the previous clustering is
    returned unchanged (None if there is none yet) and the reason is logged.
    """
    x, mean = prepare(z)
    xc, _ = prepare(z_check)
    init = None
    if prev is not None and prev.centroids.shape[1] == x.shape[1]:
        # warm start: previous centroids re-expressed in the new centring
        init = prev.centroids
    labels, cents = kmeans(x, k, init=init, seed=seed)
    labels_c, _ = kmeans(xc, k, seed=seed)
    ari = float(adjusted_rand_score(labels, labels_c))
    if ari < min_ari:
        log.warning(
            "step %d: re-clustering rejected, unstable across projection seeds (ARI %.3f < min_ari %.3f); "
            "%s", step, ari, min_ari, "keeping the previous clustering" if prev else "no clustering yet",
        )
        return prev, ari
    if prev is not None:
        perm = match(prev.centroids, cents)
        cents = cents[perm]
        inv = np.empty_like(perm)
        inv[perm] = np.arange(k)
        labels = inv[labels]
    return Clustering(mean=mean, centroids=cents, labels=labels, ari=ari, step=step), ari
