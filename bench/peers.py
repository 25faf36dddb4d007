"""Peers and the limit, side by side (issue #9, item 5): starcast, two chi^2 template fits and the
Cramer-Rao bound on the same spectra of stars at the grid nodes a training config leaves out for test.

Test spectra are drawn with the FULL library (the truth) at the config's `test_nodes`, v sin i uniform
0-450 km/s, an equal number per SNR bin (SNR per observed pixel, log-uniform in the bin), with the
config's continuum distortions, ripple, masks and gaps but no rv error. The chi^2 fits' templates come
from the training nodes only (`trainers.templatefit`): one on the preprocessed spectra (the standard
way, templates preprocessed alike), one on the raw pixels with the continuum fitted jointly. The bound
(raw pixels, continuum marginalised) uses the full library at the truth.
OOD: AUROC of starcast's epistemic sigma for in-grid test spectra against hot stars (32-40 kK, the
simplified generator `catalogs.synth`, beyond the grid's physics) and against SNR 5 spectra.

Run: `python bench/peers.py --model DIR [--per-bin 100] [--config trainers/configs/ob-default.toml]
[--grid GRID.npz] [--cache DIR] [--ripple-prob P] [--note TEXT] [--name peers]`. Writes
bench/results/NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import scipy
import torch
from preprocess_bench import machine
from starcast.catalogs import gridsynth
from starcast.catalogs.schema import FLAGS, Flag
from starcast.catalogs.synth import SynthConfig, arrays_to_table, synth_arrays
from starcast.kernels.preprocess import preprocess
from starcast.trainers import metrics
from starcast.trainers import templatefit as tf
from starcast.trainers.config import load_config
from starcast.trainers.gridsource import GridSource

from starcast import load_model

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SNR_BINS = ((10, 20), (20, 30), (30, 50), (50, 100), (100, 200), (200, 400))
VSINI_MIN = 15.0  # km/s: v sin i is scored for true values above this (below, the resolution hides it)
HOT = {"teff": (32000.0, 40000.0), "logg": (3.0, 4.75)}  # beyond the grid's 15-30 kK
CRB_RATIO_GOAL, CRB_SNR_MIN = 1.3, 50.0  # the issue's goals: RMSE <= 1.3 x the bound at SNR >= 50
# starcast's RMSE over a peer's on the same spectra is given with this central interval of its paired
# bootstrap (the rows drawn again together), which says whether a small lead or lag is more than the
# draw of 200 stars
RATIO_INTERVAL, BOOTSTRAP_DRAWS = 0.90, 4000


def source(config: str, grid: str | None, cache: str | None) -> GridSource:
    """The libraries and nodes of a training config, with the grid file and cache optionally moved."""
    cfg = load_config(config)
    over = {k: str(Path(v).resolve()) for k, v in (("path", grid), ("cache", cache)) if v}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, grid={**cfg.data.grid, **over}))
    return GridSource(cfg, progress=False)


def concat(surveys: list[gridsynth.Survey]) -> gridsynth.Survey:
    fields = {f.name: [getattr(s, f.name) for s in surveys] for f in dataclasses.fields(gridsynth.Survey)}
    labels = fields.pop("labels")
    labels = {k: np.concatenate([d[k] for d in labels]) for k in labels[0]}
    return gridsynth.Survey(labels=labels, **{k: np.concatenate(v) for k, v in fields.items()})


def at_test_nodes(src: GridSource, n: int, snr: tuple[float, float], rng, id_start: int,
                  metals: float = 0.0) -> gridsynth.Survey:
    """n stars at the test nodes (chosen uniformly), v sin i uniform over the config's range, their
    metal lines `metals` dex from the grid's composition."""
    nodes = src.full.nodes[rng.choice(src.held["test"], n)]
    labels = {"teff": nodes[:, 0], "logg": nodes[:, 1], "vsini": rng.uniform(*src.pert.vsini, n),
              "metals": np.full(n, metals)}
    pert = dataclasses.replace(src.pert, snr=tuple(float(s) for s in snr), rv_error_kms=0.0)
    return gridsynth.draw_survey(src.full, labels, pert, rng, id_start=id_start)


