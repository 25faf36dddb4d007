"""The contract of a spectrum catalog (DESIGN.md, "Catalog") and of a results catalog ("Output").

Holds the column names, the quality flags, and the shared wavelength grid stored in Parquet file
metadata. Building and validating tables against the schema also lives here; reading and writing
files does not (see `starcast.catalogs.io`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CatalogError
from .medium import check_medium

# Input columns. Wavelengths are in Angstrom; `rv` in km/s (positive = receding).
ID, FLUX, WAVELENGTH, FLUX_ERR, IVAR, MASK, RV, SNR, SPLIT = (
    "id", "flux", "wavelength", "flux_err", "ivar", "mask", "rv", "snr", "split")
RESOLVING_POWER = "resolving_power"  # lambda / FWHM of the instrumental profile, per row
LABELS = ("teff", "logg", "vsini", "metals")  # K, dex (cgs), km/s, dex (metal-line strength, gridsynth)

# File metadata keys (Parquet key-value metadata, UTF-8 JSON values).
META_WAVELENGTH = "starcast.wavelength"
META_GENERATOR = "starcast.generator"
META_MEDIUM = "starcast.medium"  # "air" | "vacuum": the medium of a per-row `wavelength` column
META_RESOLVING_POWER = "starcast.resolving_power"  # one resolving power for every row of the file
# what every flux value of the file is: the mean over its pixel (a detector's; the default) or the flux at
# its wavelength (a spectrum interpolated onto a grid), which resampling sees through a narrower response
META_PIXELS, PIXEL_KINDS = "starcast.pixels", ("integrated", "sampled")


def check_pixels(pixels: str, what: str = "pixels") -> str:
    """`pixels` if it is one of PIXEL_KINDS, else a CatalogError naming `what`."""
    if pixels not in PIXEL_KINDS:
        raise CatalogError(f"{what} must be one of {', '.join(PIXEL_KINDS)}, got {pixels!r}")
    return pixels


def pixels_metadata(pixels: str | None) -> dict:
    """The file metadata stating `pixels` (one of PIXEL_KINDS; None: nothing, the default)."""
    return {} if pixels is None else {META_PIXELS: check_pixels(pixels)}
# ... and of a results file: what made it (model name and bundle hash, seed, S, code version,
# backend) and from which input file.
META_MODEL, META_MODEL_SHA256 = "starcast.model", "starcast.model_sha256"
META_SEED, META_SAMPLES = "starcast.seed", "starcast.samples"
META_VERSION, META_BACKEND, META_INPUT = "starcast.version", "starcast.backend", "starcast.input"

# Output columns besides the per-target ones (`t`, `t_err`, `t_err_aleatoric`, `t_err_epistemic`).
FLAGS, ERROR = "flags", "error"
# Results of a model with an emulator: the goodness of fit and the radial velocity it fits (`rv`, as
# the input column, and its sigma).
CHI2, CHI2_PIXELS, RV_ERR = "chi2", "chi2_pixels", "rv_err"


class Flag(enum.IntFlag):
    """Per-row quality bits of the `flags` column (int32). A row with any bit set still has a row."""

    NON_FINITE = 1  # NaN/inf flux, flux below 0 beyond its noise, or non-positive errors in the input
    MASKED = 2  # too many masked or bad pixels
    COVERAGE = 4  # the input does not cover the model's wavelength grid
    OUT_OF_RANGE = 8  # a prediction outside the training range
    HIGH_EPISTEMIC = 16  # epistemic uncertainty above the model's out-of-distribution threshold
    PREPROCESS_FAILED = 32  # preprocessing failed; see `error`
    GAP = 64  # a gap longer than the preprocessing's max_gap pixels was filled with the continuum
    LINE_LOST = 128  # a diagnostic line (`starcast.catalogs.lines`) falls in a GAP or off the coverage
    LOW_RESOLUTION = 256  # resolving power below the model's; numbers nulled (see `error`)
    MODEL_MISMATCH = 512  # the emulator fit does not explain the spectrum (`emulator.Fit.mismatch`)
    RV_ESTIMATED = 1024  # the input gave no rv; `rv` was estimated from the spectrum and removed
    RV_MISMATCH = 2048  # the given rv differs from the fitted one; the numbers use the fitted `rv`
    UPPER_LIMIT = 4096  # v sin i below the resolution or in lines broader than rotation: an upper limit
    DUPLICATE_ID = 8192  # the id already appeared on an earlier row of the same input file


# Bits that describe a number rather than doubt it (a bound; an rv the engine estimated): a row with
# only these is not counted as flagged.
INFORMATIONAL = Flag.UPPER_LIMIT | Flag.RV_ESTIMATED


@dataclass(frozen=True)
class WavelengthGrid:
    """A wavelength grid in Angstrom: linear (`step` in A), log-linear (`step` in ln(lambda)), or explicit.

    Stored as JSON under `starcast.wavelength` in the Parquet metadata, e.g.
    `{"kind": "linear", "start": 4000.0, "step": 0.2, "n": 4000, "medium": "vacuum"}`.
    """

    kind: str  # "linear" | "log" | "explicit"
    start: float = 0.0
    step: float = 0.0
    n: int = 0
    values_: tuple[float, ...] | None = None
    medium: str = "vacuum"  # "vacuum" | "air"

    @classmethod
    def linear(cls, start: float, step: float, n: int, medium: str = "vacuum") -> WavelengthGrid:
        return cls("linear", float(start), float(step), int(n), None, medium)

    @classmethod
    def explicit(cls, values, medium: str = "vacuum") -> WavelengthGrid:
        values = tuple(float(v) for v in np.asarray(values, dtype=np.float64))
        return cls("explicit", values[0], 0.0, len(values), values, medium)

    def values(self) -> np.ndarray:
        if self.kind == "linear":
            return self.start + self.step * np.arange(self.n, dtype=np.float64)
        if self.kind == "log":
            return np.exp(np.log(self.start) + self.step * np.arange(self.n, dtype=np.float64))
        if self.kind == "explicit":
            return np.asarray(self.values_, dtype=np.float64)
        raise ValueError(f"unknown wavelength grid kind {self.kind!r} (expected linear, log or explicit)")

    def to_dict(self) -> dict:
        """The grid as JSON-ready values (a model manifest's `grid`; `to_json` for file metadata)."""
        if self.kind == "explicit":
            return {"kind": "explicit", "values": list(self.values_), "medium": self.medium}
        return {"kind": self.kind, "start": self.start, "step": self.step, "n": self.n, "medium": self.medium}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> WavelengthGrid:
        """Parse `to_json` output; anything else (bad JSON, missing keys, no pixels) is a ValueError."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> WavelengthGrid:
        """Parse `to_dict` output; anything else (missing keys, no pixels) is a ValueError."""
        try:
            kind, medium = d.get("kind", "linear"), d.get("medium", "vacuum")
            if kind == "explicit":
                grid = cls.explicit(d["values"], medium)
            elif kind in ("linear", "log"):
                grid = cls(kind, float(d["start"]), float(d["step"]), int(d["n"]), None, medium)
            else:
                raise ValueError(f"unknown wavelength grid kind {kind!r} (expected linear, log or explicit)")
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a wavelength grid ({type(exc).__name__}: {exc})") from exc
        if grid.kind != "explicit" and not (grid.n >= 1 and grid.start > 0 and grid.step > 0):
            raise ValueError(f"a {grid.kind} grid needs n >= 1, start > 0 and step > 0, got {grid}")
        check_medium(grid.medium, "the grid's medium")
        return grid


# --- Building and validating tables -------------------------------------------------------------

_LIST_TYPES = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)


def spectrum_type(npix: int | None = None, value: pa.DataType | None = None) -> pa.DataType:
    """The list type of a spectrum column: fixed_size_list when `npix` is given, else list.

    The child is named `element`, as Parquet's nested-type convention names it on reading, so that a
    table built here equals the same table read back from a file.
    """
    item = pa.field("element", pa.float32() if value is None else value)
    return pa.list_(item, npix) if npix is not None else pa.list_(item)


def spectrum_array(values, npix: int) -> pa.FixedSizeListArray:
    """A (B, npix) float32 array as a fixed_size_list column of `spectrum_type(npix)`."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, type=spectrum_type(npix))


def catalog_schema(npix: int | None = None, *, id_type: pa.DataType | None = None,
                   labels: tuple[str, ...] = LABELS, flux_err: bool = True, wavelength: bool = False,
                   rv: bool = True, snr: bool = True, split: bool = False,
                   grid: WavelengthGrid | None = None, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of a spectrum catalog (DESIGN.md, "Catalog").

    `npix` gives `flux` (and `flux_err`) a fixed_size_list type, for catalogs that share one grid;
    `grid` is stored in the schema metadata under `starcast.wavelength`.
    """
    id_type = pa.int64() if id_type is None else id_type
    spectrum = spectrum_type(npix)
    fields = [pa.field(ID, id_type, nullable=False), pa.field(FLUX, spectrum)]
    if wavelength:
        fields.append(pa.field(WAVELENGTH, spectrum_type(None, pa.float64())))
    if flux_err:
        fields.append(pa.field(FLUX_ERR, spectrum))
    if rv:
        fields.append(pa.field(RV, pa.float64()))
    if snr:
        fields.append(pa.field(SNR, pa.float32()))
    fields += [pa.field(name, pa.float64()) for name in labels]
    if split:
        fields.append(pa.field(SPLIT, pa.string()))
    meta = dict(metadata or {})
    if grid is not None:
        meta[META_WAVELENGTH] = grid.to_json()
    return pa.schema(fields, metadata=meta or None)


def results_schema(targets, *, id_type: pa.DataType | None = None, emulator: bool = False) -> pa.Schema:
    """The Arrow schema of a results catalog (DESIGN.md, "Output") for the given target names; with
    `emulator` (a model with one) also `chi2`, `chi2_pixels`, `rv` and `rv_err`."""
    fields = [pa.field(ID, pa.int64() if id_type is None else id_type)]
    for t in targets:
        fields += [pa.field(name, pa.float64())
                   for name in (t, f"{t}_err", f"{t}_err_aleatoric", f"{t}_err_epistemic")]
    if emulator:
        fields += [pa.field(CHI2, pa.float64()), pa.field(CHI2_PIXELS, pa.int32()),
                   pa.field(RV, pa.float64()), pa.field(RV_ERR, pa.float64())]
    return pa.schema(fields + [pa.field(FLAGS, pa.int32()), pa.field(ERROR, pa.string())])


def table_grid(schema: pa.Schema, file=None) -> WavelengthGrid | None:
    """The shared wavelength grid stored in a schema's metadata, or None; `CatalogError` if malformed."""
    raw = (schema.metadata or {}).get(META_WAVELENGTH.encode())
    if raw is None:
        return None
    try:
        return WavelengthGrid.from_json(raw)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise CatalogError(f"bad {META_WAVELENGTH} metadata ({exc})", file=file) from exc


def _check_type(table: pa.Table, name: str, ok, expected: str, file) -> None:
    if name in table.column_names and not ok(table.schema.field(name).type):
        raise CatalogError(f"expected {expected}, got {table.schema.field(name).type}", file=file,
                           column=name)


def _is_float_list(t: pa.DataType) -> bool:
    return any(f(t) for f in _LIST_TYPES) and pa.types.is_floating(t.value_type)


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def validate(table: pa.Table, file=None) -> None:
    """Check `table` against the catalog schema; raise `CatalogError` naming file, column, row, reason.

    Checks: `id` present, non-null, unique, int or string; `flux` a list of floats whose rows all have
    one length unless a `wavelength` column gives each row its own grid (then lengths must match) or a
    grid is in the metadata (then lengths must equal it); types of the optional columns. Null or
    all-NaN spectra pass: they are flagged downstream, one output row per input row.
    """
    names = table.column_names
    for required in (ID, FLUX):
        if required not in names:
            raise CatalogError(f"required column missing (columns present: {names})", file=file,
                               column=required)
    id_type = table.schema.field(ID).type
    if pa.types.is_null(id_type) and table.num_rows:  # e.g. a CSV whose id cells are all empty
        raise CatalogError("missing id", file=file, column=ID, row=0)
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise CatalogError(f"expected int64 or string ids, got {id_type}", file=file, column=ID)
    ids = table.column(ID)
    if ids.null_count:
        raise CatalogError("missing id", file=file, column=ID, row=_first_row(ids.is_null().to_numpy(
            zero_copy_only=False)))
    _check_type(table, FLUX, _is_float_list, "a list of float32", file)
    for name in (FLUX_ERR, IVAR):
        _check_type(table, name, _is_float_list, "a list of float32", file)
    _check_type(table, WAVELENGTH, _is_float_list, "a list of float64 (Angstrom)", file)
    _check_type(table, MASK, lambda t: any(f(t) for f in _LIST_TYPES) and pa.types.is_boolean(t.value_type),
                "a list of bool", file)
    for name in (RV, SNR, RESOLVING_POWER, *LABELS):
        _check_type(table, name, lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
                    "a number (float64)", file)
    _check_type(table, SPLIT, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
                "a string", file)
    _check_unique(ids, file)
    _check_lengths(table, file)


def _check_unique(ids: pa.ChunkedArray, file) -> None:
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0].as_py()
        rows = np.flatnonzero(pc.equal(ids, first).to_numpy(zero_copy_only=False))
        raise CatalogError(f"duplicate id {first!r} (also at row {int(rows[0])})", file=file, column=ID,
                           row=int(rows[1]))


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        return np.full(len(column), column.type.list_size)
    return pc.list_value_length(column).to_numpy(zero_copy_only=False)  # null rows -> NaN


def _check_lengths(table: pa.Table, file) -> None:
    flux = table.column(FLUX)
    lengths, valid = _list_lengths(flux), ~flux.is_null().to_numpy(zero_copy_only=False)
    if WAVELENGTH in table.column_names:
        wavelength = table.column(WAVELENGTH)
        missing = valid & wavelength.is_null().to_numpy(zero_copy_only=False)
        if missing.any():
            raise CatalogError("flux is given but its wavelength is null", file=file, column=WAVELENGTH,
                               row=_first_row(missing))
        _check_same_lengths(table, WAVELENGTH, lengths, valid, file)
    else:
        _check_one_grid(table, lengths, valid, file)
    for name in (FLUX_ERR, IVAR, MASK):
        if name in table.column_names:
            _check_same_lengths(table, name, lengths, valid, file)


def _check_same_lengths(table: pa.Table, name: str, lengths: np.ndarray, valid: np.ndarray, file) -> None:
    # A per-pixel column must have flux's length in every row where both are present.
    column = table.column(name)
    other = _list_lengths(column)
    bad = valid & ~column.is_null().to_numpy(zero_copy_only=False) & (other != lengths)
    if bad.any():
        row = _first_row(bad)
        raise CatalogError(f"flux has {lengths[row]:.0f} pixels but {name} has {other[row]:.0f}", file=file,
                           column=FLUX if name == WAVELENGTH else name, row=row)


def _check_one_grid(table: pa.Table, lengths: np.ndarray, valid: np.ndarray, file) -> None:
    # Without a wavelength column every present flux row has the file grid's length, or one length.
    grid = table_grid(table.schema, file)
    if grid is not None:
        n, reason = grid.n, f"flux length differs from the file's wavelength grid ({grid.n} pixels)"
    elif valid.any():
        n = int(lengths[valid][0])
        reason = "ragged flux: rows differ in length and there is no wavelength column or file grid"
    else:
        return
    bad = valid & (lengths != n)
    if bad.any():
        row = _first_row(bad)
        raise CatalogError(f"{reason} (this row has {lengths[row]:.0f}, expected {n})", file=file,
                           column=FLUX, row=row)
