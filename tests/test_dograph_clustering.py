"""Model-perceived domains: k-means with warm start and matching, stability across projections."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from dograph_core.clustering import ClusteringError, assign, contingency, kmeans, match, prepare, recluster


def blobs(seed: int, n: int = 60, k: int = 4, d: int = 32, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    labels = np.repeat(np.arange(k), n // k)
    return centers[labels] + spread * rng.normal(size=(len(labels), d)), labels


def test_warm_start_and_matching_keep_cluster_identities():
    z, truth = blobs(0)
    first, ari = recluster(z, z + 0.01, 4, None, step=10, min_ari=0.5)
    assert first is not None and ari > 0.9
    # the same structure seen again, rows shuffled and slightly perturbed: cluster ids must not move
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(z))
    z2 = z[perm] + 0.05 * rng.normal(size=z.shape)
    second, _ = recluster(z2, z2 + 0.01, 4, first, step=20, min_ari=0.5)
    assert second.step == 20
    assert np.array_equal(second.labels, first.labels[perm])
    # a cold k-means with another seed gives permuted ids; matching restores them
    _, c_cold = kmeans(prepare(z2)[0], 4, seed=123)
    p = match(first.centroids, c_cold)
    assert np.allclose(np.sort(p), np.arange(4))
    assert np.array_equal(assign(z, first.mean, first.centroids), first.labels)


def test_unstable_clustering_is_rejected_and_previous_kept(caplog):
    z, _ = blobs(0)
    prev, _ = recluster(z, z, 4, None, step=10, min_ari=0.5)
    rng = np.random.default_rng(5)
    noise_a, noise_b = rng.normal(size=(80, 32)), rng.normal(size=(80, 32))  # two unrelated "projections"
    with caplog.at_level(logging.WARNING):
        kept, ari = recluster(noise_a, noise_b, 4, prev, step=20, min_ari=0.5)
    assert kept is prev and ari < 0.2
    assert "rejected" in caplog.text and "keeping the previous clustering" in caplog.text
    none, _ = recluster(noise_a, noise_b, 4, None, step=20, min_ari=0.5)
    assert none is None


def test_contingency_table_counts_every_probe_sequence():
    z, truth = blobs(2, n=40, k=2)
    src = truth.copy()
    c, _ = recluster(z, z, 2, None, step=1, min_ari=0.0)
    t = contingency(c.labels, src, 2, 2)
    assert t.sum() == 40 and sorted(t.max(0).tolist()) == [20, 20]


def test_bad_features_give_clear_errors():
    with pytest.raises(ClusteringError, match="smaller than K"):
        kmeans(prepare(np.random.default_rng(0).normal(size=(3, 4)))[0], 8)
    with pytest.raises(ClusteringError, match="no gradient signal"):
        kmeans(prepare(np.zeros((10, 4)))[0], 3)
    with pytest.raises(ClusteringError, match="NaN"):
        prepare(np.array([[np.nan, 1.0], [1.0, 2.0]]))
