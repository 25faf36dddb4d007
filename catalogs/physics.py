"""Line physics of the synthetic OB-star generator: line list, Voigt profiles, rotation and instrument.

An approximation, not a model atmosphere (no TLUSTY/SYNSPEC radiative transfer): each line is an
optical depth `tau = W * V(dl; sigma, gamma)` with an area-normalised Voigt profile `V` and a strength
`W(Teff, log g)` (Angstrom) that follows smooth, plausible trends; the normalised spectrum is
`exp(-sum tau)`. Wavelengths are in Angstrom (air, as in the usual laboratory line lists), velocities
in km/s. Broadening kernels follow Gray, "The Observation and Analysis of Stellar Photospheres".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy.special import erf

C_KMS = 299792.458  # speed of light in km/s (CODATA, exact)
K_B = 1.380649e-23  # Boltzmann constant, J/K (CODATA, exact)
AMU = 1.66053906660e-27  # atomic mass unit, kg (CODATA 2018)
MICROTURBULENCE_KMS = 5.0  # typical of B dwarfs (e.g. Nieva & Przybilla 2012, A&A 539, A143)

# Shapes of the Teff trend of a line's strength (see `line_strengths`).
POWER, GAUSS, LOGISTIC, DECAY = 0, 1, 2, 3


@dataclass(frozen=True)
class Line:
    """One absorption line: rest wavelength (A, air), ion mass (amu) and its strength law.

    Strength `W = w0 * 10**(g_exp * (logg - 4)) * shape(Teff; p1, p2)` in Angstrom, where shape is
    POWER `(Teff/20000)**-p1`, GAUSS `exp(-((Teff-p1)/p2)**2/2)`, LOGISTIC `1/(1+exp(-(Teff-p1)/p2))`
    or DECAY `exp(-(Teff-p1)/p2)`. Pressure (Lorentz) half width `gamma = gamma0 * 10**(0.5*(logg-4))`
    (A): Stark widths grow with electron density, which grows with surface gravity.
    """

    name: str
    wavelength: float
    mass: float
    w0: float
    shape: int
    p1: float
    p2: float
    g_exp: float
    gamma0: float
    window: float  # half width (A) over which the line is computed


# Strengths are tuned by eye to published OB-star equivalent widths (e.g. Didelon 1982, A&AS 50, 199;
# Walborn & Fitzpatrick 1990, PASP 102, 379 for which lines dominate at which spectral type).
LINES: tuple[Line, ...] = (
    Line("H delta", 4101.734, 1.008, 6.0, POWER, 1.5, 0.0, 0.25, 3.5, 120.0),
    Line("H gamma", 4340.462, 1.008, 6.5, POWER, 1.5, 0.0, 0.25, 3.5, 120.0),
    Line("He I 4026", 4026.191, 4.003, 0.90, GAUSS, 22000.0, 5500.0, 0.10, 0.15, 12.0),
    Line("He I 4144", 4143.761, 4.003, 0.45, GAUSS, 22000.0, 5500.0, 0.10, 0.10, 10.0),
    Line("He I 4388", 4387.929, 4.003, 0.65, GAUSS, 22000.0, 5500.0, 0.10, 0.15, 12.0),
    Line("He I 4471", 4471.480, 4.003, 1.10, GAUSS, 22000.0, 5500.0, 0.10, 0.15, 12.0),
    Line("He II 4200", 4199.830, 4.003, 0.40, LOGISTIC, 31000.0, 1500.0, 0.0, 0.10, 10.0),
    Line("He II 4541", 4541.590, 4.003, 0.50, LOGISTIC, 31000.0, 1500.0, 0.0, 0.10, 10.0),
    Line("He II 4686", 4685.710, 4.003, 0.80, LOGISTIC, 31000.0, 1500.0, -0.10, 0.10, 10.0),
    Line("Mg II 4481", 4481.130, 24.305, 0.55, DECAY, 15000.0, 6000.0, -0.05, 0.03, 6.0),
    Line("Si III 4553", 4552.622, 28.086, 0.30, GAUSS, 23000.0, 3500.0, -0.20, 0.03, 6.0),
    Line("Si III 4568", 4567.840, 28.086, 0.25, GAUSS, 23000.0, 3500.0, -0.20, 0.03, 6.0),
    Line("Si III 4575", 4574.757, 28.086, 0.15, GAUSS, 23000.0, 3500.0, -0.20, 0.03, 6.0),
    Line("Si IV 4089", 4088.862, 28.086, 0.45, LOGISTIC, 28000.0, 1800.0, -0.20, 0.03, 6.0),
    Line("Si IV 4116", 4116.104, 28.086, 0.35, LOGISTIC, 28000.0, 1800.0, -0.20, 0.03, 6.0),
    Line("C II 4267", 4267.260, 12.011, 0.25, GAUSS, 18000.0, 4000.0, -0.10, 0.03, 6.0),
)

# The same table as float64 columns, passed to the compiled kernels as an argument: Numba's on-disk
# cache does not notice edits to globals or to functions in other files, so data must not be baked in
# (after editing a compiled function here, delete catalogs/__pycache__ to refresh synth's kernel).
LINE_TABLE = np.array([[ln.wavelength, ln.mass, ln.w0, ln.shape, ln.p1, ln.p2, ln.g_exp, ln.gamma0,
                         ln.window] for ln in LINES], dtype=np.float64)


def line_index(name: str) -> int:
    """Position of a line in `LINES` by name (e.g. "He I 4471")."""
    for i, ln in enumerate(LINES):
        if ln.name == name:
            return i
    raise KeyError(f"no line named {name!r}; known: {[ln.name for ln in LINES]}")


@numba.njit(cache=True)
def _strength(row, teff, logg):
    shape, p1, p2 = int(row[3]), row[4], row[5]
    if shape == POWER:
        s = (teff / 20000.0) ** (-p1)
    elif shape == GAUSS:
        s = math.exp(-0.5 * ((teff - p1) / p2) ** 2)
    elif shape == LOGISTIC:
        s = 1.0 / (1.0 + math.exp(-(teff - p1) / p2))
    else:
        s = math.exp(-(teff - p1) / p2)
    return row[2] * 10.0 ** (row[6] * (logg - 4.0)) * s


def line_strengths(teff: float, logg: float) -> np.ndarray:
    """Optically thin strengths W (A) of every line in `LINES` at (Teff [K], log g [cgs dex])."""
    return np.array([_strength(LINE_TABLE[i], float(teff), float(logg)) for i in range(len(LINES))])


@numba.njit(cache=True)
def _faddeeva_real(x, y):
    # Re w(x + iy), Humlicek (1982), JQSRT 27, 437, algorithm W4 (relative error < 1e-4), y > 0.
    t = complex(y, -x)
    s = abs(x) + y
    if s >= 15.0:
        w = t * 0.5641896 / (0.5 + t * t)
    elif s >= 5.5:
        u = t * t
        w = t * (1.410474 + u * 0.5641896) / (0.75 + u * (3.0 + u))
    elif y >= 0.195 * abs(x) - 0.176:
        w = ((16.4955 + t * (20.20933 + t * (11.96482 + t * (3.778987 + t * 0.5642236))))
             / (16.4955 + t * (38.82363 + t * (39.27121 + t * (21.69274 + t * (6.699398 + t))))))
    else:
        u = t * t
        num = t * (36183.31 - u * (3321.9905 - u * (1540.787 - u * (219.0313 - u * (
            35.76683 - u * (1.320522 - u * 0.56419))))))
        den = 32066.6 - u * (24322.84 - u * (9022.228 - u * (2186.181 - u * (364.2191 - u * (
            61.57037 - u * (1.841439 - u))))))
        w = np.exp(u) - num / den
    return w.real


@numba.njit(cache=True)
def voigt(dl, sigma, gamma):
    """Area-normalised Voigt profile (1/A) at offset `dl` (A): Gaussian sigma, Lorentzian half width gamma.

    V = Re w(z) / (sigma sqrt(2 pi)), z = (dl + i gamma) / (sigma sqrt 2) (e.g. Gray, ch. 11).
    """
    r = 1.0 / (sigma * math.sqrt(2.0))
    return _faddeeva_real(dl * r, max(gamma * r, 1e-12)) * r / math.sqrt(math.pi)


@numba.njit(cache=True)
def add_line_opacity(lines, lam, teff, logg, micro_kms, tau):
    """Add the optical depth of every line of `lines` (`LINE_TABLE`) at rest wavelengths `lam` (A) to `tau`.

    Each line is computed within its window and its value at the window edge subtracted, so that the
    truncated wings join the continuum without a step.
    """
    n = lam.shape[0]
    for i in range(lines.shape[0]):
        row = lines[i]
        lam0, mass, window = row[0], row[1], row[8]
        w = _strength(row, teff, logg)
        # Doppler width b = sqrt(2kT/m + xi^2); Gaussian sigma = lam0 * b / (c sqrt 2) (Gray, ch. 11).
        b = math.sqrt(2.0 * K_B * teff / (mass * AMU) * 1e-6 + micro_kms * micro_kms)
        sigma = lam0 * b / (C_KMS * math.sqrt(2.0))
        gamma = row[7] * 10.0 ** (0.5 * (logg - 4.0))
        edge = voigt(window, sigma, gamma)
        lo = np.searchsorted(lam, lam0 - window)
        hi = np.searchsorted(lam, lam0 + window)
        for k in range(lo, min(hi, n)):
            v = voigt(lam[k] - lam0, sigma, gamma) - edge
            if v > 0.0:
                tau[k] += w * v


def rotation_profile(dl: np.ndarray, dl_max: float, epsilon: float = 0.6) -> np.ndarray:
    """Gray's rotation profile G(dl) (1/A) for half width `dl_max = lam vsini / c` and linear limb darkening.

    G = [2 (1-eps) sqrt(1-x^2) + (pi eps / 2) (1-x^2)] / [pi dl_max (1 - eps/3)], x = dl/dl_max
    (Gray, "The Observation and Analysis of Stellar Photospheres", ch. 18); zero for |x| >= 1.
    """
    x = np.asarray(dl, dtype=np.float64) / dl_max
    inside = np.clip(1.0 - x * x, 0.0, None)
    g = 2.0 * (1.0 - epsilon) * np.sqrt(inside) + 0.5 * np.pi * epsilon * inside
    return g / (np.pi * dl_max * (1.0 - epsilon / 3.0))


@numba.njit(cache=True)
def _rotation_cdf(x, epsilon):
    # Integral of Gray's profile from -1 to x (x in units of dl_max): exact, so pixel weights sum to 1.
    x = min(max(x, -1.0), 1.0)
    a = (1.0 - epsilon) * (x * math.sqrt(1.0 - x * x) + math.asin(x))
    b = 0.5 * math.pi * epsilon * (x - x * x * x / 3.0)
    return 0.5 + (a + b) / (math.pi * (1.0 - epsilon / 3.0))


@numba.njit(cache=True)
def velocity_kernel(dv, vsini, epsilon, sigma_v):
    """Rotation (Gray) convolved with a Gaussian of sigma `sigma_v` (km/s), as weights on pixels of `dv`.

    The rotation profile is binned exactly (from its CDF) on a sub-grid 8 times finer than `dv`, then
    convolved with the point-sampled Gaussian, and the smooth result is sampled at the pixel centres:
    no pixel-binning blur, and no aliasing however small vsini is. Without an instrumental profile the
    rotation profile is binned on the pixels themselves. Odd length, sums to one.
    """
    sub = 8 if sigma_v > 0.0 else 1
    du = dv / sub
    half_r = int(math.ceil(vsini / du + 0.5))
    rot = np.empty(2 * half_r + 1)
    for k in range(-half_r, half_r + 1):
        if vsini > 0.0:
            rot[k + half_r] = (_rotation_cdf((k + 0.5) * du / vsini, epsilon)
                               - _rotation_cdf((k - 0.5) * du / vsini, epsilon))
        else:
            rot[k + half_r] = 1.0 if k == 0 else 0.0
    if sigma_v <= 0.0:
        return rot
    half_g = int(math.ceil(5.0 * sigma_v / du))
    gau = np.empty(2 * half_g + 1)
    for j in range(-half_g, half_g + 1):
        gau[j + half_g] = math.exp(-0.5 * (j * du / sigma_v) ** 2)
    half = (half_r + half_g) // sub + 1
    out = np.zeros(2 * half + 1)
    for m in range(-half, half + 1):
        acc = 0.0
        for k in range(max(-half_r, m * sub - half_g), min(half_r, m * sub + half_g) + 1):
            acc += rot[k + half_r] * gau[m * sub - k + half_g]
        out[m + half] = acc
    return out / out.sum()


def macroturbulence_kernel(dv: float, zeta: float, epsilon: float, points: int = 400) -> np.ndarray:
    """Radial-tangential macroturbulence (Gray, ch. 17) as weights on pixels of `dv` km/s: half of the
    surface moving along its normal, half across it, each with Gaussian speeds of 1/e half width `zeta`
    (km/s), seen over the disc (the midpoints of `points` annuli in mu = cos theta, each weighed by
    its flux, (1 - epsilon + epsilon mu) mu) and binned exactly (each Gaussian from its CDF). Its
    variance is zeta^2 / 4 whatever the limb darkening: the two halves' projections, mu^2 and
    1 - mu^2, sum to one. Odd length, sums to one."""
    half = int(math.ceil(4.0 * zeta / dv + 0.5))
    edges = (np.arange(-half, half + 2) - 0.5) * dv  # of the 2 half + 1 pixels
    mu = (np.arange(points) + 0.5) / points
    flux = (1.0 - epsilon + epsilon * mu) * mu
    out = np.zeros(2 * half + 1)
    for width in (zeta * mu, zeta * np.sqrt(1.0 - mu * mu)):  # radial, tangential
        cdf = 0.5 * erf(edges[None, :] / width[:, None])
        out += flux @ np.diff(cdf, axis=1)
    return out / out.sum()


@numba.njit(cache=True, parallel=True)
def _broaden_per_pixel(lam, flux, vsini, epsilon, sigma_frac, kind):
    # kind 0: Gray rotation with dl_max = lam_i vsini / c; kind 1: Gaussian of sigma = sigma_frac lam_i.
    # Point-sampled kernel at each output pixel's wavelength, weighted by pixel widths, renormalised
    # over the part that falls inside the spectrum (edges: truncated kernel).
    n = lam.shape[0]
    out = np.empty(n)
    width = np.empty(n)
    for j in range(n):
        width[j] = 0.5 * (lam[min(j + 1, n - 1)] - lam[max(j - 1, 0)])
    for i in numba.prange(n):
        half = lam[i] * vsini / C_KMS if kind == 0 else 5.0 * sigma_frac * lam[i]
        lo = np.searchsorted(lam, lam[i] - half)
        hi = np.searchsorted(lam, lam[i] + half, side="right")
        acc, norm = 0.0, 0.0
        for j in range(lo, hi):
            x = (lam[j] - lam[i]) / half
            if kind == 0:
                q = max(1.0 - x * x, 0.0)
                g = 2.0 * (1.0 - epsilon) * math.sqrt(q) + 0.5 * math.pi * epsilon * q
            else:
                g = math.exp(-0.5 * (5.0 * x) ** 2)
            acc += g * width[j] * flux[j]
            norm += g * width[j]
        out[i] = acc / norm if norm > 0.0 else flux[i]
    return out


def rotational_broadening(wavelength: np.ndarray, flux: np.ndarray, vsini_kms: float,
                          epsilon: float = 0.6) -> np.ndarray:
    """Broaden `flux` on `wavelength` (A, increasing) by rotation at `vsini_kms` (km/s).

    Gray's rotation profile with linear limb darkening `epsilon` (see `rotation_profile`), evaluated
    with the half width of each output pixel's own wavelength and normalised discretely; near the
    ends the kernel is truncated to the spectrum and renormalised. Returns float64.
    """
    lam = np.ascontiguousarray(wavelength, dtype=np.float64)
    f = np.ascontiguousarray(flux, dtype=np.float64)
    if vsini_kms <= 0.0:
        return f.copy()
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"limb-darkening coefficient epsilon must be in [0, 1], got {epsilon}")
    return _broaden_per_pixel(lam, f, float(vsini_kms), float(epsilon), 0.0, 0)


def pixel_average(wavelength: np.ndarray, flux: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The mean of a finely sampled `flux` (on increasing `wavelength`) over each pixel between
    consecutive `edges`: what a detector's pixel collects, by the trapezoid rule."""
    cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (flux[1:] + flux[:-1]) * np.diff(wavelength))])
    return np.diff(np.interp(edges, wavelength, cumulative)) / np.diff(edges)


def instrumental_broadening(wavelength: np.ndarray, flux: np.ndarray, resolving_power: float) -> np.ndarray:
    """Convolve with a Gaussian line-spread function of FWHM = lambda / R (sigma = FWHM / 2.3548)."""
    lam = np.ascontiguousarray(wavelength, dtype=np.float64)
    f = np.ascontiguousarray(flux, dtype=np.float64)
    sigma_frac = 1.0 / (resolving_power * 2.0 * math.sqrt(2.0 * math.log(2.0)))
    return _broaden_per_pixel(lam, f, 0.0, 0.0, sigma_frac, 1)
