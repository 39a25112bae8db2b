"""The graph-constrained optimisation (F1 / F2 / A1, optional F3 constraint): Pyomo with a real solver against
the SLSQP reference, and hand-checkable properties of each formulation."""
from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import pytest

from dograph_core import optimize as opt

DELTA = opt.F1_DELTA


def transfer(M):
    """T = diag(G)^-1 G for the Gram matrix G = M M^T of node mean gradients (rows of M)."""
    G = M @ M.T
    return G / np.diag(G)[:, None]


def laplacian_of_positive_cosine(M):
    G = M @ M.T
    d = np.sqrt(np.diag(G))
    W = np.clip(G / np.outer(d, d), 0, None)
    np.fill_diagonal(W, 0)
    return np.diag(W.sum(1)) - W


def instance(rng, objective, k, tau_kl, f3, floor=0.0, cap=1.0, d=12):
    # d >= K: T has full rank, so F2's optimum is unique (a rank-deficient T leaves F2 ties in a)
    M = rng.normal(size=(k, d)) * rng.uniform(0.5, 2.0, size=(k, 1))  # unequal norms: T is not symmetric
    G = M @ M.T
    s = np.max(np.diag(G))
    p = opt.Problem(T=transfer(M), prev=rng.dirichlet(np.ones(k)), objective=objective,
                    beta=rng.dirichlet(np.ones(k)), G=G / s, b=M @ rng.normal(size=d) / s,
                    tau_kl=tau_kl, lo=floor, hi=cap)
    if f3:  # half the roughness of the unconstrained optimum, so the constraint is active
        L = laplacian_of_positive_cosine(M)
        a = opt.solve_reference(p)
        p = dataclasses.replace(p, L=L, rho=max(0.0, 0.5 * float(a @ L @ a)))
    return p


def random_feasible_near(rng, a, p, theta):
    """``(1 - theta) a + theta r`` for a random feasible ``r``; with F3, shrunk towards the constant point
    ``u`` (``L u = 0``) until ``a^T L a <= rho``."""
    r = opt.project_kl(rng.normal(size=p.k) * 2, p.lo, p.hi)
    q = (1 - theta) * a + theta * r
    if p.has_f3 and p.f3_value(q) > p.rho:
        u = opt.project_kl(np.zeros(p.k), p.lo, p.hi)
        assert np.ptp(u) < 1e-12
        q = u + np.sqrt(p.rho / p.f3_value(q - u)) * (q - u)
    return q


CASES = [("F1", 0.1), ("F1", 0.0), ("F2", 0.0), ("F2", 0.1), ("A1", 0.0), ("A1", 0.1)]


@pytest.mark.parametrize("f3", [False, True], ids=["plain", "F3"])
@pytest.mark.parametrize("objective,tau_kl", CASES, ids=[f"{o}-kl{t}" for o, t in CASES])
def test_pyomo_and_reference_agree_and_are_optimal(objective, tau_kl, f3):
    rng = np.random.default_rng(sum(map(ord, objective)) + int(10 * tau_kl) + 100 * f3)
    for trial in range(3):
        k = int(rng.integers(3, 9))
        floor, cap = (0.0, 1.0) if trial % 2 == 0 else (0.02, 0.4)
        p = instance(rng, objective, k, tau_kl, f3, floor, cap)
        a_ref = opt.solve_reference(p)
        a_pyo, info = opt.solve(p, fallback=False)
        lp_or_qp = objective in ("F2", "A1") and tau_kl == 0 and not p.f3_quadratic
        assert info["solver"] == ("highs" if lp_or_qp else "ripopt")
        assert np.max(np.abs(a_ref - a_pyo)) < 1e-4, (trial, a_ref, a_pyo)
        assert p.feasible(a_ref) and p.feasible(a_pyo, tol=1e-7)
        if p.f3_quadratic:
            assert p.f3_value(a_ref) == pytest.approx(p.rho, rel=1e-6)  # active by construction
        best = max(p.value(a_ref), p.value(a_pyo))
        for theta in np.geomspace(1e-3, 0.5, 20):
            q = random_feasible_near(rng, a_ref, p, theta)
            assert p.feasible(q)
            assert p.value(q) <= best + 1e-7, (trial, theta)


