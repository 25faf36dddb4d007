"""The embedded local pipeline: one process, four overlapping stages joined by bounded queues.

    reader --(futures, bounded)--> prepare pool (threads) --> infer thread --(bounded)--> writer (caller)

Reading streams row groups (`iter_batches`), preprocessing runs in a pool of `workers` threads (one
by default: the Numba kernels are `parallel=True`, so one call already uses several cores, and they
do not release the GIL), inference in one thread and writing in the calling thread, which also drives
the progress bar. Without a GPU, preprocessing and inference split the cores (`thread_budget`)
instead of each spinning a pool over all of them. Order is kept: futures are queued
in input order. Memory is bounded by the queue sizes (a few batches), whatever the catalog size.
The per-batch steps (`rows.Predictor`) and the per-file lifecycle (`manifest.OutputFile`) are the
Ray pipeline's too, so the two paths give the same numbers and keep the same promises.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numba
import pyarrow as pa
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..catalogs.schema import WavelengthGrid
from ..errors import CatalogError, StarcastError
from .inputs import footer_rows, open_input, read_input
from .manifest import FileReport, OutputFile, fail_file
from .rows import Predictor

_POLL_S = 0.1  # how often blocked threads look at the stop flag


# --- the local pipeline ----------------------------------------------------------------------------

class _Stop(Exception):
    """Raised inside a stage thread when the run is being torn down."""


class LocalPipeline:
    """Runs `files` through `predictor`, writing each file's results with the marker protocol."""

    def __init__(self, predictor: Predictor, out: Path, *, batch_size: int, progress: bool, workers: int = 1,
                 on_file: Callable[[], None] = lambda: None):
        """`on_file` is called after each file is committed or failed (the run manifest's checkpoint)."""
        self.predictor, self.out, self.on_file = predictor, out, on_file
        self.batch_size = batch_size
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
        prepare_threads, infer_threads = thread_budget(self.predictor.identity.backend, self.workers)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="starcast-prepare",
                                  initializer=limit_threads, initargs=(prepare_threads, None))
        threads = [threading.Thread(target=self._guard, args=(self._read, files, pool, prepared_q),
                                    name="starcast-read", daemon=True),
                   threading.Thread(target=self._guard, name="starcast-infer", daemon=True,
                                    args=(self._infer, prepared_q, infer_threads, results_q))]
        total = sum(footer_rows(f) for f in files)
        bar = tqdm(total=total, unit="spectra", unit_scale=True, dynamic_ncols=True, desc="starcast run",
                   disable=not self.progress or not sys.stderr.isatty())
        outputs: dict[int, OutputFile] = {}
        torch_threads = torch.get_num_threads()
        try:
            for t in threads:
                t.start()
            self._write(reports, results_q, outputs, bar)
        finally:
            self._stop.set()
            for output in outputs.values():
                output.abort()
            pool.shutdown(wait=False, cancel_futures=True)
            for t in threads:
                t.join(timeout=5)
            bar.close()
            torch.set_num_threads(torch_threads)

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
                self._put(out_q, _done(("start", i, inp)))
                rows = 0
                for batch in read_input(inp, self.batch_size):
                    self._add("read", time.perf_counter() - t0)
                    self._put(out_q, pool.submit(self._prepare, i, batch, inp.grid, rows))
                    rows += batch.num_rows
                    t0 = time.perf_counter()
                self._put(out_q, _done(("end", i, None)))
            except (CatalogError, OSError, pa.ArrowException) as exc:
                self._put(out_q, _done(("fail", i, _reason(exc))))
        self._put(out_q, _done(None))

    def _prepare(self, i: int, batch: pa.RecordBatch, grid: WavelengthGrid | None, first_row: int):
        t0 = time.perf_counter()
        try:
            msg = ("rows", i, self.predictor.prepare(batch, grid, first_row))
        except StarcastError as exc:
            msg = ("fail", i, _reason(exc))
        self._add("prepare", time.perf_counter() - t0)
        return msg

    def _infer(self, in_q: queue.Queue, threads: int | None, out_q: queue.Queue) -> None:
        limit_threads(None, threads)
        # NumPy's BLAS has one pool per process, limited here, not in the main thread: threadpoolctl
        # lets only the thread that set a limit change it, and the emulator fit, run from this thread,
        # lowers it to one BLAS thread per chunk to fit its chunks side by side (`Emulator.chi2`)
        with threadpool_limits(threads, user_api="blas"):
            while True:
                msg = self._get(in_q).result()
                if msg is not None and msg[0] == "rows":
                    t0 = time.perf_counter()
                    table = self.predictor.infer(msg[2])
                    self._add("infer", time.perf_counter() - t0)
                    msg = ("rows", msg[1], table)
                self._put(out_q, msg)
                if msg is None:
                    return

    def _write(self, reports, in_q: queue.Queue, outputs: dict, bar: tqdm) -> None:
        failed = set()
        while (msg := in_q.get()) is not None:
            kind, i, payload = msg
            t0 = time.perf_counter()
            if kind == "crash":
                raise payload
            if i in failed:
                continue  # the rest of a file that failed
            if kind == "start":
                outputs[i] = OutputFile(self.out, payload, self.predictor.identity, reports[i],
                                        self.predictor.failed(pa.array([], payload.id_type), None),
                                        self.on_file)
            elif kind == "rows":
                outputs[i].write(payload)
                bar.update(payload.num_rows)
            elif kind == "end":
                outputs.pop(i).check_complete()
            elif kind == "fail":
                failed.add(i)
                if i in outputs:
                    outputs.pop(i).fail(payload)
                else:
                    fail_file(reports[i], payload)
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


def _reason(exc: Exception) -> str:
    return exc.detail if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"


def thread_budget(backend: str, workers: int = 1) -> tuple[int | None, int | None]:
    """(Numba threads per preprocessing worker, torch and BLAS threads for inference). On the CPU the
    two stages split this process's cores, half each (measured on 2 cores: 990 against 898
    spectra/s with both stages on every core); with a GPU, preprocessing keeps every core and the
    thread counts are left alone (None)."""
    if backend not in ("cpu", "reference"):
        return None, None
    cores = len(os.sched_getaffinity(0))
    infer = max(1, cores // 2)
    return max(1, (cores - infer) // workers), infer


def limit_threads(numba_threads: int | None, torch_threads: int | None) -> None:
    """Called in the thread that will run the kernels (Numba's thread count is per calling thread):
    Numba's and torch's intra-op thread counts, None to leave one alone."""
    if numba_threads is not None:
        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
