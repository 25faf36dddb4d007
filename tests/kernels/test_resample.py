"""Resampling and the Doppler convention against independent references: `spectres`, `numpy.interp`,
exact integrals of piecewise-constant spectra, and the first-order Doppler formula."""

import numpy as np
import pytest
import spectres
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter1d
from starcast.kernels.resample import (
    BAD,
    C_KMS,
    GOOD,
    SPLINE_HALF,
    UNCOVERED,
    bin_edges,
    cubic_gaussian_weights,
    doppler_shift,
    interp_cubic,
    interp_linear,
    rebin_flux,
    remade_variance,
    resample,
    response_variance,
    rest_frame_factor,
    smooth_gaussian,
    smoothed_lag_covariance,
)


@st.composite
def grids(draw):
    """An input grid (non-uniform) and a target grid that may be shorter, longer or shifted."""
    n = draw(st.integers(3, 120))
    m = draw(st.integers(3, 120))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    src = 4000.0 + np.cumsum(rng.uniform(0.05, 1.0, n))
    span = src[-1] - src[0]
    start = src[0] + draw(st.floats(-0.5, 0.5)) * span
    length = draw(st.floats(0.05, 2.0)) * span
    steps = rng.uniform(0.2, 1.0, m)
    dst = start + np.cumsum(steps) / steps.sum() * length
    flux = rng.uniform(0.1, 2.0, n)
    err = rng.uniform(0.01, 0.1, n)
    return src, dst, flux, err


