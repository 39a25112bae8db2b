"""Model-perceived domains: symmetric stability across projections, matching, live clusters that
follow the model and do not collapse."""
from __future__ import annotations

import numpy as np
import pytest

from dograph_core.clustering import (ClusteringError, LiveClusters, assign, contingency, kmeans, match, prepare,
                                     recluster)


def blobs(seed: int, n: int = 60, k: int = 4, d: int = 32, spread: float = 0.3, centers=None):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) if centers is None else centers
    labels = np.repeat(np.arange(k), n // k)
    return centers[labels] + spread * rng.normal(size=(len(labels), d)), labels


def test_stable_structure_scores_high_and_the_check_is_symmetric():
    z, truth = blobs(0)
    rng = np.random.default_rng(1)
    zc = z + 0.05 * rng.normal(size=z.shape)          # a second "projection" of the same gradients
    a, b = recluster(z, zc, 4, step=10), recluster(zc, z, 4, step=10)
    assert a.ari > 0.9 and abs(a.ari - b.ari) < 1e-12 and a.ari_init > 0.9
    assert contingency(a.labels, truth, 4, 4).max(0).tolist() == [15, 15, 15, 15]  # one cluster per blob


def test_unrelated_projections_score_low():
    rng = np.random.default_rng(5)
    c = recluster(rng.normal(size=(80, 32)), rng.normal(size=(80, 32)), 4, step=20)
    assert c.ari < 0.1


def test_matching_restores_cluster_identities_after_a_cold_restart():
    z, _ = blobs(0)
    first = recluster(z, z, 4, step=10)
    live = LiveClusters(first)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(z))
    z2 = z[perm] + 0.05 * rng.normal(size=z.shape)
    second = recluster(z2, z2, 4, step=20, seed=123)   # another seed: its own cluster numbering
    live.replace(second)
    assert np.array_equal(second.labels, first.labels[perm])       # relabelled to the live ids
    assert np.array_equal(live.assign(z), first.labels)
    _, c_cold = kmeans(prepare(z2)[0], 4, seed=7)
    assert np.array_equal(np.sort(match(first.centroids, c_cold)), np.arange(4))


def test_live_clusters_follow_drifting_features():
    """The features drift (every centre rotates towards an unrelated one); frozen centroids mis-assign,
    live ones keep up."""
    rng = np.random.default_rng(0)
    centers, later = rng.normal(size=(4, 32)), rng.normal(size=(4, 32))
    z, truth = blobs(0, n=200, centers=centers)
    first = recluster(z, z, 4, step=0)
    live, frozen = LiveClusters(first, lr=0.5, balance=0.0), LiveClusters(first, lr=0.0, balance=0.0)
    for t in range(1, 21):
        theta = np.pi / 2 * t / 20
        drifted = np.cos(theta) * centers + np.sin(theta) * later
        zt, truth_t = blobs(t, n=200, centers=drifted)
        for lc in (live, frozen):
            lc.add(zt, lc.assign(zt))
            lc.commit(np.full(4, 0.25))
    zt, truth_t = blobs(99, n=200, centers=drifted)
    from sklearn.metrics import adjusted_rand_score
    ari_live = adjusted_rand_score(truth_t, live.assign(zt))
    ari_frozen = adjusted_rand_score(truth_t, frozen.assign(zt))
    assert ari_live > 0.9 and ari_live > ari_frozen + 0.2


def test_prices_stop_collapse_onto_one_cluster():
    """Features that all move towards cluster 0: without the guard it takes everything; with it occupancy stays balanced."""
    z, _ = blobs(0, n=200)
    first = recluster(z, z, 4, step=0)
    guarded, free = LiveClusters(first, lr=0.0, balance=0.2), LiveClusters(first, lr=0.0, balance=0.0)
    rng = np.random.default_rng(3)
    for _ in range(30):
        zt = 0.4 * first.centroids[0] + rng.normal(size=(200, 32)) / np.sqrt(32) + first.mean
        occ = {}
        for name, lc in (("guarded", guarded), ("free", free)):
            lc.add(zt, lc.assign(zt))
            occ[name] = lc.commit(np.full(4, 0.25))
    assert occ["free"].max() > 0.6
    assert occ["guarded"].min() > 0.1 and occ["guarded"].max() < 0.4
    assert np.all(np.abs(guarded.prices) <= guarded.max_price + 1e-12)


def test_assign_subtracts_prices():
    mean = np.zeros(2)
    cents = np.array([[1.0, 0.0], [0.0, 1.0]])
    z = np.array([[1.0, 0.9]])
    assert assign(z, mean, cents)[0] == 0
    assert assign(z, mean, cents, prices=np.array([0.2, 0.0]))[0] == 1


def test_bad_features_give_clear_errors():
    with pytest.raises(ClusteringError, match="smaller than K"):
        kmeans(prepare(np.random.default_rng(0).normal(size=(3, 4)))[0], 8)
    with pytest.raises(ClusteringError, match="no gradient signal"):
        kmeans(prepare(np.zeros((10, 4)))[0], 3)
    with pytest.raises(ClusteringError, match="NaN"):
        prepare(np.array([[np.nan, 1.0], [1.0, 2.0]]))
    with pytest.raises(ClusteringError, match="rows"):
        recluster(np.ones((10, 4)), np.ones((9, 4)), 2, step=0)
