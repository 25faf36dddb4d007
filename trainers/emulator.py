"""Train the emulator of a model bundle (`starcast.engine.emulator`) from the config its ensemble was
trained on, and add it to the bundle: `python -m starcast.trainers.emulator CONFIG.toml BUNDLE_DIR`.

Training spectra are stars between the training nodes observed with the config's perturbations at a
very high SNR and without ripple, masks or gaps, preprocessed by the engine exactly as data are, so
the emulator learns what the engine's continuum normalisation leaves of the low-order distortions
(what remains, a low-order polynomial per spectrum, the chi^2 fits out: `engine.emulator`). The MLP
predicts the leading principal components of those spectra (folded into its last layer at export).
Its per-pixel error is measured at the validation nodes, left out of its training (with a factor per
row that follows v sin i: sharp lines are harder to emulate), and scaled so that the engine's median
chi^2 on a clean validation survey is 1 at the highest SNR; the thresholds above which the fit fits each band
(`engine.emulator.BANDS`: diffuse bands, nebular lines) and the MODEL_MISMATCH thresholds are quantiles of the
bands' statistics, the ripple statistic, the chi^2 (per cell of SNR and v sin i; apart for the survey without
flux_err, whose noise the engine then estimates) and the veiling and broadening statistics on
that survey.
With the emulator in place, a model that sees its SNR has its SNR-conditional calibration fitted
again, for an estimate that blends the network's mean with the emulator fit's labels
(`calibrate_estimates`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..catalogs import gridsynth
from ..catalogs.schema import FLUX, FLUX_ERR, SNR, Flag, spectrum_array, table_grid
from ..engine.bundle import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Bundle,
    load_bundle,
    manifest_sha256,
    save_bundle,
    seal,
    sha256_file,
)
from ..engine.calibration import Calibration, handled_defect
from ..engine.emulator import BANDS, Emulator, Fit, Threshold, save_emulator
from ..engine.predictor import Model
from ..errors import EXIT_ERROR, StarcastError
from ..kernels.preprocess import preprocess
from .calibrate import epistemic_thresholds, equal_count_bins, fit_snr_calibration
from .config import TrainConfig, load_config
from .gridsource import GridSource
from .metrics import ISSUE_SNR_EDGES, coverage_in_bins
from .pipeline import split_metrics

SNR_BINS = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0)  # edges of the SNR bins of the chi^2 report
SIGMA_SNR = 200.0  # sigma_emu is scaled to a median chi^2 of 1 at and above this SNR (`calibrate`)
SPLIT_SEEDS = {"train": 11, "val": 12, "test": 13, "val_clean": 14, "test_clean": 15, "understated": 16,
               "beyond_continuum": 17}
# The estimates' calibration also sees the validation survey with each row's flux_err divided by a
# factor uniform in this range, so that the scales, read at the SNR the fit's chi^2 says, cover
# spectra whose noise is understated (as real flux errors often are; `calibrate_estimates`).
UNDERSTATED_NOISE = (1.0, 1.5)
# ... and once more with a continuum of more shape than the fit's freest (`Emulator.freer_degree`): a
# Legendre term of one of the next degrees, its amplitude uniform within +- this, so that the
# inflation with the fit's misfit is fitted on misfits that bend the labels, where clean spectra have
# none to fit it on (ob-default without, before the fit freed its continuum: 1% of P_4 to P_6 covered
# 4-44% in Teff and log g).
BEYOND_CONTINUUM_TERMS = 3
BEYOND_CONTINUUM_AMPLITUDE = 0.01
# The surveys of `calibration_surveys` the estimates' calibration is fitted on: not `between`
# (`calibrate_estimates`).
CALIBRATION_SURVEYS = ("val", "test", "understated", "beyond")
# The emulator's error per row follows this label, measured in these bins (`emulator_error`): sharp
# lines are harder to emulate (ob-default's factor of sigma: 1.73 at 5 km/s, 0.85 at 380 km/s).
SIGMA_LABEL = "vsini"
SIGMA_EDGES = (0.0, 10.0, 20.0, 30.0, 45.0, 70.0, 100.0, 150.0, 220.0, 320.0, 450.0)
# The chi^2 threshold is a quantile per cell of up to THRESHOLD_SNR_BINS equal-count bins of log10 SNR
# and these bins of SIGMA_LABEL (`chi2_threshold`): on ob-default's clean validation survey the 99.25th
# percentile of the chi^2 beyond the noise is 1.05-1.10 at every v sin i up to SNR ~70, but 1.38 for
# sharp lines (8 km/s) at SNR ~500, where the emulator's error dominates the noise. As many SNR bins
# as leave every cell THRESHOLD_CELL_ROWS rows.
THRESHOLD_EDGES = (0.0, 15.0, 60.0, 200.0, math.inf)
THRESHOLD_SNR_BINS = 4
THRESHOLD_CELL_ROWS = 100


@dataclass(frozen=True)
class EmulatorSettings:
    """How the emulator is trained (recorded in the manifest's `emulator.training`)."""

    rows: int = 120000  # training spectra
    val_rows: int = 2000  # noise-free spectra at the validation nodes (sigma_emu)
    epochs: int = 720  # fewer underfit: as far off on training spectra as on fresh draws (docs/record.md)
    batch_size: int = 256
    lr: float = 3e-3
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "silu"
    components: int = 256  # principal components the network predicts (folded into its last layer)
    snr: float = 1e4  # "noise-free": far above the survey's SNR
    # MODEL_MISMATCH's tests flag nearly disjoint clean rows, so their tails add up: these quantiles
    # leave 0.75 + 0.1 + 0.2 + 0.3 + 0.1 = 1.45% of the clean validation survey flagged, under the 2%
    # of clean rows that all the tests together may flag (`bench/perturbations.py`'s goal).
    quantile: float = 0.9925  # of the clean validation chi^2: the MODEL_MISMATCH threshold
    threshold_rows: int = 32000  # the clean validation survey: sigma scaled on it, thresholds its quantiles
    ripple_quantile: float = 0.999  # of the ripple statistic (a 1% ripple, SNR 50-300: median ~1100 vs 28)
    dib_quantile: float = 0.995  # of each band's statistic: the fit fits the band above it
    veiling_quantile: float = 0.998  # of the veiling statistic (5% of light without lines: median ~80 vs 11)
    broadening_quantile: float = 0.997  # of the broadening statistic (macroturbulence of 40 km/s on stars
    # below 60 km/s at SNR 50-300: median ~47 vs 0)
    contrast_quantile: float = 0.999  # of the contrast of the lines' chi^2 against the continuum's (clean
    # stars: 0.32 at 0.995; emission in H-gamma and H-delta: median 2.8, a companion's lines 1.2; measured
    # on a prototype that told lines apart on the fitted spectrum)
    freer_degree: int = 6  # of the fit's continuum where the preprocessing's cubic cannot explain a
    # spectrum (`Emulator.freer_degree`); freed on every row, it would cost log g 2-5% above SNR 50
    refine_steps: int = 2  # steps of the fit from the predicted labels (`Emulator.refine`). One leaves
    # labels off where the networks read a spectrum poorly (slow rotators with 5% of their pixels masked
    # at SNR 100-400: up to 6.6 sigma; two Gauss-Newton steps: 1.3, three no better) and Teff at SNR
    # 200-500 at 50 K (47)
    seed: int = 0
    threads: int = 2


def noise_free(source: GridSource, settings: EmulatorSettings) -> gridsynth.Perturbations:
    """The training perturbations at SNR `settings.snr`, without what the chi^2 should expose (ripple),
    what the engine masks (bad pixels, gaps) or what the fit fits (an error in the stated rv: averaged
    over, it would broaden the emulated lines, which a low v sin i would then make up for); the
    continuum distortions stay."""
    return replace(source.pert, snr=(settings.snr, settings.snr), ripple_prob=0.0, gap_prob=0.0,
                   bad_pixel_fraction=0.0, rv_error_kms=0.0)


def clean(source: GridSource) -> gridsynth.Perturbations:
    """A clean survey: the config's perturbations without the continuum ripple (a model mismatch)."""
    return replace(source.pert, ripple_prob=0.0)


def held_survey(source: GridSource, split: str, n: int, pert: gridsynth.Perturbations,
                rng: np.random.Generator):
    """A survey table of `n` stars at the left-out `split` nodes ("val" or "test"), v sin i uniform."""
    labels = gridsynth.labels_at(source.full.nodes[rng.choice(source.held[split], n)], pert, rng)
    return gridsynth.draw_survey(source.full, labels, pert, rng).table(source.obs)


def prepared(source: GridSource, table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N, K], x [N, D], ivar [N, D]) of a survey table as the engine preprocesses it; the
    labels are the model's targets, which are the emulator's inputs."""
    xs, ivars = [], []
    for start in range(0, table.num_rows, 8192):
        pre = preprocess(table.slice(start, 8192), source.grid_values, source.settings)
        xs.append(pre.x)
        ivars.append(np.where((pre.flags & Flag.PREPROCESS_FAILED)[:, None] == 0, pre.ivar, 0.0))
    labels = np.stack([table.column(t).to_numpy() for t in source.targets], axis=1)
    return labels, np.concatenate(xs), np.concatenate(ivars).astype(np.float32)


def emulator_error(source: GridSource, emulator: Emulator, settings: EmulatorSettings) -> tuple[dict, dict]:
    """(`Emulator` fields, metrics) of the emulator's error: its residuals on noise-free spectra at the
    left-out nodes (`settings.val_rows` per split, after the chi^2's continuum fit at the true labels);
    `sigma` [D], their rms per pixel at the validation nodes, and, where the emulator has SIGMA_LABEL,
    its factor per row: at the mean label of each bin of SIGMA_EDGES, the rms of the residuals over
    `sigma` there. Metrics: `emulator_rms` per split."""
    pert = noise_free(source, settings)
    residual, labels = {}, {}
    for split in ("val", "test"):
        rng = np.random.default_rng([settings.seed, SPLIT_SEEDS[split]])
        labels[split], x, ivar = prepared(source, held_survey(source, split, settings.val_rows, pert, rng))
        residual[split] = np.where(ivar > 0, x - emulator.fitted(x, ivar, labels[split]), np.nan)
    sigma = np.sqrt(np.nanmean(residual["val"] ** 2, axis=0)).astype(np.float32)
    fields = {"sigma": sigma, "sigma_label": None, "sigma_knots": (), "sigma_factors": ()}
    if SIGMA_LABEL in emulator.labels:
        value = labels["val"][:, emulator.labels.index(SIGMA_LABEL)]
        ratio = np.nanmean((residual["val"] / sigma) ** 2, axis=1)  # per row
        knots, factors = [], []
        for lo, hi in zip(SIGMA_EDGES[:-1], SIGMA_EDGES[1:], strict=True):
            rows = (value >= lo) & (value <= hi if hi == SIGMA_EDGES[-1] else value < hi)
            if rows.any():
                knots.append(float(value[rows].mean()))
                factors.append(float(np.sqrt(np.mean(ratio[rows]))))
        fields.update(sigma_label=SIGMA_LABEL, sigma_knots=tuple(knots), sigma_factors=tuple(factors))
    metrics = {f"{split}_nodes": {"emulator_rms": float(np.sqrt(np.nanmean(residual[split] ** 2)))}
               for split in ("val", "test")}
    return fields, metrics


def fit(labels: np.ndarray, x: np.ndarray, settings: EmulatorSettings, *,
        progress: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """(layers [(W [in, out], b [out])], label_mean, label_std): an MLP from standardised labels to the
    spectra x, trained on their leading principal components, which the last layer then folds in."""
    torch.manual_seed(settings.seed)
    mean_y, std_y = labels.mean(axis=0), labels.std(axis=0)
    mean_x = x.mean(axis=0, dtype=np.float64)
    k = min(settings.components, *x.shape)
    sub = x[np.random.default_rng(settings.seed).permutation(len(x))[:5000]] - mean_x
    basis = np.linalg.svd(sub, full_matrices=False)[2][:k]  # (k, D), orthonormal rows
    inputs = torch.from_numpy(((labels - mean_y) / std_y).astype(np.float32))
    coeffs = torch.from_numpy(((x - mean_x) @ basis.T).astype(np.float32))
    widths = [labels.shape[1], *settings.hidden]
    act = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[settings.activation]
    net = torch.nn.Sequential(*[m for a, b in zip(widths, widths[1:], strict=False)
                                for m in (torch.nn.Linear(a, b), act())], torch.nn.Linear(widths[-1], k))
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=steps, pct_start=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        for _ in tqdm(range(settings.epochs), desc="emulator", unit="epoch", disable=not progress):
            for idx in torch.randperm(len(x)).split(settings.batch_size):
                loss = ((net(inputs[idx]) - coeffs[idx]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().double().numpy().T, m.bias.detach().double().numpy()) for m in linear]
    w, b = layers[-1]
    layers[-1] = (w @ basis, b @ basis + mean_x)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers], mean_y, std_y


def chi2_by_snr(chi2: np.ndarray, snr: np.ndarray, flagged: np.ndarray) -> list[dict]:
    """Median chi^2 and the fraction `flagged` (rows above their threshold) per SNR bin (SNR_BINS)."""
    out = []
    for lo, hi in zip(SNR_BINS, SNR_BINS[1:], strict=False):
        inside = (snr >= lo) & (snr < hi) & np.isfinite(chi2)
        if inside.any():
            out.append({"snr_lo": lo, "snr_hi": hi, "n": int(inside.sum()),
                        "median_chi2": round(float(np.median(chi2[inside])), 4),
                        "flagged": round(float(np.mean(flagged[inside])), 4)})
    return out


def threshold_table(statistic: np.ndarray, fit: Fit, labels: list[str], quantile: float) -> Threshold:
    """The `Threshold` of a statistic of a clean survey's fits (`statistic` [B], e.g. `fit.chi2`; NaN
    where there is none): its `quantile` in each cell of
    equal-count bins of log10 SNR (THRESHOLD_SNR_BINS at most, fewer where a cell would hold less than
    THRESHOLD_CELL_ROWS rows; one at least, whatever it holds) and the bins of the fitted SIGMA_LABEL
    between THRESHOLD_EDGES that hold rows; knots at the bins' medians. Without SIGMA_LABEL among
    `labels`: the quantile per SNR bin."""
    known = np.isfinite(statistic)
    found, log_snr = statistic[known], fit.log_snr[known].astype(np.float64)
    label = SIGMA_LABEL if SIGMA_LABEL in labels else None
    value = fit.labels[known, labels.index(label)] if label else np.zeros(len(found))
    edges = np.asarray(THRESHOLD_EDGES if label else (-math.inf, math.inf))
    by_label = np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(edges) - 2)
    held = np.unique(by_label)  # the bins with rows: a model trained on fewer v sin i has fewer
    by_label = np.searchsorted(held, by_label)
    for bins in range(THRESHOLD_SNR_BINS, 0, -1):  # one SNR bin: every cell has rows
        knots, by_snr = equal_count_bins(log_snr, bins)
        cells = np.bincount(by_snr * len(held) + by_label, minlength=bins * len(held))
        if cells.min() >= THRESHOLD_CELL_ROWS:
            break
    label_knots = tuple(float(np.median(value[by_label == b])) for b in range(len(held)))
    values = np.array([[np.quantile(found[(by_snr == i) & (by_label == j)], quantile)
                        for j in range(len(held))] for i in range(bins)])
    return Threshold(tuple(knots.tolist()), label, label_knots, values)


def train_emulator(cfg: TrainConfig, bundle_dir: str | Path, settings: EmulatorSettings | None = None, *,
                   progress: bool = True) -> dict:
    """Train the emulator of `cfg`, measure sigma_emu and calibrate the chi^2 threshold with the
    bundle's own predictions, and write it into the bundle at `bundle_dir` (the manifest rewritten
    through `save_bundle`). Returns the manifest's `emulator` entry."""
    settings = settings or EmulatorSettings()
    t0 = time.perf_counter()
    source = GridSource(cfg, progress=progress)
    rng = np.random.default_rng([settings.seed, SPLIT_SEEDS["train"]])
    pert = noise_free(source, settings)
    labels = gridsynth.draw_labels(source.train, settings.rows, pert, rng)
    table = gridsynth.draw_survey(source.train, labels, pert, rng).table(source.obs)
    y, x, _ = prepared(source, table)
    layers, label_mean, label_std = fit(y, x, settings, progress=progress)
    base = Emulator(labels=list(source.targets), layers=layers, activation=settings.activation,
                    label_mean=label_mean, label_std=label_std, sigma=np.zeros(x.shape[1], np.float32),
                    continuum_degree=source.settings.continuum_degree, refine_steps=settings.refine_steps,
                    chi2_threshold=Threshold.constant(math.inf), wavelength=source.grid_values,
                    freer_degree=settings.freer_degree)
    fields, metrics = emulator_error(source, base, settings)
    bundle = load_bundle(bundle_dir)
    entry = {"labels": base.labels, "hidden": list(settings.hidden), "activation": settings.activation,
             "label_mean": label_mean.tolist(), "label_std": label_std.tolist(),
             "continuum_degree": base.continuum_degree, "refine_steps": base.refine_steps,
             "freer_degree": base.freer_degree,
             "training": {**asdict(settings), "hidden": list(settings.hidden), "seconds": 0.0,
                          "perturbations": asdict(pert), "clean_perturbations": asdict(clean(source))},
             "metrics": metrics}
    model = Model(replace(bundle, emulator=replace(base, **fields)))
    calibrated, sigma = calibrate(source, model, entry, settings)
    entry.update(calibrated)
    entry["training"]["seconds"] = round(time.perf_counter() - t0, 1)
    entry = save_emulator(bundle_dir, layers, sigma, entry)
    save_bundle(bundle_dir, bundle.layers, {**bundle.manifest, "emulator": entry})
    calibrate_estimates(cfg, source, bundle_dir)
    return entry


