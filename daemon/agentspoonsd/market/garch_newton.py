"""Newton's method for the constrained GARCH(1,1) likelihood (the fit's quick path).

Sequential quadratic programming with the exact Hessian (`newton`): each step goes to the
minimum of the second-order model over the constraints (``omega >=`` its lower bound,
``alpha, beta >= 0``, ``alpha + beta <= 1``; `_qp_step` finds the active set exactly), with a
backtracking line search. Pure: plain Python floats for the 3-vectors, numpy in
`garch_likelihood` for the derivatives.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .garch_likelihood import FloatArray, newton_terms

_NEWTON_MAX_ITERATIONS = 16
_NEWTON_DECREMENT = 1e-7
"""Converged when the Newton decrement ``g' H^-1 g`` (twice the predicted decrease of the mean
negative log-likelihood, ~1.4 at the optimum) falls below this; the step is then taken, which
leaves an error of the order of its square. Measured on 1,000 refits of `agentspoonsd simulate
--seed 1` (500-bar windows, many of them flat along the omega/beta ridge), against 1e-13: the
total log-likelihood within 9e-8 (arch stops at a change of 1e-6), the one-step variance within
4e-5 relative (99 % of fits: 5e-6), alpha within 2e-6, beta within 3e-4 and omega within 0.2 %
along that flat ridge (99 %: 6e-5 and 0.03 %). On well-identified data the parameters agree
with arch's to 5e-6 (tests/test_garch_fit.py)."""
_ARMIJO = 1e-4  # sufficient decrease, as a fraction of the decrease the step predicts
_MIN_STEP = 2.0**-12  # shortest step of the backtracking line search (shorter: give up)


def feasible(
    params: FloatArray | list[float],
    lower: FloatArray | list[float],
    upper: FloatArray | list[float],
) -> bool:
    """Inside the constraints (where `newton_terms` is defined)."""
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    return lower[0] <= omega <= upper[0] and alpha >= 0.0 and beta >= 0.0 and alpha + beta <= 1.0


def _project(params: list[float], lower: list[float], upper: list[float]) -> list[float]:
    """Onto ``alpha + beta <= 1``, ``alpha, beta >= 0`` and omega's bounds (a rounding error
    away; in place; returns it)."""
    excess = params[1] + params[2] - 1.0
    if excess > 0.0:
        params[1] -= 0.5 * excess
        params[2] = 1.0 - params[1]
    if params[1] < 0.0:
        params[1] = 0.0
    if params[2] < 0.0:
        params[2] = 0.0
    params[0] = min(max(params[0], lower[0]), upper[0])
    return params


# The quick path's constraints, as a working set (w0, w1, w2, w3) of which are held as
# equalities: w0: omega >= its lower bound; w1: alpha >= 0; w2: alpha + beta <= 1; w3: beta >= 0.
# omega's upper bound (10 times the variance) is never near an optimum: a step beyond it ends
# the quick path (`feasible`), and SLSQP takes over.
_WorkingSet = tuple[bool, bool, bool, bool]
# Every working set, likeliest first where the last one fails (on simulate's refits: none, then
# alpha = 0, then alpha = 0 with alpha + beta = 1 or with omega at its bound, ...).
_LIKELY_FACES: tuple[_WorkingSet, ...] = (
    (False, False, False, False),
    (False, True, False, False),
    (False, True, True, False),
    (True, True, False, False),
    (False, False, True, False),
    (True, False, False, False),
    (False, True, False, True),
    (False, False, False, True),
)
_WORKING_SETS: tuple[_WorkingSet, ...] = _LIKELY_FACES + tuple(
    (w0, w1, w2, w3)
    for w0 in (False, True)
    for w1 in (False, True)
    for w2 in (False, True)
    for w3 in (False, True)
    # alpha = beta = 0 with alpha + beta = 1 is empty
    if not (w1 and w2 and w3) and (w0, w1, w2, w3) not in _LIKELY_FACES
)
_Gap = tuple[float, float, float, float]
_E_OMEGA, _E_ALPHA, _E_BETA = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
_ALONG_PERSISTENCE = (0.0, 1.0, -1.0)  # on alpha + beta = 1: beta follows alpha


