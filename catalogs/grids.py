"""Grids of model spectra (TLUSTY/SYNSPEC and the like): the unbroadened, continuum-normalised flux of
a set of model atmospheres on one wavelength array, with each model's parameters.

`read_grid` takes an npz (the layout of `shared/data/tlusty-bstar2006`), a wide CSV (parameter columns
and one column per wavelength), a Parquet catalog (a `flux` list column and parameter columns), or a
directory of two-column text spectra (wavelength, flux; Synspec/Tlusty outputs) whose parameters come
from a `params.csv` beside them or from their file names. Broadening and drawing stars from a grid
live in `gridsynth.py`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ..errors import CatalogError
from .medium import MEDIA, check_medium

PARAMS = ("teff", "logg")  # K, dex (cgs): the axes a grid spans
# BSTAR2006/OSTAR2002 model names (Lanz & Hubeny 2003, 2007): BG20000g350v2 = Teff 20 000 K,
# log g 3.50, vturb 2 km/s.
TLUSTY_NAME = r"(?<!\d)(?P<teff>\d{5})g(?P<logg>\d{3})(?!\d)"
TEXT_SUFFIXES = (".txt", ".dat", ".7", ".17", ".spec", ".norm", ".asc")
NORMALISED = (0.5, 1.5)  # a continuum-normalised model's median flux lies well inside this


@dataclass(frozen=True)
class ModelGrid:
    """N model spectra on one wavelength array (Angstrom, `medium` air or vacuum), flux normalised to
    the continuum and not broadened; `params[name]` holds each model's value (teff K, logg dex)."""

    wavelength: np.ndarray  # (P,) float64, strictly increasing
    flux: np.ndarray  # (N, P) float32
    params: dict[str, np.ndarray]  # name -> (N,) float64
    names: np.ndarray  # (N,) str
    medium: str = "air"

    def __post_init__(self):
        n, p = self.flux.shape
        if self.wavelength.shape != (p,) or not np.all(np.diff(self.wavelength) > 0):
            raise CatalogError(f"a model grid needs one strictly increasing wavelength array of {p} values")
        for name in PARAMS:
            if name not in self.params or self.params[name].shape != (n,):
                raise CatalogError(f"a model grid needs the parameter {name!r} for each of its {n} models")
        if self.medium not in MEDIA:
            raise CatalogError(f"medium must be 'air' or 'vacuum', got {self.medium!r}")

    def nodes(self) -> np.ndarray:
        """(N, 2) Teff, log g of the models."""
        return np.stack([self.params[name] for name in PARAMS], axis=1)

    def crop(self, lo: float, hi: float) -> ModelGrid:
        """The same models between `lo` and `hi` Angstrom."""
        inside = (self.wavelength >= lo) & (self.wavelength <= hi)
        return ModelGrid(self.wavelength[inside], self.flux[:, inside], self.params, self.names, self.medium)

    def select(self, keep: np.ndarray) -> ModelGrid:
        """The models where `keep` (bool or index array) holds."""
        return ModelGrid(self.wavelength, self.flux[keep], {k: v[keep] for k, v in self.params.items()},
                         self.names[keep], self.medium)


def write_npz(grid: ModelGrid, path: str | Path) -> Path:
    """Write `grid` in the npz layout `read_grid` reads (compressed)."""
    path = Path(path)
    np.savez_compressed(path, **{f"wavelength_{grid.medium}": grid.wavelength, "flux": grid.flux,
                                 "model": grid.names, **grid.params})
    return path


def read_grid(path: str | Path, *, medium: str | None = None, name_pattern: str = TLUSTY_NAME,
              quality_only: bool = True) -> ModelGrid:
    """Read a model grid (see the module docstring for the formats). `medium`: the medium of a grid
    whose file states none (a CSV, a directory of text spectra, an npz's plain `wavelength`; air where
    not given); a file that states another (an npz's `wavelength_air` / `wavelength_vacuum`, a Parquet
    file's grid) is an error. `quality_only` drops models an npz marks `quality_ok = False`.
    `name_pattern`: a regex with named groups `teff` and `logg` (log g as 3 digits, x100) for text
    spectra without a params.csv."""
    path = Path(path)
    try:
        grid = _read(path, medium, name_pattern, quality_only)
    except CatalogError as exc:
        if exc.file is None:
            raise CatalogError(exc.reason, file=str(path), row=exc.row, column=exc.column) from None
        raise
    except (ValueError, TypeError, IndexError, KeyError, OSError) as exc:  # what the readers do not foresee
        raise CatalogError(f"not a readable model grid ({type(exc).__name__}: {exc})",
                           file=str(path)) from None
    _check_models(grid, path)
    return grid


