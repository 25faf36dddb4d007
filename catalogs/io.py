"""Parquet I/O for spectrum catalogs: write one shard, list shards, stream row groups, read metadata.

Every failure to read a file (missing, empty, corrupt, not Parquet) becomes a `CatalogError` naming
the file, never a traceback from inside pyarrow. Reading streams by row group, so memory is bounded
by `batch_rows` whatever the catalog size. Schema checks live in `schema.validate`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CatalogError
from .schema import ID, META_WAVELENGTH, WavelengthGrid, table_grid, validate

DEFAULT_ROW_GROUP_ROWS = 1024


def write_catalog(table: pa.Table, path: str | Path, *, grid: WavelengthGrid | None = None,
                  metadata: dict[str, str] | None = None,
                  row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> Path:
    """Validate `table` and write it to the Parquet file `path` (parents created); returns the path.

    `grid` (stored as `starcast.wavelength`) and `metadata` (str -> str) are merged over the table's
    own schema metadata. Float spectra are stored byte-stream-split and zstd-compressed (about half
    the bytes of pyarrow's default for noisy float32 spectra; see bench/results/catalog_bench.md).
    """
    path = Path(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    meta.update(metadata or {})
    if grid is not None:
        meta[META_WAVELENGTH] = grid.to_json()
    table = table.replace_schema_metadata(meta)
    validate(table, file=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=max(int(row_group_rows), 1), **_encodings(table.schema))
    return path


def _encodings(schema: pa.Schema) -> dict:
    # Byte-stream split for float list columns (their Parquet leaf is `name.list.element`), dictionary
    # encoding only for non-id string columns (e.g. `split`); zstd for everything; CRC32 page checksums
    # so that a corrupted page is an error on reading, not silently wrong flux.
    floats = [f"{f.name}.list.element" for f in schema
              if (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
                  or pa.types.is_large_list(f.type)) and pa.types.is_floating(f.type.value_type)]
    strings = [f.name for f in schema if f.name != ID and (pa.types.is_string(f.type)
                                                           or pa.types.is_large_string(f.type))]
    return {"compression": "zstd", "use_dictionary": strings or False,
            "use_byte_stream_split": floats or False, "write_page_checksum": True}


def new_output_dir(out: str | Path) -> Path:
    """Create `out` for a new catalog; refuse one that already holds Parquet shards (they would mix)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CatalogError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.glob("*.parquet")):
        raise CatalogError(f"output directory {out} already holds *.parquet files; choose a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def list_inputs(spec: str | Path) -> list[Path]:
    """The Parquet files of a catalog: a file, a directory of `*.parquet` shards, or a glob (`**`
    reaching into subdirectories, as in a shell with globstar); sorted."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if f.is_file())
        if not files:
            raise CatalogError("directory holds no *.parquet files", file=str(p))
        return files
    files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file())
    if not files:
        raise CatalogError("no such file, directory or matching glob", file=str(spec))
    return files


IMPORTERS = ((".csv", "a wide CSV", "`starcast import-csv`"),  # file suffixes, what they hold, the importer
             ((".fits", ".fit", ".fts", ".fits.gz"), "FITS spectra", "`starcast import-fits`"))


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """One Parquet file, opened with page checksum verification; `CatalogError` if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError("no such file", file=str(path))
    if path.stat().st_size == 0:
        raise CatalogError("empty file (0 bytes), not a Parquet catalog", file=str(path))
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        hint = next((f"; {tool} turns {kind} into a catalog" for suffixes, kind, tool in IMPORTERS
                     if path.name.lower().endswith(suffixes)), "")
        raise CatalogError(f"not a readable Parquet file ({exc}){hint}", file=str(path)) from exc


def read_metadata(path: str | Path) -> dict[str, str]:
    """The key-value metadata of one Parquet file, decoded to str -> str."""
    raw = open_parquet(path).schema_arrow.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def read_grid(path: str | Path) -> WavelengthGrid | None:
    """The shared wavelength grid of a file (`starcast.wavelength`), or None when it has none."""
    return table_grid(open_parquet(path).schema_arrow, str(path))


def iter_batches(path: str | Path, batch_rows: int = 4096,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a catalog (file, directory or glob) as record batches of at most `batch_rows` rows."""
    for file in list_inputs(path):
        yield from iter_file(file, batch_rows, columns=columns)


def iter_file(path: str | Path, batch_rows: int = 4096, *, columns: list[str] | None = None,
              row_groups: list[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream one Parquet file (or only its `row_groups`), page checksums verified: a corrupt page is
    a `CatalogError` naming the file, never silently wrong data."""
    pf = open_parquet(path)
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise CatalogError(f"requested columns not in file: {missing}", file=str(path))
    try:
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=row_groups)
    except (pa.ArrowException, OSError) as exc:
        raise CatalogError(f"corrupt Parquet data ({exc})", file=str(path)) from exc


def read_catalog(spec: str | Path) -> pa.Table:
    """A whole catalog in memory, its shards concatenated; the first shard's metadata is kept.

    Raises `CatalogError` when the shards disagree on the wavelength grid.
    """
    files = list_inputs(spec)
    tables, grids = [], set()
    for file in files:
        pf = open_parquet(file)
        try:
            tables.append(pf.read())
        except (pa.ArrowException, OSError) as exc:
            raise CatalogError(f"corrupt Parquet data ({exc})", file=str(file)) from exc
        grid = table_grid(pf.schema_arrow, str(file))
        grids.add(grid.to_json() if grid is not None else None)
    if len(grids) > 1:
        raise CatalogError("shards have different wavelength grids", file=str(spec))
    meta = tables[0].schema.metadata
    try:
        table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    except pa.ArrowInvalid as exc:
        raise CatalogError(f"shards have different schemas ({exc})", file=str(spec)) from exc
    return table.replace_schema_metadata(meta)
