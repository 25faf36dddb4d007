"""Explanations on a catalog: speed of integrated gradients on the CPU (starcast's torch IG against
Captum's `IntegratedGradients`, same path, quadrature and numbers), their completeness, a deletion check
of faithfulness, and the line-mass measure of issue 14 on a model, with its survey view.

Run: `python bench/explain_bench.py --model ob-default --rows 1000 [--captum-rows 200] [--threads 2]
[--grid shared/data/tlusty-bstar2006/grid.npz --cache .cache/starcast]`. Spectra come from the TLUSTY
grid (stars between the nodes, the training perturbations, SNR 10-500, an unseen seed) when `--grid` is
given, else from the shipped sample (`starcast/data/tlusty-sample.npz`, at its five nodes). Writes
bench/results/explain.json, explain.md (with the survey view's tables) and explain_spectrum.png (the
plot of the first spectrum, as `starcast explain` draws it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import (
    BroadenedLibrary,
    Observation,
    Perturbations,
    draw_labels,
    draw_survey,
    synth_from_grid,
)
from starcast.catalogs.io import read_catalog
from starcast.engine.explain_report import LINE_MASS_GOAL, line_mass, plot_spectrum, survey_view
from starcast.engine.predictor import load_model

RESULTS = Path(__file__).parent / "results"
SAMPLE = Path(__file__).parents[1] / "starcast" / "data" / "tlusty-sample.npz"
SEED = 2026  # the survey's seed, unseen in training (seed 0) and in the report (101)
DELETE_FRACTION = 0.05  # deletion check: pixels set to the continuum, the top-|attribution| or random ones


def catalog(rows: int, grid: str | None, cache: str | None) -> tuple[pa.Table, str]:
    if grid:
        obs, pert = Observation(), Perturbations()
        lib = BroadenedLibrary.build(read_grid(grid), obs, cache=cache)
        rng = np.random.default_rng(SEED)
        survey = draw_survey(lib, draw_labels(lib, rows, pert, rng), pert, rng)
        return survey.table(obs), f"TLUSTY grid {grid}, between the nodes, seed {SEED}, SNR 10-500"
    with tempfile.TemporaryDirectory() as tmp:
        synth_from_grid(read_grid(SAMPLE), rows, Path(tmp) / "cat", at_nodes=True, seed=SEED)
        return read_catalog(Path(tmp) / "cat"), f"shipped sample {SAMPLE.name} (5 nodes), seed {SEED}"


def deletion(model, table: pa.Table, exp) -> dict:
    """Mean |change of f| when the DELETE_FRACTION pixels of largest |attribution| of a target are set to
    the continuum, against as many random pixels: a faithful attribution changes f far more."""
    from starcast.engine.explain import continuum_baseline, explained_function

    targets = [[t.name for t in model.targets].index(t) for t in exp.targets]
    ok, x, f, _ = explained_function(model, model.prepare(table), targets)
    x, d = x[ok], model.grid.n
    n, base, rows = int(DELETE_FRACTION * d), continuum_baseline(x, d), torch.arange(len(x))
    rng = np.random.default_rng(0)
    out = {}
    with torch.no_grad():
        fx = f(torch.as_tensor(x), rows).double().numpy()
        for k, t in enumerate(exp.targets):
            top = np.argsort(-np.abs(exp.attributions[:len(ok)][ok, k]), axis=1)[:, :n]
            rand = np.stack([rng.choice(d, n, replace=False) for _ in range(len(x))])
            change = {}
            for name, idx in (("top", top), ("random", rand)):
                xd = x.copy()
                np.put_along_axis(xd, idx, np.take_along_axis(base, idx, axis=1), axis=1)
                fd = f(torch.as_tensor(xd), rows)[:, k].double().numpy()
                change[name] = float(np.mean(np.abs(fd - fx[:, k])))
            out[t] = {"mean_abs_change_top": change["top"], "mean_abs_change_random": change["random"],
                      "ratio": change["top"] / change["random"]}
    return out


BINS = {"snr": (10.0, 30.0, 100.0, 500.0), "vsini": (0.0, 50.0, 150.0, 300.0, 450.0)}  # true values


def line_mass_by_bin(table: pa.Table, exp) -> dict:
    """Mean line mass per target in bins of the catalog's true SNR and v sin i (where it loses mass)."""
    out = {}
    for column, edges in BINS.items():
        values = table.column(column).to_numpy()
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = (values >= lo) & (values < hi) & np.isfinite(exp.prediction).all(axis=1)
            out[f"{column} {lo:g}-{hi:g}"] = {"spectra": int(sel.sum()), **{
                t: float(np.nanmean(line_mass(exp.attributions[sel, k], exp.wavelength, t)))
                for k, t in enumerate(exp.targets)}}
    return out