@lru_cache(maxsize=8)
def _free_directions(working: _WorkingSet) -> tuple[tuple[float, float, float], ...]:
    """A basis of the moves that keep every constraint of ``working`` an equality."""
    w0, w1, w2, w3 = working
    basis = [] if w0 else [_E_OMEGA]
    held = w1 + w2 + w3  # constraints on (alpha, beta), independent two by two
    if held == 0:
        basis.extend((_E_ALPHA, _E_BETA))
    elif held == 1:
        basis.append(_E_BETA if w1 else _ALONG_PERSISTENCE if w2 else _E_ALPHA)
    return tuple(basis)


def _solve_pd(m: list[list[float]], rhs: list[float]) -> list[float] | None:
    """``m^-1 rhs`` for a symmetric positive definite ``m`` of size 1, 2 or 3 by Cholesky,
    unrolled in plain Python (several times faster than numpy.linalg at this size); None if a
    pivot falls below 1e-14 of its diagonal entry (not positive definite, or too
    ill-conditioned to trust)."""
    k = len(rhs)
    a00 = m[0][0]
    if not a00 > 0.0:
        return None
    l00 = math.sqrt(a00)
    y0 = rhs[0] / l00
    if k == 1:
        return [y0 / l00]
    l10 = m[1][0] / l00
    a11 = m[1][1]
    d1 = a11 - l10 * l10
    if not d1 > 1e-14 * abs(a11):
        return None
    l11 = math.sqrt(d1)
    y1 = (rhs[1] - l10 * y0) / l11
    if k == 2:
        x1 = y1 / l11
        return [(y0 - l10 * x1) / l00, x1]
    l20 = m[2][0] / l00
    l21 = (m[2][1] - l20 * l10) / l11
    a22 = m[2][2]
    d2 = a22 - l20 * l20 - l21 * l21
    if not d2 > 1e-14 * abs(a22):
        return None
    l22 = math.sqrt(d2)
    x2 = (rhs[2] - l20 * y0 - l21 * y1) / l22 / l22
    x1 = (y1 - l21 * x2) / l11
    return [(y0 - l10 * x1 - l20 * x2) / l00, x1, x2]


def _equality_step(
    h: list[list[float]], g: list[float], gap: _Gap, working: _WorkingSet
) -> tuple[list[float], list[float]] | None:
    """Minimiser ``d`` of the model ``g.d + d.h.d / 2`` with the constraints of ``working`` held
    as equalities (``gap``: the move that puts each exactly on its bound), and the model's
    gradient ``g + h d`` there; None where ``h`` is not positive definite on the face."""
    w0, w1, w2, w3 = working
    d = [gap[0] if w0 else 0.0, gap[1] if w1 else 0.0, gap[3] if w3 else 0.0]
    if w2:
        if w3:
            d[1] = gap[2] - d[2]
        else:
            d[2] = gap[2] - d[1]
    h0, h1, h2 = h
    d0, d1, d2 = d
    # The model's gradient at the fixed part of the step.
    g0 = g[0] + h0[0] * d0 + h0[1] * d1 + h0[2] * d2
    g1 = g[1] + h1[0] * d0 + h1[1] * d1 + h1[2] * d2
    g2 = g[2] + h2[0] * d0 + h2[1] * d1 + h2[2] * d2
    free = _free_coordinates(working)
    if free is not None:  # a coordinate face: the reduced system is a submatrix
        if free:
            u = _solve_pd([[h[i][j] for j in free] for i in free], [-(g0, g1, g2)[i] for i in free])
            if u is None:
                return None
            for ui, i in zip(u, free, strict=True):
                d[i] += ui
    else:  # on alpha + beta = 1 (alpha, beta free there): along (0, 1, -1), with omega or not
        z = _ALONG_PERSISTENCE
        hz = [h0[1] - h0[2], h1[1] - h1[2], h2[1] - h2[2]]
        if w0:
            u = _solve_pd([[hz[1] - hz[2]]], [-(g1 - g2)])
            if u is None:
                return None
            d[1] += u[0]
            d[2] -= u[0]
        else:
            reduced = [[h0[0], hz[0]], [hz[0], hz[1] - hz[2]]]
            u = _solve_pd(reduced, [-g0, -(g1 - g2)])
            if u is None:
                return None
            d[0] += u[0]
            d[1] += u[1] * z[1]
            d[2] += u[1] * z[2]
    d0, d1, d2 = d
    grad = [
        g[0] + h0[0] * d0 + h0[1] * d1 + h0[2] * d2,
        g[1] + h1[0] * d0 + h1[1] * d1 + h1[2] * d2,
        g[2] + h2[0] * d0 + h2[1] * d1 + h2[2] * d2,
    ]
    return d, grad


