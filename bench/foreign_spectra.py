"""The shipped model on spectra it did not make (issue #9's judging): its test nodes (the shipped
TLUSTY sample, left out of training) broadened by PyAstronomy rather than by our generator
(`fastRotBroad` over 25 A pieces, so that its one kernel per call follows the wavelength, epsilon 0.6;
`instrBroadGaussFast`, R = 20 000), shifted by rv +-100 km/s given to no one (the engine estimates
it), averaged over pixels finer than the training spectra's (0.05 A by default; or, with `--sampled`,
the flux at each pixel's centre, as a spectrum interpolated onto a grid, the file stating
`starcast.pixels: sampled`) and given photon noise (sigma proportional to sqrt(flux); SNR 10-400 per
0.4 A model pixel, log-uniform). Two surveys: v sin i 3-450 km/s and slow rotators, 3-60 km/s.

Each is predicted by the shipped model, by a copy without `input.training_pixels`, which smooths
finer pixels up to the training spectra's mean response and resamples them where they fall instead of
remaking them as the training spectra's (`kernels.preprocess`), and by one without
`input.response_variance` either, which takes no pixel response into account: finer pixels' sharper
lines are left as they are, and the fit does not see its spectra through coarser pixels' broader
response (`Emulator.blur`).
With `--sampled`, also the shipped model on the same file without that statement (taking the samples
for pixel means). With `--degraded R`, the stars are observed as by a spectrograph of resolving power R
on the grid's 0.01 A pixels, photon noise added there, and then degraded as a user degrades an archive
spectrum: convolved down to R 20 000 (a Gaussian of the width R 20 000 lacks beyond R) and averaged onto
the `--step` pixels, so that the noise is correlated over neighbouring pixels; predicted by the shipped
model without flux_err (noise from the flux) and with each pixel's own sigma as flux_err (which leaves
the correlation out). RMSE, bias and the 68% / 95% coverage per SNR bin (v sin i over true > 15 km/s),
the share of rows flagged, the median chi^2.

Run: `python bench/foreign_spectra.py [--n 600] [--step 0.05] [--sampled | --degraded 48000]`. Writes
bench/results/foreign_spectra_<step>A[_sampled | _degraded<R>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from preprocess_bench import machine
from PyAstronomy import pyasl
from starcast.catalogs.grids import read_grid
from starcast.catalogs.physics import C_KMS, pixel_average
from starcast.catalogs.schema import CHI2, INFORMATIONAL, META_PIXELS, WavelengthGrid, spectrum_array
from starcast.engine.predictor import Model

import starcast
from starcast.demo import SAMPLE

RESULTS = Path(__file__).parent / "results"
TARGETS = ("teff", "logg", "vsini")
SNR_BINS = ((10.0, 30.0), (30.0, 100.0), (100.0, 400.0))
SURVEYS = {"v sin i 3-450 km/s": 450.0, "slow rotators, 3-60 km/s": 60.0}  # name -> largest v sin i
RESOLVING_POWER = 20000.0  # the model's
FWHM_SIGMAS = 2.0 * np.sqrt(2.0 * np.log(2.0))  # a Gaussian's FWHM in sigmas


def rotate(wavelength: np.ndarray, flux: np.ndarray, vsini: float, piece: float = 25.0,
           pad: float = 10.0) -> np.ndarray:
    """PyAstronomy's fastRotBroad (one kernel per call, at the call's mean wavelength) over `piece` A
    at a time, each padded by `pad` A: its width follows the wavelength to within 0.3%."""
    out = np.empty_like(flux)
    for lo in np.arange(wavelength[0], wavelength[-1], piece):
        core = (wavelength >= lo) & (wavelength < lo + piece)
        window = (wavelength >= lo - pad) & (wavelength < lo + piece + pad)
        out[core] = pyasl.fastRotBroad(wavelength[window], flux[window], 0.6, vsini)[core[window]]
    return out


def instrument(wavelength: np.ndarray, flux: np.ndarray, resolving_power: float) -> np.ndarray:
    """PyAstronomy's Gaussian instrumental profile of `resolving_power` on an equidistant grid."""
    return pyasl.instrBroadGaussFast(wavelength, flux, resolving_power, edgeHandling="firstlast", equid=True,
                                     maxsig=6.0)


