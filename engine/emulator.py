"""The emulator of a model bundle and the goodness of fit it gives every spectrum.

The emulator (after The Payne, Ting et al. 2019, PASP 131, 034001) is a small MLP from standardised
labels to the normalised spectrum on the model grid as the engine's preprocessing leaves it. It lives
beside the weights as `emulator.safetensors` (`layers.{i}.weight` [in, out], `layers.{i}.bias`, and
`sigma`, the per-pixel emulator error measured at nodes left out of its training), described by the
manifest's `emulator` entry, whose sha256 is checked on loading. Training is `starcast.trainers.emulator`.

The fit multiplies the emulated spectrum by a per-row Chebyshev polynomial of the preprocessing's
continuum degree, fitted by weighted least squares: the engine's own continuum fit differs between a
noisy and a noise-free copy of one star by such a polynomial (measured on TLUSTY spectra: chi^2 2.3 at
SNR 100 without it, 0.99 with a cubic), which no label can explain; a ripple or a shift cannot hide in it.
Where the fit cannot explain a spectrum with that polynomial (its chi^2 beyond the noise above
`chi2_threshold`, MODEL_MISMATCH's test), the continuum is freed up to `freer_degree` (the Chebyshev
terms above the preprocessing's degree beside it, with any ripple and bands fitted) and the steps run
again (`Fit.freed`; the row stays flagged): an instrument's response left in with more shape than the
cubic bends the labels by several times their noise (1% of a Legendre P_6: log g 4.6x its clean
RMSE), which the freer fit takes out. Only there: on every row the freer continuum would take part of
the Balmer wings' log g (docs/record.md).
The labels are those of the prediction refined by a few (Gauss-Newton) steps on the same chi^2 (within
the training range): the chi^2 then asks whether the model can explain the spectrum at all, not how
far the network's estimate is from the best fit, which at high SNR would dominate it. The same steps
fit a residual radial velocity (the emulated spectrum shifted on the grid): what is left of the rv
after preprocessing removed the given or estimated one, with its error from the fit's curvature.
Reddened stars carry diffuse interstellar bands (DIBS: the broad one near 4428 A and narrow ones at
4502, 4727 and 4763 A), which no stellar model holds and which, left in, move Teff and log g by
several times their noise or raise the chi^2 to MODEL_MISMATCH (`bench/perturbations.py`). So the
residual is first searched for each: the drop in chi^2 from fitting the band's DIB_TERMS terms (its
profile's depth and first-order shift and widening, so that neither its place in the star's frame nor
its width need be known exactly) to it beyond what the residual's best ripple removes (a ripple's
troughs look like bands), per unit of the reduced chi^2, if the band is in absorption (`dib`). Stars
in H II regions carry nebular emission lines in the cores of their own H and He I lines
(NEBULAR_LINES), searched for alike if in emission, beside a constant and the fitted spectrum too (a
line shallower as a whole, as light without lines makes it, is no emission in its core; BANDS: both
kinds). Where that passes the band's `dib_threshold` (a quantile of clean spectra), the continuum
holds the band's terms and the Gauss-Newton steps run again (the engine then divides the bands out of
the spectrum and predicts it again: the networks never saw one). A fitted band is no mismatch: it
flags nothing. The pixels of the narrow interstellar lines (ISM_LINES) weigh nothing in the fit.
A continuum ripple (an echelle blaze left over, fringing) raises the chi^2 only a little at moderate
SNR, so the residual is also searched for one: the largest drop in chi^2 from fitting a sinusoid of
period RIPPLE_PERIODS to it (a weighted Lomb-Scargle periodogram), per unit of the reduced chi^2.
Where that statistic passes the emulator's `ripple_threshold` (MODEL_MISMATCH), the ripple is fitted
too: its frequency refined on a finer grid about the periodogram's peak, then the continuum holds the
sinusoid's two terms beside the polynomial and the same Gauss-Newton steps run again, so that the
labels, their sigmas and the chi^2 are those of a star seen through that ripple (left in, a 1% ripple
moves Teff by several times its noise at SNR >= 100; `bench/blend_parts.py`).
Light without lines (scattered light the reduction left, a featureless companion's continuum) makes
every line shallower by one factor, which the labels absorb so well that the chi^2 hardly rises
(5% of the continuum: median 1.05, log g 5x its clean error; `bench/perturbations.py`). So the final
residual is searched for it too: the drop in chi^2 from fitting a constant made orthogonal to the
continuum's terms (what is left of it is the fitted spectrum's lines) beside the labels' linearised
steps, beyond what those steps alone remove, per unit of the reduced chi^2 (`line_shape`). Above the
emulator's `veiling_threshold` the row is flagged MODEL_MISMATCH, and where the light is measured to
within VEIL_SIGMA_MAX and accounts for VEIL_EXCESS_SHARE of the fit's excess chi^2 it is fitted (a
constant beside the continuum, VEIL_STEPS refits; `Fit.veil`); the engine then removes it from the
spectrum and predicts it again, as it does the bands, and adds to the labels' variance what fitting
the light added to the fit's.
Broadening beyond rotation (macroturbulence, which no grid model has; an instrument broader than
stated) the labels read as v sin i, and the chi^2 hardly rises (1.00-1.01 at 25-60 km/s of
macroturbulence). So the residual is searched for it as for light without lines: the drop in chi^2
from fitting the fitted spectra's curvature (how a wider Gaussian response changes them) beside the
labels' linearised steps (where the fit refines them; v sin i's among them: what rotation's profile
can take), beyond what those steps alone remove, per unit of the reduced chi^2 (`line_shape`); above
the emulator's `broadening_threshold` the row is flagged MODEL_MISMATCH and its v sin i UPPER_LIMIT.
A flux_err that understates the noise (by 1.2x: a median chi^2 of 1.44) raises the chi^2 of every
row as a star unlike the model's does, though the numbers are as good as clean ones'. The two differ
in where and how the excess lies: the understated noise raises it alike in the lines and in the
continuum and from pixel to pixel, a misfit most where the model has lines (an emission, a companion's
lines) or where it has none (lines it lacks, a band it does not fit), or smoothly (a continuum). So
the chi^2 that MODEL_MISMATCH tests is the reduced chi^2 over what the residual's scatter from pixel
to pixel in the continuum says of the noise, where above 1 (`Fit.noise_chi2`, `Fit.chi2_beyond_noise`;
the continuum: where the emulated spectrum is within CONTINUUM_DEPTH of 1; a smooth misfit, such as a
continuum beyond the fit's polynomial, hardly moves that scatter; a narrow one in the continuum, such
as a companion's lines, raises it), and where the excess lies is a statistic of its own, the contrast
ln(chi^2 per line pixel / chi^2 per continuum pixel) (line pixels: LINE_DEPTH or deeper;
`Fit.contrast`), flagged where its size is above the emulator's `contrast_threshold` (for a row whose
noise is estimated, one level per row, where it is: photon noise is lower in the lines than that
level, which reads as a deficit there; `Fit.excess_contrast`).
"""

from __future__ import annotations

import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cache, cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from threadpoolctl import ThreadpoolController

from ..errors import ModelError
from ..kernels.features import log10_snr
from ..kernels.lstsq import normal_equations
from ..kernels.resample import cubic_gaussian_weights, doppler_shift
from .calibration import chi2_excess

EMULATOR_FILE = "emulator.safetensors"
# optional: ripple_threshold, dib_threshold, veiling_threshold, broadening_threshold, sigma_scaling
# ({"label", "knots", "factors"}: `Emulator.sigma_label`, `sigma_knots`, `sigma_factors`),
# chi2_threshold_estimated_noise, contrast_threshold, freer_degree;
# chi2_threshold, it, broadening_threshold and contrast_threshold: a number or a table ({"log10_snr",
# "label", "knots", "values"}: `Threshold`)
ENTRY_KEYS = ("file", "sha256", "labels", "hidden", "activation", "label_mean", "label_std",
              "continuum_degree", "refine_steps", "chi2_threshold")
STEP = 1e-2  # finite-difference step of the Jacobian, in standardised label units
CHUNK = 1024  # rows per chunk of a fit (a chunk's Jacobian holds len(labels) + 1 spectra per row)
V_UNIT = 10.0  # km/s: the velocity's unit in the fit, so that STEP and the step limits suit it too
V_STEP_MAX = 3.0  # V_UNIT per Gauss-Newton step at most (labels: 1 std), ~one 0.4 A pixel at 4400 A
V_FIT_MAX = 100.0  # km/s: the residual velocity is kept within +-this (the fit's capture range)
# sigmas: each step after the first is a step with the last Jacobian (a chord step, one emulated spectrum
# instead of len(labels) + 2); where it moves a row by more than this, a new Gauss-Newton step is blended
# in, all of it from twice this (`full_step_share`), so that the labels of a two-step fit (the shipped
# models') are continuous in the spectrum (a third step's chord would take a row's new Jacobian at any
# share above 0). The chord step leaves a median 0.03 sigma of the labels where the full step would have
# moved them (TLUSTY spectra between the nodes, SNR 10-500), and the fit 1.4x as fast.
CHORD_STEP_MAX = 0.3
# km/s, added in quadrature to the fitted velocity's sigma: the emulator's own error in line positions
# and shapes. Measured on TLUSTY spectra of models left out of training at SNR 50-300: the fitted rv
# scatters by 1.1-1.4 km/s about the truth where the curvature alone gives 0.5-0.8 km/s.
RV_SYSTEMATIC = 1.0
RIPPLE_PERIODS = (15.0, 150.0)  # Angstrom: too short for the cubic continuum, longer than lines
RIPPLE_OVERSAMPLING = 2  # frequencies per 1 / (grid span): at worst 81% of a ripple's power
RIPPLE_REFINE = 8  # the fitted ripple's frequency: on a grid this many times finer about the peak
RIPPLE_TERMS = 2  # the fitted ripple's parameters in the continuum (a sin + b cos); its frequency one more
# the emulated flux below which the column of light without lines, 1 / e, is held (lines of B stars stay
# well above it, so that e times the column is 1 wherever they are)
LIGHT_FLOOR = 0.05
# refits with light without lines, each of `refine_steps`: from labels that read the light as shallower
# lines (log g 0.13 dex low at 15% of the continuum) one Gauss-Newton step leaves the light 2% low, log g
# 1.1x as far off as after two and covered 54% against 64% (TLUSTY test nodes, SNR 50-300; a third step
# gains nothing)
VEIL_STEPS = 2
# the light is fitted only where it is measured to within this (normalised flux): the networks then see the
# spectrum with the light removed, and an uncertain amount removed moves their estimate by its noise (clean
# stars between the nodes at SNR 15-25 took light of 0.09-0.27, log g 0.2-0.4 dex off; a limit of 0.02
# left their RMSE as without the light's fit, and that of stars with 5% of it as with no limit)
VEIL_SIGMA_MAX = 0.02
# ... and only where it accounts for at least this share of the fit's excess chi^2: a misfit of another
# kind leaves most of its excess when light is fitted to it, and removing that light moves log g by several
# sigma (radial-tangential macroturbulence of 60 km/s, which no grid model has: light fitted to 16% of
# such stars, their log g 3x less accurate; with this share 5%, log g of all of them 1.09x as without the
# light's fit, while light of 5-15% of the continuum is corrected nearly as without it)
VEIL_EXCESS_SHARE = 0.2
# pixels whose emulated flux is within CONTINUUM_DEPTH of the continuum (1) are the continuum's, those
# LINE_DEPTH or more below it the lines' (`Emulator.noise_and_contrast`); either needs CONTRAST_PIXELS of
# a row, or its contrast is NaN (B stars at 4000-4800 A: a median 1 300 and 290 of 1 951 pixels; with
# fewer, the contrast's own scatter, ~sqrt(2 / n), nears its threshold)
CONTINUUM_DEPTH, LINE_DEPTH, CONTRAST_PIXELS = 0.01, 0.03, 100
# pixels this far apart make the noise chi^2's pairs: resampling onto the grid shares noise between
# neighbours (one apart, clean TLUSTY spectra read 0.84; two apart, 1.00)
NOISE_LAG = 2


