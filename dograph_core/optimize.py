"""The graph-constrained optimisation of the domain weights (reference note, step 4, second revision).

Weights ``a`` on the capped simplex ``{a : sum a = 1, lo <= a <= hi}``. ``T`` is the [K, K] transfer matrix:
row ``j`` is node ``j``'s predicted first-order progress per unit weight on each node, ``(T a)_j``, with rows
normalised so that ``T_jj = 1`` (``T = diag(G)^-1 G`` for the Gram matrix ``G`` of node mean gradients; the graph
off is ``T = I``). Objectives (maximised):

* ``F1`` (need-weighted proportional progress):
  ``sum_j beta_j log(c_j + (T a)_j) - tau_kl KL(a || prev)``. The shift defaults to
  ``c_j = delta + max(0, -min_k T_jk)`` with ``delta = 1e-3``: since ``(T a)_j >= min_k T_jk`` for every ``a`` on
  the simplex, every log argument is at least ``delta`` (negative transfer is handled explicitly, not clipped).
  Concave. With ``T = I`` and no KL the optimum is ``a_j = beta_j (1 + K delta) - delta``, i.e. ``beta`` to
  within ``delta``. Positive transfer lowers the direct weight a node needs. On the simplex the default shift is
  the same as replacing each row by ``T_jk - min_k T_jk >= 0``, so a conflict spread evenly over a row becomes
  "no help" and, the log being scale-invariant, F1 is blind to it up to ``delta`` (K = 3, node 2 against the
  others: uniform ``beta`` gives ``a = 1/3`` whatever the conflict); a larger uniform shift makes F1 lean
  against the conflicting node, at the cost of the ``T = I`` property (``a = beta (1 + K c) - c``).
* ``F2`` (weighted max-min progress, one constraint per graph row):
  ``max t - tau_kl KL(a || prev)`` subject to ``(T a)_j >= t beta_j`` for every ``j`` (``t`` free). With ``T = I``
  and no KL the optimum is exactly ``beta``. An LP when ``tau_kl = 0`` and there is no F3 constraint. Max-min
  compensates a node for harm received: a node in symmetric conflict with the others gets *more* weight, one that
  harms the others more than they harm it (a larger gradient) gets less. The LP's optimal ``a`` need not be unique
  when ``T`` is rank-deficient (K above the gradient dimension); the KL term makes it unique.
* ``A1`` (MMD matching to an explicit target): ``-(a^T G a - 2 b^T a) - tau_kl KL(a || prev)``, i.e. minimising
  ``||sum_k a_k m_k - m_target||^2`` when ``G`` is the (normalised) Gram matrix of the node means and
  ``b = M m_target`` (same normalisation). ``T`` is not used.

Optionally (``L`` and ``rho`` both given) the F3 constraint ``a^T L a <= rho``: nodes that are neighbours in the
graph Laplacian ``L`` (positive semidefinite) must get similar weights. ``rho = 0`` (e.g. from a uniform ``beta``)
leaves no strictly feasible point, where interior-point solvers cannot converge, so it is imposed in its exact
linear form: ``a^T L a = 0`` iff ``L a = 0`` iff ``B a = 0`` for ``B`` a basis of ``L``'s row space (for a Laplacian
of non-negative affinities: ``a`` constant on every connected component). A ``rho`` below ``RHO_ZERO`` times the
largest eigenvalue of ``L`` counts as 0 (ripopt failed on ``rho ~ 1e-33`` as on 0).

Two solvers of the *same* problem: :func:`solve_pyomo` (a Pyomo model solved by a real solver: HiGHS for the LP /
convex QP cases, ``ripopt`` for the NLPs) and :func:`solve_reference` (scipy SLSQP with analytic gradients, the
reference). The Pyomo model is sparse: auxiliary variables ``y = T a`` (F1), ``z = L a`` (F3) and ``v = R a`` with
``G = R^T R`` (A1) are defined by linear constraints over the non-zero entries only, so every nonlinear expression
has O(K) terms. :func:`off_problem` gives the same problem with the graph removed (``T = I``, no F3), whose solution
the caller compares with to log the graph's effect ``||a - a_off||_1``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

log = logging.getLogger(__name__)

Objective = Literal["F1", "F2", "A1"]
OBJECTIVES = ("F1", "F2", "A1")
F1_DELTA = 1e-3        # the default F1 margin: c_j + (T a)_j >= F1_DELTA on the whole simplex
KL_FLOOR = 1e-10       # the reference's lower bound on the weights with the KL term on (SLSQP evaluates at bounds)
_PSD_TOL = 1e-9        # relative tolerance on negative eigenvalues of G and L
RIPOPT_OPTIONS: dict = {}  # extra ripopt options; defaults work best (mehrotra_pc=yes: 40 of 120 random
                           # instances failed; detect_linear_constraints=no: no better)
RHO_ZERO = 1e-10       # rho <= RHO_ZERO * lambda_max(L) is rho = 0 (no strictly feasible point at working precision)
KKT_TOL = 1e-6         # the reference accepts an SLSQP stall (exit 8) only with a KKT residual below this


class OptimizationError(RuntimeError):
    """The problem is malformed, or the solver failed or reported a non-optimal result; callers keep the
    previous weights."""


class InfeasibleBoundsError(OptimizationError, ValueError):
    """Floors and caps that no weight vector on the simplex can satisfy."""


class SolverUnavailableError(OptimizationError):
    """The requested Pyomo solver is not installed."""


def _vector(name: str, x, k: int) -> np.ndarray:
    v = np.asarray(x, dtype=float)
    if v.shape != (k,):
        raise OptimizationError(f"{name} must have shape ({k},) for K = {k} nodes, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise OptimizationError(f"{name} must be finite, got {v.tolist()}")
    return v


def _matrix(name: str, x, k: int) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    if m.shape != (k, k):
        raise OptimizationError(f"{name} must have shape ({k}, {k}) for K = {k} nodes, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise OptimizationError(f"{name} must be finite; it has {int(np.sum(~np.isfinite(m)))} NaN/inf entries")
    return m


def _psd(name: str, m: np.ndarray, what: str) -> np.ndarray:
    m = 0.5 * (m + m.T)
    ev = np.linalg.eigvalsh(m)
    if ev[0] < -_PSD_TOL * max(1.0, float(np.abs(ev).max())):
        raise OptimizationError(f"{name} must be positive semidefinite ({what}); its smallest eigenvalue is {ev[0]:.4g}")
    return m


@dataclass
class Problem:
    T: np.ndarray                      # [K, K] transfer matrix, T_jj = 1 (graph off: identity); F1, F2
    prev: np.ndarray                   # [K] previous weights (KL anchor), on the simplex
    objective: Objective = "F1"
    beta: Optional[np.ndarray] = None  # [K] progress targets on the simplex (F1, F2)
    G: Optional[np.ndarray] = None     # [K, K] normalised Gram matrix of the node means (A1)
    b: Optional[np.ndarray] = None     # [K] linear term M m_target, same normalisation (A1)
    L: Optional[np.ndarray] = None     # [K, K] graph Laplacian of the F3 constraint
    rho: Optional[float] = None        # F3 bound a^T L a <= rho (None: no constraint)
    tau_kl: float = 0.1
    shift: Optional[np.ndarray] = None  # [K] F1's per-row shift c_j (None: F1_DELTA + max(0, -min_k T_jk))
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _l_max: float = field(default=0.0, init=False, repr=False)  # the largest eigenvalue of L

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise OptimizationError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        T = np.asarray(self.T, dtype=float)
        if T.ndim != 2 or T.shape[0] != T.shape[1] or T.shape[0] == 0:
            raise OptimizationError(f"T must be a square [K, K] matrix, got shape {T.shape}")
        k = T.shape[0]
        self.T = _matrix("T", T, k)
        if self.objective != "A1" and np.max(np.abs(np.diag(self.T) - 1)) > 1e-6:
            raise OptimizationError(
                f"T must have a unit diagonal (rows normalised by diag(G)); got diagonal {np.diag(self.T).tolist()}")
        prev = _vector("prev", self.prev, k)
        if np.any(prev < 0) or prev.sum() <= 0:
            raise OptimizationError(f"prev must be non-negative with a positive sum, got {prev.tolist()}")
        prev = np.clip(prev, 1e-12, None)
        self.prev = prev / prev.sum()
        self.lo = self._bound("lo", self.lo, 0.0, k)
        self.hi = self._bound("hi", self.hi, 1.0, k)
        check_bounds(self.lo, self.hi)
        if self.beta is not None:
            beta = _vector("beta", self.beta, k)
            if np.any(beta < 0) or beta.sum() <= 0:
                raise OptimizationError(f"beta must be non-negative with a positive sum, got {beta.tolist()}")
            self.beta = beta / beta.sum()
        elif self.objective in ("F1", "F2"):
            raise OptimizationError(f"objective {self.objective!r} needs beta (progress targets)")
        if self.objective == "A1":
            if self.G is None or self.b is None:
                raise OptimizationError("objective 'A1' needs G (the normalised Gram matrix) and b (M m_target)")
            self.G = _psd("G", _matrix("G", self.G, k), "a Gram matrix")
            self.b = _vector("b", self.b, k)
        self._l_max = 0.0
        if self.L is not None:
            self.L = _psd("L", _matrix("L", self.L, k), "a graph Laplacian of non-negative affinities")
            self._l_max = float(np.linalg.eigvalsh(self.L)[-1])
        if self.rho is not None:
            if self.L is None:
                raise OptimizationError("rho (the F3 bound) is given without the Laplacian L")
            if not np.isfinite(self.rho) or self.rho < 0:
                raise OptimizationError(f"rho must be finite and >= 0, got {self.rho}")
            self.rho = float(self.rho)
        if not np.isfinite(self.tau_kl) or self.tau_kl < 0:
            raise OptimizationError(f"tau_kl must be finite and >= 0, got {self.tau_kl}")
        self.tau_kl = float(self.tau_kl)
        if self.shift is not None:
            shift = _vector("shift", self.shift, k)
            margin = shift + np.minimum(self.T.min(axis=1), 0.0)
            if np.any(shift <= 0) or np.any(margin <= 0):
                bad = np.flatnonzero((shift <= 0) | (margin <= 0)).tolist()
                raise OptimizationError(
                    f"shift must be > 0 and > -min_k T_jk on every row (so that c_j + (T a)_j > 0 on the simplex); "
                    f"rows {bad} violate it")
            self.shift = shift

    @staticmethod
    def _bound(name: str, x, default: float, k: int) -> np.ndarray:
        x = np.asarray(x if np.size(x) else default, dtype=float)
        try:
            out = np.broadcast_to(x, (k,)).astype(float)
        except ValueError:
            raise OptimizationError(f"{name} must be a scalar or have shape ({k},), got shape {x.shape}") from None
        if not np.all(np.isfinite(out)):
            raise OptimizationError(f"{name} must be finite, got {out.tolist()}")
        return out

    @property
    def k(self) -> int:
        return self.T.shape[0]

    @property
    def has_f3(self) -> bool:
        return self.L is not None and self.rho is not None

    @property
    def f3_quadratic(self) -> bool:
        """The F3 constraint is the quadratic ``a^T L a <= rho``, not the linear ``B a = 0`` of ``rho = 0`` (taken
        for ``rho <= RHO_ZERO * lambda_max(L)``)."""
        return self.has_f3 and self.rho > RHO_ZERO * self._l_max

    @property
    def is_lp_or_qp(self) -> bool:
        """No KL, no quadratic constraint and a linear (F2) or convex quadratic (A1) objective."""
        return self.objective in ("F2", "A1") and self.tau_kl == 0 and not self.f3_quadratic

    def f1_shift(self) -> np.ndarray:
        """F1's ``c``: the given shift, or ``F1_DELTA + max(0, -min_k T_jk)`` per row."""
        if self.shift is not None:
            return self.shift
        return F1_DELTA + np.maximum(0.0, -self.T.min(axis=1))

    def kl(self, a: np.ndarray) -> float:
        a = np.asarray(a, float)
        pos = a > 0
        return float(np.sum(a[pos] * np.log(a[pos] / self.prev[pos])))

    def progress_ratio(self, a: np.ndarray) -> float:
        """F2's ``t`` at ``a``: the largest ``t`` with ``(T a)_j >= t beta_j`` (``-inf`` if a row with
        ``beta_j = 0`` has ``(T a)_j < 0``)."""
        y = self.T @ a
        pos = self.beta > 0
        if np.any(y[~pos] < -1e-12):
            return -np.inf
        return float(np.min(y[pos] / self.beta[pos]))

    def value(self, a: np.ndarray) -> float:
        """The objective (to maximise) at ``a``; for F2 with ``t`` at its best value for ``a``."""
        a = np.asarray(a, float)
        if self.objective == "F1":
            arg = self.f1_shift() + self.T @ a
            pos = self.beta > 0
            if np.any(arg[pos] <= 0):
                return -np.inf
            main = float(self.beta[pos] @ np.log(arg[pos]))
        elif self.objective == "F2":
            main = self.progress_ratio(a)
        else:
            main = float(-(a @ self.G @ a - 2 * self.b @ a))
        return main - self.tau_kl * self.kl(a) if self.tau_kl > 0 else main

    def f3_value(self, a: np.ndarray) -> float:
        """``a^T L a`` (0 without a Laplacian)."""
        return float(a @ self.L @ a) if self.L is not None else 0.0

    def feasible(self, a: np.ndarray, tol: float = 1e-8) -> bool:
        """On the simplex, within the bounds and inside the F3 constraint (to ``tol``)."""
        a = np.asarray(a, float)
        ok = abs(a.sum() - 1) <= tol and np.all(a >= self.lo - tol) and np.all(a <= self.hi + tol)
        return bool(ok and (not self.has_f3 or self.f3_value(a) <= self.rho + tol))


