"""Tests for GARCH(1,1) maximum-likelihood estimation (`agentspoonsd.market.garch_fit`).

References are independent of the code under test: a plain-loop simulator, a plain-loop variance
recursion and likelihood written here from the textbook formulas, and the `arch` package
(``arch_model(..., mean="Zero", vol="GARCH", p=1, q=1, dist="normal")``), a test-only dependency.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from arch import arch_model

from agentspoonsd.market import garch_likelihood, garch_newton
from agentspoonsd.market.garch_fit import (
    GarchFit,
    cumulative_variance,
    fit_garch11,
    fit_log_event,
    next_variance,
    variance_forecast,
)
from agentspoonsd.market.garch_grid import grid_values, starting_grid

# Per-bar parameters of the recovery test: unconditional variance 1e-6 (vol 0.1 % per bar),
# persistence 0.98, like a liquid crypto pair at 1-minute bars.
OMEGA, ALPHA, BETA = 2e-8, 0.08, 0.9


def simulate_garch(
    n: int, omega: float, alpha: float, beta: float, seed: int, innovations: str, nu: float = 5.0
) -> np.ndarray:
    """Plain-loop GARCH(1,1) simulation; the first 1000 draws are discarded as burn-in."""
    rng = np.random.default_rng(seed)
    burn = 1000
    if innovations == "normal":
        z = rng.standard_normal(n + burn)
    else:  # Student-t scaled to unit variance
        z = rng.standard_t(nu, n + burn) / math.sqrt(nu / (nu - 2.0))
    persistence = alpha + beta
    variance = omega / (1.0 - persistence) if persistence < 1.0 else omega / 0.02
    returns = np.empty(n + burn)
    for t in range(n + burn):
        returns[t] = math.sqrt(variance) * z[t]
        variance = omega + alpha * returns[t] ** 2 + beta * variance
    return returns[burn:]


def textbook_variances(returns: np.ndarray, omega: float, alpha: float, beta: float) -> np.ndarray:
    """sigma2_t by the plain recursion, started like arch: r²_{-1} = sigma2_{-1} = EWMA backcast."""
    tau = min(75, len(returns))
    weights = np.array([0.94**i for i in range(tau)])
    weights /= weights.sum()
    backcast = float(np.sum(weights * returns[:tau] ** 2))
    variances = np.empty(len(returns))
    previous_r2, previous_s2 = backcast, backcast
    for t, r in enumerate(returns):
        variances[t] = omega + alpha * previous_r2 + beta * previous_s2
        previous_r2, previous_s2 = r * r, variances[t]
    return variances


def textbook_loglik(returns: np.ndarray, variances: np.ndarray) -> float:
    return float(-0.5 * np.sum(np.log(2 * np.pi) + np.log(variances) + returns**2 / variances))


def fit_arch(returns: np.ndarray, tight: bool):
    """arch's fit on its own rescaled data (rescale=True); ``tight`` asks SLSQP for ftol 1e-14."""
    model = arch_model(returns, mean="Zero", vol="GARCH", p=1, q=1, dist="normal", rescale=True)
    options = {"ftol": 1e-14, "maxiter": 1000} if tight else None
    with warnings.catch_warnings():
        # A tight ftol can end in SLSQP's "positive directional derivative" at the optimum.
        warnings.simplefilter("ignore")
        return model.fit(disp="off", options=options)


# ---------------------------------------------------------------------------------------------
# (1) Recovery of known parameters


@pytest.mark.parametrize(
    ("innovations", "tol"),
    [
        # Tolerances ≈ 4.5 standard deviations of the estimator over 20 seeds at n = 20,000
        # (normal: sd alpha 0.0036, beta 0.0044, alpha+beta 0.0022, omega 8.5 %, uncond 5.5 %;
        # Student-t(5), a quasi-likelihood, is noisier: 0.0042, 0.0059, 0.0037, 12 %, 8.8 %).
        (
            "normal",
            {"alpha": 0.016, "beta": 0.02, "pers": 0.01, "omega": 0.4, "uncond": 0.25},
        ),
        ("t", {"alpha": 0.02, "beta": 0.027, "pers": 0.017, "omega": 0.55, "uncond": 0.4}),
    ],
)
def test_recovers_known_parameters(innovations: str, tol: dict[str, float]) -> None:
    returns = simulate_garch(20_000, OMEGA, ALPHA, BETA, seed=2024, innovations=innovations)
    fit = fit_garch11(returns)
    assert fit.status == "ok", fit.message
    assert fit.n_obs == 20_000
    assert abs(fit.alpha - ALPHA) < tol["alpha"]
    assert abs(fit.beta - BETA) < tol["beta"]
    assert abs(fit.persistence - (ALPHA + BETA)) < tol["pers"]
    assert abs(fit.omega / OMEGA - 1.0) < tol["omega"]
    assert abs(fit.unconditional_variance / (OMEGA / (1 - ALPHA - BETA)) - 1.0) < tol["uncond"]


