"""Resampling of one spectrum onto a new wavelength grid, and the Doppler convention.

Two methods, both O(n + D) sweeps compiled with Numba: linear interpolation (as `numpy.interp`) and
flux-conserving rebinning (Carnall 2017, arXiv:1705.05165, as the `spectres` package). Errors and
bad pixels are propagated; target pixels outside the input coverage are never extrapolated. Also the
Gaussian smoothing that brings a higher resolving power down to the model's before resampling. The
batch driver that calls these per spectrum lives in `starcast.kernels.preprocess`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..catalogs.physics import C_KMS

# Per-pixel state of a resampled spectrum (uint8).
GOOD, BAD, UNCOVERED = 0, 1, 2

# Fraction of a target bin's width that good input pixels must cover for the bin to count as good:
# all of it but slivers. The mean over part of a bin is not the bin's mean that a model predicts; in a
# sharp line's wing the two differ by many times the noise (half-covered bins counted as good moved
# the labels of slow rotators at SNR 200-500 by up to 7 sigma with 2.5% of their pixels masked).
MIN_GOOD_OVERLAP = 0.99


@njit(cache=True)
def rest_frame_factor(rv_kms: float) -> float:
    """lambda_rest / lambda_obs for a source receding at `rv_kms` (km/s, > 0 = receding, redshifted).

    Relativistic longitudinal Doppler shift, lambda_rest = lambda_obs * sqrt((1 - v/c) / (1 + v/c))
    (special relativity; Rybicki & Lightman 1979, sect. 4.1). The synthetic generator applies the inverse.
    """
    beta = rv_kms / C_KMS
    return math.sqrt((1.0 - beta) / (1.0 + beta))


@njit(cache=True, nogil=True)
def doppler_shift(spectra, wavelength, rv_kms, out):
    """out[r] = spectra[r] (sampled on the increasing `wavelength`) seen from a source receding at
    rv_kms[r]: spectra[r] at wavelength * rest_frame_factor(rv_kms[r]) by cubic convolution (Keys 1981,
    IEEE Trans. ASSP 29, 1153, a = -1/2: exact for quadratics on a uniform grid) in the local pixel
    coordinate, the end pixels repeated beyond the grid and their values held outside it. Linear
    interpolation would smooth a line by a kernel of variance t (1 - t) pixels^2 at a fractional shift
    t, as much as a few km/s of v sin i on a model grid near critical sampling; this one hardly does.
    Serial and without the GIL: the emulator calls it between NumPy's BLAS products, whose threads
    spin on the cores for a while after each, so that threads of its own would wait for them (a
    13-row shift took 3 ms), and fits chunks of rows on threads of its own (`Emulator.chi2`)."""
    n_rows, d = spectra.shape
    for r in range(n_rows):
        factor = rest_frame_factor(rv_kms[r])
        k = 0
        for j in range(d):
            lam = wavelength[j] * factor
            if lam <= wavelength[0]:
                out[r, j] = spectra[r, 0]
            elif lam >= wavelength[d - 1]:
                out[r, j] = spectra[r, d - 1]
            else:
                while wavelength[k + 1] < lam:  # lam grows with j, so k only moves forward
                    k += 1
                t = (lam - wavelength[k]) / (wavelength[k + 1] - wavelength[k])
                before, after = spectra[r, max(k - 1, 0)], spectra[r, min(k + 2, d - 1)]
                here, there = spectra[r, k], spectra[r, k + 1]
                cubic = 3.0 * (here - there) + after - before
                quadratic = 2.0 * before - 5.0 * here + 4.0 * there - after
                out[r, j] = here + 0.5 * t * (there - before + t * (quadratic + t * cubic))


def cubic_gaussian_weights(sigma: np.ndarray) -> np.ndarray:
    """[B, 2 h + 1] float64: weights at pixel offsets -h..h (h = 2 + ceil(4 max sigma)) that smooth
    samples on a uniform grid by a Gaussian of `sigma` [B] pixels: the Gaussian convolved with the
    cubic-convolution interpolant of the samples (`doppler_shift`'s), by quadrature over +-4 sigma.
    Their sum is 1 and their variance sigma^2 (the interpolant reproduces quadratics), also below the
    spacing, where a Gaussian sampled on the pixels cannot resolve sigma. (Three weights of that
    variance, as `smooth_gaussian` uses there, fit a smoothed Gaussian line as well, but on the
    shipped model's spectra on coarse pixels these read v sin i better: `Emulator.blur`.)"""
    sigma = np.asarray(sigma, np.float64)
    half = 2 + int(math.ceil(4.0 * sigma.max(initial=0.0)))
    u = np.linspace(-4.0, 4.0, 801)
    gauss = np.exp(-0.5 * u * u)
    gauss /= gauss.sum()
    u /= math.sqrt(np.sum(gauss * u * u))  # the truncated quadrature of unit variance
    t = np.arange(-half, half + 1)[None, :, None] - sigma[:, None, None] * u[None, None, :]  # [B, K, Q]
    a = np.abs(t)
    keys = np.where(a <= 1.0, (1.5 * a - 2.5) * a * a + 1.0,
                    np.where(a < 2.0, ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0, 0.0))
    return keys @ gauss


@njit(cache=True)
def bin_edges(wavelength, out):
    """Edges of the pixels centred on `wavelength` (n >= 2), into `out` (n + 1), as `spectres.make_bins`."""
    n = wavelength.shape[0]
    out[0] = wavelength[0] - 0.5 * (wavelength[1] - wavelength[0])
    for i in range(1, n):
        out[i] = 0.5 * (wavelength[i] + wavelength[i - 1])
    out[n] = wavelength[n - 1] + 0.5 * (wavelength[n - 1] - wavelength[n - 2])


@njit(cache=True)
def _unset(j, state, out_flux, out_var, out_state):
    """Target pixel j is `state` (BAD or UNCOVERED): no flux, no variance."""
    out_state[j] = state
    out_flux[j] = np.nan
    out_var[j] = np.nan


@njit(cache=True)
def rebin_flux(src_edges, flux, var, bad, dst_edges, out_flux, out_var, out_state):
    """Flux-conserving rebinning of pixels with edges `src_edges` onto bins with edges `dst_edges`.

    Each target bin gets the overlap-weighted mean of the good input pixels it overlaps (flux density
    conserved: the integral over a fully covered bin is unchanged), and the variance
    sum((overlap * sigma)^2) / sum(overlap)^2. A bin not fully inside the input is UNCOVERED; a bin
    whose good overlap is below MIN_GOOD_OVERLAP of its width is BAD. Accumulates in float64.
    """
    n = flux.shape[0]
    start = 0
    for j in range(dst_edges.shape[0] - 1):
        lo, hi = dst_edges[j], dst_edges[j + 1]
        if lo < src_edges[0] or hi > src_edges[n]:
            _unset(j, UNCOVERED, out_flux, out_var, out_state)
            continue
        while src_edges[start + 1] <= lo:
            start += 1
        total = 0.0
        wsum = 0.0
        fsum = 0.0
        vsum = 0.0
        i = start
        while i < n and src_edges[i] < hi:
            overlap = min(src_edges[i + 1], hi) - max(src_edges[i], lo)
            if overlap > 0.0:
                total += overlap
                if not bad[i]:
                    wsum += overlap
                    fsum += overlap * flux[i]
                    vsum += overlap * overlap * var[i]
            i += 1
        if total > 0.0 and wsum >= MIN_GOOD_OVERLAP * total:
            out_state[j] = GOOD
            out_flux[j] = fsum / wsum
            out_var[j] = vsum / (wsum * wsum)
        else:
            _unset(j, BAD, out_flux, out_var, out_state)


@njit(cache=True)
def interp_linear(src_wavelength, flux, var, bad, dst_wavelength, out_flux, out_var, out_state):
    """Linear interpolation (as `numpy.interp`) with variance (1-t)^2 v_k + t^2 v_(k+1).

    Target points outside [src[0], src[-1]] are UNCOVERED; a point that takes any weight from a bad
    input pixel is BAD. `dst_wavelength` must be increasing (the sweep moves forward only).
    """
    n = flux.shape[0]
    k = 0
    for j in range(dst_wavelength.shape[0]):
        x = dst_wavelength[j]
        if not (x >= src_wavelength[0] and x <= src_wavelength[n - 1]):
            _unset(j, UNCOVERED, out_flux, out_var, out_state)
            continue
        while k < n - 2 and src_wavelength[k + 1] < x:
            k += 1
        t = (x - src_wavelength[k]) / (src_wavelength[k + 1] - src_wavelength[k])
        if (bad[k] and t < 1.0) or (bad[k + 1] and t > 0.0):
            _unset(j, BAD, out_flux, out_var, out_state)
            continue
        out_state[j] = GOOD
        out_flux[j] = (1.0 - t) * flux[k] + t * flux[k + 1]
        out_var[j] = (1.0 - t) ** 2 * var[k] + t * t * var[k + 1]


@njit(cache=True)
def response_variance(src_wavelength, src_edges, dst_wavelength, dst_edges, flux_conserving, stride=1,
                      integrated=True):
    """The variance (A^2) of the response through which resampling sees a spectrum, averaged over every
    `stride`-th target bin (centres `dst_wavelength`, edges `dst_edges`) the source covers (a prime
    stride samples every phase of a source grid that repeats within fewer bins): each source pixel
    (centres `src_wavelength`, edges `src_edges`) a box of its width if `integrated` (the mean flux
    over it), else a point (the flux at its centre), weighted as the resampling weighs it (by overlap
    in flux-conserving rebinning, else the interpolation weights of the two pixels around the bin's
    centre). Source pixels coarser than the bins, or straddling their edges, widen it; 0 where no bin
    is covered."""
    box = 1.0 / 12.0 if integrated else 0.0
    n = src_wavelength.shape[0]
    total, count, start = 0.0, 0, 0
    for j in range(0, dst_edges.shape[0] - 1, stride):
        lo, hi = dst_edges[j], dst_edges[j + 1]
        wsum, m1, m2 = 0.0, 0.0, 0.0  # moments about lo, for precision
        if flux_conserving:
            if lo < src_edges[0] or hi > src_edges[n]:
                continue
            while src_edges[start + 1] <= lo:
                start += 1
            i = start
            while i < n and src_edges[i] < hi:
                overlap = min(src_edges[i + 1], hi) - max(src_edges[i], lo)
                if overlap > 0.0:
                    c, a = src_wavelength[i] - lo, src_edges[i + 1] - src_edges[i]
                    wsum += overlap
                    m1 += overlap * c
                    m2 += overlap * (c * c + a * a * box)
                i += 1
        else:
            x = dst_wavelength[j]
            if not (x >= src_wavelength[0] and x <= src_wavelength[n - 1]):
                continue
            while start < n - 2 and src_wavelength[start + 1] < x:
                start += 1
            for i in (start, start + 1):
                w = 1.0 - abs(x - src_wavelength[i]) / (src_wavelength[start + 1] - src_wavelength[start])
                c, a = src_wavelength[i] - lo, src_edges[i + 1] - src_edges[i]
                wsum += w
                m1 += w * c
                m2 += w * (c * c + a * a * box)
        mean = m1 / wsum
        total += m2 / wsum - mean * mean
        count += 1
    return total / count if count > 0 else 0.0


@njit(cache=True)
def smooth_gaussian(wavelength, flux, bad, sigma_frac, sigma_abs=0.0):
    """`flux` convolved with a Gaussian of sigma^2 = (`sigma_frac` * lambda)^2 + `sigma_abs`^2 (a part
    constant in velocity, as a resolving power, and one in Angstrom, as pixels), over the good pixels
    only, weighted by pixel width and renormalised where bad pixels or the ends cut the kernel
    (truncated at 4 sigma); bad pixels are copied. Where sigma is below the pixels' spacing, which a
    Gaussian sampled on them cannot resolve, the pixel and its two neighbours are weighted to add the
    same variance, sigma^2, without a shift (unsmoothed next to a bad pixel). Wavelengths increasing,
    n >= 2."""
    n = flux.shape[0]
    out = flux.copy()
    width = np.empty(n)
    for j in range(n):
        width[j] = 0.5 * (wavelength[min(j + 1, n - 1)] - wavelength[max(j - 1, 0)])
    lo = 0
    hi = 0
    for i in range(n):
        if bad[i]:
            continue
        sigma = math.sqrt((sigma_frac * wavelength[i]) ** 2 + sigma_abs * sigma_abs)
        left = wavelength[i] - wavelength[i - 1] if i > 0 else 0.0
        right = wavelength[i + 1] - wavelength[i] if i < n - 1 else 0.0
        if sigma * sigma < left * right:  # weights with mean 0 and variance sigma^2 on -left, 0, right
            if not (bad[i - 1] or bad[i + 1]):
                w_left = sigma * sigma / (left * (left + right))
                w_right = sigma * sigma / (right * (left + right))
                out[i] = w_left * flux[i - 1] + w_right * flux[i + 1] + (1.0 - w_left - w_right) * flux[i]
            continue
        while wavelength[lo] < wavelength[i] - 4.0 * sigma:
            lo += 1
        while hi < n and wavelength[hi] <= wavelength[i] + 4.0 * sigma:
            hi += 1
        acc, norm = 0.0, 0.0
        for j in range(lo, hi):
            if not bad[j]:
                g = math.exp(-0.5 * ((wavelength[j] - wavelength[i]) / sigma) ** 2) * width[j]
                acc += g * flux[j]
                norm += g
        out[i] = acc / norm
    return out


# Pixels on either side of a point that the interpolating cubic spline weighs (`_interp_weights`):
# its weights fall by 2 - sqrt(3) per pixel, below 5e-5 beyond.
SPLINE_HALF = 9
# [2 SPLINE_HALF, 4]: in the weight of pixel k - SPLINE_HALF + 1 + i (row i), the coefficient of the
# B-spline centred on pixel k - 1 + j (column j), sqrt(3) z^|m| for one m pixels away, z = sqrt(3) - 2:
# the cardinal cubic spline, the interpolating spline's weight of a sample (the inverse of the
# B-spline's sampled values; Unser 1999, IEEE Signal Process. Mag. 16, 22)
_SPLINE_COEFFICIENTS = math.sqrt(3.0) * (math.sqrt(3.0) - 2.0) ** np.abs(
    np.arange(4)[None, :] - np.arange(2 - SPLINE_HALF, SPLINE_HALF + 2)[:, None])


@njit(cache=True)
def _interp_weights(src_wavelength, bad, x, k, w):
    """Into w[0 .. 2 SPLINE_HALF - 1]: the weights of pixels k - SPLINE_HALF + 1 .. k + SPLINE_HALF at
    `x` (src[k] <= x <= src[k+1]), in the local pixel coordinate: the interpolating cubic spline's
    (`_SPLINE_COEFFICIENTS`, normalised) where all of those pixels are good, else cubic convolution's
    (Keys 1981, a = -1/2, as `doppler_shift`) where pixels k-1..k+2 are, else linear interpolation's.
    The spline passes more of a line's fine structure than cubic convolution (whose loss reads as a
    km/s of v sin i at 10-20 km/s on 0.2 A pixels). False where `x` takes weight from a bad pixel."""
    n, half = src_wavelength.shape[0], SPLINE_HALF
    t = (x - src_wavelength[k]) / (src_wavelength[k + 1] - src_wavelength[k])
    spline = k - half + 1 >= 0 and k + half < n
    if spline:
        for p in range(k - half + 1, k + half + 1):
            if bad[p]:
                spline = False
                break
    if spline:  # the four B-splines nonzero at x, centred on pixels k-1..k+2
        u = 1.0 - t
        b0, b3 = u * u * u / 6.0, t * t * t / 6.0
        b1, b2 = 2.0 / 3.0 - t * t * (1.0 - 0.5 * t), 2.0 / 3.0 - u * u * (1.0 - 0.5 * u)
        c = _SPLINE_COEFFICIENTS
        total = 0.0
        for i in range(2 * half):
            w[i] = c[i, 0] * b0 + c[i, 1] * b1 + c[i, 2] * b2 + c[i, 3] * b3
            total += w[i]
        scale = 1.0 / total
        for i in range(2 * half):
            w[i] *= scale
        return True
    w[:] = 0.0
    if k >= 1 and k + 2 < n and not (bad[k - 1] or bad[k + 2]):
        w[half - 2] = 0.5 * t * (-1.0 + t * (2.0 - t))
        w[half - 1] = 1.0 + 0.5 * t * t * (3.0 * t - 5.0)
        w[half] = 0.5 * t * (1.0 + t * (4.0 - 3.0 * t))
        w[half + 1] = 0.5 * t * t * (t - 1.0)
    else:
        w[half - 1], w[half] = 1.0 - t, t
    return not ((bad[k] and w[half - 1] != 0.0) or (bad[k + 1] and w[half] != 0.0))


@njit(cache=True)
def interp_cubic(src_wavelength, flux, var, bad, dst_wavelength, out_flux, out_var, out_state, out_weights,
                 out_first):
    """Interpolation by a cubic spline through the samples (`_interp_weights`) with variance
    sum(w^2 v): it hardly smooths, where linear interpolation smooths by a kernel of variance
    t (1 - t) pixels^2. Target points outside [src[0], src[-1]] are UNCOVERED; a point that takes any
    weight from a bad input pixel is BAD. Each point's weights go to out_weights[j] (2 SPLINE_HALF),
    of the pixels from out_first[j] on. `dst_wavelength` must be increasing (the sweep moves forward
    only)."""
    n = flux.shape[0]
    k = 0
    for j in range(dst_wavelength.shape[0]):
        x = dst_wavelength[j]
        out_weights[j, :] = 0.0
        out_first[j] = 0
        if not (x >= src_wavelength[0] and x <= src_wavelength[n - 1]):
            _unset(j, UNCOVERED, out_flux, out_var, out_state)
            continue
        while k < n - 2 and src_wavelength[k + 1] < x:
            k += 1
        w = out_weights[j]
        if not _interp_weights(src_wavelength, bad, x, k, w):
            _unset(j, BAD, out_flux, out_var, out_state)
            continue
        out_first[j] = k - SPLINE_HALF + 1
        f, v = 0.0, 0.0
        for q in range(2 * SPLINE_HALF):
            if w[q] != 0.0:
                f += w[q] * flux[out_first[j] + q]
                v += w[q] * w[q] * var[out_first[j] + q]
        out_state[j] = GOOD
        out_flux[j] = f
        out_var[j] = v


@njit(cache=True)
def remade_variance(var, lag_cov, via, via_edges, via_bad, via_weights, via_first, grid, grid_edges,
                    flux_conserving, state, out_var):
    """Into `out_var`: the variance of each GOOD target bin (centres `grid`, edges `grid_edges`) of a
    spectrum on pixels of variance `var`, interpolated at the pixels centred on `via` (edges
    `via_edges`; bad: `via_bad`) by `interp_cubic` (its weights `via_weights` of the pixels from
    `via_first` on) and resampled onto the bins (by overlap in flux-conserving rebinning, else by
    linear interpolation), for noise whose covariance between pixels d apart is
    lag_cov[d] sqrt(var var') (none beyond the table): smoothed noise, whose interpolated and
    resampled pixels share their inputs, which `interp_cubic` and the resampling, taking their
    inputs for independent, would not see. Exact for unsmoothed noise (lag_cov = [1])."""
    n, m, taps = var.shape[0], via.shape[0], via_weights.shape[1]
    sd = np.sqrt(var)
    lags = lag_cov.shape[0]
    while lags > 1 and lag_cov[lags - 1] == 0.0:
        lags -= 1
    dense = np.zeros(n)  # the bin's weights of the input pixels; zeroed again after each bin
    t0 = 0
    for j in range(grid.shape[0]):
        if state[j] != GOOD:
            continue
        total, lo, hi = 0.0, n, -1
        if flux_conserving:
            while via_edges[t0 + 1] <= grid_edges[j]:
                t0 += 1
            first, last = t0, t0
            while last < m and via_edges[last] < grid_edges[j + 1]:
                last += 1
        else:
            while t0 < m - 2 and via[t0 + 1] < grid[j]:
                t0 += 1
            first, last = t0, t0 + 2
        for t in range(first, last):
            if via_bad[t]:
                continue
            if flux_conserving:
                share = max(min(via_edges[t + 1], grid_edges[j + 1]) - max(via_edges[t], grid_edges[j]), 0.0)
            else:
                f = (grid[j] - via[t0]) / (via[t0 + 1] - via[t0])
                share = 1.0 - f if t == t0 else f
            if share == 0.0:
                continue
            total += share
            for q in range(taps):
                if via_weights[t, q] != 0.0:
                    i = via_first[t] + q
                    dense[i] += share * via_weights[t, q]
                    lo, hi = min(lo, i), max(hi, i)
        v = 0.0
        for a in range(lo, hi + 1):
            if dense[a] == 0.0:
                continue
            s = dense[a] * sd[a]
            v += s * s * lag_cov[0]
            for d in range(1, min(lags, hi - a + 1)):
                v += 2.0 * s * dense[a + d] * sd[a + d] * lag_cov[d]
        for a in range(lo, hi + 1):
            dense[a] = 0.0
        out_var[j] = v / (total * total)


@njit(cache=True)
def smoothed_lag_covariance(wavelength, sigma_frac, sigma_abs, lags):
    """[lags]: the covariance between pixels d apart of what `smooth_gaussian` (these sigmas) makes
    of independent noise of unit variance, from its response to an impulse in the middle of the
    pixels `wavelength` (taken as evenly spaced there). [1, 0, ...] without smoothing."""
    n = wavelength.shape[0]
    out = np.zeros(lags)
    mid = n // 2
    sigma = math.sqrt((sigma_frac * wavelength[mid]) ** 2 + sigma_abs * sigma_abs)
    if not sigma > 0.0:
        out[0] = 1.0
        return out
    spacing = (wavelength[n - 1] - wavelength[0]) / (n - 1)
    reach = lags + int(8.0 * sigma / spacing) + 2
    lo, hi = max(mid - reach, 0), min(mid + reach + 1, n)
    impulse = np.zeros(hi - lo)
    impulse[mid - lo] = 1.0
    g = smooth_gaussian(wavelength[lo:hi], impulse, np.zeros(hi - lo, np.bool_), sigma_frac, sigma_abs)
    for d in range(min(lags, hi - lo)):
        out[d] = np.sum(g[:hi - lo - d] * g[d:])
    return out


@njit(cache=True)
def resample_remade(wavelength, flux, var, bad, sigma_frac, sigma_abs, via, grid, grid_edges, flux_conserving,
                    out_flux, out_var, out_state):
    """A spectrum on pixels centred on `wavelength`, smoothed by `smooth_gaussian` with these sigmas
    (0: not), remade on the pixels centred on `via` that lie within its range (`interp_cubic`) and
    resampled from those onto the bins (centres `grid`, edges `grid_edges`) as `rebin_flux` or
    `interp_linear` would, into the outputs; the variance that of every step's correlations
    (`remade_variance`). False where fewer than two of `via` lie within its range."""
    n = wavelength.shape[0]
    first = np.searchsorted(via, wavelength[0], side="left")
    m = np.searchsorted(via, wavelength[n - 1], side="right") - first
    if m < 2:
        return False
    centres = via[first:first + m]
    remade, remade_var, state = np.empty(m), np.empty(m), np.empty(m, np.uint8)
    weights, first_pixel = np.empty((m, 2 * SPLINE_HALF)), np.empty(m, np.int64)
    interp_cubic(wavelength, flux, var, bad, centres, remade, remade_var, state, weights, first_pixel)
    remade_bad = state != GOOD
    edges = np.empty(m + 1)
    bin_edges(centres, edges)
    if flux_conserving:
        rebin_flux(edges, remade, remade_var, remade_bad, grid_edges, out_flux, out_var, out_state)
    else:
        interp_linear(centres, remade, remade_var, remade_bad, grid, out_flux, out_var, out_state)
    spacing = (wavelength[n - 1] - wavelength[0]) / (n - 1)
    lags = int((grid[1] - grid[0] + 2.0 * (centres[1] - centres[0])) / spacing) + 2 * SPLINE_HALF + 2
    remade_variance(var, smoothed_lag_covariance(wavelength, sigma_frac, sigma_abs, lags), centres, edges,
                    remade_bad, weights, first_pixel, grid, grid_edges, flux_conserving, out_state, out_var)
    return True


@njit(cache=True)
def smoothed_noise_ratio(wavelength, edges, centre, lo, hi, flux_conserving, sigma_frac, sigma_abs):
    """What `smooth_gaussian` (these sigmas) leaves of independent noise of one variance on pixels
    centred on `wavelength` (edges `edges`), as resampling propagates it into the target bin
    `lo`-`hi` (centre `centre`; weighted as `response_variance` weighs it): the variance of the
    smoothed noise's weighted sum, its pixels correlated, over that of the unsmoothed noise's, which
    is what resampling propagates. From the smoothing's response to an impulse at each pixel within
    reach, on pixels reaching 4 sigma further still (so that its renormalisation at the ends does not
    enter). 1 where the source does not cover the bin."""
    n = wavelength.shape[0]
    sigma = math.sqrt((sigma_frac * centre) ** 2 + sigma_abs * sigma_abs)
    first = np.searchsorted(wavelength, lo - 8.0 * sigma, side="left")
    last = np.searchsorted(wavelength, hi + 8.0 * sigma, side="right")
    first, last = max(first - 2, 0), min(last + 2, n)
    wl = wavelength[first:last]
    m = wl.shape[0]
    weight = np.zeros(m)  # the resampling's weights of the pixels (sum 1)
    for i in range(m):
        if flux_conserving:
            weight[i] = max(min(edges[first + i + 1], hi) - max(edges[first + i], lo), 0.0)
        elif i < m - 1 and wl[i] <= centre <= wl[i + 1]:
            t = (centre - wl[i]) / (wl[i + 1] - wl[i])
            weight[i], weight[i + 1] = 1.0 - t, t
            break
    total = weight.sum()
    if not total > 0.0:
        return 1.0
    weight /= total
    smoothed, plain = 0.0, 0.0
    impulse, bad = np.zeros(m), np.zeros(m, np.bool_)
    for k in range(m):
        impulse[k] = 1.0
        h = np.sum(weight * smooth_gaussian(wl, impulse, bad, sigma_frac, sigma_abs))
        impulse[k] = 0.0
        smoothed += h * h
        plain += weight[k] * weight[k]
    return smoothed / plain


@njit(cache=True)
def _resample_one(wavelength, flux, var, bad, new_wavelength, flux_conserving):
    d = new_wavelength.shape[0]
    out_flux = np.empty(d)
    out_var = np.empty(d)
    state = np.empty(d, np.uint8)
    if flux_conserving:
        src = np.empty(wavelength.shape[0] + 1)
        dst = np.empty(d + 1)
        bin_edges(wavelength, src)
        bin_edges(new_wavelength, dst)
        rebin_flux(src, flux, var, bad, dst, out_flux, out_var, state)
    else:
        interp_linear(wavelength, flux, var, bad, new_wavelength, out_flux, out_var, state)
    return out_flux, out_var


def _strictly_increasing(name: str, values: np.ndarray) -> None:
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 wavelengths, got shape {values.shape}")
    if not (np.all(np.isfinite(values)) and np.all(np.diff(values) > 0)):
        raise ValueError(f"{name} must be finite and strictly increasing")


def resample(wavelength, flux, new_wavelength, method: str = "flux", *, flux_err=None):
    """Resample one spectrum onto `new_wavelength` (same units as `wavelength`, e.g. Angstrom).

    `method="flux"` rebins conserving flux density (as `spectres.spectres`); `method="linear"`
    interpolates (as `numpy.interp`). Target pixels outside the input coverage, or resting mostly on
    non-finite input, are NaN. Returns `new_flux`, or `(new_flux, new_err)` when `flux_err` is given
    (1-sigma errors, propagated as in `spectres`). Computed in float64.
    """
    if method not in ("flux", "linear"):
        raise ValueError(f"method must be 'flux' or 'linear', got {method!r}")
    wavelength = np.ascontiguousarray(wavelength, dtype=np.float64)
    new_wavelength = np.ascontiguousarray(new_wavelength, dtype=np.float64)
    flux = np.ascontiguousarray(flux, dtype=np.float64)
    _strictly_increasing("wavelength", wavelength)
    _strictly_increasing("new_wavelength", new_wavelength)
    if flux.shape != wavelength.shape:
        raise ValueError(f"flux has shape {flux.shape} but wavelength has shape {wavelength.shape}")
    bad = ~np.isfinite(flux)
    if flux_err is None:
        var = np.zeros_like(flux)
    else:
        err = np.ascontiguousarray(flux_err, dtype=np.float64)
        if err.shape != flux.shape:
            raise ValueError(f"flux_err has shape {err.shape} but flux has shape {flux.shape}")
        var = err * err
        bad |= ~(np.isfinite(var) & (err > 0))  # as the pipeline reads flux_err: a bad pixel
    new_flux, new_var = _resample_one(wavelength, flux, var, bad, new_wavelength, method == "flux")
    return new_flux if flux_err is None else (new_flux, np.sqrt(new_var))
