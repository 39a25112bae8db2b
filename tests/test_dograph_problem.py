"""The optimisation the mixer builds from node mean gradients: the graph changes the weights in the
direction the first-order argument says (hand-checkable 3-node geometries)."""
from __future__ import annotations

import numpy as np

from dograph_core import optimize as opt
from dograph_core.mixers.dograph_config import DoGraphConfig
from dograph_core.mixers.dograph_nodes import build_problem, transfer

UNIFORM = np.full(3, 1 / 3)


def solve(means, beta=UNIFORM, **cfg):
    c = DoGraphConfig(**{"tau_kl": 0.0, "rho": None, **cfg})
    p = build_problem(c, np.asarray(means, float), np.asarray(beta, float), UNIFORM, np.zeros(3), np.ones(3))
    return opt.solve(p, "numpy")[0], p


def test_transfer_is_the_gram_matrix_over_each_rows_own_norm():
    m = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    T = transfer(m @ m.T, "gram")
    assert np.allclose(T, [[1, 0, 1], [0, 1, 0.5], [0.5, 1, 1]])
    assert np.allclose(transfer(m @ m.T, "off"), np.eye(3))


def test_graph_off_gives_beta():
    m = np.random.default_rng(0).normal(size=(3, 8))
    beta = np.array([0.5, 0.3, 0.2])
    a, _ = solve(m, beta, graph="off")
    assert np.allclose(a, beta * (1 + 3e-3) - 1e-3, atol=1e-6)   # exactly beta up to F1's 1e-3 margin


def test_a_node_with_a_large_conflicting_gradient_gets_less():
    """Nodes 0 and 1 are orthogonal; node 2's gradient is twice as large and opposes both: weight on it
    undoes their progress more than theirs undoes its own, so it gets less than uniform (and than graph off)."""
    m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.6, -0.6, 1.8]])
    a, p = solve(m)
    assert p.T[0, 2] < 0 and p.T[2, 0] < 0
    assert a[2] < 0.2 and abs(a[0] - a[1]) < 1e-6
    a_off, _ = solve(m, graph="off")
    assert a[2] < a_off[2] - 0.1


def test_a_node_fed_by_a_heavily_weighted_neighbour_needs_less_direct_weight():
    """Node 2 lags (largest beta) and its small gradient is aligned with node 0's large one: a step on
    node 0 gives node 2 about 3x the progress a step on node 2 itself would (T[2, 0] = 2.9), so F1 gives
    node 2 less direct weight than its beta and node 0 more."""
    m = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.3]])
    beta = np.array([0.4, 0.15, 0.45])
    a, _ = solve(m, beta)
    a_off, _ = solve(m, beta, graph="off")
    assert a[2] < a_off[2] - 0.05 and a[0] > a_off[0]


def test_f3_binds_when_beta_is_rough_across_neighbours():
    """Nodes 0 and 1 have nearly the same gradient (neighbours) but very different beta: with the F3
    constraint their weights move together; the constraint is active at the solution."""
    m = np.array([[1.0, 0.05, 0.0], [1.0, -0.05, 0.0], [0.0, 0.0, 1.0]])
    beta = np.array([0.8, 0.05, 0.15])
    free, _ = solve(m, beta, rho=None)
    tied, p = solve(m, beta, rho=0.5)
    assert abs(tied[0] - tied[1]) < abs(free[0] - free[1]) - 0.1
    assert abs(float(tied @ p.L @ tied) - p.rho) < 1e-6                  # active


def test_the_kl_anchor_is_beta_so_updates_do_not_walk():
    """Under a uniform beta the graph may move the weights only as far as tau_kl allows from beta, whatever
    the previous weights: repeated updates do not drift to F1's own (gradient-norm) optimum."""
    m = np.random.default_rng(1).normal(size=(3, 6)) + 2.0        # aligned gradients of different norms
    c = DoGraphConfig(tau_kl=0.3)
    a1 = opt.solve(build_problem(c, m, UNIFORM, np.array([0.8, 0.1, 0.1]), np.zeros(3), np.ones(3)), "numpy")[0]
    a2 = opt.solve(build_problem(c, m, UNIFORM, np.array([0.1, 0.1, 0.8]), np.zeros(3), np.ones(3)), "numpy")[0]
    assert np.allclose(a1, a2, atol=1e-6)
    off = DoGraphConfig(tau_kl=0.3, graph="off")
    a_off = opt.solve(build_problem(off, m, UNIFORM, np.array([0.8, 0.1, 0.1]), np.zeros(3), np.ones(3)), "numpy")[0]
    assert np.allclose(a_off, UNIFORM, atol=1e-3)
    loose = opt.solve(build_problem(DoGraphConfig(tau_kl=0.05), m, UNIFORM, UNIFORM, np.zeros(3), np.ones(3)), "numpy")[0]
    assert np.abs(loose - UNIFORM).sum() > np.abs(a1 - UNIFORM).sum()   # a smaller price, a larger move


def test_a_node_with_a_near_zero_mean_gradient_does_not_take_over():
    """Rows are divided by their own squared norm floored at a tenth of the median: a node whose mean
    gradient is 5% of the others' and opposed to them gets a bounded row, not +-4 everywhere."""
    m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.05, -0.05, 0.0]])
    T = transfer(m @ m.T, "gram")
    assert np.abs(T[2]).max() <= 1.0 + 1e-12 and T[2, 2] == 1.0
    a, _ = solve(m, np.array([0.425, 0.425, 0.15]))
    assert a[2] < 0.3
