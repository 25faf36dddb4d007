"""What a run leaves on disk: results files, completion markers and the run manifest.

The protocol that makes runs resumable and exactly-once, shared by the local and the Ray pipeline:
a results file `OUT/results/<stem>.parquet` is written under a hidden temporary name, fsync'd and
renamed into place, and only then is its completion marker `OUT/markers/<stem>.done` (JSON: rows,
model hash, seed, S, the input's fingerprint) written, atomically too. A file without a marker is
never trusted: `--resume` redoes it, and one whose input changed since. Markers live outside
`results/` so that folder reads as a plain Parquet dataset. A failure to write (disk full) is an
`OutputError`; the writer then leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..catalogs.schema import (
    ERROR,
    FLAGS,
    ID,
    INFORMATIONAL,
    META_BACKEND,
    META_INPUT,
    META_MODEL,
    META_MODEL_SHA256,
    META_SAMPLES,
    META_SEED,
    META_VERSION,
    Flag,
)
from ..errors import OutputError, StarcastError
from .inputs import InputFile, fingerprint, footer_rows

RESULTS_DIR = "results"
MARKERS_DIR = "markers"
MANIFEST_NAME = "run-manifest.json"
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs' outputs interchangeable: the model (by weights hash), seed and S."""

    model: str
    model_sha256: str
    seed: int
    samples: int
    version: str
    backend: str

    def file_metadata(self, input_file: Path) -> dict[str, str]:
        """Parquet key-value metadata of a results file (docs/results.md)."""
        return {META_MODEL: self.model, META_MODEL_SHA256: self.model_sha256, META_SEED: str(self.seed),
                META_SAMPLES: str(self.samples), META_VERSION: self.version, META_BACKEND: self.backend,
                META_INPUT: str(input_file)}


def results_path(out: Path, input_file: Path) -> Path:
    return out / RESULTS_DIR / f"{input_file.stem}.parquet"


def marker_path(out: Path, input_file: Path) -> Path:
    return out / MARKERS_DIR / f"{input_file.stem}.done"


def read_marker(out: Path, input_file: Path) -> dict | None:
    """The completion marker of `input_file`'s results, or None when the file is not complete."""
    path = marker_path(out, input_file)
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # a torn marker cannot happen (atomic write), but an edited one is not trusted
    return marker if results_path(out, input_file).is_file() else None


def check_marker(marker: dict, identity: RunIdentity, input_file: Path) -> None:
    """Refuse to resume onto results made with another model, seed or S."""
    mine = {"model_sha256": identity.model_sha256, "seed": identity.seed, "samples": identity.samples}
    theirs = {k: marker.get(k) for k in mine}
    if theirs != mine:
        raise StarcastError(f"cannot resume: the results of {input_file} were made with {theirs}, this run "
                            f"uses {mine}; write to a new --out directory, or resume with the settings those "
                            "results were made with")


@dataclass
class FileReport:
    """Counts and outcome of one input file (one entry of the run manifest)."""

    input: str
    status: str = "pending"  # done | skipped (complete from an earlier run) | failed
    rows_in: int = 0
    rows_out: int = 0
    rows_flagged: int = 0  # rows with a flag bit not INFORMATIONAL (numbers kept unless failed)
    rows_failed: int = 0  # rows with an error and no numbers
    rows_duplicate: int = 0  # rows flagged DUPLICATE_ID (their id came earlier in the same file)
    output: str | None = None
    error: str | None = None
    note: str | None = None  # e.g. why a file was redone on --resume

    def count(self, table: pa.Table) -> None:
        flags = table[FLAGS].to_numpy(zero_copy_only=False)
        self.rows_out += table.num_rows
        self.rows_flagged += int(np.count_nonzero(flags & ~INFORMATIONAL))
        self.rows_failed += table.num_rows - table[ERROR].null_count
        self.rows_duplicate += int(np.count_nonzero(flags & Flag.DUPLICATE_ID))

    def reset(self) -> None:
        """Forget the rows counted so far (the file's results were dropped)."""
        self.rows_out = self.rows_flagged = self.rows_failed = self.rows_duplicate = 0


