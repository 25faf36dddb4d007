"""Perturbation matrix: what the model's numbers and flags do when spectra differ from its training set.

For held-out spectra (by default the synthetic random survey at a seed the model never saw; pass
another `source` to `run_matrix`, e.g. TLUSTY-based spectra) and each perturbation of issue 10 (1%
continuum ripple of period 50 A, wavelength offset +-0.3 A, resolving power R/2 and R/4, a 30 A gap
over He I 4471, vacuum wavelengths, no rv column, 50% coverage), it reports per target the RMSE over
rows with numbers against the clean run, the 68% coverage, and the fraction of rows flagged or nulled.
A perturbation passes when RMSE stays within 1.5x of clean with 68% coverage within 5 points of clean,
or when >= 95% of its rows are flagged or nulled; the clean rows should be <= 2% flagged. Labels are
dropped before predicting, so flags come from the spectra and predictions only.
Writes bench/results/perturbations.json and .md (perturbations_r<R>.* with --model-resolving-power).
Usage: python bench/perturbations.py [--n 200] [--model ob-default] [--model-resolving-power R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from starcast.catalogs.medium import air_to_vacuum
from starcast.catalogs.schema import (
    FLUX,
    FLUX_ERR,
    META_WAVELENGTH,
    RESOLVING_POWER,
    RV,
    WavelengthGrid,
    spectrum_array,
)
from starcast.catalogs.synth import SynthConfig, synth_table
from starcast.engine.predictor import load_model

import starcast

RESULTS = Path(__file__).parent / "results"
TARGETS = ("teff", "logg", "vsini")
R_SOURCE = 20000.0  # resolving power of the default source (and of ob-default's training spectra)

Source = Callable[[int, int, float], pa.Table]  # (n, seed, resolving power) -> catalog with labels


def synthetic_source(n: int, seed: int, resolving_power: float) -> pa.Table:
    """Held-out spectra: the synthetic random survey (4000-4800 A, air, SNR 50-300) at `seed`."""
    return synth_table(SynthConfig(n=n, seed=seed, resolving_power=resolving_power))


def _grid(table: pa.Table) -> WavelengthGrid:
    return WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()])


def _with_grid(table: pa.Table, grid: WavelengthGrid) -> pa.Table:
    meta = {**table.schema.metadata, META_WAVELENGTH.encode(): grid.to_json().encode()}
    return table.replace_schema_metadata(meta)


def _flux(table: pa.Table, name: str = FLUX) -> np.ndarray:
    return np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)


def _set_flux(table: pa.Table, flux: np.ndarray, name: str = FLUX) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, spectrum_array(flux, flux.shape[1]))


def ripple(table, **_):
    wl, rng = _grid(table).values(), np.random.default_rng(1)
    phase = rng.uniform(0, 2 * np.pi, (table.num_rows, 1))
    return _set_flux(table, _flux(table) * (1 + 0.01 * np.sin(2 * np.pi * wl / 50.0 + phase)))


def offset(shift):
    def perturb(table, **_):
        g = _grid(table)
        return _with_grid(table, WavelengthGrid.linear(g.start + shift, g.step, g.n, g.medium))
    return perturb


def resolution(factor):
    def perturb(table, source, n, seed, **_):
        lower = source(n, seed, R_SOURCE / factor)
        return lower.append_column(RESOLVING_POWER, pa.array(np.full(n, R_SOURCE / factor)))
    return perturb


def gap_he_i_4471(table, **_):
    wl, flux = _grid(table).values(), _flux(table)
    flux[:, (wl > 4456.5) & (wl < 4486.5)] = np.nan
    return _set_flux(table, flux)


def vacuum(stated: bool):
    def perturb(table, **_):
        values = air_to_vacuum(_grid(table).values())
        return _with_grid(table, WavelengthGrid.explicit(values, "vacuum" if stated else "air"))
    return perturb


def missing_rv(table, **_):
    return table.drop_columns([RV])


def coverage_half(table, **_):
    g = _grid(table)
    keep = g.values() < 4400.0  # 4010-4400 of the model's 4010-4790 A
    trimmed = _set_flux(table, _flux(table)[:, keep])
    trimmed = _set_flux(trimmed, _flux(trimmed, FLUX_ERR)[:, keep], FLUX_ERR)
    return _with_grid(trimmed, WavelengthGrid.linear(g.start, g.step, int(keep.sum()), g.medium))


PERTURBATIONS = {
    "ripple 1% / 50 A": ripple, "offset +0.3 A": offset(0.3), "offset -0.3 A": offset(-0.3),
    "R / 2 (stated)": resolution(2), "R / 4 (stated)": resolution(4),
    "gap 30 A over He I 4471": gap_he_i_4471,
    "vacuum (stated)": vacuum(True), "vacuum (labelled air)": vacuum(False), "missing rv": missing_rv,
    "coverage 50%": coverage_half,
}


def score(results: pa.Table, truth: dict[str, np.ndarray]) -> dict:
    flags = results.column("flags").to_numpy()
    nulled = results.column("error").is_valid().to_numpy(zero_copy_only=False)
    out = {"rows": results.num_rows, "flagged_or_nulled": float(np.mean((flags != 0) | nulled)),
           "nulled": float(np.mean(nulled)), "targets": {}}
    for t in TARGETS:
        mean = results.column(t).to_numpy(zero_copy_only=False).astype(float)
        err = results.column(f"{t}_err").to_numpy(zero_copy_only=False).astype(float)
        ok = np.isfinite(mean)
        r = mean[ok] - truth[t][ok]
        out["targets"][t] = {"rmse": float(np.sqrt(np.mean(r**2))) if ok.any() else None,
                             "coverage_68": float(np.mean(np.abs(r) <= err[ok])) if ok.any() else None}
    return out


def verdict(entry: dict, clean: dict) -> bool:
    if entry["flagged_or_nulled"] >= 0.95:
        return True
    return all(e["rmse"] is not None and e["rmse"] <= 1.5 * c["rmse"]
               and abs(e["coverage_68"] - c["coverage_68"]) <= 0.05
               for e, c in zip(entry["targets"].values(), clean["targets"].values(), strict=True))


def run_matrix(model, source: Source = synthetic_source, n: int = 200, seed: int = 2026) -> dict:
    """Score the clean spectra of `source` and every perturbation of them with `model`."""
    clean = source(n, seed, R_SOURCE)
    truth = {t: clean.column(t).to_numpy() for t in TARGETS}

    def predict(table):
        labels = [t for t in TARGETS if t in table.column_names]
        return model.predict(table.drop_columns(labels), backend="cpu")
    report = {"clean": score(predict(clean), truth), "perturbations": {}}
    for name, perturb in PERTURBATIONS.items():
        t0 = time.perf_counter()
        entry = score(predict(perturb(clean, source=source, n=n, seed=seed)), truth)
        entry["passes"] = verdict(entry, report["clean"])
        entry["seconds"] = time.perf_counter() - t0
        report["perturbations"][name] = entry
    return report


def markdown(report: dict, command: str) -> str:
    clean = report["clean"]
    summary = ", ".join(f"{t} RMSE {c['rmse']:.4g}, 68% coverage {100 * c['coverage_68']:.1f}%"
                        for t, c in clean["targets"].items())
    lines = [f"# Perturbation matrix ({report['model']})", "", f"Command: `{command}`", "",
             f"Clean: {clean['rows']} held-out spectra, {100 * clean['flagged_or_nulled']:.1f}% flagged or "
             f"nulled (goal <= 2%); {summary}", "",
             "| perturbation | flagged or nulled | nulled | " + " | ".join(
                 f"{t} RMSE / clean | {t} cov68" for t in TARGETS) + " | passes |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in TARGETS) + " | --- |"]
    for name, e in report["perturbations"].items():
        cells = []
        for t in TARGETS:
            m, c = e["targets"][t], clean["targets"][t]
            cells += ["-", "-"] if m["rmse"] is None else [f"{m['rmse'] / c['rmse']:.2f}",
                                                           f"{100 * m['coverage_68']:.1f}%"]
        lines.append(f"| {name} | {100 * e['flagged_or_nulled']:.1f}% | {100 * e['nulled']:.1f}% | "
                     + " | ".join(cells) + f" | {'yes' if e['passes'] else '**no**'} |")
    lines += ["", "Pass: RMSE <= 1.5x clean and 68% coverage within 5 points of clean for every target, or "
              ">= 95% of rows flagged or nulled. RMSE over rows with numbers."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="held-out spectra per perturbation")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the held-out survey")
    parser.add_argument("--model", default="ob-default")
    parser.add_argument("--model-resolving-power", type=float, default=None,
                        help="treat the model as stating this R (for a model whose manifest does not)")
    args = parser.parse_args()
    model = load_model(args.model)
    if args.model_resolving_power is not None:
        model.resolving_power = args.model_resolving_power
    report = run_matrix(model, n=args.n, seed=args.seed)
    report.update(model=model.name, model_sha256=model.bundle.weights_sha256, n=args.n, seed=args.seed,
                  model_resolving_power=model.resolving_power, command=" ".join(["python", *sys.argv]),
                  machine={"cpu": platform.processor(), "cores_visible": len(os.sched_getaffinity(0)),
                           "python": platform.python_version(), "starcast": starcast.__version__})
    r = args.model_resolving_power
    stem = "perturbations" + ("" if r is None else f"_r{r:.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report, report["command"]))
    print(markdown(report, report["command"]))


if __name__ == "__main__":
    main()