@pytest.mark.parametrize("solver", ["auto", "numpy"])
def test_graph_off_gives_beta(solver):
    beta = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    k = beta.size
    prev = np.ones(k) / k
    f1 = opt.Problem(T=np.eye(k), prev=prev, objective="F1", beta=beta, tau_kl=0.0)
    a1, _ = opt.solve(f1, solver, fallback=False)
    # KKT of sum beta_j log(delta + a_j) on the simplex: a_j = beta_j (1 + K delta) - delta
    assert np.max(np.abs(a1 - (beta * (1 + k * DELTA) - DELTA))) < 1e-6
    assert np.max(np.abs(a1 - beta)) < 1e-3
    f2 = opt.Problem(T=np.eye(k), prev=prev, objective="F2", beta=beta, tau_kl=0.0)
    a2, _ = opt.solve(f2, solver, fallback=False)
    assert np.max(np.abs(a2 - beta)) < 1e-6
    # off_problem removes a graph (and its F3 constraint) and gives the same answers
    M = np.random.default_rng(0).normal(size=(k, 4))
    on = opt.Problem(T=transfer(M), prev=prev, objective="F2", beta=beta, tau_kl=0.0,
                     L=laplacian_of_positive_cosine(M), rho=1e-3)
    off = opt.off_problem(on)
    assert np.array_equal(off.T, np.eye(k)) and not off.has_f3
    assert np.max(np.abs(opt.solve(off, solver, fallback=False)[0] - beta)) < 1e-6


@pytest.mark.parametrize("objective", ["F1", "F2"])
def test_positive_transfer_needs_less_direct_weight(objective):
    # Node 2 gets 0.8 of node 0's progress per unit weight on node 0; node 0 is held at >= 0.6 by its floor.
    T = np.eye(3)
    T[2, 0] = 0.8
    p = opt.Problem(T=T, prev=np.ones(3) / 3, objective=objective, beta=np.ones(3) / 3, tau_kl=0.0,
                    lo=[0.6, 0.0, 0.0])
    a, _ = opt.solve(p, fallback=False)
    a_off, _ = opt.solve(opt.off_problem(p), fallback=False)
    # graph off: (0.6, 0.2, 0.2) (F1 up to delta). Graph on, node 2 already progresses 0.8 a_0 >= 0.48 through
    # node 0, and a_2 = 0 by hand: F2 tops up node 1 only, (0.6, 0.4, 0) with t / 3 = 0.4; F1 (up to delta)
    # maximises log a_0 + log a_1 + log(0.8 a_0), so 2 / a_0 = 1 / a_1: (2/3, 1/3, 0), above node 0's floor.
    assert np.max(np.abs(a_off - [0.6, 0.2, 0.2])) < 2e-3
    if objective == "F2":
        assert np.max(np.abs(a - [0.6, 0.4, 0.0])) < 1e-6
    else:
        assert np.max(np.abs(a - [2 / 3, 1 / 3, 0.0])) < 2e-3
    assert a[2] < a_off[2] - 0.19


def conflict_T(g, h):
    """Node 2 conflicts with nodes 0 and 1: weight on node 2 costs them g each (T[j, 2] = -g), weight on them
    costs node 2 h each (T[2, j] = -h)."""
    T = np.eye(3)
    T[:2, 2] = -g
    T[2, :2] = -h
    return T


