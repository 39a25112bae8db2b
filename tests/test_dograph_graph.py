"""The gradient graph: the MMD identity, node means with EMA, affinities, Laplacian, k-NN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dograph_core.graph import (
    GraphError, NodeMeans, cosine_affinity, gram, knn_sparsify, laplacian, mmd2_from_kernel, mmd2_matrix,
)


def test_mean_gradient_distance_equals_mmd_from_kernel_sums():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 16)) + 0.5       # projected per-example gradients of domain P
    y = rng.normal(size=(23, 16)) * 2.0       # of domain Q
    kxx, kyy, kxy = x @ x.T, y @ y.T, x @ y.T  # the linear gradient kernel
    direct = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
    assert mmd2_from_kernel(kxx, kyy, kxy) == pytest.approx(direct, rel=1e-10)
    G = gram(np.stack([x.mean(0), y.mean(0)]))
    assert mmd2_matrix(G)[0, 1] == pytest.approx(direct, rel=1e-10)
    assert np.allclose(np.diag(mmd2_matrix(G)), 0)


def test_node_means_window_and_ema_and_missing_nodes():
    nm = NodeMeans(3, 2, ema=0.5, min_count=2)
    nm.add(torch.tensor([[1.0, 0], [3.0, 0], [0, 2.0], [0, 4.0], [9.0, 9.0]]), torch.tensor([0, 0, 1, 1, 2]),
           torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0]))
    skipped = nm.commit()
    assert skipped == [2]                      # one sample < min_count: no made-up mean
    m = nm.mean_matrix()
    assert torch.allclose(m[0], torch.tensor([2.0, 0.0], dtype=torch.float64))  # bias-corrected first window
    assert torch.allclose(m[1], torch.tensor([0.0, 3.0], dtype=torch.float64))
    assert torch.all(m[2] == 0) and not bool(nm.seen[2])
    assert nm.mean_loss()[0].item() == pytest.approx(2.0)
    nm.add(torch.tensor([[4.0, 0], [4.0, 0]]), torch.tensor([0, 0]))
    assert nm.commit() == [1, 2]               # node 1 absent this window: keeps its mean
    assert torch.allclose(nm.mean_matrix()[1], torch.tensor([0.0, 3.0], dtype=torch.float64))
    assert nm.mean_matrix()[0, 0].item() == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)
    state = nm.state_dict()
    other = NodeMeans(3, 2, ema=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.mean_matrix(), nm.mean_matrix())
    with pytest.raises(GraphError, match="expected z"):
        nm.add(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(GraphError, match="shape"):
        NodeMeans(4, 2).load_state_dict(state)


def test_affinity_laplacian_and_knn():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(6, 8))
    M[5] = 0.0                                 # a node never seen
    G = gram(M)
    W = cosine_affinity(G)
    assert np.allclose(np.diag(W), 1) and np.allclose(W, W.T) and np.all(np.abs(W) <= 1 + 1e-12)
    assert np.allclose(W[5, :5], 0)
    L = laplacian(W)
    assert np.allclose(L.sum(1), 0) and np.linalg.eigvalsh(L).min() > -1e-10
    W5 = W[:5, :5]
    S = knn_sparsify(W5, 2)
    assert np.allclose(S, S.T)
    for i in range(5):  # each node keeps (at least) its 2 strongest edges, and only kept edges survive
        off = np.where(np.arange(5) != i, W5[i], -np.inf)
        assert set(np.argsort(-off)[:2]) <= set(np.flatnonzero(S[i]))
    assert np.count_nonzero(S) < np.count_nonzero(W5)
    with pytest.raises(GraphError, match="NaN"):
        gram(np.array([[np.nan, 1.0]]))
