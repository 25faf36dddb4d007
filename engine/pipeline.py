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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..catalogs.io import iter_batches, read_grid
from ..catalogs.schema import ERROR, FLAGS, ID, Flag, WavelengthGrid, results_schema
from ..errors import CatalogError, StarcastError
from .manifest import FileReport, ResultsWriter, RunIdentity, clear_outputs
from .predictor import PREPARED_IVAR

_POLL_S = 0.1  # how often blocked threads look at the stop flag


# --- the per-batch steps, shared with the Ray pipeline -------------------------------------------

def prepare_rows(model, batch: pa.RecordBatch, grid: WavelengthGrid | None) -> pa.RecordBatch:
    """`model.prepare(batch)`, one prepared row per input row whatever happens: if the batch raises,
    each row is retried alone and a row that still fails gets PREPROCESS_FAILED and its error.
    A `StarcastError` (e.g. no grid for the file) concerns the whole file and is raised."""
    try:
        return as_batch(model.prepare(batch, source_grid=grid))
    except StarcastError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure becomes a flagged row, never a lost one
        if batch.num_rows == 1:
            return _failed_prepared(model, batch, f"preprocessing failed: {type(exc).__name__}: {exc}")
    pieces = [pa.Table.from_batches([prepare_rows(model, batch.slice(i, 1), grid)])
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
                              chi2=model.emulator is not None)


def failed_results(ids: pa.Array, targets: list[str], flags, error: str | None, *,
                   chi2: bool = False) -> pa.Table:
    """Results rows with no numbers (null statistics), the given flags and error; `chi2`: with the
    goodness-of-fit columns of a model with an emulator."""
    n = len(ids)
    schema = results_schema(targets, id_type=ids.type, chi2=chi2)
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


def _failed_prepared(model, batch: pa.RecordBatch, error: str) -> pa.RecordBatch:
    n, dim = batch.num_rows, int(model.bundle.architecture["input_dim"])
    cols = {ID: batch.column(ID),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * dim, np.float32)), dim),
            "key": pa.array(np.zeros(n, np.int64)),
            FLAGS: pa.array(np.full(n, int(Flag.PREPROCESS_FAILED), np.int32)),
            ERROR: pa.array([error] * n, pa.string())}
    if model.emulator is not None:
        d = len(model.emulator.sigma)
        cols[PREPARED_IVAR] = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * d, np.float32)), d)
    cols.update({k: batch.column(k).cast(pa.float64()) for k in model.bundle.target_names
                 if k in batch.schema.names})
    return pa.RecordBatch.from_pydict(cols)


# --- the local pipeline ----------------------------------------------------------------------------

class _Stop(Exception):
    """Raised inside a stage thread when the run is being torn down."""


class LocalPipeline:
    """Runs `files` through `model`, writing each file's results with the marker protocol."""

    def __init__(self, model, identity: RunIdentity, out: Path, *, samples: int | None, seed: int,
                 backend: str, batch_size: int, progress: bool, workers: int = 1):
        self.model, self.identity, self.out = model, identity, out
        self.samples, self.seed, self.backend, self.batch_size = samples, seed, backend, batch_size
        self.progress = progress
        self.workers = workers
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, files: list[Path]) -> list[FileReport]:
        reports = [FileReport(str(f)) for f in files]
        prepared_q: queue.Queue = queue.Queue(maxsize=2 * self.workers)
        results_q: queue.Queue = queue.Queue(maxsize=2)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="starcast-prepare")
        threads = [threading.Thread(target=self._guard, args=(self._read, files, pool, prepared_q),
                                    name="starcast-read", daemon=True),
                   threading.Thread(target=self._guard, args=(self._infer, prepared_q, results_q),
                                    name="starcast-infer", daemon=True)]
        total = sum(_num_rows(f) for f in files)
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
        return reports

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
                schema = pq.read_schema(path)
                if ID not in schema.names:
                    raise CatalogError(f"no {ID!r} column (columns: {', '.join(schema.names)})",
                                       file=str(path))
                grid = read_grid(path)
                self._put(out_q, _done(("start", i, schema.field(ID).type)))
                rows = 0
                for batch in iter_batches(path, batch_rows=self.batch_size):
                    self._add("read", time.perf_counter() - t0)
                    rows += batch.num_rows
                    self._put(out_q, pool.submit(self._prepare, i, batch, grid))
                    t0 = time.perf_counter()
                self._put(out_q, _done(("end", i, rows)))
            except (CatalogError, OSError, pa.ArrowException) as exc:
                self._put(out_q, _done(("fail", i, _reason(exc))))
        self._put(out_q, _done(None))

    def _prepare(self, i: int, batch: pa.RecordBatch, grid: WavelengthGrid | None):
        t0 = time.perf_counter()
        try:
            msg = ("rows", i, prepare_rows(self.model, batch, grid))
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
                clear_outputs(self.out, files[i])
                empty = failed_results(pa.array([], payload), targets, 0, None,
                                       chi2=self.model.emulator is not None)
                writers[i] = ResultsWriter(self.out, files[i], self.identity, empty)
            elif kind == "rows":
                writers[i].write(payload)
                report.count(payload)
                bar.update(payload.num_rows)
            elif kind == "end":
                report.rows_in = payload
                if report.rows_out != payload:  # the exactly-once invariant, checked before commit
                    raise RuntimeError(f"{files[i]}: {payload} rows read but {report.rows_out} written")
                writers.pop(i).commit(report)
                report.status = "done"
            elif kind == "fail":
                failed.add(i)
                if i in writers:
                    writers.pop(i).abort()
                report.status, report.error = "failed", payload
                report.rows_out = report.rows_flagged = report.rows_failed = 0
                tqdm.write(f"starcast: skipping {files[i]}: {payload}", file=sys.stderr)
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


def _num_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException):
        return 0


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"
