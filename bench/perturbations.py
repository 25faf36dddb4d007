"""Perturbation matrix: what the model's numbers and flags do when spectra differ from its training set.

For held-out spectra (by default TLUSTY spectra at the test nodes a grid config leaves out of
training, SNR 50-300, no ripple or gap; with `--source synthetic`, the simplified generator's random
survey) and each perturbation of issue 10 (1% continuum ripple of period 50 A, wavelength offset
+-0.3 A, resolving power R/2 and R/4, a 30 A gap over He I 4471, vacuum wavelengths stated or
labelled air, stars at +-300 km/s with and without an rv column, 50% coverage; for TLUSTY spectra
also metal lines weaker than the grid's composition by 0.2 and 0.5 dex, as in metal-poor stars, the
radial-tangential macroturbulence of 25 and 60 km/s that real OB stars show and the grid lacks, and a
rotation profile with limb darkening 0.3 or 0.9 where the model was trained with the customary 0.6) and
seven that real spectra of B stars carry (cosmic-ray hits the reduction missed, the diffuse interstellar
bands and the interstellar lines of CH+ and CH of a reddened star, a Be star's emission in H-gamma and
H-delta, an H II region's nebular emission in the cores of H and He I lines, a double-lined companion,
light without lines veiling the spectrum), three of their noise
(flux_err understated or overstated, flux_err absent), a resolving power of 15 000 left unstated and
spectra normalised before they reach starcast (by a cubic, a polynomial of degree 8 or a spline through
the upper envelope, as archives and automated normalisers deliver them),
it reports per target the RMSE over rows with numbers against the clean run, the 68% coverage, the
bias of v sin i among slow rotators (true < SLOW km/s), and the fraction of rows flagged (bits other
than the INFORMATIONAL ones) or nulled.
A perturbation passes when RMSE stays within 1.5x of clean with 68% coverage within 5 points of clean,
or when >= 95% of its rows are flagged or nulled; the clean rows should be <= 2% flagged. Labels are
dropped before predicting, so flags come from the spectra and predictions only. For a model with an
emulator it also reports the median chi^2, the share of rows flagged MODEL_MISMATCH and the RMSE of
the fitted rv against the truth.
Writes bench/results/perturbations_tlusty.json and .md (perturbations.* with --source synthetic,
with _r<R> for --model-resolving-power).
Usage: python bench/perturbations.py [--n 200] [--model ob-default] [--model-resolving-power R]
       [--source tlusty|synthetic] [--config trainers/configs/ob-default.toml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from starcast.catalogs.medium import air_to_vacuum
from starcast.catalogs.physics import C_KMS
from starcast.catalogs.schema import (
    CHI2,
    FLAGS,
    FLUX,
    FLUX_ERR,
    INFORMATIONAL,
    META_RESOLVING_POWER,
    META_WAVELENGTH,
    RESOLVING_POWER,
    RV,
    RV_ERR,
    SNR,
    WAVELENGTH,
    Flag,
    WavelengthGrid,
    spectrum_array,
)
from starcast.catalogs.synth import SynthConfig, synth_table
from starcast.engine.predictor import load_model
from starcast.kernels.resample import rest_frame_factor

import starcast

RESULTS = Path(__file__).parent / "results"
TARGETS = ("teff", "logg", "vsini")
R_SOURCE = 20000.0  # resolving power of the default source (and of ob-default's training spectra)
TRUE_RV = "true_rv"  # km/s, a column the rv perturbations add for scoring (the sources are at rest)
METALS = "metals"  # dex: the metal-line strength of the TLUSTY source's stars (a label, dropped too)
SLOW = 60.0  # km/s: true v sin i below which a star counts as a slow rotator (its bias is reported)

# (n, seed, resolving power, metals dex[, macroturbulence km/s, limb darkening]) -> catalog with labels
Source = Callable[..., pa.Table]


def synthetic_source(n: int, seed: int, resolving_power: float, metals: float = 0.0,
                     macroturbulence: float = 0.0, epsilon: float | None = None) -> pa.Table:
    """Held-out spectra: the synthetic random survey (4000-4800 A, air, SNR 50-300) at `seed` (its own
    composition and limb darkening only, no macroturbulence)."""
    if metals or macroturbulence or epsilon is not None:
        raise ValueError("the simplified generator has no metal scaling, macroturbulence or limb darkening "
                         "to choose")
    return synth_table(SynthConfig(n=n, seed=seed, resolving_power=resolving_power))


def tlusty_source(config: str, snr: tuple[float, float] = (50.0, 300.0)) -> Source:
    """Held-out TLUSTY spectra: stars at the test nodes of the grid config `config` (left out of
    training), v sin i uniform, observed with the config's perturbations but no ripple or gap (those
    are perturbations of their own), SNR in `snr`, the grid's composition unless `metals` (dex) is
    given (`gridsynth.scale_metal_lines`); at another resolving power or metals the test-node models
    are broadened again (the same labels per seed), as with radial-tangential `macroturbulence` (km/s)
    or the limb darkening `epsilon` of the rotation profile (None: the config's)."""
    from dataclasses import replace

    from starcast.catalogs import gridsynth
    from starcast.catalogs.grids import read_grid
    from starcast.trainers.config import load_config
    from starcast.trainers.gridsource import GridSource

    cfg = load_config(config)
    grid_source = GridSource(cfg, progress=False)
    nodes = grid_source.full.nodes[grid_source.held["test"]]
    grid = read_grid(grid_source.data.resolve(grid_source.data.path, cfg.source))
    models = grid.select([int(np.flatnonzero((grid.nodes() == node).all(axis=1))[0]) for node in nodes])
    # ripples and gaps: perturbations of their own, below
    pert = replace(grid_source.pert, ripple_prob=0.0, gap_prob=0.0, snr=snr, metals=(0.0, 0.0))

    def source(n: int, seed: int, resolving_power: float, metals: float = 0.0,
               macroturbulence: float = 0.0, epsilon: float | None = None) -> pa.Table:
        rng = np.random.default_rng(seed)
        labels = gridsynth.labels_at(nodes[rng.integers(0, len(nodes), n)], pert, rng)
        labels[METALS] = np.full(n, metals)
        obs = replace(grid_source.obs, resolving_power=resolving_power, macroturbulence=macroturbulence,
                      epsilon=grid_source.obs.epsilon if epsilon is None else epsilon)
        lib = gridsynth.BroadenedLibrary.build(models, obs, metals=np.array([metals]))
        return gridsynth.draw_survey(lib, labels, pert, rng).table(obs)
    return source


def _grid(table: pa.Table) -> WavelengthGrid:
    return WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()])


