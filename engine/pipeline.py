"""The embedded local pipeline: one process, four overlapping stages joined by bounded queues.

    reader --(futures, bounded)--> prepare pool (threads) --> infer thread --(bounded)--> writer (caller)

Reading streams row groups (`iter_batches`), preprocessing runs in a pool of `workers` threads (one
by default: the Numba kernels are `parallel=True`, so one call already uses every core, and they do
not release the GIL), inference in one thread (torch or Triton use all cores or the GPU themselves)
and writing in the calling thread, which also drives the progress bar. Order is kept: futures are queued
in input order. Memory is bounded by the queue sizes (a few batches), whatever the catalog size.
The per-batch steps (`prepare_rows`, `infer_rows`) are shared with the Ray pipeline: both call the
same `Model` object, so the two paths give the same numbers.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ..catalogs.schema import ERROR, FLAGS, ID, Flag, WavelengthGrid, results_schema
from ..errors import CatalogError, StarcastError
from .inputs import footer_rows, open_input, read_input
from .manifest import FileReport, ResultsWriter, RunIdentity
from .predictor import PREPARED_KEY, PREPARED_X

_POLL_S = 0.1  # how often blocked threads look at the stop flag


# --- the per-batch steps, shared with the Ray pipeline -------------------------------------------

def prepare_rows(model, batch: pa.RecordBatch, grid: WavelengthGrid | None,
                 first_row: int = 0) -> pa.RecordBatch:
    """`model.prepare(batch)`, one prepared row per input row whatever happens: a row with a null id
    gets an error row (it cannot be keyed or joined) and the others go on; if the batch raises, each
    row is retried alone and a row that still fails gets PREPROCESS_FAILED and its error. Every target
    label column is present (null where the input has none), so batches of any file share a schema.
    `first_row`: the file row number of the batch's first row, for messages. A `StarcastError`
    (e.g. no grid for the file) concerns the whole file and is raised."""
    null = batch.column(ID).is_null().to_numpy(zero_copy_only=False)
    if null.any():
        rows = np.flatnonzero(null)
        pieces = [failed_prepared(model, batch.take(pa.array(rows)),
                                   [f"id is null (input row {first_row + int(r)})" for r in rows])]
        if not null.all():
            pieces.insert(0, prepare_rows(model, batch.filter(pa.array(~null)), grid, first_row))
        order = np.argsort(np.concatenate([np.flatnonzero(~null), rows]), kind="stable")
        table = pa.Table.from_batches(pieces) if len(pieces) == 1 else pa.concat_tables(
            [pa.Table.from_batches([p]) for p in pieces], promote_options="permissive")
        return as_batch(table.take(pa.array(order)))
    try:
        return _with_labels(model, as_batch(model.prepare(batch, source_grid=grid)))
    except StarcastError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes a flagged row, never a lost one
        if batch.num_rows == 1:
            return failed_prepared(model, batch, [f"preprocessing failed: {type(exc).__name__}: {exc}"])
    pieces = [pa.Table.from_batches([prepare_rows(model, batch.slice(i, 1), grid, first_row + i)])
              for i in range(batch.num_rows)]
    return as_batch(pa.concat_tables(pieces, promote_options="permissive"))


def infer_rows(model, prepared: pa.RecordBatch, *, samples: int | None, seed: int, backend: str) -> pa.Table:
    """`model.infer(prepared)`; if inference raises, every row of the batch is kept with its error."""
    try:
        return model.infer(prepared, samples=samples, seed=seed, backend=backend)
    except Exception as exc:  # noqa: BLE001
        flags = np.asarray(prepared[FLAGS].to_numpy(zero_copy_only=False), np.int32)
        return failed_results(prepared[ID], model.bundle.target_names, flags | int(Flag.PREPROCESS_FAILED),
                              f"inference failed: {type(exc).__name__}: {exc}",
                              emulator=model.emulator is not None)


def failed_results(ids: pa.Array, targets: list[str], flags, error: str | None, *,
                   emulator: bool = False) -> pa.Table:
    """Results rows with no numbers (null statistics), the given flags and error; `emulator`: with the
    goodness-of-fit and rv columns of a model with an emulator."""
    n = len(ids)
    schema = results_schema(targets, id_type=ids.type, emulator=emulator)
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols[ID] = ids
    cols[FLAGS] = pa.array(np.broadcast_to(np.asarray(flags, np.int32), (n,)), pa.int32())
    cols[ERROR] = pa.array([error] * n, pa.string())
    return pa.Table.from_pydict(cols, schema=schema)


def as_batch(obj: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """One RecordBatch (what `Model.prepare` returns and `Model.infer` takes)."""
    if isinstance(obj, pa.RecordBatch):
        return obj
    batches = obj.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=obj.schema)


def failed_prepared(model, batch: pa.RecordBatch, errors: list[str]) -> pa.RecordBatch:
    """Prepared rows that will not be predicted: PREPROCESS_FAILED, one error message per row."""
    n, dim = batch.num_rows, int(model.bundle.architecture["input_dim"])
    cols = {ID: batch.column(ID),
            PREPARED_X: pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * dim, np.float32)), dim),
            PREPARED_KEY: pa.array(np.zeros(n, np.int64)),
            FLAGS: pa.array(np.full(n, int(Flag.PREPROCESS_FAILED), np.int32)),
            ERROR: pa.array(errors, pa.string())}
    if model.emulator is not None:
        cols.update(model.fit_columns(np.zeros((n, model.grid.n), np.float32), np.full(n, np.nan),
                                      np.full(n, np.nan)))
    cols.update({k: batch.column(k).cast(pa.float64()) for k in model.bundle.target_names
                 if k in batch.schema.names})
    return _with_labels(model, pa.RecordBatch.from_pydict(cols))


def _with_labels(model, prepared: pa.RecordBatch) -> pa.RecordBatch:
    """`prepared` with every target label column, in target order (null where the input had none)."""
    labels = model.bundle.target_names
    cols = {k: prepared.column(k) for k in prepared.schema.names if k not in labels}
    for name in labels:
        cols[name] = (prepared.column(name).cast(pa.float64()) if name in prepared.schema.names
                      else pa.nulls(prepared.num_rows, pa.float64()))
    return pa.RecordBatch.from_pydict(cols)


# --- the local pipeline ----------------------------------------------------------------------------

class _Stop(Exception):
    """Raised inside a stage thread when the run is being torn down."""


class LocalPipeline:
    """Runs `files` through `model`, writing each file's results with the marker protocol."""

    def __init__(self, model, identity: RunIdentity, out: Path, *, samples: int | None, seed: int,
                 backend: str, batch_size: int, progress: bool, workers: int = 1,
                 on_file: Callable[[], None] = lambda: None):
        """`on_file` is called after each file is committed or failed (the run manifest's checkpoint)."""
        self.model, self.identity, self.out = model, identity, out
        self.on_file = on_file
        self.samples, self.seed, self.backend, self.batch_size = samples, seed, backend, batch_size
        self.progress = progress
        self.workers = workers
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, files: list[Path], reports: list[FileReport]) -> None:
        """Run `files`, updating `reports` (one per file, in order) as files finish or fail; they
        stay valid when the run stops on an error (e.g. a full disk), for the run manifest."""
        prepared_q: queue.Queue = queue.Queue(maxsize=2 * self.workers)
        results_q: queue.Queue = queue.Queue(maxsize=2)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="starcast-prepare")
        threads = [threading.Thread(target=self._guard, args=(self._read, files, pool, prepared_q),
                                    name="starcast-read", daemon=True),
                   threading.Thread(target=self._guard, args=(self._infer, prepared_q, results_q),
                                    name="starcast-infer", daemon=True)]
        total = sum(footer_rows(f) for f in files)
        bar = tqdm(total=total, unit="spectra", unit_scale=True, dynamic_ncols=True, desc="starcast run",
                   disable=not self.progress or not sys.stderr.isatty())
        writers: dict[int, ResultsWriter] = {}
        try:
            for t in threads:
                t.start()
            self._write(files, reports, results_q, writers, bar)
        finally:
            self._stop.set()
            for w in writers.values():
                w.abort()
            pool.shutdown(wait=False, cancel_futures=True)
            for t in threads:
                t.join(timeout=5)
            bar.close()

    # Each stage below runs in its own thread; messages are (kind, file index, payload) tuples,
    # kind in start | rows | end | fail | crash, kept in input order from reader to writer.

    def _guard(self, stage, *args) -> None:
        out_q = args[-1]
        try:
            stage(*args)
        except _Stop:
            return
        except BaseException as exc:  # noqa: BLE001 - hand any bug to the writer, never hang
            msg = ("crash", -1, exc)
            self._put(out_q, _done(msg) if stage == self._read else msg, force=True)

    def _read(self, files: list[Path], pool: ThreadPoolExecutor, out_q: queue.Queue) -> None:
        for i, path in enumerate(files):
            t0 = time.perf_counter()
            try:
                inp = open_input(path)
                self._put(out_q, _done(("start", i, inp.id_type)))
                rows = 0
                for batch in read_input(inp, self.batch_size):
                    self._add("read", time.perf_counter() - t0)
                    self._put(out_q, pool.submit(self._prepare, i, batch, inp.grid, rows))
                    rows += batch.num_rows
                    t0 = time.perf_counter()
                self._put(out_q, _done(("end", i, rows)))
            except (CatalogError, OSError, pa.ArrowException) as exc:
                self._put(out_q, _done(("fail", i, _reason(exc))))
        self._put(out_q, _done(None))

    def _prepare(self, i: int, batch: pa.RecordBatch, grid: WavelengthGrid | None, first_row: int):
        t0 = time.perf_counter()
        try:
            msg = ("rows", i, prepare_rows(self.model, batch, grid, first_row))
        except StarcastError as exc:
            msg = ("fail", i, _reason(exc))
        self._add("prepare", time.perf_counter() - t0)
        return msg

    def _infer(self, in_q: queue.Queue, out_q: queue.Queue) -> None:
        while True:
            msg = self._get(in_q).result()
            if msg is not None and msg[0] == "rows":
                t0 = time.perf_counter()
                table = infer_rows(self.model, msg[2], samples=self.samples, seed=self.seed,
                                   backend=self.backend)
                self._add("infer", time.perf_counter() - t0)
                msg = ("rows", msg[1], table)
            self._put(out_q, msg)
            if msg is None:
                return

    def _write(self, files, reports, in_q: queue.Queue, writers: dict, bar: tqdm) -> None:
        targets, failed = self.model.bundle.target_names, set()
        while (msg := in_q.get()) is not None:
            kind, i, payload = msg
            t0 = time.perf_counter()
            if kind == "crash":
                raise payload
            report = reports[i]
            if i in failed:
                continue  # the rest of a file that failed
            if kind == "start":
                empty = failed_results(pa.array([], payload), targets, 0, None,
                                       emulator=self.model.emulator is not None)
                writers[i] = ResultsWriter(self.out, files[i], self.identity, empty)
            elif kind == "rows":
                writers[i].write(payload, report)
                bar.update(payload.num_rows)
            elif kind == "end":
                report.rows_in = payload
                if report.rows_out != payload:  # the exactly-once invariant, checked before commit
                    raise RuntimeError(f"{files[i]}: {payload} rows read but {report.rows_out} written")
                writers.pop(i).commit(report)
                report.status = "done"
                self.on_file()
            elif kind == "fail":
                failed.add(i)
                if i in writers:
                    writers.pop(i).abort()
                fail_file(report, payload)
                self.on_file()
            self._add("write", time.perf_counter() - t0)

    def _put(self, q: queue.Queue, item, force: bool = False) -> None:
        while True:
            if self._stop.is_set() and not force:
                raise _Stop
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if force and self._stop.is_set():
                    return

    def _get(self, q: queue.Queue):
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stage_seconds[stage] += seconds


def _done(msg) -> Future:
    fut: Future = Future()
    fut.set_result(msg)
    return fut


def fail_file(report: FileReport, reason: str) -> None:
    """Mark an input file failed (no results kept), say so on stderr; `rows_in` still counts what
    its footer holds, so the manifest shows the rows that did not come out."""
    report.status, report.error = "failed", reason
    report.rows_in = footer_rows(report.input)
    report.reset()
    tqdm.write(f"starcast: skipping {report.input}: {reason}", file=sys.stderr)


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"
