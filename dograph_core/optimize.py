"""The graph-constrained optimisation of the domain weights (reference note, step 4).

Weights ``a`` on the simplex with per-node floors ``lo`` and caps ``hi``. Objectives (maximised):

* ``main``: ``beta^T W a - (c/2) a^T W a - lam a^T L a - tau_kl KL(a || prev)``
  (progress-balancing targets ``beta``, coupling through the graph ``W``, Laplacian smoothness,
  closeness to the previous weights);
* ``A1`` (MMD matching): ``-(a^T W a - 2 b^T a) - lam a^T L a - tau_kl KL``, i.e. minimising
  ``||sum_k a_k m_k - m_target||^2`` when ``W`` is the Gram matrix and ``b = M m_target``;
* ``A2`` (max-min progress, log-sum-exp smoothed with temperature ``mu``):
  ``-mu log sum_j exp(-(W a)_j / mu) - lam a^T L a - tau_kl KL``.

Two solvers of the *same* problem: :func:`solve_pyomo` (a Pyomo model solved by a real solver:
``ripopt`` for the NLP, HiGHS for a pure QP) and :func:`solve_mirror` (numpy proximal mirror ascent,
the reference). The Pyomo model is written sparsely: only the non-zero entries of ``W`` and ``L``
appear, so a k-NN graph with K = 512 nodes builds and solves in seconds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

log = logging.getLogger(__name__)

Objective = Literal["main", "A1", "A2"]


class OptimizationError(RuntimeError):
    """The solver failed or reported a non-optimal result; callers keep the previous weights."""


class InfeasibleBoundsError(OptimizationError, ValueError):
    """Floors and caps that no weight vector on the simplex can satisfy."""


class SolverUnavailableError(OptimizationError):
    """The requested Pyomo solver is not installed."""


@dataclass
class Problem:
    W: np.ndarray                      # [K, K] symmetric affinity (main, A2) or Gram (A1), normalised
    prev: np.ndarray                   # [K] previous weights (KL anchor), on the simplex
    objective: Objective = "main"
    beta: Optional[np.ndarray] = None  # [K] progress targets (main)
    b: Optional[np.ndarray] = None     # [K] linear term M m_target (A1)
    L: Optional[np.ndarray] = None     # [K, K] Laplacian (None = no smoothness term)
    c: float = 1.0
    lam: float = 0.1
    tau_kl: float = 0.1
    mu: float = 0.05
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        k = self.W.shape[0]
        if self.W.shape != (k, k) or not np.all(np.isfinite(self.W)):
            raise OptimizationError(f"W must be a finite [K, K] matrix, got shape {self.W.shape}")
        self.W = 0.5 * (self.W + self.W.T)
        self.lo = np.broadcast_to(np.asarray(self.lo if np.size(self.lo) else 0.0, float), (k,)).copy()
        self.hi = np.broadcast_to(np.asarray(self.hi if np.size(self.hi) else 1.0, float), (k,)).copy()
        check_bounds(self.lo, self.hi)
        self.L = np.zeros((k, k)) if self.L is None else np.asarray(self.L, float)
        prev = np.clip(np.asarray(self.prev, float), 1e-12, None)
        self.prev = prev / prev.sum()
        if self.objective == "main" and self.beta is None:
            raise OptimizationError("objective 'main' needs beta (progress targets)")
        if self.objective == "A1" and self.b is None:
            raise OptimizationError("objective 'A1' needs b (the target's projection M m_target)")
        if self.objective not in ("main", "A1", "A2"):
            raise OptimizationError(f"unknown objective {self.objective!r}; expected main, A1 or A2")
        if self.tau_kl < 0 or self.lam < 0 or self.c < 0 or self.mu <= 0:
            raise OptimizationError("c, lam and tau_kl must be >= 0 and mu > 0")

    @property
    def k(self) -> int:
        return self.W.shape[0]

    def value(self, a: np.ndarray) -> float:
        """The objective (to maximise) at ``a``."""
        return self._smooth(a) - self.tau_kl * float(np.sum(a * np.log(np.clip(a, 1e-300, None) / self.prev)))

    def _smooth(self, a: np.ndarray) -> float:
        W, L = self.W, self.L
        reg = -self.lam * a @ L @ a
        if self.objective == "main":
            return float(self.beta @ W @ a - 0.5 * self.c * a @ W @ a + reg)
        if self.objective == "A1":
            return float(-(a @ W @ a - 2 * self.b @ a) + reg)
        y = -(W @ a) / self.mu
        mx = y.max()
        return float(-self.mu * (mx + np.log(np.exp(y - mx).sum())) + reg)

    def grad_smooth(self, a: np.ndarray) -> np.ndarray:
        W, L = self.W, self.L
        g = -2 * self.lam * (L @ a)
        if self.objective == "main":
            return g + W @ self.beta - self.c * (W @ a)
        if self.objective == "A1":
            return g - 2 * (W @ a) + 2 * self.b
        y = -(W @ a) / self.mu
        s = np.exp(y - y.max())
        return g + W.T @ (s / s.sum())

    def curvature(self) -> float:
        """A bound on |Hessian entries| of the smooth part (the l1-smoothness constant for the step size)."""
        base = 2 * self.lam * np.abs(self.L).max()
        if self.objective == "main":
            return base + self.c * np.abs(self.W).max() + 1e-12
        if self.objective == "A1":
            return base + 2 * np.abs(self.W).max() + 1e-12
        return base + np.abs(self.W).max() ** 2 / self.mu + 1e-12


def check_bounds(lo: np.ndarray, hi: np.ndarray) -> None:
    """Refuse bounds no simplex point satisfies, before any solver runs."""
    if np.any(lo < 0) or np.any(hi > 1 + 1e-12):
        raise InfeasibleBoundsError(f"floors must be >= 0 and caps <= 1; got floors {lo.tolist()}, caps {hi.tolist()}")
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        raise InfeasibleBoundsError(f"floor above cap for nodes {bad.tolist()}: floors {lo[bad].tolist()}, caps {hi[bad].tolist()}")
    if lo.sum() > 1 + 1e-12:
        raise InfeasibleBoundsError(
            f"floors sum to {lo.sum():.4g} > 1 over {lo.size} nodes: lower the floor (at most 1/K = {1 / lo.size:.4g})")
    if hi.sum() < 1 - 1e-12:
        raise InfeasibleBoundsError(
            f"caps sum to {hi.sum():.4g} < 1 over {hi.size} nodes: raise the cap (at least 1/K = {1 / hi.size:.4g})")


def project_kl(y: np.ndarray, lo: np.ndarray, hi: np.ndarray, log_space: bool = True) -> np.ndarray:
    """KL (Bregman) projection onto ``{a : sum a = 1, lo <= a <= hi}``: ``a = clip(s y, lo, hi)``.

    ``y`` is given as log-values when ``log_space``; the scale ``s`` is found by bisection on log s.
    """
    ly = y - y.max() if log_space else np.log(np.clip(y, 1e-300, None))
    lo_s, hi_s = -800.0, 800.0
    for _ in range(200):
        mid = 0.5 * (lo_s + hi_s)
        total = np.clip(np.exp(np.clip(ly + mid, -745, 700)), lo, hi).sum()
        if total > 1:
            hi_s = mid
        else:
            lo_s = mid
        if hi_s - lo_s < 1e-14:
            break
    a = np.clip(np.exp(np.clip(ly + 0.5 * (lo_s + hi_s), -745, 700)), lo, hi)
    return a / a.sum() if np.all(lo == 0) and np.all(hi >= 1) else a


def solve_mirror(p: Problem, tol: float = 1e-12, max_iter: int = 50_000) -> np.ndarray:
    """Reference solver: proximal mirror ascent (exponentiated gradient, exact KL prox) on the capped simplex."""
    eta = 1.0 / p.curvature()
    a = project_kl(np.log(p.prev), p.lo, p.hi)
    lp = np.log(p.prev)
    for _ in range(max_iter):
        ly = (np.log(np.clip(a, 1e-300, None)) + eta * p.grad_smooth(a) + eta * p.tau_kl * lp) / (1 + eta * p.tau_kl)
        new = project_kl(ly, p.lo, p.hi)
        if np.max(np.abs(new - a)) < tol:
            return new
        a = new
    log.info("mirror ascent stopped after %d iterations (last change above %g)", max_iter, tol)
    return a


def _pyomo_solver(name: str):
    import pyomo.environ as pyo

    if name == "ripopt":
        try:
            import pyomo_ripopt  # noqa: F401  (registers 'ripopt' with Pyomo)
        except ImportError:
            raise SolverUnavailableError("solver 'ripopt' is not installed: pip install pyomo-ripopt") from None
        s = pyo.SolverFactory("ripopt")
        if not s.available(exception_flag=False):
            raise SolverUnavailableError("solver 'ripopt' is registered but its binary is missing; reinstall pyomo-ripopt")
        return s
    if name == "highs":
        try:
            from pyomo.contrib.solver.common.factory import SolverFactory as NewFactory

            s = NewFactory("highs")
        except Exception as e:  # pragma: no cover - depends on the Pyomo build
            raise SolverUnavailableError(f"solver 'highs' unavailable through pyomo.contrib.solver: {e}") from None
        if not s.available():
            raise SolverUnavailableError("solver 'highs' is not installed: pip install highspy")
        return s
    s = pyo.SolverFactory(name)
    if not s.available(exception_flag=False):
        raise SolverUnavailableError(f"Pyomo solver {name!r} is not installed or not on PATH")
    return s


def build_model(p: Problem):
    """The Pyomo model of ``p``, sparse in ``W`` and ``L`` (maximisation)."""
    import pyomo.environ as pyo

    k = p.k
    m = pyo.ConcreteModel("dograph_weights")
    m.I = pyo.RangeSet(0, k - 1)
    floor = 1e-10 if p.tau_kl > 0 else 0.0
    m.a = pyo.Var(m.I, bounds=lambda _, i: (max(p.lo[i], floor), p.hi[i]),
                  initialize=lambda _, i: float(np.clip(p.prev[i], max(p.lo[i], floor), p.hi[i])))
    m.simplex = pyo.Constraint(expr=pyo.quicksum(m.a[i] for i in m.I) == 1)
    a = m.a

    # Auxiliary variables keep every expression short: u = Q a is a sparse linear constraint, so
    # the objective has O(K) terms whatever the number of edges (ripopt spent most of its time
    # evaluating one long quadratic expression otherwise: K = 512 took twice as long).
    def matvec(name: str, mat: np.ndarray):
        rows = [np.flatnonzero(mat[j]) for j in range(k)]
        var = pyo.Var(m.I)
        m.add_component(name, var)
        m.add_component(name + "_def", pyo.Constraint(
            m.I, rule=lambda _, j: var[j] == pyo.quicksum(float(mat[j, i]) * a[int(i)] for i in rows[j])))
        return var

    # All quadratic terms are merged into one matrix Q (objective -a^T Q a), so there is a single
    # auxiliary vector u = Q a and K bilinear terms.
    if p.objective == "main":
        Q, lin = 0.5 * p.c * p.W + p.lam * p.L, p.W @ p.beta
    elif p.objective == "A1":
        Q, lin = p.W + p.lam * p.L, 2.0 * p.b
    else:
        Q, lin = p.lam * p.L, np.zeros(k)
    terms = [pyo.quicksum(float(lin[i]) * a[i] for i in range(k) if lin[i] != 0)]
    if np.any(Q != 0):
        u = matvec("u", Q)
        terms.append(-pyo.quicksum(a[i] * u[i] for i in range(k)))
    if p.objective == "A2":
        y = matvec("y", p.W)
        terms.append(-p.mu * pyo.log(pyo.quicksum(pyo.exp(-y[j] / p.mu) for j in range(k))))
    if p.tau_kl > 0:  # KL(a || prev) = sum a log a - sum a log prev (the second part is linear)
        terms.append(-p.tau_kl * pyo.quicksum(a[i] * pyo.log(a[i]) for i in range(k)))
        terms.append(p.tau_kl * pyo.quicksum(float(np.log(p.prev[i])) * a[i] for i in range(k)))
    m.obj = pyo.Objective(expr=pyo.quicksum(terms), sense=pyo.maximize)
    return m


def choose_solver(p: Problem, solver: str = "auto") -> str:
    """``auto``: HiGHS for a pure QP (no KL, not A2), ripopt (NLP) otherwise."""
    if solver != "auto":
        return solver
    return "highs" if (p.tau_kl == 0 and p.objective != "A2") else "ripopt"


def solve_pyomo(p: Problem, solver: str = "auto", tol: float = 1e-9) -> tuple[np.ndarray, dict]:
    """Solve ``p`` with a real solver through Pyomo; raises :class:`OptimizationError` unless optimal."""
    import pyomo.environ as pyo
    from pyomo.opt import TerminationCondition

    name = choose_solver(p, solver)
    s = _pyomo_solver(name)
    t0 = time.perf_counter()
    m = build_model(p)
    t1 = time.perf_counter()
    try:
        if name == "highs":
            res = s.solve(m, raise_exception_on_nonoptimal_result=False, load_solutions=False)
            cond = str(res.termination_condition)
            if "convergenceCriteriaSatisfied" not in cond:
                raise OptimizationError(f"HiGHS did not reach optimality: {cond}")
            res.solution_loader.load_vars()
        else:
            if name == "ripopt":
                s.options["tol"] = tol
            res = s.solve(m, load_solutions=False)
            cond = res.solver.termination_condition
            if cond not in (TerminationCondition.optimal, TerminationCondition.locallyOptimal):
                raise OptimizationError(f"solver {name!r} did not reach optimality: {cond} ({res.solver.status})")
            m.solutions.load_from(res)
    except OptimizationError:
        raise
    except Exception as e:
        raise OptimizationError(f"solver {name!r} failed: {type(e).__name__}: {e}") from None
    a = np.array([pyo.value(m.a[i]) for i in range(p.k)], dtype=float)
    a = np.clip(a, p.lo, p.hi)
    if not np.all(np.isfinite(a)) or abs(a.sum() - 1) > 1e-6:
        raise OptimizationError(f"solver {name!r} returned weights off the simplex (sum {a.sum():.6g})")
    return a / a.sum(), {"solver": name, "build_s": t1 - t0, "solve_s": time.perf_counter() - t1}


def solve(p: Problem, solver: str = "auto", fallback: bool = True) -> tuple[np.ndarray, dict]:
    """Solve with Pyomo; ``solver='numpy'`` uses the reference. On a solver failure with ``fallback``,
    log why and return the reference solution (same objective); infeasible bounds always raise."""
    if solver == "numpy":
        t0 = time.perf_counter()
        return solve_mirror(p), {"solver": "numpy", "solve_s": time.perf_counter() - t0}
    try:
        return solve_pyomo(p, solver)
    except InfeasibleBoundsError:
        raise
    except OptimizationError as e:
        if not fallback:
            raise
        log.warning("Pyomo solve failed (%s); using the numpy mirror-ascent solver of the same objective", e)
        t0 = time.perf_counter()
        return solve_mirror(p), {"solver": "numpy-fallback", "error": str(e), "solve_s": time.perf_counter() - t0}


def smooth(a: np.ndarray, eps: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """DoReMi-style ``(1 - eps) a + eps / K``, then back inside the bounds."""
    k = a.size
    out = (1 - eps) * a + eps / k
    if np.all(out >= lo - 1e-15) and np.all(out <= hi + 1e-15):
        return out / out.sum()
    return project_kl(np.log(out), lo, hi)
