"""The GARCH(1,1) fit's full optimiser: nlopt's SLSQP, where Newton's method gives up."""

from __future__ import annotations

import math

import nlopt
import numpy as np

from .garch_likelihood import FloatArray, negloglik

# Tolerances on the mean negative log-likelihood per observation (~1.4 at the optimum). arch stops
# at an absolute change of 1e-6 of the TOTAL log-likelihood (scipy SLSQP's default ftol); a
# relative 1e-12 of the per-observation value is tighter for any window shorter than ~700k bars.
_FTOL_REL = 1e-12
_XTOL_REL = 1e-9


def slsqp(
    start: FloatArray,
    x: FloatArray,
    xlag: FloatArray,
    backcast: float,
    lower: FloatArray,
    upper: FloatArray,
    budget: int,
) -> tuple[FloatArray | None, int, str | None]:
    """nlopt's SLSQP from ``start``: ``(params, evaluations, failure)``; ``params`` is None when
    it fails (``failure`` says why, or is None when the ``budget`` of evaluations ran out)."""
    evaluations = 0
    # Best feasible point seen: nlopt's Python binding raises on RoundoffLimited without
    # returning its point, so the objective keeps it.
    best_value, best_params = math.inf, start.copy()

    def objective(params: FloatArray, grad: FloatArray) -> float:
        nonlocal evaluations, best_value, best_params
        evaluations += 1
        value = negloglik(params, grad if grad.size > 0 else None, x, xlag, backcast)
        if not math.isfinite(value):
            # Only reachable at absurd trial points; a huge value steers the line search back.
            if grad.size > 0:
                grad[:] = 0.0
            return 1e300
        if value < best_value and params[1] + params[2] <= 1.0:
            best_value, best_params = value, params.copy()
        return value

    def stationarity(params: FloatArray, grad: FloatArray) -> float:
        if grad.size > 0:
            grad[:] = (0.0, 1.0, 1.0)
        return float(params[1] + params[2] - 1.0)  # nlopt: constraint(x) <= 0

    if budget < 1:
        return None, 0, None
    opt = nlopt.opt(nlopt.LD_SLSQP, 3)
    opt.set_min_objective(objective)
    opt.add_inequality_constraint(stationarity, 0.0)
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_rel(_FTOL_REL)
    opt.set_xtol_rel(_XTOL_REL)
    opt.set_maxeval(budget)
    try:
        params = np.asarray(opt.optimize(start), dtype=np.float64)
        result = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        # SLSQP stops this way when rounding prevents further progress: the best point it saw
        # is the optimum to the precision the likelihood can be evaluated at.
        return best_params, evaluations, None
    except Exception as exc:  # nlopt's failures (nlopt.runtime_error, ...) are not RuntimeError
        # Seen on degenerate data, e.g. an explosive series whose omega is far below its bound.
        reason = opt.get_errmsg() or str(exc) or type(exc).__name__
        return None, evaluations, f"optimiser failed: {reason}"
    if result == nlopt.MAXEVAL_REACHED:
        return None, evaluations, None
    return params, evaluations, None