@lru_cache(maxsize=16)
def _free_coordinates(working: _WorkingSet) -> tuple[int, ...] | None:
    """The coordinates free on the face of ``working`` when it is a coordinate face (every
    basis vector of `_free_directions` a unit vector); None on the face alpha + beta = 1 with
    alpha and beta free."""
    indices = []
    for z in _free_directions(working):
        if z == _ALONG_PERSISTENCE:
            return None
        indices.append(z.index(1.0))
    return tuple(indices)


def _qp_step(
    h: list[list[float]],
    g: list[float],
    params: list[float],
    lower: list[float],
    guess: _WorkingSet,
    convex: bool,
) -> tuple[list[float], _WorkingSet] | None:
    """The step of the quadratic model ``g.d + d.h.d / 2`` to its minimum over the constraints
    (``omega >= lower[0]``, ``alpha >= 0``, ``alpha + beta <= 1``, ``beta >= 0``), and the
    working set that holds there: Newton's step with the active set found exactly.

    A working set is the answer when its equality-constrained minimiser is feasible and its
    Lagrange multipliers are >= 0 (the KKT conditions; ``h`` positive definite on that face:
    a local minimum of the model). ``guess`` (the last iteration's working set) is tried first;
    then, when ``h`` is positive definite (``convex``, or checked here), the others, likeliest
    first (`_WORKING_SETS`): for a convex model the KKT point is its unique minimum. None: no
    answer (the guess failed and ``h`` is not positive definite).
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    gap = (float(lower[0]) - omega, -alpha, 1.0 - alpha - beta, -beta)
    found = _kkt_step(h, g, gap, guess)
    if found is not None:
        return found, guess
    if not (convex or _solve_pd(h, [0.0, 0.0, 0.0]) is not None):
        return None
    for working in _WORKING_SETS:
        if working != guess:
            found = _kkt_step(h, g, gap, working)
            if found is not None:
                return found, working
    return None


def _kkt_step(
    h: list[list[float]], g: list[float], gap: _Gap, working: _WorkingSet
) -> list[float] | None:
    """`_equality_step` of ``working`` where it satisfies the KKT conditions, else None."""
    solved = _equality_step(h, g, gap, working)
    if solved is None:
        return None
    d, grad = solved
    w0, w1, w2, w3 = working
    # Feasible for the constraints not held (a rounding error outside is snapped later).
    if (
        (not w0 and d[0] < gap[0] - 1e-13)
        or (not w1 and d[1] < gap[1] - 1e-13)
        or (not w2 and d[1] + d[2] > gap[2] + 1e-13)
        or (not w3 and d[2] < gap[3] - 1e-13)
    ):
        return None
    # Multipliers of c(params + d) >= 0: grad = sum lambda_i grad c_i, with grad c =
    # e_omega, e_alpha, -(e_alpha + e_beta) and e_beta.
    lambda2 = (-grad[1] if w3 and not w1 else -grad[2]) if w2 else 0.0
    lambda1 = grad[1] + lambda2 if w1 else 0.0
    lambda3 = grad[2] + lambda2 if w3 else 0.0
    if (w0 and grad[0] < 0.0) or lambda1 < 0.0 or lambda2 < 0.0 or lambda3 < 0.0:
        return None
    return d


def _on_face(params: list[float], working: _WorkingSet, lower: list[float]) -> list[float]:
    """``params`` with the constraints of ``working`` made exact equalities (in place)."""
    if working[0]:
        params[0] = lower[0]
    if working[1]:
        params[1] = 0.0
    if working[3]:
        params[2] = 0.0
    if working[2]:
        if working[3]:
            params[1] = 1.0
        else:
            params[2] = 1.0 - params[1]
    return params


def newton(
    start: FloatArray,
    x: FloatArray,
    xlag: FloatArray,
    b: float,
    lower: FloatArray,
    upper: FloatArray,
    budget: int,
) -> tuple[FloatArray | None, int]:
    """Newton's method for the constrained problem (sequential quadratic programming with the
    exact Hessian), with a backtracking line search inside the constraints.

    Returns ``(params, evaluations)``; ``params`` is None when the quick path gives up: the
    start is outside the region `newton_terms` handles (``beta`` below ~0.4 at n = 500), a
    step leaves it, the line search stalls, or `_NEWTON_MAX_ITERATIONS` or ``budget``
    evaluations passed.

    Each step goes to the minimum of the quadratic model over the constraints (`_qp_step`), so
    the bounds that bind at the optimum are found in one step and held exactly: ``alpha >= 0``
    (calm windows: alpha = 0 exactly), ``alpha + beta <= 1`` ("nonstationary" windows), both
    (the corner alpha = 0, beta = 1) and omega's lower bound. The segment from a feasible point
    to a feasible step is feasible (the constraints are linear), so the line search needs no
    projection. Where the Hessian is not positive definite (far from the optimum) the model
    uses its Gauss-Newton part (Fisher scoring). Converged means: the model is the exact
    Hessian's, and the Newton decrement ``-g.d`` is below `_NEWTON_DECREMENT`.
    """
    if budget < 1 or not feasible(start, lower, upper):
        return None, 0
    # Python floats between the evaluations: 3-vectors are cheaper as lists than as arrays.
    params = start.tolist()
    bounds = lower.tolist(), upper.tolist()
    evaluations = 1
    terms = newton_terms(params, x, xlag, b, True)
    value, grad, hess, fisher = terms
    working: _WorkingSet = (
        params[0] <= bounds[0][0],
        params[1] <= 0.0,
        params[1] + params[2] >= 1.0,
        params[2] <= 0.0,
    )
    for _ in range(_NEWTON_MAX_ITERATIONS):
        assert grad is not None and hess is not None and fisher is not None
        g, h = grad, hess
        # The exact Hessian's model: its KKT point on the guessed face (positive definite
        # there), else its minimum over every face when it is positive definite everywhere;
        # where that is no descent (a non-convex model), Fisher scoring's.
        found = _qp_step(h, g, params, bounds[0], working, False)
        exact = found is not None
        if found is not None:
            d = found[0]
            decrement = -(g[0] * d[0] + g[1] * d[1] + g[2] * d[2])
            exact = decrement >= 0.0
        if not exact:
            found = _qp_step(fisher, g, params, bounds[0], working, True)
            if found is None:
                return None, evaluations
            d = found[0]
            decrement = -(g[0] * d[0] + g[1] * d[1] + g[2] * d[2])
            if not decrement >= 0.0:
                return None, evaluations
        assert found is not None
        working = found[1]
        if exact and decrement < _NEWTON_DECREMENT:
            final = [params[0] + d[0], params[1] + d[1], params[2] + d[2]]
            final = _on_face(_project(final, *bounds), working, bounds[0])
            if not feasible(final, *bounds):
                return None, evaluations
            return np.array(final), evaluations
        # Backtracking: the full step with every derivative (usually accepted: then they are
        # the next iteration's), shorter ones by the value alone.
        size = 1.0
        while True:
            trial = [params[0] + size * d[0], params[1] + size * d[1], params[2] + size * d[2]]
            _project(trial, *bounds)
            if size == 1.0:
                _on_face(trial, working, bounds[0])
            if feasible(trial, *bounds):
                if evaluations >= budget:
                    return None, evaluations
                evaluations += 1
                terms = newton_terms(trial, x, xlag, b, size == 1.0)
                slope = sum(gi * (ti - pi) for gi, ti, pi in zip(g, trial, params, strict=True))
                if terms[0] <= value + _ARMIJO * slope:
                    break
            size *= 0.5
            if size < _MIN_STEP:
                return None, evaluations
        params = trial
        if terms[1] is None:
            if evaluations >= budget:
                return None, evaluations
            evaluations += 1
            terms = newton_terms(params, x, xlag, b, True)
        value, grad, hess, fisher = terms
    return None, evaluations