def timed(model, table: pa.Table, method: str, steps: int):
    t0, c0 = time.perf_counter(), time.process_time()
    exp = model.explain(table, method=method, steps=steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    err = exp.completeness_error()
    gap = np.abs(exp.prediction - exp.baseline)
    over = err > 0.01
    return exp, {"method": method, "rows": len(exp.ids), "steps": steps, "wall_s": round(wall, 2),
                 "cpu_s": round(cpu, 2), "spectra_per_s": round(len(exp.ids) / wall, 2),
                 "completeness_error_median": float(np.nanmedian(err)),
                 "completeness_error_p99": float(np.nanpercentile(err, 99)),
                 "rows_over_1pct": int(over.any(axis=1).sum()),
                 "largest_gap_over_1pct": {t: float(gap[over[:, k], k].max()) if over[:, k].any() else None
                                           for k, t in enumerate(exp.targets)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ob-default")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--captum-rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="a grid of model spectra (npz); default: the shipped sample")
    ap.add_argument("--cache", help="the broadened library's cache folder (as in the training config)")
    ap.add_argument("--label", default="", help="a note on the machine's state, kept in the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    table, source = catalog(args.rows, args.grid, args.cache)
    load = os.getloadavg()[0]
    exp, ig = timed(model, table, "ig", args.steps)
    runs = [ig]
    if args.captum_rows:
        exp_c, captum = timed(model, table.slice(0, args.captum_rows), "captum", args.steps)
        n = args.captum_rows
        diff = np.abs(exp_c.attributions - exp.attributions[:n]).max(axis=2)
        relative = diff / np.abs(exp.attributions[:n]).max(axis=2)  # of each row's largest |attribution|
        captum["max_abs_diff_vs_ig"] = float(np.nanmax(diff))
        captum["relative_diff_vs_ig_median_max"] = [float(np.nanmedian(relative)), float(np.nanmax(relative))]
        runs.append(captum)
    with tempfile.TemporaryDirectory() as tmp:
        survey = survey_view(exp, Path(tmp))
        survey_md = (Path(tmp) / "survey.md").read_text()
    plot_spectrum(exp, 0, RESULTS / "explain_spectrum.png")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "load_avg_1min_before": load, "note": args.label},
        "versions": {"torch": torch.__version__, "captum": _version("captum"),
                     "starcast": _version("starcast")},
        "model": {"name": model.name, "path": str(model.bundle.path), "sha256": model.bundle.weights_sha256},
        "catalog": source, "runs": runs, "deletion": deletion(model, table.slice(0, 200), exp),
        "line_mass": {t: survey["targets"][t]["line_mass_mean"] for t in exp.targets},
        # what a uniform attribution would score: the share of model pixels inside the windows
        "window_pixels": {t: float(line_mass(np.ones((1, len(exp.wavelength))), exp.wavelength, t)[0])
                          for t in exp.targets},
        "line_mass_by_bin": line_mass_by_bin(table, exp),
        "line_mass_goal": LINE_MASS_GOAL, "survey": survey}
    (RESULTS / "explain.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "explain.md").write_text(markdown(result, args, survey_md) + "\n")
    print((RESULTS / "explain.md").read_text())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def markdown(r: dict, args, survey_md: str) -> str:
    m = r["machine"]
    lines = [f"# Explanations: integrated gradients on the CPU, model `{r['model']['name']}`", "",
             f"{m['cpu']}, {m['threads']} torch threads, load average (1 min) "
             f"{m['load_avg_1min_before']:.1f} before{'; ' + m['note'] if m['note'] else ''}. "
             f"Catalog: {r['catalog']}. Command: "
             f"`python bench/explain_bench.py --model {args.model} --rows {args.rows} --captum-rows "
             f"{args.captum_rows} --steps {args.steps} --threads {args.threads}"
             f"{' --grid ' + args.grid if args.grid else ''}"
             f"{' --cache ' + args.cache if args.cache else ''}`.",
             "", "| method | rows | steps | wall s | spectra/s | completeness error median / 99th pct "
             "| rows > 1% | largest |f(x) - f(baseline)| among them |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in r["runs"]:
        gaps = ", ".join(f"{t} {g:.3g}" for t, g in run["largest_gap_over_1pct"].items() if g is not None)
        lines.append(f"| {run['method']} | {run['rows']} | {run['steps']} | {run['wall_s']} | "
                     f"{run['spectra_per_s']} | {run['completeness_error_median']:.1e} / "
                     f"{run['completeness_error_p99']:.1e} | {run['rows_over_1pct']} | {gaps or '-'} |")
    if len(r["runs"]) > 1:
        lines.append(f"\nCaptum vs starcast's IG: max |difference| of attributions "
                     f"{r['runs'][1]['max_abs_diff_vs_ig']:.2e} (target units per pixel); relative to each "
                     "row's largest |attribution|, median {:.1e}, largest {:.1e} (the same rule and path "
                     "points: float32 rounding in batches of other sizes and, where a row's completeness "
                     "test falls near 1%, one refinement more in one of them)."
                     .format(*r['runs'][1]['relative_diff_vs_ig_median_max']))
    lines += ["", f"Deletion check (200 spectra): mean |change| of the prediction when the "
              f"{100 * DELETE_FRACTION:.0f}% of pixels with the largest |attribution| are set to the "
              "continuum, against as many random pixels:", "",
              "| target | top pixels | random pixels | ratio |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {t} | {d['mean_abs_change_top']:.4g} | {d['mean_abs_change_random']:.4g} | "
              f"{d['ratio']:.1f} |" for t, d in r["deletion"].items()]
    goal = ", ".join(f"{t} {100 * v:.1f}%" for t, v in r["line_mass"].items())
    share = ", ".join(f"{t} {100 * v:.1f}%" for t, v in r["window_pixels"].items())
    lines += ["", "Line mass (share of |attribution| within +-3 A of the listed lines; log g also the "
              f"Balmer wings), mean over spectra: {goal} (goal >= {100 * r['line_mass_goal']:.0f}% for teff "
              f"and logg). The windows hold {share} of the model pixels (what a uniform attribution "
              "would score).",
              "", "Line mass in bins of the true SNR and v sin i:", "",
              "| bin | spectra | " + " | ".join(r["line_mass"]) + " |",
              "| --- | --- |" + " --- |" * len(r["line_mass"])]
    for name, b in r["line_mass_by_bin"].items():
        cells = " | ".join(f"{100 * b[t]:.1f}%" for t in r["line_mass"])
        lines.append(f"| {name} | {b['spectra']} | {cells} |")
    lines += ["", "## Survey view", "", survey_md, "", "![first spectrum](explain_spectrum.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
