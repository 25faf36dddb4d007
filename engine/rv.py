"""Radial velocities: estimated where a catalog gives none, checked where it gives one, by a search
against the model's emulator.

The spectrum, put on the model grid as if at rest (or at the rv the catalog gives), is compared with a
bank of emulated spectra (LEVELS of each SPANNED label's training range, every combination) shifted to
every velocity of a grid (+-V_MAX in steps of V_STEP; +-V_CHECK around a given rv). Per spectrum the
weighted chi^2 against every (template, velocity) is two matrix products; the best template's chi^2 at
the three velocities around its minimum gives the velocity by a parabola, and its sigma from the
curvature (delta chi^2 = 1, widened by the fourth root of the reduced chi^2 where the template explains
the spectrum worse than its noise: at high SNR the bank's few templates miss a star's line depths far
more than its velocity, which symmetric lines hold; the square root, a mismatch as noise, gave sharp
lines at SNR 300-600 a sigma of 0.81 km/s against a scatter of 0.20 about the truth, the fourth root
0.24). Preprocessing then removes that velocity (from a given rv, only what the search finds
it off by), and the emulator fit after the network (`Emulator.chi2`) refines it with the labels.
"""

from __future__ import annotations

import itertools

import numpy as np

from .emulator import Emulator

V_MAX = 600.0  # km/s searched either way (stars of the Galaxy and the Magellanic Clouds)
V_STEP = 20.0  # km/s, below the 27-30 km/s of a 0.4 A pixel of ob-default's grid at 4000-4800 A
# km/s searched either way around a given rv (a wrong catalog rv, wavelength calibration or barycentric
# correction is rarely off by more); a minimum at this window's edge is searched again over +-V_MAX
V_CHECK = 60.0
LEVELS = (0.15, 0.5, 0.85)  # of each spanned label's training range: 27 templates for three labels
# Labels the bank spans (those of the emulator's it has); the others, e.g. metals, at the middle of their
# range: they barely move the lines the velocity is read from (as precise on ob-default, 3x faster).
SPANNED = ("teff", "logg", "vsini")
CHUNK = 512  # spectra per matrix product
# A residual rv the emulator fit resolves (`significant`): beyond both this many of its sigmas and
# RESOLVED_KMS, the rv preprocessing removed was off (the given rv, or the estimate) by more than the
# network copes with: its training spectra carry stated-rv errors of sigma 2 km/s.
RESOLVED_SIGMAS = 4.0
RESOLVED_KMS = 6.0
# A given rv the search finds off by more than RESOLVED_SIGMAS of its sigmas and RESAMPLED_RV_KMS is
# replaced by the search's and the spectrum resampled at it: the fit's shift of its emulated spectrum
# on the model grid, where sharp lines are undersampled, is not what resampling the data at a wrong rv
# does (stars at 0-15 km/s at SNR 300-600 given an rv 1 / 2 km/s off read a median chi^2 of 1.26 /
# 2.00 left to the fit, 1.03 / 1.04 resampled).
RESAMPLED_RV_KMS = 0.5


