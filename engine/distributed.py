"""Ray Data plumbing for `starcast run --ray`: the same per-batch steps as the local pipeline.

One dataset for all input files: `read_parquet(include_paths=True)` -> `map_batches(prepare_task)`
(CPU tasks) -> `map_batches(Inference)` in an actor pool (one actor per GPU, CPU actors where there is
none; the model is loaded once per actor) -> streamed back in input order to the driver, which
splits rows by their `path` and writes each file with the local pipeline's temp + fsync + rename +
marker protocol; a file is committed when its rows out equal the row count of its footer. Ray
retries the tasks of a killed actor or a lost node. If the dataset fails (a corrupt page), the files
not yet committed are read once on the driver to find the bad ones, which fail alone, and the rest
run again in one more dataset.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ..catalogs.io import iter_batches, read_grid
from ..catalogs.schema import ID, WavelengthGrid
from ..errors import CatalogError, StarcastError
from .manifest import FileReport, ResultsWriter, RunIdentity, clear_outputs
from .pipeline import as_batch, failed_results, infer_rows, prepare_rows
from .predictor import load_model

PATH = "path"  # the column Ray's include_paths adds; carried through both stages


class Inference:
    """The actor's callable: loads the model once, then `Model.infer` per batch (the `path` column
    passes through). Knows nothing of Ray."""

    def __init__(self, model_ref: str, samples: int | None, seed: int, backend: str):
        self.model = load_model(model_ref)
        self.samples, self.seed, self.backend = samples, seed, backend

    def __call__(self, prepared: pa.Table) -> pa.Table:
        paths = prepared[PATH]
        out = infer_rows(self.model, as_batch(prepared.drop_columns([PATH])), samples=self.samples,
                         seed=self.seed, backend=self.backend)
        return out.append_column(PATH, paths)


def prepare_task(batch: pa.Table, *, model_ref: str, grids: dict[str, str | None]) -> pa.Table:
    """Preprocessing as a Ray task: `prepare_rows` per run of rows from one file (each file has its
    own wavelength grid; a batch may straddle two files). The model is loaded once per worker."""
    model = _cached_model(model_ref)
    pieces = []
    for path, rows in _runs(batch):
        grid = grids[path] and WavelengthGrid.from_json(grids[path])
        prepared = pa.Table.from_batches([prepare_rows(model, as_batch(rows.drop_columns([PATH])), grid)])
        pieces.append(prepared.append_column(PATH, pa.array([path] * rows.num_rows, pa.string())))
    return pa.concat_tables(pieces, promote_options="permissive")


@functools.cache
def _cached_model(model_ref: str):
    return load_model(model_ref)


def run_ray(files: list[Path], out: Path, model_ref, identity: RunIdentity, *, address: str,
            samples: int | None, seed: int, backend: str, batch_size: int, progress: bool,
            model=None) -> tuple[list[FileReport], dict[str, float]]:
    """Run `files` on the Ray cluster at `address` ("auto", "local" or host:port)."""
    import ray

    _connect(ray, address, progress)
    model = model if model is not None else load_model(model_ref)
    if "/" in str(model_ref) or os.sep in str(model_ref):  # a bundle path: absolute for the workers
        model_ref = str(Path(model_ref).resolve())
    reports = {str(f): FileReport(str(f)) for f in files}
    readable = {}
    for f in files:
        try:
            readable[str(f.resolve())] = (f, *_open(f))
        except CatalogError as exc:
            _fail(reports[str(f)], exc.reason)
    stage_seconds: dict[str, float] = defaultdict(float)
    args = (ray, model, model_ref, identity, out, dict(samples=samples, seed=seed, backend=backend),
            batch_size, reports, stage_seconds)
    try:
        _run_dataset(readable, *args)
    except Exception as exc:  # noqa: BLE001 - find the unreadable files, then run the rest once more
        remaining = {k: e for k, e in readable.items() if reports[str(e[0])].status != "done"}
        for key, (file, _, _) in list(remaining.items()):
            problem = _scan(file)
            if problem is not None:
                _fail(reports[str(file)], problem)
                del remaining[key]
        if remaining:
            try:
                _run_dataset(remaining, *args)
            except Exception:  # noqa: BLE001 - not a bad file: report the first error on each
                for file, _, _ in remaining.values():
                    if reports[str(file)].status != "done":
                        _fail(reports[str(file)], _reason(exc))
    return list(reports.values()), dict(stage_seconds)


def _run_dataset(readable: dict, ray, model, model_ref, identity, out, options, batch_size, reports,
                 stage_seconds) -> None:
    """One dataset over `readable` ({resolved path: (file, rows, grid)}); commits each file in turn."""
    total = sum(rows for _, rows, _ in readable.values())
    ds = ray.data.read_parquet(list(readable), include_paths=True,
                               override_num_blocks=max(len(readable), total // batch_size))
    ds = ds.map_batches(prepare_task, batch_format="pyarrow", batch_size=batch_size,
                        fn_kwargs={"model_ref": str(model_ref),
                                   "grids": {k: g and g.to_json() for k, (_, _, g) in readable.items()}})
    ds = ds.map_batches(Inference, batch_format="pyarrow", batch_size=batch_size,
                        fn_constructor_args=(str(model_ref), options["samples"], options["seed"],
                                             options["backend"]), **_actor_pool(ray))
    pending = iter(readable.values())
    key, writer, report = None, None, None
    try:
        t0 = time.perf_counter()
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            t1 = time.perf_counter()
            stage_seconds["ray_execute"] += t1 - t0
            for path, rows in _runs(table):
                while path != key:  # the next file starts: the previous one must be complete
                    if writer is not None:
                        raise StarcastError(f"{report.input}: rows of {path} arrived before it was complete")
                    file, rows_in, _ = next(pending)
                    key, (writer, report) = str(file.resolve()), _open_writer(file, rows_in, out, identity,
                                                                               reports, model)
                if writer is None:
                    raise StarcastError(f"{report.input}: more rows than its {report.rows_in}")
                rows = rows.drop_columns([PATH])
                writer.write(rows)
                report.count(rows)
                writer = _commit_if_complete(writer, report)
            t0 = time.perf_counter()
            stage_seconds["write"] += t0 - t1
        if writer is not None:
            raise StarcastError(f"{report.input}: {report.rows_in} rows read but {report.rows_out} written")
        for file, rows_in, _ in pending:  # trailing empty files
            _open_writer(file, rows_in, out, identity, reports, model)
    except BaseException:
        if writer is not None:
            writer.abort()
            report.rows_out = report.rows_flagged = report.rows_failed = 0
        raise


def _open_writer(file: Path, rows_in: int, out: Path, identity: RunIdentity, reports: dict, model):
    """Start `file`'s results; an empty file is committed at once (writer None)."""
    report = reports[str(file)]
    report.rows_in, report.rows_out, report.rows_flagged, report.rows_failed = rows_in, 0, 0, 0
    clear_outputs(out, file)
    empty = failed_results(pa.array([], pq.read_schema(file).field(ID).type), model.bundle.target_names, 0,
                           None, chi2=model.emulator is not None)
    writer = ResultsWriter(out, file, identity, empty)
    return _commit_if_complete(writer, report), report