def _medium(stated: str | None, given: str | None, path: Path) -> str:
    """A grid's medium: what its file states, else `given`, else air; a file that states another than
    `given` is an error (its wavelengths would be taken 1.2 A off at 4500 A)."""
    if given is not None:
        try:
            check_medium(given, "a grid's medium")
        except ValueError as exc:
            raise CatalogError(str(exc), file=str(path)) from None
    if stated is not None and given is not None and stated != given:
        raise CatalogError(f"the grid's file states its wavelengths are in {stated}, not in {given} as given",
                           file=str(path))
    return stated or given or "air"


def _read(path: Path, medium: str | None, name_pattern: str, quality_only: bool) -> ModelGrid:
    if path.is_dir():
        return _read_text_dir(path, name_pattern, _medium(None, medium, path))
    if not path.is_file():
        raise CatalogError("no such file or directory", file=str(path))
    if path.suffix == ".npz":
        return _read_npz(path, medium, quality_only)
    if path.suffix == ".csv":
        return _read_csv(path, _medium(None, medium, path))
    if path.suffix == ".parquet":
        return _read_parquet(path, medium)
    raise CatalogError("unknown model-grid format (expected .npz, .csv, .parquet or a directory of "
                       "two-column text spectra)", file=str(path))


def _check_models(grid: ModelGrid, path: Path) -> None:
    """At least one model; each model's flux finite and continuum-normalised (median within NORMALISED),
    its parameters finite, and no two models at one node; else a `CatalogError` naming the model."""
    if not len(grid.flux):
        raise CatalogError("the grid holds no models (of good quality, where it marks them)", file=str(path))
    nodes, median = grid.nodes(), np.median(grid.flux, axis=1)
    _, first, counts = np.unique(nodes, axis=0, return_index=True, return_counts=True)
    checks = (
        (~np.isfinite(grid.flux).all(axis=1), lambda r: "has non-finite flux"),
        ((median < NORMALISED[0]) | (median > NORMALISED[1]),
         lambda r: f"has a median flux of {median[r]:.3g}: a grid's flux is normalised to the continuum "
                   "(e.g. SYNSPEC's fort.7 over its fort.17)"),
        (~np.isfinite(nodes).all(axis=1),
         lambda r: f"has non-finite parameters {dict(zip(PARAMS, nodes[r].tolist(), strict=True))}"),
        (np.isin(np.arange(len(nodes)), first[counts > 1]),
         lambda r: f"shares its node {dict(zip(PARAMS, nodes[r].tolist(), strict=True))} with "
                   f"{', '.join(str(n) for n in grid.names[(nodes == nodes[r]).all(axis=1)][1:])}: "
                   "one model per node"),
    )
    for bad, reason in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CatalogError(f"model {grid.names[row]} {reason(row)}", file=str(path), row=row)


def _read_npz(path: Path, medium: str | None, quality_only: bool) -> ModelGrid:
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        wl_key = next((k for k in ("wavelength_air", "wavelength_vacuum", "wavelength") if k in keys), None)
        missing = [k for k in ("flux", *PARAMS) if k not in keys] + ([] if wl_key else ["wavelength"])
        if missing:
            raise CatalogError(f"the npz lacks the arrays {missing}", file=str(path))
        stated = {"wavelength_air": "air", "wavelength_vacuum": "vacuum"}.get(wl_key)
        n = data["flux"].shape[0]
        names = data["model"].astype(str) if "model" in keys else np.array([f"model{i}" for i in range(n)])
        grid = ModelGrid(np.asarray(data[wl_key], np.float64), np.asarray(data["flux"], np.float32),
                         {k: np.asarray(data[k], np.float64) for k in PARAMS}, names,
                         _medium(stated, medium, path))
        if quality_only and "quality_ok" in keys:
            grid = grid.select(np.asarray(data["quality_ok"], bool))
    return grid