def calibrate(source: GridSource, model: Model, entry: dict,
              settings: EmulatorSettings) -> tuple[dict, np.ndarray]:
    """Calibrate `model`'s emulator on a clean survey at the validation nodes, through the engine as
    data go (labels predicted, rv fitted): its sigma scaled so that the median chi^2 at SNR >=
    SIGMA_SNR is 1 (where sigma_emu dominates the noise, an rms over all stars over-explains most),
    then the bands' thresholds and the MODEL_MISMATCH thresholds, quantiles
    (`settings.dib_quantile`, `ripple_quantile`, `quantile`, `veiling_quantile`,
    `broadening_quantile`, `contrast_quantile`) of each band's statistic, of the ripple statistic with
    the bands removed where they pass, and of the chi^2 beyond the noise (`Fit.chi2_beyond_noise`),
    the veiling and broadening statistics and the contrast as the engine then reports them (all but
    the veiling statistic's per cell of SNR and v sin i, `threshold_table`); the chi^2's also on the
    same survey without flux_err (`Emulator.chi2_threshold_estimated_noise`).
    The same from a trained or an already calibrated emulator. Returns (the entry's keys that depend
    on them, metrics included, and `sigma_scaling`, the sigma's factors per row; the scaled sigma)."""
    rows = {"val": settings.threshold_rows, "test": source.data.test_rows}
    surveys = {split: held_survey(source, split, rows[split], clean(source),
                                  np.random.default_rng([settings.seed, SPLIT_SEEDS[f"{split}_clean"]]))
               for split in ("val", "test")}
    snr = {split: survey.column(SNR).to_numpy() for split, survey in surveys.items()}
    high = surveys["val"].filter(pa.array(snr["val"] >= SIGMA_SNR)).drop_columns(source.targets)
    # whatever the bundle held before; never freeing the continuum: the chi^2's threshold decides where
    # the polynomial alone cannot explain a spectrum
    emulator = replace(model.emulator, ripple_threshold=math.inf, dib_threshold=(math.inf,) * len(BANDS),
                       freer_degree=-1)

    def engine(emulator: Emulator) -> Model:
        return Model(replace(model.bundle, emulator=emulator))

    def fits(emulator: Emulator, splits=("val", "test")) -> dict:
        return {split: engine(emulator).goodness_of_fit(surveys[split].drop_columns(source.targets),
                                                        backend="cpu") for split in splits}

    def median_chi2(scale: float) -> float:
        scaled = engine(replace(emulator, sigma=emulator.sigma * scale))
        return float(np.nanmedian(scaled.goodness_of_fit(high, backend="cpu").chi2))
    scale = _unit_root(median_chi2)
    emulator = replace(emulator, sigma=(emulator.sigma * scale).astype(np.float32))
    # each statistic is that of the fit without what it looks for and with what the ones before it
    # found; the chi^2 the engine reports is that of the fit with all of them, so its threshold comes last
    dib = fits(emulator, ("val",))["val"].dib
    dib_threshold = np.nanquantile(dib, settings.dib_quantile, axis=0).tolist()
    emulator = replace(emulator, dib_threshold=tuple(dib_threshold))
    ripple_threshold = float(np.nanquantile(fits(emulator, ("val",))["val"].ripple, settings.ripple_quantile))
    emulator = replace(emulator, ripple_threshold=ripple_threshold)
    fitted = fits(emulator)
    val = fitted["val"]
    threshold = threshold_table(val.chi2_beyond_noise, val, emulator.labels, settings.quantile)
    veiling_threshold = float(np.nanquantile(val.veiling, settings.veiling_quantile))
    broadening_threshold = threshold_table(val.broadening, val, emulator.labels, settings.broadening_quantile)
    contrast = val.excess_contrast()  # none on a grid too short for the contrast's pixels: never tested
    contrast_threshold = (threshold_table(contrast, val, emulator.labels, settings.contrast_quantile)
                          if np.isfinite(contrast).any() else None)
    calibrated = replace(emulator, chi2_threshold=threshold, veiling_threshold=veiling_threshold,
                         broadening_threshold=broadening_threshold,
                         contrast_threshold=Threshold.constant(math.inf) if contrast_threshold is None
                         else contrast_threshold)
    # the same surveys without flux_err: their noise is DER_SNR's, an estimate whose error moves the chi^2
    unstated = {split: engine(calibrated).goodness_of_fit(survey.drop_columns([*source.targets, FLUX_ERR]),
                                                          backend="cpu") for split, survey in surveys.items()}
    estimated = threshold_table(unstated["val"].chi2_beyond_noise, unstated["val"], emulator.labels,
                                settings.quantile)
    calibrated = replace(calibrated, chi2_threshold_estimated_noise=estimated)
    metrics = {}
    for split, f in fitted.items():
        key = f"{split}_nodes"
        metrics[key] = {**entry.get("metrics", {}).get(key, {}), "chi2_median": float(np.nanmedian(f.chi2)),
                        "flagged": float(np.mean(f.mismatch(calibrated))),
                        "flagged_estimated_noise": float(np.mean(unstated[split].mismatch(
                            calibrated, np.ones(len(unstated[split].chi2), bool)))),
                        "chi2_by_snr": chi2_by_snr(f.chi2, snr[split], f.chi2_beyond_noise > threshold.at(
                            f.log_snr, f.labels, emulator.labels))}
    scaling = {"label": emulator.sigma_label, "knots": list(emulator.sigma_knots),
               "factors": list(emulator.sigma_factors)} if emulator.sigma_label else None
    return {"chi2_threshold": threshold.to_manifest(),
            "chi2_threshold_estimated_noise": estimated.to_manifest(),
            "ripple_threshold": ripple_threshold, "sigma_scaling": scaling,
            "dib_threshold": dib_threshold, "veiling_threshold": veiling_threshold,
            "broadening_threshold": broadening_threshold.to_manifest(),
            "contrast_threshold": None if contrast_threshold is None else contrast_threshold.to_manifest(),
            "chi2_quantile": settings.quantile, "ripple_quantile": settings.ripple_quantile,
            "dib_quantile": settings.dib_quantile, "veiling_quantile": settings.veiling_quantile,
            "broadening_quantile": settings.broadening_quantile,
            "contrast_quantile": settings.contrast_quantile,
            "sigma_emu_median": float(np.median(emulator.sigma)), "metrics": metrics}, emulator.sigma


