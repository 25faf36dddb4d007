"""Evaluation metrics for predictions with Gaussian uncertainties: accuracy (RMSE, MAE, bias), NLL,
coverage of central intervals, the calibration curve and its mean absolute error, sharpness, bias
in bins of a true parameter, and AUROC of a score that should single out out-of-distribution rows.

Definitions follow uncertainty-toolbox (Chung et al. 2021) so the numbers can be checked against it:
sharpness = sqrt(mean(sigma^2)); calibration curve over central intervals at 100 levels in [0, 1].
Plain numpy on 1-D arrays of one target; `evaluate.py` loops over targets and writes the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.stats import norm, rankdata

CURVE_LEVELS = np.linspace(0.0, 1.0, 100)  # expected proportions, as uncertainty-toolbox


def calibration_curve(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
                      levels: np.ndarray = CURVE_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed): observed fraction of rows inside the central interval of each level."""
    z = np.abs(y - mean) / sigma
    half_width = norm.ppf(0.5 + levels / 2.0)
    return levels, (z[:, None] <= half_width[None, :]).mean(axis=0)


def coverage(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray, level: float) -> float:
    """Fraction of rows whose truth lies inside the central `level` interval mean +- z sigma."""
    return float(np.mean(np.abs(y - mean) <= norm.ppf(0.5 + level / 2.0) * sigma))


def summary(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> dict:
    """Accuracy, Gaussian NLL (mean per row, natural log), coverage and calibration of one target."""
    r = mean - y
    expected, observed = calibration_curve(y, mean, sigma)
    nll = 0.5 * np.log(2 * math.pi * sigma**2) + 0.5 * (r / sigma) ** 2
    return {
        "n": int(y.size),
        "rmse": float(np.sqrt(np.mean(r**2))),
        "mae": float(np.mean(np.abs(r))),
        "bias": float(np.mean(r)),
        "nll": float(np.mean(nll)),
        "coverage_68": coverage(y, mean, sigma, 0.68),
        "coverage_95": coverage(y, mean, sigma, 0.95),
        "sharpness": float(np.sqrt(np.mean(sigma**2))),
        "median_sigma": float(np.median(sigma)),
        "calibration_error": float(np.mean(np.abs(observed - expected))),
        "calibration_curve": {"expected": expected.round(4).tolist(), "observed": observed.round(4).tolist()},
    }


def binned_bias(param: np.ndarray, residual: np.ndarray, sigma: np.ndarray, bins: int = 8,
                min_rows: int = 10) -> list[dict]:
    """Mean residual in equal-width bins of a true parameter, with its standard error (the residuals'
    standard deviation over sqrt(n): how far a bias of 0 would stray in such a sample), the bin's
    median sigma and whether |bias| < median sigma / 4 (the goal). Bins with fewer than `min_rows`
    rows are skipped."""
    if len(param) == 0:
        return []
    edges = np.linspace(param.min(), param.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, param, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.sum() < min_rows:
            continue
        bias, med = float(residual[sel].mean()), float(np.median(sigma[sel]))
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                    "bias": bias, "bias_se": float(residual[sel].std(ddof=1) / np.sqrt(sel.sum())),
                    "median_sigma": med, "ok": bool(abs(bias) < 0.25 * med)})
    return out


def worst_bias(bins_by_parameter: Iterable[list[dict]]) -> tuple[float, float]:
    """(|bias| / median sigma, standard error / median sigma) of the worst of `binned_bias`'s bins of
    one target in bins of each true parameter (NaN without a bin whose ratio is finite): what issue 9's
    bias goal reads."""
    ratios = [(abs(b["bias"]) / b["median_sigma"], b["bias_se"] / b["median_sigma"])
              for bins in bins_by_parameter for b in bins if b["median_sigma"] > 0]
    return max((r for r in ratios if math.isfinite(r[0])), default=(math.nan, math.nan))


ISSUE_SNR_EDGES = (10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 400.0)  # issue 9's SNR bins
SNR_EDGES = (0.0, *ISSUE_SNR_EDGES, np.inf)  # and beyond them
VSINI_EDGES = (0.0, 40.0, 80.0, 140.0, 220.0, 320.0, np.inf)  # km/s, of the predicted v sin i


def coverage_in_bins(values: np.ndarray, y: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
                     edges=SNR_EDGES, name: str = "snr") -> list[dict]:
    """Coverage of the 68% and 95% intervals, RMSE and bias in bins of `values` (`name`: the keys
    `{name}_lo`, `{name}_hi`), e.g. SNR: calibration on average can hide sigmas that do not follow the
    noise (too narrow at low SNR, too wide at high SNR). Empty bins are skipped."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (values >= lo) & (values < hi)
        if sel.any():
            out.append({f"{name}_lo": float(lo), f"{name}_hi": float(hi), "n": int(sel.sum()),
                        "rmse": float(np.sqrt(np.mean((mean[sel] - y[sel]) ** 2))),
                        "bias": float(np.mean(mean[sel] - y[sel])),
                        "coverage_68": coverage(y[sel], mean[sel], sigma[sel], 0.68),
                        "coverage_95": coverage(y[sel], mean[sel], sigma[sel], 0.95)})
    return out


def auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """Area under the ROC curve for telling `score_out` (positives) from `score_in` by a high score:
    the Mann-Whitney U statistic / (n_in n_out), ties counted half."""
    scores = np.concatenate([score_in, score_out])
    ranks = rankdata(scores)
    n_in, n_out = len(score_in), len(score_out)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))