class Band(NamedTuple):
    """A feature no stellar model holds that the fit looks for in the residual: its centre and FWHM
    (Angstrom, air; starting values that the fit's derivative terms move), its profile ("lorentzian"
    or "gaussian"), its window, the Angstrom each side of the centre where the search for it looks,
    and whether it is in emission (a nebular line) rather than absorption (a diffuse band)."""

    centre: float
    fwhm: float
    profile: str
    window: float
    emission: bool = False


# The diffuse interstellar bands of reddened stars at 4000-4800 A: the broad one near 4428 A, a
# Lorentzian (Snow, Zukowski & Massey 2002, ApJ 578, 877), whose terms fall below 0.4% of its depth
# beyond its window (a third of the grid and of the search's cost), and the strongest narrow ones,
# Gaussians a few Angstrom wide (Herbig 1975, ApJ 196, 129; Hobbs et al. 2009, ApJ 705, 32), whose
# windows reach a ripple's shortest period, so that the sinusoid beside them is no band.
DIBS = (Band(4428.6, 18.0, "lorentzian", 150.0), Band(4501.8, 3.0, "gaussian", RIPPLE_PERIODS[0]),
        Band(4726.8, 3.5, "gaussian", RIPPLE_PERIODS[0]), Band(4762.6, 2.5, "gaussian", RIPPLE_PERIODS[0]))
# The nebular emission lines of an H II region in the aperture (young stars in clusters, fibre surveys),
# in the cores of the star's own lines and at about its velocity: H delta, H gamma and He I 4471, the
# strongest at 4000-4800 A (He I 4471 ~0.1 of H gamma). Their FWHM is the gas's ~30 km/s within the
# instrument and the model grid's pixels (~0.55 A at R 20 000 on 0.4 A pixels); the terms' 0.65 A,
# with their first-order widening and shift, also take lines some 20 km/s from the star (chosen on
# such surveys, docs/record.md). Left in, 0.05 A of equivalent width in H gamma moved v sin i by
# several times its noise and left 13% of the rows, fast rotators, unflagged (`bench/perturbations.py`).
NEBULAR_LINES = tuple(Band(centre, 0.65, "gaussian", RIPPLE_PERIODS[0], emission=True)
                      for centre in (4101.74, 4340.47, 4471.48))
BANDS = DIBS + NEBULAR_LINES  # the bands the fit looks for, in the order of `dib_threshold`
DIB_TERMS = 3  # each band's parameters in the continuum: its depth and its first-order shift and widening
# Angstrom (air): the narrow interstellar lines of reddened stars at 4000-4800 A, CH+ and CH, tens of mA
# deep in equivalent width and unresolved at R ~20 000, so that no smooth term fits them wherever the
# cloud moves; the fit gives no weight to the pixels within ISM_HALF_WIDTH of them (a cloud within
# +-150 km/s of the star, and the instrument's profile): 1.3% of the grid.
ISM_LINES = (4232.55, 4300.31)
ISM_HALF_WIDTH = 2.5

ACTIVATIONS = {"silu": lambda a: a / (1.0 + np.exp(-a)), "relu": lambda a: np.maximum(a, 0.0),
               "tanh": np.tanh}