@settings(max_examples=200, deadline=None)
@given(grids())
def test_flux_rebinning_matches_spectres_on_random_grids(case):
    src, dst, flux, err = case
    ours, ours_err = resample(src, flux, dst, "flux", flux_err=err)
    ref, ref_err = spectres.spectres(dst, src, flux, spec_errs=err, fill=np.nan, verbose=False)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(ours_err, ref_err, rtol=1e-10, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(grids())
def test_linear_resampling_matches_numpy_interp_inside_coverage(case):
    src, dst, flux, _ = case
    ours = resample(src, flux, dst, "linear")
    inside = (dst >= src[0]) & (dst <= src[-1])
    np.testing.assert_array_equal(np.isnan(ours), ~inside)
    np.testing.assert_allclose(ours[inside], np.interp(dst[inside], src, flux), rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(grids())
def test_flux_rebinning_preserves_the_integral_where_the_grids_overlap(case):
    src, dst, flux, _ = case
    ours = resample(src, flux, dst, "flux")
    src_edges = np.concatenate([[1.5 * src[0] - 0.5 * src[1]], 0.5 * (src[1:] + src[:-1]),
                                [1.5 * src[-1] - 0.5 * src[-2]]])
    dst_edges = np.concatenate([[1.5 * dst[0] - 0.5 * dst[1]], 0.5 * (dst[1:] + dst[:-1]),
                                [1.5 * dst[-1] - 0.5 * dst[-2]]])
    covered = np.flatnonzero(~np.isnan(ours))
    if covered.size == 0:
        return
    lo, hi = dst_edges[covered[0]], dst_edges[covered[-1] + 1]
    # The input is piecewise constant, so its running integral is exactly piecewise linear in the edges.
    running = np.concatenate([[0.0], np.cumsum(flux * np.diff(src_edges))])
    expected = np.interp(hi, src_edges, running) - np.interp(lo, src_edges, running)
    got = np.sum(ours[covered] * np.diff(dst_edges)[covered])
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["flux", "linear"])
def test_constant_spectrum_stays_constant(method):
    rng = np.random.default_rng(1)
    src = np.sort(rng.uniform(4000, 4800, 500))
    dst = np.linspace(4010, 4790, 3000)
    out = resample(src, np.full(500, 3.25), dst, method)
    np.testing.assert_allclose(out, 3.25, rtol=1e-12)


def test_outside_coverage_is_nan_never_extrapolated():
    src = np.linspace(4100, 4200, 101)
    dst = np.linspace(4000, 4300, 301)
    for method in ("flux", "linear"):
        out = resample(src, np.ones(101), dst, method)
        assert np.all(np.isnan(out[dst < 4099])) and np.all(np.isnan(out[dst > 4201]))
        assert np.all(out[(dst > 4101) & (dst < 4199)] == 1.0)


def test_non_finite_input_pixels_do_not_leak_into_neighbours():
    src = np.linspace(4000, 4100, 101)
    flux = np.ones(101)
    flux[50] = np.nan
    out = resample(src, flux, src + 0.25, "linear")
    assert np.isnan(out[50]) and np.isnan(out[49]) and np.all(out[:49] == 1.0) and np.all(out[51:-1] == 1.0)


def test_flux_rebinning_keeps_only_bins_that_good_pixels_cover_whole():
    """The mean over part of a bin is not the bin's mean: a bin any bad pixel takes part of is dropped,
    however much of it the good ones cover."""
    src = np.arange(4000.0, 4012.0)  # 1 A pixels; target bins of 3 A hold 3 whole input pixels each
    flux, err = np.arange(1.0, 13.0), np.full(12, 0.3)
    flux[[4, 9, 10]] = np.nan  # bin 1 keeps 2 of 3 pixels, bin 3 only 1 of 3
    out, out_err = resample(src, flux, src[1::3], "flux", flux_err=err)
    np.testing.assert_allclose(out[[0, 2]], [2.0, 8.0], rtol=1e-12)
    np.testing.assert_allclose(out_err[[0, 2]], 0.3 / np.sqrt(3), rtol=1e-12)  # sigma of the mean
    assert np.isnan(out[[1, 3]]).all() and np.isnan(out_err[[1, 3]]).all()
    # an error that is not positive marks a bad pixel, as in the pipeline
    err[0], err[1] = 0.0, -0.3
    out, _ = resample(src, np.arange(1.0, 13.0), src[1::3], "flux", flux_err=err)
    assert np.isnan(out[0]) and np.isfinite(out[2])
    # a bad pixel's sliver of a bin (here 0.5%, as rv shifts leave them) does not drop it
    shifted, _ = resample(src - 0.015, flux, src[1::3], "flux", flux_err=err)
    assert np.isfinite(shifted[2]) and np.isnan(shifted[1])


def test_resample_rejects_unsorted_grids_and_unknown_methods():
    with pytest.raises(ValueError, match="strictly increasing"):
        resample(np.array([3.0, 2.0, 1.0]), np.ones(3), np.array([1.5, 2.5]))
    with pytest.raises(ValueError, match="method"):
        resample(np.arange(3.0), np.ones(3), np.arange(3.0), method="cubic")


@settings(max_examples=50, deadline=None)
@given(st.floats(-3000.0, 3000.0))
def test_doppler_factor_inverts_and_matches_first_order_at_low_velocity(rv):
    assert rest_frame_factor(rv) * rest_frame_factor(-rv) == pytest.approx(1.0, rel=1e-14)
    beta = rv / C_KMS
    assert rest_frame_factor(rv) == pytest.approx(1.0 - beta, abs=beta**2 + 1e-15)  # 1 - v/c + O(beta^2)
    if abs(rv) > 1e-6:
        assert (rest_frame_factor(rv) < 1.0) == (rv > 0)  # receding: the rest wavelength is bluer


@pytest.mark.parametrize("rv", [3.0, 7.0, 13.9, -20.0])  # fractional shifts of 0.1-0.5 pixels
def test_doppler_shift_moves_a_line_without_widening_it(rv):
    """A line 1.5 pixels wide (a model grid near critical sampling) against the line computed at the
    shifted wavelengths: its width within 0.1% and every pixel within 0.005 of its depth 0.4 (linear
    interpolation widens it by 2-5% and errs by up to 0.018)."""
    wl = np.arange(4300.0, 4380.0, 0.4)

    def line(w):
        return 1 - 0.4 * np.exp(-0.5 * ((w - 4340.0) / 0.6) ** 2)

    out = np.empty((1, len(wl)), np.float32)
    doppler_shift(line(wl)[None].astype(np.float32), wl, np.array([rv]), out)
    exact = line(wl * rest_frame_factor(rv))

    def width(spectrum):
        depth = 1 - spectrum
        centre = np.sum(depth * wl) / depth.sum()
        return np.sqrt(np.sum(depth * (wl - centre) ** 2) / depth.sum())

    assert width(out[0]) == pytest.approx(width(exact), rel=1e-3)
    np.testing.assert_allclose(out[0], exact, atol=5e-3)


@pytest.mark.parametrize("method", ["flux", "linear"])
def test_doppler_shift_then_unshift_is_the_identity_to_interpolation_error(method):
    rest = np.linspace(4000, 4800, 8001)
    spectrum = 1 - 0.4 * np.exp(-0.5 * ((rest - 4340) / 2.0) ** 2)
    factor = rest_frame_factor(250.0)
    observed = resample(rest / factor, spectrum, rest, method)  # what a receding source looks like
    back = resample(rest * factor, observed, rest, method)  # un-shift its observed wavelengths
    ok = ~np.isnan(back)
    assert ok.mean() > 0.99
    np.testing.assert_allclose(back[ok], spectrum[ok], atol=2e-3)


def _edges(wavelength):
    edges = np.empty(len(wavelength) + 1)
    bin_edges(wavelength, edges)
    return edges


def _response_reference(src, dst, flux_conserving, integrated=True):
    """`response_variance` written out in float64 numpy: per covered target bin the weights the
    resampling gives the source pixels (overlaps, or numpy.interp's of a unit impulse), each pixel a
    box of its width (`integrated`) or a point."""
    se, de = _edges(src), _edges(dst)
    widths, out = np.diff(se), []
    for j in range(len(dst)):
        if flux_conserving:
            if de[j] < se[0] or de[j + 1] > se[-1]:
                continue
            w = np.clip(np.minimum(se[1:], de[j + 1]) - np.maximum(se[:-1], de[j]), 0.0, None)
        else:
            if not src[0] <= dst[j] <= src[-1]:
                continue
            w = np.array([np.interp(dst[j], src, np.eye(len(src))[i]) for i in range(len(src))])
        w = w / w.sum()
        mean = np.sum(w * src)
        out.append(np.sum(w * ((src - mean) ** 2 + (widths**2 / 12 if integrated else 0.0))))
    return np.mean(out) if out else 0.0


@settings(max_examples=100, deadline=None)
@given(grids(), st.booleans(), st.booleans())
def test_response_variance_matches_the_weights_written_out(case, flux_conserving, integrated):
    src, dst, _, _ = case
    got = response_variance(src, _edges(src), dst, _edges(dst), flux_conserving, 1, integrated)
    expected = _response_reference(src, dst, flux_conserving, integrated)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_response_variance_of_pixels_half_or_all_of_a_bin():
    """0.2 A pixels rebinned onto 0.4 A bins: with edges shared, each bin is one 0.4 A box (0.4^2 / 12);
    with the bins' edges on the pixels' centres (the shipped model's training spectra), each bin takes
    a quarter of the pixels on either side, 2 x 0.25 x 0.2^2 + 0.2^2 / 12. Samples (the flux at the
    pixels' centres, not its mean over them) lose the boxes' 0.2^2 / 12: 2 x 0.5 x 0.1^2 and
    2 x 0.25 x 0.2^2."""
    model = 4010.0 + 0.4 * np.arange(200)
    cases = ((4000.1, 0.4**2 / 12, 0.1**2), (4000.0, 0.5 * 0.2**2 + 0.2**2 / 12, 0.5 * 0.2**2))
    for start, integrated, sampled in cases:
        src, edges = start + 0.2 * np.arange(500), _edges(model)
        got = [response_variance(src, _edges(src), model, edges, True, 1, kind) for kind in (True, False)]
        assert got == pytest.approx([integrated, sampled], rel=1e-9)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 1.6])
