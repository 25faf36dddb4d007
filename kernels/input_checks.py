"""What a catalog states about its spectra, checked against what the model needs, for `preprocess`.

The medium of the input wavelengths (converted to the model's), the instrument's resolving power
(higher is smoothed down to the model's, lower refused), what a flux value is (a pixel's mean or a
sample), the diagnostic lines' pixels on the model
grid, and the error for coverage short of the model grid (with a hint when the input looks like nm).
Pure NumPy on whole batches; the per-spectrum work stays in the Numba kernel.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalogs.lines import DIAGNOSTIC_LINES
from ..catalogs.medium import AIR, check_medium, convert
from ..catalogs.schema import (
    META_MEDIUM,
    META_PIXELS,
    META_RESOLVING_POWER,
    PIXEL_KINDS,
    RESOLVING_POWER,
    check_pixels,
    table_grid,
)
from ..errors import CatalogError

RESOLUTION_TOLERANCE = 0.1  # an input resolving power down to 10% below the model's is accepted as is
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # Gaussian FWHM / sigma


def column_medium(schema: pa.Schema) -> str | None:
    """The medium a file states for its per-row `wavelength` column: `starcast.medium`, else that of
    a file grid (`starcast.wavelength`), else None."""
    raw = (schema.metadata or {}).get(META_MEDIUM.encode())
    if raw is None:
        grid = table_grid(schema)  # malformed: the file's error, as when its rows use the grid
        return None if grid is None else grid.medium
    try:
        return check_medium(raw.decode().strip().strip('"'), f"{META_MEDIUM} metadata")
    except ValueError as exc:
        raise CatalogError(str(exc)) from exc


def to_medium(values: np.ndarray, source: str | None, target: str | None) -> np.ndarray:
    """Wavelengths in the model's medium; unchanged when either medium is unknown (None)."""
    if source is None or target is None or source == target:
        return values
    return np.require(convert(values, source, target), np.float64, ["C", "W"])


def number_column(col, name: str, unit: str):
    """A scalar column of numbers (integer, floating, decimal, or dictionary-encoded ones, as pandas
    writes a categorical) as float64, nulls kept (a column of nulls only may be typed null); a column of
    another type (text, lists) is the file's error, named, not each row's."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not any(is_type(col.type) for is_type in (pa.types.is_floating, pa.types.is_integer,
                                                 pa.types.is_decimal, pa.types.is_null)):
        raise CatalogError(f"expected numbers ({unit}), got {col.type}", column=name)
    return pc.cast(col, pa.float64())


def input_resolving_power(batch, n_rows: int) -> tuple[np.ndarray, dict[int, str]]:
    """(R, bad): per row the resolving power the catalog states (`resolving_power` column, else the
    file's `starcast.resolving_power` metadata), NaN where it states none (null or NaN) or one that
    is not a positive number; the latter rows' errors in `bad` (row -> reason)."""
    if RESOLVING_POWER in batch.schema.names:
        values = number_column(batch.column(RESOLVING_POWER), RESOLVING_POWER, "lambda / FWHM").to_numpy(
            zero_copy_only=False)
        valid = np.isfinite(values) & (values > 0)
        bad = {int(r): f"{RESOLVING_POWER} is {values[r]:g}: a positive number, or null where not known"
               for r in np.flatnonzero(~valid & ~np.isnan(values))}
        return np.where(valid, values, np.nan), bad
    raw = (batch.schema.metadata or {}).get(META_RESOLVING_POWER.encode())
    if raw is None:
        return np.full(n_rows, np.nan), {}
    try:
        value = float(json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{META_RESOLVING_POWER} metadata must be a number, got {raw!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise CatalogError(f"{META_RESOLVING_POWER} metadata must be positive, got {value}")
    return np.full(n_rows, value), {}


def integrated_pixels(batch) -> bool:
    """Whether the file's flux values are means over their pixels (`starcast.pixels`: "integrated", the
    default) rather than samples at their wavelengths ("sampled"; bare or as a JSON string)."""
    raw = (batch.schema.metadata or {}).get(META_PIXELS.encode())
    if raw is None:
        return True
    kind = raw.decode(errors="replace").strip().strip('"')
    return check_pixels(kind, f"{META_PIXELS} metadata") == PIXEL_KINDS[0]


def resolution_match(r_input: np.ndarray, r_model: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(smooth, too_low) per row: the sigma / lambda of the Gaussian that brings a higher resolving
    power down to the model's, sigma^2 = sigma_model^2 - sigma_input^2 in velocity (0: none), and
    whether the input's is more than RESOLUTION_TOLERANCE below the model's. Unknown R: neither."""
    smooth, too_low = np.zeros(len(r_input)), np.zeros(len(r_input), bool)
    if r_model is None:
        return smooth, too_low
    with np.errstate(invalid="ignore"):
        higher = r_input > r_model
        too_low = r_input < (1.0 - RESOLUTION_TOLERANCE) * r_model
        smooth[higher] = np.sqrt(1.0 / r_model**2 - 1.0 / r_input[higher] ** 2) / _FWHM_PER_SIGMA
    return smooth, too_low


def line_pixels(grid: np.ndarray, medium: str | None) -> np.ndarray:
    """Indices of the grid pixels nearest each diagnostic line inside the grid (lines are in air)."""
    centres = to_medium(np.array([line.wavelength for line in DIAGNOSTIC_LINES]), AIR, medium or AIR)
    inside = centres[(centres >= grid[0]) & (centres <= grid[-1])]
    idx = np.clip(np.searchsorted(grid, inside), 1, len(grid) - 1)
    nearer_left = inside - grid[idx - 1] < grid[idx] - inside
    return np.ascontiguousarray(idx - nearer_left, dtype=np.int64)


def coverage_error(lo: float, hi: float, grid: np.ndarray, medium: str | None, coverage: float,
                   min_coverage: float) -> str:
    """Why a row whose input covers `lo`-`hi` A (rest frame, model medium) is not predicted."""
    needs = f"{grid[0]:.1f}-{grid[-1]:.1f} A" + (f" ({medium})" if medium else "")
    text = (f"wavelength coverage too short: the spectrum covers {lo:.1f}-{hi:.1f} A (rest frame), "
            f"{math.floor(1000 * coverage) / 10:.1f}% of the model's {needs}, which needs at least "
            f"{100 * min_coverage:g}%")  # rounded down: 94.96% is not 95%
    if hi < grid[0] and 10 * hi > grid[0] and 10 * lo < grid[-1]:
        text += "; the wavelengths look like nanometres: starcast expects Angstrom (multiply by 10)"
    return text
