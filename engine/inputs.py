"""One input file of a run, as both runners see it: open it (footer, id column, grid), cut it into
read units, stream its rows with page checksums verified, and fingerprint it for completion markers.

The local pipeline and the Ray read tasks both go through these functions, so a file is accepted or
refused by the same checks on both paths. Row-level problems (null ids, bad spectra) are handled
per batch by `rows.Predictor.prepare`, duplicate ids by the results writer (`manifest.py`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..catalogs.io import iter_file, open_parquet
from ..catalogs.schema import ID, WavelengthGrid, table_grid
from ..errors import CatalogError

_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class InputFile:
    """What the footer says about one input file: rows, rows per row group, id type, shared grid."""

    path: Path
    num_rows: int
    row_groups: tuple[int, ...]
    id_type: pa.DataType
    grid: WavelengthGrid | None

    def units(self, rows: int) -> list[list[int]]:
        """The row groups cut into runs of consecutive groups holding at least `rows` rows each
        (the last may hold fewer): the read units of the Ray path, one task each."""
        units, current, held = [], [], 0
        for i, n in enumerate(self.row_groups):
            current.append(i)
            held += n
            if held >= rows:
                units.append(current)
                current, held = [], 0
        return units + ([current] if current else [])

    def first_row(self, row_group: int) -> int:
        """The file row number of the first row of `row_group`."""
        return sum(self.row_groups[:row_group])


def open_input(path: str | os.PathLike) -> InputFile:
    """Read the footer of one input file; `CatalogError` naming the file if it is not a readable
    Parquet catalog (missing, empty, corrupt footer, no `id` column, bad grid metadata)."""
    path = Path(path)
    pf = open_parquet(path)
    schema = pf.schema_arrow
    if ID not in schema.names:
        raise CatalogError(f"no {ID!r} column (columns: {', '.join(schema.names)})", file=str(path))
    meta = pf.metadata
    id_type = schema.field(ID).type
    return InputFile(path=path, num_rows=meta.num_rows,
                     row_groups=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
                     id_type=id_type.value_type if pa.types.is_dictionary(id_type) else id_type,
                     grid=table_grid(schema, str(path)))


def read_input(inp: InputFile, batch_rows: int,
               row_groups: list[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream `inp` (or only its `row_groups`) in batches of at most `batch_rows` rows, a
    dictionary-encoded id column (as pandas writes a categorical) decoded to its values."""
    for batch in iter_file(inp.path, batch_rows, row_groups=row_groups):
        ids = batch.column(ID)
        if pa.types.is_dictionary(ids.type):
            batch = batch.set_column(batch.schema.get_field_index(ID), ID, ids.dictionary_decode())
        yield batch


def footer_rows(path: str | os.PathLike) -> int:
    """The row count in a file's footer, 0 when the footer cannot be read (for the run manifest's
    `rows_in` of a file that failed)."""
    try:
        return open_parquet(path).metadata.num_rows
    except CatalogError:
        return 0


def fingerprint(path: str | os.PathLike) -> dict | None:
    """Size, modification time (ns) and sha256 of the Parquet footer (row counts, offsets, sizes and
    statistics of every column chunk): what a completion marker records, so that `--resume` can tell
    a replaced input from the one that was predicted. None when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            f.seek(max(st.st_size - 8, 0))
            tail = f.read(8)
            n = int.from_bytes(tail[:4], "little") + 8 if tail[4:] == _PARQUET_MAGIC else 65536
            f.seek(max(st.st_size - n, 0))
            footer = f.read(n)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "footer_sha256": hashlib.sha256(footer).hexdigest()}
