"""`starcast.run`: predict a whole catalog, locally (streaming pipeline) or on a Ray cluster.

This module decides what to run (inputs, model, which files `--resume` may skip: those whose
marker matches the input's fingerprint), locks the output directory (`outdir.py`), hands the files
to `pipeline.LocalPipeline` or `distributed.run_ray`, and writes the run manifest, also when the
run stops on an error. The model is loaded (and its hashes checked) before anything is written, so
a bad bundle fails at start.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..catalogs.io import list_inputs
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, OutputError, StarcastError
from .inputs import fingerprint
from .jobs import JobSpec
from .manifest import (
    RESULTS_DIR,
    FileReport,
    RunIdentity,
    RunManifest,
    clear_results,
    marker_path,
    read_marker,
    remove_stale_partials,
    results_path,
)
from .outdir import prepare_out
from .pipeline import LocalPipeline
from .predictor import load_model, resolve_backend
from .rows import Predictor

DEFAULT_MODEL = "ob-default"
INTERRUPTED = "interrupted (Ctrl-C): resume with --resume"  # the manifest's error of a run stopped so


def run(input: str | os.PathLike, out: str | os.PathLike, *, model: str | os.PathLike | None = None,
        samples: int | None = None, seed: int = 0, backend: str = "auto", batch_size: int = 4096,
        ray: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Predict every spectrum of `input` (a Parquet file, a directory of shards or a glob) and write
    `out/results/<input-stem>.parquet` per input file plus `out/run-manifest.json`.

    `model`: a shipped model name or a bundle directory (default `ob-default`); `samples`: MC-dropout
    samples S per member (default: the model's); `seed`: the dropout RNG seed; `backend`: auto,
    triton, cpu or reference; `batch_size`: spectra per batch; `ray`: a Ray address, "auto" (the
    running cluster) or "local" (start one here) to run on Ray (None: the local pipeline); `resume`:
    skip inputs whose results are complete.
    Returns the run manifest (a dict); `exit_code(manifest)` gives the CLI's exit status.
    """
    spec = JobSpec(input=os.fspath(input), out=os.fspath(out),
                   model=None if model is None else os.fspath(model), samples=samples, seed=seed,
                   backend=backend, batch_size=batch_size, ray=ray, resume=resume, progress=progress)
    return run_job(spec)


def run_job(spec: JobSpec) -> dict:
    """`run` for a loaded job spec. Raises `StarcastError` (after writing the run manifest, where the
    disk allows) when the run cannot go on: a full disk, a failed Ray cluster."""
    start = time.perf_counter()
    out = Path(spec.out)
    # a glob that reaches into --out would take the run's own results for inputs
    files = [f for f in list_inputs(spec.input) if out.resolve() not in f.resolve().parents]
    if not files:
        raise StarcastError(f"{spec.input}: no input file outside --out {out}")
    _check_unique_stems(files)
    model = load_model(spec.model or DEFAULT_MODEL)
    bundle = model.bundle
    identity = RunIdentity(model=bundle.name, model_sha256=bundle.sha256, seed=spec.seed,
                           samples=spec.samples or int(bundle.architecture["samples"]),
                           version=__version__, backend=resolve_backend(spec.backend))
    with prepare_out(out, identity, resume=spec.resume):
        remove_stale_partials(out)
        if spec.resume:
            _check_resumed_inputs(files, out, spec.input)
        reports, todo = _plan(files, out, spec.resume)
        manifest = RunManifest(identity=identity, input=spec.input, out=str(out), files=reports,
                               pipeline="ray" if spec.ray is not None else "local",
                               batch_size=spec.batch_size)

        def checkpoint() -> dict:  # the manifest on disk always shows what is done, whatever kills us
            manifest.wall_seconds = time.perf_counter() - start
            return manifest.write()

        checkpoint()
        try:
            manifest.stage_seconds = _run_files(spec, model, identity, out, todo,
                                                [r for r in reports if r.status == "pending"], checkpoint)
        except (Exception, KeyboardInterrupt) as exc:
            manifest.state = "stopped"
            if isinstance(exc, StarcastError):  # says why
                manifest.error = str(exc)
            elif isinstance(exc, KeyboardInterrupt):
                manifest.error = INTERRUPTED
            else:  # a bug, named as one
                manifest.error = f"internal error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(OutputError):
                checkpoint()
            raise
        manifest.state = "finished"
        if reports and all(r.status == "failed" for r in reports):
            manifest.error = "no input file could be read: see each file's error"
        return checkpoint()


