"""`starcast train CONFIG.toml` end to end: data -> training -> recalibration -> bundle.

Recalibration and the OOD thresholds are fitted on the validation split from the full M x S
Monte-Carlo prediction (the deployed default S); validation and test metrics, the epoch log and
the provenance go into the manifest, and the log also to `report/training_log.csv` in the bundle.
"""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import numpy as np
import torch

from ..engine.bundle import save_bundle
from .calibrate import calibration_factors, epistemic_thresholds
from .config import UNITS, TrainConfig
from .data import Dataset, load_dataset
from .ensemble import mc_stats
from .export import code_version, export_layers, target_entries
from .metrics import summary
from .train import TrainResult, train_ensemble


def predict_physical(result: TrainResult, x: np.ndarray, *, samples: int, seed: int,
                     calibration: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sigma_aleatoric, sigma_epistemic), [N, K] in physical units, calibrated if given."""
    mean, ale, epi = mc_stats(result.model, result.standardiser.x(x), samples=samples, seed=seed)
    s = result.standardiser
    c = np.ones_like(s.y_std) if calibration is None else calibration
    return (mean.numpy() * s.y_std + s.y_mean, np.sqrt(ale.numpy()) * s.y_std * c,
            np.sqrt(epi.numpy()) * s.y_std * c)


def split_metrics(names: tuple[str, ...], y: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> dict:
    out = {}
    for k, name in enumerate(names):
        m = summary(y[:, k], mean[:, k], sigma[:, k])
        m.pop("calibration_curve")
        out[name] = m
    return out


def write_log(history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def train_from_config(cfg: TrainConfig, *, output: str | Path | None = None, progress: bool = True,
                      dataset: Dataset | None = None) -> Path:
    """Train, recalibrate and export the bundle described by `cfg`; returns the bundle directory."""
    data = dataset if dataset is not None else load_dataset(cfg, progress=progress)
    x_tr, y_tr, snr_tr, _ = data.part("train")
    x_va, y_va, _, _ = data.part("val")
    x_te, y_te, _, _ = data.part("test")
    result = train_ensemble(x_tr, y_tr, x_va, y_va, cfg.architecture, cfg.training, snr_train=snr_tr,
                            progress=progress)
    cal = cfg.calibration
    mean, ale, epi = predict_physical(result, x_va, samples=cal.samples, seed=cal.seed)
    factors = calibration_factors(y_va, mean, np.hypot(ale, epi), cal.method)
    thresholds = epistemic_thresholds(epi * factors, cal.ood_quantile)
    names = cfg.data.targets
    metrics = {"val_uncalibrated": split_metrics(names, y_va, mean, np.hypot(ale, epi)),
               "val": split_metrics(names, y_va, mean, np.hypot(ale, epi) * factors)}
    if len(y_te):
        mean_te, ale_te, epi_te = predict_physical(result, x_te, samples=cal.samples, seed=cal.seed,
                                                   calibration=factors)
        metrics["test"] = split_metrics(names, y_te, mean_te, np.hypot(ale_te, epi_te))
    arch = cfg.architecture
    manifest = {
        "name": cfg.name,
        "targets": target_entries(names, UNITS, result.standardiser, y_tr, factors),
        "grid": cfg.grid,
        "preprocess": _preprocess_dict(cfg),
        "architecture": {"input_dim": int(x_tr.shape[1]), "hidden": list(arch.hidden),
                         "activation": arch.activation, "dropout": arch.dropout,
                         "members": arch.members, "samples": arch.samples, "var_eps": arch.var_eps},
        "ood": {"epistemic_sigma_threshold": {n: float(t) for n, t in zip(names, thresholds, strict=True)},
                "quantile": cal.ood_quantile},
        "provenance": {
            "config": cfg.to_dict(), "config_file": cfg.source, "data_sha256": cfg.data_hash(),
            "rows": {s: int((data.split == s).sum()) for s in ("train", "val", "test")},
            "rows_dropped_by_preprocessing": data.dropped,
            "seeds": list(cfg.training.seeds), "code_version": code_version(),
            "torch": torch.__version__, "python": platform.python_version(),
            "epochs_run": len(result.history), "best_epoch_per_member": result.best_epochs,
            "train_seconds": round(result.seconds, 1),
            "augmentation_noise_per_snr": result.noise_per_snr,
            "calibration": {"method": cal.method, "samples": cal.samples, "seed": cal.seed,
                            "split": "val"},
            "losses": [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
                       for row in result.history],
        },
        "metrics": metrics,
    }
    path = save_bundle(Path(output or cfg.output), export_layers(result.model, result.standardiser), manifest)
    write_log(result.history, path / "report" / "training_log.csv")
    return path


def _preprocess_dict(cfg: TrainConfig) -> dict:
    from ..kernels.preprocess import PreprocessSettings

    return PreprocessSettings.from_dict(cfg.preprocess).to_dict()
