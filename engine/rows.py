"""The per-batch steps of a run, the same on the local and the Ray pipeline, and the rule they keep:
every input row comes out once, with its numbers or with its flags and error.

`Predictor` is a model bound to one run's options (its `RunIdentity`: S, seed, backend). The
runners only move batches between its two halves and the output files: `prepare` (CPU: read rows
to network inputs) and `infer` (the ensemble kernel), so both paths give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..catalogs.schema import ERROR, FLAGS, ID, Flag, WavelengthGrid, results_schema
from ..errors import StarcastError
from .manifest import RunIdentity
from .predictor import PREPARED_KEY, PREPARED_X, Model, load_model


@dataclass
class Predictor:
    """`model` with the options of `identity`; what a pipeline worker holds (see module docstring)."""

    model: Model
    identity: RunIdentity

    @classmethod
    def load(cls, model_ref: str, identity: RunIdentity) -> Predictor:
        """The predictor of a worker process that was handed a model name or bundle path."""
        model = load_model(model_ref)
        if model.bundle.sha256 != identity.model_sha256:
            raise StarcastError(f"model {model_ref!r} on this worker is not the run's model (bundle "
                                f"hash {model.bundle.sha256[:12]}, the run's {identity.model_sha256[:12]}); "
                                f"every node must see the same bundle")
        return cls(model, identity)

    def prepare(self, batch: pa.RecordBatch, grid: WavelengthGrid | None,
                first_row: int = 0) -> pa.RecordBatch:
        """`model.prepare(batch)`, one prepared row per input row whatever happens: a row with a null
        id gets an error row (it cannot be keyed or joined) and the others go on; if the batch raises,
        each row is retried alone and a row that still fails gets PREPROCESS_FAILED and its error.
        `first_row`: the file row number of the batch's first row, for messages. A
        `StarcastError` (e.g. no grid for the file) concerns the whole file and is raised."""
        null = batch.column(ID).is_null().to_numpy(zero_copy_only=False)
        if null.any():
            rows = np.flatnonzero(null)
            pieces = [self.failed_prepared(batch.take(pa.array(rows)),
                                           [f"id is null (input row {first_row + int(r)})" for r in rows])]
            if not null.all():
                pieces.insert(0, self.prepare(batch.filter(pa.array(~null)), grid, first_row))
            order = np.argsort(np.concatenate([np.flatnonzero(~null), rows]), kind="stable")
            table = pa.Table.from_batches(pieces) if len(pieces) == 1 else pa.concat_tables(
                [pa.Table.from_batches([p]) for p in pieces], promote_options="permissive")
            return as_batch(table.take(pa.array(order)))
        try:
            return as_batch(self.model.prepare(batch, source_grid=grid))
        except StarcastError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes a flagged row, never a lost one
            if batch.num_rows == 1:
                return self.failed_prepared(batch, [f"preprocessing failed: {type(exc).__name__}: {exc}"])
        pieces = [pa.Table.from_batches([self.prepare(batch.slice(i, 1), grid, first_row + i)])
                  for i in range(batch.num_rows)]
        return as_batch(pa.concat_tables(pieces, promote_options="permissive"))

    def infer(self, prepared: pa.RecordBatch) -> pa.Table:
        """`model.infer(prepared)`; if inference raises, every row of the batch is kept with its error."""
        ident = self.identity
        try:
            return self.model.infer(prepared, samples=ident.samples, seed=ident.seed, backend=ident.backend)
        except Exception as exc:  # noqa: BLE001
            flags = np.asarray(prepared[FLAGS].to_numpy(zero_copy_only=False), np.int32)
            return self.failed(prepared[ID], f"inference failed: {type(exc).__name__}: {exc}",
                               flags | int(Flag.PREPROCESS_FAILED))

    def failed(self, ids: pa.Array, error: str | None, flags=0) -> pa.Table:
        """Results rows with no numbers (null statistics), the given flags and error; with no ids, the
        empty results table of a file without rows."""
        n = len(ids)
        schema = results_schema(self.model.bundle.target_names, id_type=ids.type,
                                emulator=self.model.emulator is not None)
        cols = {f.name: pa.nulls(n, f.type) for f in schema}
        cols[ID] = ids
        cols[FLAGS] = pa.array(np.broadcast_to(np.asarray(flags, np.int32), (n,)), pa.int32())
        cols[ERROR] = pa.array([error] * n, pa.string())
        return pa.Table.from_pydict(cols, schema=schema)

    def failed_prepared(self, batch: pa.RecordBatch, errors: list[str]) -> pa.RecordBatch:
        """Prepared rows that will not be predicted: PREPROCESS_FAILED, one error message per row."""
        model = self.model
        n, dim = batch.num_rows, int(model.bundle.architecture["input_dim"])
        cols = {ID: batch.column(ID),
                PREPARED_X: pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * dim, np.float32)), dim),
                PREPARED_KEY: pa.array(np.zeros(n, np.int64)),
                FLAGS: pa.array(np.full(n, int(Flag.PREPROCESS_FAILED), np.int32)),
                ERROR: pa.array(errors, pa.string())}
        if model.emulator is not None:
            cols.update(model.fit_columns(np.zeros((n, model.grid.n), np.float32), np.full(n, np.nan),
                                          np.full(n, np.nan), np.zeros(n), np.zeros(n), np.zeros(n, bool)))
        return pa.RecordBatch.from_pydict(cols)


def as_batch(obj: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """One RecordBatch (what `Model.prepare` returns and `Model.infer` takes)."""
    if isinstance(obj, pa.RecordBatch):
        return obj
    batches = obj.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=obj.schema)