@dataclass(frozen=True)
class Threshold:
    """The value of a fit's statistic (its reduced chi^2, its broadening statistic) above which the row
    is flagged MODEL_MISMATCH, or of a target's epistemic sigma above which it is flagged HIGH_EPISTEMIC,
    as a function of its log10 SNR
    (the networks' feature, `kernels.features.log10_snr`) and its fitted `label`: bilinear between the
    knots, held beyond them. Where the emulator's error, not the noise, dominates (sharp lines at high
    SNR) clean spectra spread their statistics far wider than elsewhere, so one number for all rows
    either flags most of those or lets mismatches through everywhere else."""

    log_snr: tuple[float, ...]  # increasing
    label: str | None  # None: `knots` is one point and the threshold follows the SNR alone
    knots: tuple[float, ...]  # increasing values of `label`
    values: np.ndarray  # [len(log_snr), len(knots)]

    @classmethod
    def constant(cls, value: float) -> Threshold:
        """One threshold for every row."""
        return cls((0.0,), None, (0.0,), np.full((1, 1), float(value)))

    def at(self, log_snr: np.ndarray, labels: np.ndarray, names: list[str]) -> np.ndarray:
        """(B,) the threshold of rows of log10 SNR `log_snr` (B,) and `labels` (B, len(names)) (NaN
        where the label is NaN and the table has more than one knot of it)."""
        value = np.zeros(len(log_snr)) if self.label is None else labels[:, names.index(self.label)]
        by_snr = np.stack([np.interp(value, self.knots, row) for row in self.values], axis=1)
        if len(self.log_snr) == 1:
            return by_snr[:, 0]
        knots = np.asarray(self.log_snr)
        left = np.clip(np.searchsorted(knots, log_snr, side="right") - 1, 0, len(knots) - 2)
        t = np.clip((log_snr - knots[left]) / (knots[left + 1] - knots[left]), 0.0, 1.0)
        rows = np.arange(len(log_snr))
        return by_snr[rows, left] * (1.0 - t) + by_snr[rows, left + 1] * t

    @classmethod
    def from_manifest(cls, value, labels: list[str], where: str = "emulator",
                      key: str = "chi2_threshold") -> Threshold:
        """The threshold of a manifest's `key` (a number, or the table of `to_manifest`) for an emulator of
        `labels`; `ModelError` naming `where` and `key` when it is neither."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.constant(value)
        wrong = ModelError(f"{where}: {key} needs a number or a table of increasing 'log10_snr' "
                           f"knots, a 'label' among {labels}, increasing 'knots' of it and finite 'values' "
                           f"[log10_snr][knots], not {value!r}")
        try:
            log_snr, label, knots = (np.asarray(value["log10_snr"], float), value["label"],
                                     np.asarray(value["knots"], float))
            values = np.asarray(value["values"], float)
        except (TypeError, KeyError, ValueError) as exc:
            raise wrong from exc
        axes_ok = all(a.ndim == 1 and len(a) >= 1 and np.isfinite(a).all() and (np.diff(a) > 0).all()
                      for a in (log_snr, knots))
        label_ok = label in labels if label is not None else len(knots) == 1
        if not (axes_ok and label_ok and values.shape == (len(log_snr), len(knots))
                and not np.isnan(values).any()):
            raise wrong
        return cls(tuple(log_snr.tolist()), label, tuple(knots.tolist()), values)

    def to_manifest(self) -> float | dict:
        if self.label is None and len(self.log_snr) == 1:
            return float(self.values[0, 0])
        return {"log10_snr": list(self.log_snr), "label": self.label, "knots": list(self.knots),
                "values": self.values.tolist()}


class _FitRows(NamedTuple):
    """The data of some rows of `Emulator.refine`: spectra, pixel weights, continuum terms (or None),
    continuum columns (`_continuum_columns`, or None) and response excess (or None)."""

    x: np.ndarray
    weight: np.ndarray
    extra: np.ndarray | None
    columns: np.ndarray | None
    blur: np.ndarray | None


def full_step_share(size: np.ndarray) -> np.ndarray:
    """The share of the Gauss-Newton step (the rest the chord step's) in a step after the first whose
    chord step moves a row by `size` sigmas (`CHORD_STEP_MAX`): 0 up to it, rising to 1 at twice it as
    a smoothstep, whose slope is continuous too (explanations integrate the labels' gradient along a
    path of spectra); 1 where the size is not a number."""
    t = np.clip(size / CHORD_STEP_MAX - 1.0, 0.0, 1.0)
    return np.nan_to_num(t * t * (3.0 - 2.0 * t), nan=1.0)


@dataclass(frozen=True)
class Emulator:
    """Labels (physical units, in the order of `labels`) -> normalised spectrum [D] on the model grid
    `wavelength`; `sigma` [D] is its per-pixel error, added in quadrature to the noise (times, per row,
    `sigma_factor` of the row's `sigma_label`: sharp lines are harder to emulate than broad ones); a
    reduced chi^2 beyond the noise (`Fit.chi2_beyond_noise`) above `chi2_threshold` (at the row's SNR
    and fitted labels; for a row whose noise is estimated from its flux, DER_SNR,
    `chi2_threshold_estimated_noise`, as wide as that estimate errs, where there is one), a ripple
    statistic above `ripple_threshold`, a veiling statistic above `veiling_threshold`, a broadening
    statistic above `broadening_threshold` or a contrast above `contrast_threshold` flags
    MODEL_MISMATCH; a band of BANDS is fitted where its statistic passes its `dib_threshold`."""

    labels: list[str]
    layers: list[tuple[np.ndarray, np.ndarray]]  # float32 (W [in, out], b [out]); the last is linear
    activation: str
    label_mean: np.ndarray
    label_std: np.ndarray
    sigma: np.ndarray
    continuum_degree: int  # of the per-row continuum correction; -1: none
    refine_steps: int  # steps of the fit (`refine`) from the predicted labels before the chi^2
    chi2_threshold: Threshold
    wavelength: np.ndarray  # (D,) float64, Angstrom: the model grid
    ripple_threshold: float = math.inf
    dib_threshold: tuple[float, ...] = (math.inf,) * len(BANDS)  # per band of BANDS
    veiling_threshold: float = math.inf
    broadening_threshold: Threshold = field(default_factory=lambda: Threshold.constant(math.inf))
    sigma_label: str | None = None  # the label whose value scales `sigma` per row (None: no scaling)
    sigma_knots: tuple[float, ...] = ()  # values of `sigma_label`, increasing
    sigma_factors: tuple[float, ...] = ()  # sigma's factor at each knot (interpolated, held beyond)
    chi2_threshold_estimated_noise: Threshold | None = None  # None: `chi2_threshold` for every row
    contrast_threshold: Threshold = field(default_factory=lambda: Threshold.constant(math.inf))
    freer_degree: int = -1  # of the continuum where the fit cannot explain a spectrum with
    # continuum_degree's (`chi2_limit`); not above continuum_degree: never freed

    def spectra(self, labels: np.ndarray) -> np.ndarray:
        """(B, D) float32 emulated spectra at `labels` (B, len(self.labels))."""
        h = ((np.asarray(labels, np.float64) - self.label_mean) / self.label_std).astype(np.float32)
        act = ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = act(h)
        return h

    def shift(self, spectra: np.ndarray, rv: np.ndarray) -> np.ndarray:
        """(B, D) float32: `spectra` on the grid, seen from a source receding at `rv` (B,) km/s, i.e.
        f(lambda * rest_frame_factor(rv)) by cubic convolution (`doppler_shift`; the ends held beyond
        the grid)."""
        spectra = np.ascontiguousarray(spectra, np.float32)
        if not np.any(rv):  # at rest (the first Gauss-Newton step): nothing to interpolate
            return spectra.copy()
        out = np.empty_like(spectra)
        doppler_shift(spectra, self.wavelength, np.ascontiguousarray(rv, np.float64), out)
        return out

    def blur(self, spectra: np.ndarray, variance: np.ndarray | None) -> np.ndarray:
        """(B, D) float32: `spectra` seen through a Gaussian response of `variance` (B,) A^2 beyond the
        training spectra's (a row's pixels coarser than theirs, `Preprocessed.response_excess`): its
        sigma in pixels of the grid's median spacing, by `cubic_gaussian_weights` (the end pixels held
        beyond the grid). None or zeros: `spectra` as they are."""
        spectra = np.ascontiguousarray(spectra, np.float32)
        rows, weights = self.blur_weights(variance)
        if not len(rows):
            return spectra
        half, d = weights.shape[1] // 2, spectra.shape[1]
        padded = np.pad(spectra[rows], ((0, 0), (half, half)), mode="edge")
        out = spectra.copy()
        out[rows] = sum(weights[:, j:j + 1] * padded[:, j:j + d] for j in range(weights.shape[1]))
        return out

    def blur_weights(self, variance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, [rows, 2 h + 1] float32 weights) of `blur`: the rows of `variance` [B] above 0 and
        their `cubic_gaussian_weights` in pixels of the grid's median spacing."""
        rows = np.flatnonzero(np.asarray(variance) > 0) if variance is not None else np.empty(0, int)
        if not len(rows):  # the rule on the hot path: rows like the training spectra's
            return rows, np.empty((0, 0), np.float32)
        sigma = np.sqrt(np.asarray(variance, np.float64)[rows]) / float(np.median(np.diff(self.wavelength)))
        return rows, cubic_gaussian_weights(sigma).astype(np.float32)

    def sigma_factor(self, labels: np.ndarray) -> np.ndarray:
        """(B,) float32: the factor of `sigma` for rows at `labels` (B, len(self.labels)), physical
        units; 1 without a `sigma_label`."""
        labels = np.asarray(labels, np.float64)
        if self.sigma_label is None:
            return np.ones(len(labels), np.float32)
        value = labels[:, self.labels.index(self.sigma_label)]
        known = np.isfinite(value)  # a row without the label: 1
        return np.where(known, np.interp(np.where(known, value, 0.0), self.sigma_knots, self.sigma_factors),
                        1.0).astype(np.float32)

    def pixel_weight(self, ivar: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
        """float32 weights of the fit's pixels, 1 / (1 / ivar + (factor sigma)^2) (0 where ivar <= 0
        and near ISM_LINES); `factor` [B], each row's `sigma_factor` (None: 1)."""
        ivar = np.maximum(np.asarray(ivar, np.float32), 0.0) * self._off_ism_lines
        sigma = self.sigma.astype(np.float32)
        if factor is not None:
            sigma = np.asarray(factor, np.float32)[:, None] * sigma
        return ivar / (1.0 + ivar * sigma**2)

    @cached_property
    def _off_ism_lines(self) -> np.ndarray:
        """(D,) float32: 0 within ISM_HALF_WIDTH of an interstellar line of ISM_LINES, 1 elsewhere."""
        near = np.abs(self.wavelength[:, None] - np.asarray(ISM_LINES)[None, :]) <= ISM_HALF_WIDTH
        return (~near.any(axis=1)).astype(np.float32)

    def _chebyshev(self, degree: int) -> np.ndarray:
        """(D, degree + 1) float64 Chebyshev polynomials T_0 .. T_degree over the grid (none below 0)."""
        grid = np.linspace(-1.0, 1.0, len(self.wavelength))
        return np.polynomial.chebyshev.chebvander(grid, degree) if degree >= 0 else np.empty((len(grid), 0))

    @cached_property
    def continuum_basis(self) -> np.ndarray:
        """(D, continuum_degree + 1) float64 Chebyshev polynomials T_k over the grid (none below 0)."""
        return self._chebyshev(self.continuum_degree)

    @cached_property
    def _freer_columns(self) -> np.ndarray:
        """(D, q) float32: the Chebyshev terms T_k over the grid of the degrees above `continuum_degree` up
        to `freer_degree` (q = 0 where that is not above it, or without a continuum)."""
        degree = self.freer_degree if self.continuum_degree >= 0 else -1
        terms = self._chebyshev(degree)[:, self.continuum_degree + 1:]
        return np.ascontiguousarray(terms, np.float32)

    def chi2_limit(self, log_snr: np.ndarray, labels: np.ndarray,
                   noise_estimated: np.ndarray | None = None) -> np.ndarray:
        """[B] the threshold MODEL_MISMATCH tests `Fit.chi2_beyond_noise` against: `chi2_threshold` at
        each row's log10 SNR and fitted labels, and for the rows whose noise is estimated
        (`noise_estimated` [B]; None: none) `chi2_threshold_estimated_noise`, where there is one."""
        limit = self.chi2_threshold.at(log_snr, labels, self.labels)
        estimated = self.chi2_threshold_estimated_noise
        if estimated is not None and noise_estimated is not None and np.any(noise_estimated):
            limit = np.where(noise_estimated, estimated.at(log_snr, labels, self.labels), limit)
        return limit

    @cached_property
    def _ripple_frequencies(self) -> np.ndarray:
        """(F,) 1/A: the periodogram's frequencies, RIPPLE_OVERSAMPLING per 1 / (grid span)."""
        span = self.wavelength[-1] - self.wavelength[0]
        return np.arange(1.0 / RIPPLE_PERIODS[1], 1.0 / RIPPLE_PERIODS[0], 1.0 / (RIPPLE_OVERSAMPLING * span))

    def _waves(self, freq: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(sin, cos) [..., D] of `dtype`: the sinusoids of the frequencies `freq` [...], 1/A, on the grid
        (phase 0 at its first pixel, so that a wave of f + g is one of f turned by one of g)."""
        phase = 2.0 * np.pi * (self.wavelength - self.wavelength[0]) * np.asarray(freq)[..., None]
        return np.sin(phase).astype(dtype), np.cos(phase).astype(dtype)

    @cached_property
    def _ripple_waves(self) -> tuple[np.ndarray, np.ndarray]:
        """(sin, cos) float32 [F, D]: the sinusoids of the periodogram's frequencies."""
        return self._waves(self._ripple_frequencies)

    @staticmethod
    def _ripple_drops(residual: np.ndarray, weight: np.ndarray, sin: np.ndarray, cos: np.ndarray,
                      row_wave: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """[B, F] float64: the drop in the weighted chi^2 of `residual` [B, D] from fitting a sinusoid
        (amplitude and phase) at each of F frequencies, given by their `sin` and `cos` [F, D]
        (`_waves`); with `row_wave`, the (sin, cos) [B, D] of one frequency per row (`_waves`), row b's
        F frequencies are those plus its own, whose waves' sums over the pixels follow from the
        angle-addition formula as matrix products of each row's wave with the F shared ones. The sums
        in the waves' precision."""
        def sums(w, sin, cos, turn) -> tuple[np.ndarray, np.ndarray]:
            """(sum of w sin, sum of w cos) [B, F] of the waves, each turned by the row's `turn`."""
            if turn is None:
                return (w @ sin.T).astype(np.float64), (w @ cos.T).astype(np.float64)
            ws, wc = w * turn[0], w * turn[1]  # sin(x + y) = sin x cos y + cos x sin y, and cos
            return ((ws @ cos.T + wc @ sin.T).astype(np.float64),
                    (wc @ cos.T - ws @ sin.T).astype(np.float64))

        def doubled(sin, cos):  # the waves of twice the angle
            return 2.0 * sin * cos, cos * cos - sin * sin

        a, b = sums(weight * residual, sin, cos, row_wave)
        s2, c2 = sums(weight, *doubled(sin, cos), None if row_wave is None else doubled(*row_wave))
        total = weight.sum(axis=1, dtype=np.float64)[:, None]
        g11, g12, g22 = (total - c2) / 2, s2 / 2, (total + c2) / 2  # sums of w sin^2, w sin cos, w cos^2
        with np.errstate(invalid="ignore", divide="ignore"):
            drop = (g22 * a * a - 2.0 * g12 * a * b + g11 * b * b) / (g11 * g22 - g12 * g12)
        return np.nan_to_num(drop, nan=0.0, posinf=0.0)

    def ripple(self, residual: np.ndarray, weight: np.ndarray,
               chi2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((B,) float64 statistic, (B,) frequency 1/A): the largest drop in the weighted chi^2 of
        `residual` [B, D] from fitting one sinusoid (amplitude and phase) at a period within
        RIPPLE_PERIODS, divided by the reduced chi^2 `chi2` where that exceeds 1 (so noise that the
        errors understate does not pass for it), and the periodogram frequency of that drop."""
        drops = self._ripple_drops(residual, weight, *self._ripple_waves)
        best = drops.argmax(axis=1)
        statistic = drops[np.arange(len(drops)), best] / np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0)
        return statistic, self._ripple_frequencies[best]

    def ripple_frequency(self, residual: np.ndarray, weight: np.ndarray, freq: np.ndarray) -> np.ndarray:
        """(B,) 1/A: the frequency within half a periodogram step of `freq` [B] whose sinusoid removes
        the most chi^2 from `residual` [B, D], on a grid RIPPLE_REFINE times finer."""
        step = self._ripple_frequencies[1] - self._ripple_frequencies[0]
        offsets = step * np.arange(-(RIPPLE_REFINE // 2), RIPPLE_REFINE // 2 + 1) / RIPPLE_REFINE
        # in float64: the 9 frequencies' drops differ little, and with few weighted pixels float32 sums
        # pick another frequency on up to a quarter of the rows
        drops = self._ripple_drops(residual, weight, *self._waves(offsets, np.float64),
                                   row_wave=self._waves(freq, np.float64))
        return freq + offsets[drops.argmax(axis=1)]

    @cached_property
    def dib_basis(self) -> np.ndarray:
        """(D, DIB_TERMS * len(BANDS)) float32: the terms of each band of BANDS in the continuum, minus its
        profile of unit depth (so that an absorption's coefficient is its depth, > 0; an emission's < 0) and
        the profile's derivatives with respect to the centre and the half width, each times the half width."""
        terms = []
        for band in BANDS:
            u = (self.wavelength - band.centre) / (0.5 * band.fwhm)
            # slope = -(d profile / du) / 2u: the derivatives times the half width are 2u and 2u^2 times it
            if band.profile == "lorentzian":
                profile = 1.0 / (1.0 + u * u)
                slope = profile * profile
            else:
                profile = np.exp(-math.log(2.0) * u * u)
                slope = math.log(2.0) * profile
            terms += [profile, 2.0 * u * slope, 2.0 * u * u * slope]
        return -np.stack(terms, axis=1).astype(np.float32)

    def defect_columns(self, ripple: np.ndarray | None = None,
                       dib: np.ndarray | None = None) -> np.ndarray | None:
        """[B, D, q] float32: the continuum's terms beyond the polynomial for B rows, a sin + b cos of a
        ripple at the frequencies `ripple` [B], 1/A, if given (NaN: none on that row, zero columns), and
        the DIB_TERMS of each band of BANDS where `dib` [B, len(BANDS)] bool holds (zero columns
        elsewhere, whose coefficients the fit leaves at 0), if any does; None without either."""
        parts = []
        if ripple is not None:
            parts.append(np.nan_to_num(np.stack(self._waves(ripple), axis=2)))
        if dib is not None and np.any(dib):
            found = np.repeat(np.asarray(dib, np.float32), DIB_TERMS, axis=1)  # [B, terms]
            parts.append(self.dib_basis[None] * found[:, None])
        return np.concatenate(parts, axis=2) if parts else None

    def fitted(self, x: np.ndarray, weight: np.ndarray, labels: np.ndarray, rv: np.ndarray | None = None,
               extra: np.ndarray | None = None, veil: bool = False,
               blur: np.ndarray | None = None) -> np.ndarray:
        """(B, D) float32: the emulated spectra at `labels` (seen through `blur`, shifted to `rv` km/s,
        if given) times the continuum that fits x best with `weight` per pixel (`fit_continuum`)."""
        return self.fit_continuum(x, weight, labels, rv, extra, veil, blur)[0]

    def fit_continuum(self, x: np.ndarray, weight: np.ndarray, labels: np.ndarray,
                      rv: np.ndarray | None = None, extra: np.ndarray | None = None,
                      veil: bool = False, blur: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """((B, D) float32, (B, p) float32): the emulated spectra at `labels` (seen through a response of
        variance `blur` (B,) A^2 beyond the training spectra's, `Emulator.blur`, and shifted to `rv`
        km/s, if given) times the continuum that fits x best with `weight` per pixel (float32 pixels;
        the normal equations, whose sine and cosine of a long period are nearly those of the polynomial, in
        float64), and that continuum's coefficients: of a polynomial of degree `continuum_degree` in
        Chebyshev T_k over the grid, then of the terms `extra` [B, D, q] of each row
        (`defect_columns`), if given, then, with `veil`, of light without lines: a constant b added to
        the product (its coefficient, in units of the normalised flux; `Fit.veil`)."""
        e = self.blur(self.spectra(labels), blur)
        return self._times_continuum(x, weight, e if rv is None else self.shift(e, rv), extra, veil)

    def _times_continuum(self, x: np.ndarray, weight: np.ndarray, e: np.ndarray, extra: np.ndarray | None,
                         veil: bool = False, columns: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """`fit_continuum` of the emulated spectra e [B, D] as they are; `columns`: the rows'
        `_continuum_columns`, where the caller fits the same rows again and again (None: made here)."""
        polynomials = self._continuum_rows  # [p0, 1, D]
        q = 0 if extra is None else extra.shape[2]
        p = len(polynomials) + q + veil
        if p == 0:
            return e, np.empty((len(e), 0), np.float32)
        if q or veil:
            columns = self._continuum_columns(extra, veil, len(e)) if columns is None else columns
            if veil:  # the light's column 1 / e, which `normal_equations` multiplies by e
                columns[-1] = 1.0 / np.maximum(e, LIGHT_FLOOR)
        else:
            columns = polynomials
        gram, rhs = np.empty((len(e), p, p)), np.empty((len(e), p))
        normal_equations(columns, e, weight, x, gram, rhs)  # of the columns e * T_k (and e * extra)
        gram += np.eye(p) * (1e-9 * np.trace(gram, axis1=1, axis2=2) + 1e-300)[:, None, None]
        coef = np.linalg.solve(gram, rhs[..., None])[..., 0].astype(np.float32)  # (B, p)
        continuum = coef[:, :len(polynomials)] @ polynomials[:, 0]
        if q:
            continuum += np.einsum("bdq,bq->bd", extra, coef[:, len(polynomials):len(polynomials) + q])
        return e * continuum + (coef[:, -1:] if veil else 0.0), coef

    def _continuum_columns(self, extra: np.ndarray | None, veil: bool, rows: int) -> np.ndarray:
        """[p + q + veil, rows, D] float32: the continuum's columns for `normal_equations` of `rows` rows
        with terms `extra` [rows, D, q] of their own: the polynomials, those terms and, with `veil`, a
        slot for the light's column, which `_times_continuum` fills for each emulated spectrum."""
        polynomials = self._continuum_rows
        q = 0 if extra is None else extra.shape[2]
        columns = np.empty((len(polynomials) + q + veil, rows, polynomials.shape[2]), np.float32)
        columns[:len(polynomials)] = polynomials
        if q:
            columns[len(polynomials):len(polynomials) + q] = extra.transpose(2, 0, 1)
        return columns

    @cached_property
    def _continuum_rows(self) -> np.ndarray:
        """[p, 1, D] float32: `continuum_basis`'s polynomials as `normal_equations` columns for every row."""
        return np.ascontiguousarray(self.continuum_basis.T[:, None, :], np.float32)

    def band_depths(self, coef: np.ndarray) -> np.ndarray:
        """(B, DIB_TERMS * len(BANDS)) float64: the bands' coefficients, the last of a continuum's `coef`
        [B, p] (`fit_continuum` without a veil), each relative to its polynomial at the band's centre."""
        at = [np.argmin(np.abs(self.wavelength - band.centre)) for band in BANDS]
        polynomial = coef[:, :self.continuum_basis.shape[1]].astype(np.float64) @ self.continuum_basis[at].T
        return coef[:, -self.dib_basis.shape[1]:] / np.repeat(polynomial, DIB_TERMS, axis=1)

    def band(self, depths: np.ndarray) -> np.ndarray:
        """(B, D) float32: the bands' transmission on the grid, 1 + their terms times `depths`
        [B, DIB_TERMS * len(BANDS)] (`band_depths`; zeros: none)."""
        return (1.0 + np.asarray(depths, np.float32) @ self.dib_basis.T).astype(np.float32)

    def dib(self, residual: np.ndarray, weight: np.ndarray, model: np.ndarray, chi2: np.ndarray,
            freq: np.ndarray) -> np.ndarray:
        """(B, len(BANDS)) float64: for each band of BANDS, the drop in the weighted chi^2 of `residual`
        [B, D] from fitting its terms (`dib_basis`, times the fitted `model` [B, D] as the continuum is)
        to it beside a sinusoid at the periodogram's frequency nearest `freq` [B], 1/A (the residual's
        ripple, `ripple`; so that a ripple, whose troughs look like bands, is not taken for one) and, for
        a nebular line, a constant and the model (light without lines and a line shallower as a whole, so
        that neither is taken for emission in its core), less the drop from those alone, both over the
        band's window, divided by the reduced chi^2 `chi2` where that exceeds 1 (as the ripple's); 0 where
        the fitted band is not in absorption (in emission, for a band of NEBULAR_LINES). The sums in
        float32 (a statistic to compare with a threshold; the terms, unlike the polynomial's, are far from
        collinear; a nebular line's beside its constant and model less so, its Gram's condition number
        1e3-4e4: measured within 1.4e-2 of float64)."""
        nearest = np.abs(self._ripple_frequencies[None, :] - np.asarray(freq)[:, None]).argmin(axis=1)
        k, out = DIB_TERMS, np.empty((len(residual), len(BANDS)))

        def drop(gram, rhs):
            trace = np.trace(gram, axis1=1, axis2=2)
            coef = np.linalg.solve(gram + np.eye(gram.shape[1]) * (1e-9 * trace + 1e-300)[:, None, None],
                                   rhs[..., None])[..., 0]
            return (coef * rhs).sum(axis=1), coef

        for j, window in enumerate(self._dib_windows):
            sin, cos = (waves[nearest, window] for waves in self._ripple_waves)  # [B, W]
            m = model[:, window]
            v, u = weight[:, window] * m * m, weight[:, window] * m * residual[:, window]
            # the terms beside the band's, as its are, before the model multiplies them: a constant and
            # the model itself are 1 / m and 1 (a line shallower as a whole is no emission)
            beside = [sin, cos] + ([1.0 / m, np.ones_like(m)] if BANDS[j].emission else [])
            terms = self.dib_basis[window, k * j:k * (j + 1)]
            products = (terms[:, :, None] * terms[:, None, :]).reshape(len(terms), k * k)
            gram = np.empty((len(v), k + len(beside), k + len(beside)))
            gram[:, :k, :k] = (v @ products).reshape(-1, k, k)
            for a, first in enumerate(beside):
                weighted = v * first
                gram[:, :k, k + a] = weighted @ terms
                for b in range(a, len(beside)):
                    gram[:, k + a, k + b] = gram[:, k + b, k + a] = (weighted * beside[b]).sum(axis=1)
            gram[:, k:, :k] = gram[:, :k, k:].transpose(0, 2, 1)
            rhs = np.concatenate([u @ terms, np.stack([(u * b).sum(axis=1) for b in beside], axis=1)],
                                 axis=1).astype(np.float64)
            both, coef = drop(gram, rhs)
            alone, _ = drop(gram[:, k:, k:], rhs[:, k:])
            depth = -coef[:, 0] if BANDS[j].emission else coef[:, 0]
            out[:, j] = np.where(depth > 0, both - alone, 0.0)
        return out / np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0)[:, None]

    def line_shape(self, residual: np.ndarray, weight: np.ndarray, model: np.ndarray, chi2: np.ndarray,
                   jacobian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """((B,) veiling statistic, (B,) light's sigma, (B,) broadening statistic) float64, which say
        whether the fitted `model`'s [B, D] lines are shallower or wider than the spectrum's: each the
        drop in the weighted chi^2 of the fit's `residual` [B, D] (weights `weight`) from fitting it one
        column beside the fit's `jacobian` ([k, B, D], `refine`'s; its labels read light without lines
        as shallower lines and broadening as v sin i, so their steps are fitted with the column,
        linearised), less the drop from those steps alone, divided by the reduced chi^2 `chi2` where
        that exceeds 1 (as the ripple's), one-sided (`_one_sided`); both columns in one pass over the
        pixels (`_drops_beside`). Veiling: the column is light without lines (a constant added to the
        normalised spectrum: scattered light, a featureless companion's continuum) made orthogonal to
        the continuum's polynomials times `model` (what is left of it is the fitted spectrum's lines,
        each shallower by one factor); 0 where the fitted light is negative (lines deeper than the
        model's); the light's sigma from the same fit (normalised flux; widened by the reduced chi^2 as
        the labels' are). Broadening: the column is `model`'s curvature (its second difference over the
        grid's pixels; a wider Gaussian response changes a spectrum f by its variance times f'' / 2); 0
        where the fit would sharpen the lines."""
        p = len(self._continuum_rows)
        gram, rhs = np.empty((len(model), p, p)), np.empty((len(model), p))
        normal_equations(self._continuum_rows, model, weight, np.ones_like(model), gram, rhs)
        gram += np.eye(p) * (1e-9 * np.trace(gram, axis1=1, axis2=2) + 1e-300)[:, None, None]
        coef = np.linalg.solve(gram, rhs[..., None])[..., 0].astype(np.float32)
        light = 1.0 - model * (coef @ self._continuum_rows[:, 0])  # the constant, orthogonal to the continuum
        curvature = np.zeros_like(model)
        curvature[:, 1:-1] = model[:, :-2] - 2.0 * model[:, 1:-1] + model[:, 2:]
        (drop, amount, variance), (wider, broader, _) = _drops_beside([light, curvature], jacobian, weight,
                                                                      residual)
        with np.errstate(invalid="ignore"):
            sigma = np.sqrt(variance * np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0))
        return _one_sided(drop, amount, chi2), sigma, _one_sided(wider, broader, chi2)

    @cached_property
    def _dib_windows(self) -> list[slice]:
        """The pixels within each band's window of its centre."""
        return [slice(*np.searchsorted(self.wavelength, band.centre + np.array([-1.0, 1.0]) * band.window))
                for band in BANDS]

    @cached_property
    def continuum_products(self) -> np.ndarray:
        """(D, p * p) float64: the products T_i T_j of the float32 continuum basis at each pixel, so that
        the normal equations' sums over pixels are one matrix product for all rows."""
        basis = self.continuum_basis.astype(np.float32).astype(np.float64)
        return (basis[:, :, None] * basis[:, None, :]).reshape(len(basis), -1)

    def refine(self, x: np.ndarray, weight: np.ndarray, labels: np.ndarray, rv: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, extra: np.ndarray | None = None, veil: bool = False,
               blur: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(labels, rv, errors, jacobian) after `refine_steps` damped steps on the weighted
        residual of `fitted` (with the continuum terms `extra`, if given, with `veil` light without
        lines, and seen through `blur`; the continuum fitted anew at every point, so that the errors
        have it marginalised; finite-difference Jacobian) from `labels` and the residual velocity `rv`
        (km/s): the labels kept within [lo, hi] and within 1 std per step, rv within +-V_FIT_MAX. The first
        step is a Gauss-Newton step; each after it a chord step (the last Jacobian, the residual anew),
        blended with a new Gauss-Newton step where it moves the row by more than CHORD_STEP_MAX sigmas
        (`full_step_share`; the Jacobian then the new step's). errors [B, labels + 1]: the sigmas of the
        labels (physical units) and of rv (km/s) from the last Jacobian's curvature, each with the others
        marginalised (NaN without steps); jacobian [labels + 1, B, D] float32: the last one, of `fitted`
        with respect to the standardised labels and rv / V_UNIT (None without steps)."""
        k = len(self.labels)
        scale = np.append(self.label_std, V_UNIT)
        offset = np.append(self.label_mean, 0.0)
        z = np.concatenate([(np.asarray(labels, np.float64) - self.label_mean) / self.label_std,
                            np.asarray(rv, np.float64)[:, None] / V_UNIT], axis=1)
        zlo = np.append((lo - self.label_mean) / self.label_std, -V_FIT_MAX / V_UNIT)
        zhi = np.append((hi - self.label_mean) / self.label_std, V_FIT_MAX / V_UNIT)
        step_max = np.append(np.ones(k), V_STEP_MAX)
        variance = np.full((len(x), k + 1), np.nan)  # without steps

        # the continuum's columns, made once for every point the steps try (None: the polynomials')
        columns = self._continuum_columns(extra, veil, len(x)) if extra is not None or veil else None

        def data(rows) -> _FitRows:  # of `rows` (a slice or indices)
            return _FitRows(x[rows], weight[rows], None if extra is None else extra[rows],
                            None if columns is None else columns[:, rows],
                            None if blur is None else blur[rows])

        def emulated(z, d):  # unshifted
            return self.blur(self.spectra(z[:, :k] * scale[:k] + offset[:k]), d.blur)

        def fitted(e, z, d):  # e shifted to z's rv, times its continuum
            return self._times_continuum(d.x, d.weight, self.shift(e, z[:, k] * V_UNIT), d.extra, veil,
                                         d.columns)[0]

        no_scale = np.ones((1, x.shape[1]), np.float32)

        def step(jac, d, base, gram):  # (damped Gauss-Newton step, its size in sigmas); fills gram
            grad = np.empty((len(base), k + 1))
            normal_equations(jac, no_scale, d.weight, d.x - base, gram, grad)
            damped = gram + np.eye(k + 1) * (1e-3 * np.trace(gram, axis1=1, axis2=2) / (k + 1)
                                             + 1e-12)[:, None, None]
            delta = np.linalg.solve(damped, grad[..., None])[..., 0]
            with np.errstate(invalid="ignore"):
                size = np.sqrt(np.einsum("bi,bij,bj->b", delta, gram, delta))
            return np.clip(delta, -step_max, step_max), size

        jac = np.empty((k + 1, *x.shape), np.float32)
        gram = np.empty((len(x), k + 1, k + 1))
        every_row = data(slice(None))
        for n in range(self.refine_steps):
            rows, d = slice(None), every_row
            e = emulated(z, d)
            base = fitted(e, z, d)
            if n:  # a chord step (the last Jacobian, from here), and a Gauss-Newton step where it moves far
                delta, size = step(jac, d, base, np.empty((len(x), k + 1, k + 1)))
                chord, share = np.clip(z + delta, zlo, zhi), full_step_share(size)
                rows = np.flatnonzero(share > 0.0)
                d, e, base = data(rows), e[rows], base[rows]
            zr = z[rows]
            jr = jac[:, rows]  # a view of jac on the first step, else a copy, written back below
            for j in range(k + 1):
                moved = zr + STEP * np.eye(k + 1)[j]
                jr[j] = (fitted(e if j == k else emulated(moved, d), moved, d) - base) / STEP
            gr = np.empty((len(base), k + 1, k + 1))
            delta, _ = step(jr, d, base, gr)
            z[rows], gram[rows] = np.clip(zr + delta, zlo, zhi), gr
            if n:
                z = chord + share[:, None] * (z - chord)
                jac[:, rows] = jr
        if self.refine_steps:  # from the last step's curvature, undamped
            with np.errstate(invalid="ignore", divide="ignore"):
                variance = np.diagonal(np.linalg.pinv(gram), axis1=1, axis2=2) * scale**2
        phys = z * scale + offset
        # exactly within [lo, hi] (the standardised clip may round a hair off), so that a label pinned
        # at a bound is on it (Model flags OUT_OF_RANGE by that)
        return np.clip(phys[:, :k], lo, hi), phys[:, k], np.sqrt(variance), jac if self.refine_steps else None

    def _refit(self, state: tuple, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               extra: np.ndarray | None, veil: bool = False) -> np.ndarray:
        """Fit `rows` of a chunk of `chi2` again, from their labels and rv so far, with the continuum's
        terms `extra` (and with `veil` light without lines): `state`, the chunk's (x, weight, labels,
        rv, errors, model, residual, jacobian, blur), is updated in place; returns the continuum's
        coefficients."""
        x, weight, labels, rv, errors, model, residual, jac, blur = state
        blur = None if blur is None else blur[rows]
        labels[rows], rv[rows], errors[rows], again = self.refine(x[rows], weight[rows], labels[rows],
                                                                  rv[rows], lo, hi, extra, veil, blur)
        if jac is not None:
            jac[:, rows] = again
        model[rows], coef = self.fit_continuum(x[rows], weight[rows], labels[rows],
                                               rv[rows] if self.refine_steps else None, extra, veil, blur)
        residual[rows] = x[rows] - model[rows]
        return coef

    @staticmethod
    def noise_and_contrast(residual: np.ndarray, weight: np.ndarray, ivar: np.ndarray,
                           emulated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(noise chi^2, contrast) [B] of a fit's `residual`, pixel `weight` and the spectra's `ivar`
        [B, D], its lines and continuum told apart by the `emulated` spectra at the fitted labels [B, D]
        (normalised, without the fit's continuum). Continuum pixels: weight > 0 and within
        CONTINUUM_DEPTH of 1; line pixels: LINE_DEPTH or more below it. The noise chi^2: the
        mean of (r_i - r_j)^2 / (1 / ivar_i + 1 / ivar_j) over continuum pixels j = i + NOISE_LAG, what
        the residual's scatter from pixel to pixel says of the stated noise, blind to a smooth misfit
        (a continuum the fit's polynomial does not hold, the emulator's own error); the contrast: ln of
        the mean chi^2 per line pixel over that per continuum pixel (> 0 where the lines hold more of
        it). NaN with fewer than CONTRAST_PIXELS of either. One pass over each row's pixels (NumPy's
        temporaries the size of the batch cost `infer` a fifth of its rate)."""
        out = np.empty((len(residual), 2))
        _noise_and_contrast(residual, weight, ivar, emulated, NOISE_LAG, CONTINUUM_DEPTH, LINE_DEPTH,
                            CONTRAST_PIXELS, out)
        return out[:, 0], out[:, 1]

    def chi2(self, x: np.ndarray, ivar: np.ndarray, labels: np.ndarray, lo: np.ndarray | None = None,
             hi: np.ndarray | None = None, blur: np.ndarray | None = None,
             log_snr: np.ndarray | None = None, noise_estimated: np.ndarray | None = None) -> Fit:
        """The `Fit` of prepared spectra x [B, D] with inverse variances ivar: the fitted emulated
        spectra e (see `fitted`; seen through `blur` [B], if given) at `labels` and a residual velocity,
        refined within [lo, hi] (see `refine`), then again with the bands (BANDS) whose statistics
        (`dib`) pass their `dib_threshold`, then again with a ripple (and those bands) where the
        residual's ripple statistic passes `ripple_threshold`, then again with light without lines (and
        the ripple and bands) where the veiling statistic passes `veiling_threshold`, then again with
        the continuum freed up to `freer_degree` (and the ripple and bands; not beside the light) where
        the chi^2 beyond the noise passes `chi2_limit` (`noise_estimated` [B]: the rows whose noise is
        DER_SNR's; None: none) (all only if the fit has a continuum to hold them); its reduced chi^2 is
        the sum over the n pixels of weight > 0 (`pixel_weight`: ivar > 0, off ISM_LINES) of
        (x - e)^2 / (1 / ivar + (f sigma)^2), f the row's `sigma_factor` at `labels`, divided by n
        minus the fitted parameters (NaN where that is not positive). `log_snr` [B]: the rows'
        `kernels.features.log10_snr`, where the caller has it (None: computed from ivar).
        Rows are fitted in chunks (of up to CHUNK), side by side on as many threads as BLAS may use, each
        chunk's products then on one BLAS thread, where this thread may limit BLAS
        (`_one_blas_thread_each`; else one after the other): most of a fit's time goes to serial NumPy
        and Numba passes over the pixels, which BLAS's threads would otherwise wait out (each thread
        holds its chunk's Jacobian, len(labels) + 1 float32 spectra per row)."""
        lo = np.full(len(self.labels), -np.inf) if lo is None else np.asarray(lo, np.float64)
        hi = np.full(len(self.labels), np.inf) if hi is None else np.asarray(hi, np.float64)
        chi2, rv, ripple = np.empty(len(x)), np.zeros(len(x)), np.empty(len(x))
        ripple_excess, ripple_frequency, veiling = np.zeros(len(x)), np.full(len(x), np.nan), np.empty(len(x))
        broadening, noise_chi2, contrast = np.empty(len(x)), np.empty(len(x)), np.empty(len(x))
        veil, freed = np.zeros(len(x)), np.zeros(len(x), bool)
        log_snr = log10_snr(ivar) if log_snr is None else np.asarray(log_snr, np.float64)
        freer = self._freer_columns
        dib, dib_depths = np.empty((len(x), len(BANDS))), np.zeros((len(x), DIB_TERMS * len(BANDS)))
        fitted, errors = np.empty((len(x), len(self.labels))), np.empty((len(x), len(self.labels) + 1))
        n, dof = np.empty(len(x), np.int64), np.empty(len(x), np.int64)  # pixels; minus the parameters
        parameters = (self.continuum_degree + 1) + ((len(self.labels) + 1) if self.refine_steps else 0)

        def reduced(residual, weight, dof):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(dof > 0, (residual**2 * weight).sum(axis=1, dtype=np.float64) / dof, np.nan)

        factor = self.sigma_factor(labels)

        def fit_chunk(s: int) -> None:  # rows s .. s + size, in place
            part = slice(s, s + size)
            xs = x[part].astype(np.float32)
            weight = self.pixel_weight(ivar[part], factor[part])
            n[part] = (weight > 0).sum(axis=1)
            dof[part] = n[part] - parameters
            seen = None if blur is None else np.asarray(blur)[part]
            best, rv[part], errors[part], jac = self.refine(xs, weight, labels[part], rv[part], lo, hi,
                                                            blur=seen)
            shifted = rv[part] if self.refine_steps else None
            model = self.fitted(xs, weight, best, shifted, blur=seen)
            residual = xs - model
            state = (xs, weight, best, rv[part], errors[part], model, residual, jac, seen)  # chunk views
            chi2[part] = reduced(residual, weight, dof[part])
            ripple[part], freq = self.ripple(residual, weight, chi2[part])
            dib[part] = self.dib(residual, weight, model, chi2[part], freq)
            band = (dib[part] > np.asarray(self.dib_threshold)) & (self.continuum_degree >= 0)
            rows = np.flatnonzero(band.any(axis=1))
            if len(rows):  # fit the bands found too (in the continuum), from the labels and rv without them
                at = s + rows
                coef = self._refit(state, rows, lo, hi, self.defect_columns(dib=band[rows]))
                dib_depths[at] = self.band_depths(coef)
                dof[at] -= DIB_TERMS * band[rows].sum(axis=1)
                chi2[at] = reduced(residual[rows], weight[rows], dof[at])
                ripple[at], freq[rows] = self.ripple(residual[rows], weight[rows], chi2[at])
            with np.errstate(invalid="ignore"):
                rows = np.flatnonzero((ripple[part] > self.ripple_threshold) & (self.continuum_degree >= 0))
            if len(rows):  # fit the ripple too (in the continuum), from the labels and rv without it
                at = s + rows
                ripple_frequency[at] = self.ripple_frequency(residual[rows], weight[rows], freq[rows])
                coef = self._refit(state, rows, lo, hi, self.defect_columns(ripple_frequency[at], band[rows]))
                banded = band[rows].any(axis=1)
                if banded.any():
                    dib_depths[at[banded]] = self.band_depths(coef[banded])
                dof[at] -= RIPPLE_TERMS + 1
                plain, chi2[at] = chi2[at], reduced(residual[rows], weight[rows], dof[at])
                ripple_excess[at] = np.maximum(chi2_excess(plain) - chi2_excess(chi2[at]), 0.0)
            shape = self.line_shape(residual, weight, model, chi2[part], jac)
            veiling[part], light_sigma, broadening[part] = shape
            with np.errstate(invalid="ignore"):
                drop = veiling[part] * np.maximum(np.nan_to_num(chi2[part], nan=1.0), 1.0)  # in chi^2
                fits_light = ((veiling[part] > self.veiling_threshold) & (light_sigma < VEIL_SIGMA_MAX)
                              & (drop >= VEIL_EXCESS_SHARE * chi2_excess(chi2[part]) * dof[part]))
                rows = np.flatnonzero(fits_light & (self.continuum_degree >= 0))
            if len(rows):  # fit the light too, from the labels and rv without it (with the ripple and bands)
                at = s + rows
                rippled = np.isfinite(ripple_frequency[at])
                extra = self.defect_columns(ripple_frequency[at] if rippled.any() else None, band[rows])
                for _ in range(VEIL_STEPS):
                    coef = self._refit(state, rows, lo, hi, extra, veil=True)
                veil[at] = coef[:, -1]
                banded = band[rows].any(axis=1)
                if banded.any():
                    dib_depths[at[banded]] = self.band_depths(coef[banded, :-1])
                dof[at] -= 1
                chi2[at] = reduced(residual[rows], weight[rows], dof[at])
            emulated = self.blur(self.spectra(best), seen)  # as fitted, without its continuum
            if shifted is not None:
                emulated = self.shift(emulated, shifted)
            noise_chi2[part], contrast[part] = self.noise_and_contrast(residual, weight, ivar[part], emulated)
            rows = []
            if freer.shape[1]:
                with np.errstate(invalid="ignore"):
                    unexplained = beyond_noise(chi2[part], noise_chi2[part]) > self.chi2_limit(
                        log_snr[part], best, None if noise_estimated is None else noise_estimated[part])
                rows = np.flatnonzero(unexplained & (veil[part] == 0))
            if len(rows):  # free the continuum, from the labels and rv so far (with the ripple and bands)
                at = s + rows
                rippled = np.isfinite(ripple_frequency[at])
                defects = self.defect_columns(ripple_frequency[at] if rippled.any() else None, band[rows])
                extra = np.broadcast_to(freer, (len(rows), *freer.shape))
                if defects is not None:
                    extra = np.concatenate([extra, defects], axis=2)
                extra = np.ascontiguousarray(extra)
                coef = self._refit(state, rows, lo, hi, extra)
                banded = band[rows].any(axis=1)
                if banded.any():
                    dib_depths[at[banded]] = self.band_depths(coef[banded])
                dof[at] -= freer.shape[1]
                chi2[at] = reduced(residual[rows], weight[rows], dof[at])
                emulated = self.blur(self.spectra(best[rows]), None if seen is None else seen[rows])
                if shifted is not None:
                    emulated = self.shift(emulated, shifted[rows])
                noise_chi2[at], contrast[at] = self.noise_and_contrast(residual[rows], weight[rows], ivar[at],
                                                                       emulated)
                freed[at] = True
            fitted[part] = best

        threads = _blas_threads()
        size = min(CHUNK, -(-len(x) // threads))  # every thread gets rows
        starts = range(0, len(x), max(size, 1))
        with _one_blas_thread_each(min(threads, len(starts))) as workers:
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(fit_chunk, starts))
            else:
                for s in starts:
                    fit_chunk(s)
        # the curvature's sigmas assume the model explains the spectrum; where it does not, widen them
        errors *= np.sqrt(np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0))[:, None]
        explained = np.isfinite(chi2)[:, None]
        return Fit(chi2=chi2, pixels=n.astype(np.int32), rv=rv, rv_err=np.hypot(errors[:, -1], RV_SYSTEMATIC),
                   ripple=np.where(explained[:, 0], ripple, np.nan), ripple_excess=ripple_excess,
                   dib=np.where(explained, dib, np.nan), dib_depths=dib_depths,
                   ripple_frequency=ripple_frequency, veiling=np.where(explained[:, 0], veiling, np.nan),
                   broadening=np.where(explained[:, 0], broadening, np.nan),
                   noise_chi2=np.where(explained[:, 0], noise_chi2, np.nan),
                   contrast=np.where(explained[:, 0], contrast, np.nan), veil=veil,
                   veil_var=np.zeros_like(fitted), labels=np.where(explained, fitted, np.nan),
                   label_err=np.where(explained, errors[:, :-1], np.nan), sigma_factor=factor,
                   log_snr=log_snr, freed=freed)


@dataclass(frozen=True)
class Fit:
    """The emulator's fit of B prepared spectra: reduced chi^2 (float64, NaN where there are too few
    pixels), pixels used (int32), the residual radial velocity rv and its sigma rv_err (km/s,
    RV_SYSTEMATIC included; rv 0 and rv_err NaN when the emulator does not refine), the ripple
    statistic of the fit without a ripple (`Emulator.ripple`; with the bands where any was fitted; NaN
    with the chi^2), the excess reduced chi^2 that fitting the ripple removed and the ripple's
    frequency (1/A; 0 and NaN where none was fitted), the veiling statistic of the fit without light
    without lines (`Emulator.line_shape`; NaN with the chi^2) and the light fitted where it passes
    `veiling_threshold` (b: the spectrum is its continuum times the emulated one plus b, in units of the
    normalised flux; 0 elsewhere; `Model.predict` removes it from the spectrum, as the bands, and
    keeps the b it removed here, and the variance not knowing it adds to each label [B, len(labels)]:
    the fit's label variances with the light free less those of the spectrum it was removed from; 0
    here), the broadening statistic of the fit without the light (`Emulator.line_shape`; NaN with the
    chi^2), the noise's chi^2 from the continuum's scatter and the contrast of the lines' chi^2 against
    the continuum's (`Emulator.noise_and_contrast`; NaN with the chi^2), the statistics of the bands
    (BANDS) of the fit without them (`Emulator.dib`, [B, len(BANDS)]; NaN with the chi^2) and the terms of
    those fitted (`Emulator.band_depths`, [B, DIB_TERMS * len(BANDS)], each band's first its depth; 0
    elsewhere; `Model.predict` removes the bands from the spectrum and fits it again, and keeps the
    terms it removed here), the fitted labels
    [B, len(labels)] (physical units; the starting labels when the emulator does not refine; NaN with
    the chi^2) and their sigmas from the fit's curvature, widened like rv_err's (NaN without refining
    or chi^2), the factor of the emulator's sigma in each row's pixel weights
    (`Emulator.sigma_factor` of the starting labels), each row's log10 SNR (`log10_snr` of its
    ivar, as the networks see it) and whether the fit freed its continuum up to the emulator's
    `freer_degree` (it could not explain the spectrum with the polynomial alone). Where a band, a
    ripple or the freer continuum was fitted, the chi^2, rv and labels are those of the fit with them."""

    chi2: np.ndarray
    pixels: np.ndarray
    rv: np.ndarray
    rv_err: np.ndarray
    ripple: np.ndarray
    ripple_excess: np.ndarray
    ripple_frequency: np.ndarray
    veiling: np.ndarray
    broadening: np.ndarray
    noise_chi2: np.ndarray
    contrast: np.ndarray
    veil: np.ndarray
    veil_var: np.ndarray
    dib: np.ndarray
    dib_depths: np.ndarray
    labels: np.ndarray
    label_err: np.ndarray
    sigma_factor: np.ndarray
    log_snr: np.ndarray
    freed: np.ndarray

    def rows(self, rows: np.ndarray) -> Fit:
        """The fit of `rows` (indices or a mask) alone."""
        return Fit(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @property
    def excess(self) -> np.ndarray:
        """(B, 2) the parts of `calibration.EXCESS_PARTS` of the excess reduced chi^2 (`chi2_excess`) of
        the fit without a ripple: what fitting a continuum ripple removed from it and what is left,
        the excess of the fit with the ripple (0 where the chi^2 is NaN)."""
        return np.stack([self.ripple_excess, chi2_excess(self.chi2)], axis=1)  # in the order of EXCESS_PARTS

    def dib_fitted(self, emulator: Emulator) -> np.ndarray:
        """[B, len(BANDS)] bool: the bands each row's fit holds (their statistics above the emulator's
        thresholds)."""
        with np.errstate(invalid="ignore"):
            return (self.dib > np.asarray(emulator.dib_threshold)) & (emulator.continuum_degree >= 0)

    def excess_contrast(self, noise_estimated: np.ndarray | None = None) -> np.ndarray:
        """[B] the contrast MODEL_MISMATCH tests: its size, and for the rows whose noise is estimated
        (`noise_estimated` [B]; None: none) its excess in the lines alone (one noise level per row,
        DER_SNR's, overstates photon noise in the lines, which then read a deficit)."""
        if noise_estimated is None:
            return np.abs(self.contrast)
        return np.where(noise_estimated, self.contrast, np.abs(self.contrast))

    @property
    def chi2_beyond_noise(self) -> np.ndarray:
        """[B] the reduced chi^2 over the noise's (`noise_chi2`) where that is above 1 (by as much as
        the spectrum's own scatter says flux_err understates its noise), as is where it is NaN: what
        MODEL_MISMATCH tests."""
        return beyond_noise(self.chi2, self.noise_chi2)

    def chi2_limit(self, emulator: Emulator, noise_estimated: np.ndarray | None = None) -> np.ndarray:
        """[B] the threshold MODEL_MISMATCH tests `chi2_beyond_noise` against: the emulator's chi^2
        threshold at each row's SNR and fitted labels, and for the rows whose noise is estimated
        (`noise_estimated` [B]; None: none) the emulator's threshold for those."""
        return emulator.chi2_limit(self.log_snr, self.labels, noise_estimated)

    def misfit(self, emulator: Emulator, noise_estimated: np.ndarray | None = None) -> np.ndarray:
        """[B] how far the chi^2 beyond the noise passes its MODEL_MISMATCH threshold (`chi2_limit`); 0
        below it and where the fit gives none: a misfit clean spectra do not show, which the
        calibration's `chi2_inflation` widens the sigmas for."""
        with np.errstate(invalid="ignore"):
            excess = self.chi2_beyond_noise - self.chi2_limit(emulator, noise_estimated)
        return np.nan_to_num(np.maximum(excess, 0.0))

    def broadened(self, emulator: Emulator) -> np.ndarray:
        """[B] bool: the broadening statistic above the emulator's threshold at each row's SNR and fitted
        labels: the lines are broader than rotation makes them (macroturbulence, an instrument broader
        than the model's), so the rotation read from their width is an upper bound."""
        with np.errstate(invalid="ignore"):  # NaN (no statistic) compares False
            return self.broadening > emulator.broadening_threshold.at(self.log_snr, self.labels,
                                                                      emulator.labels)

    def mismatch(self, emulator: Emulator, noise_estimated: np.ndarray | None = None) -> np.ndarray:
        """MODEL_MISMATCH: the chi^2 beyond the noise (`chi2_beyond_noise`) above its threshold
        (`chi2_limit`), the continuum freed (`freed`: so was the chi^2 with the polynomial alone), or
        the ripple, veiling, broadening statistic or the contrast above the emulator's threshold (at
        each row's SNR and fitted labels where it follows them)."""
        with np.errstate(invalid="ignore"):
            return ((self.misfit(emulator, noise_estimated) > 0) | self.freed
                    | (self.ripple > emulator.ripple_threshold)
                    | (self.veiling > emulator.veiling_threshold) | self.broadened(emulator)
                    | (self.excess_contrast(noise_estimated) > emulator.contrast_threshold.at(
                        self.log_snr, self.labels, emulator.labels)))


def beyond_noise(chi2: np.ndarray, noise_chi2: np.ndarray) -> np.ndarray:
    """The reduced chi^2 over the noise's chi^2 where that is above 1, as is where it is NaN
    (`Fit.chi2_beyond_noise`)."""
    return chi2 / np.maximum(np.nan_to_num(noise_chi2, nan=1.0), 1.0)


@njit(cache=True, nogil=True)
def _noise_and_contrast(residual, weight, ivar, emulated, lag, continuum_depth, line_depth, least, out):
    """`Emulator.noise_and_contrast` into out [B, 2], a row at a time, sums in float64. Serial and
    without the GIL, as `kernels.lstsq.normal_equations`: `Emulator.chi2` runs chunks on threads."""
    for b in range(residual.shape[0]):
        chi_c = chi_l = steps = 0.0
        n_c = n_l = pairs = 0
        for p in range(residual.shape[1]):
            if weight[b, p] <= 0.0:
                continue
            r = np.float64(residual[b, p])
            depth = 1.0 - emulated[b, p]
            if abs(depth) < continuum_depth:
                chi_c += r * r * weight[b, p]
                n_c += 1
                q = p - lag
                if q >= 0 and weight[b, q] > 0.0 and abs(1.0 - emulated[b, q]) < continuum_depth:
                    step = r - residual[b, q]
                    steps += step * step / (1.0 / ivar[b, p] + 1.0 / ivar[b, q])
                    pairs += 1
            elif depth >= line_depth:
                chi_l += r * r * weight[b, p]
                n_l += 1
        out[b, 0] = steps / pairs if pairs >= least else np.nan
        out[b, 1] = np.log((chi_l / n_l) / (chi_c / n_c)) if n_l >= least and n_c >= least else np.nan


_BLAS_LIMIT = threading.Lock()  # held by the one fit that limits BLAS (a limit is process-wide)


@cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded when first asked (NumPy's, SciPy's), whose threads `Emulator.chi2`
    reads and limits."""
    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """The threads BLAS may use now (the caller's budget: `pipeline.thread_budget`)."""
    return max((c.num_threads for c in _blas().lib_controllers), default=1)


@contextmanager
def _one_blas_thread_each(threads: int):
    """Yields the threads a fit may run its chunks on: `threads`, with BLAS on one thread while the
    context lasts, where this thread may set BLAS's limit and no other fit has set it; else 1, BLAS
    as it was. (With BLAS's own thread pool threadpoolctl lets one thread, the first to set a limit,
    set it: `starcast run` sets it in its inference thread for this reason. Chunk threads that each
    ran BLAS on several threads would be slower than one after the other.)"""
    if threads < 2 or not _BLAS_LIMIT.acquire(blocking=False):
        yield 1
        return
    try:
        with _blas().limit(limits=1):
            yield threads if _blas_threads() == 1 else 1
    finally:
        _BLAS_LIMIT.release()


def _drops_beside(columns: list[np.ndarray], jacobian: np.ndarray | None, weight: np.ndarray,
                  residual: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per column of `columns` ([B, D] each): ((B,) drop, (B,) coefficient, (B,) its variance), the drop
    in the weighted chi^2 of `residual` [B, D] (weights `weight`) from fitting it that column beside the
    `jacobian`'s columns ([k, B, D]; None: none), less the drop from those alone; the column's
    coefficient and its variance from the fit with both (in the column's units; each fit ridged by 1e-9
    of its trace, as the continuum's). The sums over pixels of all columns in one pass."""
    k = 0 if jacobian is None else len(jacobian)
    stacked = np.empty((k + len(columns), *residual.shape), np.float32)
    if k:
        stacked[:k] = jacobian
    for i, column in enumerate(columns, start=k):  # in place: the list as an array would be a copy
        stacked[i] = column
    n = len(stacked)
    everything, sums = np.empty((len(residual), n, n)), np.empty((len(residual), n))
    normal_equations(stacked, np.ones((1, residual.shape[1]), np.float32), weight, residual, everything, sums)
    out = []
    for i in range(k, n):
        at = [*range(k), i]
        gram, rhs = everything[:, at][:, :, at], sums[:, at]
        ridge = np.eye(k + 1) * (1e-9 * np.trace(gram, axis1=1, axis2=2) + 1e-300)[:, None, None]
        inverse = np.linalg.inv(gram + ridge)
        coef = (inverse @ rhs[..., None])[..., 0]
        steps = np.linalg.solve(gram[:, :-1, :-1] + ridge[:, :-1, :-1], rhs[:, :-1, None])[..., 0]
        drop = (coef * rhs).sum(axis=1) - (steps * rhs[:, :-1]).sum(axis=1)
        out.append((drop, coef[:, -1], inverse[:, -1, -1]))
    return out


def _one_sided(drop: np.ndarray, coefficient: np.ndarray, chi2: np.ndarray) -> np.ndarray:
    """(B,) float64: a statistic from `_drops_beside`'s `drop` and `coefficient`: the drop where the
    coefficient is positive (0 elsewhere and where it is not finite), divided by the reduced chi^2
    `chi2` where that exceeds 1."""
    statistic = np.nan_to_num(np.where(coefficient > 0, drop, 0.0), nan=0.0, posinf=0.0)
    return statistic / np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0)


def save_emulator(path: str | Path, layers: list[tuple], sigma: np.ndarray, entry: dict) -> dict:
    """Write `emulator.safetensors` into the bundle directory `path`; returns `entry` (hidden,
    activation, labels, label_mean, label_std, chi2_threshold, ...) completed with `file` and
    `sha256`, for the manifest's `emulator` key."""
    tensors = {f"layers.{i}.{kind}": np.ascontiguousarray(a, np.float32)
               for i, (w, b) in enumerate(layers) for kind, a in (("weight", w), ("bias", b))}
    tensors["sigma"] = np.ascontiguousarray(sigma, np.float32)
    blob = save_safetensors(tensors)
    Path(path, EMULATOR_FILE).write_bytes(blob)
    return {**entry, "file": EMULATOR_FILE, "sha256": hashlib.sha256(blob).hexdigest()}


def load_emulator(path: Path, entry: dict, wavelength: np.ndarray) -> Emulator:
    """The emulator of the bundle at `path` described by its manifest `entry`, for the model grid
    `wavelength` (D pixels). Raises `ModelError` when the entry, the file's sha256 or its shapes are
    wrong."""
    dim = len(wavelength)
    where = f"model bundle {path}: emulator"
    lacks = [k for k in ENTRY_KEYS if k not in entry]
    if lacks:
        raise ModelError(f"{where}: the manifest's 'emulator' entry lacks {lacks}")
    if entry["activation"] not in ACTIVATIONS:
        raise ModelError(f"{where}: unknown activation {entry['activation']!r} "
                         f"(known: {sorted(ACTIVATIONS)})")
    file = path / entry["file"]
    if not file.is_file():
        raise ModelError(f"{where}: {entry['file']} is missing (re-run `python -m starcast.trainers.emulator "
                         "CONFIG BUNDLE` or remove the manifest's 'emulator' entry)")
    blob = file.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry["sha256"]:
        raise ModelError(f"{where}: sha256 of {entry['file']} is {digest}, but the manifest expects "
                         f"{entry['sha256']}; the file was modified or belongs to another model")
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:
        raise ModelError(f"{where}: {entry['file']} is not a valid safetensors file ({exc})") from exc
    widths = [len(entry["labels"]), *entry["hidden"], dim]
    layers = [(tensors.get(f"layers.{i}.weight"), tensors.get(f"layers.{i}.bias"))
              for i in range(len(widths) - 1)]
    shapes_ok = all(w is not None and b is not None and w.shape == (widths[i], widths[i + 1])
                    and b.shape == (widths[i + 1],) for i, (w, b) in enumerate(layers))
    sigma_ok = tensors.get("sigma", np.empty(0)).shape == (dim,)
    if not shapes_ok or not sigma_ok or len(tensors) != 2 * len(layers) + 1:
        raise ModelError(f"{where}: {entry['file']} does not hold layers of widths {widths} and a sigma of "
                         f"{dim} pixels (it holds {sorted(tensors)})")
    return Emulator(labels=list(entry["labels"]), layers=layers, activation=entry["activation"],
                    label_mean=np.asarray(entry["label_mean"], np.float64),
                    label_std=np.asarray(entry["label_std"], np.float64), sigma=tensors["sigma"],
                    continuum_degree=int(entry["continuum_degree"]), refine_steps=int(entry["refine_steps"]),
                    chi2_threshold=Threshold.from_manifest(entry["chi2_threshold"], entry["labels"],
                                                               where),
                    wavelength=np.asarray(wavelength, np.float64),
                    ripple_threshold=float(entry.get("ripple_threshold", math.inf)),
                    veiling_threshold=float(entry.get("veiling_threshold", math.inf)),
                    broadening_threshold=Threshold.from_manifest(entry.get("broadening_threshold", math.inf),
                                                                 entry["labels"], where,
                                                                 key="broadening_threshold"),
                    dib_threshold=_dib_thresholds(entry.get("dib_threshold"), where),
                    chi2_threshold_estimated_noise=_estimated_noise_threshold(entry, where),
                    contrast_threshold=_contrast_threshold(entry, where),
                    freer_degree=int(entry.get("freer_degree", -1)),
                    **_sigma_scaling(entry.get("sigma_scaling"), entry["labels"], where))


def _sigma_scaling(value, labels: list[str], where: str) -> dict:
    """The `Emulator` fields of the manifest's `sigma_scaling` (absent: none)."""
    if value is None:
        return {}
    wrong = ModelError(f"{where}: sigma_scaling needs a label among {labels}, increasing knots and as many "
                       f"factors > 0, not {value!r}")
    try:
        label, knots, factors = (value["label"], np.asarray(value["knots"], float),
                                 np.asarray(value["factors"], float))
    except (TypeError, KeyError, ValueError) as exc:
        raise wrong from exc
    if (label not in labels or knots.ndim != 1 or len(knots) < 1 or knots.shape != factors.shape
            or not np.all(np.isfinite(knots)) or np.any(np.diff(knots) <= 0)
            or not np.all(np.isfinite(factors) & (factors > 0))):
        raise wrong
    return {"sigma_label": label, "sigma_knots": tuple(knots.tolist()),
            "sigma_factors": tuple(factors.tolist())}


def _estimated_noise_threshold(entry: dict, where: str) -> Threshold | None:
    """The manifest's optional `chi2_threshold_estimated_noise` (absent or null: None)."""
    key = "chi2_threshold_estimated_noise"
    return None if entry.get(key) is None else Threshold.from_manifest(entry[key], entry["labels"], where,
                                                                           key)


def _contrast_threshold(entry: dict, where: str) -> Threshold:
    """The manifest's optional `contrast_threshold` (absent or null: never)."""
    value = entry.get("contrast_threshold")
    return Threshold.constant(math.inf) if value is None else Threshold.from_manifest(
        value, entry["labels"], where, "contrast_threshold")


def _dib_thresholds(value, where: str) -> tuple[float, ...]:
    """The thresholds of the manifest's `dib_threshold`, one per band of BANDS (absent: no band search)."""
    if value is None:
        return (math.inf,) * len(BANDS)
    if not isinstance(value, list) or len(value) != len(BANDS):
        raise ModelError(f"{where}: dib_threshold must list one threshold per band "
                         f"{[band.centre for band in BANDS]}, not {value!r} (recalibrate with "
                         "`python -m starcast.trainers.emulator CONFIG BUNDLE --calibrate-only`)")
    return tuple(float(v) for v in value)