def kept_sigma(sigma: float, box: int) -> float:
    """The noise sigma a pixel keeps, per unit white noise, after a Gaussian of `sigma` pixels and the
    mean of `box` of them: sqrt(sum of the combined weights squared)."""
    x = np.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    gaussian = np.exp(-0.5 * (x / sigma) ** 2)
    weights = np.convolve(gaussian / gaussian.sum(), np.full(box, 1.0 / box))
    return float(np.sqrt(np.sum(weights**2)))


def survey(n: int, step: float, vsini_max: float, seed: int, sampled: bool = False,
           degraded: float | None = None) -> tuple[dict, pa.Table]:
    """(truth, catalog table) of n stars at the sample's nodes observed as the module says (`sampled`:
    the flux at the pixels' centres, so stated in the file; `degraded`: observed at that resolving
    power on the grid's pixels and degraded to the model's, `flux_err` each pixel's own sigma)."""
    sample, rng = read_grid(SAMPLE), np.random.default_rng(seed)
    wl = sample.wavelength
    grid_step = wl[1] - wl[0]
    pixels = np.arange(4000.0, 4800.0 + step / 2, step)
    edges = np.concatenate([pixels - step / 2, pixels[-1:] + step / 2])
    if degraded:  # the Gaussian R 20 000 lacks beyond `degraded`, and the sigma an output pixel keeps
        lacking = 1.0 / np.sqrt(1.0 / RESOLVING_POWER**2 - 1.0 / degraded**2)
        spread = kept_sigma(4400.0 / lacking / FWHM_SIGMAS / grid_step, round(step / grid_step))
    truth = {k: np.empty(n) for k in ("teff", "logg", "vsini", "rv", "snr")}
    flux, err = np.empty((n, len(pixels)), np.float32), np.empty((n, len(pixels)), np.float32)
    for i in range(n):
        node = rng.integers(len(sample.flux))
        vsini, rv = rng.uniform(3.0, vsini_max), rng.uniform(-100.0, 100.0)
        snr = np.exp(rng.uniform(np.log(10.0), np.log(400.0)))
        rotated, shifted = rotate(wl, sample.flux[node].astype(np.float64), vsini), wl * (1.0 + rv / C_KMS)
        if degraded:
            fine = np.interp(wl, shifted, instrument(wl, rotated, degraded))  # on the grid's pixels
            fine += np.sqrt(np.clip(fine, 0.01, None) * 0.4 / grid_step) / snr * rng.standard_normal(len(wl))
            flux[i] = pixel_average(wl, instrument(wl, fine, lacking), edges)
            err[i] = np.sqrt(np.clip(flux[i], 0.01, None) * 0.4 / grid_step) / snr * spread
        else:
            broad = instrument(wl, rotated, RESOLVING_POWER)
            observed = np.interp(pixels, shifted, broad) if sampled else pixel_average(shifted, broad, edges)
            err[i] = np.sqrt(np.clip(observed, 0.01, None)) * np.sqrt(0.4 / step) / snr
            flux[i] = observed + err[i] * rng.standard_normal(len(pixels))
        labels = (sample.params["teff"][node], sample.params["logg"][node], vsini, rv, snr)
        for key, value in zip(truth, labels, strict=True):
            truth[key][i] = value
    table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "flux": spectrum_array(flux, len(pixels)),
                      "flux_err": spectrum_array(err, len(pixels))})
    metadata = {"starcast.wavelength": WavelengthGrid.linear(4000.0, step, len(pixels), "air").to_json()}
    return truth, table.replace_schema_metadata(metadata | ({META_PIXELS: "sampled"} if sampled else {}))


def without(model: Model, *keys: str) -> Model:
    """`model` whose manifest's `input` states none of `keys`."""
    inputs = {k: v for k, v in model.bundle.input.items() if k not in keys}
    return Model(replace(model.bundle, manifest={**model.bundle.manifest, "input": inputs}))


