"""Stars between the nodes of a model grid, observed as a survey observes them.

The grid's spectra are broadened as Rotin does (Gray's rotation profile with linear limb darkening,
then a Gaussian instrumental profile of FWHM lambda / R) on a ladder of v sin i, and binned on the
observed wavelength grid once (`BroadenedLibrary`, cached on disk). A star at any (Teff, log g,
v sin i) is then a weighted sum of library spectra: a cubic radial basis function over the nodes in
(Teff / 1 kK, log g / 0.125 dex), its 40 largest weights, and linear between the two nearest rungs
of the ladder.
Real stars are not all of the grid's (solar) composition, and the strengths of the metal lines carry
Teff in a grid of one composition, so a model trained on it reads a metal-poor star as a cooler one.
The library can hold each node at several `metals` (dex): the optical depth of its metal lines
scaled by 10**metals before broadening (`scale_metal_lines`; H and He lines kept), linear between
these rungs too. For weak lines that is a change of the metal abundances by `metals` dex; it is not
a model atmosphere of that composition.
`draw_survey` adds what real data has: continuum distortions (low order and ripple), noise, masked
pixels and gaps, and wavelength-calibration errors. Used by the trainer (new draws every epoch), for
test catalogs and for benchmarks; the physics comes from the grid, not from this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from ..errors import CatalogError
from . import physics
from .grids import ModelGrid
from .medium import convert
from .schema import (
    FLUX,
    FLUX_ERR,
    ID,
    MASK,
    META_GENERATOR,
    META_PIXELS,
    META_RESOLVING_POWER,
    META_WAVELENGTH,
    PIXEL_KINDS,
    RV,
    SNR,
    WavelengthGrid,
    spectrum_array,
)

VELOCITY_STEP_KMS = 0.5  # log-lambda step of the broadening grid, finer than SYNSPEC's 0.01 A (0.6 km/s)
GRID_STEP = np.array([1000.0, 0.25])  # K, dex: the BSTAR2006 grid's spacing in (teff, logg)
# The interpolation between nodes, chosen by leaving nodes out (`bench/interpolation_floor.py --sweep`):
# keeping 20 weights tripled Teff's error of keeping all (log g's 5.6x); and a log g step changes a B star's
# spectrum about as much as two Teff steps, so distances count it twice (units of 0.0625-0.125 dex
# measured within 6% of each other for Teff, 15% for log g).
NEIGHBOURS = 40  # largest RBF weights kept per star
NODE_SCALE = GRID_STEP / np.array([1.0, 2.0])  # K, dex per unit of distance between (teff, logg)
METALS_STEP = 0.1  # dex between the library's metal rungs (linear between them: tested)
# Metal lines of unbroadened B-star spectra are < 0.3 A wide, the cores of H and He lines wider: a
# grey closing over this width takes out the first and leaves the second (outside the cores, kept as
# they are: HHE_CORE_HALF_WIDTH about each H and He line of `lines.DIAGNOSTIC_LINES`, H epsilon and
# He I 4169).
METAL_LINE_WIDTH = 0.8  # Angstrom
HHE_CORE_HALF_WIDTH = 2.5  # Angstrom (reaches the forbidden components of He I 4026 and 4471)
HHE_EXTRA = (3970.07, 4168.97)  # A, air: H epsilon (its wing reaches 3990 A), He I 4169


def metals_ladder(span: tuple[float, float]) -> np.ndarray:
    """The metal rungs (dex) of a library that covers `span`: multiples of METALS_STEP, 0 included."""
    lo, hi = (int(math.floor(span[0] / METALS_STEP + 1e-9)), int(math.ceil(span[1] / METALS_STEP - 1e-9)))
    return np.round(np.arange(min(lo, 0), max(hi, 0) + 1) * METALS_STEP, 10)


def scale_metal_lines(wavelength: np.ndarray, flux: np.ndarray, metals: np.ndarray) -> np.ndarray:
    """(len(metals), P) float64: the unbroadened normalised `flux` on `wavelength` (A, air) with the
    optical depth of its metal lines times 10**metals. The metal lines are the spectrum over its grey
    closing (narrow dips, METAL_LINE_WIDTH), taken as exp(-tau) on top of the H and He profiles;
    within HHE_CORE_HALF_WIDTH of an H or He line nothing is scaled."""
    from scipy.ndimage import grey_closing

    from .lines import DIAGNOSTIC_LINES

    wavelength = np.asarray(wavelength, np.float64)
    flux = np.asarray(flux, np.float64)
    width = max(int(round(METAL_LINE_WIDTH / np.median(np.diff(wavelength)))) | 1, 3)
    envelope = np.maximum(grey_closing(flux, size=width), flux)
    centres = [ln.wavelength for ln in DIAGNOSTIC_LINES if ln.name.split()[0] in ("H", "He")]
    for c in (*centres, *HHE_EXTRA):
        core = np.abs(wavelength - c) <= HHE_CORE_HALF_WIDTH
        envelope[core] = flux[core]
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.clip(np.where(envelope > 0, flux / envelope, 1.0), 1e-6, 1.0)
    return envelope[None, :] * depth[None, :] ** (10.0 ** np.asarray(metals, np.float64))[:, None]


def vsini_ladder(top: float = 460.0) -> np.ndarray:
    """v sin i (km/s) at which the library is broadened: every 2 km/s up to 20 (below the
    instrumental width, where profiles barely change), then steps of 4% (linear interpolation between
    rungs then stays far below the noise; tests/catalogs/test_gridsynth.py measures it)."""
    low = np.arange(0.0, 20.0 + 1e-9, 2.0)
    high = 20.0 * 1.04 ** np.arange(1, int(math.ceil(math.log(top / 20.0) / math.log(1.04))) + 1)
    return np.concatenate([low, high])


@dataclass(frozen=True)
class Observation:
    """How the survey observes: its wavelength grid (Angstrom, linear), resolving power R, the limb
    darkening of the rotation profile (0.6, the customary value) and the stars' radial-tangential
    macroturbulence zeta (km/s; 0: none, as in the grid's models, which carry microturbulence only;
    OB stars show tens of km/s of it, supergiants the most: Simon-Diaz et al. 2017, A&A 597, A22)."""

    start: float = 4000.0
    step: float = 0.2
    npix: int = 4001
    resolving_power: float = 20000.0
    epsilon: float = 0.6
    medium: str = "air"
    macroturbulence: float = 0.0

    def grid(self) -> WavelengthGrid:
        return WavelengthGrid.linear(self.start, self.step, self.npix, medium=self.medium)

    def sigma_kms(self) -> float:
        """Gaussian sigma (km/s) of the instrumental profile, FWHM = c / R."""
        return physics.C_KMS / (self.resolving_power * 2.0 * math.sqrt(2.0 * math.log(2.0)))


def broaden(wavelength: np.ndarray, flux: np.ndarray, vsini: np.ndarray, obs: Observation) -> np.ndarray:
    """Unbroadened normalised `flux` on `wavelength` (A) -> (len(vsini), obs.npix) float32: rotation
    (Gray, with obs.epsilon), macroturbulence (if any) and the instrument, pixel-averaged on the observed
    grid. The spectrum is taken as continuum (1) beyond its ends."""
    lo, hi = math.log(wavelength[0]), math.log(wavelength[-1])
    h = VELOCITY_STEP_KMS / physics.C_KMS
    lam = np.exp(lo + h * np.arange(int((hi - lo) / h) + 1))
    g = np.interp(lam, wavelength, flux) - 1.0
    kernels = [physics.velocity_kernel(VELOCITY_STEP_KMS, float(v), obs.epsilon, obs.sigma_kms())
               for v in vsini]
    if obs.macroturbulence > 0.0:
        macro = physics.macroturbulence_kernel(VELOCITY_STEP_KMS, obs.macroturbulence, obs.epsilon)
        kernels = [np.convolve(k, macro) for k in kernels]
    half = max(len(k) for k in kernels) // 2
    nfft = _fast_len(len(lam) + 2 * half + 1)
    spectrum = np.fft.rfft(g, nfft)
    edges = obs.grid().values()
    edges = np.concatenate([edges - 0.5 * obs.step, edges[-1:] + 0.5 * obs.step])
    out = np.empty((len(vsini), obs.npix), np.float32)
    for j, k in enumerate(kernels):
        kh = len(k) // 2
        y = np.fft.irfft(spectrum * np.fft.rfft(k, nfft), nfft)[kh:kh + len(lam)]
        out[j] = 1.0 + physics.pixel_average(lam, y, edges)
    return out


def _fast_len(n: int) -> int:
    from scipy.fft import next_fast_len

    return next_fast_len(n, real=True)


@dataclass
class BroadenedLibrary:
    """Every node of a grid at every metal rung, broadened at every rung of `vsini` and binned on
    `obs`'s grid."""

    nodes: np.ndarray  # (N, 2) Teff K, log g dex
    metals: np.ndarray  # (Z,) dex, increasing; [0.0]: the grid's own composition only
    vsini: np.ndarray  # (V,) km/s
    flux: np.ndarray  # (N, Z, V, P) float32
    obs: Observation
    key: str  # sha256 of the grid's arrays, the ladders and the observation

    @classmethod
    def build(cls, grid: ModelGrid, obs: Observation, vsini: np.ndarray | None = None, *,
              metals: np.ndarray | None = None, clip_emission: bool = True,
              cache: str | Path | None = None, progress: bool = False) -> BroadenedLibrary:
        """Broaden every model of `grid` (its flux clipped at 1 first when `clip_emission`: the LTE
        source function gives some metal lines spurious emission, see the grid's README), its metal
        lines scaled to each of `metals` (dex; default: only 0), its wavelengths in the observation's
        medium; the grid must cover the observed range. With `cache` (a folder), the library is stored
        there under its key and reused."""
        grid = replace(grid, wavelength=convert(grid.wavelength, grid.medium, obs.medium), medium=obs.medium)
        lo, hi = obs.start, obs.start + obs.step * (obs.npix - 1)
        if grid.wavelength[0] > lo or grid.wavelength[-1] < hi:
            raise CatalogError(f"the grid covers {grid.wavelength[0]:.1f}-{grid.wavelength[-1]:.1f} A "
                               f"({obs.medium}); observing it needs {lo:.1f}-{hi:.1f} A"
                               + (" (its wavelengths look like nanometres: multiply by 10)"
                                  if grid.wavelength[-1] < 1000.0 else ""))
        vsini = vsini_ladder() if vsini is None else np.asarray(vsini, np.float64)
        metals = np.zeros(1) if metals is None else np.asarray(metals, np.float64)
        key = _library_key(grid, obs, vsini, metals, clip_emission)
        path = None if cache is None else Path(cache) / f"library-{key[:16]}.npy"
        if path is not None and path.is_file():
            return cls(grid.nodes(), metals, vsini, np.load(path, mmap_mode="r"), obs, key)
        from tqdm.auto import tqdm

        flux = np.empty((len(grid.flux), len(metals), len(vsini), obs.npix), np.float32)
        for n in tqdm(range(len(grid.flux)), desc="broaden grid", unit="model", disable=not progress):
            f = np.minimum(grid.flux[n], 1.0) if clip_emission else grid.flux[n]
            scaled = scale_metal_lines(grid.wavelength, f, metals) if metals.any() else [f]
            for z, fz in enumerate(scaled):
                flux[n, z] = broaden(grid.wavelength, np.asarray(fz, np.float64), vsini, obs)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, flux)
            tmp.replace(path)
        return cls(grid.nodes(), metals, vsini, flux, obs, key)

    def at_metals(self, metals: float = 0.0) -> BroadenedLibrary:
        """The library at one of its metal rungs only (default: the grid's own composition)."""
        z = np.flatnonzero(np.isclose(self.metals, metals))
        if len(z) != 1:
            raise ValueError(f"metals {metals} is not a rung of this library ({list(self.metals)})")
        return BroadenedLibrary(self.nodes, self.metals[z], self.vsini, self.flux[:, z], self.obs, self.key)

    def subset(self, keep: np.ndarray) -> BroadenedLibrary:
        """The library of the nodes `keep` (index array) only (its spectra copied into memory)."""
        return BroadenedLibrary(self.nodes[keep], self.metals, self.vsini, np.asarray(self.flux)[keep],
                                self.obs, self.key)

    def weights(self, teff: np.ndarray, logg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index (B, k), weight (B, k)) of the nodes that make up the spectra at (teff, logg): the
        cardinal functions of a cubic RBF with a linear polynomial over all nodes, cut to the k
        largest and rescaled to sum to one (so a flat spectrum stays flat)."""
        k = min(NEIGHBOURS, len(self.nodes))
        w = self._cardinal(np.stack([teff, logg], axis=1) / NODE_SCALE)
        idx = np.argpartition(-np.abs(w), k - 1, axis=1)[:, :k]
        w = np.take_along_axis(w, idx, axis=1)
        return idx, w / w.sum(axis=1, keepdims=True)

    @functools.cached_property
    def _cardinal(self):
        from scipy.interpolate import RBFInterpolator

        return RBFInterpolator(self._scaled_nodes(), np.eye(len(self.nodes)), kernel="cubic", degree=1)

    def spectra(self, teff, logg, vsini, metals=None) -> np.ndarray:
        """(B, P) float32 noise-free normalised spectra at the given labels (K, dex, km/s; metals in
        dex, default 0)."""
        teff, logg, vsini = (np.atleast_1d(np.asarray(a, np.float64)) for a in (teff, logg, vsini))
        metals = np.zeros(len(teff)) if metals is None else np.atleast_1d(np.asarray(metals, np.float64))
        for name, value, ladder in (("v sin i", vsini, self.vsini), ("metals", metals, self.metals)):
            if value.min() < ladder[0] - 1e-9 or value.max() > ladder[-1] + 1e-9:
                raise ValueError(f"{name} must lie in [{ladder[0]}, {ladder[-1]}] (this library's range)")
        idx, w = self.weights(teff, logg)
        rung, alpha = _rungs(self.vsini, vsini)
        zrung, beta = _rungs(self.metals, metals)
        out = np.empty((len(teff), self.flux.shape[3]), np.float32)
        _combine(np.asarray(self.flux), idx, w.astype(np.float32), zrung, beta.astype(np.float32), rung,
                 alpha.astype(np.float32), out)
        return out

    def inside(self, teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
        """True where (teff, logg) lies in the convex hull of the nodes (interpolation, not extrapolation)."""
        from scipy.spatial import Delaunay

        return Delaunay(self._scaled_nodes()).find_simplex(np.stack([teff, logg], 1) / NODE_SCALE) >= 0

    def _scaled_nodes(self) -> np.ndarray:
        """The nodes in the interpolation's units; `CatalogError` unless 3 or more span both Teff and
        log g (a line of nodes has nothing to interpolate across)."""
        teff, logg = (sorted(set(axis.tolist())) for axis in self.nodes.T)
        if len(self.nodes) < 3 or min(len(teff), len(logg)) < 2:
            raise CatalogError("stars are drawn between 3 or more models spanning both Teff and log g; this "
                               f"grid has {len(self.nodes)}, at Teff {teff} and log g {logg}")
        return self.nodes / NODE_SCALE


def holes(nodes: np.ndarray, shape: tuple = ((0, 0),)) -> list[tuple[int, list[int]]]:
    """(node, the nodes of its hole) for every (teff, logg) node where the hole `shape` (steps of
    GRID_STEP from the node) lies in the grid with every axis neighbour of the hole a node too: left
    out, the hole's stars are between nodes, like the models the grid's README withholds (the default
    shape: the node alone)."""
    steps = np.round(nodes / GRID_STEP).astype(np.int64)
    index = {tuple(s): i for i, s in enumerate(steps)}
    found = []
    for n, (t, g) in enumerate(steps):
        hole = {(t + dt, g + dg) for dt, dg in shape}
        ring = {(a + da, b + db) for a, b in hole for da, db in ((-1, 0), (1, 0), (0, -1), (0, 1))} - hole
        if hole <= index.keys() and ring <= index.keys():
            found.append((n, [index[h] for h in hole]))
    return found


def _rungs(ladder: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower rung, weight of the upper one) of each value on `ladder`; a one-rung ladder: (0, 0)."""
    if len(ladder) == 1:
        return np.zeros(len(value), np.int64), np.zeros(len(value))
    rung = np.clip(np.searchsorted(ladder, value, side="right") - 1, 0, len(ladder) - 2)
    return rung, np.clip((value - ladder[rung]) / (ladder[rung + 1] - ladder[rung]), 0.0, 1.0)


