"""`starcast train CONFIG.toml` end to end: data -> training -> recalibration -> bundle.

Recalibration and the OOD thresholds are fitted on the validation split from the full M x S
Monte-Carlo prediction of the exported weights (the deployed CPU kernel, masks and default S).
Validation and test metrics, the epoch log and the provenance go into the manifest; the epoch log
also to `report/training_log.csv` in the bundle.
"""

from __future__ import annotations

import csv
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.bundle import INPUT_CENTRE, MANIFEST_FILE, REPORT_DIR, WEIGHTS_FILE, save_bundle
from ..engine.calibration import Calibration
from ..engine.emulator import EMULATOR_FILE
from ..errors import OutputError
from ..kernels.reference import ensemble_stats_cpu
from ..kernels.rng import MASK_BITS, effective_p, id_keys
from .calibrate import calibration_factors, epistemic_thresholds, fit_snr_calibration
from .config import UNITS, ArchitectureConfig, TrainConfig
from .data import Dataset, load_dataset
from .export import code_version, export_layers, target_entries
from .gridsource import GridSource
from .metrics import summary
from .train import Standardiser, TrainResult, train_ensemble


def predict_physical(layers: list, arch: ArchitectureConfig, std: Standardiser, x: np.ndarray,
                     ids: np.ndarray, *, samples: int, seed: int,
                     calibration: np.ndarray | Calibration | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sigma_aleatoric, sigma_epistemic), [N, K] in physical units, calibrated if given (one
    factor per target, or the SNR-conditional `Calibration`): the exported weights through the
    engine's CPU kernel with the deployed dropout masks (keyed by id), i.e. the numbers `starcast
    run` gives these rows with the same seed and S."""
    factors = calibration.tolist() if isinstance(calibration, np.ndarray) else None
    mean, var_a, var_e = ensemble_stats_cpu(
        torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(id_keys(ids)), layers,
        p=arch.dropout, samples=samples, seed=seed, activation=arch.activation, var_eps=arch.var_eps,
        label_mean=std.y_mean.tolist(), label_std=std.y_std.tolist(), calibration=factors,
        dtype=torch.float64)
    var_a, var_e = var_a.numpy(), np.maximum(var_e.numpy(), 0.0)
    if isinstance(calibration, Calibration):
        var_a, var_e = calibration.apply(log_snr_of(x, arch), var_a, var_e, mean=mean.numpy())
    return mean.numpy(), np.sqrt(var_a), np.sqrt(var_e)


def log_snr_of(x: np.ndarray, arch: ArchitectureConfig) -> np.ndarray:
    """The log10_snr feature column of model inputs x [N, D + E]."""
    return x[:, x.shape[1] - len(arch.features) + list(arch.features).index("log10_snr")].astype(np.float64)


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


@dataclass(frozen=True)
class Trained:
    path: Path  # the bundle directory
    result: TrainResult  # the in-memory ensemble, its standardisation and history
    dataset: Dataset


def train_from_config(cfg: TrainConfig, *, output: str | Path | None = None, progress: bool = True,
                      dataset: Dataset | None = None, overwrite: bool = False) -> Trained:
    """Train, recalibrate and export the bundle described by `cfg` (to `output`, default the
    config's), optionally on an already loaded `dataset`. A folder that is not empty is refused
    before any work unless `overwrite`, and then only if it holds nothing but a bundle's files, which
    are removed just before the new bundle is written."""
    out = Path(output or cfg.output)
    check_output(out, overwrite)
    source = GridSource(cfg, progress=progress) if cfg.data.grid else None
    if dataset is not None:
        data = dataset
    elif source is not None:
        data = source.dataset(source.epoch(1))
    else:
        data = load_dataset(cfg, progress=progress)
    x_tr, y_tr, _, _ = data.part("train")
    x_va, y_va, _, id_va = data.part("val")
    x_te, y_te, _, id_te = data.part("test")
    arch, cal = cfg.architecture, cfg.calibration
    result = train_ensemble(x_tr, y_tr, x_va, y_va, arch, cfg.training, x_noisy=data.x_noisy,
                            epoch_data=None if source is None else source.epoch, progress=progress)
    layers, std = export_layers(result.model, result.standardiser), result.standardiser
    mean, ale, epi = predict_physical(layers, arch, std, x_va, id_va, samples=cal.samples, seed=cal.seed)
    names = cfg.data.targets
    if "log10_snr" in arch.features:
        calibration = fit_snr_calibration(y_va, mean, ale**2, epi**2, log_snr_of(x_va, arch),
                                          label=cal.label_index(names))
        factors = np.ones(len(names))
    else:
        factors = calibration = calibration_factors(y_va, mean, np.hypot(ale, epi), cal.method)
    mean_va, ale_va, epi_va = predict_physical(layers, arch, std, x_va, id_va, samples=cal.samples,
                                               seed=cal.seed, calibration=calibration)
    thresholds = epistemic_thresholds(epi_va, cal.ood_quantile,
                                      log_snr_of(x_va, arch) if "log10_snr" in arch.features else None)
    metrics = {"val_uncalibrated": split_metrics(names, y_va, mean, np.hypot(ale, epi)),
               "val": split_metrics(names, y_va, mean_va, np.hypot(ale_va, epi_va))}
    if len(y_te):
        mean_te, ale_te, epi_te = predict_physical(layers, arch, std, x_te, id_te, samples=cal.samples,
                                                   seed=cal.seed, calibration=calibration)
        metrics["test"] = split_metrics(names, y_te, mean_te, np.hypot(ale_te, epi_te))
    targets = target_entries(names, UNITS, std, y_tr, factors)
    if source is not None:
        for t in targets:
            t["min"], t["max"] = (float(v) for v in source.label_range(t["name"]))
            if t["name"] == "vsini":  # never negative; below the instrument's FWHM an upper limit
                t["physical_min"], t["upper_limit_below"] = 0.0, source.vsini_resolution_limit()
    manifest = {
        "name": cfg.name,
        "targets": targets,
        "grid": cfg.grid,
        "preprocess": _preprocess_dict(cfg),
        INPUT_CENTRE: std.x_mean.tolist(),  # centres the GPU kernel's 16-bit inputs (rounding only)
        "input": {"medium": cfg.grid.medium, "features": list(arch.features),
                  **({} if source is None else source.input_requirements())},
        **({"calibration": calibration.to_manifest(list(names))} if isinstance(calibration, Calibration)
           else {}),
        "architecture": {"input_dim": int(x_tr.shape[1]), "hidden": list(arch.hidden),
                         "activation": arch.activation, "dropout": arch.dropout,
                         # the rate the masks apply: p quantised to the RNG's 16-bit resolution
                         "dropout_effective": effective_p(arch.dropout), "mask_bits": MASK_BITS,
                         "members": arch.members, "samples": arch.samples, "var_eps": arch.var_eps},
        "ood": {"epistemic_sigma_threshold": {n: t.to_manifest()
                                              for n, t in zip(names, thresholds, strict=True)},
                "quantile": cal.ood_quantile},
        "provenance": {
            "config": cfg.to_dict(), "config_file": cfg.source, "data_sha256": cfg.data_hash(),
            "rows": {s: int((data.split == s).sum()) for s in ("train", "val", "test")},
            "rows_dropped_by_preprocessing": data.dropped,
            "seeds": list(cfg.training.seeds), "code_version": code_version(),
            "torch": torch.__version__, "python": platform.python_version(),
            "epochs_run": len(result.history), "best_epoch_per_member": result.best_epochs,
            "train_seconds": round(result.seconds, 1),
            "augmentation": {"noisier_copies": 0 if data.x_noisy is None else len(data.x_noisy),
                             "prob": cfg.training.augment_prob, "snr_min": cfg.training.augment_snr_min},
            "calibration": {"method": cal.method, "samples": cal.samples, "seed": cal.seed,
                            "split": "val"},
            "losses": [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
                       for row in result.history],
        },
        "metrics": metrics,
    }
    for entry in BUNDLE_ENTRIES:
        _remove(out / entry)
    path = save_bundle(out, layers, manifest)
    write_log(result.history, path / REPORT_DIR / "training_log.csv")
    return Trained(path, result, data)


BUNDLE_ENTRIES = (MANIFEST_FILE, WEIGHTS_FILE, EMULATOR_FILE, REPORT_DIR)  # what training writes


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse a bundle folder whose files training would replace or mix with, unless `overwrite`
    and every file there is a bundle's: a model must not be lost to a command run twice."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: not a folder; give --out a folder for the model bundle")
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not present:
        return
    others = [name for name in present if name not in BUNDLE_ENTRIES]
    if others:
        raise OutputError(f"{path}: holds files that are not a model bundle's ({', '.join(others[:5])}); "
                          "give --out an empty or new folder")
    if not overwrite:
        raise OutputError(f"{path}: holds a model bundle ({', '.join(present)}); pass --overwrite to "
                          "replace it, or give --out a new folder")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _preprocess_dict(cfg: TrainConfig) -> dict:
    from ..kernels.preprocess import PreprocessSettings

    return PreprocessSettings.from_dict(cfg.preprocess).to_dict()