def scores(truth: dict, out: pa.Table) -> dict:
    flags = out.column("flags").to_numpy()
    result = {"flagged": float(np.mean((flags & ~int(INFORMATIONAL)) != 0)),
              "median_chi2": float(np.nanmedian(out.column(CHI2).to_numpy())), "bins": []}
    for lo, hi in SNR_BINS:
        row = {"snr_lo": lo, "snr_hi": hi}
        for t in TARGETS:
            y, m, s = truth[t], out.column(t).to_numpy(), out.column(f"{t}_err").to_numpy()
            sel = (truth["snr"] >= lo) & (truth["snr"] < hi) & np.isfinite(m)
            sel &= (y > 15) if t == "vsini" else True
            z = np.abs(m[sel] - y[sel]) / s[sel]
            row[t] = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean((m[sel] - y[sel]) ** 2))),
                      "bias": float(np.mean(m[sel] - y[sel])), "cov68": float(np.mean(z < 1.0)),
                      "cov95": float(np.mean(z < 1.96))}
        result["bins"].append(row)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600, help="spectra per survey")
    parser.add_argument("--step", type=float, default=0.05, help="pixel width, Angstrom")
    parser.add_argument("--sampled", action="store_true", help="pixels sampled, not averaged")
    parser.add_argument("--degraded", type=float, default=None, metavar="R",
                        help="observed at resolving power R on 0.01 A pixels, then degraded to R 20 000")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    shipped = starcast.load_model()
    models = {"shipped": shipped, "not remade": without(shipped, "training_pixels"),
              "no pixel response": without(shipped, "training_pixels", "response_variance")}
    runs = []
    for k, (name, vsini_max) in enumerate(SURVEYS.items()):
        truth, table = survey(args.n, args.step, vsini_max, args.seed + k, args.sampled, args.degraded)
        cases = [(label, model, table) for label, model in models.items()]
        if args.degraded:
            cases = [("shipped, no flux_err", shipped, table.drop_columns(["flux_err"])),
                     ("shipped, flux_err per pixel", shipped, table)]
        if args.sampled:
            unstated = {k: v for k, v in table.schema.metadata.items() if k != META_PIXELS.encode()}
            cases.append(("shipped, pixels not stated", shipped, table.replace_schema_metadata(unstated)))
        for label, model, t in cases:
            out = model.predict(t, backend="cpu")
            runs.append({"survey": name, "model": label, **scores(truth, out)})
    result = {"machine": machine(), "model": shipped.bundle.manifest["bundle_sha256"][:12], "n": args.n,
              "step": args.step, "sampled": args.sampled, "degraded": args.degraded, "seed": args.seed,
              "seconds": round(time.perf_counter() - t0, 1), "runs": runs}
    stem = (f"foreign_spectra_{args.step:g}A" + ("_sampled" if args.sampled else "")
            + (f"_degraded{args.degraded:g}" if args.degraded else ""))
    flags = ((" --sampled" if args.sampled else "")
             + (f" --degraded {args.degraded:g}" if args.degraded else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The shipped model on spectra broadened and sampled by someone else", "",
             f"`ob-default` (bundle {result['model']}), {args.n} stars per survey at its test nodes "
             f"(the shipped sample) broadened by PyAstronomy, rv +-100 km/s not given, {args.step} A "
             + ("pixels sampled at their centres (stated: `starcast.pixels`)" if args.sampled else "pixels")
             + (f" (observed at R {args.degraded:g} on 0.01 A pixels with photon noise there, then convolved"
                " to R 20 000 and averaged onto these)" if args.degraded else "")
             + ", photon noise, SNR 10-400 per 0.4 A. RMSE, bias and 68% / 95% coverage (v sin i: "
             "true > 15 km/s); `not remade`: pixels as fine as the training spectra's smoothed up to "
             "their mean response and resampled where they fall, not remade as theirs; `no pixel "
             "response`: the pixels' response not taken into account (finer ones neither remade nor "
             "smoothed, coarser ones not seen through by the emulator's fit).", "",
             f"{result['machine']['cpu']}. Command: `python bench/foreign_spectra.py --n {args.n} "
             f"--step {args.step}{flags}` ({result['seconds']:.0f} s).", "",
             "| survey | model | flagged | median chi2 | SNR | " + " | ".join(TARGETS) + " |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(TARGETS)]
    for run in runs:
        for row in run["bins"]:
            cells = [f"{row[t]['rmse']:.4g} ({row[t]['bias']:+.3g}; {100 * row[t]['cov68']:.0f}% / "
                     f"{100 * row[t]['cov95']:.0f}%)" for t in TARGETS]
            lines.append(f"| {run['survey']} | {run['model']} | {100 * run['flagged']:.1f}% | "
                         f"{run['median_chi2']:.2f} | {row['snr_lo']:.0f}-{row['snr_hi']:.0f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Cells: RMSE (bias; 68% / 95% coverage)."]
    (Path(args.out) / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
