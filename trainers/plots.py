"""The PNG plots of an evaluation report (matplotlib, Agg backend, no display needed).

One function per figure, each taking the evaluation arrays and writing one file: predicted vs true
with error bars, residuals vs each true parameter (with the binned bias), calibration curves, a Kiel
diagram (Teff vs log g) coloured by sigma, sigma vs SNR, and epistemic sigma in- vs out-of-distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import UNITS  # noqa: E402
from .metrics import binned_bias, calibration_curve  # noqa: E402

MAX_POINTS = 3000  # scatter plots show a random subset so they stay readable


@dataclass(frozen=True)
class EvalArrays:
    names: tuple[str, ...]
    y: np.ndarray  # (N, K) truth
    mean: np.ndarray  # (N, K) prediction
    sigma: np.ndarray  # (N, K) total sigma
    sigma_aleatoric: np.ndarray
    sigma_epistemic: np.ndarray
    snr: np.ndarray | None = None
    ood_sigma_epistemic: np.ndarray | None = None  # (N_ood, K), when an OOD set was evaluated


def _label(name: str) -> str:
    return f"{name} [{UNITS[name]}]" if name in UNITS else name


def _subset(n: int, seed: int = 0) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, MAX_POINTS, replace=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pred_vs_true(a: EvalArrays, path: Path) -> Path:
    k = len(a.names)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 4.4), squeeze=False)
    idx = _subset(len(a.y))
    for j, (ax, name) in enumerate(zip(axes[0], a.names, strict=True)):
        lo, hi = a.y[:, j].min(), a.y[:, j].max()
        ax.errorbar(a.y[idx, j], a.mean[idx, j], yerr=a.sigma[idx, j], fmt=".", ms=2, lw=0.4,
                    alpha=0.4, color="tab:blue", ecolor="tab:gray")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {_label(name)}")
        ax.set_ylabel(f"predicted {_label(name)}")
    return _save(fig, path)


def residuals(a: EvalArrays, path: Path) -> Path:
    k = len(a.names)
    fig, axes = plt.subplots(k, k, figsize=(4.2 * k, 3.2 * k), squeeze=False)
    idx = _subset(len(a.y))
    for i, name in enumerate(a.names):
        r = a.mean[:, i] - a.y[:, i]
        for j, param in enumerate(a.names):
            ax = axes[i, j]
            ax.scatter(a.y[idx, j], r[idx], s=2, alpha=0.3, color="tab:blue", rasterized=True)
            bins = binned_bias(a.y[:, j], r, a.sigma[:, i])
            centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
            ax.plot(centres, [b["bias"] for b in bins], "o-", color="tab:red", ms=3, label="binned bias")
            ax.fill_between(centres, [-b["median_sigma"] for b in bins], [b["median_sigma"] for b in bins],
                            color="tab:orange", alpha=0.2, label="median sigma")
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xlabel(f"true {_label(param)}")
            if j == 0:
                ax.set_ylabel(f"residual {_label(name)}")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def calibration(a: EvalArrays, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for j, name in enumerate(a.names):
        expected, observed = calibration_curve(a.y[:, j], a.mean[:, j], a.sigma[:, j])
        ax.plot(expected, observed, lw=1.5, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for q in (0.68, 0.95):
        ax.axvline(q, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("expected fraction inside the central interval")
    ax.set_ylabel("observed fraction")
    ax.legend(fontsize=8)
    return _save(fig, path)


def kiel(a: EvalArrays, path: Path) -> Path | None:
    if not {"teff", "logg"} <= set(a.names):
        return None
    t, g = a.names.index("teff"), a.names.index("logg")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    idx = _subset(len(a.y))
    for ax, j in zip(axes, (t, g), strict=True):
        sc = ax.scatter(a.mean[idx, t], a.mean[idx, g], c=a.sigma[idx, j], s=4, cmap="viridis",
                        vmax=np.quantile(a.sigma[:, j], 0.98), rasterized=True)
        fig.colorbar(sc, ax=ax, label=f"sigma {_label(a.names[j])}")
        ax.invert_xaxis()
        ax.invert_yaxis()  # Kiel diagram convention: hot stars left, dwarfs at the bottom
        ax.set_xlabel("predicted teff [K]")
        ax.set_ylabel("predicted logg [dex]")
    return _save(fig, path)


def sigma_vs_snr(a: EvalArrays, path: Path) -> Path | None:
    if a.snr is None:
        return None
    k = len(a.names)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 4.0), squeeze=False)
    idx = _subset(len(a.y))
    for j, (ax, name) in enumerate(zip(axes[0], a.names, strict=True)):
        for sig, label, colour in ((a.sigma, "total", "k"), (a.sigma_aleatoric, "aleatoric", "tab:blue"),
                                   (a.sigma_epistemic, "epistemic", "tab:red")):
            ax.scatter(a.snr[idx], sig[idx, j], s=2, alpha=0.3, color=colour, label=label, rasterized=True)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SNR")
        ax.set_ylabel(f"sigma {_label(name)}")
        ax.legend(fontsize=7, markerscale=4)
    return _save(fig, path)


def ood_histograms(a: EvalArrays, path: Path) -> Path | None:
    if a.ood_sigma_epistemic is None or len(a.ood_sigma_epistemic) == 0:
        return None
    k = len(a.names)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 3.8), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], a.names, strict=True)):
        both = np.concatenate([a.sigma_epistemic[:, j], a.ood_sigma_epistemic[:, j]])
        bins = np.geomspace(max(both.min(), 1e-12), both.max(), 50)
        ax.hist(a.sigma_epistemic[:, j], bins=bins, alpha=0.6, density=True, label="in distribution")
        ax.hist(a.ood_sigma_epistemic[:, j], bins=bins, alpha=0.6, density=True, label="out of distribution")
        ax.set_xscale("log")
        ax.set_xlabel(f"epistemic sigma {_label(name)}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(a: EvalArrays, out: Path) -> list[Path]:
    """All figures that apply to `a`, as PNGs in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    made = [pred_vs_true(a, out / "pred_vs_true.png"), residuals(a, out / "residuals.png"),
            calibration(a, out / "calibration.png"), kiel(a, out / "kiel.png"),
            sigma_vs_snr(a, out / "sigma_vs_snr.png"), ood_histograms(a, out / "ood_epistemic.png")]
    return [p for p in made if p is not None]