class VelocitySearch:
    """The template bank of an emulator over its labels' training range [lo, hi] (LEVELS of each
    SPANNED label), shifted to every velocity of the search grid (float32, K x V spectra of D pixels;
    27 x 61 x 1951 ~ 13 MB)."""

    def __init__(self, emulator: Emulator, lo: np.ndarray, hi: np.ndarray):
        self.emulator = emulator
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        levels = [np.array(LEVELS if name in SPANNED else (0.5,)) for name in emulator.labels]
        labels = np.array(list(itertools.product(*[lo[j] + levels[j] * (hi[j] - lo[j])
                                                   for j in range(len(lo))])))
        self.velocities = np.arange(-V_MAX, V_MAX + V_STEP / 2, V_STEP)
        bank = emulator.spectra(labels)
        n_v = len(self.velocities)
        self.bank = emulator.shift(np.repeat(bank, n_v, axis=0),
                                   np.tile(self.velocities, len(labels))).reshape(len(labels), n_v, -1)
        self._windows: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def _window(self, v_max: float):
        """(velocities, bank [K, V, D], bank flattened [K V, D], its square) within +-v_max, built
        once per window: the squares per search, not per chunk of spectra."""
        if v_max not in self._windows:
            inside = np.flatnonzero(np.abs(self.velocities) <= v_max + 1e-9)
            window = slice(inside[0], inside[-1] + 1)  # the whole grid: the bank itself, not a copy
            bank = np.ascontiguousarray(self.bank[:, window])
            flat = bank.reshape(-1, bank.shape[-1])
            self._windows[v_max] = self.velocities[window], bank, flat, flat * flat
        return self._windows[v_max]

    def estimate(self, x: np.ndarray, ivar: np.ndarray,
                 v_max: float = V_MAX) -> tuple[np.ndarray, np.ndarray]:
        """(rv, rv_err) in km/s of spectra x [B, D] (on the model grid in the frame they were put in,
        continuum-normalised) with inverse variances ivar, searched within +-v_max; NaN for a row without
        pixels. A minimum at the search's edge gives the edge, with the sigma of its parabola (`at_edge`:
        the star may lie beyond)."""
        rv, rv_err = np.full(len(x), np.nan), np.full(len(x), np.nan)
        window = self._window(v_max)
        for s in range(0, len(x), CHUNK):
            rv[s:s + CHUNK], rv_err[s:s + CHUNK] = self._estimate(x[s:s + CHUNK], ivar[s:s + CHUNK], *window)
        return rv, rv_err

    def check(self, x: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rv, rv_err) in km/s of the velocity left in spectra x [B, D] put at rest by a given rv (or
        by an estimate at the edge of +-V_MAX): searched within +-V_CHECK, and over +-V_MAX where that
        finds its minimum at the window's edge; NaN where the minimum is at the edge of +-V_MAX too: no
        velocity found, so the rv the spectra were put at rest by stands (for a given rv such a minimum
        is a spectrum the bank cannot explain, e.g. its Balmer wings normalised away, more often than a
        star 600 km/s from its catalog rv)."""
        rv, rv_err = self.estimate(x, ivar, V_CHECK)
        edge = np.flatnonzero(at_edge(rv, V_CHECK))
        if len(edge):
            rv[edge], rv_err[edge] = self.estimate(x[edge], ivar[edge])
            lost = edge[at_edge(rv[edge], V_MAX)]
            rv[lost], rv_err[lost] = np.nan, np.nan
        return rv, rv_err

    def _estimate(self, x, ivar, velocities, bank, flat, flat_squared):
        weight = self.emulator.pixel_weight(ivar)  # sigma unscaled: the labels are not known yet
        x = x.astype(np.float32)
        n_v = bank.shape[1]
        # chi^2 less the sum of w x^2, the same for every template: sum w t^2 - 2 sum w x t
        score = weight @ flat_squared.T - 2.0 * (weight * x) @ flat.T
        best = np.argmin(score, axis=1)
        template, centre = np.divmod(best, n_v)
        centre = np.clip(centre, 1, n_v - 2)
        chi2 = np.stack([((x - bank[template, centre + j]) ** 2 * weight).sum(axis=1, dtype=np.float64)
                         for j in (-1, 0, 1)], axis=1)  # float64 sums: the parabola needs their differences
        curvature = chi2[:, 0] - 2.0 * chi2[:, 1] + chi2[:, 2]
        pixels = (weight > 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            offset = np.clip(0.5 * (chi2[:, 0] - chi2[:, 2]) / curvature, -1.0, 1.0)
            reduced = np.maximum(chi2[:, 1] / np.maximum(pixels - 1, 1), 1.0)
            rv = velocities[centre] + offset * V_STEP
            rv_err = V_STEP * np.sqrt(2.0 / curvature) * reduced**0.25
        bad = ~(curvature > 0) | (pixels == 0)
        rv[bad] = np.where(pixels[bad] > 0, velocities[centre[bad]], np.nan)
        rv_err[bad] = np.where(pixels[bad] > 0, V_STEP, np.nan)
        return rv, rv_err


def at_edge(rv: np.ndarray, v_max: float) -> np.ndarray:
    """Whether a search within +-v_max found its minimum at the window's edge (the parabola's centre is
    kept one step inside it)."""
    return np.abs(rv) >= v_max - V_STEP


def significant(rv: np.ndarray, rv_err: np.ndarray, kms: float = RESOLVED_KMS) -> np.ndarray:
    """Whether a residual rv (km/s) with sigma rv_err is resolved: beyond RESOLVED_SIGMAS sigmas and
    `kms` (False where either is NaN)."""
    with np.errstate(invalid="ignore"):
        return (np.abs(rv) > RESOLVED_SIGMAS * rv_err) & (np.abs(rv) > kms)
