"""Ray Data plumbing for `starcast run --ray`: the same per-file and per-batch steps as the local
pipeline.

One dataset for all input files: the read units of each file (runs of row groups,
`InputFile.units`) -> `map_batches(read_task)`, tasks that read a unit with the local path's reader
(`inputs.read_input`: page checksums verified, each file with its own schema and grid) and run
`prepare_rows`, reserving no CPU so that actors never starve them -> `map_batches(Inference)` in an
actor pool (one actor per GPU, CPU actors where there is none; the model is loaded once per actor) ->
streamed back in input order to the driver, which splits rows by their `path` and writes each file
with the local pipeline's writer (temp + fsync + rename + marker, duplicate ids flagged); a file is
committed when its rows out equal the row count of its footer. A file that cannot be read becomes
one `file_error` row that fails that file alone, so a bad file never fails the dataset. Ray retries
the tasks of a killed actor or a lost node; if the dataset still fails (e.g. the cluster died), the
run stops with an error and the files not yet committed stay pending for `--resume`.
"""

from __future__ import annotations

import functools
import importlib.util
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
from .manifest import FileReport, ResultsWriter, RunIdentity
from .pipeline import as_batch, fail_file, failed_prepared, failed_results, infer_rows, prepare_rows
from .predictor import load_model

PATH = "path"  # the input file of each row; carried through both stages
FILE_ERROR = "file_error"  # non-null on the one row that reports an unreadable file
_CONNECT_TIMEOUT_S = 5.0  # a host:port that does not answer within this is reported, not waited for
_STALL_S = 1800.0  # default bound on the wait for the next results batch (see `stall_seconds`)


class Inference:
    """The actor's callable: loads the model once, then `Model.infer` per batch (the `path` and
    `file_error` columns pass through). Knows nothing of Ray."""

    def __init__(self, model_ref: str, samples: int | None, seed: int, backend: str):
        self.model = load_model(model_ref)
        self.samples, self.seed, self.backend = samples, seed, backend

    def __call__(self, prepared: pa.Table) -> pa.Table:
        out = infer_rows(self.model, as_batch(prepared.drop_columns([PATH, FILE_ERROR])),
                         samples=self.samples, seed=self.seed, backend=self.backend)
        return out.append_column(PATH, prepared[PATH]).append_column(FILE_ERROR, prepared[FILE_ERROR])


def read_task(units: pa.Table, *, model_ref: str, batch_size: int) -> Iterator[pa.Table]:
    """Read and prepare read units (`path`, `row_groups`) as a Ray task; a unit that cannot be read
    yields one `file_error` row for its file instead of failing the dataset."""
    model = _cached_model(model_ref)
    for path, groups in zip(units[PATH].to_pylist(), units["row_groups"].to_pylist(), strict=True):
        id_type = pa.int64()  # of the error row when even the footer cannot be read
        try:
            inp = open_input(path)
            id_type = inp.id_type
            first_row = inp.first_row(groups[0])
            for batch in read_input(inp, batch_size, groups):
                yield _tagged(prepare_rows(model, batch, inp.grid, first_row), path, None)
                first_row += batch.num_rows
        except StarcastError as exc:
            reason = exc.reason if isinstance(exc, CatalogError) else str(exc)
            one_row = pa.RecordBatch.from_arrays([pa.nulls(1, id_type)], [ID])
            yield _tagged(failed_prepared(model, one_row, [reason]), path, reason)


def _tagged(prepared: pa.RecordBatch, path: str, file_error: str | None) -> pa.Table:
    n = prepared.num_rows
    return (pa.Table.from_batches([prepared]).append_column(PATH, pa.array([path] * n, pa.string()))
            .append_column(FILE_ERROR, pa.array([file_error] * n, pa.string())))


@functools.cache
def _cached_model(model_ref: str):
    return load_model(model_ref)


