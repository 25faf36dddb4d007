"""Bias of the shipped estimate at the grid nodes the model was trained on against those it was not
(issue #9's worst-bin bias).

The report finds log g biased low on slow rotators at the test nodes (by ~0.3 sigma at SNR >= 30)
but not between the nodes. The test nodes, like the validation nodes and the grid's 16 withheld
models, are holes in the training grid: the emulator whose fit gives the estimate at high SNR
interpolates the physics there from the neighbouring nodes, while the stars between the nodes of the
report are themselves interpolated between nodes the emulator was trained on. This bench separates
the two: stars at each left-out node (validation and test) and at as many training nodes drawn from
the same range, slow rotators (v sin i 5-80 km/s) at one SNR (300), no ripple, gap or rv error, so
that little but the estimator's systematic remains; per node the mean error in units of the median
reported sigma, and over the nodes its mean and the share of nodes where it is negative.
Beside the left-out nodes' bias, what the generator's interpolation itself gets wrong there: each
left-out node's spectrum (v sin i INTERPOLATION_VSINI, no noise) fitted from the training nodes as
`interpolation_floor.py` fits it, the correlation over the nodes of that offset with the bias, and
the bias per unit of offset (least squares through 0).

Run: `python bench/node_holes.py [--per-node 200] [--snr 300]`. Writes bench/results/node_holes.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from interpolation_floor import TARGETS, fitted_offsets
from preprocess_bench import machine
from starcast.catalogs import gridsynth
from starcast.engine.predictor import load_model
from starcast.trainers.config import load_config
from starcast.trainers.gridsource import GridSource

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).resolve().parent.parent / "trainers" / "configs" / "ob-default.toml"
INTERPOLATION_VSINI = (20.0, 60.0)  # km/s: the interpolation's offsets within the stars' range, averaged


def node_bias(model, source: GridSource, nodes: np.ndarray, pert, per_node: int,
              rng: np.random.Generator) -> np.ndarray:
    """[nodes, K, 2]: per node and target the mean error of the estimate and its median sigma."""
    names = [t.name for t in model.targets]
    out = []
    for node in nodes:
        labels = gridsynth.labels_at(source.full.nodes[np.full(per_node, node)], pert, rng)
        table = gridsynth.draw_survey(source.full, labels, pert, rng).table(source.obs)
        truth = np.stack([table.column(n).to_numpy() for n in names], axis=1)
        results = model.predict(table.drop_columns(names))
        estimate = np.stack([results.column(n).to_numpy() for n in names], axis=1)
        sigma = np.stack([results.column(f"{n}_err").to_numpy() for n in names], axis=1)
        out.append(np.stack([np.mean(estimate - truth, axis=0), np.median(sigma, axis=0)], axis=1))
    return np.array(out)


def interpolation_offsets(source: GridSource, held: np.ndarray) -> np.ndarray:
    """[len(held), len(TARGETS)]: per left-out node, the mean offset over INTERPOLATION_VSINI of its
    spectrum fitted noise-free from the training nodes (all of `held` left out)."""
    lib = source.full.at_metals(0.0)
    rungs = sorted({int(np.argmin(np.abs(lib.vsini - v))) for v in INTERPOLATION_VSINI})
    _, offset = fitted_offsets(lib, rungs, [(n, list(held)) for n in held])
    return offset.reshape(len(held), len(rungs), len(TARGETS)).mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-node", type=int, default=200, help="stars per node")
    parser.add_argument("--snr", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    model = load_model("ob-default")
    source = GridSource(load_config(CONFIG), progress=False)
    pert = replace(source.pert, snr=(args.snr, args.snr), vsini=(5.0, 80.0), ripple_prob=0.0, gap_prob=0.0,
                   bad_pixel_fraction=0.0, rv_error_kms=0.0)
    rng = np.random.default_rng(args.seed)
    held = np.concatenate([source.held["val"], source.held["test"]])
    nodes = source.full.nodes
    lo, hi = nodes[held].min(axis=0), nodes[held].max(axis=0)
    inside = np.flatnonzero(np.all((nodes >= lo) & (nodes <= hi), axis=1))
    trained = rng.permutation(np.setdiff1d(inside, held))[:len(held)]
    names = [t.name for t in model.targets]
    result = {"machine": machine(), "model": model.bundle.manifest["bundle_sha256"][:12],
              "config": vars(args), "groups": {}}
    for group, idx in (("left out of training", held), ("trained on", trained)):
        per = node_bias(model, source, idx, pert, args.per_node, rng)
        z = per[:, :, 0] / per[:, :, 1]
        targets = {n: {"bias_over_sigma": z[:, k].tolist(), "mean_bias_over_sigma": float(z[:, k].mean()),
                       "mean_standard_error": float(z[:, k].std(ddof=1) / np.sqrt(len(z))),
                       "negative_share": float(np.mean(z[:, k] < 0)), "mean_bias": float(per[:, k, 0].mean()),
                       "median_sigma": float(np.median(per[:, k, 1]))} for k, n in enumerate(names)}
        result["groups"][group] = {"nodes": nodes[idx].tolist(), "targets": targets}
        if group == "left out of training":
            for k, off in enumerate(interpolation_offsets(source, held).T):
                bias = per[:, k, 0]
                targets[TARGETS[k]].update(interpolation_offset=off.tolist(),
                                           interpolation_over_sigma=(off / per[:, k, 1]).tolist(),
                                           correlation_with_bias=float(np.corrcoef(off, bias)[0, 1]),
                                           bias_per_offset=float(off @ bias / (off @ off)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    (out / "node_holes.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Bias at the nodes the model was trained on and at those it was not (ob-default)", "",
             f"{result['machine']['cpu']}. Command: `python bench/node_holes.py --per-node {args.per_node} "
             f"--snr {args.snr:g} --seed {args.seed}` ({result['seconds']:.0f} s), bundle {result['model']}. "
             f"{args.per_node} stars per node, v sin i 5-80 km/s, metals {pert.metals[0]:+g} to "
             f"{pert.metals[1]:+g}, SNR {args.snr:g}, "
             "no ripple, gap or rv error; training nodes drawn within the left-out ones' Teff and log g "
             "range.", "",
             "| nodes | target | mean bias / sigma (+- its standard error over the nodes) | nodes negative "
             "| mean bias | median sigma | per node |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for group, g in result["groups"].items():
        for n, t in g["targets"].items():
            lines.append(f"| {group} ({len(g['nodes'])}) | {n} | {t['mean_bias_over_sigma']:+.2f} "
                         f"+- {t['mean_standard_error']:.2f} | {t['negative_share']:.0%} | "
                         f"{t['mean_bias']:+.3g} | {t['median_sigma']:.3g} | "
                         + " ".join(f"{v:+.2f}" for v in t["bias_over_sigma"]) + " |")
    left = result["groups"]["left out of training"]
    lines += ["", "The generator's interpolation at the left-out nodes: each node's spectrum (v sin i "
              + ", ".join(f"{v:g}" for v in INTERPOLATION_VSINI) + " km/s, no noise) fitted from the "
              "training nodes, its offset in units of the node's median sigma above, the correlation over "
              "the nodes of that offset with the estimate's bias, and the bias per unit of offset (least "
              "squares through 0). Left-out nodes in order (Teff, log g): "
              + ", ".join(f"{t:.0f} / {g:g}" for t, g in left["nodes"]) + ".", "",
              "| target | offset / sigma per node | mean offset | correlation with the bias "
              "| bias per offset |", "| --- | --- | --- | --- | --- |"]
    for n in TARGETS:
        t = left["targets"][n]
        lines.append(f"| {n} | " + " ".join(f"{v:+.2f}" for v in t["interpolation_over_sigma"])
                     + f" | {np.mean(t['interpolation_offset']):+.3g} | {t['correlation_with_bias']:+.2f} | "
                     f"{t['bias_per_offset']:.2f} |")
    (out / "node_holes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
