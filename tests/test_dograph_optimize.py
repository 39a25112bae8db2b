"""The graph-constrained optimisation: Pyomo with a real solver against the numpy reference."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from dograph_core import optimize as opt
from dograph_core.graph import cosine_affinity, gram, knn_sparsify, laplacian, normalise_by_diag


def instance(rng, objective: str, k: int, tau_kl: float = 0.1, floor: float = 0.0, cap: float = 1.0, knn=None):
    M = rng.normal(size=(k, 12))
    G = gram(M)
    W = G if objective == "A1" else cosine_affinity(G)
    if knn:
        W = knn_sparsify(W, knn)
    W = normalise_by_diag(W)
    return opt.Problem(W=W, prev=rng.dirichlet(np.ones(k)), objective=objective, beta=rng.dirichlet(np.ones(k)),
                       b=M @ rng.normal(size=12) / np.max(np.diag(G)), L=laplacian(W), c=1.0, lam=0.1,
                       tau_kl=tau_kl, lo=floor, hi=cap)


def on_simplex_within_bounds(a, p):
    return abs(a.sum() - 1) < 1e-8 and np.all(a >= p.lo - 1e-8) and np.all(a <= p.hi + 1e-8)


@pytest.mark.parametrize("objective", ["main", "A1", "A2"])
def test_pyomo_and_numpy_reference_agree(objective):
    rng = np.random.default_rng({"main": 0, "A1": 1, "A2": 2}[objective])
    for trial in range(4):
        k = int(rng.integers(3, 10))
        floor, cap = (0.0, 1.0) if trial % 2 == 0 else (0.03, 0.35)
        p = instance(rng, objective, k, floor=floor, cap=cap)
        a_ref = opt.solve_mirror(p)
        a_pyo, info = opt.solve_pyomo(p)
        assert info["solver"] == "ripopt"
        assert np.max(np.abs(a_ref - a_pyo)) < 1e-4, (objective, trial, a_ref, a_pyo)
        assert on_simplex_within_bounds(a_ref, p) and on_simplex_within_bounds(a_pyo, p)
        # and it is an optimum: no feasible random perturbation does better
        for _ in range(20):
            q = opt.project_kl(np.log(a_ref) + 0.3 * rng.normal(size=k), p.lo, p.hi)
            assert p.value(q) <= p.value(a_ref) + 1e-9


def test_pure_qp_goes_to_highs_and_agrees():
    rng = np.random.default_rng(3)
    p = instance(rng, "main", 6, tau_kl=0.0, cap=0.5)
    assert opt.choose_solver(p) == "highs"
    a, info = opt.solve_pyomo(p)
    assert info["solver"] == "highs"
    ref = opt.solve_mirror(p)
    assert p.value(a) == pytest.approx(p.value(ref), abs=1e-6)
    assert on_simplex_within_bounds(a, p)


def test_sparse_knn_formulation_at_64_nodes():
    rng = np.random.default_rng(4)
    p = instance(rng, "main", 64, knn=6, cap=0.2)
    a, _ = opt.solve_pyomo(p)
    assert np.max(np.abs(a - opt.solve_mirror(p))) < 1e-4
    assert on_simplex_within_bounds(a, p)


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
        opt.solve(opt.Problem(W=np.eye(4), prev=np.ones(4) / 4, beta=np.ones(4) / 4, lo=lo, hi=hi))
    assert called == []


def test_missing_solver_falls_back_to_reference_with_a_log(caplog, monkeypatch):
    p = instance(np.random.default_rng(5), "main", 5)
    with pytest.raises(opt.SolverUnavailableError, match="not installed"):
        opt.solve(p, solver="no_such_solver", fallback=False)
    with caplog.at_level(logging.WARNING):
        a, info = opt.solve(p, solver="no_such_solver", fallback=True)
    assert info["solver"] == "numpy-fallback" and "not installed" in caplog.text
    assert np.max(np.abs(a - opt.solve_mirror(p))) < 1e-9

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


def test_smoothing_stays_in_bounds():
    a = np.array([0.7, 0.3, 0.0])
    lo, hi = np.zeros(3), np.array([0.7, 1, 1])
    s = opt.smooth(a, 0.01, lo, hi)
    assert abs(s.sum() - 1) < 1e-12 and np.all(s <= hi + 1e-12) and s[2] > 0


def test_bad_problem_inputs():
    with pytest.raises(opt.OptimizationError, match="needs beta"):
        opt.Problem(W=np.eye(3), prev=np.ones(3) / 3)
    with pytest.raises(opt.OptimizationError, match="finite"):
        opt.Problem(W=np.full((3, 3), np.nan), prev=np.ones(3) / 3, beta=np.ones(3))
