"""The interpolation floor (issue #9): how far the labels of a grid node's own spectrum land when the
node is left out and the other nodes are interpolated the way the trainer interpolates them, against
the Cramer-Rao bound, which assumes the physics at that node is known exactly.

For every interior node of the config's grid (its four axis neighbours in the grid, so it is a star
between nodes once it is left out, like the models the grid's README withholds), its broadened
spectrum at a few v sin i is fitted noise-free by `trainers.templatefit.ContinuumFitter` with a
library of all the other nodes (the generator's cubic RBF between nodes, the continuum fitted
jointly), started at the truth. The offset of the fitted labels is what this interpolation of the
grid's nodes gets wrong about the physics between them: an estimator trained on stars drawn with it
(or fitted with it) does no better on average, so at high SNR, where the bound falls as 1/SNR, its
error is bounded below by this floor rather than by the bound.

`--sweep` measures the same for other interpolation settings (weights kept per star, the log g
unit of distance between nodes) beside the generator's: how its constants were chosen. `--holes`
measures it at nodes left out together with neighbours (HOLES: two or three in a row, a plus of
five), each offset taken at the hole's first node, where every node around the hole is in the grid:
the grid's README withholds some models side by side, and a model's left-out validation and test nodes
widen the holes of its training grid further.

Run: `python bench/interpolation_floor.py [--config trainers/configs/ob-default.toml]
[--vsini 20 60 150 300] [--sweep] [--holes]`. Writes bench/results/interpolation_floor.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
from peers import ROOT, source
from preprocess_bench import machine
from starcast.catalogs import gridsynth
from starcast.trainers import templatefit as tf

RESULTS = Path(__file__).parent / "results"
BOUND_SNR = (100.0, 200.0, 400.0)  # the bound is quoted at these SNR per observed pixel
TARGETS = ("teff", "logg", "vsini")
# (weights kept per star, None: all; log g in dex per unit of distance) measured by --sweep
SWEEP = ((20, 0.25), (40, 0.25), (None, 0.25), (40, 0.175), (40, 0.1), (40, 0.09), (40, 0.075),
         (40, 0.0625), (None, 0.125), (None, 0.09))
# Holes left out together (steps in (teff, logg) from the node whose offset is measured), by --holes
HOLES = {"two in Teff": ((0, 0), (1, 0)),
         "three in Teff": ((0, 0), (-1, 0), (1, 0)), "three in log g": ((0, 0), (0, -1), (0, 1)),
         "a plus of five": ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))}


@contextlib.contextmanager
def interpolation(neighbours: int | None, logg_unit: float):
    """The generator's interpolation with other settings (None: keep every weight), for the duration
    of the block and for libraries built inside it (a library keeps the interpolator of its first use)."""
    saved = gridsynth.NEIGHBOURS, gridsynth.NODE_SCALE
    try:
        gridsynth.NEIGHBOURS = 10**6 if neighbours is None else neighbours
        gridsynth.NODE_SCALE = np.array([gridsynth.GRID_STEP[0], logg_unit])
        yield
    finally:
        gridsynth.NEIGHBOURS, gridsynth.NODE_SCALE = saved


def offsets(full, rungs: list[int], shape: tuple = ((0, 0),)) -> tuple[np.ndarray, np.ndarray]:
    """(truth, fitted - truth), (nodes x rungs, 3): each node where the hole `shape` fits
    (`gridsynth.holes`) fitted from the nodes outside the hole."""
    return fitted_offsets(full, rungs, gridsynth.holes(full.nodes, shape))


def fitted_offsets(full, rungs: list[int],
                   cases: list[tuple[int, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(truth, fitted - truth), (cases x rungs, 3): for each (node, hole) of `cases`, the node's
    spectrum at the v sin i `rungs` fitted noise-free from the nodes of `full` outside the hole."""
    flux = np.asarray(full.flux)[:, 0]
    truth, fitted = [], []
    for n, hole in cases:
        others = full.subset(np.setdiff1d(np.arange(len(full.nodes)), hole))
        theta = np.array([[*full.nodes[n], full.vsini[r]] for r in rungs])
        spectra = flux[n, rungs].astype(np.float64)
        fit = tf.ContinuumFitter(others).fit(spectra, np.full_like(spectra, 1e-3),
                                             np.zeros(spectra.shape, bool), theta)
        truth.append(theta)
        fitted.append(fit.theta)
    truth = np.concatenate(truth)
    return truth, np.concatenate(fitted) - truth


