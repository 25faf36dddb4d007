"""Continuum normalisation on spectra made here: Lorentzian Balmer wings and rotationally broadened
Gaussian lines on a random cubic continuum, across Teff, log g, v sin i and SNR."""

import numpy as np
import pyarrow as pa
import pytest
from starcast.kernels.continuum import CONVERGED, continuum_basis, fit_continuum, noise_sigma
from starcast.kernels.preprocess import PreprocessSettings, preprocess, resample

C_KMS = 299792.458
GRID = np.linspace(4000.0, 4800.0, 4000)
BALMER = (3970.07, 4101.74, 4340.47, 4861.35)  # H epsilon .. H beta, A
OTHER = (4026.2, 4387.9, 4471.5, 4481.2, 4552.6, 4685.7)  # He I, Mg II, Si III, He II, A


def toy_spectra(n, teff, logg, vsini, snr, seed=0, pixels=4500):
    """(wavelength, flux, err, continuum) of `n` toy OB spectra on a 3950-4850 A grid."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(3950.0, 4850.0, pixels)
    x = (wl - 4400.0) / 400.0
    coef = rng.uniform(-0.1, 0.1, (n, 3))
    continuum = 1 + coef[:, :1] * x + coef[:, 1:2] * x**2 + coef[:, 2:] * x**3
    lines = np.ones_like(wl)
    gamma = 2.0 + 3.0 * (logg - 3.0)  # Lorentz half width, A: Stark broadening grows with log g
    depth = 0.6 * np.clip(1.2 - teff / 40000.0, 0.2, 1.0)
    for centre in BALMER:
        lines *= 1 - depth / (1 + ((wl - centre) / gamma) ** 2)
    for centre in OTHER:
        sigma = np.hypot(0.4, centre * vsini / C_KMS / 1.8)
        lines *= 1 - 0.15 * np.sqrt(0.4 / sigma) * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)
    err = continuum * lines / snr
    flux = continuum * lines + rng.normal(size=err.shape) * err
    return wl, flux, err, continuum


def fitted_continuum(wl, flux, x):
    """The continuum `preprocess` divided by: resampled flux / x (exact on good pixels)."""
    return np.stack([resample(wl, f, GRID) for f in flux]) / x


def fixed(values):
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel().astype(np.float32)), values.shape[1])


def continuum_recovery(spectra, with_errors):
    """(flags, median |fitted / true continuum - 1| per spectrum) of `preprocess` on `toy_spectra`."""
    wl, flux, err, continuum = spectra
    columns = {"flux": fixed(flux), **({"flux_err": fixed(err)} if with_errors else {})}
    out = preprocess(pa.table(columns), GRID, PreprocessSettings(), source_grid=wl)
    truth = np.stack([resample(wl, c, GRID) for c in continuum])
    error = np.median(np.abs(fitted_continuum(wl, flux.astype(np.float32), out.x) / truth - 1), axis=1)
    return out.flags.tolist(), error


@pytest.mark.parametrize("with_errors", [True, False])
@pytest.mark.parametrize("teff,logg,vsini", [(15000, 4.5, 0), (15000, 4.5, 450), (22000, 3.5, 200),
                                             (30000, 4.0, 450), (40000, 3.0, 50)])
def test_continuum_is_recovered_to_half_a_percent_at_snr_50(teff, logg, vsini, with_errors):
    spectra = toy_spectra(8, teff, logg, vsini, snr=50, seed=teff + vsini)
    flags, error = continuum_recovery(spectra, with_errors)
    assert flags == [0] * 8
    assert error.max() < 0.005


@pytest.mark.parametrize("with_errors", [True, False])
@pytest.mark.parametrize("teff,logg,vsini", [(15000, 4.5, 450), (30000, 4.0, 450)])
def test_continuum_is_recovered_to_half_a_percent_from_an_input_three_times_coarser_than_the_grid(
        teff, logg, vsini, with_errors):
    # 0.6 A input pixels on the 0.2 A grid: the resampled noise is correlated over 3 pixels, which a
    # noise estimate on the grid (without errors) and the window test (with them) used to ignore.
    spectra = toy_spectra(8, teff, logg, vsini, snr=50, seed=teff + 1, pixels=1500)
    flags, error = continuum_recovery(spectra, with_errors)
    assert flags == [0] * 8
    assert error.max() < 0.005


def test_a_polynomial_continuum_without_lines_is_fitted_to_the_noise_limit():
    rng = np.random.default_rng(4)
    cont = 2.0 + 0.3 * np.linspace(-1, 1, 4000) ** 3
    y = cont * (1 + rng.normal(0, 0.01, 4000))
    out = np.empty(4000)
    good = np.ones(4000, bool)
    assert fit_continuum(y, np.full(4000, 0.01) * cont, good, *continuum_basis(GRID, 3),
                         (2.0, 2.0, 3.0, 25, 20, 0.1), out)
    assert np.max(np.abs(out / cont - 1)) < 0.002  # noise limit ~ 0.01 * sqrt(4 / 4000) = 3e-4


def clipped_lstsq_continuum(y, sigma, good, basis, params, correlation=1.0):
    """The documented rule of `fit_continuum` written plainly: each round a NumPy least-squares fit
    to the kept pixels, then every good pixel kept or not by its own residual, its window's mean
    residual and its height above that mean, until the kept set or the fit stops changing."""
    clip_low, clip_window_low, clip_high, window, max_iter, min_keep_fraction = params
    k, d = basis.shape
    half, idx = window // 2, np.arange(d)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, d)
    in_window = [slice(a, b) for a, b in zip(lo, hi, strict=True)]
    count = np.array([good[w].sum() for w in in_window], float)
    var = np.where(good, sigma**2, 0.0)
    window_below = -clip_window_low * np.sqrt(np.minimum(correlation, count) * np.array(
        [var[w].sum() for w in in_window])) / count
    tolerance = CONVERGED * np.sqrt(var.sum() / good.sum())
    keep, previous = good.copy(), np.full(k, np.inf)
    min_keep = max(k + 1, int(min_keep_fraction * good.sum()))
    for _ in range(max_iter):
        coef = np.linalg.lstsq(basis[:, keep].T, y[keep], rcond=None)[0]
        fit = coef @ basis
        if np.abs(coef - previous).sum() < tolerance:
            return fit
        previous = coef
        residual = np.where(good, y - fit, 0.0)
        mean_r = np.array([residual[w].sum() for w in in_window]) / count
        new_keep = good & (residual > -clip_low * sigma) & (mean_r > window_below) & (
            residual - mean_r < clip_high * sigma)
        if (new_keep == keep).all() or new_keep.sum() < min_keep:
            return fit
        keep = new_keep
    return np.linalg.lstsq(basis[:, keep].T, y[keep], rcond=None)[0] @ basis


@pytest.mark.parametrize("correlation", [1.0, 3.0])
def test_continuum_fit_is_the_clipped_least_squares_fit_numpy_gives(correlation):
    """Against a plain NumPy transcription of the rule (least squares by `numpy.linalg.lstsq`, not the
    kernel's normal equations updated pixel by pixel): the same continuum on toy spectra with lines,
    bad pixels and a spike, for the default settings and ones that clip harder."""
    wl, flux, err, _ = toy_spectra(6, 22000, 3.5, 100, snr=80, seed=11)
    rng = np.random.default_rng(12)
    basis, gram = continuum_basis(GRID, 4)
    for params in ((2.0, 2.0, 3.0, 25, 20, 0.1), (1.0, 1.0, 2.0, 9, 50, 0.3)):
        for f, e in zip(flux, err, strict=True):
            y, sigma = resample(wl, f, GRID), resample(wl, e, GRID)
            good = rng.uniform(size=GRID.size) > 0.05
            y[rng.integers(0, GRID.size)] += 0.5  # a cosmic ray
            out = np.empty(GRID.size)
            assert fit_continuum(y, sigma, good, basis, gram, params, out, correlation)
            expected = clipped_lstsq_continuum(y, sigma, good, basis, params, correlation)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


def test_continuum_fit_reports_failure_when_singular():
    good = np.zeros(4000, bool)
    good[:2] = True
    out = np.empty(4000)
    assert not fit_continuum(np.ones(4000), np.ones(4000), good, *continuum_basis(GRID, 3),
                             (2.0, 2.0, 3.0, 25, 20, 0.1), out)


def test_der_snr_noise_estimate_matches_the_true_noise_despite_lines():
    rng = np.random.default_rng(5)
    wl, flux, err, _ = toy_spectra(1, 15000, 4.0, 100, snr=100, seed=5)
    sigma = noise_sigma(flux[0], np.ones(flux.shape[1], bool))
    assert sigma == pytest.approx(np.median(err), rel=0.1)
    assert noise_sigma(rng.normal(size=3), np.ones(3, bool)) == 0.0


def test_der_snr_over_bins_measures_correlated_noise_at_their_scale():
    """White noise: any bin size gives its sigma. The same noise convolved with a Gaussian of 2 pixels
    (a spectrum degraded from a higher resolution): per pixel it reads 7.8x too small for the noise of
    means of 8 pixels, which over bins of 8 it gives as sqrt(8) times their standard deviation (scipy
    and numpy on the realisation itself)."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(3)
    white = rng.normal(0.0, 0.01, 200_000)
    good = np.ones(white.size, bool)
    for k in (1, 4, 8):
        assert noise_sigma(1.0 + white, good, k) == pytest.approx(0.01, rel=0.03), k
    correlated = gaussian_filter1d(white, 2.0)
    at_bins = np.sqrt(8) * correlated.reshape(-1, 8).mean(axis=1).std()
    assert noise_sigma(1.0 + correlated, good, 8) == pytest.approx(at_bins, rel=0.1)
    assert noise_sigma(1.0 + correlated, good) < at_bins / 3
    bad = good.copy()
    bad[::16] = False  # a bin with a bad pixel is left out whole
    assert noise_sigma(1.0 + correlated, bad, 8) == pytest.approx(at_bins, rel=0.1)
