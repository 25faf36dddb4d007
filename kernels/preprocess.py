"""Batch preprocessing: catalog rows (Arrow) -> rest-frame, continuum-normalised spectra on the model grid.

`preprocess` reads list columns as offsets + flat values (no per-row Python) and runs one Numba kernel,
parallel over spectra: Doppler-correct the wavelengths, resample (`starcast.kernels.resample`; fine
pixels by way of the model's training spectra's own), fit and divide the continuum on the model grid
(`starcast.kernels.continuum`), fill bad pixels, and set the quality flags. A row that cannot be
processed is flagged and filled with 1.0; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit, prange

from ..catalogs.physics import C_KMS
from ..catalogs.schema import (
    FLUX,
    FLUX_ERR,
    IVAR,
    MASK,
    META_WAVELENGTH,
    RV,
    WAVELENGTH,
    Flag,
    WavelengthGrid,
)
from ..errors import CatalogError, StarcastError
from .continuum import continuum_basis, fit_continuum, noise_sigma
from .input_checks import (
    column_medium,
    coverage_error,
    input_resolving_power,
    integrated_pixels,
    line_pixels,
    number_column,
    resolution_match,
    to_medium,
)
from .resample import (
    BAD,
    GOOD,
    UNCOVERED,
    bin_edges,
    interp_linear,
    rebin_flux,
    resample,
    resample_remade,
    response_variance,
    rest_frame_factor,
    smooth_gaussian,
    smoothed_noise_ratio,
)

__all__ = ["PreprocessSettings", "Preprocessed", "preprocess", "resample"]

# Numba caches `_kernel` (with the resample/continuum code compiled into it) keyed on this file's
# content only, so a stale cache would survive an edit of those files. Their sha256 (first 16 hex
# digits, resample.py then continuum.py) is therefore written here; a test fails until it is updated.
DEPENDENCY_FINGERPRINT = "bfd6b3cc6c134b28"


@dataclass(frozen=True)
class PreprocessSettings:
    """How spectra are put on the model grid; stored in the model manifest (`to_dict`) so that training
    and inference normalise identically. Pixel counts refer to the model grid.

    The continuum is fitted on the model grid, in the rest frame, after the one resampling, rather than
    over the input's full coverage: every spectrum, synthetic or observed and whatever the instrument's
    range, is then normalised over the same wavelengths with the same lines (Balmer wings included) at
    the same places, so a survey and the training set get the same normalisation, systematics and all;
    the basis is fixed per grid. The cost: no leverage from input pixels beyond the grid's edges.
    """

    method: str = "flux"  # resampling: "flux" (flux-conserving rebinning) or "linear" (interpolation)
    continuum: str = "chebyshev"  # "chebyshev" (fit and divide) or "none" (resample only)
    continuum_degree: int = 3  # Chebyshev degree over the model grid's range
    clip_low: float = 2.0  # reject pixels this many sigma below the fit
    clip_window_low: float = 2.0  # reject pixels whose window mean is this many (mean's) sigma below it
    clip_high: float = 3.0  # reject pixels this many sigma above their window mean
    clip_window: int = 25  # pixels in the running mean that catches broad, shallow wings
    max_iter: int = 20  # clipping iterations at most
    min_keep_fraction: float = 0.1  # never clip below this fraction of the good pixels
    sigma_floor: float = 1e-3  # noise floor as a fraction of the mean flux (noise-free input)
    spike_sigma: float = 5.0  # mask input pixels this many sigma above what absorption can be (0: off)
    max_gap: int = 5  # gaps up to this many pixels are interpolated; longer ones are set to 1.0
    min_good_pixels: int = 50  # fewer good pixels on the grid, or input pixels in its range -> FAILED
    max_bad_fraction: float = 0.1  # more bad pixels among the covered ones -> MASKED
    min_coverage: float = 0.95  # less of the grid covered by the input -> COVERAGE

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), {"str": str, "int": int, "float": (int, float)}[f.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise StarcastError(f"preprocess setting {f.name} must be of type {f.type}, got {value!r}")
        if self.method not in ("flux", "linear"):
            raise StarcastError(f"preprocess method must be 'flux' or 'linear', got {self.method!r}")
        if self.continuum not in ("chebyshev", "none"):
            raise StarcastError(f"preprocess continuum must be 'chebyshev' or 'none', got {self.continuum!r}")
        if self.continuum_degree < 0 or self.clip_window < 1 or self.max_iter < 1 or self.max_gap < 0:
            raise StarcastError("preprocess continuum_degree, clip_window, max_iter, max_gap must be >= 0/1")
        if not (self.sigma_floor > 0 and 0 <= self.min_keep_fraction <= 1 and 0 <= self.max_bad_fraction <= 1
                and 0 <= self.min_coverage <= 1):
            raise StarcastError("preprocess sigma_floor must be > 0 and min_keep_fraction, max_bad_fraction, "
                                "min_coverage within [0, 1]")
        if not self.spike_sigma >= 0:
            raise StarcastError(f"preprocess spike_sigma must be >= 0, got {self.spike_sigma}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StarcastError(f"unknown preprocess settings {unknown} (known: {sorted(known)}); "
                                "was the model made by a newer starcast?")
        return cls(**data)


@dataclass
class Preprocessed:
    """Result of `preprocess` for B rows on a D-pixel grid. `coverage`/`bad_fraction` are NaN where a
    row failed before they could be measured (`bad_fraction` also when nothing is covered); `ivar`
    (inverse variance of `x`) is 0 on filled pixels."""

    x: np.ndarray  # (B, D) float32, continuum-normalised, rest frame, bad pixels filled
    flags: np.ndarray  # (B,) int32 Flag bits
    coverage: np.ndarray  # (B,) float32, fraction of the model grid covered after the rv shift
    bad_fraction: np.ndarray  # (B,) float32, fraction of the covered grid pixels that are bad
    errors: list[str | None]  # None, or why the row failed (it stays in its place, so no index)
    ivar: np.ndarray  # (B, D) float32
    # (B,) float32, A^2: how much the row's pixel response is broader than `response` (0 where it is not
    # by more than _RESPONSE_TOLERANCE, or none was given), which no smoothing can take back: the model's
    # fit sees its spectra through it
    response_excess: np.ndarray
    # (B,) bool: rows without flux_err or ivar, whose noise is DER_SNR of their flux (an estimate)
    noise_estimated: np.ndarray


# flux more than this many sigma below zero is bad (NON_FINITE): no noise makes it, as no star has negative
# flux; less negative flux is noise, which pixels of low SNR (fine pixels, faint stars) show in deep lines,
# and dropping it would make their lines shallow (0.01 A pixels at SNR 10-30 per 0.4 A: 23% of rows
# flagged, log g 0.09 dex low)
NEGATIVE_SIGMA = 5.0
_RESPONSE_STRIDE = 17  # every 17th model pixel measures a row's pixel response (`response_variance`)
# A^2: a response broader than the model's by less than this is taken as the model's (no
# `response_excess`): its training spectra's own responses spread about their mean by as much (ob-default:
# 0.0233 on pixels centred on the grid's bin edges, 0.0008 above the mean), so it learnt them
_RESPONSE_TOLERANCE = 1e-3
# Pixels of the training spectra's width (to this fraction: the stretch of an rv up to 600 km/s) centred
# within this many pixels of theirs are resampled as theirs were, not remade: their rv errors (ob-default:
# sigma 2 km/s, 0.15 pixel) put 88% of them there, so that the model learnt their responses
_ALIGNED_SPACING = 2e-3
_ALIGNED_OFFSET = 0.25
# A^2: less smoothing than this is left out (0.003 A sigma, 0.2 km/s beside the instrument's 6.4; pixels of
# the training spectra's width stretched by an rv of 450 km/s lack 1e-5 of their box)
_NEGLIGIBLE_WIDENING = 1e-5

# Row status codes set by the kernel (0 = processed).
(_OK, _SHORT, _WAVELENGTH, _RV, _NO_OVERLAP, _FEW_GOOD, _ZERO, _SINGULAR, _NEGATIVE, _INPUT) = range(10)
_HOLE_STEPS = 5.0  # a wavelength step this many times wider than a neighbouring step is a hole

# Statuses that coverage short of the grid explains better than their own reason.
_COVERAGE_STATUSES = (_OK, _NO_OVERLAP, _FEW_GOOD, _ZERO, _SINGULAR, _NEGATIVE)
_REASONS = {
    _SHORT: "fewer than 2 pixels",
    _WAVELENGTH: "wavelength is not finite and strictly increasing",
    _RV: "rv is not finite or not slower than light",
    _NO_OVERLAP: "the spectrum does not overlap the model grid after the rv shift",
    _FEW_GOOD: "only {n_good} good pixels on the model grid (need {need})",
    _ZERO: "the flux is zero on every good pixel",
    _SINGULAR: "the continuum fit is singular",
    _NEGATIVE: "the fitted continuum is not positive everywhere",
}


@njit(cache=True)
def _fill_gaps(x, ivar, state, max_gap):
    """Interpolate runs of non-GOOD pixels up to `max_gap` long between good neighbours; set the rest,
    and runs touching an edge, to 1.0. Filled pixels get ivar = 0. Returns whether a run longer than
    `max_gap` was set to 1.0, other than an uncovered end (a gap, not short coverage)."""
    d = state.shape[0]
    long_gap = False
    i = 0
    while i < d:
        if state[i] == GOOD:
            i += 1
            continue
        j = i
        while j < d and state[j] != GOOD:
            j += 1
        interpolate = i > 0 and j < d and j - i <= max_gap
        uncovered_end = i == 0 or j == d
        for p in range(i, j):
            x[p] = x[i - 1] + (x[j] - x[i - 1]) * (p - i + 1) / (j - i + 1) if interpolate else 1.0
            ivar[p] = 0.0
            uncovered_end &= state[p] == UNCOVERED
        long_gap |= j - i > max_gap and not uncovered_end
        i = j
    return long_gap


SPIKE_WINDOW = 25  # input pixels each side whose upper envelope stands for the continuum
SPIKE_ENVELOPE = 0.9  # the quantile of those pixels taken as the envelope
SPIKE_SIDE = 10  # good pixels on each side of a pixel at least, for its envelope to be judged
# what a hit must rise above the envelope at least, as a fraction of its flux, whatever the noise:
# noise-free TLUSTY spectra peak up to ~1% above it between crowded lines (and in LTE emission bumps)
SPIKE_MIN_EXCESS = 0.03
# a pixel's neighbours are the nearest good pixels at most this many steps away (else it is not
# judged): a hit three pixels wide beside a pixel the input masks goes whole
SPIKE_REACH = 4


@njit(cache=True)
def _mask_spikes(flux, var, bad, k, has_errors, sigma_floor):
    """Mark as bad the input pixels that no stellar absorption spectrum can make (cosmic-ray hits, hot
    pixels): those more than `k` sigma above both the lower of their two neighbours and the upper
    envelope of the pixels around them (the SPIKE_ENVELOPE quantile of the good ones within
    SPIKE_WINDOW, SPIKE_SIDE of them at least on each side: fewer than 1 - SPIKE_ENVELOPE of them come
    within k sigma, nor within SPIKE_MIN_EXCESS of its flux). Absorption never rises above its
    continuum, and a broad emission line raises the envelope with it; a narrow emission line (nebular)
    is cut like a hit. The neighbours are the nearest good pixels within SPIKE_REACH steps (else the
    pixel is not judged), and a second pass judges again against the pixels beyond the hits of the
    first, so that a hit two or three pixels wide goes whole. The sigma comes from `var` where the row
    `has_errors`, else from one DER_SNR noise level (robust to spikes), and is at least `sigma_floor`
    times the mean flux, as on the model grid: noise-free input has lines sharper than its sigma."""
    n = flux.shape[0]
    state = np.empty(n, np.uint8)  # 0 good, 1 bad on input, 2 a hit marked here
    total, count = 0.0, 0
    for p in range(n):
        state[p] = 1 if bad[p] else 0
        if not bad[p]:
            total += flux[p]
            count += 1
    floor = (sigma_floor * total / max(count, 1)) ** 2
    noise = 0.0 if has_errors else noise_sigma(flux, state == 0) ** 2
    v = np.empty(n)  # the variances the tests use
    for p in range(n):
        v[p] = max(var[p] if has_errors else noise, floor)
    var = v
    k2 = k * k
    # the screen, branch-free: which pixels stand k sigma above both their immediate neighbours
    # (NaN in a bad neighbour fails it; the pixels next to bad ones are judged below in any case)
    steep = np.zeros(n, np.bool_)
    for p in range(1, n - 1):
        excess = flux[p] - min(flux[p - 1], flux[p + 1])
        steep[p] = excess > 0.0 and excess * excess > k2 * (var[p] + max(var[p - 1], var[p + 1]))
    for _ in range(2):
        found = 0
        for p in range(1, n - 1):
            if state[p] != 0 or not steep[p] and state[p - 1] == 0 and state[p + 1] == 0:
                continue
            a, b = p - 1, p + 1
            while a > 0 and state[a] != 0 and p - a < SPIKE_REACH:
                a -= 1
            while b < n - 1 and state[b] != 0 and b - p < SPIKE_REACH:
                b += 1
            if state[a] != 0 or state[b] != 0:
                continue
            excess = flux[p] - min(flux[a], flux[b])
            if not excess > 0.0 or excess * excess <= k2 * (var[p] + max(var[a], var[b])):
                continue
            # near: good pixels around that come within k sigma of this one, counted from the nearest
            # out, which stops as soon as too many do for it to stand above their envelope
            level = flux[p] - max(k * math.sqrt(var[p]), SPIKE_MIN_EXCESS * flux[p])
            most = (1.0 - SPIKE_ENVELOPE) * 2 * SPIKE_WINDOW
            left, right, near = 0, 0, 0
            for j in range(1, SPIKE_WINDOW + 1):
                for q in (p - j, p + j):
                    if q >= 0 and q < n and state[q] == 0:
                        left += q < p
                        right += q > p
                        near += flux[q] >= level
                if near >= most:
                    break
            if min(left, right) >= SPIKE_SIDE and near < (1.0 - SPIKE_ENVELOPE) * (left + right):
                state[p] = 2
                found += 1
        if found == 0:
            break
    for p in range(n):
        bad[p] |= state[p] == 2


@njit(parallel=True, cache=True)
def _kernel(flux_vals, flux_off, wl_vals, wl_start, err_vals, err_start, err_kind, mask_vals, mask_start,
            rv, smooth, response, integrated, observed, spike_sigma, grid, grid_edges, basis, gram,
            flux_conserving, normalise,
            fit_params, sigma_floor, max_gap, min_good, line_pixels, status, x, ivar, nonfinite, coverage,
            bad_fraction, n_good, gap, line_lost, excess):
    """One spectrum per prange iteration; start index -1 = column absent for that row; err_kind
    per row 0 none, 1 flux_err, 2 ivar; `smooth`: per row the sigma / lambda of a Gaussian to degrade the
    resolution with (0: none); `response`: the variance (A^2) of the pixel response to smooth a
    narrower one up to (`response_variance`, of pixels `integrated` or sampled; 0: none), `excess`
    what a broader one has beyond it; `observed`: the centres of the training spectra's own pixels
    (empty: none), onto which pixels as fine as theirs are first remade;
    `spike_sigma`: `_mask_spikes`' k (0: off);
    `fit_params` as `fit_continuum`'s; `line_pixels`: grid pixels of the diagnostic lines. Writes row
    r of every output only."""
    n_rows, d = x.shape
    for r in prange(n_rows):
        x[r, :] = 1.0
        ivar[r, :] = 0.0
        if status[r] != _OK:
            continue
        f0, n = flux_off[r], flux_off[r + 1] - flux_off[r]
        if n < 2:
            status[r] = _SHORT
            continue
        if not (abs(rv[r]) < 0.999 * C_KMS):  # also rejects NaN
            status[r] = _RV
            continue
        factor = rest_frame_factor(rv[r])
        wl, flux, var = np.empty(n), np.empty(n), np.empty(n)
        bad = np.zeros(n, np.bool_)
        monotonic = True
        for p in range(n):
            wl[p] = wl_vals[wl_start[r] + p] * factor
            monotonic &= np.isfinite(wl[p]) and (p == 0 or wl[p] > wl[p - 1])
            flux[p] = flux_vals[f0 + p]
            if not abs(flux[p]) < np.inf:
                bad[p] = True
                nonfinite[r] = True
            var[p] = 0.0
            if err_start[r] >= 0:
                e = err_vals[err_start[r] + p]
                if err_kind[r] == 1 and e > 0.0 and e < np.inf:
                    var[p] = e * e
                elif err_kind[r] == 2 and e > 0.0 and e < np.inf:
                    var[p] = 1.0 / e
                else:
                    bad[p] = True
                    nonfinite[r] |= not (err_kind[r] == 2 and e == 0.0)  # ivar = 0 is a mask, not an error
            if mask_start[r] >= 0 and mask_vals[mask_start[r] + p]:
                bad[p] = True
        if not monotonic:
            status[r] = _WAVELENGTH
            continue
        for p in range(n - 1):  # a step far wider than its neighbours' is a hole, not one wide pixel
            before = wl[p] - wl[p - 1] if p > 0 else np.inf
            after = wl[p + 2] - wl[p + 1] if p < n - 2 else np.inf
            if wl[p + 1] - wl[p] > _HOLE_STEPS * min(before, after):
                bad[p] = bad[p + 1] = True
        if spike_sigma > 0.0:
            _mask_spikes(flux, var, bad, spike_sigma, err_start[r] >= 0, sigma_floor)
        inside = np.empty(n, np.bool_)  # good input pixels within the model grid's range
        n_inside = 0
        for p in range(n):
            inside[p] = not bad[p] and wl[p] >= grid_edges[0] and wl[p] <= grid_edges[d]
            n_inside += inside[p]
        spacing = (wl[n - 1] - wl[0]) / (n - 1)
        step = observed[1] - observed[0] if observed.shape[0] > 1 else 0.0
        if err_start[r] < 0:  # no errors: DER_SNR of the input pixels, propagated like given errors,
            # measured over as many of them as make a training spectrum's pixel, where the model reads it
            noise = noise_sigma(flux, inside, max(1, int(round(step / spacing))))
            var[:] = noise * noise
        for p in range(n):  # negative beyond its noise: no flux, a defect (flux_err too small, a glitch)
            if not bad[p] and flux[p] < 0.0 and flux[p] * flux[p] > NEGATIVE_SIGMA**2 * var[p]:
                bad[p] = True
                nonfinite[r] = True
                n_inside -= inside[p]
                inside[p] = False
        edges = np.empty(n + 1)
        bin_edges(wl, edges)
        remade = step > 0.0 and spacing * spacing <= step * step + 12.0 * _RESPONSE_TOLERANCE
        if remade and abs(spacing - step) < _ALIGNED_SPACING * step:  # the training spectra's pixels?
            ends = 0.0
            for end in (wl[0], wl[n - 1]):
                phase = (end - observed[0]) / step
                ends = max(ends, abs(phase - round(phase)))
            remade = ends > _ALIGNED_OFFSET
        widen = 0.0
        if remade:  # up to the box of the training spectra's pixels (not the rv's stretch of theirs)
            widen = (step * step - (spacing * spacing if integrated else 0.0)) / 12.0
            widen = widen if widen > _NEGLIGIBLE_WIDENING else 0.0
        elif response > 0.0:
            own = response_variance(wl, edges, grid, grid_edges, flux_conserving, _RESPONSE_STRIDE,
                                    integrated)
            widen = max(response - own, 0.0)
            excess[r] = own - response if own - response > _RESPONSE_TOLERANCE else 0.0
        smoothed = smooth[r] > 0.0 or widen > 0.0
        if smoothed:
            flux = smooth_gaussian(wl, flux, bad, smooth[r], math.sqrt(widen))
        y, yvar = np.empty(d), np.empty(d)
        state = np.empty(d, np.uint8)
        if remade:  # the training spectra's pixels at their centres, as they would have seen the star
            if not resample_remade(wl, flux, var, bad, smooth[r], math.sqrt(widen), observed, grid,
                                   grid_edges, flux_conserving, y, yvar, state):
                coverage[r] = 0.0  # none of the training pixels, so none of the grid, is covered
                status[r] = _NO_OVERLAP
                continue
        else:
            if flux_conserving:
                rebin_flux(edges, flux, var, bad, grid_edges, y, yvar, state)
            else:
                interp_linear(wl, flux, var, bad, grid, y, yvar, state)
            if smoothed:  # the smoothing's share of the noise, which the resampling propagates whole
                mid = min(max(np.searchsorted(grid, 0.5 * (wl[0] + wl[n - 1])), 0), d - 1)
                yvar *= smoothed_noise_ratio(wl, edges, grid[mid], grid_edges[mid], grid_edges[mid + 1],
                                             flux_conserving, smooth[r], math.sqrt(widen))
        n_cov, n_bad = 0, 0
        for j in range(d):
            n_cov += state[j] != UNCOVERED
            n_bad += state[j] == BAD
        coverage[r] = n_cov / d
        bad_fraction[r] = n_bad / n_cov if n_cov > 0 else np.nan
        n_good[r] = min(n_cov - n_bad, n_inside)  # a few input pixels stretched over the grid are few
        if n_cov == 0:
            status[r] = _NO_OVERLAP
            continue
        if n_good[r] < min_good:
            status[r] = _FEW_GOOD
            continue
        good = state == GOOD
        sigma = np.empty(d)
        mean_flux = 0.0
        for j in range(d):
            mean_flux += y[j] if good[j] else 0.0
        if not mean_flux > 0.0:
            status[r] = _ZERO
            continue
        floor = sigma_floor * mean_flux / (n_cov - n_bad)
        for j in range(d):
            sigma[j] = max(math.sqrt(yvar[j]), floor)
        cont = np.ones(d)
        if normalise:
            # grid pixels per input pixel: > 1 when the input is coarser, its noise then correlated
            correlation = max(1.0, (n_cov - n_bad) / n_inside)
            if not fit_continuum(y, sigma, good, basis, gram, fit_params, cont, correlation):
                status[r] = _SINGULAR
                continue
            positive = True
            for j in range(d):
                positive &= not (state[j] != UNCOVERED and not cont[j] > 0.0)
            if not positive:
                status[r] = _NEGATIVE
                continue
        for j in range(d):
            if good[j]:
                x[r, j] = y[j] / cont[j]
                ivar[r, j] = (cont[j] / sigma[j]) ** 2
        gap[r] = _fill_gaps(x[r], ivar[r], state, max_gap)
        for p in line_pixels:  # lost: in a run of bad pixels too long to interpolate, or at an end
            lo, hi = p, p
            while lo > 0 and state[lo - 1] != GOOD and state[p] != GOOD:
                lo -= 1
            while hi < d - 1 and state[hi + 1] != GOOD and state[p] != GOOD:
                hi += 1
            line_lost[r] |= state[p] != GOOD and (hi - lo >= max_gap or lo == 0 or hi == d - 1)


def _as_array(batch, name: str) -> pa.Array | None:
    if name not in batch.schema.names:
        return None
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _list_parts(col: pa.Array, name: str) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(offsets (B+1,) int64 into the returned values, flat values, valid rows) of a list column.

    Handles list, large_list and fixed_size_list, sliced or not; values are cut to the rows' span."""
    t = col.type
    if pa.types.is_fixed_size_list(t):
        offsets = (col.offset + np.arange(len(col) + 1, dtype=np.int64)) * t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = col.offsets.to_numpy().astype(np.int64)
    else:
        raise CatalogError(f"expected a list column, got {t}", column=name)
    first = int(offsets[0]) if len(offsets) else 0
    values = col.values.slice(first, int(offsets[-1]) - first if len(offsets) else 0)
    valid = np.ones(len(col), bool) if col.null_count == 0 else col.is_valid().to_numpy(zero_copy_only=False)
    return offsets - first, values, valid