def calibrate_estimates(cfg: TrainConfig, source: GridSource, bundle_dir: str | Path) -> dict | None:
    """Fit the SNR-conditional calibration of the bundle at `bundle_dir` again, now that it has an
    emulator, through the engine as data go: the network's weight in the estimate blended with the
    emulator fit's labels and its gains with the fit's excess chi^2, then the weight of the fit's
    variance, the weight of the networks' variance on rows with a defect the fit handles, the scales
    (following the config's `scale_label` too, if any), floor and chi^2 inflation for that estimate
    (`calibrate.fit_snr_calibration`), and the HIGH_EPISTEMIC thresholds (per bin of the SNR the
    spectra state, over the validation, test and between surveys: `calibrate.epistemic_thresholds`).

    It is fitted on the validation and test surveys, and on the validation survey again with its noise
    understated (`understate_noise`) and, once more with a continuum beyond the fit's freest
    (`shape_continuum`), its rows that then have a misfit (`Fit.misfit`), for the sigmas alone (the
    blend's weights, fitted on them too, took a loosely identified gain that cost other spectra;
    docs/record.md). Their nodes are all left out of the training, and how well a calibration transfers
    to unseen nodes varies from node to node (fitted on either survey alone, the other's 68% coverage is
    off by up to 5 points), so the more nodes, the better. Not on the `between` survey: its spectra are
    the grid interpolated, which errs from the physics between the nodes by as much as the fit's errors
    above SNR 200 (`bench/interpolation_floor.py`), and there they err more than real models at nodes
    the training left out; with them in the fit, those nodes were over-covered there (docs/record.md).
    Each survey's metrics are given under that calibration (`val`, `test`, `between`), and the node
    surveys' under the one fitted on the other node survey alone too (`val_cross_fitted`,
    `test_cross_fitted`, with coverage in issue 9's SNR bins), which says honestly how it holds at nodes
    the calibration has not seen.
    Rewrites the manifest; returns the new `calibration` entry (None, changing nothing, for a model
    that does not see its SNR)."""
    bundle = load_bundle(bundle_dir)
    if "log10_snr" not in bundle.features:  # one sigma factor per target: nothing SNR-conditional to fit
        return None
    names, cal = [t.name for t in bundle.targets], cfg.calibration
    label = cal.label_index(names)
    surveys = calibration_surveys(cfg, source, bundle)
    calibration = fit_estimates_calibration([surveys[name] for name in CALIBRATION_SURVEYS], label)
    metrics, sigma_epistemic = dict(bundle.manifest.get("metrics") or {}), []
    for split in ("val", "test", "between"):
        d = surveys[split]
        mean, sigma, epistemic = calibrated_estimates(calibration, d)
        metrics[split] = split_metrics(tuple(names), d["y"], mean, sigma)
        sigma_epistemic.append(epistemic)
    log_snr = np.concatenate([surveys[split]["flag_log_snr"] for split in ("val", "test", "between")])
    for split, other in (("val", "test"), ("test", "val")):
        d = surveys[split]
        mean, sigma, _ = calibrated_estimates(fit_estimates_calibration([surveys[other]], label), d)
        metrics[f"{split}_cross_fitted"] = {
            name: {**m, "coverage_by_snr": coverage_in_bins(d["snr"], d["y"][:, k], mean[:, k], sigma[:, k],
                                                           ISSUE_SNR_EDGES)}
            for k, (name, m) in enumerate(split_metrics(tuple(names), d["y"], mean, sigma).items())}
    thresholds = epistemic_thresholds(np.concatenate(sigma_epistemic), cal.ood_quantile, log_snr)
    ood = {"epistemic_sigma_threshold": {n: t.to_manifest() for n, t in zip(names, thresholds, strict=True)},
           "quantile": cal.ood_quantile}
    provenance = dict(bundle.manifest.get("provenance") or {})
    provenance["calibration"] = {**provenance.get("calibration", {}),
                                 "split": "+".join(CALIBRATION_SURVEYS),
                                 "estimate": "network and emulator fit blended",
                                 "aleatoric": "with the emulator fit's label variance, inflated by its "
                                              "misfit; the networks' variance "
                                              "weighed by defect_variance on rows with a fitted ripple, "
                                              "read with a gap filled by the fit's model"}
    manifest = {**bundle.manifest, "calibration": calibration.to_manifest(names), "metrics": metrics,
                "ood": ood, "provenance": provenance}
    save_bundle(bundle_dir, bundle.layers, manifest)
    return manifest["calibration"]


