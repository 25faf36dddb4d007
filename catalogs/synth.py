"""Synthetic OB-star survey: draw labels, compute spectra in parallel (Numba), write Parquet shards.

Per spectrum: line opacities (`physics.LINES`) on a fine rest-frame log-lambda grid, rotation and
instrument as one velocity kernel, pixel-integrated sampling on the observed grid both in the rest
frame (`normalised`) and Doppler-shifted by `rv`, a smooth multiplicative continuum, and Gaussian
noise at the spectrum's SNR. An approximation for training and testing, not a model atmosphere.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from ..errors import StarcastError
from . import physics
from .schema import (
    FLUX,
    FLUX_ERR,
    ID,
    META_GENERATOR,
    META_RESOLVING_POWER,
    META_WAVELENGTH,
    RV,
    SNR,
    SPLIT,
    WavelengthGrid,
    spectrum_array,
)

# The grid of the reference study (mode "seed"): Teff in K, log g in dex (cgs), v sin i in km/s.
SEED_TEFF = np.arange(15000.0, 30000.0 + 1.0, 1000.0)
SEED_LOGG = np.arange(1.75, 4.75 + 1e-9, 0.25)
SEED_VSINI = np.arange(3.0, 450.0 + 1e-9, 3.0)
SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def logg_min(teff):
    """Lowest log g kept at `teff` (K): 1.6 dex at 15 kK, rising 0.1 dex per kK (3.1 dex at 30 kK).

    A linear stand-in for the Eddington-limit envelope of B-star model grids: on every kept node the
    electron-scattering Eddington factor sigma_e sigma_SB Teff^4 / (c g) (sigma_e = 0.34 cm^2/g) is
    below 0.85. On the seed grid it keeps 163 of the 208 (Teff, log g) pairs, 24 450 spectra.
    """
    return 1.6 + 1e-4 * (np.asarray(teff, dtype=np.float64) - 15000.0)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic survey; the same config gives the same bytes.

    Wavelengths in Angstrom (air), velocities in km/s. `n=None` in seed mode means the whole grid
    (24 450 spectra); a smaller n takes a seeded subset of it, a larger one repeats it with new noise.
    The continuum is `1 + sum_k a_k P_k(x)` (Legendre, k = 1..continuum_degree, x in [-1, 1] over the
    grid) with `a_k` uniform in [-continuum_amplitude, continuum_amplitude]. SNR is per pixel on the
    continuum (`flux_err = continuum / snr`). The resolving power R sets a Gaussian instrumental
    profile of FWHM lambda / R; spectra are computed on a rest-frame grid `oversample` times finer.
    """

    n: int | None = 1000
    mode: str = "random"  # "random" | "seed"
    seed: int = 0
    start: float = 4000.0  # first pixel centre, A
    step: float = 0.2  # A
    npix: int = 4000
    resolving_power: float = 20000.0
    teff: tuple[float, float] = (15000.0, 30000.0)  # random mode ranges (uniform)
    logg: tuple[float, float] = (1.75, 4.75)
    vsini: tuple[float, float] = (0.0, 450.0)
    snr: tuple[float, float] = (50.0, 300.0)  # both modes
    rv: tuple[float, float] = (-150.0, 150.0)  # both modes
    continuum_degree: int = 3
    continuum_amplitude: float = 0.1
    epsilon: float = 0.6  # linear limb darkening of the rotation profile
    microturbulence: float = physics.MICROTURBULENCE_KMS
    oversample: int = 3  # converged to < 1.5e-3 of the continuum (tests/catalogs/test_synth.py)
    id_start: int = 0

    def __post_init__(self) -> None:
        for name in ("teff", "logg", "vsini", "snr", "rv"):  # TOML and JSON give lists
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        problems = []
        if self.mode not in ("random", "seed"):
            problems.append(f"mode must be 'random' or 'seed', got {self.mode!r}")
        if self.n is None and self.mode == "random":
            problems.append("n is required in random mode")
        if self.n is not None and self.n < 1:
            problems.append(f"n must be at least 1, got {self.n}")
        if self.npix < 2 or self.step <= 0 or self.start <= 0:
            problems.append("the grid needs npix >= 2, step > 0 and start > 0 (Angstrom)")
        for name in ("teff", "logg", "vsini", "snr", "rv"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                problems.append(f"{name} range must be (low, high), got {(lo, hi)}")
        if self.snr[0] <= 0 or self.vsini[0] < 0 or max(abs(v) for v in self.rv) >= 0.1 * physics.C_KMS:
            problems.append("need snr > 0, vsini >= 0 and |rv| < 0.1 c")
        if self.resolving_power <= 0 or self.oversample < 1 or not 0 <= self.epsilon <= 1:
            problems.append("need resolving_power > 0, oversample >= 1 and 0 <= epsilon <= 1")
        if problems:
            raise StarcastError("bad synth configuration: " + "; ".join(problems))

    def grid(self) -> WavelengthGrid:
        return WavelengthGrid.linear(self.start, self.step, self.npix, medium="air")


@dataclass
class SynthArrays:
    """A synthetic batch: observed `flux` and its truth (`normalised`, `continuum`, labels)."""

    wavelength: np.ndarray  # (D,) float64, A
    flux: np.ndarray  # (B, D) float32, observed
    flux_err: np.ndarray  # (B, D) float32, 1 sigma
    normalised: np.ndarray  # (B, D) float32, noise-free, rest frame, continuum 1
    continuum: np.ndarray  # (B, D) float32, the multiplicative continuum applied
    ids: np.ndarray  # (B,) int64
    teff: np.ndarray  # (B,) float64, K
    logg: np.ndarray  # (B,) float64, dex
    vsini: np.ndarray  # (B,) float64, km/s
    rv: np.ndarray  # (B,) float64, km/s, positive = receding
    snr: np.ndarray  # (B,) float32
    split: np.ndarray | None  # (B,) str in seed mode, else None


def doppler_factor(rv_kms):
    """lambda_obs / lambda_rest for radial velocity `rv_kms` (relativistic, positive = receding)."""
    beta = np.asarray(rv_kms, dtype=np.float64) / physics.C_KMS
    return np.sqrt((1.0 + beta) / (1.0 - beta))


def seed_nodes() -> np.ndarray:
    """The (Teff, log g, v sin i) nodes of the seed grid, (N, 3) float64, Teff-major order."""
    t, g, v = np.meshgrid(SEED_TEFF, SEED_LOGG, SEED_VSINI, indexing="ij")
    nodes = np.stack([t.ravel(), g.ravel(), v.ravel()], axis=1)
    return nodes[nodes[:, 1] >= logg_min(nodes[:, 0]) - 1e-9]


def split_of(teff: float, logg: float, vsini: float) -> str:
    """Deterministic train/val/test assignment (60/20/20) from a hash of the grid node."""
    digest = hashlib.blake2b(f"{teff:.1f}/{logg:.3f}/{vsini:.1f}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    for name, frac in SPLIT_FRACTIONS:
        if u < frac:
            return name
        u -= frac
    return SPLIT_FRACTIONS[-1][0]


def draw_labels(config: SynthConfig) -> dict[str, np.ndarray]:
    """All per-spectrum random quantities of a survey, drawn once from `config.seed`."""
    rng = np.random.Generator(np.random.PCG64(config.seed))
    if config.mode == "seed":
        nodes = seed_nodes()
        n = len(nodes) if config.n is None else int(config.n)
        if n <= len(nodes):
            pick = np.sort(rng.choice(len(nodes), size=n, replace=False))
        else:
            pick = np.arange(n) % len(nodes)
        teff, logg, vsini = nodes[pick].T.copy()
        split = np.array([split_of(*node) for node in nodes[pick]], dtype=object)
    else:  # random
        n = int(config.n)
        teff, logg = np.empty(0), np.empty(0)
        for _ in range(10_000):  # rejection sampling below the Eddington envelope
            if teff.size >= n:
                break
            t = rng.uniform(*config.teff, size=max(n, 16))
            g = rng.uniform(*config.logg, size=max(n, 16))
            keep = g >= logg_min(t)
            teff, logg = np.concatenate([teff, t[keep]]), np.concatenate([logg, g[keep]])
        if teff.size < n:
            raise StarcastError(f"teff {config.teff} and logg {config.logg} lie (almost) entirely below the "
                                "Eddington envelope log g >= 1.6 + 0.1 (Teff - 15000 K) / 1000 K")
        teff, logg = teff[:n], logg[:n]
        vsini = rng.uniform(*config.vsini, size=n)
        split = None
    return {
        "teff": teff, "logg": logg, "vsini": vsini, "split": split,
        "snr": rng.uniform(*config.snr, size=n).astype(np.float32),
        "rv": rng.uniform(*config.rv, size=n),
        "coeffs": rng.uniform(-config.continuum_amplitude, config.continuum_amplitude,
                              size=(n, config.continuum_degree)),
        "ids": config.id_start + np.arange(n, dtype=np.int64),
    }


@numba.njit(cache=True, inline="always")
def _mix(x):
    # splitmix64 finaliser (Steele, Lea & Flood 2014): a counter-based, stateless random stream.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True)
def _running_integral(lam, g, slope, cum):
    # cum[k] = integral of g from lam[0] to lam[k] with cubic Hermite cells (Euler-Maclaurin corrected
    # trapezoid, exact for cubics); slope = dg/dlam from central differences.
    n = lam.shape[0]
    for k in range(n):
        slope[k] = (g[min(k + 1, n - 1)] - g[max(k - 1, 0)]) / (lam[min(k + 1, n - 1)] - lam[max(k - 1, 0)])
    cum[0] = 0.0
    for k in range(n - 1):
        h = lam[k + 1] - lam[k]
        cum[k + 1] = cum[k] + 0.5 * h * (g[k] + g[k + 1]) + h * h * (slope[k] - slope[k + 1]) / 12.0


@numba.njit(cache=True)
def _edge_integrals(lam, g, slope, cum, edges, scale, out):
    # out[j] = integral of g from lam[0] to edges[j] / scale through the cubic Hermite cell holding it,
    # so a pixel's mean is a difference of neighbours. `lam` is log-uniform: cells found by arithmetic.
    h0 = math.log(lam[1] / lam[0])
    for j in range(edges.shape[0]):
        x = edges[j] / scale
        k = min(max(int(math.log(x / lam[0]) / h0), 0), lam.shape[0] - 2)
        h, t = lam[k + 1] - lam[k], x - lam[k]
        g0, g1, m0, m1 = g[k], g[k + 1], slope[k], slope[k + 1]
        c2 = 3.0 * (g1 - g0) / (h * h) - (2.0 * m0 + m1) / h
        c3 = 2.0 * (g0 - g1) / (h * h * h) + (m0 + m1) / (h * h)
        out[j] = cum[k] + t * (g0 + t * (0.5 * m0 + t * (c2 / 3.0 + t * c3 / 4.0)))


@numba.njit(cache=True, fastmath=True)
def _convolve(f, kern, g):
    # g[k] = sum_m kern[m] f[k - half + m] away from the ends (float32; fastmath lets it vectorise).
    half = kern.shape[0] // 2
    for k in range(half, f.shape[0] - half):
        acc = np.float32(0.0)
        for m in range(kern.shape[0]):
            acc += kern[m] * f[k - half + m]
        g[k] = acc


@numba.njit(cache=True, parallel=True)
def _synth_kernel(lines, lam, edges, xleg, teff, logg, vsini, dop, snr, coeffs, ids, seed, micro, epsilon,
                  sigma_v, flux, flux_err, normalised, continuum):
    # One spectrum per prange iteration: opacities on the rest-frame grid `lam`, exp, broadening, pixel
    # means at rest (`normalised`) and shifted by `dop`, continuum, noise keyed on (seed, id, pixel).
    n_int, npix, deg = lam.shape[0], xleg.shape[0], coeffs.shape[1]
    dv = physics.C_KMS * math.log(lam[1] / lam[0])
    seed_key = _mix(np.uint64(seed))
    for b in numba.prange(teff.shape[0]):
        tau = np.zeros(n_int)
        physics.add_line_opacity(lines, lam, teff[b], logg[b], micro, tau)
        f = np.exp(-tau).astype(np.float32)
        g = f.copy()
        _convolve(f, physics.velocity_kernel(dv, vsini[b], epsilon, sigma_v).astype(np.float32), g)
        gd = g.astype(np.float64)
        slope, cum = np.empty(n_int), np.empty(n_int)
        _running_integral(lam, gd, slope, cum)
        rest, obs = np.empty(npix + 1), np.empty(npix + 1)
        _edge_integrals(lam, gd, slope, cum, edges, 1.0, rest)
        _edge_integrals(lam, gd, slope, cum, edges, dop[b], obs)
        key = _mix(seed_key ^ np.uint64(ids[b]))
        for j in range(npix):
            width = edges[j + 1] - edges[j]
            normalised[b, j] = (rest[j + 1] - rest[j]) / width
            shifted = (obs[j + 1] - obs[j]) / (width / dop[b])
            # Legendre recurrence (n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1} (Abramowitz & Stegun 22.7.10)
            x, p_prev, p, c = xleg[j], 1.0, xleg[j], 1.0
            for q in range(deg):
                c += coeffs[b, q] * p
                p_prev, p = p, ((2 * q + 3) * x * p - (q + 1) * p_prev) / (q + 2)
            # Gaussian deviate by Box-Muller from two counter-based uniforms in (0, 1].
            u1 = ((_mix(key + np.uint64(2 * j)) >> np.uint64(11)) + np.uint64(1)) * 2.0**-53
            u2 = (_mix(key + np.uint64(2 * j + 1)) >> np.uint64(11)) * 2.0**-53
            z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
            continuum[b, j] = c
            flux_err[b, j] = c / snr[b]
            flux[b, j] = c * shifted + c / snr[b] * z


def _sigma_instrument(config: SynthConfig) -> float:
    # Gaussian sigma (km/s) of an instrumental profile of FWHM lambda / R.
    return physics.C_KMS / (config.resolving_power * 2.0 * math.sqrt(2.0 * math.log(2.0)))


def _internal_grid(config: SynthConfig, wavelength: np.ndarray) -> np.ndarray:
    # Rest-frame log-lambda grid covering the observed pixels at any rv, plus the widest kernel.
    h = config.step / (wavelength[-1] * config.oversample)  # d ln(lambda), finer than every pixel
    vmax = max(abs(config.rv[0]), abs(config.rv[1]))
    vsini_max = max(config.vsini[1], SEED_VSINI[-1])
    margin = (vsini_max + 6.0 * _sigma_instrument(config)) / physics.C_KMS + 4 * h
    lo = math.log((wavelength[0] - config.step) / doppler_factor(vmax)) - margin
    hi = math.log((wavelength[-1] + config.step) * doppler_factor(vmax)) + margin
    return np.exp(lo + h * np.arange(int(math.ceil((hi - lo) / h)) + 1))


def compute_spectra(config: SynthConfig, labels: dict[str, np.ndarray], rows: slice) -> SynthArrays:
    """Spectra for `labels[rows]` (from `draw_labels`); parallel over spectra (Numba prange)."""
    wavelength = config.grid().values()
    lab = {k: (v[rows] if v is not None else None) for k, v in labels.items()}
    b, d = lab["ids"].shape[0], wavelength.shape[0]
    edges = np.concatenate([[wavelength[0] - 0.5 * config.step], wavelength + 0.5 * config.step])
    xleg = 2.0 * (wavelength - wavelength[0]) / (wavelength[-1] - wavelength[0]) - 1.0
    out = {k: np.empty((b, d), dtype=np.float32) for k in ("flux", "flux_err", "normalised", "continuum")}
    sigma_v = _sigma_instrument(config)
    _synth_kernel(physics.LINE_TABLE, _internal_grid(config, wavelength), edges, xleg, lab["teff"],
                  lab["logg"], lab["vsini"], doppler_factor(lab["rv"]), lab["snr"].astype(np.float64),
                  np.ascontiguousarray(lab["coeffs"]), lab["ids"], np.uint64(config.seed),
                  float(config.microturbulence), float(config.epsilon), sigma_v,
                  out["flux"], out["flux_err"], out["normalised"], out["continuum"])
    return SynthArrays(wavelength=wavelength, ids=lab["ids"], teff=lab["teff"], logg=lab["logg"],
                       vsini=lab["vsini"], rv=lab["rv"], snr=lab["snr"], split=lab["split"], **out)


def synth_arrays(config: SynthConfig) -> SynthArrays:
    """The whole survey of `config` in memory (use `synth` to stream large ones to disk)."""
    labels = draw_labels(config)
    return compute_spectra(config, labels, slice(0, labels["ids"].shape[0]))


def generator_metadata(config: SynthConfig) -> dict[str, str]:
    """Parquet key-value metadata: the wavelength grid, the resolving power and the provenance of the
    generator."""
    from .. import __version__

    prov = {"generator": "starcast.catalogs.synth", "version": __version__, "seed": config.seed,
            "config": asdict(config)}
    return {META_WAVELENGTH: config.grid().to_json(), META_GENERATOR: json.dumps(prov, sort_keys=True),
            META_RESOLVING_POWER: json.dumps(config.resolving_power)}


def arrays_to_table(arrays: SynthArrays, config: SynthConfig) -> pa.Table:
    """A catalog table (DESIGN.md schema) from synthetic arrays; the grid goes into schema metadata."""
    d = arrays.wavelength.shape[0]
    cols = {ID: pa.array(arrays.ids, pa.int64()), FLUX: spectrum_array(arrays.flux, d),
            FLUX_ERR: spectrum_array(arrays.flux_err, d), RV: pa.array(arrays.rv, pa.float64()),
            SNR: pa.array(arrays.snr, pa.float32()), "teff": pa.array(arrays.teff, pa.float64()),
            "logg": pa.array(arrays.logg, pa.float64()), "vsini": pa.array(arrays.vsini, pa.float64())}
    if arrays.split is not None:
        cols[SPLIT] = pa.array(list(arrays.split), pa.string())
    table = pa.table(cols)
    return table.replace_schema_metadata(generator_metadata(config))


def synth_table(config: SynthConfig, chunk_rows: int = 4096) -> pa.Table:
    """The survey of `config` as one catalog table (grid and provenance in the schema metadata).

    Computed `chunk_rows` spectra at a time, so the truth arrays (`normalised`, `continuum`) of only
    one chunk are ever in memory beside the table.
    """
    labels = draw_labels(config)
    total = labels["ids"].shape[0]
    chunks = [arrays_to_table(compute_spectra(config, labels, slice(s, min(s + chunk_rows, total))), config)
              for s in range(0, total, chunk_rows)]
    return pa.concat_tables(chunks)


def synth(n: int | None, out: str | Path, *, mode: str = "random", seed: int = 0, shard_rows: int = 5000,
          snr: tuple[float, float] = (50.0, 300.0), progress: bool = False, **config) -> list[Path]:
    """Write a synthetic survey of `n` spectra as Parquet shards `out/part-00000.parquet`, ...

    `out` must be new or hold no Parquet files.
    `config` takes any other `SynthConfig` field (e.g. `npix=400`, `rv=(0, 0)`). Returns the paths.
    """
    from .io import new_output_dir, write_catalog

    if int(shard_rows) < 1:
        raise StarcastError(f"shard_rows must be at least 1, got {shard_rows}")
    unknown = sorted(set(config) - {f.name for f in fields(SynthConfig)})
    if unknown:
        raise StarcastError(f"synth got unknown settings {unknown}: SynthConfig's fields are "
                            f"{sorted(f.name for f in fields(SynthConfig))} (a grid's survey: "
                            "`catalogs.gridsynth.synth_from_grid`)")
    cfg = replace(SynthConfig(), n=n, mode=mode, seed=seed, snr=tuple(snr), **config)
    labels = draw_labels(cfg)
    total = labels["ids"].shape[0]
    out = new_output_dir(out)
    starts = range(0, total, int(shard_rows))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="spectra", desc="synth")
    paths = []
    for i, start in enumerate(starts):
        arrays = compute_spectra(cfg, labels, slice(start, min(start + shard_rows, total)))
        paths.append(write_catalog(arrays_to_table(arrays, cfg), out / f"part-{i:05d}.parquet"))
        if bar is not None:
            bar.update(arrays.ids.shape[0])
    if bar is not None:
        bar.close()
    return paths