class ResultsWriter:
    """Streams one input file's results to a hidden temporary file; `commit` makes it visible.

    Creating the writer clears the input's earlier results and marker and takes the input's
    fingerprint (before any row is read, so a file replaced during the run is redone next time)."""

    def __init__(self, out: Path, input_file: Path, identity: RunIdentity, empty: pa.Table):
        """`empty`: the zero-row results table written when the input has no rows."""
        self.input_file, self.identity, self.empty = input_file, identity, empty
        self.final = results_path(out, input_file)
        self.temp = self.final.with_name(f".{self.final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        self.fingerprint = fingerprint(input_file)
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._seen: set = set()
        clear_results(out, input_file)
        with _writing(self.final):
            self.final.parent.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table, report: FileReport) -> None:
        """Flag ids seen earlier in this file (DUPLICATE_ID), write the rows, count them in `report`."""
        table = self._flag_duplicates(table)
        with _writing(self.temp):
            if self._writer is None:
                ours = self.identity.file_metadata(self.input_file)
                meta = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in ours.items()}}
                self._schema = table.schema.with_metadata(meta)
                self._writer = pq.ParquetWriter(self.temp, self._schema)
            else:
                table = table.select(self._schema.names).cast(self._schema)
            self._writer.write_table(table)
        report.count(table)

    def commit(self, report: FileReport) -> None:
        """Close, fsync and rename the results file, then write the marker (last). If that fails,
        nothing of this file is left but, at worst, a results file without a marker."""
        try:
            if self._writer is None:
                self.write(self.empty, report)
            with _writing(self.temp):
                self._writer.close()
                self._writer = None
                _fsync(self.temp)
                os.replace(self.temp, self.final)
                _fsync(self.final.parent)
        except OutputError:
            self.abort()
            raise
        marker = {"input": str(self.input_file), "rows": report.rows_out, "flagged": report.rows_flagged,
                  "failed": report.rows_failed, "duplicates": report.rows_duplicate,
                  "model": self.identity.model, "model_sha256": self.identity.model_sha256,
                  "seed": self.identity.seed, "samples": self.identity.samples,
                  "version": self.identity.version, "input_fingerprint": self.fingerprint,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = marker_path(self.final.parent.parent, self.input_file)
        with _writing(path):
            path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, marker)
        report.output = str(self.final)

    def abort(self) -> None:
        """Drop what was written; the input keeps no results and no marker. Never raises (it runs
        while another error, e.g. a full disk, is being reported)."""
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):
            self.temp.unlink(missing_ok=True)

    def _flag_duplicates(self, table: pa.Table) -> pa.Table:
        dup = np.zeros(table.num_rows, dtype=bool)
        for i, value in enumerate(table[ID].to_pylist()):
            if value is None:
                continue  # a null id is an error row of its own, not a duplicate
            if value in self._seen:
                dup[i] = True
            else:
                self._seen.add(value)
        if not dup.any():
            return table
        flags = table[FLAGS].to_numpy(zero_copy_only=False) | np.where(dup, int(Flag.DUPLICATE_ID), 0)
        return table.set_column(table.schema.get_field_index(FLAGS), table.schema.field(FLAGS),
                                pa.array(flags.astype(np.int32), pa.int32()))


