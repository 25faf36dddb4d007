"""The interstellar medium in the emulator fit: the bands' terms (`engine.emulator.BANDS`: the diffuse
interstellar bands and the nebular lines) are each band's profile and its derivatives, and their
statistics find absorption bands of the size reddened stars carry, and nebular emission lines, each in
its own place and of its own sign, while they ignore noise and the other sign; the pixels of the narrow
interstellar lines (`ISM_LINES`) weigh nothing."""

import math

import numpy as np
import pytest
from starcast.engine.emulator import BANDS, DIB_TERMS, ISM_HALF_WIDTH, ISM_LINES

import starcast

NARROW = 2  # the band at 4727 A, the strongest narrow one
H_GAMMA = next(j for j, band in enumerate(BANDS) if band.emission and band.centre == 4340.47)


@pytest.fixture(scope="module")
def emulator():
    return starcast.load_model().emulator


def _profile(wavelength, centre, half_width, profile):
    u = (wavelength - centre) / half_width
    return 1.0 / (1.0 + u * u) if profile == "lorentzian" else np.exp(-math.log(2.0) * u * u)


def _columns(j):
    return slice(DIB_TERMS * j, DIB_TERMS * (j + 1))


@pytest.mark.parametrize("j", range(len(BANDS)))
def test_dib_terms_are_minus_each_profile_and_its_derivatives(emulator, j):
    """Against central finite differences of the band's profile (Lorentzian or Gaussian) in its centre
    and half width (times the half width), in float64."""
    band = BANDS[j]
    wl, h, step = emulator.wavelength, 0.5 * band.fwhm, 1e-4

    def p(centre, half_width):
        return _profile(wl, centre, half_width, band.profile)
    expected = -np.stack([
        p(band.centre, h),
        h * (p(band.centre + step, h) - p(band.centre - step, h)) / (2 * step),
        h * (p(band.centre, h + step) - p(band.centre, h - step)) / (2 * step)], axis=1)
    assert emulator.dib_basis.shape == (len(wl), DIB_TERMS * len(BANDS))
    np.testing.assert_allclose(emulator.dib_basis[:, _columns(j)], expected, atol=1e-6)


def test_defect_columns_hold_each_band_only_on_its_rows(emulator):
    found = np.zeros((2, len(BANDS)), bool)
    found[0, [0, NARROW, H_GAMMA]] = True
    columns = emulator.defect_columns(np.array([0.02, 0.03]), found)
    assert columns.shape == (2, len(emulator.wavelength), 2 + DIB_TERMS * len(BANDS))
    for j in range(len(BANDS)):
        kept = emulator.dib_basis[:, _columns(j)] * found[0, j]
        np.testing.assert_array_equal(columns[0, :, 2:][:, _columns(j)], kept)
    assert not columns[1, :, 2:].any()
    assert emulator.defect_columns(np.array([0.02]), np.zeros((1, len(BANDS)), bool)).shape[2] == 2
    assert emulator.defect_columns() is None


@pytest.mark.parametrize("j, centre, fwhm, depth", [(0, 4428.2, 20.0, 0.02), (NARROW, 4727.2, 3.2, 0.04),
                                                    (H_GAMMA, 4340.6, 0.7, -0.12)])
