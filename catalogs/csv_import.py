"""Importer for the wide CSV layout spectroscopists pass around: one row per spectrum.

Every column whose header is a number is a pixel at that wavelength (Angstrom), e.g. `4460.1,
4460.2, ...`; the other headers must be known catalog columns, in any case (`id`, `rv`, `snr`,
`split`, `resolving_power` and the labels `teff`, `logg`, `vsini`), or the unnamed index column
pandas writes (header empty or `Unnamed: 0`), taken as `id` when there is no `id` column. Empty cells
become NaN flux. Anything else is a `CatalogError` naming the file and the column (or row), never a parser
traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..errors import CatalogError
from .io import new_output_dir, write_catalog
from .medium import check_medium
from .schema import (
    FLUX,
    ID,
    LABELS,
    META_RESOLVING_POWER,
    META_WAVELENGTH,
    RESOLVING_POWER,
    RV,
    SNR,
    SPLIT,
    WavelengthGrid,
    pixels_metadata,
    spectrum_array,
    validate,
)

KNOWN_COLUMNS = {ID: None, RV: pa.float64(), SNR: pa.float32(), SPLIT: pa.string(),
                 RESOLVING_POWER: pa.float64(), **{name: pa.float64() for name in LABELS}}
PANDAS_INDEX = ("", "Unnamed: 0")  # headers `DataFrame.to_csv` gives an unnamed index column


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise CatalogError("no such file", file=str(path))
    with path.open(newline="", encoding="utf-8-sig") as fh:
        try:
            header = next(csv.reader(fh), None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CatalogError(f"not a readable CSV file ({exc})", file=str(path)) from exc
    if not header:
        raise CatalogError("empty file: no header row", file=str(path))
    # names stripped of spaces, known columns in any case ("ID", "RV", as FITS columns are read)
    return [h.strip().lower() if h.strip().lower() in KNOWN_COLUMNS else h.strip() for h in header]


def _classify(path: Path, header: list[str]) -> dict[str, float]:
    # Header -> wavelength (A) for the pixel columns; known columns are skipped, anything else fails.
    wavelengths, seen = {}, set()
    for name in header:
        if name in seen:
            raise CatalogError("duplicate column header", file=str(path), column=name)
        seen.add(name)
        if name in KNOWN_COLUMNS or name in PANDAS_INDEX:
            continue
        try:
            value = float(name)
        except ValueError:
            raise CatalogError(
                f"header is neither a wavelength (a number, Angstrom) nor a known column "
                f"({', '.join(sorted(KNOWN_COLUMNS))})", file=str(path), column=name) from None
        if not np.isfinite(value) or value <= 0:
            raise CatalogError("wavelength header must be a positive number", file=str(path), column=name)
        wavelengths[name] = value
    if not wavelengths:
        raise CatalogError("no wavelength columns (headers that are numbers)", file=str(path))
    first = {}
    for name, value in wavelengths.items():  # "4000.0" and "4000.00" are one wavelength
        if value in first:
            raise CatalogError(f"same wavelength as column {first[value]!r}", file=str(path), column=name)
        first[value] = name
    return wavelengths


def _read(path: Path, header: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    # The header is read by `_header` (names stripped of spaces, as "4000.0, 4000.2" is common), so
    # pyarrow skips it and takes our names; a failure is located to its row and column.
    read = pacsv.ReadOptions(column_names=header, skip_rows=1)
    convert = pacsv.ConvertOptions(column_types=types)
    try:
        return pacsv.read_csv(path, read_options=read, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as exc:
        located = _locate_error(path, header, types)
        raise located or CatalogError(f"cannot parse CSV ({exc})", file=str(path)) from exc


def _locate_error(path: Path, header: list[str], types: dict[str, pa.DataType]) -> CatalogError | None:
    """Re-read every cell as text to find the first ragged row or non-numeric cell (rows from 0)."""
    ragged = []

    def on_invalid(row) -> str:
        ragged.append(row)
        return "skip"
    try:
        text = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in header}))
    except (pa.ArrowInvalid, OSError):
        return None
    if ragged:
        row = ragged[0]
        return CatalogError(f"line {row.number} has {row.actual_columns} fields, the header has "
                            f"{row.expected_columns}", file=str(path),
                            row=None if row.number is None else row.number - 2)
    nulls = set(pacsv.ConvertOptions().null_values)  # what pyarrow reads as a missing number
    for name in (n for n in header if pa.types.is_floating(types.get(n, pa.string()))):
        for i, cell in enumerate(text.column(name).to_pylist()):
            if cell.strip() in nulls:
                continue
            try:
                float(cell)
            except ValueError:
                return CatalogError(f"{cell!r} is not a number (data rows count from 0)", file=str(path),
                                    row=i, column=name)
    return None


def _grid(values: np.ndarray, medium: str) -> WavelengthGrid:
    steps = np.diff(values)
    if values.size > 1 and np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9 * values[-1]):
        return WavelengthGrid.linear(values[0], (values[-1] - values[0]) / (values.size - 1), values.size,
                                     medium=medium)
    return WavelengthGrid.explicit(values, medium=medium)


def csv_to_table(file: str | Path, *, medium: str = "vacuum", resolving_power: float | None = None,
                 pixels: str | None = None) -> pa.Table:
    """Read a wide CSV into a catalog table; the (sorted) wavelength grid, in `medium`, goes into
    schema metadata, and so do `resolving_power` (lambda / FWHM of every row) and `pixels` (what a
    flux value is, `starcast.pixels`) when given."""
    path = Path(file)
    try:
        check_medium(medium)
    except ValueError as exc:
        raise CatalogError(str(exc), file=str(path)) from None
    if resolving_power is not None and not resolving_power > 0:
        raise CatalogError(f"resolving power must be positive, got {resolving_power}", file=str(path))
    header = _header(path)
    wavelengths = _classify(path, header)
    types = {name: pa.float32() for name in wavelengths}
    types.update({n: t for n, t in KNOWN_COLUMNS.items() if n in header and t is not None})
    raw = _read(path, header, types)
    if raw.num_rows == 0:
        raise CatalogError("no data rows", file=str(path))
    order = sorted(wavelengths, key=wavelengths.get)
    flux = np.column_stack([raw.column(n).to_numpy(zero_copy_only=False) for n in order]).astype(np.float32)
    index = next((n for n in header if n in PANDAS_INDEX), None)
    if ID in header:
        ids = raw.column(ID)
    else:
        ids = raw.column(index) if index is not None else pa.array(np.arange(raw.num_rows, dtype=np.int64))
    cols = {ID: ids, FLUX: spectrum_array(flux, len(order))}
    cols.update({n: raw.column(n) for n in KNOWN_COLUMNS if n in header and n != ID})
    grid = _grid(np.array([wavelengths[n] for n in order]), medium)
    meta = {META_WAVELENGTH: grid.to_json(), "starcast.source": json.dumps({"csv": str(path)})}
    if resolving_power is not None:
        meta[META_RESOLVING_POWER] = json.dumps(float(resolving_power))
    meta.update(pixels_metadata(pixels))
    table = pa.table(cols).replace_schema_metadata(meta)
    validate(table, file=str(path))
    return table


def import_csv(file: str | Path, out: str | Path, *, shard_rows: int = 10000, medium: str = "vacuum",
               resolving_power: float | None = None, pixels: str | None = None) -> list[Path]:
    """Import a wide CSV as Parquet shards `out/part-00000.parquet`, ... (`out` new or without Parquet
    files); returns their paths."""
    table = csv_to_table(file, medium=medium, resolving_power=resolving_power, pixels=pixels)
    out = new_output_dir(out)
    step = max(int(shard_rows), 1)
    return [write_catalog(table.slice(start, step), out / f"part-{i:05d}.parquet")
            for i, start in enumerate(range(0, table.num_rows, step))]