def _csv_rows(path: Path) -> list[list[str]]:
    """A CSV's rows as spreadsheets write them: a byte-order mark and blank lines dropped, the header's
    names stripped."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    return [[name.strip() for name in rows[0]], *rows[1:]] if rows else []


def _read_csv(path: Path, medium: str) -> ModelGrid:
    rows = _csv_rows(path)
    if len(rows) < 2:
        raise CatalogError("a grid CSV needs a header row and at least one model row", file=str(path))
    header = rows[0]
    pixels = [(i, _as_float(h)) for i, h in enumerate(header) if _as_float(h) is not None]
    cols = {h.strip().lower(): i for i, h in enumerate(header)}  # Teff, LOGG, Model as teff, logg, model
    missing = [p for p in PARAMS if p not in cols]
    if missing or not pixels:
        raise CatalogError(f"a grid CSV needs the columns {list(PARAMS)} and wavelength headers "
                           f"(missing: {missing or 'wavelength columns'})", file=str(path))
    flux = np.empty((len(rows) - 1, len(pixels)), np.float32)
    params = {p: np.empty(len(rows) - 1) for p in PARAMS}
    for r, row in enumerate(rows[1:]):
        try:
            flux[r] = [float(row[i]) for i, _ in pixels]
            for p in PARAMS:
                params[p][r] = float(row[cols[p]])
        except (ValueError, IndexError) as exc:
            raise CatalogError(f"not a number or a short row ({exc})", file=str(path), row=r) from exc
    names = np.array([row[cols["model"]] if "model" in cols else f"row{r}" for r, row in enumerate(rows[1:])])
    return ModelGrid(np.array([w for _, w in pixels]), flux, params, names, medium)


def _read_parquet(path: Path, medium: str | None) -> ModelGrid:
    from .io import read_catalog
    from .schema import FLUX, table_grid

    table = read_catalog(path)
    grid = table_grid(table.schema, file=str(path))
    missing = [p for p in PARAMS if p not in table.column_names]
    if grid is None or missing:
        raise CatalogError("a Parquet grid needs a file-level wavelength grid and the columns "
                           f"{list(PARAMS)}", file=str(path))
    column = table.column(FLUX).combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # NaN where null
    off = np.flatnonzero(~(lengths == grid.n))  # a row off would shift every row after it
    if len(off):
        r = int(off[0])
        raise CatalogError(f"flux has {'no' if np.isnan(lengths[r]) else int(lengths[r])} values, the file's "
                           f"wavelength grid {grid.n}", file=str(path), row=r, column=FLUX)
    flux = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(table.num_rows, -1)
    names = (np.asarray(table.column("model").to_pylist(), str) if "model" in table.column_names
             else np.array([f"row{r}" for r in range(table.num_rows)]))
    return ModelGrid(grid.values(), flux, {p: table.column(p).to_numpy().astype(np.float64) for p in PARAMS},
                     names, _medium(grid.medium, medium, path))


def _read_text_dir(path: Path, pattern: str, medium: str) -> ModelGrid:
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CatalogError(f"no text spectra ({', '.join(TEXT_SUFFIXES)}) in the directory", file=str(path))
    table = _params_csv(path / "params.csv")
    unread = sorted(set(table or ()) - {f.name for f in files})
    if unread:
        raise CatalogError(f"params.csv lists {', '.join(unread[:5])}, which the directory does not hold as "
                           f"a text spectrum ({', '.join(TEXT_SUFFIXES)})", file=str(path))
    spectra, params = [], {p: [] for p in PARAMS}
    for f in files:
        if table is not None:
            if f.name not in table:
                raise CatalogError("not listed in params.csv", file=str(f))
            values = table[f.name]
        else:
            match = re.search(pattern, f.name)
            if match is None:
                raise CatalogError(f"cannot read teff/logg from the file name (pattern {pattern!r}); "
                                   "add a params.csv (file, teff, logg)", file=str(f))
            values = {"teff": float(match["teff"]), "logg": float(match["logg"]) / 100.0}
        try:
            data = np.loadtxt(f, usecols=(0, 1), ndmin=2)
        except ValueError as exc:
            raise CatalogError(f"not a two-column text spectrum ({exc})", file=str(f)) from exc
        if len(data) < 2 or not np.all(np.diff(data[:, 0]) > 0):
            raise CatalogError("needs two or more rows of strictly increasing wavelength", file=str(f))
        if spectra and (data[0, 0] > spectra[0][0, 0] or data[-1, 0] < spectra[0][-1, 0]):
            raise CatalogError(f"covers {data[0, 0]:g}-{data[-1, 0]:g} A, the grid's first spectrum "
                               f"({files[0].name}) {spectra[0][0, 0]:g}-{spectra[0][-1, 0]:g} A", file=str(f))
        spectra.append(data)
        for p in PARAMS:
            params[p].append(values[p])
    wavelength = spectra[0][:, 0]
    flux = np.stack([np.interp(wavelength, s[:, 0], s[:, 1]) for s in spectra]).astype(np.float32)
    return ModelGrid(wavelength, flux, {p: np.asarray(v, np.float64) for p, v in params.items()},
                     np.array([f.stem for f in files]), medium)


def _params_csv(path: Path) -> dict[str, dict[str, float]] | None:
    if not path.is_file():
        return None
    rows = _csv_rows(path)
    header = rows[0] if rows else []
    if not {"file", *PARAMS} <= set(header):
        raise CatalogError(f"params.csv needs the columns file, {', '.join(PARAMS)}; it has {header}",
                           file=str(path))
    table = {}
    for r, row in enumerate(rows[1:], start=1):
        values = dict(zip(header, (cell.strip() for cell in row), strict=False))
        numbers = {p: _as_float(values.get(p, "")) for p in PARAMS}
        if None in numbers.values() or values.get("file", "") in ("", *table):
            raise CatalogError(f"needs a file name not listed before and numbers for {', '.join(PARAMS)}; "
                               f"it has {row}", file=str(path), row=r)
        table[values["file"]] = numbers
    return table


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