@pytest.mark.parametrize("sign", [1, -1, 0])
def test_dib_statistic_finds_a_band_of_its_sign_not_noise_or_the_other_sign(emulator, j, centre, fwhm, depth,
                                                                             sign):
    """White noise at SNR 100 on a flat model, with a band of another centre and width than the
    terms' of its own sign (`depth` > 0: absorption; < 0: emission, a nebular line), of the other, or
    none: its statistic is ~chi^2 with 3 degrees of freedom without a band (below 20 in 99 of 100
    rows), 0.5-1.2x the band's own chi^2 with it (the broad band 2% deep: 157 at this SNR, median
    measured 157; the narrow one 4% deep: 96, measured 66, the rest taken by the sinusoid beside it
    over its short window; H gamma's nebular line 12% high: 188, measured 175), 0 with the other
    sign; the other bands' statistics stay those of noise."""
    rng = np.random.default_rng(4)
    wl, rows = emulator.wavelength, 100
    model = np.ones((rows, len(wl)), np.float32)
    band = sign * depth * _profile(wl, centre, 0.5 * fwhm, BANDS[j].profile)
    residual = (-band[None] + rng.normal(0.0, 0.01, (rows, len(wl)))).astype(np.float32)
    weight = np.full_like(model, 1e4)
    statistic = emulator.dib(residual, weight, model, np.ones(rows), np.full(rows, 1 / 50.0))
    assert statistic.shape == (rows, len(BANDS))
    others = np.delete(statistic, j, axis=1)
    assert np.mean(others < 20) >= 0.98
    signal, own = float(np.sum(1e4 * band**2)), statistic[:, j]
    if sign > 0:  # of its own sign
        assert np.mean(own > 20) >= 0.95 and 0.5 * signal < np.median(own) < 1.2 * signal, np.median(own)
    else:
        assert np.mean(own < 20) >= 0.99 and (sign == 0 or np.median(own) == 0.0)


def test_a_line_shallower_as_a_whole_is_no_nebular_emission(emulator):
    """Light without lines (5% of the continuum, veiling) makes every line shallower and its core looks
    filled: the residual of a fit that has not taken it in, L (1 - m) / (1 + L) on the fitted spectrum
    m, here the emulated spectra of slow B stars at SNR 200, which a nebular line's terms alone take for
    emission. Beside the constant and the model its statistic stays that of noise (below 20 on 98% of
    the rows); a nebular line of 0.05 A in H gamma on the same rows is found (above 20 on 95%)."""
    rng = np.random.default_rng(3)
    rows, wl = 100, emulator.wavelength
    labels = np.column_stack([rng.uniform(15000, 30000, rows), rng.uniform(3.0, 4.5, rows),
                              rng.uniform(0, 40, rows), np.zeros(rows)])[:, :len(emulator.labels)]
    model = emulator.spectra(labels).astype(np.float32)
    noise = rng.normal(0.0, 1 / 200, model.shape)
    weight = np.full_like(model, 200.0**2)
    veiled = (0.05 * (1.0 - model) / 1.05 + noise).astype(np.float32)
    sigma = 4340.47 * np.hypot(30.0, 15.0) / 299792.458 / 2.3548
    line = 0.05 / (sigma * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((wl - 4340.47) / sigma) ** 2)
    lit = (line[None] + noise).astype(np.float32)
    found = [emulator.dib(r, weight, model, np.ones(rows), np.full(rows, 1 / 50.0))[:, H_GAMMA]
             for r in (veiled, lit)]
    assert np.mean(found[0] < 20) >= 0.98 and np.mean(found[1] > 20) >= 0.95, [np.median(f) for f in found]


def test_fitted_bands_are_measured_and_divided_out(emulator):
    """An emulated spectrum times a continuum, the broad band 5% deep, the narrow ones 2-4% deep and
    the nebular lines 5-20% high, each of another centre and width than the terms': the fitted
    continuum's band terms give each depth within 0.005 (measured within 0.001) and a transmission
    within 0.002 of the bands at every pixel, 0.005 at the nebular lines (the noise at SNR 200;
    measured 0.004 at their peaks: their terms are first order in the shift and width, 2-4% of their
    height), so that dividing it out leaves the star's spectrum."""
    wl = emulator.wavelength
    labels = emulator.label_mean[None]
    grid = np.linspace(-1.0, 1.0, len(wl))
    continuum = 1.0 + 0.02 * grid - 0.01 * (2 * grid**2 - 1)
    depths = (0.05, 0.02, 0.04, 0.03, -0.1, -0.2, -0.05)  # the nebular lines in emission
    band = np.prod([1.0 - d * _profile(wl, b.centre + 0.1 * b.fwhm, 0.55 * b.fwhm, b.profile)
                    for d, b in zip(depths, BANDS, strict=True)], axis=0)
    star = emulator.spectra(labels)[0] * continuum
    x = (star * band)[None].astype(np.float32)
    _, coef = emulator.fit_continuum(x, np.full_like(x, 1e4), labels,
                                     extra=emulator.defect_columns(dib=np.ones((1, len(BANDS)), bool)))
    fitted = emulator.band_depths(coef)
    np.testing.assert_allclose(fitted[0, ::DIB_TERMS], depths, atol=0.005)
    nebular = np.any([np.abs(wl - b.centre) < 2.0 * b.fwhm for b in BANDS if b.emission], axis=0)
    for pixels, tolerance in ((~nebular, 0.002), (nebular, 0.005)):
        np.testing.assert_allclose(emulator.band(fitted)[0, pixels], band[pixels], atol=tolerance)
        np.testing.assert_allclose((x[0] / emulator.band(fitted)[0])[pixels], star[pixels], atol=tolerance)