def _with_grid(table: pa.Table, grid: WavelengthGrid) -> pa.Table:
    meta = {**table.schema.metadata, META_WAVELENGTH.encode(): grid.to_json().encode()}
    return table.replace_schema_metadata(meta)


def _flux(table: pa.Table, name: str = FLUX) -> np.ndarray:
    return np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)


def _set_flux(table: pa.Table, flux: np.ndarray, name: str = FLUX) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, spectrum_array(flux, flux.shape[1]))


def ripple(table, **_):
    wl, rng = _grid(table).values(), np.random.default_rng(1)
    phase = rng.uniform(0, 2 * np.pi, (table.num_rows, 1))
    return _set_flux(table, _flux(table) * (1 + 0.01 * np.sin(2 * np.pi * wl / 50.0 + phase)))


def offset(shift):
    def perturb(table, **_):
        g = _grid(table)
        return _with_grid(table, WavelengthGrid.linear(g.start + shift, g.step, g.n, g.medium))
    return perturb


def resolution(factor, stated: bool = True):
    """The same stars observed at R_SOURCE / `factor`, the resolving power stated in its column or not."""
    def perturb(table, source, n, seed, **_):
        lower = source(n, seed, R_SOURCE / factor)
        if not stated:  # the generator states it in the file's metadata
            return lower.replace_schema_metadata({k: v for k, v in lower.schema.metadata.items()
                                                  if k != META_RESOLVING_POWER.encode()})
        return lower.append_column(RESOLVING_POWER, pa.array(np.full(n, R_SOURCE / factor)))
    return perturb


def gap_he_i_4471(table, **_):
    wl, flux = _grid(table).values(), _flux(table)
    flux[:, (wl > 4456.5) & (wl < 4486.5)] = np.nan
    return _set_flux(table, flux)


