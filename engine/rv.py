"""Radial velocities where a catalog gives none: a search against the model's emulator.

The spectrum, put on the model grid as if at rest, is compared with a bank of emulated spectra
(LEVELS of each label's training range, every combination) shifted to every velocity of a grid
(+-V_MAX in steps of V_STEP). Per spectrum the weighted chi^2 against every (template, velocity) is
two matrix products; the best template's chi^2 at the three velocities around its minimum gives the
velocity by a parabola, and its sigma from the curvature (delta chi^2 = 1, widened by the reduced
chi^2 where the template explains the spectrum worse than its noise). Preprocessing then removes that
velocity, and the emulator fit after the network (`Emulator.chi2`) refines it with the labels.
"""

from __future__ import annotations

import itertools

import numpy as np

from .emulator import Emulator

V_MAX = 600.0  # km/s searched either way (stars of the Galaxy and the Magellanic Clouds)
V_STEP = 20.0  # km/s, below the 27-30 km/s of a 0.4 A pixel of ob-default's grid at 4000-4800 A
LEVELS = (0.15, 0.5, 0.85)  # of each label's training range: 27 templates for three labels
CHUNK = 512  # spectra per matrix product
# A residual rv the emulator fit resolves (`significant`): beyond both this many of its sigmas and
# RESOLVED_KMS, the rv preprocessing removed was off (the given rv, or the estimate) by more than the
# network copes with: its training spectra carry stated-rv errors of sigma 2 km/s.
RESOLVED_SIGMAS = 4.0
RESOLVED_KMS = 6.0


class VelocitySearch:
    """The template bank of an emulator over the labels' training range [lo, hi], shifted to every
    velocity of the search grid (float32, K x V spectra of D pixels; 27 x 61 x 1951 ~ 13 MB)."""

    def __init__(self, emulator: Emulator, lo: np.ndarray, hi: np.ndarray):
        self.emulator = emulator
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        labels = np.array(list(itertools.product(*[lo[j] + np.array(LEVELS) * (hi[j] - lo[j])
                                                   for j in range(len(lo))])))
        self.velocities = np.arange(-V_MAX, V_MAX + V_STEP / 2, V_STEP)
        bank = emulator.spectra(labels)
        n_v = len(self.velocities)
        self.bank = emulator.shift(np.repeat(bank, n_v, axis=0),
                                   np.tile(self.velocities, len(labels))).reshape(len(labels), n_v, -1)
        self._flat = self.bank.reshape(len(labels) * n_v, -1)
        self._flat_squared = self._flat * self._flat  # per search, not per chunk of spectra

    def estimate(self, x: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rv, rv_err) in km/s of spectra x [B, D] (on the model grid at rest, continuum-normalised)
        with inverse variances ivar; NaN for a row without pixels. A minimum at the search's edge gives
        the edge, with the sigma of its parabola."""
        rv, rv_err = np.full(len(x), np.nan), np.full(len(x), np.nan)
        for s in range(0, len(x), CHUNK):
            rv[s:s + CHUNK], rv_err[s:s + CHUNK] = self._estimate(x[s:s + CHUNK], ivar[s:s + CHUNK])
        return rv, rv_err

    def _estimate(self, x, ivar):
        weight = self.emulator.pixel_weight(ivar)
        x = x.astype(np.float32)
        n_v = self.bank.shape[1]
        # chi^2 less the sum of w x^2, the same for every template: sum w t^2 - 2 sum w x t
        score = weight @ self._flat_squared.T - 2.0 * (weight * x) @ self._flat.T
        best = np.argmin(score, axis=1)
        template, centre = np.divmod(best, n_v)
        centre = np.clip(centre, 1, n_v - 2)
        chi2 = np.stack([((x - self.bank[template, centre + j]) ** 2 * weight).sum(axis=1, dtype=np.float64)
                         for j in (-1, 0, 1)], axis=1)  # float64 sums: the parabola needs their differences
        curvature = chi2[:, 0] - 2.0 * chi2[:, 1] + chi2[:, 2]
        pixels = (weight > 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            offset = np.clip(0.5 * (chi2[:, 0] - chi2[:, 2]) / curvature, -1.0, 1.0)
            reduced = np.maximum(chi2[:, 1] / np.maximum(pixels - 1, 1), 1.0)
            rv = self.velocities[centre] + offset * V_STEP
            rv_err = V_STEP * np.sqrt(2.0 / curvature * reduced)
        bad = ~(curvature > 0) | (pixels == 0)
        rv[bad] = np.where(pixels[bad] > 0, self.velocities[centre[bad]], np.nan)
        rv_err[bad] = np.where(pixels[bad] > 0, V_STEP, np.nan)
        return rv, rv_err


def significant(rv: np.ndarray, rv_err: np.ndarray) -> np.ndarray:
    """Whether a residual rv (km/s) with sigma rv_err is resolved: beyond RESOLVED_SIGMAS sigmas and
    RESOLVED_KMS (False where either is NaN)."""
    with np.errstate(invalid="ignore"):
        return (np.abs(rv) > RESOLVED_SIGMAS * rv_err) & (np.abs(rv) > RESOLVED_KMS)
