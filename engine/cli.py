"""The `starcast run`, `starcast inspect` and `starcast explain` commands (loaded lazily by
`starcast/cli.py`).

Options left out fall back to the job spec given with `--config`, then to `starcast.run`'s defaults.
The exit status is 0 on success, 3 when the run finished with failed rows or files, 2 on errors
(including a run none of whose input files could be read).
"""

from __future__ import annotations

import json
import math
import sys

import click

from .jobs import BACKENDS, JobSpec, load_job


@click.command()
@click.argument("input", required=False)
@click.option("--out", help="Output directory (results/, run-manifest.json).")
@click.option("--model", help="Shipped model name or bundle directory [default: ob-default].")
@click.option("--samples", type=click.IntRange(min=1), help="MC-dropout samples S per member.")
@click.option("--seed", type=int, help="Seed of the dropout masks [default: 0].")
@click.option("--backend", type=click.Choice(BACKENDS), help="Inference backend [default: auto].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Spectra per batch [default: 4096].")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto|local",
              help="Run on a Ray cluster (auto: the running one; local: start one here).")
@click.option("--resume", is_flag=True, default=None, help="Skip inputs whose results are complete.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML job spec ([run] table).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(input, out, model, samples, seed, backend, batch_size, ray_address, resume, config,
        no_progress) -> None:
    """Predict stellar parameters for INPUT (a Parquet file, a directory of shards, or a glob)."""
    from .run import exit_code, run_job

    given = {"input": input, "out": out, "model": model, "samples": samples, "seed": seed,
             "backend": backend, "batch_size": batch_size, "ray": ray_address, "resume": resume,
             "progress": False if no_progress else None}
    if config is not None:
        spec = load_job(config, **given)
    else:
        if input is None or out is None:
            raise click.UsageError("give INPUT and --out (or a job spec with --config)")
        spec = JobSpec(input=input, out=out).replace(**given)
    manifest = run_job(spec)
    t = manifest["totals"]
    written = f"{spec.out}/results/; " if t["files_failed"] < t["files"] else ""
    click.echo(f"{t['rows_out']} rows from {t['files'] - t['files_failed']} of {t['files']} files "
               f"({t['rows_flagged']} flagged, {t['rows_failed']} failed, {t['files_failed']} files failed) "
               f"-> {written}manifest {spec.out}/run-manifest.json", err=True)
    if manifest["error"]:
        click.echo(f"error: {manifest['error']}", err=True)
    sys.exit(exit_code(manifest))


@click.command()
@click.argument("results")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(results, as_json) -> None:
    """Summarise a results catalog (a results file, a directory of them or a run's --out)."""
    from .inspect import format_summary, summarize

    summary = summarize(results)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@click.command()
@click.argument("input")
@click.option("--out", required=True, help="Output directory (attributions.parquet, plots/, survey/).")
@click.option("--model", default="ob-default", show_default=True,
              help="Shipped model name or bundle directory.")
@click.option("--ids", help="Comma-separated ids to explain [default: the first --n rows].")
@click.option("--n", "n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Rows to explain when --ids is not given.")
@click.option("--plots", type=click.IntRange(min=0), default=10, show_default=True,
              help="Per-spectrum plots to draw (the first rows explained).")
@click.option("--method", type=click.Choice(["ig", "captum"]), default="ig", show_default=True,
              help="Integrated gradients in starcast's torch code, or through Captum (same numbers).")
@click.option("--steps", type=click.IntRange(min=1),
              help="Intervals of the path (trapezoid rule), doubled for rows that miss completeness "
              "[default: 32].")
def explain(input, out, model, ids, n, plots, method, steps) -> None:
    """Attribute each estimate of INPUT's spectra to their pixels and lines (integrated gradients)."""
    from pathlib import Path

    from .explain_report import explain_catalog, select_rows
    from .predictor import load_model

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise click.UsageError(f"--out {out} is not empty: explain writes a new folder (a run before would "
                               "leave its plots beside these)")
    rows, passed_over = select_rows(input, ids, n)
    if passed_over:
        click.echo(f"passed over {len(passed_over)} rows with a null id (an explanation is keyed by its id): "
                   + ", ".join(passed_over[:5]) + (", ..." if len(passed_over) > 5 else ""), err=True)
    summary = explain_catalog(load_model(model), rows, Path(out), method=method, steps=steps, plots=plots)
    for row in summary["failed"]:
        click.echo(f"id {row['id']}: {row['error']}", err=True)
    more = summary["rows_failed"] - len(summary["failed"])
    if more:
        click.echo(f"... and {more} more rows without attributions (`error` in attributions.parquet)",
                   err=True)
    shares = ", ".join(f"{t} {100 * e['line_mass_mean']:.0f}%" for t, e in summary["targets"].items()
                       if math.isfinite(e["line_mass_mean"]))  # none where no row has any attribution
    written = [f"{out}/attributions.parquet", f"{out}/survey/"]
    if summary["plots"]:
        written.insert(1, f"{out}/plots/")
    click.echo(f"{summary['rows'] - summary['rows_failed']} rows explained, {summary['rows_failed']} failed"
               + (f"; |attribution| on listed lines: {shares}" if shares else "")
               + f" -> {', '.join(written)}", err=True)
    sys.exit(3 if summary["rows_failed"] else 0)