def hot_stars(src: GridSource, n: int, seed: int) -> pa.Table:
    """n hot stars per SNR bin from the simplified generator, on the survey's observed grid, rv 0."""
    obs, tables = src.obs, []
    for b, snr in enumerate(SNR_BINS):
        cfg = SynthConfig(n=n, seed=seed + b, start=obs.start, step=obs.step, npix=obs.npix,
                          resolving_power=obs.resolving_power, epsilon=obs.epsilon, vsini=src.pert.vsini,
                          snr=snr, rv=(0.0, 0.0), id_start=b * n, **HOT)
        tables.append(arrays_to_table(synth_arrays(cfg), cfg))
    return pa.concat_tables(tables)


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def scores(model, results: pa.Table) -> dict[str, np.ndarray]:
    """Epistemic sigma per target in units of the label's spread (the manifest's std), and their sum."""
    out = {t.name: column(results, f"{t.name}_err_epistemic") / t.std for t in model.targets}
    out["sum"] = sum(out.values())
    return out


def summary(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray | None) -> dict:
    r = mean - y
    out = {"n": int(len(y)), "rmse": float(np.sqrt(np.mean(r**2))), "bias": float(np.mean(r))}
    if sigma is not None:
        out.update(coverage_68=metrics.coverage(y, mean, sigma, 0.68),
                   coverage_95=metrics.coverage(y, mean, sigma, 0.95), median_sigma=float(np.median(sigma)))
    return out


def rmse_ratio(error: np.ndarray, peer_error: np.ndarray) -> dict:
    """RMSE(error) / RMSE(peer_error) of errors on the same rows, with its RATIO_INTERVAL interval over
    BOOTSTRAP_DRAWS paired bootstrap draws of the rows (seeded: the same rows draw the same)."""
    draws = np.random.default_rng(0).integers(0, len(error), (BOOTSTRAP_DRAWS, len(error)))
    ratios = np.sqrt(np.mean(error[draws] ** 2, axis=1) / np.mean(peer_error[draws] ** 2, axis=1))
    tail = (1.0 - RATIO_INTERVAL) / 2
    return {"ratio": float(np.sqrt(np.mean(error**2) / np.mean(peer_error**2))),
            "interval": [float(q) for q in np.quantile(ratios, [tail, 1.0 - tail])]}