def test_cubic_gaussian_weights_are_a_gaussian_of_the_interpolated_samples(sigma):
    """Their sum is 1 and their variance sigma^2 (pixels); on a line three pixels wide they give what
    the continuous Gaussian convolution gives (a Gaussian of the summed variances), to the
    interpolation's error, also where sigma is below the spacing."""
    (weights,) = cubic_gaussian_weights(np.array([sigma]))
    offsets = np.arange(len(weights)) - len(weights) // 2
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.sum(weights * offsets**2) == pytest.approx(sigma**2, rel=1e-9)
    x = np.arange(200.0)

    def line(width):
        return np.exp(-0.5 * (x - 100.3) ** 2 / width**2) / width

    got = np.convolve(line(3.0), weights[::-1], mode="same")
    exact = line(np.hypot(3.0, sigma))
    assert np.abs(got - exact).max() < 5e-4 * exact.max()


def test_smoothing_in_angstrom_matches_scipy_on_a_uniform_grid():
    """sigma_abs alone on 0.05 A pixels is a Gaussian of sigma_abs / 0.05 pixels (scipy, truncated at 4
    sigma as here) away from the ends."""
    rng = np.random.default_rng(3)
    wl = 4000.0 + 0.05 * np.arange(400)
    flux = 1.0 - 0.5 * rng.random(400)
    got = smooth_gaussian(wl, flux, np.zeros(400, bool), 0.0, 0.125)
    expected = gaussian_filter1d(flux, 2.5, truncate=4.0)
    np.testing.assert_allclose(got[20:-20], expected[20:-20], rtol=0, atol=1e-12)


