"""`starcast.run`: predict a whole catalog, locally (streaming pipeline) or on a Ray cluster.

This module decides what to run (inputs, model, which files `--resume` may skip), hands the files
to `pipeline.LocalPipeline` or `distributed.run_ray`, and writes the run manifest. The model is
loaded (and its hash checked) before anything is written, so a bad bundle fails at start.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from .. import __version__
from ..catalogs.io import list_inputs
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, StarcastError
from .jobs import JobSpec
from .manifest import FileReport, RunIdentity, RunManifest, check_marker, read_marker, remove_stale_partials
from .pipeline import LocalPipeline
from .predictor import load_model, resolve_backend

DEFAULT_MODEL = "ob-default"


def run(input: str | os.PathLike, out: str | os.PathLike, *, model: str | os.PathLike | None = None,
        samples: int | None = None, seed: int = 0, backend: str = "auto", batch_size: int = 4096,
        ray: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Predict every spectrum of `input` (a Parquet file, a directory of shards or a glob) and write
    `out/results/<input-stem>.parquet` per input file plus `out/run-manifest.json`.

    `model`: a shipped model name or a bundle directory (default `ob-default`); `samples`: MC-dropout
    samples S per member (default: the model's); `seed`: the dropout RNG seed; `backend`: auto,
    triton, cpu or reference; `batch_size`: spectra per batch; `ray`: a Ray address or "auto" to run
    on a Ray cluster (None: the local pipeline); `resume`: skip inputs whose results are complete.
    Returns the run manifest (a dict); `exit_code(manifest)` gives the CLI's exit status.
    """
    spec = JobSpec(input=os.fspath(input), out=os.fspath(out),
                   model=None if model is None else os.fspath(model), samples=samples, seed=seed,
                   backend=backend, batch_size=batch_size, ray=ray, resume=resume, progress=progress)
    return run_job(spec)


def run_job(spec: JobSpec) -> dict:
    """`run` for a loaded job spec."""
    start = time.perf_counter()
    files = list_inputs(spec.input)
    _check_unique_stems(files)
    model = load_model(spec.model or DEFAULT_MODEL)
    bundle = model.bundle
    identity = RunIdentity(model=bundle.name, model_sha256=bundle.weights_sha256,
                           seed=spec.seed,
                           samples=spec.samples or int(bundle.architecture["samples"]),
                           version=__version__, backend=resolve_backend(spec.backend))
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)

    skipped, todo = [], []
    for f in files:
        marker = read_marker(out, f) if spec.resume else None
        if marker is None:
            todo.append(f)
            continue
        check_marker(marker, identity, f)
        skipped.append(FileReport(str(f), status="skipped", rows_in=marker["rows"], rows_out=marker["rows"],
                                  rows_flagged=marker["flagged"], rows_failed=marker["failed"],
                                  output=str(out / "results" / f"{f.stem}.parquet")))

    options = {"samples": spec.samples, "seed": spec.seed, "backend": spec.backend,
               "batch_size": spec.batch_size, "progress": spec.progress}
    if spec.ray is not None:
        from .distributed import run_ray  # imports ray only when asked for

        done, stage_seconds = run_ray(todo, out, spec.model or DEFAULT_MODEL, identity, address=spec.ray,
                                      model=model, **options)
    else:
        pipeline = LocalPipeline(model, identity, out, **options)
        done = pipeline.run(todo)
        stage_seconds = dict(pipeline.stage_seconds)

    by_input = {r.input: r for r in [*skipped, *done]}
    manifest = RunManifest(identity=identity, input=spec.input, out=str(out),
                           pipeline="ray" if spec.ray is not None else "local", batch_size=spec.batch_size,
                           files=[by_input[str(f)] for f in files], stage_seconds=stage_seconds,
                           wall_seconds=time.perf_counter() - start)
    return manifest.write()


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