def metal_poor(dex: float):
    """The same stars with their metal lines weaker by `dex` (optical depth x 10**-dex)."""
    def perturb(table, source, n, seed, **_):
        return source(n, seed, R_SOURCE, -dex)
    return perturb


def macroturbulent(zeta: float):
    """The same stars with radial-tangential macroturbulence of `zeta` km/s, which the grid's models
    lack and real OB stars show (`gridsynth.Observation`)."""
    def perturb(table, source, n, seed, **_):
        return source(n, seed, R_SOURCE, macroturbulence=zeta)
    return perturb


def limb_darkened(epsilon: float):
    """The same stars with the linear limb darkening `epsilon` in their rotation profile, not the
    customary 0.6 the model was trained with (hot stars darken less towards the limb)."""
    def perturb(table, source, n, seed, **_):
        return source(n, seed, R_SOURCE, epsilon=epsilon)
    return perturb


def normalised(basis: str, size: float, low: float = 1.0, rounds: int = 10):
    """The spectra normalised before they reach starcast, as automated normalisers do: a smooth
    continuum fitted to the upper envelope (pixels more than `low` sigma below the fit left out and the
    rest fitted again, up to `rounds` times), flux and flux_err divided by it. `basis` "spline": a
    cubic spline with knots every `size` Angstrom; "polynomial": a Legendre series of degree `size`
    over the range. A B star's Balmer wings reach tens of Angstrom from H-delta and H-gamma, so a
    continuum that can bend within them follows part of them."""
    from scipy.interpolate import LSQUnivariateSpline

    def continuum(wl, f, w):
        if basis == "spline":
            knots = np.arange(wl[0] + size, wl[-1] - size / 2, size)
            return LSQUnivariateSpline(wl, f, knots, w=w, k=3)
        return np.polynomial.Legendre.fit(wl, f, int(size), w=w)

    def perturb(table, **_):
        wl, flux, err = _grid(table).values(), _flux(table), _flux(table, FLUX_ERR)
        for f, e in zip(flux, err, strict=True):  # in place, row by row
            usable = np.isfinite(f) & (e > 0)
            keep = usable
            for _ in range(rounds):
                fitted = continuum(wl[keep], f[keep], 1.0 / e[keep])(wl)
                kept, keep = keep, usable & (f - fitted > -low * e)
                if (keep == kept).all():
                    break
            f /= fitted
            e /= fitted
        return _set_flux(_set_flux(table, flux), err, FLUX_ERR)
    return perturb


def vacuum(stated: bool):
    def perturb(table, **_):
        values = air_to_vacuum(_grid(table).values())
        return _with_grid(table, WavelengthGrid.explicit(values, "vacuum" if stated else "air"))
    return perturb


def moving(stated: bool, v_max: float = 300.0):
    """The stars receding at rv uniform in +-v_max km/s (per-row wavelengths), the rv column stated
    (with the source's stated-rv error kept) or dropped."""
    def perturb(table, **_):
        rv = np.random.default_rng(3).uniform(-v_max, v_max, table.num_rows)
        grid = _grid(table)
        wl = grid.values()[None, :] / np.sqrt((1.0 - rv / C_KMS) / (1.0 + rv / C_KMS))[:, None]
        wavelength = pa.FixedSizeListArray.from_arrays(pa.array(wl.reshape(-1)), wl.shape[1])
        moved = table.drop_columns([RV]).append_column(WAVELENGTH, wavelength)
        moved = moved.append_column(TRUE_RV, pa.array(rv))
        if stated:
            moved = moved.append_column(RV, pa.array(table.column(RV).to_numpy() + rv))
        return moved
    return perturb


def cosmic_rays(table, hits: int = 5, **_):
    """`hits` cosmic-ray hits per spectrum left in by the reduction: two pixels each, 0.3-2x the
    spectrum's median flux above it, not in flux_err."""
    flux, rng = _flux(table), np.random.default_rng(4)
    rows = np.repeat(np.arange(len(flux)), hits)
    at = rng.integers(0, flux.shape[1] - 1, rows.size)
    height = rng.uniform(0.3, 2.0, rows.size) * np.nanmedian(flux, axis=1)[rows]
    for step in (0, 1):
        flux[rows, at + step] += height
    return _set_flux(table, flux)