@numba.njit(parallel=True, cache=True)
def _combine(lib, idx, w, zrung, beta, rung, alpha, out):
    # out[b] = sum_j w[b, j] sum over the (metal, v sin i) rungs around the star, bilinear weights;
    # a one-rung metal ladder has beta = 0 and never reads past it
    for b in numba.prange(out.shape[0]):
        out[b, :] = 0.0
        z, v = zrung[b], rung[b]
        z1 = min(z + 1, lib.shape[1] - 1)
        for j in range(idx.shape[1]):
            n = idx[b, j]
            c00 = w[b, j] * (1.0 - beta[b]) * (1.0 - alpha[b])
            c01 = w[b, j] * (1.0 - beta[b]) * alpha[b]
            c10 = w[b, j] * beta[b] * (1.0 - alpha[b])
            c11 = w[b, j] * beta[b] * alpha[b]
            for p in range(out.shape[1]):
                out[b, p] += (c00 * lib[n, z, v, p] + c01 * lib[n, z, v + 1, p]
                              + c10 * lib[n, z1, v, p] + c11 * lib[n, z1, v + 1, p])


def _library_key(grid: ModelGrid, obs: Observation, vsini: np.ndarray, metals: np.ndarray, clip: bool) -> str:
    h = hashlib.sha256()
    for a in (grid.wavelength, grid.flux, grid.nodes(), vsini, *([metals] if metals.any() else [])):
        h.update(np.ascontiguousarray(a).tobytes())
    observation = asdict(obs)
    if not obs.macroturbulence:  # as before the field existed, so that those libraries keep their keys
        del observation["macroturbulence"]
    h.update(json.dumps([observation, clip, VELOCITY_STEP_KMS]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Perturbations:
    """What a survey adds to a star's spectrum; each draw is independent per spectrum. SNR is per
    observed pixel on the continuum, log-uniform; the continuum is `(1 + sum_k a_k P_k(x)) (1 + A sin(2 pi
    lambda / period + phase))` (Legendre P_k, k = 1..degree, |a_k| <= continuum_amplitude; the ripple on
    a fraction `ripple_prob` of spectra); `rv_error_kms` is the Gaussian sigma of the error of the
    stated rv (wavelength calibration, rv measurement), applied by stating a wrong rv."""

    teff: tuple[float, float] = (15000.0, 30000.0)
    logg: tuple[float, float] = (1.75, 4.75)
    vsini: tuple[float, float] = (0.0, 450.0)
    metals: tuple[float, float] = (0.0, 0.0)  # dex, uniform (`scale_metal_lines`); (0, 0): none drawn
    snr: tuple[float, float] = (10.0, 500.0)
    continuum_degree: int = 3
    continuum_amplitude: float = 0.1
    ripple_prob: float = 0.3
    ripple_amplitude: float = 0.01
    ripple_period: tuple[float, float] = (20.0, 100.0)  # Angstrom
    rv_error_kms: float = 2.0
    bad_pixel_fraction: float = 0.005  # at most, uniform per spectrum
    gap_prob: float = 0.1
    gap_width: tuple[float, float] = (5.0, 30.0)  # Angstrom


@dataclass
class Survey:
    """A drawn survey: observed flux on `obs`'s grid with its truth."""

    flux: np.ndarray  # (B, P) float32
    flux_err: np.ndarray  # (B, P) float32
    mask: np.ndarray  # (B, P) bool
    labels: dict[str, np.ndarray]  # teff K, logg dex, vsini km/s: (B,) float64
    snr: np.ndarray  # (B,) float32, per observed pixel
    rv: np.ndarray  # (B,) float64 km/s: the stated rv (the error the engine will apply)
    ids: np.ndarray  # (B,) int64

    def table(self, obs: Observation, provenance: dict | None = None) -> pa.Table:
        """The survey as a catalog table (DESIGN.md schema; in the schema metadata its grid, its
        resolving power and that its flux values are pixel means, `physics.pixel_average`)."""
        d = self.flux.shape[1]
        cols = {ID: pa.array(self.ids, pa.int64()), FLUX: spectrum_array(self.flux, d),
                FLUX_ERR: spectrum_array(self.flux_err, d),
                MASK: pa.FixedSizeListArray.from_arrays(pa.array(self.mask.reshape(-1)), d),
                RV: pa.array(self.rv, pa.float64()), SNR: pa.array(self.snr, pa.float32())}
        cols.update({k: pa.array(v, pa.float64()) for k, v in self.labels.items()})
        prov = {"generator": "starcast.catalogs.gridsynth", "observation": asdict(obs), **(provenance or {})}
        meta = {META_WAVELENGTH: obs.grid().to_json(), META_GENERATOR: json.dumps(prov, sort_keys=True),
                META_PIXELS: PIXEL_KINDS[0], META_RESOLVING_POWER: json.dumps(obs.resolving_power)}
        return pa.table(cols).replace_schema_metadata(meta)


def labels_at(nodes: np.ndarray, pert: Perturbations, rng: np.random.Generator) -> dict:
    """Stars at `nodes` (B, 2: Teff, log g) with v sin i uniform, and metals uniform where `pert` spans
    some, else its one value (0 by default: the grid's own composition)."""
    labels = {"teff": nodes[:, 0], "logg": nodes[:, 1], "vsini": rng.uniform(*pert.vsini, len(nodes))}
    spans = pert.metals[1] > pert.metals[0]
    labels["metals"] = rng.uniform(*pert.metals, len(nodes)) if spans else np.full(len(nodes), pert.metals[0])
    return labels


def draw_labels(lib: BroadenedLibrary, n: int, pert: Perturbations, rng: np.random.Generator) -> dict:
    """n labels uniform in the box of `pert` and inside the hull of the library's nodes."""
    teff, logg = np.empty(0), np.empty(0)
    for _ in range(1000):
        if len(teff) >= n:
            break
        t = rng.uniform(*pert.teff, 2 * n)
        g = rng.uniform(*pert.logg, 2 * n)
        ok = lib.inside(t, g)
        teff, logg = np.concatenate([teff, t[ok]]), np.concatenate([logg, g[ok]])
    if len(teff) < n:
        span = [(float(a.min()), float(a.max())) for a in lib.nodes.T]
        raise CatalogError(f"the label box (Teff {pert.teff}, log g {pert.logg}) does not overlap the grid's "
                           f"nodes (Teff {span[0]}, log g {span[1]})")
    return labels_at(np.stack([teff[:n], logg[:n]], axis=1), pert, rng)


def draw_survey(lib: BroadenedLibrary, labels: dict, pert: Perturbations, rng: np.random.Generator,
                id_start: int = 0) -> Survey:
    """Observe the stars `labels` (teff, logg, vsini arrays) with the perturbations of `pert`."""
    clean = lib.spectra(labels["teff"], labels["logg"], labels["vsini"], labels.get("metals"))
    b, p = clean.shape
    wl = lib.obs.grid().values()
    legendre = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, p), pert.continuum_degree)[:, 1:].T
    coeffs = rng.uniform(-pert.continuum_amplitude, pert.continuum_amplitude, (b, pert.continuum_degree))
    cont = (1.0 + coeffs @ legendre).astype(np.float32)
    ripple = np.flatnonzero(rng.random(b) < pert.ripple_prob)
    amp = rng.uniform(0, pert.ripple_amplitude, len(ripple))
    period = rng.uniform(*pert.ripple_period, len(ripple))
    phase = rng.uniform(0, 2 * np.pi, len(ripple))
    cont[ripple] *= (1.0 + amp[:, None] * np.sin(2 * np.pi * wl[None] / period[:, None] + phase[:, None]))
    snr = np.exp(rng.uniform(*np.log(pert.snr), b)).astype(np.float32)
    err = cont / snr[:, None]
    flux = cont * clean + err * rng.standard_normal((b, p), dtype=np.float32)
    mask = rng.random((b, p), dtype=np.float32) < rng.uniform(0, pert.bad_pixel_fraction, (b, 1))
    gaps = np.flatnonzero(rng.random(b) < pert.gap_prob)
    width = rng.uniform(*pert.gap_width, len(gaps))
    start = rng.uniform(wl[0], wl[-1] - width)
    for row, lo, w in zip(gaps, start, width, strict=True):
        mask[row] |= (wl >= lo) & (wl < lo + w)
    return Survey(flux=flux, flux_err=err, mask=mask,
                  labels={k: np.asarray(v, np.float64) for k, v in labels.items()}, snr=snr,
                  rv=rng.normal(0.0, pert.rv_error_kms, b) if pert.rv_error_kms
                  else np.zeros(b), ids=id_start + np.arange(b, dtype=np.int64))