def _commit_if_complete(writer: ResultsWriter, report: FileReport) -> ResultsWriter | None:
    if report.rows_out < report.rows_in:
        return writer
    if report.rows_out > report.rows_in:
        raise StarcastError(f"{report.input}: {report.rows_in} rows read but {report.rows_out} written")
    writer.commit(report)
    report.status = "done"
    return None


def _runs(table: pa.Table):
    """(path, rows) for each run of consecutive rows from one input file."""
    paths = table[PATH]
    if table.num_rows == 0:
        return
    change = pc.not_equal(paths.slice(1), paths.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    starts = [0, *(i + 1 for i, c in enumerate(change) if c), table.num_rows]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        yield paths[a].as_py(), table.slice(a, b - a)


def _actor_pool(ray) -> dict:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return {"compute": ray.data.ActorPoolStrategy(size=gpus), "num_gpus": 1}
    return {"compute": ray.data.ActorPoolStrategy(size=max(1, cpus // 2)), "num_cpus": 1}


def _open(path: Path):
    """Row count and grid from the footer; a file whose footer cannot be read fails here."""
    try:
        meta = pq.ParquetFile(path).metadata
        grid = read_grid(path)
    except (OSError, pa.ArrowException, CatalogError) as exc:
        raise CatalogError(f"not a readable Parquet file ({_reason(exc)})", file=str(path)) from exc
    if ID not in meta.schema.names:
        raise CatalogError(f"no {ID!r} column", file=str(path))
    return meta.num_rows, grid


def _scan(path: Path) -> str | None:
    """Read a whole file on the driver: the reason it cannot be read, or None."""
    try:
        for _ in iter_batches(path):
            pass
    except CatalogError as exc:
        return exc.reason
    return None


def _fail(report: FileReport, reason: str) -> None:
    report.status, report.error = "failed", reason
    report.rows_out = report.rows_flagged = report.rows_failed = 0
    tqdm.write(f"starcast: skipping {report.input}: {reason}", file=sys.stderr)


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
        kwargs = {} if address == "local" else {"address": address}
        try:
            ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False,
                     runtime_env=RUNTIME_ENV, **kwargs)
        except ConnectionError as exc:
            raise StarcastError(f"cannot connect to a Ray cluster at {address!r} ({exc}); start one "
                                f"with `ray start --head`, or use --ray local") from exc
    ctx = ray.data.DataContext.get_current()  # importing ray.data configures its loggers: then quiet them
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.execution_options.preserve_order = True  # rows come back in input order, as locally
    ctx.enable_progress_bars = progress and sys.stderr.isatty()