class OutputFile:
    """One input file's results from its first row to its commit or failure, the same on both
    pipelines: starting clears the input's earlier results and marker; rows are written as they come
    (never more than the footer holds); the file is committed (results renamed into place, then its
    marker) when the rows out reach the rows in, at once for a file without rows; `fail` drops what
    was written and records why. `on_done` is called after a commit or failure (the run manifest's
    checkpoint)."""

    def __init__(self, out: Path, inp: InputFile, identity: RunIdentity, report: FileReport,
                 empty: pa.Table, on_done: Callable[[], None]):
        """`empty`: the zero-row results table (its schema) written when the input has no rows."""
        self.input, self.report, self.on_done = inp, report, on_done
        report.rows_in = inp.num_rows
        report.reset()
        self._writer: ResultsWriter | None = ResultsWriter(out, inp.path, identity, empty)
        if inp.num_rows == 0:
            self._commit()

    @property
    def open(self) -> bool:
        """Still taking rows (neither committed nor failed)."""
        return self._writer is not None

    def write(self, table: pa.Table) -> None:
        """Write rows of this file (in input order); commits the file with its last row."""
        self._writer.write(table, self.report)
        if self.report.rows_out > self.input.num_rows:
            raise self._miscount()
        if self.report.rows_out == self.input.num_rows:
            self._commit()

    def check_complete(self) -> None:
        """The exactly-once invariant at the end of a run: every row of the file came out."""
        if self.open:
            raise self._miscount()

    def fail(self, reason: str) -> None:
        """Drop this file's results (the input keeps none) and record why."""
        self.abort()
        fail_file(self.report, reason)
        self.on_done()

    def abort(self) -> None:
        """The run stops: drop what was written; the file stays pending for `--resume`. Never raises."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
            self.report.reset()

    def _miscount(self) -> StarcastError:
        return StarcastError(f"{self.report.input}: {self.input.num_rows} rows in the file but "
                             f"{self.report.rows_out} written")

    def _commit(self) -> None:
        self._writer.commit(self.report)
        self._writer = None
        self.report.status = "done"
        self.on_done()


def fail_file(report: FileReport, reason: str) -> None:
    """Mark an input file failed (no results kept), say so on stderr; `rows_in` still counts what
    its footer holds, so the manifest shows the rows that did not come out."""
    report.status, report.error = "failed", reason
    report.rows_in = footer_rows(report.input)
    report.reset()
    tqdm.write(f"starcast: skipping {report.input}: {reason}", file=sys.stderr)


def clear_results(out: Path, input_file: Path) -> None:
    """Remove the input's earlier results and their marker (the marker first: never a stale pair)."""
    with _writing(results_path(out, input_file)):
        marker_path(out, input_file).unlink(missing_ok=True)
        results_path(out, input_file).unlink(missing_ok=True)


def remove_stale_partials(out: Path) -> None:
    """Temporary files left by a killed run (they never look complete, but they take space). Only
    the holder of the output directory's lock may call this."""
    for folder in (out, out / RESULTS_DIR, out / MARKERS_DIR):
        for path in folder.glob(f".*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)


@dataclass
class RunManifest:
    """The run manifest (`OUT/run-manifest.json`): what was run, what came out, how fast."""

    identity: RunIdentity
    input: str
    out: str
    pipeline: str  # "local" or "ray"
    batch_size: int
    files: list[FileReport] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    state: str = "running"  # running (or killed while running) | finished | stopped (see `error`)
    error: str | None = None  # why the run stopped early (files still "pending" were not finished)

    def totals(self) -> dict[str, int]:
        done = [f for f in self.files if f.status != "failed"]
        return {"files": len(self.files), "files_done": sum(f.status == "done" for f in self.files),
                "files_skipped": sum(f.status == "skipped" for f in self.files),
                "files_failed": len(self.files) - len(done),
                **{k: sum(getattr(f, k) for f in self.files)
                   for k in ("rows_in", "rows_out", "rows_flagged", "rows_failed", "rows_duplicate")}}

    def to_dict(self) -> dict:
        totals = self.totals()
        computed = sum(f.rows_out for f in self.files if f.status == "done")
        return {
            "starcast_version": self.identity.version, "model": self.identity.model,
            "model_sha256": self.identity.model_sha256, "seed": self.identity.seed,
            "samples": self.identity.samples, "backend": self.identity.backend,
            "pipeline": self.pipeline, "batch_size": self.batch_size, "input": self.input, "out": self.out,
            "state": self.state, "totals": totals, "error": self.error,
            "files_failed": [{"input": f.input, "error": f.error}
                             for f in self.files if f.status == "failed"],
            "wall_seconds": round(self.wall_seconds, 3),
            "throughput_spectra_per_s": round(computed / self.wall_seconds, 1) if self.wall_seconds else None,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "files": [asdict(f) for f in self.files],
        }

    def write(self) -> dict:
        d = self.to_dict()
        write_json_atomic(Path(self.out) / MANIFEST_NAME, d)
        return d


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` to a temporary file, fsync, rename over `path`; `OutputError` (and no temporary
    file left) if that fails."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with _writing(path):
            with open(temp, "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
            _fsync(path.parent)
    except OutputError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _writing(path: Path):
    """Turn an OSError (disk full, permission denied, I/O error) into one-line `OutputError`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
