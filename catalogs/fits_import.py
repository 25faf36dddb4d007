"""Importer for archive spectra in FITS: 1-D images with a wavelength WCS, and binary tables.

An image HDU with one axis (or a 1 x N one: NAXIS2 = 1) is a spectrum whose wavelengths come from its
WCS (CRVAL1, CD1_1 or else CDELT1, CRPIX1; linear, IRAF log10 with DC-FLAG = 1, or FITS `-LOG`; units
from CUNIT1, Angstrom when absent); an image extension named ERR/ERROR/SIGMA/NOISE (1 sigma) or IVAR of
the same shape gives its errors (in a file of several spectra, the one of its EXTVER or right after
it). A binary table holds a wavelength column (wavelength, wave, lambda; or SDSS's loglam, log10 A)
and flux, optionally flux_err/error/err/sigma, ivar and mask or QUAL (names case-insensitive): one
spectrum per row when the cells are arrays, else the whole table is one spectrum. Errors are kept as
the file gives them, as `flux_err` or `ivar` (1/err^2 in float32 would overflow at small flux scales,
e.g. cgs per Hz). Each file gives its first spectrum HDU (or `hdu`). Output rows have their own
`wavelength`, in one medium (`starcast.medium`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import CatalogError
from .io import new_output_dir, write_catalog
from .medium import AIR, VACUUM, check_medium, convert
from .schema import (
    FLUX,
    FLUX_ERR,
    ID,
    IVAR,
    MASK,
    META_MEDIUM,
    META_RESOLVING_POWER,
    RESOLVING_POWER,
    WAVELENGTH,
    pixels_metadata,
    spectrum_type,
)

WAVELENGTH_NAMES = ("wavelength", "wave", "lambda")
LOG10_WAVELENGTH_NAMES = ("loglam",)  # SDSS: log10 of the vacuum wavelength in Angstrom
ERROR_NAMES = ("flux_err", "error", "err", "sigma", "flux_error")
MASK_NAMES = ("mask", "qual")  # non-zero = bad; QUAL: ESO Phase 3 spectra
ERROR_EXTENSIONS = ("ERR", "ERROR", "SIGMA", "NOISE")  # 1-sigma errors
NOISE_EXTENSIONS = (*ERROR_EXTENSIONS, "IVAR")  # image extensions that hold a spectrum's noise
# Wavelength units as archive headers spell them (lower-cased), many of which astropy does not read
# (it reads 'A' as the ampere); others go to astropy.
ANGSTROM_PER_UNIT = {
    **dict.fromkeys(("a", "aa", "angstrom", "angstroms", "angstroem"), 1.0),
    **dict.fromkeys(("nm", "nanometer", "nanometers", "nanometre", "nanometres"), 10.0),
    **dict.fromkeys(("um", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"),
                    1e4),
}


@dataclass
class FitsSpectrum:
    """One spectrum read from a FITS HDU: wavelengths in Angstrom in `medium` (None: not stated), at
    `resolving_power` (lambda / FWHM; None: not stated)."""

    id: str
    wavelength: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray | None
    ivar: np.ndarray | None
    mask: np.ndarray | None
    medium: str | None
    resolving_power: float | None = None


def _file_id(path: Path) -> str:
    """A spectrum's id from its file's name: the name without its suffix, and without that of the
    compression astropy reads through (x.fits.gz -> x)."""
    stem = Path(path.stem) if path.suffix.lower() in (".gz", ".bz2", ".zip") else path
    return stem.stem


def _fail(path: Path, index: int | None, reason: str) -> CatalogError:
    where = f"HDU {index}: " if index is not None else ""
    return CatalogError(where + reason, file=str(path))


def _angstrom_per_unit(unit: str | None, path: Path, index: int) -> float:
    from astropy import units as u

    if unit is None or not str(unit).strip():
        return 1.0
    text = str(unit).strip()
    if text.lower() in ANGSTROM_PER_UNIT:
        return ANGSTROM_PER_UNIT[text.lower()]
    try:
        return float(u.Unit(text).to(u.AA))
    except (ValueError, u.UnitConversionError):
        raise _fail(path, index, f"wavelength unit {unit!r} is not a length unit starcast knows (Angstrom, "
                                 "nm, um, or one astropy reads, e.g. m)") from None


def _header_medium(header) -> str | None:
    """The medium a header states: AIRORVAC ('air'/'vac'), VACUUM (T/F), or CTYPE1 'AWAV' (air)."""
    value = header.get("AIRORVAC")
    if isinstance(value, str) and value.strip().lower()[:3] in ("air", "vac"):
        return AIR if value.strip().lower().startswith("air") else VACUUM
    if isinstance(header.get("VACUUM"), bool):
        return VACUUM if header["VACUUM"] else AIR
    if str(header.get("CTYPE1", "")).upper().startswith("AWAV"):
        return AIR
    return None


def _wcs_wavelength(header, n: int, path: Path, index: int) -> np.ndarray:
    # CD1_1 wins: beside a CD matrix CDELTi is ignored (FITS WCS Paper I, Greisen & Calabretta 2002)
    step = header.get("CD1_1", header.get("CDELT1"))
    if header.get("CRVAL1") is None or step is None:
        raise _fail(path, index, "1-D image without a wavelength WCS (need CRVAL1 and CDELT1 or CD1_1)")
    x = float(step) * (np.arange(1, n + 1) - float(header.get("CRPIX1", 1.0)))
    crval, ctype = float(header["CRVAL1"]), str(header.get("CTYPE1", "")).upper()
    if header.get("DC-FLAG") == 1:  # IRAF: log10-linear, CRVAL1 and CDELT1 in log10 units
        return 10.0 ** (crval + x) * _angstrom_per_unit(header.get("CUNIT1"), path, index)
    if ctype.endswith("-LOG"):  # FITS WCS Paper III (Greisen et al. 2006, eq. 5)
        return crval * np.exp(x / crval) * _angstrom_per_unit(header.get("CUNIT1"), path, index)
    return (crval + x) * _angstrom_per_unit(header.get("CUNIT1"), path, index)


def _extname(hdu) -> str:
    return str(hdu.header.get("EXTNAME", "")).upper()


def _extver(hdu) -> int:
    return hdu.header.get("EXTVER", 1)  # 1 when absent (FITS standard 4.0, sec. 4.4.2.6)


def _error_hdu(hdul, index: int, path: Path) -> int | None:
    """The number of the error extension of the spectrum in HDU `index`, or None: the one error extension
    of its EXTVER when no other spectrum (an image of its EXTNAME) shares that EXTVER, else the one right
    after it when each such spectrum is followed by one; any other layout is an error, not a guess."""
    hdu = hdul[index]
    errors = [i for i, h in enumerate(hdul) if i != index and _extname(h) in NOISE_EXTENSIONS
              and h.data is not None and _extver(h) == _extver(hdu)]
    siblings = [i for i, h in enumerate(hdul) if _one_axis(h) and _extname(h) == _extname(hdu)
                and _extver(h) == _extver(hdu)]
    if not errors:
        return None
    if len(errors) == 1 and siblings == [index]:
        return errors[0]
    if all(i + 1 in errors for i in siblings):
        return index + 1
    hdus, spectra = (", ".join(map(str, numbers)) for numbers in (errors, siblings))
    raise _fail(path, index, f"cannot tell whose errors HDU {hdus} hold: spectra HDU {spectra} share "
                             f"their EXTVER {_extver(hdu)}; give each spectrum and its errors one EXTVER, or "
                             "put the errors right after their spectrum")


def _one_axis(hdu) -> bool:
    """An image of one axis, or of two whose second is 1 long (NAXIS2 = 1: a 1 x N image)."""
    axes = hdu.header.get("NAXIS")
    return hdu.is_image and (axes == 1 or (axes == 2 and hdu.header.get("NAXIS2") == 1))


def _image(hdul, index: int, path: Path) -> list[FitsSpectrum]:
    hdu = hdul[index]
    flux = np.asarray(hdu.data, dtype=np.float64).reshape(-1)
    wl = _wcs_wavelength(hdu.header, len(flux), path, index)
    flux_err = ivar = None
    number = _error_hdu(hdul, index, path)
    if number is not None:
        other, name = hdul[number], _extname(hdul[number])
        if getattr(other.data, "shape", None) != hdu.data.shape:
            raise _fail(path, number, f"{name} has shape {getattr(other.data, 'shape', None)}, the flux "
                                      f"(HDU {index}) {hdu.data.shape}: an error array must match the flux")
        errors = np.asarray(other.data, dtype=np.float64).reshape(-1)
        if name == "IVAR":
            ivar = _checked_ivar(errors, path, number, name)
        else:
            flux_err = errors
    medium = _header_medium(hdu.header) or _header_medium(hdul[0].header)
    return [FitsSpectrum(_file_id(path), wl, flux, flux_err, ivar, None, medium)]


def _checked_ivar(ivar: np.ndarray, path: Path, index: int, name: str) -> np.ndarray:
    """`ivar`, refused where a finite value is beyond float32 (the catalog's `ivar`: it would become
    inf, a bad pixel)."""
    big = np.isfinite(ivar) & (np.abs(ivar) > np.finfo(np.float32).max)
    if big.any():
        raise _fail(path, index, f"{name} holds {ivar[big][0]:.3g}, beyond float32 (the catalog's ivar); "
                                 "scale the flux, or give 1-sigma errors instead")
    return ivar


def _column(columns: dict, names: tuple[str, ...]):
    return next((columns[n] for n in names if n in columns), None)


def _table(hdul, index: int, path: Path) -> list[FitsSpectrum]:
    hdu = hdul[index]
    data = hdu.data
    columns = {name.lower(): name for name in data.columns.names}
    units = {name.lower(): unit for name, unit in zip(data.columns.names, data.columns.units, strict=True)}
    wl_name = _column(columns, WAVELENGTH_NAMES)
    log_name = _column(columns, LOG10_WAVELENGTH_NAMES)
    if "flux" not in columns or (wl_name is None and log_name is None):
        raise _fail(path, index, f"table needs a flux and a wavelength column ({', '.join(WAVELENGTH_NAMES)} "
                                 f"or loglam); it has {', '.join(data.columns.names)}")
    if wl_name is not None:
        wl = np.asarray(data[wl_name], np.float64) * _angstrom_per_unit(units[wl_name.lower()], path, index)
    else:
        wl = 10.0 ** np.asarray(data[log_name], np.float64)
    flux = np.asarray(data[columns["flux"]], np.float64)
    err_name, ivar_name = _column(columns, ERROR_NAMES), columns.get("ivar")
    flux_err = np.asarray(data[err_name], np.float64) if err_name is not None else None
    ivar = (_checked_ivar(np.asarray(data[ivar_name], np.float64), path, index, ivar_name)
            if ivar_name is not None and err_name is None else None)
    masks = [np.asarray(data[columns[name]]) != 0 for name in MASK_NAMES if name in columns]
    mask = np.logical_or.reduce(masks) if masks else None
    medium = _header_medium(hdu.header) or _header_medium(hdul[0].header)
    if log_name is not None and wl_name is None and medium is None:
        medium = VACUUM  # SDSS's loglam is vacuum
    if flux.ndim == 1:  # scalar columns: the table is one spectrum
        return [FitsSpectrum(_file_id(path), wl, flux, flux_err, ivar, mask, medium)]
    wl = np.broadcast_to(wl, flux.shape)
    return [FitsSpectrum(f"{_file_id(path)}:{i}", wl[i], flux[i], *(None if a is None else a[i]
                                                                   for a in (flux_err, ivar, mask)), medium)
            for i in range(len(flux))]


def _is_spectrum(hdu) -> bool:
    from astropy.io import fits

    if isinstance(hdu, fits.BinTableHDU):
        names = {n.lower() for n in hdu.columns.names}
        return "flux" in names and bool(names & {*WAVELENGTH_NAMES, *LOG10_WAVELENGTH_NAMES})
    return _one_axis(hdu) and hdu.data is not None and _extname(hdu) not in NOISE_EXTENSIONS


def read_fits(file: str | Path, *, hdu: int | None = None,
              resolving_power: float | None = None) -> list[FitsSpectrum]:
    """The spectra of one FITS file: its first spectrum HDU, or HDU number `hdu` (0 = primary), at
    `resolving_power`, else at the one their header states (SPEC_RES)."""
    from astropy.io import fits

    path = Path(file)
    if not path.is_file():
        raise CatalogError("no such file", file=str(path))
    try:
        with fits.open(path, memmap=False) as hdul:
            if hdu is not None and not 0 <= hdu < len(hdul):
                raise _fail(path, hdu, f"no such HDU (the file has {len(hdul)})")
            index = hdu if hdu is not None else next((i for i, h in enumerate(hdul) if _is_spectrum(h)), None)
            if index is None:
                raise _fail(path, None, "no spectrum: no 1-D image with a wavelength WCS and no table with "
                                        "wavelength and flux columns")
            if isinstance(hdul[index], fits.BinTableHDU):
                spectra = _table(hdul, index, path)
            elif _one_axis(hdul[index]):
                spectra = _image(hdul, index, path)
            else:
                raise _fail(path, index, "not a 1-D image or a binary table")
            if resolving_power is None:
                resolving_power = _header_resolving_power(hdul, index, path)
    except CatalogError:
        raise
    except Exception as exc:  # whatever astropy raises on a malformed file: named as the file's fault
        raise CatalogError(f"not a readable FITS file ({type(exc).__name__}: {exc})", file=str(path)) from exc
    return [_increasing(replace(s, resolving_power=resolving_power)) for s in spectra]


def _header_resolving_power(hdul, index: int, path: Path) -> float | None:
    """SPEC_RES (ESO Phase 3: the resolving power, lambda / FWHM) of HDU `index`, else of the primary."""
    for number in dict.fromkeys((index, 0)):
        value = hdul[number].header.get("SPEC_RES")
        if value is None:
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)  # T/F is a bool
        if not (is_number and math.isfinite(value) and value > 0):
            raise _fail(path, number, f"SPEC_RES is {value!r}, not a resolving power (a positive number); "
                                      "state one with --resolving-power")
        return float(value)
    return None


def _increasing(s: FitsSpectrum) -> FitsSpectrum:
    """Archives also store spectra red to blue: reverse those, so wavelengths increase."""
    if len(s.wavelength) > 1 and s.wavelength[0] > s.wavelength[-1]:
        flip = slice(None, None, -1)
        return replace(s, wavelength=s.wavelength[flip], flux=s.flux[flip],
                       **{k: None if a is None else a[flip] for k, a in
                          (("flux_err", s.flux_err), ("ivar", s.ivar), ("mask", s.mask))})
    return s


def fits_to_table(files, *, medium: str = VACUUM, resolving_power: float | None = None,
                  hdu: int | None = None, pixels: str | None = None,
                  on_bad: Callable[[CatalogError], None] | None = None) -> pa.Table:
    """Read FITS files into one catalog table with per-row `wavelength` (Angstrom), `flux`, `flux_err`,
    `ivar` and `mask` (null rows where a file has none). `medium` is assumed where a header states none;
    when the files state different media every row is converted to vacuum. `resolving_power`, if given,
    is every spectrum's (`starcast.resolving_power`), else a `resolving_power` column holds what the
    headers state (SPEC_RES; null where none), if any does. `pixels`, if given, is what every flux value
    is (`starcast.pixels`). A file given twice is read once. A file that cannot be read, or whose ids an
    earlier file has, raises its `CatalogError`; with `on_bad`, that takes the error instead and the
    file is left out."""
    try:
        check_medium(medium)
    except ValueError as exc:
        raise CatalogError(str(exc)) from None
    if resolving_power is not None and not (math.isfinite(resolving_power) and resolving_power > 0):
        raise CatalogError(f"resolving power must be positive, got {resolving_power}")
    spectra, source, read = [], {}, []
    for f in {Path(f).resolve(): f for f in files}.values():  # overlapping globs name a file twice
        try:
            found = read_fits(f, hdu=hdu, resolving_power=resolving_power)
            clash = next((s.id for s in found if s.id in source), None)
            if clash is not None:
                raise CatalogError(f"id {clash!r} (the file name) is also that of {source[clash]}; "
                                   "rename one", file=str(f))
        except CatalogError as exc:
            if on_bad is None:
                raise
            on_bad(exc)
            continue
        source.update((s.id, str(f)) for s in found)
        spectra += found
        read.append(str(f))
    if not spectra:
        raise CatalogError("no FITS file could be read" if files else "no FITS files given")
    media = {s.medium or medium for s in spectra}
    target = media.pop() if len(media) == 1 else VACUUM
    columns = {ID: pa.array([s.id for s in spectra], pa.string()),
               FLUX: pa.array([s.flux.astype(np.float32) for s in spectra], spectrum_type()),
               WAVELENGTH: pa.array([convert(s.wavelength, s.medium or medium, target) for s in spectra],
                                    spectrum_type(None, pa.float64()))}
    for name in (FLUX_ERR, IVAR):
        rows = [getattr(s, name) for s in spectra]
        if any(r is not None for r in rows):
            columns[name] = pa.array([None if r is None else r.astype(np.float32) for r in rows],
                                     spectrum_type())
    if any(s.mask is not None for s in spectra):
        columns[MASK] = pa.array([None if s.mask is None else s.mask for s in spectra],
                                 spectrum_type(None, pa.bool_()))
    meta = {META_MEDIUM: target, "starcast.source": json.dumps({"fits": read})}
    if resolving_power is not None:
        meta[META_RESOLVING_POWER] = json.dumps(float(resolving_power))
    elif any(s.resolving_power is not None for s in spectra):
        columns[RESOLVING_POWER] = pa.array([s.resolving_power for s in spectra], pa.float64())
    meta.update(pixels_metadata(pixels))
    return pa.table(columns).replace_schema_metadata(meta)


def import_fits(files, out: str | Path, *, medium: str = VACUUM, resolving_power: float | None = None,
                hdu: int | None = None, shard_rows: int = 10000, pixels: str | None = None,
                on_bad: Callable[[CatalogError], None] | None = None) -> list[Path]:
    """Import FITS spectra as Parquet shards `out/part-00000.parquet`, ...; returns their paths
    (`on_bad`: as `fits_to_table`'s)."""
    table = fits_to_table(files, medium=medium, resolving_power=resolving_power, hdu=hdu, pixels=pixels,
                          on_bad=on_bad)
    out = new_output_dir(out)
    step = max(int(shard_rows), 1)
    return [write_catalog(table.slice(start, step), out / f"part-{i:05d}.parquet")
            for i, start in enumerate(range(0, table.num_rows, step))]
