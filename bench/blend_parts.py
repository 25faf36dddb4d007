"""The parts of the shipped estimate (issue #9): the blend, the networks alone and the emulator fit
alone, on the same stars, clean, with a gap in every spectrum and with a continuum ripple in every
spectrum, per SNR bin.

The blend weighs the networks' mean by w and the emulator fit's labels by 1 - w, w from the SNR and
the fit's excess chi^2, and a spectrum with a gap takes the fit alone (`engine.calibration`); a copy
of the manifest without the weights gives the networks alone, one with w = 0 the fit alone. The
spectra: stars at the shipped TLUSTY sample's nodes (the model's test nodes, left out of training),
v sin i 15-450 km/s, SNR 10-400, continuum distortions but no rv error, so that what remains is the
estimator; clean, or with a masked run of 5-30 A in every spectrum (the training surveys draw one on
10% of spectra), or with a continuum ripple of up to 1% in every spectrum (on 30% in training). The
fit leaves a gap's pixels out, and the engine reports the networks' reading of the spectrum with the
gap filled by the fit's model (so on a gap the networks alone echo the fit); the networks learned to
see through a ripple, the fit's model has none. RMSE per part, and the 68% coverage of
each part with the shipped sigmas.

Run: `python bench/blend_parts.py [--n 2400]`. Writes bench/results/blend_parts.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from preprocess_bench import machine
from starcast.catalogs import gridsynth as gs
from starcast.catalogs.grids import read_grid
from starcast.engine.predictor import Model
from starcast.trainers.metrics import ISSUE_SNR_EDGES, coverage

import starcast
from starcast.demo import SAMPLE

RESULTS = Path(__file__).parent / "results"
TARGETS = ("teff", "logg", "vsini")
SNR_BINS = tuple(zip(ISSUE_SNR_EDGES[:-1], ISSUE_SNR_EDGES[1:], strict=True))


SURVEYS = {"clean": {}, "a gap": {"gap_prob": 1.0}, "a ripple": {"ripple_prob": 1.0}}  # in every spectrum


def survey(lib: gs.BroadenedLibrary, n: int, defect: dict, seed: int):
    """(truth labels, input table) of n stars at the library's nodes, with `defect` (Perturbations
    fields) on top of the clean survey."""
    clean = {"ripple_prob": 0.0, "gap_prob": 0.0}
    pert = gs.Perturbations(snr=(ISSUE_SNR_EDGES[0], ISSUE_SNR_EDGES[-1]), vsini=(15.0, 450.0),
                            rv_error_kms=0.0, **{**clean, **defect})
    rng = np.random.default_rng(seed)
    labels = gs.labels_at(lib.nodes[rng.integers(0, len(lib.nodes), n)], pert, rng)  # metals 0
    table = gs.draw_survey(lib, labels, pert, rng).table(lib.obs)
    return labels, table.drop_columns(list(labels))


def parts(model: Model) -> dict[str, Model]:
    """The shipped model and copies whose blend weight is 1 (networks alone) or 0 (fit alone)."""
    manifest = model.bundle.manifest
    calibration = manifest["calibration"]

    def weighted(w: float | None) -> Model:
        changed = {k: v for k, v in calibration.items() if k != "network_weight"}  # None: no blend
        if w is not None:
            changed["network_weight"] = {t: [w] * len(v) for t, v in calibration["network_weight"].items()}
        return Model(replace(model.bundle, manifest={**manifest, "calibration": changed}))

    return {"blend": model, "networks alone": weighted(None), "fit alone": weighted(0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2400, help="spectra per survey")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    models = parts(starcast.load_model())
    lib = gs.BroadenedLibrary.build(read_grid(SAMPLE), gs.Observation(), metals=np.array([0.0]))
    rows = []
    for defect, fields in SURVEYS.items():
        labels, table = survey(lib, args.n, fields, args.seed)
        snr = table.column("snr").to_numpy()
        for name, model in models.items():
            out = model.predict(table, backend="cpu")
            for lo, hi in SNR_BINS:
                sel = (snr >= lo) & (snr < hi)
                rmse = {t: float(np.sqrt(np.nanmean((out.column(t).to_numpy()[sel] - labels[t][sel]) ** 2)))
                        for t in TARGETS}
                rows.append({"survey": defect, "estimate": name, "snr_lo": lo, "snr_hi": hi,
                             "n": int(sel.sum()), "rmse": rmse,
                             "coverage68": {t: coverage(labels[t][sel], out.column(t).to_numpy()[sel],
                                                        out.column(f"{t}_err").to_numpy()[sel], 0.68)
                                            for t in TARGETS}})
    result = {"machine": machine(), "model": models["blend"].bundle.manifest["bundle_sha256"][:12],
              "n": args.n, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "blend_parts.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The shipped estimate's parts: blend, networks alone, emulator fit alone", "",
             f"`ob-default` (bundle {result['model']}), {args.n} stars per survey at its test nodes (the "
             "shipped sample), v sin i 15-450 km/s, SNR 10-400, continuum distortions, no rv error; "
             "clean, with a masked run of 5-30 A in every spectrum, or with a continuum ripple of up to 1% "
             "(period 20-100 A) in every spectrum. RMSE per SNR bin, and the 68% coverage (%) of each "
             "part with the shipped sigmas.", "",
             f"{result['machine']['cpu']}. Command: `python bench/blend_parts.py --n {args.n}` "
             f"({result['seconds']:.0f} s).", "",
             "| spectra | estimate | SNR | n | " + " | ".join(TARGETS) + " | "
             + " | ".join(f"68% {t}" for t in TARGETS) + " |",
             "| --- | --- | --- | --- |" + " --- |" * (2 * len(TARGETS))]
    for r in rows:
        lines.append(f"| {r['survey']} | {r['estimate']} | "
                     f"{r['snr_lo']:.0f}-{r['snr_hi']:.0f} | {r['n']} | "
                     + " | ".join(f"{r['rmse'][t]:.4g}" for t in TARGETS) + " | "
                     + " | ".join(f"{100 * r['coverage68'][t]:.1f}" for t in TARGETS) + " |")
    (Path(args.out) / "blend_parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