def _check_resumed_inputs(files: list[Path], out: Path, given: str) -> None:
    """Refuse to resume a run in `out` whose results include an input that `files` (of `given`) lacks:
    its rows would stay in `results/` beside this run's, which the run manifest would not count."""
    stems = {f.stem for f in files}
    others = sorted(p.name for p in (out / RESULTS_DIR).glob("*.parquet") if p.stem not in stems)
    if others:
        raise StarcastError(f"--resume: {out} holds results of inputs that {given} does not list "
                            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): resume with the "
                            "input the run was started on, remove those results, or choose a new --out")


def _plan(files: list[Path], out: Path, resume: bool) -> tuple[list[FileReport], list[Path]]:
    """One report per input file (status "skipped" for those `--resume` may skip: a marker whose
    input fingerprint matches the file as it is now), and the files to run (with `resume`, their
    earlier results and markers removed first, so that one that fails now leaves none)."""
    reports, todo = [], []
    for f in files:
        marker = read_marker(out, f) if resume else None
        if marker is not None and marker.get("input_fingerprint") == fingerprint(f):
            reports.append(FileReport(str(f), status="skipped", rows_in=marker["rows"],
                                      rows_out=marker["rows"], rows_flagged=marker["flagged"],
                                      rows_failed=marker["failed"],
                                      rows_duplicate=marker.get("duplicates", 0),
                                      output=str(results_path(out, f))))
            continue
        note = None
        if marker is not None:
            note = "the input changed since its results were written: predicted again"
        elif resume and marker_path(out, f).exists():
            note = "its marker is there but not its results (or the marker is unreadable): predicted again"
        if note is not None:
            print(f"starcast: {f}: {note}", file=sys.stderr)
        if resume:
            clear_results(out, f)  # done again or failed now: its earlier results no longer stand
        reports.append(FileReport(str(f), note=note))
        todo.append(f)
    return reports, todo


def _run_files(spec: JobSpec, model, identity: RunIdentity, out: Path, files: list[Path],
               reports: list[FileReport], on_file: Callable[[], None]) -> dict[str, float]:
    """Run `files` on the local pipeline or Ray, updating `reports` (and calling `on_file` after
    each file); returns seconds per stage."""
    predictor = Predictor(model, identity)
    options = {"batch_size": spec.batch_size, "progress": spec.progress, "on_file": on_file}
    if spec.ray is not None:
        from .distributed import run_ray  # imports ray only when asked for

        return run_ray(files, reports, out, spec.model or DEFAULT_MODEL, predictor, address=spec.ray,
                       **options)
    pipeline = LocalPipeline(predictor, out, **options)
    pipeline.run(files, reports)
    return dict(pipeline.stage_seconds)


def exit_code(manifest: dict) -> int:
    """EXIT_ERROR when no input file could be read, EXIT_PARTIAL when a file or a row failed, else EXIT_OK."""
    totals = manifest["totals"]
    if totals["files"] and totals["files_failed"] == totals["files"]:
        return EXIT_ERROR
    return EXIT_PARTIAL if totals["files_failed"] or totals["rows_failed"] else EXIT_OK


def _check_unique_stems(files: list[Path]) -> None:
    stems = Counter(f.stem for f in files)
    clash = sorted(f for f in files if stems[f.stem] > 1)
    if clash:
        raise StarcastError(f"input files {clash[0]} and {clash[1]} would both write results/{clash[0].stem}"
                            f".parquet; give inputs with distinct file names")