def per_bin(truth, snr, est: dict, crb: np.ndarray, crb_pre: np.ndarray,
            crb_free: np.ndarray | None) -> list[dict]:
    """Per SNR bin and target: each method's accuracy and coverage, the bound's RMS (and with the
    metals free, `crb_free`, for a model that estimates them), and the goals (with starcast's RMSE over
    each peer's, `rmse_ratio`)."""
    rows = []
    for lo, hi in SNR_BINS:
        in_bin = (snr >= lo) & (snr < hi)
        for k, name in enumerate(tf.PARAMS):
            sel = in_bin & ((truth[:, k] > VSINI_MIN) if name == "vsini" else True)
            row = {"snr_lo": lo, "snr_hi": hi, "target": name}
            for method, (mean, sigma) in est.items():
                row[method] = summary(truth[sel, k], mean[sel, k], sigma[sel, k])
            row["crb_rms"] = float(np.sqrt(np.mean(crb[sel, k] ** 2)))
            row["crb_preprocessed_diag_rms"] = float(np.sqrt(np.mean(crb_pre[sel, k] ** 2)))
            if crb_free is not None:
                row["crb_metals_free_rms"] = float(np.sqrt(np.mean(crb_free[sel, k] ** 2)))
            for method in est:
                row[method]["rmse_over_crb"] = row[method]["rmse"] / row["crb_rms"]
                z = (est[method][0][sel, k] - truth[sel, k]) / crb[sel, k]
                row[method]["rms_error_over_crb_per_spectrum"] = float(np.sqrt(np.mean(z**2)))
            for method in PEERS.keys() & est.keys():
                row[f"starcast_not_worse_than_{method}"] = row["starcast"]["rmse"] <= row[method]["rmse"]
                row["starcast"][f"rmse_over_{method}"] = rmse_ratio(
                    est["starcast"][0][sel, k] - truth[sel, k], est[method][0][sel, k] - truth[sel, k])
            if crb_free is not None:
                free = row["starcast"]["rmse"] / row["crb_metals_free_rms"]
                row["starcast"]["rmse_over_crb_metals_free"] = free
            if lo >= CRB_SNR_MIN:
                row["starcast_within_1.3_crb"] = row["starcast"]["rmse_over_crb"] <= CRB_RATIO_GOAL
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model bundle (a directory or a shipped name)")
    parser.add_argument("--config", default=str(ROOT / "trainers/configs/ob-default.toml"))
    parser.add_argument("--grid", help="the grid file, if not where the config says")
    parser.add_argument("--cache", help="the broadened library's cache folder, if not the config's")
    parser.add_argument("--per-bin", type=int, default=100, help="test spectra per SNR bin")
    parser.add_argument("--ood-per-bin", type=int, help="hot stars per SNR bin, and SNR 5 spectra in "
                        "all (default: --per-bin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ripple-prob", type=float, help="the fraction of test spectra with a continuum "
                        "ripple (default: the config's); 0 shows what the ripple costs every method")
    parser.add_argument("--metals", type=float, default=0.0, help="dex: the test stars' metal lines against "
                        "the grid's composition (a rung of the config's library; the chi^2 templates stay "
                        "at the grid's composition, as a standard fit's would)")
    parser.add_argument("--note", default="", help="a line for the markdown (e.g. which bundle this is)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="peers", help="the results' file name (NAME.json, NAME.md)")
    args = parser.parse_args()
    n_ood = args.ood_per_bin or args.per_bin
    timing, t0 = {}, time.perf_counter()

    src = source(args.config, args.grid, args.cache)
    if args.ripple_prob is not None:
        src.pert = dataclasses.replace(src.pert, ripple_prob=args.ripple_prob)
    model = load_model(args.model, backend="cpu")
    if model.settings != src.settings or not np.array_equal(model.grid.values(), src.grid_values):
        raise SystemExit("the model's preprocessing or grid differs from the config's: pass its config")
    rng = np.random.default_rng(args.seed)
    test = concat([at_test_nodes(src, args.per_bin, snr, rng, b * args.per_bin, args.metals)
                   for b, snr in enumerate(SNR_BINS)])
    table = test.table(src.obs)
    truth = np.stack([test.labels[k] for k in tf.PARAMS], axis=1)
    timing["draw_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    res = model.predict(table, backend="cpu")
    timing["starcast_s"] = time.perf_counter() - t
    ok = (column(res, FLAGS).astype(int) & Flag.PREPROCESS_FAILED) == 0
    star = np.stack([column(res, k) for k in tf.PARAMS], axis=1)
    star_err = np.stack([column(res, f"{k}_err") for k in tf.PARAMS], axis=1)

    pre = preprocess(table, src.grid_values, src.settings)
    ok &= (pre.flags & Flag.PREPROCESS_FAILED) == 0
    noise = tf.noise_level(test.flux, test.flux_err, test.mask)
    fitter = tf.TemplateFitter(tf.Templates(src.train, src.grid_values, src.settings))
    t = time.perf_counter()
    for level in range(len(fitter.bank_snr)):
        fitter.bank(level)
    timing["chi2_bank_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = fitter.fit(pre.x[ok], pre.ivar[ok], noise[ok], test.mask[ok])
    timing["chi2_fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cont = tf.ContinuumFitter(src.train, degree=src.pert.continuum_degree).fit(
        test.flux[ok], test.flux_err[ok], test.mask[ok], fit.theta)
    timing["chi2_cont_fit_s"] = time.perf_counter() - t
    oracle = tf.ContinuumFitter(src.full, degree=src.pert.continuum_degree).fit(
        test.flux[ok], test.flux_err[ok], test.mask[ok], cont.theta)
    free = None
    if len(src.train.metals) > 1:
        t = time.perf_counter()
        free = tf.ContinuumFitter(src.train, degree=src.pert.continuum_degree, metals_free=True).fit(
            test.flux[ok], test.flux_err[ok], test.mask[ok], fit.theta)
        timing["chi2_cont_free_fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ivar_obs = np.where(test.mask[ok], 0.0, test.snr[ok, None].astype(np.float64) ** 2)
    metals = test.labels["metals"][ok]
    crb = tf.cramer_rao(src.full, truth[ok], ivar_obs, src.pert.continuum_degree, metals=metals)
    crb_free = tf.cramer_rao(src.full, truth[ok], ivar_obs, src.pert.continuum_degree, metals=metals,
                             metals_free=True) if len(src.full.metals) > 1 else None
    full = tf.Templates(src.full, src.grid_values, src.settings)
    jac = full.jacobian(truth[ok], noise[ok], test.mask[ok])
    crb_pre = tf.sigma_from_fisher(tf.fisher(jac, pre.ivar[ok]))
    timing["crb_s"] = time.perf_counter() - t

    est = {"starcast": (star[ok], star_err[ok]), "chi2": (fit.theta, fit.sigma),
           "chi2_cont": (cont.theta, cont.sigma), "chi2_cont_oracle": (oracle.theta, oracle.sigma)}
    if free is not None:
        est["chi2_cont_free"] = (free.theta[:, :3], free.sigma[:, :3])
    bins = per_bin(truth[ok], test.snr[ok], est, crb, crb_pre, crb_free)

    t = time.perf_counter()
    in_scores = scores(model, res.filter(pa.array(ok)))
    hot = model.predict(hot_stars(src, n_ood, args.seed + 100), backend="cpu")
    low = at_test_nodes(src, n_ood, (5.0, 5.0), rng, 10**6)
    low = model.predict(low.table(src.obs), backend="cpu")
    ood = {}
    for name, out in (("hot_32_40kK", hot), ("snr_5", low)):
        s = scores(model, out)
        flagged = (column(out, FLAGS).astype(int) & Flag.HIGH_EPISTEMIC) != 0
        ood[name] = {"n": out.num_rows, "flagged_high_epistemic": float(flagged.mean()),
                     "auroc": {k: metrics.auroc(in_scores[k], s[k]) for k in s}}
    ood["in_grid_flagged_high_epistemic"] = float(((column(res, FLAGS).astype(int) & Flag.HIGH_EPISTEMIC)
                                                  != 0)[ok].mean())
    timing["ood_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0

    snr_ok = test.snr[ok]
    fits = {name: f for name, f in (("chi2", fit), ("chi2_cont", cont), ("chi2_cont_free", free))
            if f is not None}
    chi2_fit = [{"snr_lo": lo, "snr_hi": hi, **{
        f"{name}_{key}": float(np.median(value[sel])) for name, f in fits.items()
        for key, value in (("chi2_per_pixel", f.chi2 / f.npix), ("template_evaluations", f.nfev))}}
        for lo, hi in SNR_BINS for sel in [(snr_ok >= lo) & (snr_ok < hi)]]
    info = {
        "machine": {**machine(), "numba_threads": numba.get_num_threads(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "numba": numba.__version__,
                     "torch": torch.__version__, "pyarrow": pa.__version__,
                     "starcast": metadata.version("starcast"), "git": git_version()},
        "command": shlex.join(["python", "bench/peers.py", *sys.argv[1:]]),
        "note": args.note,
        "model": {"path": str(args.model), "name": model.name, "bundle_sha256": model.bundle.sha256,
                  "weights_sha256": model.bundle.weights_sha256,
                  "epochs_run": model.bundle.manifest.get("provenance", {}).get("epochs_run")},
        "config": {"file": str(args.config), "test_nodes": src.full.nodes[src.held["test"]].tolist(),
                   "training_nodes": len(src.train.nodes), "per_bin": args.per_bin, "ood_per_bin": n_ood,
                   "seed": args.seed, "metals": args.metals, "snr_bins": SNR_BINS,
                   "vsini_scored_above": VSINI_MIN,
                   "perturbations": {**dataclasses.asdict(src.pert), "rv_error_kms": 0.0},
                   "chi2_bank": {"nodes": len(src.train.nodes), "snr_levels": list(fitter.bank_snr),
                                 "vsini_rungs": len(src.train.vsini[::fitter.bank_step])},
                   "hot_stars": HOT, "rows": int(len(ok)), "rows_failed_preprocessing": int((~ok).sum())},
        "timing": timing,
        "bins": bins,
        "chi2_fit": chi2_fit,
        "ood": ood,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(info))
    print(markdown(info))


def git_version() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


PEERS = {"chi2": "chi^2 (preprocessed)", "chi2_cont": "chi^2 (joint continuum)",
         "chi2_cont_free": "chi^2 (joint continuum, metals free)"}
METHODS = {"starcast": "starcast", **PEERS}
ORACLE = {"chi2_cont_oracle": "chi^2 (joint continuum, full library)"}


def markdown(info: dict) -> str:
    m, c, tm, mod = info["machine"], info["config"], info["timing"], info["model"]
    units = {"teff": ("K", 0), "logg": ("dex", 3), "vsini": ("km/s", 1)}
    yes = lambda v: "-" if v is None else ("yes" if v else "**no**")  # noqa: E731

    def versus(not_worse: bool, r: dict) -> str:
        """A peer goal's cell: met or not, 'within the draw' where the ratio's interval holds 1."""
        verdict = "yes" if not_worse else ("within the draw" if r["interval"][0] <= 1.0 else "**no**")
        return f"{verdict} ({r['ratio']:.3f}; {r['interval'][0]:.3f}-{r['interval'][1]:.3f})"

    lines = ["# Peers and the limit: starcast, chi^2 template fits, the Cramer-Rao bound", "",
             f"Model `{mod['path']}` ({mod['name']}, {mod['epochs_run']} epochs, "
             f"bundle sha256 {mod['bundle_sha256'][:12]}, weights sha256 {mod['weights_sha256'][:12]}). "
             f"{info['note']}".strip(), "",
             f"{c['per_bin']} spectra per SNR bin at the test nodes {c['test_nodes']} (left out of "
             "training), drawn with the full library; v sin i uniform 0-450 km/s, scored where true > "
             f"{c['vsini_scored_above']:g} km/s; continuum distortions and ripple as `Perturbations()` "
             "defaults, no rv error. The chi^2 fits use templates from the "
             f"{c['training_nodes']} training nodes and delta chi^2 = 1 errors (marginalised). "
             "*chi^2 (preprocessed)*: the standard fit of the preprocessed spectrum by preprocessed "
             "templates (sum of ivar (x - template)^2 on the model grid). *chi^2 (joint continuum)*: the raw "
             "observed "
             "pixels fitted by template x cubic polynomial, started from the first; *full library*: the "
             "same with templates from all nodes, test nodes included (the physics known exactly: what "
             "remains is noise, ripple and masks); *metals free*: the same from the training nodes with "
             "the metals fitted too (templates at every metal rung of the library), an estimator that "
             "knows what starcast knows. "
             + (f"The test stars' metal lines are {c['metals']:+g} dex from the grid's composition; "
                "the chi^2 templates (the full library's too) are of the grid's own, as a standard "
                "fit's would be. " if c.get("metals") else
                "The test stars are of the grid's own composition; the chi^2 fits but the metals-free "
                "one know it (their templates are). ")
             + "starcast does not know the composition (it estimates `metals` too, where its "
             "library spans several). CRB: per spectrum on "
             "the raw pixels, the continuum (cubic) marginalised, at the truth with the full library; "
             "*metals free*: the metals marginalised too, the bound of an estimator that does not know "
             "the composition; "
             "`CRB_pre`: the same from the preprocessed model with its ivar taken as independent (it "
             "understates the bound). cov68/cov95: coverage of the 68%/95% intervals.", "",
             f"{m['cpu']}, {m['logical_cores']} logical cores, load (1 min) "
             f"{m['load_average_1m_before']:.1f}. Command: `{info['command']}` "
             f"(git {info['versions']['git']}). Time: starcast {tm['starcast_s']:.1f} s; chi^2 bank "
             f"{tm['chi2_bank_s']:.0f} s + fits {tm['chi2_fit_s']:.0f} s; joint-continuum fits "
             f"{tm['chi2_cont_fit_s']:.0f} s"
             + (f" ({tm['chi2_cont_free_fit_s']:.0f} s with the metals free)"
                if "chi2_cont_free_fit_s" in tm else "")
             + f"; bounds {tm['crb_s']:.1f} s (all for "
             f"{c['rows'] - c['rows_failed_preprocessing']} spectra).", ""]
    methods = {k: v for k, v in METHODS.items() if k in info["bins"][0]}
    peers = [k for k in PEERS if k in methods]
    fits = [k for k in PEERS if f"{k}_chi2_per_pixel" in info["chi2_fit"][0]]
    for name, (unit, dec) in units.items():
        rows = [r for r in info["bins"] if r["target"] == name]
        formats = (("rmse", f".{dec}f"), ("bias", f"+.{dec}f"), ("coverage_68", ".2f"),
                   ("coverage_95", ".2f"))
        head = ["SNR", "n"] + [f"{label} {col}" for label in methods.values()
                               for col in ("RMSE", "bias", "cov68", "cov95")]
        body = [[f"{r['snr_lo']}-{r['snr_hi']}", r["starcast"]["n"]]
                + [f"{r[k][col]:{fmt}}" for k in methods for col, fmt in formats] for r in rows]
        lines += [f"## {name} ({unit})", "", *table(head, body), ""]
        free = "crb_metals_free_rms" in rows[0]
        head = (["SNR", "CRB (RMS)", "CRB_pre (RMS)"] + (["CRB, metals free (RMS)"] if free else [])
                + [f"{label} / CRB" for label in {**methods, **ORACLE}.values()]
                + (["starcast / CRB (metals free)"] if free else [])
                + [f"starcast <= {METHODS[k]} (RMSE ratio; {RATIO_INTERVAL:.0%} interval)" for k in peers]
                + ["starcast <= 1.3 CRB"])
        body = [[f"{r['snr_lo']}-{r['snr_hi']}", f"{r['crb_rms']:.{dec + 1}f}",
                 f"{r['crb_preprocessed_diag_rms']:.{dec + 1}f}"]
                + ([f"{r['crb_metals_free_rms']:.{dec + 1}f}"] if free else [])
                + [f"{r[k]['rmse_over_crb']:.2f}" for k in {**methods, **ORACLE}]
                + ([f"{r['starcast']['rmse_over_crb_metals_free']:.2f}"] if free else [])
                + [versus(r[f"starcast_not_worse_than_{k}"], r["starcast"][f"rmse_over_{k}"]) for k in peers]
                + [yes(r.get("starcast_within_1.3_crb"))] for r in rows]
        lines += [*table(head, body), ""]
    head = ["SNR"] + [f"{METHODS[k]}: median {col}" for k in fits for col in ("chi^2 / pixel", "evaluations")]
    body = [[f"{r['snr_lo']}-{r['snr_hi']}"] + [f"{r[f'{k}_{col}']:{fmt}}" for k in fits for
                                                col, fmt in (("chi2_per_pixel", ".2f"),
                                                             ("template_evaluations", ".0f"))]
            for r in info["chi2_fit"]]
    lines += ["## The chi^2 fits", "", *table(head, body)]
    methods = {**methods, **ORACLE}
    head = ["SNR"] + [f"{t}: {label}" for t in units for label in methods.values()]
    body = [[f"{lo}-{hi}"] + [f"{r[k]['rms_error_over_crb_per_spectrum']:.2f}" for t in units
                              for r in info["bins"] if (r["snr_lo"], r["target"]) == (lo, t) for k in methods]
            for lo, hi in SNR_BINS]
    lines += ["", "## RMS over spectra of error / CRB (1 for an efficient estimator; less swayed than RMSE / "
              "RMS(CRB) by the few spectra with a wide bound, e.g. fast rotators)", "", *table(head, body)]
    ood = info["ood"]
    lines += ["", "## Out of distribution: AUROC of starcast's epistemic sigma against in-grid test spectra",
              "", "Score: epistemic sigma / the label's std (manifest), summed over targets or per target. "
              f"In-grid spectra flagged HIGH_EPISTEMIC: {ood['in_grid_flagged_high_epistemic']:.1%}.", "",
              "| set | n | AUROC (sum) | teff | logg | vsini | flagged HIGH_EPISTEMIC |", "| --- " * 7 + "|"]
    for name in ("hot_32_40kK", "snr_5"):
        o = ood[name]
        a = o["auroc"]
        lines.append(f"| {name} | {o['n']} | {a['sum']:.3f} | {a['teff']:.3f} | {a['logg']:.3f} | "
                     f"{a['vsini']:.3f} | {o['flagged_high_epistemic']:.1%} |")
    return "\n".join(lines) + "\n"


def table(head: list, body: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(map(str, row)) + " |" for row in [head, ["---"] * len(head), *body]]


if __name__ == "__main__":
    main()