def off_problem(p: Problem) -> Problem:
    """The same problem with the graph removed: ``T = I`` and no F3 constraint. F1's shift returns to its default
    (``F1_DELTA`` for ``T = I``), since the negative-transfer margin belongs to ``T``."""
    return dataclasses.replace(p, T=np.eye(p.k), L=None, rho=None, shift=None)


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


def _solver_bounds(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """The reference's variable bounds: the floors lifted to ``KL_FLOOR`` when the KL term is on, so that
    ``log a`` is finite wherever SLSQP evaluates. (The KL term's slope is infinite at 0, so the optimum is positive
    anyway. The interior-point solver keeps its iterates strictly inside the bounds and gets no lift: with a 1e-10
    lift ripopt's line search stalled on F2 + KL instances that it solves with the bound at 0 or 1e-8.)"""
    lo = np.minimum(np.maximum(p.lo, KL_FLOOR), p.hi) if p.tau_kl > 0 else p.lo
    return lo, p.hi


def _row_basis(S: np.ndarray) -> np.ndarray:
    """``R`` with ``S = R^T R`` for a PSD ``S`` (rows for the positive eigenvalues only): ``a^T S a = ||R a||^2``
    and ``S a = 0`` iff ``R a = 0``."""
    w, V = np.linalg.eigh(S)
    keep = w > _PSD_TOL * max(1.0, float(np.abs(w).max()))
    return np.sqrt(w[keep])[:, None] * V[:, keep].T


def _start(p: Problem) -> np.ndarray:
    """A feasible starting point: ``prev`` moved into the bounds (KL projection); with F3, when that violates the
    constraint, the uniform-like point inside the bounds (``a^T L a = 0`` for a constant ``a``)."""
    lo, hi = _solver_bounds(p)
    a = project_kl(np.log(p.prev), lo, hi)
    if p.has_f3 and p.f3_value(a) > p.rho:
        a = project_kl(np.zeros(p.k), lo, hi)
    return a


def _pinned(p: Problem) -> Optional[np.ndarray]:
    """The only feasible point when the floors or the caps sum to 1 (no solver copes with a one-point set), after
    checking the constraints there; None otherwise."""
    for bound, name in ((p.lo, "floors"), (p.hi, "caps")):
        if abs(bound.sum() - 1) <= 1e-12:
            a = bound / bound.sum()
            if p.has_f3 and p.f3_value(a) > p.rho + 1e-12:
                raise OptimizationError(f"the {name} sum to 1 and pin the weights to {a.tolist()}, which violates the F3 "
                                        f"constraint: a^T L a = {p.f3_value(a):.4g} > rho = {p.rho:.4g}")
            if p.objective == "F2" and not np.isfinite(p.progress_ratio(a)):
                raise OptimizationError(f"the {name} sum to 1 and pin the weights to {a.tolist()}, where a node with "
                                        "beta_j = 0 has negative predicted progress (F2 infeasible)")
            return a
    return None


def _f2_start_t(p: Problem, a: np.ndarray) -> float:
    y, pos = p.T @ a, p.beta > 0
    return float(np.min(y[pos] / p.beta[pos]))


def solve_reference(p: Problem, ftol: float = 1e-12, maxiter: int = 1000) -> np.ndarray:
    """Reference solver: scipy SLSQP with analytic gradients of the objective and of every constraint (the
    simplex, the bounds, F2's row constraints with the free variable ``t``, the F3 constraint). Raises
    :class:`OptimizationError` unless SLSQP converges to a feasible point."""
    from scipy.optimize import minimize

    pinned = _pinned(p)
    if pinned is not None:
        return pinned
    k, f2 = p.k, p.objective == "F2"
    lo, hi = _solver_bounds(p)
    a0 = _start(p)
    x0 = np.append(a0, _f2_start_t(p, a0)) if f2 else a0
    n = x0.size
    lp = np.log(p.prev)
    if p.objective == "F1":
        c, pos = p.f1_shift(), np.flatnonzero(p.beta > 0)
        Tp, bp, cp = p.T[pos], p.beta[pos], c[pos]
        # c_j + (T a)_j >= c_j + min_k T_jk > 0 on the simplex; SLSQP may step off the simplex, where the log is
        # continued below x0 by its second-order Taylor polynomial (concave, C^2, equal to log on the simplex).
        x_min = 0.5 * float(np.min(cp + np.minimum(Tp.min(axis=1), 0.0)))

    def f_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        a = x[:k]
        g = np.zeros(n)
        if p.objective == "F1":
            arg = cp + Tp @ a
            d = arg - x_min
            low = d < 0
            val = np.where(low, np.log(x_min) + d / x_min - d * d / (2 * x_min ** 2), np.log(np.where(low, 1, arg)))
            der = np.where(low, 1 / x_min - d / x_min ** 2, 1 / np.where(low, 1, arg))
            f = float(bp @ val)
            g[:k] = Tp.T @ (bp * der)
        elif p.objective == "F2":
            f = float(x[k])
            g[k] = 1.0
        else:
            Ga = p.G @ a
            f = float(-(a @ Ga) + 2 * p.b @ a)
            g[:k] = -2 * Ga + 2 * p.b
        if p.tau_kl > 0:
            la = np.log(np.clip(a, 1e-300, None))
            f -= p.tau_kl * float(a @ (la - lp))
            g[:k] -= p.tau_kl * (la - lp + 1)
        return -f, -g

    ones = np.zeros(n)
    ones[:k] = 1.0
    cons = [{"type": "eq", "fun": lambda x: np.array([x[:k].sum() - 1.0]), "jac": lambda x: ones[None, :]}]
    if f2:
        jac_rows = np.hstack([p.T, -p.beta[:, None]])
        cons.append({"type": "ineq", "fun": lambda x: p.T @ x[:k] - p.beta * x[k], "jac": lambda x: jac_rows})
    if p.f3_quadratic:
        def f3_jac(x: np.ndarray) -> np.ndarray:
            j = np.zeros((1, n))
            j[0, :k] = -2 * (p.L @ x[:k])
            return j

        cons.append({"type": "ineq", "fun": lambda x: np.array([p.rho - x[:k] @ p.L @ x[:k]]), "jac": f3_jac})
    elif p.has_f3:  # rho = 0: B a = 0
        B = _row_basis(p.L)
        if B.shape[0]:
            jac_b = np.hstack([B, np.zeros((B.shape[0], n - k))])
            cons.append({"type": "eq", "fun": lambda x: B @ x[:k], "jac": lambda x: jac_b})
    bounds = list(zip(lo, hi)) + ([(None, None)] if f2 else [])
    res = minimize(f_and_grad, x0, jac=True, method="SLSQP", bounds=bounds, constraints=cons,
                   options={"ftol": ftol, "maxiter": maxiter})
    if not res.success:
        # Exit 8 ("positive directional derivative for linesearch") is SLSQP stalling at the limit of its
        # precision; on F2 it happens at the optimum (1e-8 from HiGHS / ripopt on the instances seen). It is
        # accepted only where the KKT conditions hold at the point.
        kkt = _kkt_residual(res.x, f_and_grad(res.x)[1], cons, bounds) if res.status == 8 else np.inf
        if kkt > KKT_TOL:
            raise OptimizationError(f"reference solver (SLSQP) did not converge on {p.objective}: {res.message} "
                                    f"(status {res.status}, {res.nit} iterations, KKT residual {kkt:.2g})")
    a = np.clip(res.x[:k], p.lo, p.hi)
    if not p.feasible(a, tol=1e-7):
        raise OptimizationError(f"reference solver (SLSQP) returned an infeasible point on {p.objective}: "
                                f"sum {a.sum():.8g}, a^T L a {p.f3_value(a):.6g} (rho {p.rho})")
    return a / a.sum()


def _kkt_residual(x: np.ndarray, grad: np.ndarray, cons: list[dict], bounds: list, active_tol: float = 1e-8) -> float:
    """The stationarity residual of ``min phi s.t. eq = 0, ineq >= 0, bounds`` at ``x`` (``grad`` = grad phi),
    relative to ``max(1, |grad|)``: the least-squares fit of ``grad`` by the constraint gradients with multipliers
    free (equalities) or >= 0 (active inequalities and bounds); ``inf`` when ``x`` is infeasible."""
    from scipy.optimize import lsq_linear

    cols, lower = [], []
    for c in cons:
        val, jac = np.atleast_1d(c["fun"](x)), np.atleast_2d(c["jac"](x))
        if c["type"] == "eq":
            if np.max(np.abs(val)) > 1e-7:
                return np.inf
            cols.append(jac.T), lower.extend([-np.inf] * len(val))
        else:
            if np.min(val) < -1e-7:
                return np.inf
            act = val <= active_tol
            cols.append(jac[act].T), lower.extend([0.0] * int(act.sum()))
    eye = np.eye(x.size)
    for i, (lb, ub) in enumerate(bounds):
        if lb is not None and x[i] - lb <= active_tol:
            cols.append(eye[:, i:i + 1]), lower.append(0.0)
        if ub is not None and ub - x[i] <= active_tol:
            cols.append(-eye[:, i:i + 1]), lower.append(0.0)
    A = np.hstack(cols)
    fit = lsq_linear(A, grad, bounds=(np.array(lower), np.full(len(lower), np.inf)), method="bvls")
    return float(np.max(np.abs(A @ fit.x - grad)) / max(1.0, float(np.max(np.abs(grad)))))


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
    """The Pyomo model of ``p`` (maximisation), sparse in ``T`` and ``L``."""
    import pyomo.environ as pyo

    k = p.k
    m = pyo.ConcreteModel("dograph_weights")
    m.I = pyo.RangeSet(0, k - 1)
    lo, hi = p.lo, p.hi  # no KL lift here: see _solver_bounds
    a0 = _start(p)
    m.a = pyo.Var(m.I, bounds=lambda _, i: (float(lo[i]), float(hi[i])), initialize=lambda _, i: float(a0[i]))
    m.simplex = pyo.Constraint(expr=pyo.quicksum(m.a[i] for i in m.I) == 1)
    a = m.a

    def row(mat: np.ndarray, j: int):
        return pyo.quicksum(float(mat[j, i]) * a[int(i)] for i in np.flatnonzero(mat[j]))

    # Auxiliary variables keep every nonlinear expression O(K) long whatever the number of edges (ripopt spent
    # most of its time evaluating one long quadratic expression otherwise).
    def matvec(name: str, mat: np.ndarray, rows, bounds=None):
        var = pyo.Var(rows, bounds=bounds, initialize=lambda _, j: float(mat[j] @ a0))
        m.add_component(name, var)
        m.add_component(name + "_def", pyo.Constraint(rows, rule=lambda _, j: var[j] == row(mat, j)))
        return var

    terms = []
    if p.objective == "F1":
        c, rows = p.f1_shift(), [int(j) for j in np.flatnonzero(p.beta > 0)]
        # (T a)_j lies in [min_k T_jk, max_k T_jk] on the simplex: redundant bounds that keep every log argument
        # >= c_j + min_k T_jk > 0 at the interior-point iterates too.
        tmin, tmax = p.T.min(axis=1), p.T.max(axis=1)
        y = matvec("y", p.T, rows, bounds=lambda _, j: (float(tmin[j]), float(tmax[j])))
        terms.append(pyo.quicksum(float(p.beta[j]) * pyo.log(float(c[j]) + y[j]) for j in rows))
    elif p.objective == "F2":
        m.t = pyo.Var(initialize=_f2_start_t(p, a0))
        # one constraint per graph row: (T a)_j >= t beta_j
        m.rows = pyo.Constraint(m.I, rule=lambda _, j: row(p.T, j) - float(p.beta[j]) * m.t >= 0)
        terms.append(m.t)
    else:
        R = _row_basis(p.G)
        v = matvec("v", R, pyo.RangeSet(0, R.shape[0] - 1)) if R.shape[0] else {}
        terms.append(-pyo.quicksum(v[r] * v[r] for r in range(R.shape[0])))
        terms.append(pyo.quicksum(2.0 * float(p.b[i]) * a[i] for i in range(k) if p.b[i] != 0))
    if p.f3_quadratic:
        # Written as sum_i a_i z_i with z = L a. The same constraint as one quadratic sum_ij L_ij a_i a_j is
        # classified as *linear* by ripopt 0.8.2 when the start point is constant, where its gradient 2 L a
        # vanishes ("Detected 10/10 linear constraints (Hessian contribution skipped)"), and ripopt then fails
        # (maxIterations) on most instances; the bilinear form is classified correctly.
        z = matvec("z", p.L, m.I)
        m.f3 = pyo.Constraint(expr=pyo.quicksum(a[i] * z[i] for i in range(k)) <= p.rho)
    elif p.has_f3:  # rho = 0: B a = 0
        B = _row_basis(p.L)
        m.f3 = pyo.Constraint(range(B.shape[0]), rule=lambda _, r: row(B, r) == 0)
    if p.tau_kl > 0:  # KL(a || prev) = sum a log a - sum a log prev (the second part is linear)
        terms.append(-p.tau_kl * pyo.quicksum(a[i] * pyo.log(a[i]) for i in range(k)))
        terms.append(p.tau_kl * pyo.quicksum(float(np.log(p.prev[i])) * a[i] for i in range(k)))
    m.obj = pyo.Objective(expr=pyo.quicksum(terms), sense=pyo.maximize)
    return m


def choose_solver(p: Problem, solver: str = "auto") -> str:
    """``auto``: HiGHS for an LP (F2) or convex QP (A1) without KL and without the F3 constraint, ripopt (NLP)
    otherwise. Asking HiGHS for an NLP is refused."""
    if solver == "auto":
        return "highs" if p.is_lp_or_qp else "ripopt"
    if solver == "highs" and not p.is_lp_or_qp:
        raise OptimizationError(
            f"HiGHS solves LPs and convex QPs only; objective {p.objective} with tau_kl = {p.tau_kl} and "
            f"{'a quadratic' if p.f3_quadratic else 'no quadratic'} F3 constraint is an NLP: use 'ripopt' or 'auto'")
    return solver


def solve_pyomo(p: Problem, solver: str = "auto", tol: float = 1e-9) -> tuple[np.ndarray, dict]:
    """Solve ``p`` with a real solver through Pyomo; raises :class:`OptimizationError` unless optimal."""
    import pyomo.environ as pyo
    from pyomo.opt import TerminationCondition

    name = choose_solver(p, solver)
    s = _pyomo_solver(name)
    pinned = _pinned(p)
    if pinned is not None:
        return pinned, {"solver": name, "pinned": True, "build_s": 0.0, "solve_s": 0.0}
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
                for key, val in {**RIPOPT_OPTIONS, "tol": tol}.items():
                    s.options[key] = val
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
    if not np.all(np.isfinite(a)):
        raise OptimizationError(f"solver {name!r} returned non-finite weights")
    a = np.clip(a, p.lo, p.hi)
    if not p.feasible(a, tol=1e-6):
        raise OptimizationError(f"solver {name!r} returned an infeasible point: sum {a.sum():.8g}, "
                                f"a^T L a {p.f3_value(a):.6g} (rho {p.rho})")
    return a / a.sum(), {"solver": name, "build_s": t1 - t0, "solve_s": time.perf_counter() - t1}


def solve(p: Problem, solver: str = "auto", fallback: bool = True) -> tuple[np.ndarray, dict]:
    """Solve with Pyomo; ``solver='numpy'`` uses the reference (:func:`solve_reference`). On a solver failure with
    ``fallback``, log why and return the reference solution (same problem); infeasible bounds and a solver that
    cannot handle the problem class always raise."""
    if solver == "numpy":
        t0 = time.perf_counter()
        return solve_reference(p), {"solver": "numpy", "solve_s": time.perf_counter() - t0}
    name = choose_solver(p, solver)
    try:
        return solve_pyomo(p, name)
    except InfeasibleBoundsError:
        raise
    except OptimizationError as e:
        if not fallback:
            raise
        log.warning("Pyomo solve failed (%s); using the reference SLSQP solver of the same problem", e)
        t0 = time.perf_counter()
        return solve_reference(p), {"solver": "numpy-fallback", "error": str(e), "solve_s": time.perf_counter() - t0}


def smooth(a: np.ndarray, eps: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """DoReMi-style ``(1 - eps) a + eps / K``, then back inside the bounds."""
    k = a.size
    out = (1 - eps) * a + eps / k
    if np.all(out >= lo - 1e-15) and np.all(out <= hi + 1e-15):
        return out / out.sum()
    return project_kl(np.log(out), lo, hi)
