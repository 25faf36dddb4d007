"""Light without lines in the emulator fit: the light's term of the continuum measures a constant added
to the star's spectrum, and the veiling statistic is the chi^2 the light removes from a residual
beyond what the labels' steps remove, as written out in float64."""

import numpy as np
import pytest

import starcast


@pytest.fixture(scope="module")
def emulator():
    return starcast.load_model().emulator


def test_the_light_is_measured_beside_the_continuum(emulator):
    """An emulated spectrum times a continuum plus a constant b, noise-free: the fit with the light
    gives b and the spectrum (float64 least squares of the same columns, numpy's, agree), the fit
    without it cannot."""
    wl = emulator.wavelength
    labels = emulator.label_mean[None]
    grid = np.linspace(-1.0, 1.0, len(wl))
    continuum = 0.95 + 0.02 * grid - 0.01 * (2 * grid**2 - 1)
    e = emulator.spectra(labels)[0].astype(np.float64)
    b = 0.06
    x = (e * continuum + b)[None].astype(np.float32)
    weight = np.full_like(x, 1e4)
    model, coef = emulator.fit_continuum(x, weight, labels, veil=True)
    columns = np.concatenate([emulator.continuum_basis * e[:, None], np.ones((len(wl), 1))], axis=1)
    expected = np.linalg.lstsq(columns, x[0].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(coef[0], expected, rtol=1e-3, atol=1e-4)
    assert abs(coef[0, -1] - b) < 1e-3
    np.testing.assert_allclose(model[0], x[0], atol=1e-4)
    assert np.abs(emulator.fitted(x, weight, labels)[0] - x[0]).max() > 0.01


def test_veiling_statistic_is_the_float64_least_squares_drop(emulator):
    """Against the drops of the least-squares fits written out in float64: the constant made orthogonal
    to the continuum's polynomials times the model, fitted to the residual beside the Jacobian's
    columns, less the Jacobian's columns alone; 0 where the light comes out negative; and the light's
    sigma from that fit. On random models, weights, Jacobians and residuals that hold some light: to
    1e-3 of the statistic, the sigma to 1e-4 of itself."""
    rng = np.random.default_rng(11)
    rows, d, k = 48, len(emulator.wavelength), 5
    model = (1.0 - 0.3 * rng.random((rows, d))).astype(np.float32)
    weight = (1e4 * rng.random((rows, d))).astype(np.float32)
    jacobian = rng.normal(0.0, 0.01, (k, rows, d)).astype(np.float32)
    light = rng.normal(0.0, 0.002, (rows, 1)) * (1.0 - model)
    residual = (rng.normal(0.0, 0.01, (rows, d)) + light).astype(np.float32)
    m, w = model.astype(np.float64), weight.astype(np.float64)
    expected, sigma = np.empty(rows), np.empty(rows)
    for r in range(rows):
        polys = emulator.continuum_basis * m[r, :, None]
        along = np.linalg.lstsq(polys * np.sqrt(w[r, :, None]), np.sqrt(w[r]), rcond=None)[0]
        constant = 1.0 - polys @ along
        columns = np.concatenate([jacobian[:, r].T.astype(np.float64), constant[:, None]], axis=1)
        gram, rhs = columns.T @ (w[r, :, None] * columns), columns.T @ (w[r] * residual[r])
        both = np.linalg.solve(gram, rhs)
        steps = np.linalg.solve(gram[:k, :k], rhs[:k])
        expected[r] = both @ rhs - steps @ rhs[:k] if both[-1] > 0 else 0.0
        sigma[r] = np.sqrt(np.linalg.inv(gram)[-1, -1])
    statistic, light_sigma, _ = emulator.line_shape(residual, weight, model, np.ones(rows), jacobian)
    assert (expected > 0).sum() >= rows // 4 and (expected == 0).sum() >= rows // 4
    np.testing.assert_allclose(statistic, expected, atol=1e-3 * max(1.0, expected.max()))
    np.testing.assert_allclose(light_sigma, sigma, rtol=1e-4)
