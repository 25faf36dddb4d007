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
# The clipping has converged when no continuum pixel moves by more than this fraction of the rms noise.
CONVERGED = 1e-2


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
def _accumulate(basis, y, i, sign, a, b):
    """Add (sign = 1) or remove (sign = -1) pixel i's term in the normal equations a c = b (lower a)."""
    for p in range(basis.shape[1]):
        bp = sign * basis[i, p]
        b[p] += bp * y[i]
        for q in range(p + 1):
            a[p, q] += bp * basis[i, q]


@njit(cache=True)
def _solve(a, b, coef, work):
    """Solve a c = b (symmetric, lower triangle given) by Cholesky into `coef`, in float64; `work` is
    (k, k) scratch. Returns False when a pivot is below _SINGULAR of the largest diagonal entry."""
    k = b.shape[0]
    scale = 0.0
    for p in range(k):
        scale = max(scale, a[p, p])
    for p in range(k):
        s = a[p, p]
        for q in range(p):
            s -= work[p, q] * work[p, q]
        if not s > _SINGULAR * scale:
            return False
        work[p, p] = math.sqrt(s)
        for r in range(p + 1, k):
            t = a[r, p]
            for q in range(p):
                t -= work[r, q] * work[p, q]
            work[r, p] = t / work[p, p]
    for p in range(k):  # forward substitution L z = b
        t = b[p]
        for q in range(p):
            t -= work[p, q] * coef[q]
        coef[p] = t / work[p, p]
    for p in range(k - 1, -1, -1):  # back substitution L^T c = z
        t = coef[p]
        for q in range(p + 1, k):
            t -= work[q, p] * coef[q]
        coef[p] = t / work[p, p]
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
    sigma. Iterates until the kept set, or the fit to within 1e-2 of the rms noise, stops changing,
    at most `max_iter` times, and never keeps fewer than `min_keep_fraction` of the good pixels (it
    stops clipping instead). Unweighted least squares; the normal equations are updated only for the
    pixels whose status changed.
    """
    clip_low, clip_window_low, clip_high, window, max_iter, min_keep_fraction = params
    d, k = basis.shape
    half = window // 2
    keep = good.copy()
    a, b = np.zeros((k, k)), np.zeros(k)
    coef, work = np.empty(k), np.zeros((k, k))
    n_good = 0
    for i in range(d):
        if good[i]:
            n_good += 1
            _accumulate(basis, y, i, 1.0, a, b)
    min_keep = max(k + 1, int(min_keep_fraction * n_good))
    # Window statistics that do not change between iterations: good-pixel count and sigma of the mean.
    cum_v, cum_n = np.zeros(d + 1), np.zeros(d + 1)
    for i in range(d):
        cum_v[i + 1] = cum_v[i] + (sigma[i] * sigma[i] if good[i] else 0.0)
        cum_n[i + 1] = cum_n[i] + (1.0 if good[i] else 0.0)
    lo, hi = np.empty(d, np.int64), np.empty(d, np.int64)
    sigma_mean, count = np.zeros(d), np.zeros(d)
    for i in range(d):
        lo[i], hi[i] = max(0, i - half), min(d, i + half + 1)
        count[i] = cum_n[hi[i]] - cum_n[lo[i]]
        if count[i] > 0:
            sigma_mean[i] = math.sqrt(cum_v[hi[i]] - cum_v[lo[i]]) / count[i]
    tolerance = CONVERGED * math.sqrt(cum_v[d] / max(n_good, 1))  # of the rms noise
    cum_r, previous = np.zeros(d + 1), np.full(d, np.inf)
    new_keep = np.empty(d, np.bool_)
    n_keep = n_good
    for _ in range(max_iter):
        if not _solve(a, b, coef, work):
            return False
        _evaluate(basis, coef, out)
        moved = 0.0
        for i in range(d):
            moved = max(moved, abs(out[i] - previous[i]))
            previous[i] = out[i]
        if moved < tolerance:
            return True
        for i in range(d):
            cum_r[i + 1] = cum_r[i] + (y[i] - out[i] if good[i] else 0.0)
        n_new = 0
        changed = False
        for i in range(d):
            ok = False
            if good[i]:
                mean_r = (cum_r[hi[i]] - cum_r[lo[i]]) / count[i]
                r = y[i] - out[i]
                ok = (r > -clip_low * sigma[i] and mean_r > -clip_window_low * sigma_mean[i]
                      and r - mean_r < clip_high * sigma[i])
            new_keep[i] = ok
            n_new += ok
            changed |= ok != keep[i]
        if not changed or n_new < min_keep:
            return True  # `out` is the fit to the current kept set
        for i in range(d):
            if new_keep[i] != keep[i]:
                _accumulate(basis, y, i, 1.0 if new_keep[i] else -1.0, a, b)
                keep[i] = new_keep[i]
        n_keep = n_new
    if n_keep < k or not _solve(a, b, coef, work):
        return False
    _evaluate(basis, coef, out)
    return True