def calibration_surveys(cfg: TrainConfig, source: GridSource, bundle: Bundle) -> dict[str, dict]:
    """The surveys `calibrate_estimates` fits and scores on, each a dict of its rows' uncalibrated
    `Estimates` fields (of `bundle` without its calibration), labels `y`, `snr` and `sigmas_only` (the
    blend's weights not fitted on them), rows the engine could not predict left out: `val`, `test`,
    `between` (the source's splits), `understated` (`val` with its noise understated) and `beyond`
    (`val` with a continuum beyond the fit's freest, its rows with a misfit alone, the others being
    indistinguishable from clean spectra: kept, they would widen every sigma alike; sigmas only)."""
    names, cal = [t.name for t in bundle.targets], cfg.calibration
    raw = Model(replace(bundle, manifest={k: v for k, v in bundle.manifest.items() if k != "calibration"}))

    def estimates(table: pa.Table, sigmas_only: bool = False) -> dict:
        found = raw.estimates(table.drop_columns(names), samples=cal.samples, seed=cal.seed, backend="cpu")
        rows = {**vars(found), "y": np.stack([table.column(n).to_numpy() for n in names], axis=1),
                "snr": table.column(SNR).to_numpy(), "sigmas_only": np.full(len(found.ok), sigmas_only)}
        return survey_rows(rows, found.ok)

    tables = {split: source.split_table(split) for split in ("val", "test", "between")}
    surveys = {split: estimates(table) for split, table in tables.items()}
    val = tables["val"]
    understated = understate_noise(val, np.random.default_rng(SPLIT_SEEDS["understated"]))
    surveys["understated"] = estimates(understated)
    freest = max(bundle.emulator.continuum_degree, bundle.emulator.freer_degree)
    beyond = estimates(shape_continuum(val, np.random.default_rng(SPLIT_SEEDS["beyond_continuum"]), freest),
                       sigmas_only=True)
    surveys["beyond"] = survey_rows(beyond, beyond["misfit"] > 0)
    return surveys