def _gaussian(wl: np.ndarray, centre: float, fwhm: float) -> np.ndarray:
    return np.exp(-0.5 * ((wl - centre) / (fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))))) ** 2)


def dib_4428(depth: float, fwhm: float = 20.0, centre: float = 4428.2):
    """The broad diffuse interstellar band at 4428 A (air): a Lorentzian, its shape in Snow, Zukowski &
    Massey (2002, ApJ 578, 877), `depth` deep (5% with a FWHM of 20 A: an equivalent width of ~1.6 A,
    that of a star reddened by E(B-V) of roughly half a magnitude)."""
    def perturb(table, **_):
        u = (_grid(table).values() - centre) / (0.5 * fwhm)
        return _set_flux(table, _flux(table) * (1.0 - depth / (1.0 + u * u))[None, :])
    return perturb


# The strongest narrow diffuse bands at 4000-4800 A (centre in Angstrom, air; FWHM in Angstrom;
# equivalent width in Angstrom per magnitude of E(B-V)): strengths of the order of those of reddened B
# stars (Herbig 1975, ApJ 196, 129; Hobbs et al. 2009, ApJ 705, 32), assumed here, not fitted to any
# sightline (they vary between sightlines by a factor of ~2). Depths: 2-7% at E(B-V) = 1.
NARROW_DIBS = ((4501.8, 3.0, 0.15), (4726.8, 3.5, 0.25), (4762.6, 2.5, 0.10))


def narrow_dibs(ebv: float, velocity: float = 0.0, broad: float = 0.0):
    """The NARROW_DIBS of a star reddened by E(B-V) = `ebv`, Gaussians, in a cloud moving at
    `velocity` km/s relative to the star; with the band at 4428 A (`dib_4428`, FWHM 20 A) `broad`
    deep, if given, moving with them."""
    def perturb(table, **_):
        wl = _grid(table).values() * rest_frame_factor(velocity)  # in the cloud's frame
        # a Gaussian's equivalent width is 1.0645 x its depth x its FWHM
        transmission = np.prod([1.0 - ebv * ew / (1.0645 * fwhm) * _gaussian(wl, centre, fwhm)
                                for centre, fwhm, ew in NARROW_DIBS], axis=0)
        transmission *= 1.0 - broad / (1.0 + ((wl - 4428.2) / 10.0) ** 2)
        return _set_flux(table, _flux(table) * transmission[None, :])
    return perturb


def interstellar_lines(ew: float, v_max: float = 100.0):
    """The interstellar lines of CH+ (4232.55 A) and CH (4300.31 A), `ew` Angstrom of equivalent width
    each (tens of mA on a reddened sightline), unresolved (the instrument's Gaussian profile at
    R_SOURCE), from a cloud moving at a velocity uniform in +-`v_max` km/s relative to each star."""
    def perturb(table, **_):
        wl, rng = _grid(table).values(), np.random.default_rng(6)
        fwhm = 4300.0 / R_SOURCE
        velocity = rng.uniform(-v_max, v_max, (table.num_rows, 1))
        in_cloud = wl[None, :] / (1.0 + velocity / C_KMS)  # [rows, pixels], first order in v / c
        transmission = np.prod([1.0 - ew / (1.0645 * fwhm) * _gaussian(in_cloud, line, fwhm)
                                for line in (4232.55, 4300.31)], axis=0)
        return _set_flux(table, _flux(table) * transmission)
    return perturb


def stated_noise(scale: float):
    """flux_err `scale` times the noise drawn: below 1, a reduction's error model that leaves out part of
    the noise (flat-fielding, read-out, sky); above 1, one that counts some twice."""
    def perturb(table, **_):
        return _set_flux(table, _flux(table, FLUX_ERR) * scale, FLUX_ERR)
    return perturb


def no_flux_err(table, **_):
    """No flux_err column, as many archive spectra come: the engine estimates each spectrum's noise from
    its flux (DER_SNR)."""
    return table.drop_columns([FLUX_ERR])


