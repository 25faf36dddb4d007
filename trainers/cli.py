"""Sub-commands `starcast train CONFIG.toml` and `starcast eval RESULTS --truth CATALOG --out DIR`.

Thin click wrappers: the work is in `pipeline.train_from_config` and `evaluate.run_eval`.
"""

from __future__ import annotations

import json

import click


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "output", default=None, help="Bundle directory (default: the config's `output`).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override training.epochs (e.g. a quick try).")
@click.option("--overwrite", is_flag=True,
              help="Replace the model bundle already in the output folder (refused otherwise).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(config: str, output: str | None, epochs: int | None, overwrite: bool, quiet: bool) -> None:
    """Train, recalibrate and export a model bundle described by CONFIG (TOML)."""
    from dataclasses import replace

    from .config import load_config
    from .pipeline import train_from_config

    cfg = load_config(config)
    if epochs is not None:
        cfg = replace(cfg, training=replace(cfg.training, epochs=epochs))
    path = train_from_config(cfg, output=output, progress=not quiet, overwrite=overwrite).path
    manifest = json.loads((path / "manifest.json").read_text())
    click.echo(f"wrote {path} ({manifest['provenance']['epochs_run']} epochs, "
               f"{manifest['provenance']['train_seconds']:.0f} s)")
    for name, m in manifest["metrics"].get("test", manifest["metrics"]["val"]).items():
        click.echo(f"  {name}: rmse {m['rmse']:.4g}  bias {m['bias']:+.3g}  "
                   f"coverage 68/95 {m['coverage_68']:.3f}/{m['coverage_95']:.3f}")


@click.command("eval")
@click.argument("results", type=click.Path(exists=True))
@click.option("--truth", required=True, type=click.Path(exists=True), help="Catalog with the true labels.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--split", default=None, help="Score only truth rows of this split (e.g. test).")
@click.option("--ood", "ood", default=None, type=click.Path(exists=True),
              help="Results of an out-of-distribution set, for the AUROC of epistemic sigma.")
@click.option("--model", default=None,
              help="Bundle whose training range defines in-distribution truths (name or path).")
@click.option("--vsini-min", type=float, default=None,
              help="Instrumental resolution in km/s: v sin i accuracy is also given above it "
                   "[default: c/R from a synthetic truth catalog's metadata].")
@click.option("--min-match", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="Fail (exit 2) when fewer than this fraction of the smaller of results and truth "
                   "match by id.")
def eval_(results: str, truth: str, out: str, split: str | None, ood: str | None, model: str | None,
          vsini_min: float | None, min_match: float) -> None:
    """Metrics and plots of RESULTS (a results file, a folder of them or a run's --out folder) against
    true labels."""
    from .evaluate import run_eval

    ranges = None
    if model is not None:
        from ..engine.bundle import load_bundle

        ranges = {t.name: (t.min, t.max) for t in load_bundle(model).targets}
    report = run_eval(results, truth, out, split=split, ood_path=ood, ranges=ranges, vsini_min=vsini_min,
                      min_match=min_match)
    rows = report["rows"]
    click.echo(f"ids: {rows['ids_matched']} matched, {rows['results_unmatched']} results without truth, "
               f"{rows['truth_unmatched']} truths without results"
               + (f" ({rows['results_repeated_ids']} result rows repeat an earlier row's id: paired with the "
                  "truth's rows of that id in order)" if rows["results_repeated_ids"] else ""))
    elsewhere = report["inputs"]["predicted_from_elsewhere"]
    if elsewhere:
        click.echo(f"note: these results were predicted from {', '.join(elsewhere[:3])}, not from the truth "
                   f"catalog's files: the ids match, but are these the labels of those spectra?", err=True)
    for name, m in report["targets"].items():
        click.echo(f"{name}: rmse {m['rmse']:.4g}  bias {m['bias']:+.3g}  nll {m['nll']:.3f}  "
                   f"coverage 68/95 {m['coverage_68']:.3f}/{m['coverage_95']:.3f}")
    if "ood" in report:
        click.echo(f"OOD AUROC (epistemic sigma, combined): {report['ood']['auroc_combined']:.3f}")
    click.echo(f"wrote {out}/report.json and {len(report['plots'])} plots")
