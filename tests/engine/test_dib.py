"""The diffuse interstellar band at 4428 A in the emulator fit (`engine.emulator`): its terms are a
Lorentzian and its derivatives, and its statistic finds an absorption band of the size reddened stars
carry while it ignores noise and emission."""

import numpy as np
import pytest
from starcast.engine.emulator import DIB_CENTRE, DIB_FWHM, DIB_TERMS, DIB_WINDOW

import starcast


@pytest.fixture(scope="module")
def emulator():
    return starcast.load_model().emulator


def _lorentzian(wavelength, centre, half_width):
    return 1.0 / (1.0 + ((wavelength - centre) / half_width) ** 2)


def test_dib_terms_are_minus_a_lorentzian_and_its_derivatives(emulator):
    """Against central finite differences of the Lorentzian in its centre and half width (times the
    half width), in float64."""
    wl, h, step = emulator.wavelength, 0.5 * DIB_FWHM, 1e-4
    expected = -np.stack([
        _lorentzian(wl, DIB_CENTRE, h),
        h * (_lorentzian(wl, DIB_CENTRE + step, h) - _lorentzian(wl, DIB_CENTRE - step, h)) / (2 * step),
        h * (_lorentzian(wl, DIB_CENTRE, h + step) - _lorentzian(wl, DIB_CENTRE, h - step)) / (2 * step)],
        axis=1)
    assert emulator.dib_basis.shape == (len(wl), DIB_TERMS)
    np.testing.assert_allclose(emulator.dib_basis, expected, atol=1e-6)


def test_defect_columns_hold_the_band_only_on_its_rows(emulator):
    columns = emulator.defect_columns(np.array([0.02, 0.03]), np.array([True, False]))
    assert columns.shape == (2, len(emulator.wavelength), 2 + DIB_TERMS)
    np.testing.assert_array_equal(columns[0, :, 2:], emulator.dib_basis)
    assert not columns[1, :, 2:].any()
    assert emulator.defect_columns(np.array([0.02]), np.array([False])).shape[2] == 2
    assert emulator.defect_columns() is None


@pytest.mark.parametrize("depth, found", [(0.02, True), (-0.02, False), (0.0, False)])
def test_dib_statistic_finds_an_absorption_band_not_noise_or_emission(emulator, depth, found):
    """White noise at SNR 100 on a flat model, with a Lorentzian band 2% deep of another centre and
    width than the terms' (4428.2 A, FWHM 20 A) in absorption, in emission, or none: the statistic
    is ~chi^2 with 3 degrees of freedom without a band (below 20 in 99 of 100 rows), about the band's
    own chi^2 with it (0.63 A of equivalent width: 157 at this SNR), 0 in emission."""
    rng = np.random.default_rng(4)
    wl, rows = emulator.wavelength, 100
    model = np.ones((rows, len(wl)), np.float32)
    band = depth * _lorentzian(wl, 4428.2, 10.0)
    residual = (-band[None] + rng.normal(0.0, 0.01, (rows, len(wl)))).astype(np.float32)
    weight = np.full_like(model, 1e4)
    statistic = emulator.dib(residual, weight, model, np.ones(rows), np.full(rows, 1 / 50.0))
    signal = float(np.sum(1e4 * band**2))
    if found:
        assert np.all(statistic > 20) and np.median(statistic) == pytest.approx(signal, rel=0.2)
    else:
        assert np.mean(statistic < 20) >= 0.99 and (depth == 0 or np.median(statistic) == 0.0)


def test_a_fitted_band_is_measured_and_divided_out(emulator):
    """An emulated spectrum times a continuum and a band 5% deep of another centre and width than the
    terms' (4428.2 A, FWHM 20 A): the fitted continuum's band terms give its depth within 0.005
    (measured 0.0498) and a transmission within 0.002 of the band at every pixel (measured 0.0002),
    so that dividing it out leaves the star's spectrum."""
    wl = emulator.wavelength
    labels = emulator.label_mean[None]
    grid = np.linspace(-1.0, 1.0, len(wl))
    continuum = 1.0 + 0.02 * grid - 0.01 * (2 * grid**2 - 1)
    band = 1.0 - 0.05 * _lorentzian(wl, 4428.2, 10.0)
    star = emulator.spectra(labels)[0] * continuum
    x = (star * band)[None].astype(np.float32)
    _, coef = emulator.fit_continuum(x, np.full_like(x, 1e4), labels,
                                     extra=emulator.defect_columns(dib=np.array([True])))
    depths = emulator.band_depths(coef)
    assert depths[0, 0] == pytest.approx(0.05, abs=0.005)
    np.testing.assert_allclose(emulator.band(depths)[0], band, atol=0.002)
    np.testing.assert_allclose(x[0] / emulator.band(depths)[0], star, atol=0.002)


def test_dib_statistic_is_the_float64_least_squares_drop(emulator):
    """Against the drops of the two least-squares fits written out in float64 (band and sinusoid
    terms times the model, at the periodogram frequency given, over the pixels within DIB_WINDOW of
    the centre), on random models, weights and residuals: to 1e-3 of the statistic's noise scale
    (~1)."""
    rng = np.random.default_rng(7)
    rows, wl = 64, emulator.wavelength
    near = np.abs(wl - DIB_CENTRE) <= DIB_WINDOW
    model = (1.0 - 0.3 * rng.random((rows, len(wl)))).astype(np.float32)
    residual = rng.normal(0.0, 0.01, model.shape).astype(np.float32)
    weight = (1e4 * rng.random(model.shape)).astype(np.float32)
    freq = emulator._ripple_frequencies[rng.integers(0, len(emulator._ripple_frequencies), rows)]
    phase = 2 * np.pi * (wl - wl[0])[None] * freq[:, None]
    terms = (model[:, :, None].astype(np.float64) * np.concatenate(
        [np.broadcast_to(emulator.dib_basis, (rows, len(wl), DIB_TERMS)),
         np.stack([np.sin(phase), np.cos(phase)], axis=2)], axis=2))[:, near]
    gram = np.einsum("bd,bdi,bdj->bij", weight[:, near].astype(np.float64), terms, terms)
    rhs = np.einsum("bd,bdi->bi", (weight * residual)[:, near].astype(np.float64), terms)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    sinusoid = np.linalg.solve(gram[:, DIB_TERMS:, DIB_TERMS:], rhs[:, DIB_TERMS:, None])[..., 0]
    expected = np.where(coef[:, 0] > 0, (coef * rhs).sum(1) - (sinusoid * rhs[:, DIB_TERMS:]).sum(1), 0.0)
    statistic = emulator.dib(residual, weight, model, np.ones(rows), freq)
    np.testing.assert_allclose(statistic, expected, atol=1e-3)