def be_emission(table, **_):
    """A Be star's circumstellar disc: emission in H-gamma (4340.47 A) and H-delta (4101.74 A), Gaussians
    20% and 12% of the continuum high with a FWHM of 6 A, filling the photospheric line cores."""
    wl, flux = _grid(table).values(), _flux(table)
    emission = 0.20 * _gaussian(wl, 4340.47, 6.0) + 0.12 * _gaussian(wl, 4101.74, 6.0)
    return _set_flux(table, flux + np.nanmedian(flux, axis=1, keepdims=True) * emission[None, :])


def nebular(ew: float, v_max: float = 20.0, fwhm: float = 30.0):
    """An H II region's emission in the aperture: H-gamma of `ew` Angstrom of equivalent width, H-delta
    0.55x and He I 4471 0.09x as strong (the Balmer decrement and the He I / H ratio of an H II region
    about 10 000 K), Gaussians of the gas's `fwhm` km/s within the instrument's profile, at a velocity
    uniform in +-`v_max` km/s relative to each star, on its continuum."""
    def perturb(table, **_):
        wl, flux = _grid(table).values(), _flux(table)
        velocity = np.random.default_rng(8).uniform(-v_max, v_max, (len(flux), 1))
        width = np.hypot(fwhm, C_KMS / R_SOURCE) / C_KMS  # FWHM over the wavelength
        at = 1.0 + velocity / C_KMS
        emission = sum(ew * share / (1.0645 * line * width) * _gaussian(wl[None, :], line * at, line * width)
                       for line, share in ((4340.47, 1.0), (4101.74, 0.55), (4471.48, 0.09)))
        return _set_flux(table, flux + np.nanmedian(flux, axis=1, keepdims=True) * emission)
    return perturb


def veiling(fraction: float):
    """Light without lines added to the star's: `fraction` of its continuum, flat (scattered light the
    reduction left, or a featureless companion's continuum), so every line is shallower by 1 / (1 +
    fraction); flux_err unchanged."""
    def perturb(table, **_):
        flux = _flux(table)
        return _set_flux(table, flux + fraction * np.nanmedian(flux, axis=1, keepdims=True))
    return perturb


def companion(table, ratio: float = 0.3, velocity: float = 150.0, **_):
    """A double-lined binary: each star's spectrum plus that of another star of the set (the next row),
    `ratio` times as bright, moving at +`velocity` km/s relative to it; the labels stay the brighter
    star's."""
    wl, flux = _grid(table).values(), _flux(table)
    other = np.roll(flux, 1, axis=0)
    at = wl * rest_frame_factor(velocity)  # where the companion's light seen at wl was emitted
    shifted = np.stack([np.interp(at, wl, f) for f in other])
    return _set_flux(table, (flux + ratio * shifted) / (1.0 + ratio))


def coverage_half(table, **_):
    g = _grid(table)
    keep = g.values() < 4400.0  # 4010-4400 of the model's 4010-4790 A
    trimmed = _set_flux(table, _flux(table)[:, keep])
    trimmed = _set_flux(trimmed, _flux(trimmed, FLUX_ERR)[:, keep], FLUX_ERR)
    return _with_grid(trimmed, WavelengthGrid.linear(g.start, g.step, int(keep.sum()), g.medium))