def _grid_survey(grid: ModelGrid, n: int, at_nodes: bool, seed: int, snr, vsini, obs, cache, progress):
    """(library, labels, perturbations, rng) of a survey of n stars of `grid` (see synth_from_grid)."""
    lib = BroadenedLibrary.build(grid, obs, cache=cache, progress=progress)
    pert = Perturbations(snr=tuple(snr), vsini=tuple(vsini), rv_error_kms=0.0, ripple_prob=0.0)
    rng = np.random.default_rng(seed)
    if at_nodes:
        labels = labels_at(lib.nodes[rng.integers(0, len(lib.nodes), n)], pert, rng)
    else:
        labels = draw_labels(lib, n, pert, rng)
    return lib, labels, pert, rng


def survey_table(grid: ModelGrid, n: int, *, at_nodes: bool = False, seed: int = 0,
                 snr: tuple[float, float] = (20.0, 300.0), vsini: tuple[float, float] = (0.0, 450.0),
                 obs: Observation | None = None, cache: str | Path | None = None) -> pa.Table:
    """`synth_from_grid`'s survey in memory, as one catalog table (for a few thousand stars)."""
    lib, labels, pert, rng = _grid_survey(grid, n, at_nodes, seed, snr, vsini, obs or Observation(), cache,
                                          False)
    return draw_survey(lib, labels, pert, rng).table(lib.obs, {"seed": seed, "at_nodes": at_nodes})


