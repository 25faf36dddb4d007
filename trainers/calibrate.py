"""Post-hoc recalibration on the validation split: one multiplier per target on the predictive sigma,
and the epistemic-sigma thresholds that flag out-of-distribution rows.

The scale is stored as `targets[i].calibration` in the manifest and applied by every backend
(`var *= calibration**2`). No isotonic map: a single scale keeps the Gaussian form the engine reports.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

LEVELS = (0.68, 0.95)  # the central intervals the scale is fitted to cover


def fit_sigma_scale(z: np.ndarray, method: str = "coverage") -> float:
    """The factor c on sigma given z = |y - mean| / sigma over the validation rows.

    `nll`: the closed-form minimiser of the Gaussian NLL in c, c^2 = mean(z^2) (sensitive to tails).
    `coverage`: c minimising the squared misses of the 68% and 95% central-interval coverages,
    sum_q (mean(z <= c z_q) - q)^2, on a fine log grid; robust to a few outliers."""
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
    for q in LEVELS:
        half_width = norm.ppf(0.5 + q / 2)  # 0.994 for 68%, 1.960 for 95%
        covered = np.searchsorted(z, grid * half_width, side="right") / z.size
        loss += (covered - q) ** 2
    best = np.flatnonzero(loss == loss.min())
    return float(np.sqrt(grid[best[0]] * grid[best[-1]]))  # middle of a flat optimum


def calibration_factors(y: np.ndarray, mean: np.ndarray, sigma: np.ndarray,
                        method: str = "coverage") -> np.ndarray:
    """One sigma multiplier per target (columns of [N, K] arrays in the same units)."""
    z = np.abs(y - mean) / sigma
    return np.array([fit_sigma_scale(z[:, k], method) for k in range(y.shape[1])])


def epistemic_thresholds(sigma_epistemic: np.ndarray, quantile: float = 0.995) -> np.ndarray:
    """Per-target threshold on the (calibrated, physical-unit) epistemic sigma above which the
    predictor flags HIGH_EPISTEMIC: the given quantile over the validation rows ([N, K] in)."""
    return np.quantile(sigma_epistemic, quantile, axis=0)
