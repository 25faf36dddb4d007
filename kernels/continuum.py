"""Continuum fit of one resampled spectrum: an iterative, asymmetrically clipped Chebyshev polynomial.

Absorption lines lie below the continuum, so a pixel is rejected when it falls more than `clip_low`
sigma below the fit on its own (narrow line cores) or on average over a window of pixels (broad Balmer
wings, whose depth per pixel is under the noise but whose window mean is not); a pixel more than
`clip_high` sigma above its window mean (a spike, a cosmic ray) is rejected too. Emission-line stars
are out of scope. The batch driver is `starcast.kernels.preprocess`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Normal-equation pivots below this fraction of the largest diagonal entry mean a singular fit.
_SINGULAR = 1e-12


def continuum_basis(grid: np.ndarray, degree: int) -> np.ndarray:
    """Chebyshev polynomials T_0..T_degree on `grid` mapped to [-1, 1], shape (D, degree + 1)."""
    x = 2.0 * (grid - grid[0]) / (grid[-1] - grid[0]) - 1.0
    return np.ascontiguousarray(np.polynomial.chebyshev.chebvander(x, degree))


@njit(cache=True)
def noise_sigma(y, good):
    """Pixel noise from the data alone: DER_SNR (Stoehr et al. 2008, ASPC 394, 505), robust to lines.

    sigma = 1.482602 / sqrt(6) * median |2 y_i - y_(i-2) - y_(i+2)| over good triplets; 0.0 when
    fewer than 3 triplets exist.
    """
    d = y.shape[0]
    values = np.empty(max(d - 4, 0))
    m = 0
    for i in range(2, d - 2):
        if good[i] and good[i - 2] and good[i + 2]:
            values[m] = abs(2.0 * y[i] - y[i - 2] - y[i + 2])
            m += 1
    if m < 3:
        return 0.0
    return 1.482602 / math.sqrt(6.0) * np.median(values[:m])


@njit(cache=True)
def _least_squares(basis, y, keep, coef):
    """Unweighted least squares on the kept pixels by Cholesky of the normal equations (float64).

    Returns False when the system is singular (too few or degenerate kept pixels).
    """
    d, k = basis.shape
    a = np.zeros((k, k))
    b = np.zeros(k)
    for i in range(d):
        if keep[i]:
            for p in range(k):
                bp = basis[i, p]
                b[p] += bp * y[i]
                for q in range(p + 1):
                    a[p, q] += bp * basis[i, q]
    scale = 0.0
    for p in range(k):
        scale = max(scale, a[p, p])
    for p in range(k):  # in-place Cholesky, lower triangle
        s = a[p, p]
        for q in range(p):
            s -= a[p, q] * a[p, q]
        if not s > _SINGULAR * scale:
            return False
        a[p, p] = math.sqrt(s)
        for r in range(p + 1, k):
            t = a[r, p]
            for q in range(p):
                t -= a[r, q] * a[p, q]
            a[r, p] = t / a[p, p]
    for p in range(k):  # forward substitution L z = b
        t = b[p]
        for q in range(p):
            t -= a[p, q] * coef[q]
        coef[p] = t / a[p, p]
    for p in range(k - 1, -1, -1):  # back substitution L^T c = z
        t = coef[p]
        for q in range(p + 1, k):
            t -= a[q, p] * coef[q]
        coef[p] = t / a[p, p]
    return True


@njit(cache=True)
def _evaluate(basis, coef, out):
    d, k = basis.shape
    for i in range(d):
        s = 0.0
        for p in range(k):
            s += basis[i, p] * coef[p]
        out[i] = s


@njit(cache=True)
def fit_continuum(y, sigma, good, basis, params, out):
    """Fit the continuum of `y` (flux on the grid of `basis`) into `out`; returns False on failure.

    `sigma` is the per-pixel 1-sigma noise (> 0), `good` the pixels that may be used, `params` the
    tuple (clip_low, clip_window_low, clip_high, window, max_iter, min_keep_fraction). A pixel is
    rejected below `clip_low` sigma of its own, or when the mean residual over `window` pixels around
    it is below `clip_window_low` times that mean's sigma, or above its window mean by `clip_high`
    sigma. Iterates until the kept set stops changing, at most `max_iter` times, and never keeps
    fewer than `min_keep_fraction` of the good pixels (it stops clipping instead).
    """
    clip_low, clip_window_low, clip_high, window, max_iter, min_keep_fraction = params
    d, k = basis.shape
    keep = good.copy()
    new_keep = np.empty(d, np.bool_)
    n_good = 0
    for i in range(d):
        n_good += good[i]
    min_keep = max(k + 1, int(min_keep_fraction * n_good))
    coef = np.empty(k)
    cum_r = np.zeros(d + 1)
    cum_v = np.zeros(d + 1)
    cum_n = np.zeros(d + 1)
    half = window // 2
    for _ in range(max_iter):
        if not _least_squares(basis, y, keep, coef):
            return False
        _evaluate(basis, coef, out)
        for i in range(d):  # running sums of residual, variance and count over the good pixels
            good_i = good[i]
            cum_r[i + 1] = cum_r[i] + (y[i] - out[i] if good_i else 0.0)
            cum_v[i + 1] = cum_v[i] + (sigma[i] * sigma[i] if good_i else 0.0)
            cum_n[i + 1] = cum_n[i] + (1.0 if good_i else 0.0)
        n_keep = 0
        changed = False
        for i in range(d):
            ok = False
            if good[i]:
                lo, hi = max(0, i - half), min(d, i + half + 1)
                n = cum_n[hi] - cum_n[lo]
                mean_r = (cum_r[hi] - cum_r[lo]) / n
                sigma_mean = math.sqrt(cum_v[hi] - cum_v[lo]) / n
                r = y[i] - out[i]
                ok = (r > -clip_low * sigma[i] and mean_r > -clip_window_low * sigma_mean
                      and r - mean_r < clip_high * sigma[i])
            new_keep[i] = ok
            n_keep += ok
            changed |= ok != keep[i]
        if not changed or n_keep < min_keep:
            break
        keep[:] = new_keep
    if not _least_squares(basis, y, keep, coef):
        return False
    _evaluate(basis, coef, out)
    return True