PERTURBATIONS = {
    "ripple 1% / 50 A": ripple, "offset +0.3 A": offset(0.3), "offset -0.3 A": offset(-0.3),
    "R / 2 (stated)": resolution(2), "R / 4 (stated)": resolution(4),
    "R 15 000 (not stated)": resolution(R_SOURCE / 15000.0, stated=False),
    "gap 30 A over He I 4471": gap_he_i_4471,
    "vacuum (stated)": vacuum(True), "vacuum (labelled air)": vacuum(False),
    "rv +-300 km/s (stated)": moving(True), "rv +-300 km/s, no rv column": moving(False),
    "coverage 50%": coverage_half,
    "cosmic rays (5 per spectrum)": cosmic_rays, "DIB 4428 A (5% deep)": dib_4428(0.05),
    "DIB 4428 A (10% deep, 22 A wide, at 4429.5 A)": dib_4428(0.10, 22.0, 4429.5),
    "narrow DIBs 4502, 4727, 4763 A (E(B-V) = 1)": narrow_dibs(1.0),
    "all DIBs (E(B-V) = 1, 4428 A 8% deep), cloud at +60 km/s": narrow_dibs(1.0, 60.0, 0.08),
    "all DIBs (E(B-V) = 1, 4428 A 8% deep), cloud at -150 km/s": narrow_dibs(1.0, -150.0, 0.08),
    "interstellar CH+ and CH lines (40 mA each, cloud at +-100 km/s)": interstellar_lines(0.040),
    "flux_err understated 1.2x": stated_noise(1.0 / 1.2), "flux_err overstated 1.2x": stated_noise(1.2),
    "no flux_err (noise from DER_SNR)": no_flux_err,
    "Be emission in H-gamma, H-delta": be_emission,
    "nebular emission (H-gamma 0.05 A, H-delta, He I 4471; +-20 km/s)": nebular(0.05),
    "nebular emission (H-gamma 0.3 A, H-delta, He I 4471; +-20 km/s)": nebular(0.3),
    "companion 0.3x at +150 km/s": companion,
    "veiling 5% (light without lines)": veiling(0.05), "veiling 15% (light without lines)": veiling(0.15),
    "normalised before (cubic)": normalised("polynomial", 3),
    "normalised before (degree 8)": normalised("polynomial", 8),
    "normalised before (spline, knots every 200 A)": normalised("spline", 200.0),
    "normalised before (spline, knots every 100 A)": normalised("spline", 100.0),
}
# for sources whose physics can change (TLUSTY): metals inside ob-default's training span and beyond,
# macroturbulence of a B dwarf and of a supergiant, limb darkening either side of the customary 0.6
PHYSICS_PERTURBATIONS = {"metals -0.2 dex": metal_poor(0.2), "metals -0.5 dex": metal_poor(0.5),
                         "macroturbulence 25 km/s": macroturbulent(25.0),
                         "macroturbulence 60 km/s": macroturbulent(60.0),
                         "limb darkening 0.3": limb_darkened(0.3), "limb darkening 0.9": limb_darkened(0.9)}


def score(results: pa.Table, truth: dict[str, np.ndarray], true_rv: np.ndarray) -> dict:
    """RMSE and 68% coverage per target, the share of rows flagged (bits other than INFORMATIONAL)
    or nulled; with an emulator the median chi^2, MODEL_MISMATCH and the fitted rv against the truth."""
    flags = results.column("flags").to_numpy()
    nulled = results.column("error").is_valid().to_numpy(zero_copy_only=False)
    warned = (flags & ~INFORMATIONAL) != 0
    out = {"rows": results.num_rows, "flagged_or_nulled": float(np.mean(warned | nulled)),
           "nulled": float(np.mean(nulled)), "targets": {},
           "flag_bits": {bit.name: float(np.mean((flags & bit) != 0)) for bit in Flag if (flags & bit).any()}}
    if CHI2 in results.column_names:
        chi2 = results.column(CHI2).to_numpy(zero_copy_only=False).astype(float)
        out["chi2_median"] = float(np.nanmedian(chi2)) if np.isfinite(chi2).any() else None
        out["model_mismatch"] = float(np.mean((flags & Flag.MODEL_MISMATCH) != 0))
        rv = results.column(RV).to_numpy(zero_copy_only=False).astype(float) - true_rv
        rv_err = results.column(RV_ERR).to_numpy(zero_copy_only=False).astype(float)
        ok = np.isfinite(rv) & np.isfinite(rv_err)
        out["rv"] = {"rmse": float(np.sqrt(np.mean(rv[ok] ** 2))) if ok.any() else None,
                     "coverage_68": float(np.mean(np.abs(rv[ok]) <= rv_err[ok])) if ok.any() else None}
    for t in TARGETS:
        mean = results.column(t).to_numpy(zero_copy_only=False).astype(float)
        err = results.column(f"{t}_err").to_numpy(zero_copy_only=False).astype(float)
        ok = np.isfinite(mean)
        r = mean[ok] - truth[t][ok]
        out["targets"][t] = {"rmse": float(np.sqrt(np.mean(r**2))) if ok.any() else None,
                             "coverage_68": float(np.mean(np.abs(r) <= err[ok])) if ok.any() else None}
        if t == "vsini":
            slow = truth[t][ok] < SLOW
            out["targets"][t]["slow_bias"] = float(np.mean(r[slow])) if slow.any() else None
    return out