def run_ray(files: list[Path], reports: list[FileReport], out: Path, model_ref, identity: RunIdentity, *,
            address: str, samples: int | None, seed: int, backend: str, batch_size: int, progress: bool,
            model=None, on_file: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Run `files` on the Ray cluster at `address` ("auto", "local" or host:port), updating
    `reports` (one per file, in order) and calling `on_file` after each file is committed or failed;
    returns seconds per stage. A dataset that fails as a whole raises `StarcastError` (`OutputError`
    for a results write that failed)."""
    import ray

    _connect(ray, address, progress)
    model = model if model is not None else load_model(model_ref)
    if "/" in str(model_ref) or os.sep in str(model_ref):  # a bundle path: absolute for the workers
        model_ref = str(Path(model_ref).resolve())
    by_key, readable = {}, []
    for f, report in zip(files, reports, strict=True):
        try:
            inp = open_input(f)
        except CatalogError as exc:
            fail_file(report, exc.reason)
            continue
        readable.append(inp)
        by_key[str(f.resolve())] = (inp, report)
    stage_seconds: dict[str, float] = defaultdict(float)
    try:
        _run_dataset(ray, readable, by_key, model, str(model_ref), identity, out,
                     dict(samples=samples, seed=seed, backend=backend), batch_size, stage_seconds, on_file)
    except (OutputError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the cluster failed; the finished files stay finished
        raise StarcastError(f"the Ray run stopped: {_reason(exc)}; files not yet finished are left for "
                            f"--resume") from exc
    return dict(stage_seconds)


def _run_dataset(ray, readable: list[InputFile], by_key: dict, model, model_ref: str, identity, out,
                 options: dict, batch_size: int, stage_seconds: dict, on_file: Callable[[], None]) -> None:
    """One dataset over the read units of `readable`; commits each file when its last row is written."""
    writers: dict[str, ResultsWriter] = {}

    def commit(path: str) -> None:
        report = by_key[path][1]
        writers.pop(path).commit(report)
        report.status = "done"
        on_file()

    for inp in readable:
        if inp.num_rows == 0:  # no read unit: committed empty here
            _start(inp, by_key, writers, out, identity, model)
            commit(_key(inp))
    units = [{PATH: _key(inp), "row_groups": unit} for inp in readable for unit in inp.units(batch_size)]
    if not units:
        return
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    actors, reads = _resources(ray)
    # The reads' remote args differ from the actors' (num_cpus), which also keeps Ray from fusing
    # them into the actors: reading and preprocessing overlap inference instead of taking turns.
    ds = ds.map_batches(read_task, batch_format="pyarrow", batch_size=1, **reads,
                        fn_kwargs={"model_ref": model_ref, "batch_size": batch_size})
    ds = ds.map_batches(Inference, batch_format="pyarrow", batch_size=batch_size,
                        fn_constructor_args=(model_ref, options["samples"], options["seed"],
                                             options["backend"]), **actors)
    try:
        t0 = time.perf_counter()
        for table in bounded(ds.iter_batches(batch_format="pyarrow", batch_size=None), stall_seconds()):
            t1 = time.perf_counter()
            stage_seconds["ray_execute"] += t1 - t0
            for path, rows in _runs(table):
                inp, report = by_key[path]
                if report.status in ("done", "failed"):
                    continue  # the rest of a file that failed
                writer = writers.get(path) or _start(inp, by_key, writers, out, identity, model)
                errors = rows[FILE_ERROR].drop_null()
                if len(errors):
                    writers.pop(path).abort()
                    fail_file(report, errors[0].as_py())
                    on_file()
                    continue
                writer.write(rows.drop_columns([PATH, FILE_ERROR]), report)
                _check_count(inp, report, final=False)
                if report.rows_out == inp.num_rows:
                    commit(path)
            t0 = time.perf_counter()
            stage_seconds["write"] += t0 - t1
        for inp, report in by_key.values():
            if report.status not in ("done", "failed"):
                _check_count(inp, report, final=True)
    finally:
        for path, writer in writers.items():
            writer.abort()
            by_key[path][1].reset()


def _key(inp: InputFile) -> str:
    return str(inp.path.resolve())


def _check_count(inp: InputFile, report: FileReport, final: bool) -> None:
    """The exactly-once invariant: never more rows out than in the footer, and all of them at the end."""
    if report.rows_out > inp.num_rows or (final and report.rows_out != inp.num_rows):
        raise StarcastError(f"{report.input}: {inp.num_rows} rows in the file but {report.rows_out} written")


def _start(inp: InputFile, by_key: dict, writers: dict, out: Path, identity: RunIdentity,
           model) -> ResultsWriter:
    """Start writing `inp`'s results (clears its earlier results and marker)."""
    report = by_key[_key(inp)][1]
    report.rows_in = inp.num_rows
    report.reset()
    empty = failed_results(pa.array([], inp.id_type), model.bundle.target_names, 0, None,
                           emulator=model.emulator is not None)
    writers[_key(inp)] = ResultsWriter(out, inp.path, identity, empty)
    return writers[_key(inp)]


def _runs(table: pa.Table):
    """(path, rows) for each run of consecutive rows from one input file."""
    paths = table[PATH]
    if table.num_rows == 0:
        return
    change = pc.not_equal(paths.slice(1), paths.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    starts = [0, *(np.flatnonzero(change) + 1), table.num_rows]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        yield paths[int(a)].as_py(), table.slice(int(a), int(b - a))


def _resources(ray) -> tuple[dict, dict]:
    """(actor pool options, read task options). One inference actor per GPU; without GPUs, one
    (1-CPU) actor per two CPUs. The read tasks ask for no CPU (at most as many run at once as there
    are CPUs the actors leave), so they never wait for CPUs that actors hold: actors that held every
    CPU (e.g. after a node was lost and its actor restarted elsewhere) would starve the reads and
    the run would never end."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        actors = {"compute": ray.data.ActorPoolStrategy(size=gpus), "num_gpus": 1}
        held = gpus
    else:
        held = max(1, cpus // 2)
        actors = {"compute": ray.data.ActorPoolStrategy(size=held), "num_cpus": 1}
    return actors, {"compute": ray.data.TaskPoolStrategy(size=max(1, cpus - held)), "num_cpus": 0}


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


def avoid_http_import_race() -> None:
    """Ray Data 2.60 probes fsspec's HTTP filesystem for every path and catches only
    ModuleNotFoundError; without aiohttp, a thread that meets the half-imported module gets a plain
    ImportError and the dataset fails (seen intermittently here, in the ListFiles task's threaded
    file listing). Marking the module absent makes every probe fail the same, caught, way (HTTP
    needs aiohttp anyway). Runs on the driver and, through RUNTIME_ENV, in each worker."""
    if importlib.util.find_spec("aiohttp") is None:
        sys.modules.setdefault("fsspec.implementations.http", None)


def _reason(exc: BaseException) -> str:
    """One line naming the original error (a Ray task error wraps it in a remote traceback)."""
    exc = getattr(exc, "cause", None) or exc
    if isinstance(exc, CatalogError):
        return exc.reason
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


#: `ray.init(runtime_env=RUNTIME_ENV)` runs `avoid_http_import_race` in every worker of the job.
RUNTIME_ENV = {"worker_process_setup_hook": "starcast.engine.distributed.avoid_http_import_race"}


def _connect(ray, address: str, progress: bool) -> None:
    avoid_http_import_race()
    if not ray.is_initialized():
        _check_reachable(address)
        try:  # address "local" starts a new instance even when `ray start` left one on this machine
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False, runtime_env=RUNTIME_ENV)
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
