"""The evaluation report of a model bundle: `python -m starcast.trainers.report BUNDLE --work DIR`.

Synthesises the evaluation catalogs, predicts them with the engine's predictor (`Model.predict`,
the per-batch step of `starcast run`; CPU backend, seed 0, the bundle's default S), scores them
with `evaluate.run_eval`, and writes one folder per set plus `summary.md` into `BUNDLE/report/`.
Sets: the training config's `seed` grid, scored on its test split; a `random`-mode survey at
SNR 20-300; and two out-of-distribution sets (Teff 32-40 kK, and SNR 5) whose epistemic sigma
should single them out of the random survey (AUROC).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..catalogs.io import iter_batches, list_inputs, read_grid
from ..catalogs.schema import SPLIT
from ..catalogs.synth import synth
from ..engine.bundle import load_bundle
from ..engine.predictor import load_model
from .evaluate import run_eval

SETS = {  # name -> keyword arguments of catalogs.synth.synth (the catalog synthesised)
    "random": {"n": 5000, "mode": "random", "seed": 101, "snr": (20.0, 300.0)},
    "ood_hot": {"n": 1000, "mode": "random", "seed": 102, "snr": (20.0, 300.0), "teff": (32000.0, 40000.0)},
    "ood_snr5": {"n": 1000, "mode": "random", "seed": 103, "snr": (5.0, 5.0)},
}


def _predict(bundle: Path, name: str, kwargs: dict, work: Path, split: str | None = None
             ) -> tuple[Path, Path]:
    """Synthesise the catalog (unless already there) and predict it (only rows of `split` if given)."""
    catalog = work / "catalogs" / name
    if not catalog.exists():
        kwargs = dict(kwargs)
        synth(kwargs.pop("n"), catalog, **kwargs)
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


def make_report(bundle: str | Path, work: str | Path) -> dict:
    bundle, work = Path(bundle), Path(work)
    manifest = load_bundle(bundle).manifest
    ranges = {t["name"]: (t["min"], t["max"]) for t in manifest["targets"]}
    synth_cfg = dict(manifest["provenance"]["config"]["data"]["synth"])
    seed_set = {"n": synth_cfg.pop("n", None), **synth_cfg}
    seed_set["snr"] = tuple(seed_set.get("snr", (50.0, 300.0)))
    reports = {}
    cat, res = _predict(bundle, "seed", seed_set, work, split="test")
    reports["test"] = run_eval(res, cat, bundle / "report" / "test", split="test", ranges=ranges)
    cat_r, res_r = _predict(bundle, "random", SETS["random"], work)
    reports["random"] = run_eval(res_r, cat_r, bundle / "report" / "random", ranges=ranges)
    for name in ("ood_hot", "ood_snr5"):
        _, res_o = _predict(bundle, name, SETS[name], work)
        reports[name] = run_eval(res_r, cat_r, work / "eval" / name, ranges=ranges, ood_path=res_o)
        reports["random"].setdefault("ood_sets", {})[name] = reports[name]["ood"]
        shutil.copy(work / "eval" / name / "ood_epistemic.png", bundle / "report" / "random" / f"{name}.png")
    (bundle / "report" / "random" / "report.json").write_text(json.dumps(reports["random"], indent=1) + "\n")
    (bundle / "report" / "summary.md").write_text(summary_markdown(reports) + "\n")
    return reports


def summary_markdown(reports: dict) -> str:
    """The README table: per set and target, RMSE, bias, median sigma, coverage; OOD AUROC."""
    lines = ["| set | target | RMSE | bias | median sigma | 68% cover | 95% cover | worst bin bias/sigma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("test", "random"):
        rep = reports[name]
        for t, m in rep["targets"].items():
            rmse = m["rmse"]
            note = ""
            if t == "vsini" and "vsini_above_resolution" in rep:
                rmse = rep["vsini_above_resolution"]["rmse"]
                note = f" (true > {rep['vsini_above_resolution']['vsini_min']:.0f})"
            g = rep["goals"][t]
            lines.append(f"| {name} | {t}{note} | {rmse:.4g} | {m['bias']:+.3g} | {m['median_sigma']:.3g} | "
                         f"{100 * m['coverage_68']:.1f}% | {100 * m['coverage_95']:.1f}% | "
                         f"{g['worst_bin_bias_over_median_sigma']:.2f} |")
    lines += ["", "68% / 95% coverage in bins of SNR (`random` set):", "",
              "| SNR | rows | " + " | ".join(reports["random"]["targets"]) + " |",
              "| --- | --- |" + " --- |" * len(reports["random"]["targets"])]
    by_snr = [m.get("coverage_by_snr", []) for m in reports["random"]["targets"].values()]
    for bins in zip(*by_snr, strict=True):
        cells = " | ".join(f"{100 * b['coverage_68']:.0f}% / {100 * b['coverage_95']:.0f}%" for b in bins)
        lines.append(f"| {bins[0]['snr_lo']:.0f}-{bins[0]['snr_hi']:.0f} | {bins[0]['n']} | {cells} |")
    for name in ("ood_hot", "ood_snr5"):
        ood = reports[name]["ood"]
        per = ", ".join(f"{t} {v:.3f}" for t, v in ood["auroc_epistemic_sigma"].items())
        lines.append(f"\nOOD `{name}` vs `random`: AUROC of epistemic sigma, combined "
                     f"{ood['auroc_combined']:.3f} ({per})")
    return "\n".join(lines)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Scratch folder for catalogs.")
def main(bundle: str, work: str) -> None:
    """Write BUNDLE/report/ (eval JSON, plots, summary.md) from freshly synthesised catalogs."""
    make_report(bundle, work)
    click.echo((Path(bundle) / "report" / "summary.md").read_text())


if __name__ == "__main__":
    main()
