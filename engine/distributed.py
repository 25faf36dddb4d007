"""Ray Data plumbing for `starcast run --ray`: the local pipeline's per-batch steps
(`rows.Predictor`) and per-file lifecycle (`manifest.OutputFile`), spread over a cluster.

One dataset for all input files, over the read units of each file (runs of row groups,
`InputFile.units`), mapped by `Worker`s (`_layout`): on a CPU cluster one actor per CPU reads,
prepares and infers a unit; with GPUs, read tasks prepare on the CPUs and one actor per GPU infers.
Reads use the local path's reader (`inputs.read_input`: page checksums verified, each file with its
own schema and grid); the model is loaded once per worker process. Results stream back in input
order to the driver, which splits rows by their `path` and writes each file's `OutputFile`
(temp + fsync + rename + marker, duplicate ids flagged, committed when its rows out equal the row
count of its footer). A file that cannot be read becomes one `file_error` row that fails that file
alone, so a bad file never fails the dataset. Ray retries the tasks of a killed actor or a lost
node; if the dataset still fails (e.g. the cluster died), the run stops with an error and the files
not yet committed stay pending for `--resume`.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalogs.schema import ID
from ..errors import CatalogError, OutputError, StarcastError
from .inputs import InputFile, open_input, read_input
from .manifest import FileReport, OutputFile, RunIdentity, fail_file
from .pipeline import limit_threads
from .rows import Predictor, as_batch

PATH = "path"  # the input file of each row; carried through both stages
FILE_ERROR = "file_error"  # non-null on the one row that reports an unreadable file
_CONNECT_TIMEOUT_S = 5.0  # a host:port that does not answer within this is reported, not waited for
_STALL_S = 1800.0  # default bound on the wait for the next results batch (see `stall_seconds`)


class Worker:
    """A pipeline worker's callable (Ray actor or task): the run's `Predictor`, loaded once per
    process. Called on prepared rows it infers them; with `read`, it is called on read units
    (`path`, `row_groups`) and reads, prepares and infers them itself. `threads`: the CPU threads its
    kernels may use (Numba and torch), None to leave them. Knows nothing of Ray."""

    def __init__(self, model_ref: str, identity: RunIdentity, *, read: bool = False, batch_size: int = 0,
                 threads: int | None = None):
        self.predictor = _cached_predictor(model_ref, identity)
        self.read, self.batch_size, self.threads = read, batch_size, threads

    def __call__(self, table: pa.Table) -> Iterator[pa.Table]:
        if self.threads is not None:  # per call: Numba's thread count is per calling thread
            limit_threads(self.threads, self.threads)
        for prepared in (self._prepare(table) if self.read else [table]):
            columns = prepared.drop_columns([PATH, FILE_ERROR])
            out = self.predictor.infer(as_batch(columns))
            yield out.append_column(PATH, prepared[PATH]).append_column(FILE_ERROR, prepared[FILE_ERROR])

    def _prepare(self, units: pa.Table) -> Iterator[pa.Table]:
        """Read and prepare read units; a unit that cannot be read yields one `file_error` row for its
        file instead of failing the dataset."""
        predictor = self.predictor
        for path, groups in zip(units[PATH].to_pylist(), units["row_groups"].to_pylist(), strict=True):
            id_type = pa.int64()  # of the error row when even the footer cannot be read
            try:
                inp = open_input(path)
                id_type = inp.id_type
                first_row = inp.first_row(groups[0])
                for batch in read_input(inp, self.batch_size, groups):
                    yield _tagged(predictor.prepare(batch, inp.grid, first_row), path, None)
                    first_row += batch.num_rows
            except StarcastError as exc:
                reason = exc.detail if isinstance(exc, CatalogError) else str(exc)
                one_row = pa.RecordBatch.from_arrays([pa.nulls(1, id_type)], [ID])
                yield _tagged(predictor.failed_prepared(one_row, [reason]), path, reason)


def read_task(units: pa.Table, *, model_ref: str, identity: RunIdentity,
              batch_size: int) -> Iterator[pa.Table]:
    """Read and prepare read units as a Ray task (the GPU layout: inference runs in GPU actors)."""
    return Worker(model_ref, identity, batch_size=batch_size)._prepare(units)


def _tagged(prepared: pa.RecordBatch, path: str, file_error: str | None) -> pa.Table:
    n = prepared.num_rows
    return (pa.Table.from_batches([prepared]).append_column(PATH, pa.array([path] * n, pa.string()))
            .append_column(FILE_ERROR, pa.array([file_error] * n, pa.string())))


@functools.cache
def _cached_predictor(model_ref: str, identity: RunIdentity) -> Predictor:
    return Predictor.load(model_ref, identity)


def run_ray(files: list[Path], reports: list[FileReport], out: Path, model_ref, predictor: Predictor, *,
            address: str, batch_size: int, progress: bool, on_file: Callable[[], None] = lambda: None
            ) -> dict[str, float]:
    """Run `files` on the Ray cluster at `address` ("auto", "local" or host:port), updating
    `reports` (one per file, in order) and calling `on_file` after each file is committed or failed;
    returns seconds per stage. A dataset that fails as a whole raises `StarcastError` (`OutputError`
    for a results write that failed)."""
    import ray

    _connect(ray, address, progress)
    if "/" in str(model_ref) or os.sep in str(model_ref):  # a bundle path: absolute for the workers
        model_ref = str(Path(model_ref).resolve())
    outputs: dict[str, OutputFile] = {}
    readable = []
    for f, report in zip(files, reports, strict=True):
        try:
            inp = open_input(f)
        except CatalogError as exc:
            fail_file(report, exc.detail)
            continue
        output = OutputFile(out, inp, predictor.identity, report,
                            predictor.failed(pa.array([], inp.id_type), None), on_file)
        if output.open:  # not a file without rows (committed at once)
            readable.append(inp)
            outputs[_key(inp)] = output
    stage_seconds: dict[str, float] = defaultdict(float)
    try:
        _run_dataset(ray, readable, outputs, str(model_ref), predictor.identity, batch_size, stage_seconds)
    except (OutputError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the cluster failed; the finished files stay finished
        raise StarcastError(f"the Ray run stopped: {_reason(exc)}; files not yet finished are left for "
                            f"--resume") from exc
    finally:
        for output in outputs.values():
            output.abort()
    return dict(stage_seconds)


def _run_dataset(ray, readable: list[InputFile], outputs: dict[str, OutputFile], model_ref: str,
                 identity: RunIdentity, batch_size: int, stage_seconds: dict) -> None:
    """One dataset over the read units of `readable`; each file is committed with its last row."""
    units = [{PATH: _key(inp), "row_groups": unit} for inp in readable for unit in inp.units(batch_size)]
    if not units:
        return
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    for step in _layout(ray, model_ref, identity, batch_size):
        ds = ds.map_batches(**step)
    t0 = time.perf_counter()
    for table in bounded(ds.iter_batches(batch_format="pyarrow", batch_size=None), stall_seconds()):
        t1 = time.perf_counter()
        stage_seconds["ray_execute"] += t1 - t0
        for path, rows in _runs(table):
            output = outputs[path]
            if not output.open:
                continue  # the rest of a file that failed
            errors = rows[FILE_ERROR].drop_null()
            if len(errors):
                output.fail(errors[0].as_py())
            else:
                output.write(rows.drop_columns([PATH, FILE_ERROR]))
        t0 = time.perf_counter()
        stage_seconds["write"] += t0 - t1
    for output in outputs.values():
        output.check_complete()


def _key(inp: InputFile) -> str:
    return str(inp.path.resolve())


def _runs(table: pa.Table):
    """(path, rows) for each run of consecutive rows from one input file."""
    paths = table[PATH]
    if table.num_rows == 0:
        return
    change = pc.not_equal(paths.slice(1), paths.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    starts = [0, *(np.flatnonzero(change) + 1), table.num_rows]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        yield paths[int(a)].as_py(), table.slice(int(a), int(b - a))


def _layout(ray, model_ref: str, identity: RunIdentity, batch_size: int) -> list[dict]:
    """The `map_batches` steps over the read units, by what the cluster holds.

    With GPUs: read tasks prepare on the CPUs and one inference actor per GPU infers, so that
    preprocessing overlaps inference. The read tasks ask for no CPU (at most as many run at once as
    there are CPUs), so actors can never starve them: actors that held every CPU (e.g. after a node
    was lost and its actor restarted elsewhere) would leave the run waiting forever. Their remote
    args differ from the actors', which also keeps Ray from fusing the two.
    Without GPUs: one actor per CPU reads, prepares and infers its units with one thread, so no
    prepared arrays cross the object store and no two thread pools share a core."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    worker = {"fn": Worker, "batch_format": "pyarrow"}
    if not gpus:
        return [{**worker, "batch_size": 1, "compute": ray.data.ActorPoolStrategy(size=cpus), "num_cpus": 1,
                 "fn_constructor_args": (model_ref, identity),
                 "fn_constructor_kwargs": {"read": True, "batch_size": batch_size, "threads": 1}}]
    return [{"fn": read_task, "batch_format": "pyarrow", "batch_size": 1, "num_cpus": 0,
             "compute": ray.data.TaskPoolStrategy(size=max(1, cpus)),
             "fn_kwargs": {"model_ref": model_ref, "identity": identity, "batch_size": batch_size}},
            {**worker, "batch_size": batch_size, "compute": ray.data.ActorPoolStrategy(size=gpus),
             "num_gpus": 1, "fn_constructor_args": (model_ref, identity)}]


