"""Post-hoc recalibration on the validation split: one multiplier per target on the predictive sigma
(or, for models that see their SNR, a scale per SNR, optionally also following the network's mean of
one target, and a systematic floor per target), and the epistemic-sigma thresholds that flag
out-of-distribution rows.

The scale is stored as `targets[i].calibration` in the manifest and applied by every backend
(`var *= calibration**2`). No isotonic map: a single scale keeps the Gaussian form the engine reports.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import norm

from ..engine.calibration import (
    EXCESS_PARTS,
    Calibration,
    chi2_excess,
    handled_defect,
    misfit_growth,
    noise_ratio,
    raised_share,
)
from ..engine.emulator import Threshold

LEVELS = (0.68, 0.95)  # the central intervals the scale is fitted to cover
OOD_SNR_BINS = 6  # of log10 SNR, the HIGH_EPISTEMIC thresholds' (`epistemic_thresholds`)
# A coverage's miss counts in units of its sampling error, sqrt(q (1 - q) / n): 95% coverage misses
# weigh 4.6x those at 68%, so heavy tails do not leave the 95% interval short to keep the 68% exact, and
# a stratum of few rows (`fit_snr_calibration`) weighs by its count.
LEVEL_WEIGHTS = tuple(1.0 / (q * (1.0 - q)) for q in LEVELS)
DEFECT_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidates of `Calibration.defect_variance`


def fit_sigma_scale(z: np.ndarray, method: str = "coverage") -> float:
    """The factor c on sigma given z = |y - mean| / sigma over the validation rows.

    `nll`: the closed-form minimiser of the Gaussian NLL in c, c^2 = mean(z^2) (sensitive to tails).
    `coverage`: c minimising the weighted squared misses of the 68% and 95% central-interval coverages,
    sum_q (mean(z <= c z_q) - q)^2 / (q (1 - q)), on a fine log grid; robust to a few outliers."""
    z = np.sort(np.abs(np.asarray(z, dtype=np.float64)))
    z = z[np.isfinite(z)]
    if z.size == 0:
        raise ValueError("no finite validation residuals to calibrate on")
    if method == "nll":
        return float(np.sqrt(np.mean(z**2)))
    if method != "coverage":
        raise ValueError(f"unknown calibration method {method!r} (expected coverage or nll)")
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 8001))
    loss = np.zeros_like(grid)
    for q, miss_weight in zip(LEVELS, LEVEL_WEIGHTS, strict=True):
        half_width = norm.ppf(0.5 + q / 2)  # 0.994 for 68%, 1.960 for 95%
        covered = np.searchsorted(z, grid * half_width, side="right") / z.size
        loss += miss_weight * (covered - q) ** 2
    best = np.flatnonzero(loss == loss.min())
    return float(np.sqrt(grid[best[0]] * grid[best[-1]]))  # middle of a flat optimum


def calibration_factors(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
                        method: str = "coverage") -> np.ndarray:
    """One sigma multiplier per target (columns of [N, K] arrays in the same units)."""
    z = np.abs(y - mean) / sigma
    return np.array([fit_sigma_scale(z[:, k], method) for k in range(y.shape[1])])


def epistemic_thresholds(sigma_epistemic: np.ndarray, quantile: float = 0.995,
                         log_snr: np.ndarray | None = None) -> list[Threshold]:
    """Per target, the `Threshold` of the (calibrated, physical-unit) epistemic sigma above which the
    predictor flags HIGH_EPISTEMIC: the given quantile over held-out rows ([N, K] in); with their
    `log_snr` ([N]), in each of OOD_SNR_BINS equal-count bins of it (knots at the bins' medians). The
    networks disagree more on noisier spectra, so one threshold for all flags the noisiest clean rows
    and passes stars unlike the training data at high SNR."""
    if log_snr is None:
        return [Threshold.constant(v) for v in np.quantile(sigma_epistemic, quantile, axis=0)]
    knots, which = equal_count_bins(log_snr, OOD_SNR_BINS)
    values = np.stack([np.quantile(sigma_epistemic[which == b], quantile, axis=0)
                       for b in range(OOD_SNR_BINS)])
    return [Threshold(tuple(knots.tolist()), None, (0.0,), values[:, [k]]) for k in range(values.shape[1])]


def equal_count_bins(values: np.ndarray, bins: int = 6,
                     among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(knots [bins], bin of each row [N]): `bins` equal-count bins of `values` (e.g. log10 SNR), a knot
    at each bin's median; with `among` ([N] bool), the bins and knots of those rows alone."""
    chosen = values if among is None else values[among]
    edges = np.quantile(chosen, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    chosen_bins = which if among is None else which[among]
    knots = np.array([np.median(chosen[chosen_bins == b]) for b in range(bins)])
    return np.maximum.accumulate(knots + 1e-9 * np.arange(bins)), which


def knot_weights(values: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """[N, Q]: each row's weight of each knot when a quantity is piecewise linear in `values` between
    `knots` and constant beyond them (as `np.interp`): the quantity at the rows is this times its Q
    values at the knots."""
    return np.stack([np.interp(values, knots, np.eye(len(knots))[q]) for q in range(len(knots))], axis=1)


def fit_network_weight(y: np.ndarray, mean: np.ndarray, fitted: np.ndarray, log_snr: np.ndarray,
                       knots: np.ndarray, excess: np.ndarray,
                       gapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, Q) in [0, 1], gain (K, len(EXCESS_PARTS)) >= 0): the network's weight w0 in the
    blend w mean + (1 - w) fitted, per target piecewise linear in log10 SNR at `knots`, and the gains
    of its odds with each part of the fit's excess reduced chi^2 (`excess` [N, len(EXCESS_PARTS)];
    `Calibration.network_share`): the least-squares fit of y on validation rows ([N, K] in physical
    units) without a gap (`gapped` [N]: those take the fit alone), started from the weights fitted
    linearly with no gain. Weight 1 and gain 0 for a target without fitted labels (NaN)."""
    hats = knot_weights(log_snr, knots)
    excess = np.asarray(excess, np.float64)
    q, parts = len(knots), len(EXCESS_PARTS)
    weight, gain = np.ones((y.shape[1], q)), np.zeros((y.shape[1], parts))
    for k in range(y.shape[1]):
        rows = np.flatnonzero(np.isfinite(fitted[:, k]) & np.isfinite(mean[:, k]) & ~np.asarray(gapped, bool))
        if not len(rows):
            continue
        apart, target = mean[rows, k] - fitted[rows, k], y[rows, k] - fitted[rows, k]
        start = np.clip(np.linalg.lstsq(hats[rows] * apart[:, None], target, rcond=None)[0], 0.0, 1.0)
        if not excess[rows].any():  # no excess to fit a gain on: the linear fit, clipped
            weight[k] = start
            continue

        def misfit(p, h=hats[rows], e=excess[rows], apart=apart, target=target):
            return raised_share(h @ p[:q], e @ p[q:]) * apart - target

        bounds = (np.zeros(q + parts), np.r_[np.ones(q), np.full(parts, np.inf)])  # w0 in [0, 1], g >= 0
        best = least_squares(misfit, np.r_[start, np.ones(parts)], bounds=bounds).x
        weight[k], gain[k] = best[:q], best[q:]
    return weight, gain


def fit_snr_calibration(y: np.ndarray, mean: np.ndarray, var_a: np.ndarray, var_e: np.ndarray,
                        log_snr: np.ndarray, *, bins: int = 6, fitted: np.ndarray | None = None,
                        gapped: np.ndarray | None = None, chi2: np.ndarray | None = None,
                        excess: np.ndarray | None = None, fit_var: np.ndarray | None = None,
                        misfit: np.ndarray | None = None, sigmas_only: np.ndarray | None = None,
                        chi2_strata: int = 3, label: int | None = None, label_bins: int = 10,
                        label_rounds: int = 3) -> Calibration:
    """The SNR-conditional calibration (`engine.calibration.Calibration`) fitted on validation rows
    at grid nodes left out of training ([N, K] arrays in physical units; log_snr [N]).

    Rows are split into `bins` equal-count bins of log10 SNR (`equal_count_bins`). With the labels of the
    emulator's fit (`fitted`, NaN where there are none) and which rows have a gap (`gapped` [N]; None:
    none), the network's weights in the blended estimate and, with the parts of the fit's excess reduced
    chi^2 (`excess` [N, len(EXCESS_PARTS)]), their gains with them come first (`fit_network_weight`; not
    on the rows of `sigmas_only` [N] bool, a survey made to fit the sigmas on, which neither place the
    SNR bins), and the sigmas are fitted to that estimate. With the variances of the fit's labels from
    its curvature (`fit_var` [N, K], NaN where there are none: counted 0), they are added to var_a
    weighed by lambda = median(var_a + var_e) / median(fit_var) per target, so that the networks' total
    variance and the fit's count alike (`Calibration.fit_variance_weight`); with the excess parts too,
    var_a is first weighed by d on the rows with a `handled_defect` (`Calibration.defect_variance`), d
    per target among DEFECT_FACTORS, those rows a stratum of their own in every bin, the one of least
    loss with the rest fitted for each. Per target, a systematic floor f, one scale s_b per bin and, with
    the fit's misfit (`misfit` [N], finite and >= 0, `emulator.Fit.misfit`), the inflation c of the
    aleatoric part minimise the squared misses (weighted, LEVEL_WEIGHTS) of the 68% and 95% coverages of
    |y - mean| <= z_q sqrt(s_b^2 l^2 (h var_a + var_e) + f^2), h = min(chi2, 1) (1 + c sqrt(misfit))
    (below 1 Birge's ratio with the fit's reduced chi^2 `chi2` [N], not fitted: `Calibration.inflation`),
    summed over the bins and, inside each, over `chi2_strata` equal-count strata of chi^2 (so that a
    spectrum the fit explains to its noise and one it does not are both covered, not only their
    mixture), the rows with a misfit a stratum of their own (those with a defect too among them), each
    stratum's misses weighed by its count. f and c over grids of
    candidates from 0, s_b over a fine log grid: the floor is what the data ask for at high SNR, where
    the noise no longer hides what the grid's interpolation does not know. The bins' scales then become
    the scales at the knots that the engine interpolates between, refined so that the same loss holds
    with them applied so (`_knot_scales`). l = 1, or, with `label`
    (a target's index), a factor per target piecewise linear in the network's mean of that target
    (knots at the medians of `label_bins` equal-count bins of it): each bin's scale (`fit_sigma_scale`) of
    the residuals under the rest, normalised to a geometric mean of 1 over the rows, refined
    `label_rounds` times, the rest fitted again after each."""
    blend = np.ones(len(y), bool) if sigmas_only is None else ~sigmas_only
    knots, which = equal_count_bins(log_snr, bins, among=blend)
    weight, gain, network = None, None, mean
    if fitted is not None:
        gapped = np.zeros(len(y), bool) if gapped is None else gapped
        parts = np.zeros((len(y), len(EXCESS_PARTS))) if excess is None else excess
        weight, gain = fit_network_weight(y[blend], network[blend], fitted[blend], log_snr[blend], knots,
                                          parts[blend], gapped[blend])
        mean = Calibration(knots, np.ones_like(weight), np.zeros(len(weight)), weight, gain).blend(
            log_snr, network, fitted, parts, gapped)
    fit_weight, fit_part = None, 0.0
    if fit_var is not None:
        known = np.isfinite(fit_var) & (fit_var > 0)
        fit_weight = np.array([np.median((var_a + var_e)[known[:, k], k]) / np.median(fit_var[known[:, k], k])
                               if known[:, k].any() else 0.0 for k in range(y.shape[1])])
        fit_part = fit_weight * np.nan_to_num(fit_var)
    total, strata = (np.zeros(len(y)), 1) if chi2 is None else (chi2_excess(chi2), chi2_strata)
    inflations = np.zeros(1) if misfit is None else np.concatenate([[0.0], np.geomspace(1e-2, 300.0, 31)])
    inflated_by = np.zeros(len(y)) if misfit is None else misfit
    if chi2 is not None:  # a spectrum less noisy than its flux_err: Birge's ratio (`Calibration.inflation`)
        ratio = noise_ratio(chi2)[:, None]
        var_a, fit_part = var_a * ratio, fit_part * ratio
    defect = np.zeros(len(y), bool) if fitted is None or excess is None else handled_defect(excess)

    def strata_of(b: int) -> list[np.ndarray]:
        """The rows of SNR bin b in strata of chi^2 and, apart, those with a defect and those with a
        misfit."""
        inside = which == b
        misfits = np.flatnonzero(inside & (inflated_by > 0))
        clean, apart = (np.flatnonzero(inside & (inflated_by == 0) & (defect == d)) for d in (False, True))
        ordered = clean[np.argsort(total[clean], kind="stable")]
        return [rows for rows in (*np.array_split(ordered, strata), apart, misfits) if len(rows)]

    cells = [strata_of(b) for b in range(bins)]
    hats = knot_weights(log_snr, knots)
    resid2 = (y - mean) ** 2
    defect_variance = None
    if defect.any():
        losses = [_fit_scales(resid2, var_a * np.where(defect[:, None], d, 1.0) + fit_part, var_e,
                              inflated_by, cells, inflations, hats)[3] for d in DEFECT_FACTORS]
        defect_variance = np.asarray(DEFECT_FACTORS)[np.argmin(losses, axis=0)]
        var_a = var_a * np.where(defect[:, None], defect_variance[None, :], 1.0)
    var_a = var_a + fit_part
    label_knots, label_which, label_scale = None, None, None
    if label is not None:
        label_knots, label_which = equal_count_bins(network[:, label], label_bins)
        label_scale = np.ones((y.shape[1], label_bins))
    for round_ in range(label_rounds + 1 if label is not None else 1):  # the scales fitted last
        l2 = Calibration(knots, np.ones((y.shape[1], bins)), np.zeros(y.shape[1]), label=label,
                         label_knots=label_knots, label_scale=label_scale).label_factor(network) ** 2
        scale, floor, inflation, _ = _fit_scales(resid2, l2 * var_a, l2 * var_e, inflated_by, cells,
                                                 inflations, hats)
        if label is None or round_ == label_rounds:
            break
        cal = Calibration(knots, scale, floor, chi2_inflation=inflation, label=label, label_knots=label_knots,
                          label_scale=label_scale)
        var_a_cal, var_e_cal = cal.apply(log_snr, var_a * cal.inflation(np.ones(len(y)), inflated_by), var_e,
                                         mean=network)
        z = np.sqrt(resid2 / (var_a_cal + var_e_cal))
        for k in range(y.shape[1]):
            factors = np.array([fit_sigma_scale(z[label_which == b, k]) for b in range(label_bins)])
            label_scale[k] *= factors / np.exp(np.mean(np.log(factors[label_which])))
    return Calibration(knots, scale, floor, weight, None if excess is None else gain,
                       None if misfit is None else inflation, fit_weight, defect_variance, label=label,
                       label_knots=label_knots, label_scale=label_scale)


def _fit_scales(resid2: np.ndarray, var_a: np.ndarray, var_e: np.ndarray, misfit: np.ndarray, cells: list,
                inflations: np.ndarray, hats: np.ndarray) -> tuple[np.ndarray, ...]:
    """(scale [K, bins], floor [K], inflation [K], loss [K]) of `fit_snr_calibration` for squared
    residuals and variances [N, K], the rows' misfit [N], `cells` (rows per SNR bin and stratum), the
    candidate inflations and the rows' knot weights (`knot_weights` [N, bins]): the floor and inflation
    chosen with one scale per bin, the scales then refined at the knots (`_knot_scales`)."""
    growth = misfit_growth(misfit)
    half2 = np.array([norm.ppf(0.5 + q / 2) for q in LEVELS]) ** 2
    s2_grid = np.exp(np.linspace(np.log(0.1), np.log(30.0), 600)) ** 2
    k_targets, bins = resid2.shape[1], len(cells)
    scale, floor, inflation = np.ones((k_targets, bins)), np.zeros(k_targets), np.zeros(k_targets)
    loss_of = np.zeros(k_targets)
    for k in range(k_targets):
        typical = float(np.median(np.sqrt(resid2[:, k])))
        floors = np.concatenate([[0.0], typical * np.geomspace(1e-2, 3.0, 48)])
        best = (np.inf, 0.0, 0.0, None)
        for c in inflations:
            var = (1.0 + c * growth) * var_a[:, k] + var_e[:, k]
            for f in floors:
                total, scales = 0.0, []
                for strata_of_bin in cells:
                    loss = np.zeros(len(s2_grid))
                    for rows in strata_of_bin:
                        for h2, q, miss_weight in zip(half2, LEVELS, LEVEL_WEIGHTS, strict=True):
                            # covered at scale s <=> s^2 >= (resid^2 / z_q^2 - f^2) / var; where
                            # var is 0 (d = 0 and no fit variance) the floor alone decides: -inf or inf
                            with np.errstate(divide="ignore", invalid="ignore"):
                                need = np.sort((resid2[rows, k] / h2 - f**2) / var[rows])
                            covered = np.searchsorted(need, s2_grid, side="right") / len(rows)
                            loss += miss_weight * len(rows) * (covered - q) ** 2
                    i = int(np.argmin(loss))
                    total += float(loss[i])
                    scales.append(np.sqrt(s2_grid[i]))
                if total < best[0] - 1e-6:  # a larger floor or inflation must do strictly better
                    best = (total, f, c, scales)
        _, floor[k], inflation[k], scales = best
        var = (1.0 + inflation[k] * growth) * var_a[:, k] + var_e[:, k]
        scale[k], loss_of[k] = _knot_scales(resid2[:, k], var, floor[k], cells, hats, np.asarray(scales))
    return scale, floor, inflation, loss_of


def _knot_scales(resid2: np.ndarray, var: np.ndarray, floor: float, cells: list, hats: np.ndarray,
                 scales: np.ndarray, sweeps: int = 3, reach: float = 0.25,
                 steps: int = 101) -> tuple[np.ndarray, float]:
    """(scales at the knots [bins], loss) for one target: its squared residuals and variances [N] with
    `floor`, applied as the engine applies them, sigma^2 = s(row)^2 var + floor^2 with s piecewise
    linear between the knots (`hats`, `knot_weights`), not constant across each bin as `scales` (one
    per bin, the start) were fitted: rows between two knots take a mixture of their scales, which
    leaves a bin's rows on the side of a steeper neighbour covered more than those on the other side.
    Coordinate descent: each knot's scale in turn over a log grid of +-`reach` around it, `sweeps`
    times, each move scored by `fit_snr_calibration`'s loss over the cells of the bins it reaches."""
    half2 = np.array([norm.ppf(0.5 + q / 2) for q in LEVELS]) ** 2
    bins = len(cells)

    def loss(s_rows: np.ndarray, reached: range) -> np.ndarray:
        """The loss of the cells of the bins `reached` for scales at the rows [..., N]."""
        out = 0.0
        for rows in (rows for b in reached for rows in cells[b]):
            var_rows = s_rows[..., rows] ** 2 * var[rows] + floor**2
            for h2, q, miss_weight in zip(half2, LEVELS, LEVEL_WEIGHTS, strict=True):
                covered = np.mean(resid2[rows] / h2 <= var_rows, axis=-1)
                out = out + miss_weight * len(rows) * (covered - q) ** 2
        return out

    s = scales.astype(np.float64)
    for _ in range(sweeps):
        for q in range(bins):
            candidates = s[q] * np.exp(np.linspace(-reach, reach, steps))
            others = hats @ s - hats[:, q] * s[q]
            s[q] = candidates[np.argmin(loss(others + hats[:, q] * candidates[:, None],
                                             range(max(q - 1, 0), min(q + 2, bins))))]
    return s, float(loss(hats @ s, range(bins)))
