"""The evaluation report of a model bundle: `python -m starcast.trainers.report BUNDLE --work DIR`.

Makes the evaluation catalogs, predicts them with the engine's predictor (`Model.predict`, the
per-batch step of `starcast run`; CPU backend, seed 0, the bundle's default S), scores them with
`evaluate.run_eval`, and writes one folder per set plus `summary.md` into `BUNDLE/report/`.
For a model trained on a grid of model spectra (`[data.grid]`): `test`, the survey at the nodes left
out of training (SNR 10-500); `between`, stars between the nodes, drawn with an unseen seed; and two
out-of-distribution sets whose epistemic sigma should single them out of `test` (AUROC): hot stars
(Teff 32-40 kK, beyond the grid, from the simplified generator) and SNR 5. For a model trained on the
simplified generator: its `seed` grid's test split, a `random` survey and the same two OOD sets.
Last, the explanations' survey view (which pixels drive each target) of 500 spectra of the first set,
into `BUNDLE/report/explain/`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..catalogs.io import iter_batches, list_inputs, read_grid, write_catalog
from ..catalogs.schema import SPLIT
from ..catalogs.synth import synth
from ..engine.bundle import REPORT_DIR, load_bundle
from ..engine.explain_report import model_report
from ..engine.predictor import load_model
from .evaluate import BIAS_MIN_SNR, run_eval

SETS = {  # name -> keyword arguments of catalogs.synth.synth (the catalog synthesised)
    "random": {"n": 5000, "mode": "random", "seed": 101, "snr": (20.0, 300.0)},
    "ood_hot": {"n": 1000, "mode": "random", "seed": 102, "snr": (20.0, 300.0), "teff": (32000.0, 40000.0)},
    "ood_snr5": {"n": 1000, "mode": "random", "seed": 103, "snr": (5.0, 5.0)},
}
BETWEEN_ROWS, BETWEEN_SEED = 5000, 101  # stars between the nodes of a grid-trained model's report
EXPLAIN_ROWS = 500  # spectra whose attributions make the report's survey view (engine.explain_report)


def _synth_catalog(kwargs: dict) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        args = dict(kwargs)
        synth(args.pop("n"), path, **args)
    return make


def _table_catalog(table: Callable[[], pa.Table]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir(parents=True)
        write_catalog(table(), path / "part-00000.parquet")
    return make


def _predict(bundle: Path, name: str, make: Callable[[Path], None], work: Path, split: str | None = None
             ) -> tuple[Path, Path]:
    """Make the catalog (unless already there) and predict it (only rows of `split` if given)."""
    catalog = work / "catalogs" / name
    if not catalog.exists():
        make(catalog)
    results = work / "results" / name
    results.mkdir(parents=True, exist_ok=True)
    model = load_model(bundle, backend="cpu")
    for file in list_inputs(catalog):
        grid = read_grid(file)
        parts = []
        for batch in tqdm(iter_batches(file), desc=f"{name}/{file.name}", unit="batch"):
            if split is not None:
                batch = batch.filter(pc.equal(batch.column(SPLIT), split))
            parts.append(model.predict(batch, source_grid=grid, backend="cpu"))
        pq.write_table(pa.concat_tables(parts), results / file.name)
    return catalog, results


def _grid_sets(manifest: dict, source: str) -> dict[str, Callable[[Path], None]]:
    """The catalogs of a grid-trained model's report, from the training config in its provenance."""
    from ..catalogs import gridsynth
    from .config import parse_config
    from .gridsource import GridSource

    cfg = parse_config(manifest["provenance"]["config"], source=source)
    grid = GridSource(cfg, progress=True)

    def between() -> pa.Table:
        rng = np.random.default_rng(BETWEEN_SEED)
        labels = gridsynth.draw_labels(grid.full, BETWEEN_ROWS, grid.pert, rng)
        return gridsynth.draw_survey(grid.full, labels, grid.pert, rng).table(grid.obs)

    def snr5() -> pa.Table:
        table = grid.split_table("test")
        rng = np.random.default_rng(BETWEEN_SEED + 1)
        labels = {t: table.column(t).to_numpy()[:1000] for t in grid.targets}
        pert = replace(grid.pert, snr=(5.0, 5.0))
        return gridsynth.draw_survey(grid.full, labels, pert, rng).table(grid.obs)

    hot = {**SETS["ood_hot"], "snr": (10.0, 500.0)}
    return {"test": _table_catalog(lambda: grid.split_table("test")), "between": _table_catalog(between),
            "ood_hot": _synth_catalog(hot), "ood_snr5": _table_catalog(snr5)}


