import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from starcast.trainers.calibrate import calibration_factors, epistemic_thresholds, fit_sigma_scale
from starcast.trainers.metrics import coverage


@pytest.mark.parametrize("method", ["coverage", "nll"])
@pytest.mark.parametrize("miscale", [0.3, 3.0])
def test_recalibration_moves_coverage_to_nominal_on_a_misscaled_model(method, miscale):
    rng = np.random.default_rng(0)
    n = 20000
    true_sigma = rng.uniform(0.5, 2.0, size=(n, 2))
    mean = rng.normal(size=(n, 2))
    y = mean + true_sigma * rng.normal(size=(n, 2))
    reported = true_sigma * miscale  # over- or under-confident by a constant factor
    factors = calibration_factors(y, mean, reported, method)
    np.testing.assert_allclose(factors, 1 / miscale, rtol=0.03)
    for k in range(2):
        before = coverage(y[:, k], mean[:, k], reported[:, k], 0.68)
        after = coverage(y[:, k], mean[:, k], reported[:, k] * factors[k], 0.68)
        assert abs(after - 0.68) < 0.01 < abs(before - 0.68)
        assert abs(coverage(y[:, k], mean[:, k], reported[:, k] * factors[k], 0.95) - 0.95) < 0.01


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 50.0), min_size=5, max_size=200))
def test_nll_scale_is_the_minimiser_of_the_gaussian_nll(z):
    z = np.array(z)
    c = fit_sigma_scale(z, "nll")

    def nll(log_c):  # NLL of residuals z (in units of the reported sigma) under sigma * c
        return np.mean(log_c + 0.5 * (z / np.exp(log_c)) ** 2)

    ref = np.exp(minimize_scalar(nll, bounds=(-10, 10), method="bounded",
                                 options={"xatol": 1e-10}).x)
    assert c == pytest.approx(ref, rel=1e-4)


def test_epistemic_threshold_is_the_validation_quantile():
    sig = np.arange(1, 1001, dtype=float)[:, None] * [1.0, 10.0]
    thr = epistemic_thresholds(sig, 0.995)
    assert (sig > thr).mean(axis=0) == pytest.approx([0.005, 0.005], abs=1e-3)
