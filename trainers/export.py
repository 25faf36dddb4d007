"""Export of a trained ensemble to a model bundle (DESIGN.md, "Model bundle").

The input standardisation (and projection) is folded into the first layer, so the exported weights
compute exactly DESIGN.md's numerics on the preprocessed spectrum x: with x_s = (x - mu) P,
x_s W1 + b1 = x (P W1) + (b1 - (mu P) W1). Folding is done in float64, stored as float32.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .ensemble import EnsembleMLP
from .train import Standardiser


def export_layers(model: EnsembleMLP, std: Standardiser) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The bundle's `layers = [(W [M,in,out], b [M,out]), ...]`, float32, standardisation folded in."""
    layers = [(w.detach().double().clone(), b.detach().double().clone())
              for w, b in zip(model.weights, model.biases, strict=True)]
    w1, b1 = layers[0]
    proj = torch.from_numpy(std.projection)
    shift = torch.from_numpy(std.x_mean) @ proj
    layers[0] = (torch.einsum("dr,mrh->mdh", proj, w1), b1 - torch.einsum("r,mrh->mh", shift, w1))
    return [(w.float().contiguous(), b.float().contiguous()) for w, b in layers]


def code_version() -> str:
    """The package version plus the git commit of the source tree (and `-dirty` if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{__version__}+{commit}"


def target_entries(names: tuple[str, ...], units: dict[str, str], std: Standardiser, y_train: np.ndarray,
                   calibration: np.ndarray) -> list[dict]:
    """The manifest's `targets`: unit, label mean/std, training range, sigma calibration factor."""
    return [{"name": name, "unit": units.get(name, ""), "mean": float(std.y_mean[k]),
             "std": float(std.y_std[k]), "min": float(y_train[:, k].min()),
             "max": float(y_train[:, k].max()), "calibration": float(calibration[k])}
            for k, name in enumerate(names)]