def verdict(entry: dict, clean: dict) -> bool:
    if entry["flagged_or_nulled"] >= 0.95:
        return True
    return all(e["rmse"] is not None and e["rmse"] <= 1.5 * c["rmse"]
               and abs(e["coverage_68"] - c["coverage_68"]) <= 0.05
               for e, c in zip(entry["targets"].values(), clean["targets"].values(), strict=True))


def run_matrix(model, source: Source = synthetic_source, n: int = 200, seed: int = 2026,
               perturbations: dict = PERTURBATIONS) -> dict:
    """Score the clean spectra of `source` and each of `perturbations` of them with `model`."""
    clean = source(n, seed, R_SOURCE)
    truth = {t: clean.column(t).to_numpy() for t in TARGETS}

    def predict_and_score(table):
        true_rv = table.column(TRUE_RV).to_numpy() if TRUE_RV in table.column_names else np.zeros(n)
        hidden = [c for c in (*TARGETS, METALS, TRUE_RV) if c in table.column_names]
        results = model.predict(table.drop_columns(hidden), backend="cpu")
        return results, score(results, truth, true_rv)
    clean_results, clean_score = predict_and_score(clean)
    report = {"clean": clean_score, "perturbations": {}}
    if model.emulator is not None:  # the goal of issue 10: median chi2 within 0.9-1.1 in every SNR bin
        from starcast.trainers.emulator import chi2_by_snr

        chi2 = clean_results.column(CHI2).to_numpy(zero_copy_only=False).astype(float)
        flags = clean_results.column(FLAGS).to_numpy(zero_copy_only=False)
        report["clean"]["chi2_by_snr"] = chi2_by_snr(chi2, clean.column(SNR).to_numpy(),
                                                     (flags & Flag.MODEL_MISMATCH) != 0)
        report["clean"]["infer_rows_per_s"] = infer_rates(model, clean.drop_columns(list(TARGETS)))
    for name, perturb in perturbations.items():
        t0 = time.perf_counter()
        entry = predict_and_score(perturb(clean, source=source, n=n, seed=seed))[1]
        entry["passes"] = verdict(entry, report["clean"])
        entry["seconds"] = time.perf_counter() - t0
        report["perturbations"][name] = entry
    return report


def infer_rates(model, table: pa.Table) -> dict:
    """Rows/s of `infer` (CPU backend) on prepared rows: the ensemble alone, with the emulator's chi^2
    without refinement, and as shipped."""
    from dataclasses import replace

    from starcast.engine.predictor import Model

    variants = {"ensemble only": None, "chi2, no refinement": replace(model.emulator, refine_steps=0),
                "chi2 as shipped": model.emulator}
    out = {}
    for name, emulator in variants.items():
        m = Model(replace(model.bundle, emulator=emulator))
        prepared = m.prepare(table)
        t0 = time.perf_counter()
        m.infer(prepared, backend="cpu")
        out[name] = round(table.num_rows / (time.perf_counter() - t0), 1)
    return out