def make_report(bundle: str | Path, work: str | Path) -> dict:
    bundle, work = Path(bundle), Path(work)
    report = bundle / REPORT_DIR
    manifest = load_bundle(bundle).manifest
    ranges = {t["name"]: (t["min"], t["max"]) for t in manifest["targets"]}
    data = manifest["provenance"]["config"]["data"]
    reports = {}
    if data.get("grid"):
        sets = _grid_sets(manifest, manifest["provenance"].get("config_file", ""))
        reference, main = "test", ("test", "between")
        for name in main:
            cat, res = _predict(bundle, name, sets[name], work)
            reports[name] = run_eval(res, cat, report / name, ranges=ranges)
    else:
        synth_cfg = dict(data["synth"])
        seed_set = {"n": synth_cfg.pop("n", None), **synth_cfg}
        seed_set["snr"] = tuple(seed_set.get("snr", (50.0, 300.0)))
        sets = {"seed": _synth_catalog(seed_set), **{k: _synth_catalog(v) for k, v in SETS.items()}}
        reference, main = "random", ("test", "random")
        cat, res = _predict(bundle, "seed", sets["seed"], work, split="test")
        reports["test"] = run_eval(res, cat, report / "test", split="test", ranges=ranges)
        cat, res = _predict(bundle, "random", sets["random"], work)
        reports["random"] = run_eval(res, cat, report / "random", ranges=ranges)
    cat_r, res_r = work / "catalogs" / reference, work / "results" / reference
    for name in ("ood_hot", "ood_snr5"):
        _, res_o = _predict(bundle, name, sets[name], work)
        reports[name] = run_eval(res_r, cat_r, work / "eval" / name, ranges=ranges, ood_path=res_o)
        reports[reference].setdefault("ood_sets", {})[name] = reports[name]["ood"]
        shutil.copy(work / "eval" / name / "ood_epistemic.png", report / reference / f"{name}.png")
    model_report(bundle, pq.read_table(work / "catalogs" / reference).slice(0, EXPLAIN_ROWS))
    report_json = report / reference / "report.json"
    report_json.write_text(json.dumps(reports[reference], indent=1) + "\n")
    cross_fitted = (manifest.get("metrics") or {}).get(f"{reference}_cross_fitted")
    summary = summary_markdown(reports, main, reference, cross_fitted)
    (report / "summary.md").write_text(summary + "\n")
    return reports