@pytest.mark.parametrize("j", range(len(BANDS)))
def test_dib_statistic_is_the_float64_least_squares_drop(emulator, j):
    """Against the drops of the two least-squares fits written out in float64 (the band's and
    sinusoid terms times the model, at the periodogram frequency given, and for a nebular line a
    constant and the model beside them, over the pixels within the band's window of its centre), on
    random models, weights and residuals: to 1e-3 of the statistic's noise scale (~1)."""
    rng = np.random.default_rng(7)
    rows, wl = 64, emulator.wavelength
    near = emulator._dib_windows[j]
    assert abs(wl[near][[0, -1]] - BANDS[j].centre).max() <= BANDS[j].window
    model = (1.0 - 0.3 * rng.random((rows, len(wl)))).astype(np.float32)
    residual = rng.normal(0.0, 0.01, model.shape).astype(np.float32)
    weight = (1e4 * rng.random(model.shape)).astype(np.float32)
    freq = emulator._ripple_frequencies[rng.integers(0, len(emulator._ripple_frequencies), rows)]
    phase = 2 * np.pi * (wl - wl[0])[None] * freq[:, None]
    m = model.astype(np.float64)
    beside = [m * np.sin(phase), m * np.cos(phase)] + ([np.ones_like(m), m] if BANDS[j].emission else [])
    terms = np.concatenate([m[:, :, None] * emulator.dib_basis[None, :, _columns(j)],
                            np.stack(beside, axis=2)], axis=2)[:, near]
    gram = np.einsum("bd,bdi,bdj->bij", weight[:, near].astype(np.float64), terms, terms)
    rhs = np.einsum("bd,bdi->bi", (weight * residual)[:, near].astype(np.float64), terms)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    alone = np.linalg.solve(gram[:, DIB_TERMS:, DIB_TERMS:], rhs[:, DIB_TERMS:, None])[..., 0]
    depth = -coef[:, 0] if BANDS[j].emission else coef[:, 0]
    expected = np.where(depth > 0, (coef * rhs).sum(1) - (alone * rhs[:, DIB_TERMS:]).sum(1), 0.0)
    statistic = emulator.dib(residual, weight, model, np.ones(rows), freq)
    np.testing.assert_allclose(statistic[:, j], expected, atol=1e-3)


def test_pixel_weights_are_zero_about_the_interstellar_lines_only(emulator):
    """1 / (1 / ivar + sigma^2) in float64 everywhere but within ISM_HALF_WIDTH of an interstellar
    line (0 there, as where ivar <= 0); the masked pixels are those of +-150 km/s about each line."""
    wl = emulator.wavelength
    ivar = np.random.default_rng(2).uniform(1e2, 1e5, (3, len(wl))).astype(np.float32)
    ivar[0, :10] = 0.0
    near = np.any([np.abs(wl - line) <= ISM_HALF_WIDTH for line in ISM_LINES], axis=0)
    with np.errstate(divide="ignore"):
        weight = 1.0 / (1.0 / ivar.astype(np.float64) + emulator.sigma.astype(np.float64) ** 2)
    expected = np.where(near, 0.0, weight)
    np.testing.assert_allclose(emulator.pixel_weight(ivar), expected, rtol=1e-6)
    assert all(np.abs(wl[near] - line).min() < 0.3 for line in ISM_LINES)
    assert ISM_HALF_WIDTH >= 150.0 / 299792.458 * max(ISM_LINES) + 0.2