def rms(offset: np.ndarray) -> dict[str, float]:
    return {t: float(np.sqrt(np.mean(offset[:, k] ** 2))) for k, t in enumerate(TARGETS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "trainers/configs/ob-default.toml"))
    parser.add_argument("--vsini", type=float, nargs="+", default=[20.0, 60.0, 150.0, 300.0],
                        help="km/s; each is moved to the nearest rung of the library's ladder")
    parser.add_argument("--sweep", action="store_true", help="other interpolation settings too")
    parser.add_argument("--holes", action="store_true", help="nodes left out with neighbours too")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    full = source(args.config, None, None).full.at_metals(0.0)
    rungs = sorted({int(np.argmin(np.abs(full.vsini - v))) for v in args.vsini})
    truth, offset = offsets(full, rungs)
    ones = np.ones((len(truth), full.flux.shape[-1]))
    bound = {snr: tf.cramer_rao(full, truth, ones * snr**2) for snr in BOUND_SNR}
    targets = {}
    for k, (t, r) in enumerate(rms(offset).items()):
        d = offset[:, k]
        targets[t] = {"rms_offset": r,
                      "median_abs_offset": float(np.median(np.abs(d))), "mean_offset": float(np.mean(d)),
                      "crb_rms": {f"{snr:.0f}": float(np.sqrt(np.mean(b[:, k] ** 2)))
                                  for snr, b in bound.items()}}
    shipped = (gridsynth.NEIGHBOURS, float(gridsynth.NODE_SCALE[1]))
    sweep = []
    for neighbours, logg_unit in SWEEP if args.sweep else ():
        with interpolation(neighbours, logg_unit):
            sweep.append({"neighbours": neighbours, "logg_unit": logg_unit,
                          "rms_offset": rms(offsets(full, rungs)[1])})
    holes = [{"hole": name, "nodes": len(gridsynth.holes(full.nodes, shape)),
              "rms_offset": rms(offsets(full, rungs, shape)[1])} for name, shape in HOLES.items()
             ] if args.holes else []
    out = {"machine": machine(), "config": str(Path(args.config).resolve().relative_to(ROOT)),
           "nodes": len(truth) // len(rungs), "vsini": [float(full.vsini[r]) for r in rungs],
           "interpolation": {"neighbours": shipped[0], "logg_unit": shipped[1]},
           "seconds": round(time.perf_counter() - t0, 1), "targets": targets, "sweep": sweep, "holes": holes,
           "rows": [{**dict(zip(TARGETS, map(float, a), strict=True)),
                     **{f"d_{t}": float(v) for t, v in zip(TARGETS, d, strict=True)}}
                    for a, d in zip(truth, offset, strict=True)]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "interpolation_floor.json").write_text(json.dumps(out, indent=1) + "\n")
    m = out["machine"]
    vsini = ", ".join(f"{v:.0f}" for v in out["vsini"])
    lines = ["# The interpolation floor: grid nodes left out one at a time, fitted noise-free from the rest",
             "", f"{out['nodes']} interior nodes of `{out['config']}`'s grid, each at v sin i {vsini} km/s: "
             "its broadened spectrum (no noise) fitted by the joint-continuum chi^2 fit with the library of "
             "all the other nodes (cubic RBF between nodes, as the trainer draws stars: the "
             f"{shipped[0]} largest weights per star, log g in units of {shipped[1]} dex against 1000 K), "
             "started at the truth. The offset is what interpolating the grid gets wrong at a node it does "
             "not have. The Cramer-Rao bound (raw pixels, cubic continuum marginalised, full library at the "
             "truth) takes that physics as known.", "",
             f"{m['cpu']}, {m['logical_cores']} logical cores. Command: "
             f"`python bench/interpolation_floor.py{' --sweep' if sweep else ''}"
             f"{' --holes' if holes else ''}` ({out['seconds']:.0f} s).",
             "", "| target | RMS offset | median abs offset | mean offset | "
             + " | ".join(f"CRB RMS at SNR {s:.0f}" for s in BOUND_SNR) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(BOUND_SNR)]
    for t, r in targets.items():
        cells = [f"{r['rms_offset']:.4g}", f"{r['median_abs_offset']:.4g}", f"{r['mean_offset']:+.3g}",
                 *(f"{v:.4g}" for v in r["crb_rms"].values())]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", "The same RMS offsets with other interpolation settings (`--sweep`):", "",
                  "| weights kept per star | log g unit (dex) | " + " | ".join(TARGETS) + " |",
                  "| --- | --- |" + " --- |" * len(TARGETS)]
        lines.append(f"| {shipped[0]} (the generator's) | {shipped[1]:g} | "
                     + " | ".join(f"{v['rms_offset']:.4g}" for v in targets.values()) + " |")
        for r in sweep:
            kept = "all" if r["neighbours"] is None else str(r["neighbours"])
            lines.append(f"| {kept} | {r['logg_unit']:g} | "
                         + " | ".join(f"{v:.4g}" for v in r["rms_offset"].values()) + " |")
    if holes:
        lines += ["", "The same RMS offsets at nodes left out with neighbours (`--holes`; the generator's "
                  "interpolation), against the bound above:", "",
                  "| left out | nodes | " + " | ".join(TARGETS) + " |",
                  "| --- | --- |" + " --- |" * len(TARGETS)]
        lines += [f"| {r['hole']} | {r['nodes']} | "
                  + " | ".join(f"{v:.4g}" for v in r["rms_offset"].values()) + " |"
                  for r in [{"hole": "one node (above)", "nodes": out["nodes"],
                             "rms_offset": {t: v["rms_offset"] for t, v in targets.items()}}, *holes]]
    (Path(args.out) / "interpolation_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