def stall_seconds() -> float:
    """How long the driver waits for the next results batch before it gives up on the cluster:
    `STARCAST_RAY_STALL_S` (default 1800 s, room for an autoscaler to add nodes)."""
    return float(os.environ.get("STARCAST_RAY_STALL_S", _STALL_S))


def bounded(items: Iterator, seconds: float) -> Iterator:
    """`items`, consumed in a helper thread, raising `StarcastError` when the next item takes longer
    than `seconds` (a blocked cluster ends the run instead of hanging it). When the consumer stops,
    the helper closes `items` (for Ray: shuts the dataset's execution down, freeing its actors)."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop, done = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((done, exc))
        finally:
            getattr(items, "close", lambda: None)()

    threading.Thread(target=produce, name="starcast-ray-results", daemon=True).start()
    try:
        while True:
            try:
                item, exc = q.get(timeout=seconds)
            except queue.Empty:
                raise StarcastError(f"no results from the Ray cluster for {seconds:.0f} s (is it short of "
                                    f"CPUs, or down?); set STARCAST_RAY_STALL_S to wait longer") from None
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _reason(exc: BaseException) -> str:
    """One line naming the original error (a Ray task error wraps it in a remote traceback)."""
    exc = getattr(exc, "cause", None) or exc
    if isinstance(exc, CatalogError):
        return exc.detail
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _connect(ray, address: str, progress: bool) -> None:
    if not ray.is_initialized():
        _check_reachable(address)
        try:  # address "local" starts a new instance even when `ray start` left one on this machine
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False)
        except ConnectionError as exc:
            raise _unreachable(address, exc) from exc
    ctx = ray.data.DataContext.get_current()  # importing ray.data configures its loggers: then quiet them
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.execution_options.preserve_order = True  # rows come back in input order, as locally
    ctx.enable_progress_bars = progress and sys.stderr.isatty()


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens at (`ray.init` would retry for minutes)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise _unreachable(address, exc) from exc


def _unreachable(address: str, exc: Exception) -> StarcastError:
    return StarcastError(f"cannot connect to a Ray cluster at {address!r} ({exc}); start one with "
                         f"`ray start --head`, or use --ray local")
