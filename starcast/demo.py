"""`starcast demo`: the whole engine end to end on a small survey of model-atmosphere spectra.

Observes stars of the TLUSTY sample shipped in `starcast/data/` (five BSTAR2006 models the default
model never saw in training; see the README there) with rotation, the instrument, continuum
distortions and noise, predicts them with the shipped default model through the local streaming
pipeline, prints the results summary, and scores the predictions against the truth (metrics JSON and
plots). Everything it writes stays under `--out`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import StarcastError

SAMPLE = Path(__file__).parent / "data" / "tlusty-sample.npz"


@click.command("demo")
@click.option("--out", default="starcast-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where to write everything (new or empty).")
@click.option("--n", "n", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Spectra to observe.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the survey and of the dropout masks.")
@click.option("--model", default="ob-default", show_default=True,
              help="Shipped model name or bundle directory.")
def demo(out: Path, n: int, seed: int, model: str) -> None:
    """Observe TLUSTY model stars, predict them, print a summary and write metrics and plots."""
    from .catalogs.grids import read_grid
    from .catalogs.gridsynth import synth_from_grid
    from .engine.inspect import format_summary, summarize
    from .engine.run import run
    from .trainers.evaluate import run_eval

    if out.exists() and any(out.iterdir()):
        raise StarcastError(f"{out} is not empty: choose a new --out or remove it")
    catalog, predictions, report_dir = out / "catalog", out / "predictions", out / "eval"

    sample = read_grid(SAMPLE)
    nodes = ", ".join(f"{t / 1000:g} kK/{g:.2f}" for t, g in zip(sample.params["teff"], sample.params["logg"],
                                                                   strict=True))
    click.echo(f"1/3 observing {n} stars of {len(sample.flux)} TLUSTY models ({nodes}) with v sin i 0-450 "
               f"km/s, R = 20000 and SNR 20-300 into {catalog}")
    synth_from_grid(sample, n, catalog, at_nodes=True, seed=seed, snr=(20.0, 300.0),
                    progress=sys.stderr.isatty())

    click.echo(f"2/3 predicting with {model} into {predictions}")
    manifest = run(catalog, predictions, model=model, seed=seed)
    click.echo(format_summary(summarize(predictions)))

    click.echo(f"3/3 scoring against the true labels into {report_dir}")
    report = run_eval(predictions / "results", catalog, report_dir)
    click.echo(f"{'target':8} {'RMSE':>10} {'bias':>10} {'cover 68%':>10} {'cover 95%':>10}")
    for name, m in report["targets"].items():
        click.echo(f"{name:8} {m['rmse']:10.4g} {m['bias']:+10.3g} {m['coverage_68']:10.3f} "
                   f"{m['coverage_95']:10.3f}")
    click.echo(f"\nresults: {predictions / 'results'} (Parquet, one row per spectrum)\n"
               f"run manifest: {predictions / 'run-manifest.json'}\n"
               f"metrics and plots: {report_dir} ({', '.join(report['plots'])})\n"
               f"throughput: {manifest['throughput_spectra_per_s']} spectra/s "
               f"({manifest['wall_seconds']} s for the prediction run)")
