"""How the shipped estimates' calibration holds at grid nodes it has not seen (issue #9): leave one node
out at a time.

`calibrate_estimates` fits the calibration on the validation and test surveys (13 nodes left out of
the networks' and the emulator's training) and on copies of the validation survey. Here each of the
13 nodes is left out of that fit in turn (its rows in every survey), the calibration fitted on the
other 12 and the left-out node's rows scored under it, as the grid's withheld models will be scored;
the 13 nodes' scores are pooled. 68% / 95% coverage and RMSE per SNR bin, each cell's worst miss in
units of the goal's band (68%: +-3 points, 95%: +-2; above 1 is out), the spread of the 68%
coverage from node to node, and per target the worst bias over median sigma in bins of each true
parameter at SNR >= 30 (the goal: below 0.25), as the model report reads it. `--with-between` adds
the survey of stars between the nodes to every fit (the shipped calibration was fitted with it until
bundle 9aea78b22e78).

Run: `python bench/unseen_nodes.py [--with-between]` (~40 min on 2 cores). Writes
bench/results/unseen_nodes[_with_between].json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from preprocess_bench import machine
from starcast.engine.bundle import load_bundle
from starcast.trainers.config import load_config
from starcast.trainers.emulator import (
    CALIBRATION_SURVEYS,
    calibrated_estimates,
    calibration_surveys,
    fit_estimates_calibration,
    survey_rows,
)
from starcast.trainers.evaluate import BIAS_BINS, BIAS_MIN_SNR, GOALS
from starcast.trainers.gridsource import GridSource
from starcast.trainers.metrics import ISSUE_SNR_EDGES, binned_bias, coverage, worst_bias

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).parents[1] / "trainers" / "configs" / "ob-default.toml"
SNR_BINS = (*zip(ISSUE_SNR_EDGES[:-1], ISSUE_SNR_EDGES[1:], strict=True), (ISSUE_SNR_EDGES[-1], np.inf))
BANDS = {0.68: 0.03, 0.95: 0.02}  # issue 9's goal: coverage within +- this


def nodes_of(survey: dict, names: list[str]) -> np.ndarray:
    """[N] the (Teff, log g) node of each row of a node survey, as one number."""
    y = survey["y"]
    return np.round(y[:, names.index("teff")]) * 100.0 + np.round(y[:, names.index("logg")] * 100.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-between", action="store_true",
                        help="fit with the stars between the nodes too")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(CONFIG)
    bundle = load_bundle("ob-default")
    names = [t.name for t in bundle.targets]
    label = cfg.calibration.label_index(names)
    surveys = calibration_surveys(cfg, GridSource(cfg, progress=False), bundle)
    fitted = [*CALIBRATION_SURVEYS, *(("between",) if args.with_between else ())]
    node = {s: nodes_of(surveys[s], names) for s in fitted if s != "between"}
    scored = []  # (y, estimate, sigma, snr, node) per left-out node and survey
    for left_out in np.unique(np.concatenate([node["val"], node["test"]])):
        parts = [survey_rows(surveys[s], node[s] != left_out) if s in node else surveys[s] for s in fitted]
        calibration = fit_estimates_calibration(parts, label)
        for split in ("val", "test"):
            rows = survey_rows(surveys[split], node[split] == left_out)
            estimate, sigma, _ = calibrated_estimates(calibration, rows)
            scored.append((rows["y"], estimate, sigma, rows["snr"], np.full(len(rows["y"]), left_out)))
        print(f"node {left_out:.0f} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    y, estimate, sigma, snr, nodes = (np.concatenate(part) for part in zip(*scored, strict=True))
    bins = []
    for lo, hi in SNR_BINS:
        inside = (snr >= lo) & (snr < hi)
        cells = {}
        for k, name in enumerate(names):
            def cover(q: float, rows: np.ndarray = inside, k: int = k) -> float:
                return float(coverage(y[rows, k], estimate[rows, k], sigma[rows, k], q))

            covered = {q: cover(q) for q in BANDS}
            cells[name] = {"coverage68": covered[0.68], "coverage95": covered[0.95],
                           "miss_in_bands": max(abs(covered[q] - q) / band for q, band in BANDS.items()),
                           "coverage68_node_sd": float(np.std([cover(0.68, inside & (nodes == n))
                                                               for n in np.unique(nodes)])),
                           "rmse": float(np.sqrt(np.mean((estimate[inside, k] - y[inside, k]) ** 2)))}
        bins.append({"snr_lo": lo, "snr_hi": hi if np.isfinite(hi) else None, "n": int(inside.sum()),
                     "targets": cells})
    high, bias = snr >= BIAS_MIN_SNR, {}
    for k, name in enumerate(names):
        in_bins = {p: binned_bias(y[high, j], estimate[high, k] - y[high, k], sigma[high, k], BIAS_BINS)
                   for j, p in enumerate(names)}
        worst, se = worst_bias(in_bins.values())
        bias[name] = {"worst_over_median_sigma": worst, "se_over_median_sigma": se, "bins": in_bins}
    name = "unseen_nodes" + ("_with_between" if args.with_between else "")
    result = {"machine": machine(), "model": bundle.manifest["bundle_sha256"][:12], "fitted_on": fitted,
              "nodes": int(len(np.unique(nodes))), "rows": int(len(y)),
              "seconds": round(time.perf_counter() - t0, 1), "bins": bins, "bias": bias}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The estimates' calibration at nodes it has not seen (leave one node out)", "",
             f"`ob-default` (bundle {result['model']}): the calibration fitted on {' + '.join(fitted)} "
             f"without one of the {result['nodes']} validation and test nodes at a time, scored on that "
             f"node's rows; {result['rows']} rows pooled. Per SNR bin and target: 68% / 95% coverage (%), "
             "the worst of the two misses in units of issue 9's band (+-3 / +-2 points; above 1 is out) "
             "and the 68% coverage's standard deviation from node to node.", "",
             f"{result['machine']['cpu']}. Command: `python bench/unseen_nodes.py"
             f"{' --with-between' if args.with_between else ''}` ({result['seconds']:.0f} s).", "",
             "| SNR | rows | " + " | ".join(names) + " | " + " | ".join(f"RMSE {t}" for t in names) + " |",
             "| --- | --- |" + " --- |" * (2 * len(names))]
    for (lo, hi), b in zip(SNR_BINS, bins, strict=True):
        cells = [f"{100 * c['coverage68']:.1f} / {100 * c['coverage95']:.1f} ({c['miss_in_bands']:.2f}; "
                 f"sd {100 * c['coverage68_node_sd']:.1f})" for c in b["targets"].values()]
        rmse = [f"{c['rmse']:.4g}" for c in b["targets"].values()]
        lines.append(f"| {lo:.0f}-{hi:.0f} | {b['n']} | " + " | ".join(cells + rmse) + " |")
    goal = GOALS["bias_over_median_sigma"]
    lines += ["", f"Worst bias over median sigma in {BIAS_BINS} bins of each true parameter, SNR >= "
              f"{BIAS_MIN_SNR:.0f} (goal: below {goal}): " + ", ".join(
                  f"{t} {b['worst_over_median_sigma']:.3f} +- {b['se_over_median_sigma']:.3f}"
                  for t, b in bias.items()) + "."]
    (Path(args.out) / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