def survey_rows(survey: dict, rows: np.ndarray) -> dict:
    """The `rows` ([N] bool or indices) of a survey of `calibration_surveys` (its `ok` dropped)."""
    return {key: value[rows] for key, value in survey.items() if key != "ok"}


def fit_estimates_calibration(surveys: list[dict], label: int | None) -> Calibration:
    """`fit_snr_calibration` of the blended estimate on the rows of `surveys` (`calibration_surveys`)
    together; `label`: the calibration's `scale_label` index, if any."""
    d = {key: np.concatenate([survey[key] for survey in surveys]) for key in surveys[0]}
    return fit_snr_calibration(d["y"], d["mean"], d["var_a"], d["var_e"], d["log_snr"], fitted=d["fitted"],
                               gapped=d["gapped"], chi2=d["chi2"], misfit=d["misfit"],
                               sigmas_only=d["sigmas_only"], excess=d["excess"], fit_var=d["fit_var"],
                               label=label)


def calibrated_estimates(calibration: Calibration, rows: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, sigma, epistemic sigma) [N, K] of a survey's `rows` (`calibration_surveys`) under
    `calibration`, as the engine reports them."""
    defect = handled_defect(rows["excess"])
    var_a, var_e = calibration.apply(rows["log_snr"], rows["var_a"], rows["var_e"], mean=rows["mean"],
                                     fit_var=rows["fit_var"], defect=defect)
    var_a = var_a * calibration.inflation(rows["chi2"], rows["misfit"])
    estimate = calibration.blend(rows["log_snr"], rows["mean"], rows["fitted"], rows["excess"],
                                 rows["gapped"])
    return estimate, np.sqrt(var_a + rows["light_var"] + var_e), np.sqrt(var_e)


def understate_noise(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    """`table` with each row's flux_err divided by a factor drawn uniformly in UNDERSTATED_NOISE."""
    err = np.stack(table.column(FLUX_ERR).to_numpy(zero_copy_only=False))
    err /= rng.uniform(*UNDERSTATED_NOISE, (len(err), 1))
    return table.set_column(table.schema.get_field_index(FLUX_ERR), FLUX_ERR,
                            spectrum_array(err, err.shape[1]))