@pytest.mark.parametrize("g,h", [(0.6, 0.15), (0.3, 0.3)], ids=["node2-larger-gradient", "symmetric"])
def test_conflicting_node(g, h):
    # From a Gram matrix, T[j, 2] = <m_j, m_2> / |m_j|^2 and T[2, j] = <m_j, m_2> / |m_2|^2: the asymmetric case
    # (g > h) is a conflicting node with the larger gradient, the symmetric one equal norms.
    beta, prev = np.ones(3) / 3, np.ones(3) / 3
    f2 = opt.Problem(T=conflict_T(g, h), prev=prev, objective="F2", beta=beta, tau_kl=0.0)
    a2, _ = opt.solve(f2, fallback=False)
    # F2 equalises progress: x - g z = z - 2 h x with a = (x, x, z), i.e. z / x = (1 + 2h) / (1 + g).
    x = 1 / (2 + (1 + 2 * h) / (1 + g))
    assert np.max(np.abs(a2 - [x, x, 1 - 2 * x])) < 1e-6
    if g > h:   # node 2 hurts the others more than they hurt it: it gets less than 1/3 (0.289 here)
        assert a2[2] < 1 / 3 - 0.04
    else:       # symmetric conflict: max-min compensates node 2 for the harm it receives (0.381 here)
        assert a2[2] > 1 / 3 + 0.04

    # F1 with the default shift c_j = delta + max(0, -min_k T_jk): on the simplex c_j + (T a)_j =
    # delta + ((T - min_k T_jk) a)_j, with the non-negative rows (1 + g, g, 0), (g, 1 + g, 0), (0, 0, 1 + h):
    # the conflict becomes mutual help between nodes 0 and 1, and with a = (x, x, z) the objective is
    # 2 log((1 + 2g) x) + log((1 + h) z) up to delta, maximised at x = z = 1/3 whatever g and h (the log is
    # scale-invariant). The default shift makes F1 blind to this conflict: it leans against node 2 by O(delta).
    f1 = opt.Problem(T=conflict_T(g, h), prev=prev, objective="F1", beta=beta, tau_kl=0.0)
    a1, _ = opt.solve(f1, fallback=False)
    assert np.max(np.abs(a1 - 1 / 3)) < DELTA
    assert a1[2] < 1 / 3
    # a larger uniform shift (F1 closer to total progress sum_j beta_j (T a)_j) gives node 2 clearly less
    f1s = opt.Problem(T=conflict_T(g, h), prev=prev, objective="F1", beta=beta, tau_kl=0.0, shift=np.ones(3))
    assert opt.solve(f1s, fallback=False)[0][2] < 1 / 3 - 0.05


@pytest.mark.parametrize("objective", ["F1", "F2"])
def test_f3_constraint_binds_when_beta_is_rough_across_neighbours(objective):
    # Nodes 0 and 1 are neighbours (W_01 = 1): a^T L a = (a_0 - a_1)^2; beta's roughness is 0.7^2 = 0.49.
    L = np.array([[1.0, -1, 0], [-1, 1, 0], [0, 0, 0]])
    beta = np.array([0.8, 0.1, 0.1])
    base = dict(T=np.eye(3), prev=np.ones(3) / 3, objective=objective, beta=beta, tau_kl=0.0, L=L)
    rho = 0.04
    a, info = opt.solve(opt.Problem(**base, rho=rho), fallback=False)
    assert info["solver"] == "ripopt"
    assert (a[0] - a[1]) ** 2 == pytest.approx(rho, abs=1e-7)  # active
    assert 0 < a[0] - a[1] < beta[0] - beta[1]
    if objective == "F2":  # by hand: a = (0.8 t, 0.8 t - 0.2, 0.1 t) with t = 1.2 / 1.7
        t = 1.2 / 1.7
        assert np.max(np.abs(a - [0.8 * t, 0.8 * t - 0.2, 0.1 * t])) < 1e-6
    loose = opt.Problem(**base, rho=1.0)
    a_loose, _ = opt.solve(loose, fallback=False)
    a_unc, _ = opt.solve(opt.off_problem(loose), fallback=False)
    assert (a_loose[0] - a_loose[1]) ** 2 < 1.0 - 0.1  # inactive
    assert np.max(np.abs(a_loose - a_unc)) < 1e-6


@pytest.mark.parametrize("rho", [0.0, 1e-33], ids=["zero", "float-noise"])
def test_f3_with_rho_zero_is_the_linear_constraint(rho):
    # Two components {0, 1} and {2, 3}: a^T L a = 0 iff a_0 = a_1 and a_2 = a_3 (no strictly feasible point, so
    # the constraint is imposed as L a = 0; F2 stays an LP for HiGHS).
    W = np.zeros((4, 4))
    W[0, 1] = W[1, 0] = 1.0
    W[2, 3] = W[3, 2] = 0.5
    L = np.diag(W.sum(1)) - W
    beta = np.array([0.4, 0.2, 0.3, 0.1])
    p = opt.Problem(T=np.eye(4), prev=np.ones(4) / 4, objective="F2", beta=beta, tau_kl=0.0, L=L, rho=rho)
    assert not p.f3_quadratic and opt.choose_solver(p) == "highs"
    a, info = opt.solve(p, fallback=False)
    # by hand: a = (x, x, y, y), 2x + 2y = 1, max min(x / 0.4, y / 0.3): x / 0.4 = y / 0.3
    assert np.max(np.abs(a - np.array([0.4, 0.4, 0.3, 0.3]) / 1.4)) < 1e-6
    assert np.max(np.abs(opt.solve_reference(p) - a)) < 1e-6
    f1 = dataclasses.replace(p, objective="F1", tau_kl=0.1)
    a1, info = opt.solve(f1, fallback=False)
    assert info["solver"] == "ripopt" and abs(a1[0] - a1[1]) < 1e-7 and abs(a1[2] - a1[3]) < 1e-7
    assert np.max(np.abs(opt.solve_reference(f1) - a1)) < 1e-4