def test_reported_variances_and_loglik_follow_the_textbook_recursion() -> None:
    returns = simulate_garch(3000, OMEGA, ALPHA, BETA, seed=7, innovations="t")
    fit = fit_garch11(returns)
    assert fit.status == "ok", fit.message
    variances = textbook_variances(returns, fit.omega, fit.alpha, fit.beta)
    assert fit.last_variance == pytest.approx(variances[-1], rel=1e-10)
    expected_next = fit.omega + fit.alpha * returns[-1] ** 2 + fit.beta * variances[-1]
    assert fit.next_variance == pytest.approx(expected_next, rel=1e-10)
    assert fit.loglik == pytest.approx(textbook_loglik(returns, variances), rel=1e-11)


def test_is_scale_equivariant_down_to_extreme_scales() -> None:
    """omega scales with c², alpha/beta are unchanged, loglik shifts by -n log c."""
    returns = simulate_garch(1500, OMEGA, ALPHA, BETA, seed=11, innovations="normal")
    base = fit_garch11(returns)
    assert base.status == "ok", base.message
    # 1e-140: r² ~ 1e-286 and omega ~ 1e-288 stay normal floats (smaller scales underflow omega).
    for c in (1e-140, 1e-3, 1e3, 1e140):
        scaled = fit_garch11(returns * c)
        assert scaled.status == "ok", scaled.message
        assert scaled.alpha == pytest.approx(base.alpha, abs=1e-9)
        assert scaled.beta == pytest.approx(base.beta, abs=1e-9)
        assert scaled.omega / c / c == pytest.approx(base.omega, rel=1e-7)
        assert scaled.last_variance / c / c == pytest.approx(base.last_variance, rel=1e-7)
        expected_loglik = base.loglik - len(returns) * math.log(c)
        assert scaled.loglik == pytest.approx(expected_loglik, rel=1e-12, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# (2) Agreement with arch


ARCH_CASES = [
    # (n, omega, alpha, beta, innovations, seed)
    (2000, 2e-8, 0.08, 0.90, "normal", 1),
    (2000, 2e-8, 0.08, 0.90, "t", 2),
    (500, 2e-8, 0.08, 0.90, "t", 3),
    (1000, 1.2e-7, 0.07, 0.90, "t", 4),
    (3000, 5e-8, 0.15, 0.80, "normal", 5),
    (1000, 1e-8, 0.03, 0.95, "t", 6),
]


@pytest.mark.parametrize(("n", "omega", "alpha", "beta", "innovations", "seed"), ARCH_CASES)
def test_agrees_with_arch(
    n: int, omega: float, alpha: float, beta: float, innovations: str, seed: int
) -> None:
    returns = simulate_garch(n, omega, alpha, beta, seed=seed, innovations=innovations)
    fit = fit_garch11(returns)
    assert fit.status == "ok", fit.message
    default = fit_arch(returns, tight=False)
    tight = fit_arch(returns, tight=True)
    scale = default.scale  # arch fits returns * scale: compare everything in its units
    assert scale == tight.scale and scale > 1.0
    ours_omega = fit.omega * scale**2
    ours_loglik = fit.loglik - n * math.log(scale)

    # arch's likelihood is the textbook one with the same backcast (validates the reference).
    arch_params = tight.params.to_numpy()
    arch_variances = textbook_variances(returns * scale, *arch_params)
    assert textbook_loglik(returns * scale, arch_variances) == pytest.approx(
        tight.loglikelihood, rel=1e-12
    )
    assert arch_params[1] + arch_params[2] < 1.0 - 1e-4  # an interior optimum

    # Never worse than arch beyond arch's own stopping rule (1e-6 absolute on the total
    # log-likelihood). Observed on these cases: ours - default in [2e-9, 4e-7] (ours is higher),
    # ours - tight in [0, 1e-9], relative gap to tight <= 1e-12.
    assert ours_loglik >= default.loglikelihood - 1e-6
    assert ours_loglik >= tight.loglikelihood - 1e-6
    assert ours_loglik == pytest.approx(tight.loglikelihood, rel=1e-10)
    assert ours_loglik == pytest.approx(default.loglikelihood, rel=1e-8)

    # Parameters. Tight arch reaches the same optimum: observed |d alpha|, |d beta| <= 2.5e-7,
    # alpha + beta within 3e-7 and omega within 3e-5 relative; the bounds allow ~20x. arch's
    # default (ftol 1e-6 on the total log-likelihood, finite-difference gradient) stops further
    # away along the flat omega/beta ridge: observed alpha + beta within 8e-5 relative, alpha
    # within 4e-5, omega within 6e-4 (worst at n = 500).
    assert fit.alpha == pytest.approx(arch_params[1], abs=5e-6)
    assert fit.beta == pytest.approx(arch_params[2], abs=5e-6)
    assert ours_omega == pytest.approx(arch_params[0], rel=5e-4)
    assert fit.persistence == pytest.approx(arch_params[1] + arch_params[2], rel=5e-6)
    default_params = default.params.to_numpy()
    assert fit.persistence == pytest.approx(default_params[1] + default_params[2], rel=1e-3)
    assert fit.alpha == pytest.approx(default_params[1], abs=1e-3)
    assert ours_omega == pytest.approx(default_params[0], rel=1e-2)

    # Conditional variance of the last bar and the one-step forecast (observed within 3e-6).
    arch_last_variance = float(tight.conditional_volatility[-1]) ** 2
    assert fit.last_variance * scale**2 == pytest.approx(arch_last_variance, rel=1e-4)
    arch_next = float(tight.forecast(horizon=1, reindex=False).variance.to_numpy()[-1, 0])
    assert fit.next_variance * scale**2 == pytest.approx(arch_next, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_warm_refit_takes_the_quick_path_and_agrees_with_arch(seed: int) -> None:
    """The daemon's refit: the window moved by 100 of its 500 returns, warm-started from the
    previous fit. Newton's method finds the optimum; arch (tight) agrees as in the cold case."""
    returns = simulate_garch(600, OMEGA, ALPHA, BETA, seed=seed, innovations="t")
    previous = fit_garch11(returns[:500])
    window = returns[100:]
    fit = fit_garch11(window, previous=previous)
    assert previous.status == fit.status == "ok", fit.message
    assert fit.method == "newton"
    assert fit.iterations <= 12  # observed 4-7 evaluations (a cold SLSQP fit takes 20-40)
    tight = fit_arch(window, tight=True)
    default = fit_arch(window, tight=False)
    scale = tight.scale
    ours_loglik = fit.loglik - len(window) * math.log(scale)
    assert ours_loglik >= default.loglikelihood - 1e-6
    assert ours_loglik == pytest.approx(tight.loglikelihood, rel=1e-10)
    arch_params = tight.params.to_numpy()
    assert fit.alpha == pytest.approx(arch_params[1], abs=5e-6)
    assert fit.beta == pytest.approx(arch_params[2], abs=5e-6)
    assert fit.omega * scale**2 == pytest.approx(arch_params[0], rel=5e-4)
    arch_next = float(tight.forecast(horizon=1, reindex=False).variance.to_numpy()[-1, 0])
    assert fit.next_variance * scale**2 == pytest.approx(arch_next, rel=1e-4)
    # The same optimum as the full optimiser from a cold start.
    cold = fit_garch11(window, max_evaluations=300)
    assert fit.loglik == pytest.approx(cold.loglik, rel=1e-12)


@pytest.mark.parametrize(
    ("omega", "alpha", "beta", "seed", "face"),
    [
        pytest.param(1e-7, 0.0, 0.9, 3, "alpha", id="calm: alpha = 0"),
        pytest.param(2e-8, 0.01, 0.97, 1, "alpha", id="weak: alpha = 0"),
        pytest.param(2e-8, 0.1, 0.9, 5, "persistence", id="integrated: alpha + beta = 1"),
    ],
)
def test_quick_path_finds_optima_on_the_bounds(
    omega: float, alpha: float, beta: float, seed: int, face: str
) -> None:
    """Projected Newton: an optimum on alpha >= 0 or alpha + beta <= 1 is found exactly on it,
    never worse than arch's (whose SLSQP stops a rounding error inside)."""
    returns = simulate_garch(600, omega, alpha, beta, seed=seed, innovations="normal")
    previous = fit_garch11(returns[:500])
    window = returns[100:]
    fit = fit_garch11(window, previous=previous)
    assert fit.method == "newton"
    if face == "alpha":
        assert fit.status == "ok" and fit.alpha == 0.0
    else:
        assert fit.status == "nonstationary" and fit.persistence == pytest.approx(1.0, abs=1e-15)
    default = fit_arch(window, tight=False)
    arch_params = default.params.to_numpy()
    assert fit.loglik - len(window) * math.log(default.scale) >= default.loglikelihood - 1e-6
    assert fit.alpha == pytest.approx(arch_params[1], abs=1e-3)
    assert fit.persistence == pytest.approx(arch_params[1] + arch_params[2], abs=1e-4)


@pytest.mark.parametrize("seed", [0, 2])
def test_quick_path_finds_the_corner_alpha_zero_beta_one(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variance growing linearly over the window: the optimum is the corner alpha = 0,
    beta = 1 (sigma2_t = b + omega (t + 1)), where both bounds bind; Newton holds both exactly."""
    rng = np.random.default_rng(seed)
    returns = 1e-3 * np.sqrt(1.0 + np.arange(500) / 40.0) * rng.standard_normal(500)
    fit = fit_garch11(returns)
    assert fit.method == "newton" and fit.status == "nonstationary"
    assert fit.alpha == 0.0 and fit.beta == 1.0
    with monkeypatch.context() as patch:
        patch.setattr(garch_newton, "_NEWTON_MAX_ITERATIONS", 0)  # the full optimiser alone
        full = fit_garch11(returns)
    assert full.method == "slsqp"
    assert fit.loglik >= full.loglik - 1e-9
    tight = fit_arch(returns, tight=True)
    # arch's SLSQP ends up to ~2e-9 outside alpha + beta <= 1, worth ~1e-6 of log-likelihood.
    assert fit.loglik - len(returns) * math.log(tight.scale) == pytest.approx(
        tight.loglikelihood, abs=1e-5
    )
    assert tight.params.to_numpy()[1] < 1e-8


def test_short_memory_derivatives_match_the_long_ones_and_finite_differences() -> None:
    rng = np.random.default_rng(5)
    r = rng.standard_normal(500) * (1.0 + 0.5 * np.sin(np.arange(500) / 30.0))
    x = r * r / np.mean(r * r)
    b = garch_likelihood.arch_backcast(x)
    xlag = np.concatenate(([b], x[:-1]))
    for beta in (0.45, 0.6, 0.9):  # both formulations are valid here
        long = garch_likelihood.newton_terms(np.array((0.3, 0.1, beta)), x, xlag, b, True)
        short = garch_likelihood.short_memory_terms(0.3, 0.1, beta, x, xlag, b, True)
        assert short[0] == pytest.approx(long[0], rel=1e-14)
        for got, want in zip(short[1:], long[1:], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    for beta in (0.0, 0.2):  # beta = 0: one-sided differences in beta
        params = np.array((0.5, 0.2, beta))
        value, grad, hess, _ = garch_likelihood.short_memory_terms(*params, x, xlag, b, True)
        assert grad is not None and hess is not None
        eps = 1e-6
        for i in range(3):
            up = params.copy()
            up[i] += eps
            v_up, g_up, _, _ = garch_likelihood.short_memory_terms(*up, x, xlag, b, True)
            assert g_up is not None
            assert (v_up - value) / eps == pytest.approx(grad[i], abs=2e-6)
            np.testing.assert_allclose(
                (np.array(g_up) - grad) / eps, np.array(hess)[:, i], atol=2e-5
            )


def _scaled_squares(seed: int, n: int = 500) -> tuple[np.ndarray, np.ndarray, float]:
    """``x`` (squared returns with mean 1), ``xlag`` and the backcast, as `fit_garch11` makes."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(n) * (1.0 + 0.5 * np.sin(np.arange(n) / 30.0))
    x = r * r / np.mean(r * r)
    b = garch_likelihood.arch_backcast(x)
    return x, np.concatenate(([b], x[:-1])), b


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99, 0.999999, 1.0])
def test_long_memory_terms_match_the_recursion_and_finite_differences(beta: float) -> None:
    """`newton_terms`' closed forms (one running sum and one matrix product) against the
    textbook recursion for the value and central differences of it for the gradient and of
    the gradient for the Hessian, up to the corner beta = 1."""
    x, xlag, b = _scaled_squares(11)
    params = np.array((0.05, 0.04 if beta < 1.0 else 0.0, beta))

    def textbook(p: np.ndarray) -> float:
        s2 = np.empty_like(x)
        prev_x, prev_s2 = b, b
        for t in range(x.shape[0]):
            s2[t] = p[0] + p[1] * prev_x + p[2] * prev_s2
            prev_x, prev_s2 = x[t], s2[t]
        return float(0.5 * (math.log(2 * math.pi) + np.mean(np.log(s2) + x / s2)))

    value, grad, hess, fisher = garch_likelihood.newton_terms(params, x, xlag, b, True)
    assert grad is not None and hess is not None and fisher is not None
    assert value == pytest.approx(textbook(params), rel=1e-13)
    assert garch_likelihood.newton_terms(params, x, xlag, b, False)[0] == pytest.approx(
        value, rel=1e-14
    )
    for i in range(3):
        eps = 1e-5 * max(abs(params[i]), 1e-2)
        up, down = params.copy(), params.copy()
        up[i] += eps
        down[i] -= eps
        assert (textbook(up) - textbook(down)) / (2 * eps) == pytest.approx(
            grad[i], rel=1e-6, abs=1e-9
        )
        g_up = garch_likelihood.newton_terms(up, x, xlag, b, True)[1]
        g_down = garch_likelihood.newton_terms(down, x, xlag, b, True)[1]
        assert g_up is not None and g_down is not None
        np.testing.assert_allclose(
            (np.array(g_up) - g_down) / (2 * eps), np.array(hess)[:, i], rtol=1e-5, atol=1e-8
        )
    np.testing.assert_allclose(hess, np.array(hess).T, rtol=1e-9, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(np.array(fisher)) >= -1e-12)  # positive semi-definite


@pytest.mark.parametrize("n", [500, 1500])
def test_the_starting_grid_values_are_the_likelihood_at_each_point(n: int) -> None:
    """`grid_values` (block sums for windows up to ~535 returns, the row-wise filter above)
    equals `negloglik` at each of arch's 16 starting points, with omega scaled by the target."""
    x, xlag, b = _scaled_squares(4, n)
    target = float(x.mean())
    grid = starting_grid(n)
    assert (grid.single is not None) == (n == 500)
    values = grid_values(grid, target, x, xlag, b)
    for point, value in zip(grid.params, values, strict=True):
        scaled = point * np.array((target, 1.0, 1.0))
        assert value == pytest.approx(
            garch_likelihood.negloglik(scaled, None, x, xlag, b), rel=1e-13
        )


@pytest.mark.parametrize("seed", [0, 2])
def test_optimum_at_beta_zero_takes_the_quick_path(seed: int) -> None:
    # ARCH(1) data: the optimum has beta ~ 0, where beta**-t would overflow; the quick path's
    # short-memory derivatives (`_short_memory_terms`) and the bound beta >= 0 handle it.
    returns = simulate_garch(500, 1e-6, 0.3, 0.0, seed=seed, innovations="normal")
    fit = fit_garch11(returns)
    assert fit.status == "ok" and fit.method == "newton"
    assert fit.beta < 1e-6
    tight = fit_arch(returns, tight=True)
    ours = fit.loglik - len(returns) * math.log(tight.scale)
    assert ours == pytest.approx(tight.loglikelihood, rel=1e-10)
    assert ours >= tight.loglikelihood - 1e-6
    assert fit.alpha == pytest.approx(tight.params.to_numpy()[1], abs=5e-6)


@pytest.mark.parametrize("seed", [0, 2])
def test_slsqp_takes_over_where_the_quick_path_gives_up(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One Newton iteration is too few from a cold start: the quick path gives up and nlopt's
    # SLSQP finds the optimum from the same start.
    monkeypatch.setattr(garch_newton, "_NEWTON_MAX_ITERATIONS", 1)
    returns = simulate_garch(500, 1e-6, 0.3, 0.0, seed=seed, innovations="normal")
    fit = fit_garch11(returns)
    assert fit.status == "ok" and fit.method == "slsqp"
    assert fit.beta < 1e-6
    tight = fit_arch(returns, tight=True)
    ours = fit.loglik - len(returns) * math.log(tight.scale)
    assert ours == pytest.approx(tight.loglikelihood, rel=1e-10)
    assert fit.alpha == pytest.approx(tight.params.to_numpy()[1], abs=5e-6)


# ---------------------------------------------------------------------------------------------
# (3) Forecasts


def loop_forecast(fit: GarchFit, horizon: int) -> np.ndarray:
    out = [fit.next_variance]
    for _ in range(horizon - 1):
        out.append(fit.omega + (fit.alpha + fit.beta) * out[-1])
    return np.array(out)


def test_forecast_matches_the_recursion_and_converges_to_the_unconditional_variance() -> None:
    returns = simulate_garch(2000, OMEGA, ALPHA, BETA, seed=22, innovations="t")
    fit = fit_garch11(returns)
    assert fit.status == "ok", fit.message
    forecast = variance_forecast(fit, 400)
    assert forecast.shape == (400,) and forecast.dtype == np.float64
    np.testing.assert_allclose(forecast, loop_forecast(fit, 400), rtol=1e-12)
    assert forecast[0] == fit.next_variance
    # textbook closed form
    uncond = fit.omega / (1 - fit.alpha - fit.beta)
    closed = uncond + fit.persistence ** np.arange(400) * (fit.next_variance - uncond)
    np.testing.assert_allclose(forecast, closed, rtol=1e-11)
    assert variance_forecast(fit, 20_000)[-1] == pytest.approx(uncond, rel=1e-12)
    assert fit.unconditional_variance == pytest.approx(uncond, rel=1e-15)


# 1.7e-17: a fit `agentspoonsd simulate --seed 1` made (alpha ~1.7e-17, beta 0), where
# ``persistence - 1`` rounds to -1 exactly; -1e-17: an estimate a rounding error below zero.
@pytest.mark.parametrize(
    "persistence", [1.0, 1.0 - 1e-7, 1.0 - 1e-12, 0.0, 1.7e-17, 1e-9, 0.5, 0.2, -1e-17]
)
def test_forecast_matches_the_recursion_at_and_near_the_boundary(persistence: float) -> None:
    alpha = persistence / 4
    beta = persistence - alpha
    status = "nonstationary" if persistence >= 1 - 1e-6 else "ok"
    fit = GarchFit(status, 3e-8, alpha, beta, 0.0, 100, 10, "", 1e-6, 1.2e-6)
    np.testing.assert_allclose(variance_forecast(fit, 500), loop_forecast(fit, 500), rtol=1e-12)
    if persistence >= 1 - 1e-6:
        assert math.isnan(fit.unconditional_variance)
    else:
        assert fit.unconditional_variance == pytest.approx(3e-8 / (1 - persistence), rel=1e-15)


def test_forecast_rejects_bad_horizon_and_failed_fit() -> None:
    fit = fit_garch11(simulate_garch(600, OMEGA, ALPHA, BETA, seed=3, innovations="normal"))
    with pytest.raises(ValueError):
        variance_forecast(fit, 0)
    with pytest.raises(ValueError):
        variance_forecast(fit, -3)
    with pytest.raises(ValueError):
        variance_forecast(fit_garch11([0.001] * 10), 5)


# -1e-17: an estimate a rounding error below zero (it once stopped the generator); 1.7e-17: one
# where ``persistence - 1`` rounds to -1 (it stopped `simulate --seed 1`).
@pytest.mark.parametrize(
    "persistence", [-1e-17, 0.0, 1.7e-17, 1e-9, 0.2, 0.5, 0.98, 1.0 - 2e-6, 1.0]
)
@pytest.mark.parametrize("horizon", [1, 2, 10, 1000])
def test_cumulative_variance_is_the_sum_of_the_step_forecasts(
    persistence: float, horizon: int
) -> None:
    alpha = persistence / 4
    status = "nonstationary" if persistence >= 1 - 1e-6 else "ok"
    fit = GarchFit(status, 3e-8, alpha, persistence - alpha, 0.0, 100, 10, "", 1e-6, 1.2e-6)
    expected = math.fsum(loop_forecast(fit, horizon).tolist())
    got = cumulative_variance(fit.omega, fit.persistence, fit.next_variance, horizon)
    # Relative error ~ eps * long-run variance / variance_1: here at most ~3e-12.
    assert got == pytest.approx(expected, rel=1e-10)
    if horizon == 1:
        assert got == fit.next_variance


def test_cumulative_variance_rejects_a_bad_horizon() -> None:
    with pytest.raises(ValueError):
        cumulative_variance(3e-8, 0.9, 1e-6, 0)


def test_next_variance_is_one_step_of_the_recursion() -> None:
    assert next_variance(2e-8, 0.08, 0.9, -0.002, 1.5e-6) == pytest.approx(
        2e-8 + 0.08 * 4e-6 + 0.9 * 1.5e-6, rel=1e-15
    )
    # Rolling the forecast forward bar by bar reproduces the variances of the recursion.
    returns = simulate_garch(800, OMEGA, ALPHA, BETA, seed=5, innovations="t")
    fit = fit_garch11(returns[:600])
    variances = textbook_variances(returns, fit.omega, fit.alpha, fit.beta)
    rolled = fit.next_variance  # sigma2 of bar 600
    for t in range(600, 799):
        assert rolled == pytest.approx(variances[t], rel=1e-9)
        rolled = next_variance(fit.omega, fit.alpha, fit.beta, returns[t], rolled)


# ---------------------------------------------------------------------------------------------
# (4) Failure modes: never an exception


def _assert_failed(fit: GarchFit) -> None:
    assert fit.status == "failed"
    assert fit.message
    for value in (fit.omega, fit.alpha, fit.beta, fit.loglik, fit.last_variance):
        assert math.isnan(value)
    assert math.isnan(fit.next_variance) and math.isnan(fit.persistence)
    assert math.isnan(fit.unconditional_variance)


_GOOD = simulate_garch(1000, OMEGA, ALPHA, BETA, seed=9, innovations="t")


@pytest.mark.parametrize(
    "returns",
    [
        pytest.param([], id="empty"),
        pytest.param(_GOOD[:10], id="10 obs"),
        pytest.param(_GOOD[:49], id="49 obs"),
        pytest.param(np.where(np.arange(1000) == 500, np.nan, _GOOD), id="nan"),
        pytest.param(np.where(np.arange(1000) == 3, np.inf, _GOOD), id="inf"),
        pytest.param(np.where(np.arange(1000) == 3, -np.inf, _GOOD), id="-inf"),
        pytest.param(np.zeros(1000), id="all zero"),
        pytest.param(_GOOD.reshape(2, 500), id="2-D"),
        pytest.param("not returns", id="string"),
        pytest.param(None, id="None"),
        pytest.param(5e-4, id="scalar"),
    ],
)
def test_bad_data_gives_failed_status(returns: object) -> None:
    fit = fit_garch11(returns)  # type: ignore[arg-type]
    _assert_failed(fit)


def test_evaluation_budget_exhausted_gives_failed_status() -> None:
    fit = fit_garch11(_GOOD, max_evaluations=2)
    _assert_failed(fit)
    assert fit.iterations == 2


def test_fifty_observations_are_enough_to_try() -> None:
    fit = fit_garch11(_GOOD[:50])
    assert fit.n_obs == 50
    assert fit.status != "failed" or "at least" not in fit.message


def test_explosive_series_is_nonstationary() -> None:
    # alpha + beta = 1.02: the variance grows about 2 % a bar
    returns = simulate_garch(1000, 2e-8, 0.12, 0.9, seed=13, innovations="normal")
    assert np.all(np.isfinite(returns))
    fit = fit_garch11(returns)
    assert fit.status == "nonstationary", fit.message
    assert fit.persistence == pytest.approx(1.0, abs=1e-6)
    assert "boundary" in fit.message
    assert math.isnan(fit.unconditional_variance)
    # Forecasts still work: at persistence 1 the recursion grows by omega per step.
    np.testing.assert_allclose(variance_forecast(fit, 50), loop_forecast(fit, 50), rtol=1e-10)


def test_strongly_explosive_series_fails_without_raising() -> None:
    # alpha + beta = 1.1: returns grow by ~1e20 over the window, so the scaled omega would sit
    # far below its lower bound; SLSQP's subproblem gives up ("more than iter SQP iterations").
    returns = simulate_garch(1000, 2e-8, 0.25, 0.85, seed=13, innovations="normal")
    fit = fit_garch11(returns)
    assert fit.status in ("nonstationary", "failed")
    if fit.status == "failed":
        _assert_failed(fit)
        assert "optimiser failed" in fit.message
    else:
        assert fit.persistence >= 1.0 - 1e-6


def test_integrated_series_is_estimated_at_or_near_the_boundary() -> None:
    returns = simulate_garch(3000, 2e-8, 0.1, 0.9, seed=17, innovations="t")
    fit = fit_garch11(returns)
    assert fit.status in ("ok", "nonstationary")
    assert fit.persistence > 0.985


@pytest.mark.parametrize(
    "returns",
    [
        pytest.param(np.where(np.arange(1000) % 20 == 0, _GOOD, 0.0), id="95% zeros"),
        pytest.param(np.where(np.arange(1000) % 2 == 0, 1e-3, -1e-3), id="constant magnitude"),
        pytest.param(np.where(np.arange(1000) == 700, 0.2, _GOOD), id="huge outlier"),
        pytest.param(np.random.default_rng(1).standard_normal(1000) * 1e-3, id="white noise"),
    ],
)
def test_awkward_data_never_raises(returns: np.ndarray) -> None:
    fit = fit_garch11(returns)
    assert fit.status in ("ok", "nonstationary", "failed")
    if fit.status != "failed":
        assert fit.omega > 0 and fit.alpha >= 0 and fit.beta >= 0
        assert fit.persistence <= 1.0
        assert np.all(np.isfinite(variance_forecast(fit, 10)))


# ---------------------------------------------------------------------------------------------
# (5) Warm start and determinism


def test_warm_start_reaches_the_cold_optimum() -> None:
    returns = simulate_garch(1100, OMEGA, ALPHA, BETA, seed=31, innovations="t")
    first = fit_garch11(returns[:1000])
    for shift in (1, 20, 100):
        window = returns[shift : shift + 1000]
        cold = fit_garch11(window)
        warm = fit_garch11(window, previous=first)
        assert cold.status == warm.status == "ok"
        assert warm.loglik == pytest.approx(cold.loglik, rel=1e-11)
        assert warm.alpha == pytest.approx(cold.alpha, abs=2e-6)
        assert warm.beta == pytest.approx(cold.beta, abs=2e-6)
        assert warm.omega == pytest.approx(cold.omega, rel=1e-4)
        assert warm.next_variance == pytest.approx(cold.next_variance, rel=1e-5)


def test_warm_start_from_the_optimum_converges_faster() -> None:
    returns = simulate_garch(1000, OMEGA, ALPHA, BETA, seed=37, innovations="normal")
    cold = fit_garch11(returns)
    warm = fit_garch11(returns, previous=cold)
    assert warm.iterations < cold.iterations
    assert warm.loglik == pytest.approx(cold.loglik, rel=1e-12)


def test_failed_or_boundary_previous_does_not_hurt() -> None:
    returns = simulate_garch(1000, OMEGA, ALPHA, BETA, seed=41, innovations="t")
    cold = fit_garch11(returns)
    assert fit_garch11(returns, previous=fit_garch11([])) == cold  # ignored: bit-for-bit cold
    boundary = GarchFit("nonstationary", 1e-12, 0.3, 0.7, 0.0, 1000, 5, "", 1e-6, 1e-6)
    warm = fit_garch11(returns, previous=boundary)
    assert warm.loglik == pytest.approx(cold.loglik, rel=1e-11)
    assert warm.persistence == pytest.approx(cold.persistence, abs=2e-6)


def test_fit_is_deterministic() -> None:
    returns = simulate_garch(1000, OMEGA, ALPHA, BETA, seed=43, innovations="t")
    assert fit_garch11(returns) == fit_garch11(returns.tolist())


# ---------------------------------------------------------------------------------------------
# (6) Logging: a nonstationary fit is an estimate, not a failure


def test_log_event_tells_nonstationary_from_failed() -> None:
    ok = fit_garch11(simulate_garch(1000, OMEGA, ALPHA, BETA, seed=43, innovations="t"))
    level, event, fields = fit_log_event(ok)
    assert (level, event) == ("debug", "garch_fitted")
    assert fields["alpha"] == ok.alpha and fields["observations"] == 1000

    boundary = GarchFit("nonstationary", 1e-8, 0.1, 0.9, 0.0, 500, 9, "on the boundary", 1e-6, 1e-6)
    level, event, fields = fit_log_event(boundary)
    assert (level, event) == ("info", "garch_fit_nonstationary")
    assert fields == {"alpha": 0.1, "beta": 0.9, "persistence": 1.0, "observations": 500}

    level, event, fields = fit_log_event(fit_garch11([0.001] * 10))
    assert (level, event) == ("warning", "garch_fit_failed")
    assert fields["status"] == "failed" and "at least" in fields["detail"]


def test_generator_logs_each_status_under_its_own_event() -> None:
    import structlog
    import trio
    from structlog.testing import capture_logs

    from agentspoonsd.market.generator import Generator
    from agentspoonsd.settings import GeneratorSettings

    send, _receive = trio.open_memory_channel(1)
    generator = Generator(GeneratorSettings(seed=1).spec(), send, structlog.get_logger())
    boundary = GarchFit("nonstationary", 1e-8, 0.1, 0.9, 0.0, 500, 9, "on the boundary", 1e-6, 1e-6)
    with capture_logs() as logs:
        generator._install("BTC/USD", boundary)
        generator._install("BTC/USD", fit_garch11([0.001] * 10))
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("garch_fit_nonstationary", "info"),
        ("garch_fit_failed", "warning"),
    ]
    assert logs[0]["symbol"] == "BTC/USD" and logs[0]["persistence"] == 1.0