def shape_continuum(table: pa.Table, rng: np.random.Generator, beyond: int) -> pa.Table:
    """`table` with each row's flux multiplied by 1 + a P_n(x): the Legendre polynomial of a degree n
    drawn from the BEYOND_CONTINUUM_TERMS degrees above `beyond`, x the wavelength mapped onto [-1, 1],
    a uniform within +-BEYOND_CONTINUUM_AMPLITUDE."""
    flux = np.stack(table.column(FLUX).to_numpy(zero_copy_only=False))
    wl = table_grid(table.schema).values()
    x = 2.0 * (wl - wl[0]) / (wl[-1] - wl[0]) - 1.0
    degree = rng.integers(beyond + 1, beyond + 1 + BEYOND_CONTINUUM_TERMS, len(flux))
    amplitude = rng.uniform(-BEYOND_CONTINUUM_AMPLITUDE, BEYOND_CONTINUUM_AMPLITUDE, len(flux))
    shape = np.polynomial.legendre.legvander(x, beyond + BEYOND_CONTINUUM_TERMS)[:, degree].T
    flux *= 1.0 + amplitude[:, None] * shape
    return table.set_column(table.schema.get_field_index(FLUX), FLUX, spectrum_array(flux, flux.shape[1]))


def _unit_root(f, steps: int = 4) -> float:
    """x > 0 with f(x) ~ 1 for a decreasing f, by secant steps in log-log from x = 1 and 0.8."""
    x0, x1 = 1.0, 0.8
    y0, y1 = math.log(f(x0)), math.log(f(x1))
    for _ in range(steps):
        if y1 == y0:
            break
        x0, x1 = x1, float(np.clip(math.exp(math.log(x1) - y1 * (math.log(x1) - math.log(x0)) / (y1 - y0)),
                                   0.3, 3.0))
        y0, y1 = y1, math.log(f(x1))
    return x1