def markdown(report: dict, command: str) -> str:
    clean = report["clean"]
    summary = ", ".join(f"{t} RMSE {c['rmse']:.4g}, 68% coverage {100 * c['coverage_68']:.1f}%"
                        for t, c in clean["targets"].items())
    summary += f"; v sin i bias where true < {SLOW:.0f} km/s {clean['targets']['vsini']['slow_bias']:+.2f}"
    fit = "chi2_median" in clean  # a model with an emulator
    lines = [f"# Perturbation matrix ({report['model']}, bundle {report['bundle_sha256']})", "",
             f"Command: `{command}`", "",
             f"Source: {report.get('source', 'synthetic')}. Clean: {clean['rows']} held-out spectra, "
             f"{100 * clean['flagged_or_nulled']:.1f}% flagged or nulled (goal <= 2%); {summary}", "",
             "Flag bits on clean rows: "
             + ", ".join(f"{k} {100 * v:.1f}%" for k, v in clean["flag_bits"].items())
             + f" (flagged counts bits other than {INFORMATIONAL!r})", ""]
    if fit:
        bins = ", ".join(f"SNR {b['snr_lo']:.0f}-{b['snr_hi']:.0f}: {b['median_chi2']:.2f} ({b['n']} rows)"
                         for b in clean["chi2_by_snr"])
        rates = ", ".join(f"{k} {v:.0f}" for k, v in clean["infer_rows_per_s"].items())
        lines += [f"Clean median chi2 {clean['chi2_median']:.3f}, MODEL_MISMATCH on "
                  f"{100 * clean['model_mismatch']:.1f}% of clean rows; median chi2 by SNR: {bins}. "
                  f"Fitted rv against the truth: RMSE {clean['rv']['rmse']:.2f} km/s, 68% coverage of "
                  f"rv_err {100 * clean['rv']['coverage_68']:.1f}%.", "",
                  f"`infer` on the clean rows (CPU backend, rows/s): {rates}.", ""]
    extra = " MODEL_MISMATCH | median chi2 | rv RMSE (km/s) |" if fit else ""
    lines += ["| perturbation | flagged or nulled | nulled |" + extra + " " + " | ".join(
                 f"{t} RMSE / clean | {t} cov68" for t in TARGETS)
              + f" | vsini bias, true < {SLOW:.0f} (km/s) | passes |",
              "| --- | --- | --- |" + (" --- | --- | --- |" if fit else "") + " "
              + " | ".join("--- | ---" for _ in TARGETS) + " | --- | --- |"]
    for name, e in report["perturbations"].items():
        cells = []
        for t in TARGETS:
            m, c = e["targets"][t], clean["targets"][t]
            cells += ["-", "-"] if m["rmse"] is None else [f"{m['rmse'] / c['rmse']:.2f}",
                                                           f"{100 * m['coverage_68']:.1f}%"]
        if fit:
            median = "-" if e["chi2_median"] is None else f"{e['chi2_median']:.2f}"
            rv = "-" if e["rv"]["rmse"] is None else f"{e['rv']['rmse']:.1f}"
            cells = [f"{100 * e['model_mismatch']:.1f}%", median, rv, *cells]
        slow = e["targets"]["vsini"].get("slow_bias")
        cells.append("-" if slow is None else f"{slow:+.1f}")
        lines.append(f"| {name} | {100 * e['flagged_or_nulled']:.1f}% | {100 * e['nulled']:.1f}% | "
                     + " | ".join(cells) + f" | {'yes' if e['passes'] else '**no**'} |")
    lines += ["", "Pass: RMSE <= 1.5x clean and 68% coverage within 5 points of clean for every target, or "
              ">= 95% of rows flagged or nulled. RMSE over rows with numbers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="held-out spectra per perturbation")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the held-out survey")
    parser.add_argument("--model", default="ob-default")
    parser.add_argument("--model-resolving-power", type=float, default=None,
                        help="treat the model as stating this R (for a model whose manifest does not)")
    parser.add_argument("--source", choices=("synthetic", "tlusty"), default="tlusty",
                        help="held-out spectra: the synthetic survey, or TLUSTY stars at test nodes")
    default_config = Path(__file__).parents[1] / "trainers/configs/ob-default.toml"
    parser.add_argument("--config", default=str(default_config),
                        help="the grid config whose test nodes --source tlusty draws from")
    args = parser.parse_args()
    model = load_model(args.model)
    if args.model_resolving_power is not None:
        model.resolving_power = args.model_resolving_power
    tlusty = args.source == "tlusty"
    source = tlusty_source(args.config) if tlusty else synthetic_source
    report = run_matrix(model, source=source, n=args.n, seed=args.seed,
                        perturbations={**PERTURBATIONS, **(PHYSICS_PERTURBATIONS if tlusty else {})})
    report.update(model=model.name, bundle_sha256=model.bundle.manifest["bundle_sha256"][:12],
                  model_sha256=model.bundle.weights_sha256, n=args.n, seed=args.seed,
                  source=args.source if args.source == "synthetic" else f"tlusty test nodes of {args.config}",
                  model_resolving_power=model.resolving_power, command=" ".join(["python", *sys.argv]),
                  machine={"cpu": platform.processor(), "cores_visible": len(os.sched_getaffinity(0)),
                           "python": platform.python_version(), "starcast": starcast.__version__})
    r = args.model_resolving_power
    stem = "perturbations" + ("" if r is None else f"_r{r:.0f}")
    stem += "" if args.source == "synthetic" else "_tlusty"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report, report["command"]))
    print(markdown(report, report["command"]))


if __name__ == "__main__":
    main()