def test_smoothing_below_the_pixel_spacing_adds_its_variance_to_a_line():
    """On 0.4 A pixels a Gaussian of sigma 0.1 A cannot be sampled: the three-point weights that
    replace it widen a line's second moment by sigma^2 all the same, without moving it."""
    wl = 4000.0 + 0.4 * np.arange(101)
    flux = 1.0 - 0.5 * np.exp(-0.5 * ((wl - 4020.1) / 0.5) ** 2)

    def moments(f):
        depth = 1.0 - f
        mean = np.sum(depth * wl) / np.sum(depth)
        return mean, np.sum(depth * (wl - mean) ** 2) / np.sum(depth)

    (m0, v0), (m1, v1) = moments(flux), moments(smooth_gaussian(wl, flux, np.zeros(101, bool), 0.0, 0.1))
    assert m1 == pytest.approx(m0, abs=1e-9) and v1 - v0 == pytest.approx(0.1**2, rel=1e-6)


def _keys(x):
    """The cubic convolution kernel (Keys 1981, a = -1/2), written out."""
    a = np.abs(x)
    return np.where(a <= 1.0, (1.5 * a - 2.5) * a * a + 1.0,
                    np.where(a < 2.0, ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0, 0.0))


def _cubic(src, flux, var, bad, dst):
    """interp_cubic's (flux, variance, state, weights, first pixel)."""
    out_flux, out_var, state = np.empty(len(dst)), np.empty(len(dst)), np.empty(len(dst), np.uint8)
    weights, first = np.empty((len(dst), 2 * SPLINE_HALF)), np.empty(len(dst), np.int64)
    interp_cubic(src, flux, var, bad, dst, out_flux, out_var, state, weights, first)
    return out_flux, out_var, state, weights, first


