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
# The clipping has converged when the fit moves by less than this fraction of the rms noise anywhere.
CONVERGED = 1e-2


def continuum_basis(grid: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev polynomials T_0..T_degree on `grid` mapped to [-1, 1], shape (degree + 1, D) (one
    row per polynomial, so that evaluating a fit streams through memory), and their Gram matrix over
    the whole grid (the normal matrix when every pixel is kept), computed once per batch so that a
    fit only corrects it for the pixels it leaves out."""
    x = 2.0 * (grid - grid[0]) / (grid[-1] - grid[0]) - 1.0
    basis = np.ascontiguousarray(np.polynomial.chebyshev.chebvander(x, degree).T)
    return basis, np.ascontiguousarray(basis @ basis.T)


@njit(cache=True)
def noise_sigma(y, good, k=1):
    """Pixel noise from the data alone: DER_SNR (Stoehr et al. 2008, ASPC 394, 505), robust to lines,
    measured on the means of k consecutive pixels and scaled back by sqrt(k).

    sigma = sqrt(k) * 1.482602 / sqrt(6) * median |2 m_i - m_(i-2) - m_(i+2)| over the means m of
    bins of k pixels, all good; 0.0 when fewer than 3 triplets exist. For white noise any k gives the
    pixels' noise; noise correlated over fewer than k pixels (a spectrum convolved down from a higher
    resolution) is measured as the white noise that has the same noise in the bins, which the k = 1
    estimate, comparing pixels the convolution made alike, understates.
    """
    nb = y.shape[0] // k
    mean = np.empty(nb)
    whole = np.empty(nb, np.bool_)
    for b in range(nb):
        total, ok = 0.0, True
        for i in range(b * k, b * k + k):
            total += y[i]
            ok = ok and good[i]
        mean[b], whole[b] = total / k, ok
    values = np.empty(max(nb - 4, 0))
    m = 0
    for i in range(2, nb - 2):
        if whole[i] and whole[i - 2] and whole[i + 2]:
            values[m] = abs(2.0 * mean[i] - mean[i - 2] - mean[i + 2])
            m += 1
    if m < 3:
        return 0.0
    return math.sqrt(k) * 1.482602 / math.sqrt(6.0) * np.median(values[:m])


@njit(cache=True)
def _accumulate(basis, y, i, sign, a, b):
    """Add (sign = 1) or remove (sign = -1) pixel i's term in the normal equations a c = b (lower a)."""
    for p in range(basis.shape[0]):
        bp = sign * basis[p, i]
        b[p] += bp * y[i]
        for q in range(p + 1):
            a[p, q] += bp * basis[q, i]


@njit(cache=True)
def _remove_from_gram(basis, i, a):
    """Take pixel i's term out of the normal matrix `a` (lower triangle)."""
    for p in range(basis.shape[0]):
        for q in range(p + 1):
            a[p, q] -= basis[p, i] * basis[q, i]


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
    k, d = basis.shape
    for i in range(d):
        out[i] = coef[0] * basis[0, i]
    for p in range(1, k):
        c = coef[p]
        for i in range(d):
            out[i] += c * basis[p, i]


@njit(cache=True)
def fit_continuum(y, sigma, good, basis, gram, params, out, correlation=1.0):
    """Fit the continuum of `y` (flux on the grid of `basis`) into `out`; returns False on failure.

    `sigma` is the per-pixel 1-sigma noise (> 0), `good` the pixels that may be used, `basis` and
    `gram` from `continuum_basis`, `params` the tuple (clip_low, clip_window_low, clip_high, window,
    max_iter, min_keep_fraction). A pixel is rejected below `clip_low` sigma of its own, or when the
    mean residual over `window` pixels around it is below `clip_window_low` times that mean's sigma,
    or above its window mean by `clip_high` sigma. `correlation` is the number of consecutive pixels
    that share their noise (an input coarser than the grid): the window mean then averages fewer
    independent pixels, and its sigma grows by sqrt(correlation) (at most to a pixel's sigma).
    Iterates until the kept set stops changing or the fit moves by less than CONVERGED of the rms
    noise, at most `max_iter` times, and never keeps fewer than `min_keep_fraction` of the good pixels
    (it stops clipping instead). Unweighted least squares; the normal equations are updated only for
    the pixels whose status changed.
    """
    clip_low, clip_window_low, clip_high, window, max_iter, min_keep_fraction = params
    k, d = basis.shape
    half = window // 2
    keep = good.copy()
    a, b = gram.copy(), np.zeros(k)
    coef, work = np.empty(k), np.zeros((k, k))
    n_good = 0
    for i in range(d):
        if good[i]:
            n_good += 1
            for p in range(k):
                b[p] += basis[p, i] * y[i]
        else:
            _remove_from_gram(basis, i, a)
    min_keep = max(k + 1, int(min_keep_fraction * n_good))
    # Running sums of the noise variance and of the good-pixel count, for the window statistics.
    cum_v, cum_n = np.zeros(d + 1), np.zeros(d + 1)
    for i in range(d):
        cum_v[i + 1] = cum_v[i] + (sigma[i] * sigma[i] if good[i] else 0.0)
        cum_n[i + 1] = cum_n[i] + (1.0 if good[i] else 0.0)
    # Per-pixel thresholds, fixed across iterations: own residual, window mean (a sigma of the mean).
    below, above, window_below, inv_count = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d)
    for i in range(d):
        lo, hi = max(0, i - half), min(d, i + half + 1)
        count = cum_n[hi] - cum_n[lo]
        if good[i]:
            below[i], above[i] = -clip_low * sigma[i], clip_high * sigma[i]
            shared = min(correlation, count)  # pixels per independent noise sample in the window
            window_below[i] = -clip_window_low * math.sqrt(shared * (cum_v[hi] - cum_v[lo])) / count
            inv_count[i] = 1.0 / count
    tolerance = CONVERGED * math.sqrt(cum_v[d] / max(n_good, 1))  # of the rms noise
    cum_r, residual, previous = np.zeros(d + 1), np.zeros(d), np.full(k, np.inf)
    new_keep = np.empty(d, np.bool_)
    n_keep = n_good
    for _ in range(max_iter):
        if not _solve(a, b, coef, work):
            return False
        _evaluate(basis, coef, out)
        moved = 0.0  # bounds the fit's change at every pixel, as |T_p| <= 1 on the grid
        for p in range(k):
            moved += abs(coef[p] - previous[p])
            previous[p] = coef[p]
        if moved < tolerance:
            return True
        for i in range(d):
            residual[i] = y[i] - out[i] if good[i] else 0.0
        for i in range(d):
            cum_r[i + 1] = cum_r[i] + residual[i]
        n_new, n_changed = 0, 0
        for i in range(d):  # branch-free: the tests sit at the noise level and would mispredict
            mean_r = (cum_r[min(d, i + half + 1)] - cum_r[max(0, i - half)]) * inv_count[i]
            r = residual[i]
            ok = good[i] & (r > below[i]) & (mean_r > window_below[i]) & (r - mean_r < above[i])
            new_keep[i] = ok
            n_new += ok
            n_changed += ok != keep[i]
        if n_changed == 0 or n_new < min_keep:
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