def _float_values(values: pa.Array, name: str) -> np.ndarray:
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise CatalogError(f"expected a list of numbers, got list<{values.type}>", column=name)
    # nulls -> NaN; writable, so that every batch hits the same compiled kernel (read-only is a new type)
    return np.require(values.to_numpy(zero_copy_only=False), np.float64, ["C", "W"])


def _bool_values(values: pa.Array, name: str) -> np.ndarray:
    if not pa.types.is_boolean(values.type):
        raise CatalogError(f"expected a list of booleans, got list<{values.type}>", column=name)
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=np.bool_)


def _grid_values(grid, what: str) -> np.ndarray:
    values = grid.values() if isinstance(grid, WavelengthGrid) else np.asarray(grid, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2 or not np.all(np.diff(values) > 0):
        raise StarcastError(f"{what} must be a strictly increasing 1-D wavelength array of >= 2 values")
    return np.require(values, np.float64, ["C", "W"])


def _optional_column(batch, name, n_pixels, flux_valid, failures, to_numpy):
    """Flat values and per-row start (-1 for a null row) of an optional list column, or None if absent.
    Rows whose length differs from the flux row are recorded in `failures`."""
    col = _as_array(batch, name)
    if col is None:
        return None
    offsets, values, valid = _list_parts(col, name)
    lengths = np.diff(offsets)
    for r in np.flatnonzero(flux_valid & valid & (lengths != n_pixels)):
        failures.setdefault(int(r), f"{name} has {lengths[r]} values but flux has {n_pixels[r]}")
    return to_numpy(values, name), np.where(valid, offsets[:-1], -1)


def _uncertainty(batch, n_pixels, flux_valid, failures) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(flat values, per-row start) and per-row kind (0 none, 1 flux_err, 2 ivar) of each row's noise:
    its flux_err, or else its ivar (a catalog merged from several may give each where the other is
    null)."""
    values, start, kind = [], np.full(len(n_pixels), -1, np.int64), np.zeros(len(n_pixels), np.int8)
    offset = 0
    for code, name in ((1, FLUX_ERR), (2, IVAR)):
        column = _optional_column(batch, name, n_pixels, flux_valid, failures, _float_values)
        if column is None:
            continue
        take = (column[1] >= 0) & (start < 0)
        start[take], kind[take] = column[1][take] + offset, code
        values.append(column[0])
        offset += len(column[0])
    flat = values[0] if len(values) == 1 else np.concatenate(values) if values else np.zeros(0)
    return (flat, start), kind


def preprocess(batch: pa.RecordBatch | pa.Table, grid, settings: PreprocessSettings | None = None, *,
               source_grid=None, resolving_power: float | None = None,
               response: float = 0.0, observed=None) -> Preprocessed:
    """Put every row of `batch` (catalog schema) on `grid` (model wavelengths, Angstrom, rest frame).

    Per row: convert the wavelengths to the model's medium (when `grid` and the input both state
    theirs: a `WavelengthGrid`'s medium, `starcast.medium` for a `wavelength` column), smooth a
    resolving power above `resolving_power` (the model's) down to it and a pixel response narrower
    than `response` (A^2, the variance of the one the model's training spectra had on the grid:
    `response_variance`; of pixels as the file's `starcast.pixels` states) up to it (what a broader
    one has beyond it: `response_excess`); pixels no coarser than those the training spectra were
    observed on (`observed`, their centres in the model's medium; a `WavelengthGrid` or array) are
    remade as those (smoothed to their box, interpolated at their centres, `resample_remade`) and
    then resampled as the training spectra were, so that their lines look as the model learnt them
    whatever the rv, unless they are those already, within a quarter of a pixel; remove `rv`
    (km/s, relativistic, see `rest_frame_factor`; null = 0), resample with `settings.method`,
    fit and divide the continuum on the model grid, interpolate short gaps and set long ones and
    uncovered pixels to 1.0.
    Bad input pixels: non-finite flux or flux NEGATIVE_SIGMA sigma below zero, errors that are not
    positive and finite (NON_FINITE), `mask` true or `ivar` = 0 (masked only). Rows without a
    `wavelength` column use `source_grid`, else the grid in the batch's schema metadata. Rows without
    `flux_err`/`ivar` get one noise level, DER_SNR of their input pixels over bins as wide as the
    training spectra's pixels (`observed`; `continuum.noise_sigma`), propagated as errors would be.
    Rows covering less than `settings.min_coverage` of the grid, or at a resolving power too low, fail
    with the reason.
    """
    settings = settings or PreprocessSettings()
    medium = grid.medium if isinstance(grid, WavelengthGrid) else None
    grid = _grid_values(grid, "grid")
    n_rows, d = batch.num_rows, len(grid)
    flux_col = _as_array(batch, FLUX)
    if flux_col is None:
        raise CatalogError("no flux column", column=FLUX)
    flux_off, flux_values, flux_valid = _list_parts(flux_col, FLUX)
    n_pixels = np.diff(flux_off)
    failures = {int(r): "flux is null or empty" for r in np.flatnonzero(~flux_valid | (n_pixels == 0))}

    wavelength = _optional_column(batch, WAVELENGTH, n_pixels, flux_valid, failures, _float_values)
    if wavelength is None:
        metadata = batch.schema.metadata or {}
        if source_grid is None and META_WAVELENGTH.encode() in metadata:
            try:
                source_grid = WavelengthGrid.from_json(metadata[META_WAVELENGTH.encode()])
            except ValueError as exc:  # json.JSONDecodeError is one
                raise CatalogError(f"malformed {META_WAVELENGTH!r} metadata: {exc}",
                                   column=WAVELENGTH) from exc
        if source_grid is None:
            raise CatalogError("no wavelength column and no file-level wavelength grid (give a wavelength "
                               f"column or the {META_WAVELENGTH!r} metadata, as `starcast import-csv` and "
                               "`import-fits` write them; from Python, `source_grid`)", column=WAVELENGTH)
        source_medium = source_grid.medium if isinstance(source_grid, WavelengthGrid) else None
        shared = to_medium(_grid_values(source_grid, "source_grid"), source_medium, medium)
        for r in np.flatnonzero(flux_valid & (n_pixels != len(shared)) & (n_pixels > 0)):
            failures.setdefault(int(r), f"flux has {n_pixels[r]} values, the file's grid {len(shared)}")
        wavelength = (shared, np.zeros(n_rows, np.int64))
    else:
        for r in np.flatnonzero(wavelength[1] < 0):
            failures.setdefault(int(r), "wavelength is null")
        wavelength = (to_medium(wavelength[0], column_medium(batch.schema), medium), wavelength[1])

    uncertainty, err_kind = _uncertainty(batch, n_pixels, flux_valid, failures)
    mask = _optional_column(batch, MASK, n_pixels, flux_valid, failures, _bool_values)
    mask = mask or (np.zeros(0, bool), np.full(n_rows, -1, np.int64))
    rv_col = _as_array(batch, RV)  # null = 0
    rv = np.zeros(n_rows) if rv_col is None else np.require(
        pc.fill_null(number_column(rv_col, RV, "km/s"), 0.0).to_numpy(zero_copy_only=False), np.float64,
        ["C", "W"])

    r_input, bad_resolving_power = input_resolving_power(batch, n_rows)
    for r, reason in bad_resolving_power.items():
        failures.setdefault(r, reason)
    smooth, low_resolution = resolution_match(r_input, resolving_power)
    for r in np.flatnonzero(low_resolution):
        failures.setdefault(int(r), f"resolving power R = {r_input[r]:.0f} is below the model's "
                                    f"R = {resolving_power:.0f} (lower resolution reads as rotation)")
    status = np.zeros(n_rows, np.int32)
    status[list(failures)] = _INPUT
    x = np.empty((n_rows, d), np.float32)
    ivar = np.empty((n_rows, d), np.float32)
    nonfinite = np.zeros(n_rows, np.bool_)
    coverage = np.full(n_rows, np.nan)
    bad_fraction = np.full(n_rows, np.nan)
    n_good = np.zeros(n_rows, np.int64)
    gap, line_lost = np.zeros(n_rows, np.bool_), np.zeros(n_rows, np.bool_)
    excess = np.zeros(n_rows)
    edges = np.empty(d + 1)
    bin_edges(grid, edges)
    fit_params = (float(settings.clip_low), float(settings.clip_window_low), float(settings.clip_high),
                  int(settings.clip_window), int(settings.max_iter), float(settings.min_keep_fraction))
    _kernel(_float_values(flux_values, FLUX), flux_off, wavelength[0], wavelength[1], *uncertainty,
            err_kind, *mask, rv, smooth, float(response), integrated_pixels(batch),
            np.empty(0) if observed is None else to_medium(_grid_values(observed, "observed"),
                                                            getattr(observed, "medium", None), medium),
            float(settings.spike_sigma), grid, edges, *continuum_basis(grid, settings.continuum_degree),
            settings.method == "flux", settings.continuum == "chebyshev", fit_params,
            float(settings.sigma_floor), int(settings.max_gap), int(settings.min_good_pixels),
            line_pixels(grid, medium), status, x, ivar, nonfinite, coverage, bad_fraction, n_good, gap,
            line_lost, excess)

    short = np.isin(status, _COVERAGE_STATUSES) & (coverage < settings.min_coverage)
    x[short], ivar[short] = 1.0, 0.0  # failed rows are neutral, as the kernel leaves its own
    ok = (status == _OK) & ~short
    flags = np.where(nonfinite, int(Flag.NON_FINITE), 0)
    flags |= np.where(bad_fraction > settings.max_bad_fraction, int(Flag.MASKED), 0)
    flags |= np.where(coverage < settings.min_coverage, int(Flag.COVERAGE), 0)
    flags |= np.where((status != _OK) | short, int(Flag.PREPROCESS_FAILED), 0)
    flags |= np.where(gap & ok, int(Flag.GAP), 0)
    flags |= np.where(line_lost & ok, int(Flag.LINE_LOST), 0)
    flags |= np.where(low_resolution, int(Flag.LOW_RESOLUTION), 0)
    messages: list[str | None] = [None] * n_rows
    for r in np.flatnonzero(status != _OK):
        reason = failures.get(int(r)) or _REASONS[int(status[r])].format(
            n_good=n_good[r], need=settings.min_good_pixels)
        messages[r] = reason
    for r in np.flatnonzero(short):
        lo, hi = wavelength[0][wavelength[1][r]], wavelength[0][wavelength[1][r] + n_pixels[r] - 1]
        factor = rest_frame_factor(rv[r])
        messages[r] = coverage_error(lo * factor, hi * factor, grid, medium, float(coverage[r]),
                                     settings.min_coverage)
    return Preprocessed(x=x, flags=flags.astype(np.int32), coverage=coverage.astype(np.float32),
                        bad_fraction=bad_fraction.astype(np.float32), errors=messages, ivar=ivar,
                        response_excess=np.where(ok, excess, 0.0).astype(np.float32),
                        noise_estimated=uncertainty[1] < 0)