def test_cubic_interpolation_is_the_spline_through_the_samples_with_fallbacks_near_bad_pixels():
    """On a uniform grid, SPLINE_HALF pixels or more inside the ends: the cubic spline through the
    samples (scipy's, to the truncation of its weights), variance sum(w^2 v), cubics exact.
    Closer to a bad pixel: cubic convolution (its kernel written out, numpy), then linear; a point
    that leans on a bad pixel is BAD, one beyond the ends UNCOVERED."""
    rng = np.random.default_rng(2)
    src = 4000.0 + 0.2 * np.arange(80)
    flux, var = rng.random(80), rng.uniform(0.5, 2.0, 80)
    dst = np.sort(rng.uniform(3999.9, 4016.0, 300))
    got, got_var, state, *_ = _cubic(src, flux, var, np.zeros(80, bool), dst)
    inside = (dst >= src[SPLINE_HALF]) & (dst <= src[-SPLINE_HALF - 1])
    np.testing.assert_allclose(got[inside], CubicSpline(src, flux)(dst[inside]), rtol=0, atol=2e-4)
    cubic = 0.3 + (src - 4005.0) - 0.7 * (src - 4005.0) ** 2 + 0.2 * (src - 4005.0) ** 3
    exact = (0.3 + (dst - 4005.0) - 0.7 * (dst - 4005.0) ** 2 + 0.2 * (dst - 4005.0) ** 3)[inside]
    np.testing.assert_allclose(_cubic(src, cubic, var, np.zeros(80, bool), dst)[0][inside], exact,
                               rtol=0, atol=1e-5 * np.abs(exact).max())
    weights = np.stack([_cubic(src, np.eye(80)[i], var, np.zeros(80, bool), dst)[0] for i in range(80)])
    np.testing.assert_allclose(got_var, (weights**2 * var[:, None]).sum(0), rtol=1e-9)
    assert (state[dst < src[0]] == UNCOVERED).all()
    assert (state[(dst >= src[0]) & (dst <= src[-1])] == GOOD).all()
    edge = (dst > src[0]) & (dst < src[1])
    np.testing.assert_allclose(got[edge], np.interp(dst[edge], src, flux), atol=1e-10)
    bad = np.zeros(80, bool)
    bad[40] = True
    got, _, state, *_ = _cubic(src, flux, var, bad, dst)
    leans = (dst > src[39]) & (dst < src[41])
    assert (state[leans] == BAD).all() and (state[~leans & (dst >= src[0]) & (dst <= src[-1])] == GOOD).all()
    near = (dst > src[33]) & (dst < src[38])  # 40 within the spline's reach, not the convolution's
    keys = _keys((dst[near, None] - src[None, :]) / 0.2)
    np.testing.assert_allclose(got[near], keys @ flux, rtol=0, atol=1e-10)
    beside = ((dst > src[38]) & (dst < src[39])) | ((dst > src[41]) & (dst < src[42]))  # 40 outer: linear
    np.testing.assert_allclose(got[beside], np.interp(dst[beside], src, flux), atol=1e-10)


@pytest.mark.parametrize("method", ["flux", "linear"])
@pytest.mark.parametrize(("step", "sigma"), [(0.05, 0.056), (0.01, 0.058), (0.2, 0.0)])
def test_remade_variance_is_the_scatter_of_the_noise_through_every_step(step, sigma, method):
    """Noise on pixels of `step` (rest frame of a star at 37 km/s, so that their phase drifts along
    the spectrum), smoothed by `sigma` A, interpolated at 0.2 A pixels and resampled onto 0.4 A
    bins: `remade_variance` (with `smoothed_lag_covariance`) is the variance of 3000 draws of it
    in every bin, to their scatter, where the steps' own propagation, taking their inputs for
    independent, is off by up to a factor of several."""
    flux_conserving = method == "flux"
    src = np.arange(4000.0, 4030.0, step) * rest_frame_factor(37.0)
    n = len(src)
    var = np.linspace(0.5, 2.0, n)
    via = 4001.0 + 0.2 * np.arange(135)
    grid = 4002.0 + 0.4 * np.arange(63)
    via_edges, grid_edges = _edges(via), _edges(grid)
    rng = np.random.default_rng(4)
    draws = []
    for _ in range(3000):
        noise = rng.standard_normal(n) * np.sqrt(var)
        smoothed = smooth_gaussian(src, noise, np.zeros(n, bool), 0.0, sigma) if sigma else noise
        remade, remade_var, remade_state, weights, first = _cubic(src, smoothed, var, np.zeros(n, bool), via)
        y, naive, state = np.empty(len(grid)), np.empty(len(grid)), np.empty(len(grid), np.uint8)
        if flux_conserving:
            rebin_flux(via_edges, remade, remade_var, remade_state != GOOD, grid_edges, y, naive, state)
        else:
            interp_linear(via, remade, remade_var, remade_state != GOOD, grid, y, naive, state)
        draws.append(y)
    lags = int(0.8 / step) + 2 * SPLINE_HALF + 2
    got = np.empty(len(grid))
    remade_variance(var, smoothed_lag_covariance(src, 0.0, sigma, lags), via, via_edges, remade_state != GOOD,
                    weights, first, grid, grid_edges, flux_conserving, state, got)
    assert (state == GOOD).all()
    ratio = np.var(draws, axis=0) / got
    assert np.abs(ratio - 1.0).max() < 0.12, ratio  # 3000 draws: 2.6% scatter, 4.6 sigma
    assert abs(ratio.mean() - 1.0) < 0.02, ratio.mean()