def recalibrate(cfg: TrainConfig, bundle_dir: str | Path, settings: EmulatorSettings | None = None, *,
                progress: bool = True) -> dict:
    """Calibrate the emulator already in the bundle at `bundle_dir` again (its sigma and the sigma's
    factors measured again, on the draws of its training, and scaled; the thresholds; after a change
    to how the engine fits it or prepares its input), without training it, with the Gauss-Newton
    steps of `settings`; rewrites its file and re-seals the manifest, its `input` entries restated
    from the config."""
    with _stale_band_thresholds_dropped(bundle_dir):
        bundle = load_bundle(bundle_dir)
        if bundle.emulator is None:
            raise StarcastError(f"model bundle {bundle_dir} has no emulator to calibrate; train one first")
        entry = dict(bundle.manifest["emulator"])
        trained = entry.get("training", {})
        kept = ("seed", "val_rows", "snr", "threshold_rows")
        settings = replace(settings or EmulatorSettings(), **{k: trained[k] for k in kept if k in trained})
        source = GridSource(cfg, progress=progress)
        entry["refine_steps"], entry["freer_degree"] = settings.refine_steps, settings.freer_degree
        manifest = {**bundle.manifest, "emulator": entry,
                    "input": {**bundle.manifest["input"], **source.input_requirements()}}
        save_bundle(bundle_dir, bundle.layers, manifest)
        bundle = load_bundle(bundle_dir)
        fields, metrics = emulator_error(source, bundle.emulator, settings)
        previous = entry.get("metrics", {})
        entry["metrics"] = {**previous, **{k: {**previous.get(k, {}), **v} for k, v in metrics.items()}}
        model = Model(replace(bundle, emulator=replace(bundle.emulator, **fields)))
        calibrated, sigma = calibrate(source, model, entry, settings)
        entry = save_emulator(bundle_dir, bundle.emulator.layers, sigma, {**entry, **calibrated})
        save_bundle(bundle_dir, bundle.layers, {**bundle.manifest, "emulator": entry})
        calibrate_estimates(cfg, source, bundle_dir)
        return entry