def test_bounds_that_pin_the_weights(monkeypatch):
    p = opt.Problem(T=np.eye(4), prev=np.ones(4) / 4, objective="F1", beta=np.array([0.7, 0.1, 0.1, 0.1]),
                    hi=[0.4, 0.2, 0.2, 0.2])  # caps sum to 1: the only feasible point
    assert np.allclose(opt.solve(p, fallback=False)[0], [0.4, 0.2, 0.2, 0.2])
    assert np.allclose(opt.solve_reference(p), [0.4, 0.2, 0.2, 0.2])
    L = np.array([[1.0, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(opt.OptimizationError, match="violates the F3 constraint"):
        opt.solve(dataclasses.replace(p, L=L, rho=0.01), fallback=False)


def test_reference_accepts_a_stall_only_at_a_kkt_point():
    # min -x_0 subject to x_0 + x_1 = 1, 0 <= x <= 1: a KKT point at (1, 0), none at (0.5, 0.5)
    cons = [{"type": "eq", "fun": lambda x: np.array([x.sum() - 1]), "jac": lambda x: np.ones((1, 2))}]
    bounds = [(0.0, 1.0), (0.0, 1.0)]
    grad = np.array([-1.0, 0.0])
    assert opt._kkt_residual(np.array([1.0, 0.0]), grad, cons, bounds) < 1e-12
    assert opt._kkt_residual(np.array([0.5, 0.5]), grad, cons, bounds) > 0.4
    assert opt._kkt_residual(np.array([0.7, 0.7]), grad, cons, bounds) == np.inf  # infeasible


def test_a1_matches_an_explicit_target():
    rng = np.random.default_rng(7)
    M = rng.normal(size=(3, 5))  # node means m_k (rows), affinely independent
    G = M @ M.T
    s = np.max(np.diag(G))

    def a1(target, **kw):
        return opt.Problem(T=np.eye(3), prev=np.ones(3) / 3, objective="A1", G=G / s, b=M @ target / s,
                           tau_kl=0.0, **kw)

    a, info = opt.solve(a1(M[1]), fallback=False)
    assert info["solver"] == "highs"
    assert np.max(np.abs(a - [0, 1, 0])) < 1e-6
    # an arbitrary target: the argmin of ||sum a_k m_k - m_target||^2 over a brute-force simplex grid
    target = 0.2 * M[0] + 0.1 * M[2] + 0.3 * rng.normal(size=5)
    p = a1(target, hi=0.7)
    a, _ = opt.solve(p, fallback=False)
    n = 400
    grid = np.array([(i, j, n - i - j) for i, j in itertools.product(range(n + 1), repeat=2) if i + j <= n]) / n
    grid = grid[np.all(grid <= 0.7 + 1e-12, axis=1)]
    dist = np.sum((grid @ M - target) ** 2, axis=1)
    best = grid[np.argmin(dist)]
    assert np.max(np.abs(a - best)) <= 2.0 / n
    assert np.sum((a @ M - target) ** 2) <= dist.min() + 1e-12
    assert np.max(np.abs(a - opt.solve_reference(p))) < 1e-6


@pytest.mark.parametrize("lo,hi,msg", [
    (0.3, 1.0, "floors sum to 1.2 > 1"),
    (0.0, 0.2, "caps sum to 0.8 < 1"),
    ([0.5, 0, 0, 0], [0.4, 1, 1, 1], "floor above cap"),
    (-0.1, 1.0, "floors must be >= 0"),
])
def test_infeasible_bounds_are_refused_before_solving(lo, hi, msg, monkeypatch):
    called = []
    monkeypatch.setattr(opt, "_pyomo_solver", lambda name: called.append(name))
    with pytest.raises(opt.InfeasibleBoundsError, match=msg):
        opt.solve(opt.Problem(T=np.eye(4), prev=np.ones(4) / 4, beta=np.ones(4) / 4, lo=lo, hi=hi))
    assert called == []


def _ok(**kw):
    base = dict(T=np.eye(3), prev=np.ones(3) / 3, objective="F1", beta=np.ones(3) / 3)
    return opt.Problem(**{**base, **kw})


@pytest.mark.parametrize("kw,msg", [
    (dict(T=np.eye(3)[:2]), r"T must be a square \[K, K\] matrix, got shape \(2, 3\)"),
    (dict(T=np.full((3, 3), np.nan)), "T must be finite"),
    (dict(T=2 * np.eye(3)), "T must have a unit diagonal"),
    (dict(prev=np.ones(4) / 4), r"prev must have shape \(3,\)"),
    (dict(beta=None), "objective 'F1' needs beta"),
    (dict(objective="F2", beta=None), "objective 'F2' needs beta"),
    (dict(beta=np.array([0.5, np.nan, 0.5])), "beta must be finite"),
    (dict(beta=np.ones(2) / 2), r"beta must have shape \(3,\)"),
    (dict(beta=np.array([1.0, -0.5, 0.5])), "beta must be non-negative"),
    (dict(objective="A1"), "objective 'A1' needs G"),
    (dict(objective="A1", G=-np.eye(3), b=np.zeros(3)), "G must be positive semidefinite"),
    (dict(objective="main"), "unknown objective 'main'; expected one of F1, F2, A1"),
    (dict(tau_kl=-0.1), "tau_kl must be finite and >= 0"),
    (dict(L=np.zeros((3, 3)), rho=-1.0), "rho must be finite and >= 0"),
    (dict(rho=0.1), "rho .* without the Laplacian L"),
    (dict(L=-np.eye(3), rho=0.1), "L must be positive semidefinite"),
    (dict(lo=np.zeros(2)), r"lo must be a scalar or have shape \(3,\)"),
    (dict(T=np.array([[1.0, 0, -0.5], [0, 1, 0], [0, 0, 1]]), shift=np.full(3, 0.1)), r"rows \[0\] violate it"),
])
def test_bad_inputs_raise_clear_errors(kw, msg):
    with pytest.raises(opt.OptimizationError, match=msg):
        _ok(**kw)


def test_solver_names_availability_and_fallback(caplog, monkeypatch):
    p = _ok(tau_kl=0.1)
    with pytest.raises(opt.SolverUnavailableError, match="not installed"):
        opt.solve(p, solver="no_such_solver", fallback=False)
    with caplog.at_level(logging.WARNING):
        a, info = opt.solve(p, solver="no_such_solver", fallback=True)
    assert info["solver"] == "numpy-fallback" and "not installed" in caplog.text
    assert np.max(np.abs(a - opt.solve_reference(p))) < 1e-12
    with pytest.raises(opt.OptimizationError, match="HiGHS solves LPs and convex QPs only"):
        opt.solve(p, solver="highs", fallback=True)  # a configuration error, not a solver failure

    class NotOptimal:
        options: dict = {}

        def solve(self, model, **kw):
            from pyomo.opt import SolverResults, TerminationCondition

            r = SolverResults()
            r.solver.termination_condition = TerminationCondition.infeasible
            return r

    monkeypatch.setattr(opt, "_pyomo_solver", lambda name: NotOptimal())
    with pytest.raises(opt.OptimizationError, match="did not reach optimality: infeasible"):
        opt.solve_pyomo(p, solver="ripopt")


def test_sparse_model_at_64_nodes():
    rng = np.random.default_rng(4)
    k = 64
    M = rng.normal(size=(k, 16))
    T = transfer(M)
    far = np.argsort(-np.abs(T), axis=1)[:, 7:]  # keep each row's 7 largest |entries| (the diagonal among them)
    np.put_along_axis(T, far, 0.0, axis=1)
    L = laplacian_of_positive_cosine(M)
    p = opt.Problem(T=T, prev=rng.dirichlet(np.ones(k)), objective="F1", beta=rng.dirichlet(np.ones(k)),
                    tau_kl=0.1, L=L, rho=0.05, lo=0.002, hi=0.1)
    a, info = opt.solve(p, fallback=False)
    assert info["solver"] == "ripopt" and p.feasible(a, tol=1e-7)
    assert np.max(np.abs(a - opt.solve_reference(p))) < 1e-4


def test_smoothing_stays_in_bounds():
    a = np.array([0.7, 0.3, 0.0])
    lo, hi = np.zeros(3), np.array([0.7, 1, 1])
    s = opt.smooth(a, 0.01, lo, hi)
    assert abs(s.sum() - 1) < 1e-12 and np.all(s <= hi + 1e-12) and s[2] > 0