def summary_markdown(reports: dict, sets: tuple[str, ...], reference: str,
                     cross_fitted: dict | None = None) -> str:
    """The README table: per set and target, RMSE, bias, median sigma, coverage; coverage by SNR of
    the `reference` set, and, where the calibration was fitted on that set's nodes too, as the
    manifest's `metrics` give it under the calibration fitted without them (`cross_fitted`); its
    coverage by predicted v sin i (where the reports have it); OOD AUROC against it."""
    lines = ["| set | target | RMSE | bias | median sigma | 68% cover | 95% cover | worst bin bias/sigma "
             f"(SNR >= {BIAS_MIN_SNR:.0f}; +- its standard error) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in sets:
        rep = reports[name]
        for t, m in rep["targets"].items():
            rmse = m["rmse"]
            note = ""
            if t == "vsini" and "vsini_above_resolution" in rep:
                rmse = rep["vsini_above_resolution"]["rmse"]
                note = f" (RMSE: true > {rep['vsini_above_resolution']['vsini_min']:.0f})"
            g = rep["goals"][t]
            lines.append(f"| {name} | {t}{note} | {rmse:.4g} | {m['bias']:+.3g} | {m['median_sigma']:.3g} | "
                         f"{100 * m['coverage_68']:.1f}% | {100 * m['coverage_95']:.1f}% | "
                         f"{g['worst_bin_bias_over_median_sigma']:.2f} +- "
                         f"{g['worst_bin_bias_se_over_median_sigma']:.2f} |")
    lines += ["", f"68% / 95% coverage in bins of SNR (`{reference}` set):", "",
              "| SNR | rows | " + " | ".join(reports[reference]["targets"]) + " |",
              "| --- | --- |" + " --- |" * len(reports[reference]["targets"])]
    by_snr = [m.get("coverage_by_snr", []) for m in reports[reference]["targets"].values()]
    lines += _coverage_rows(by_snr)
    if cross_fitted:
        lines += ["", f"The same with the calibration fitted without the `{reference}` nodes (cross-fitted: "
                  "how it holds at nodes it has not seen; fitted on the validation nodes alone, where the "
                  "model's calibration is fitted on these and the validation nodes together):", "",
                  "| SNR | rows | " + " | ".join(cross_fitted) + " |",
                  "| --- | --- |" + " --- |" * len(cross_fitted)]
        lines += _coverage_rows([m["coverage_by_snr"] for m in cross_fitted.values()])
    by_vsini = [m.get("coverage_by_predicted_vsini", []) for m in reports[reference]["targets"].values()]
    if all(by_vsini):
        lines += ["", f"68% / 95% coverage in bins of the predicted v sin i, km/s (`{reference}` set):", "",
                  "| v sin i | rows | " + " | ".join(reports[reference]["targets"]) + " |",
                  "| --- | --- |" + " --- |" * len(reports[reference]["targets"])]
        lines += _coverage_rows(by_vsini, "vsini")
    lines += ["", f"RMSE in bins of SNR (`{reference}` set; v sin i over all rows, slow rotators included):",
              "", "| SNR | " + " | ".join(reports[reference]["targets"]) + " |",
              "| --- |" + " --- |" * len(reports[reference]["targets"])]
    for bins in zip(*by_snr, strict=True):
        lines.append(f"| {bins[0]['snr_lo']:.0f}-{bins[0]['snr_hi']:.0f} | "
                     + " | ".join(f"{b['rmse']:.4g}" for b in bins) + " |")
    for name in ("ood_hot", "ood_snr5"):
        ood = reports[name]["ood"]
        per = ", ".join(f"{t} {v:.3f}" for t, v in ood["auroc_epistemic_sigma"].items())
        lines.append(f"\nOOD `{name}` vs `{reference}`: AUROC of epistemic sigma, combined "
                     f"{ood['auroc_combined']:.3f} ({per})")
    return "\n".join(lines)


def _coverage_rows(by_bin: list[list[dict]], name: str = "snr") -> list[str]:
    """Table rows of 68% / 95% coverage per bin (of SNR, or of what `name` says), one column per target."""
    rows = []
    for bins in zip(*by_bin, strict=True):
        cells = " | ".join(f"{100 * b['coverage_68']:.0f}% / {100 * b['coverage_95']:.0f}%" for b in bins)
        rows.append(f"| {bins[0][name + '_lo']:.0f}-{bins[0][name + '_hi']:.0f} | {bins[0]['n']} | {cells} |")
    return rows


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Scratch folder for catalogs.")
def main(bundle: str, work: str) -> None:
    """Write BUNDLE/report/ (eval JSON, plots, summary.md) from freshly synthesised catalogs."""
    make_report(bundle, work)
    click.echo((Path(bundle) / REPORT_DIR / "summary.md").read_text())


if __name__ == "__main__":
    main()