def synth_from_grid(grid: ModelGrid, n: int, out: str | Path, *, at_nodes: bool = False, seed: int = 0,
                    snr: tuple[float, float] = (20.0, 300.0), vsini: tuple[float, float] = (0.0, 450.0),
                    obs: Observation | None = None, shard_rows: int = 5000, cache: str | Path | None = None,
                    progress: bool = False) -> list[Path]:
    """Write a survey of `n` stars observed from `grid` as Parquet shards `out/part-00000.parquet`, ...:
    between the nodes (uniform in the grid's hull) or, `at_nodes`, at its nodes exactly (the model
    spectra themselves, no interpolation). v sin i uniform in `vsini`, SNR log-uniform in `snr`,
    continuum distortions, masks and gaps as `Perturbations` but no ripple (a perturbation of its own,
    which the default model flags MODEL_MISMATCH), at rest (rv 0). The same seed gives the same bytes."""
    from tqdm.auto import tqdm

    from .io import new_output_dir, write_catalog

    lib, labels, pert, rng = _grid_survey(grid, n, at_nodes, seed, snr, vsini, obs or Observation(), cache,
                                          progress)
    provenance = {"library": lib.key, "seed": seed, "at_nodes": at_nodes, "perturbations": asdict(pert)}
    out = new_output_dir(out)
    paths = []
    starts = range(0, n, shard_rows)
    for i, start in enumerate(tqdm(starts, desc="synth", unit="shard", disable=not progress)):
        part = {k: v[start:start + shard_rows] for k, v in labels.items()}
        survey = draw_survey(lib, part, pert, rng, id_start=start)
        paths.append(write_catalog(survey.table(lib.obs, provenance), out / f"part-{i:05d}.parquet"))
    return paths