@contextmanager
def _stale_band_thresholds_dropped(bundle_dir: str | Path):
    """While `recalibrate` sets them again, a bundle whose band thresholds are for another list of bands
    than the engine's (`engine.emulator.BANDS`), which it would not load with, is sealed without them,
    after its hashes are checked; should the recalibration stop, its manifest is put back (without
    them it would load and look for no band)."""
    path = Path(bundle_dir)  # a folder, even when named without a path separator
    text = (path / MANIFEST_FILE).read_text() if (path / MANIFEST_FILE).is_file() else "{}"
    manifest = json.loads(text)
    entry = manifest.get("emulator") or {}
    if len(entry.get("dib_threshold") or BANDS) == len(BANDS):  # or no manifest: load_bundle says so
        yield
        return
    if (manifest_sha256(manifest) != manifest.get("bundle_sha256")
            or sha256_file(path / WEIGHTS_FILE) != manifest.get("weights_sha256")):
        raise StarcastError(f"model bundle {path}: its manifest or weights do not match its hashes")
    del entry["dib_threshold"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    seal(path)
    try:
        yield
    except BaseException:
        (path / MANIFEST_FILE).write_text(text)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the emulator of CONFIG and add it to BUNDLE_DIR.")
    parser.add_argument("config", help="the training config (TOML) the bundle was trained from")
    parser.add_argument("bundle", help="the model bundle directory to add the emulator to")
    parser.add_argument("--rows", type=int, default=EmulatorSettings.rows)
    parser.add_argument("--epochs", type=int, default=EmulatorSettings.epochs)
    parser.add_argument("--calibrate-only", action="store_true",
                        help="keep the bundle's emulator; measure its sigma again and calibrate its "
                        "MODEL_MISMATCH thresholds and the blended estimate's calibration again")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    settings = EmulatorSettings(rows=args.rows, epochs=args.epochs)
    bundle = Path(args.bundle)  # a folder, even when named without a path separator
    try:
        if args.calibrate_only:
            entry = recalibrate(load_config(args.config), bundle, settings, progress=not args.quiet)
            print(f"calibrated the emulator of {bundle} again")
        else:
            entry = train_emulator(load_config(args.config), bundle, settings, progress=not args.quiet)
            print(f"added {entry['file']} to {bundle} in {entry['training']['seconds']:.0f} s")
    except StarcastError as exc:
        parser.exit(EXIT_ERROR, f"error: {exc}\n")
    limits = [Threshold.from_manifest(entry[key], entry["labels"]).values
              for key in ("chi2_threshold", "chi2_threshold_estimated_noise")]
    broadening, contrast = (Threshold.from_manifest(entry[key], entry["labels"]).values
                            if entry[key] is not None else np.array([math.inf])
                            for key in ("broadening_threshold", "contrast_threshold"))
    print(f"  chi2 threshold {' / without flux_err '.join(f'{v.min():.3f}-{v.max():.3f}' for v in limits)}"
          ", ripple threshold "
          f"{entry['ripple_threshold']:.1f}, veiling threshold {entry['veiling_threshold']:.1f}, "
          f"broadening threshold {broadening.min():.1f}-{broadening.max():.1f}, "
          f"contrast threshold {contrast.min():.2f}-{contrast.max():.2f}, "
          f"band thresholds {', '.join(f'{t:.1f}' for t in entry['dib_threshold'])}")
    for split, m in entry["metrics"].items():
        bins = ", ".join(f"{b['snr_lo']:.0f}-{b['snr_hi']:.0f}: {b['median_chi2']:.3f}"
                         for b in m["chi2_by_snr"])
        print(f"  {split}: emulator rms {m['emulator_rms']:.4f}, median chi2 {m['chi2_median']:.3f}, "
              f"flagged {100 * m['flagged']:.1f}% ({100 * m['flagged_estimated_noise']:.1f}% without "
              f"flux_err); median chi2 by SNR {bins}")


if __name__ == "__main__":
    main()
