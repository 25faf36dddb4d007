"""Fixtures shared by the engine tests (bundle, predictor, pipelines): small random model bundles.

`bundle_factory` gives `make_bundle`, which builds one of any shape; `tiny_bundle` is the default
used across tests/engine/.
The weights are random (not trained), scaled so outputs stay in a sane standardised range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from starcast.catalogs.schema import WavelengthGrid
from starcast.engine.bundle import save_bundle
from starcast.kernels.preprocess import PreprocessSettings

# OB-star label statistics: mean/std for de-standardisation, [min, max] the training range.
TARGETS = (
    {"name": "teff", "unit": "K", "mean": 25000.0, "std": 8000.0, "min": 10000.0, "max": 50000.0},
    {"name": "logg", "unit": "dex", "mean": 3.8, "std": 0.4, "min": 2.5, "max": 4.75},
    {"name": "vsini", "unit": "km/s", "mean": 150.0, "std": 100.0, "min": 0.0, "max": 450.0},
)
TINY_GRID = WavelengthGrid.linear(4000.0, 1.0, 200)


def make_bundle(path: Path, *, grid: WavelengthGrid = TINY_GRID, hidden=(32, 32), members: int = 3,
                samples: int = 4, dropout: float = 0.1, targets=TARGETS, seed: int = 0,
                preprocess: dict | None = None, ood: dict | None = None, features: tuple[str, ...] = (),
                calibration: dict | None = None) -> Path:
    """Write a random bundle to `path` and return it (`features`: input features after the pixels;
    `calibration`: the manifest's SNR-conditional calibration)."""
    rng = np.random.default_rng(seed)
    widths = [grid.n + len(features), *hidden, 2 * len(targets)]
    layers = []
    for i in range(len(widths) - 1):
        w = rng.normal(0.0, 1.0 / np.sqrt(widths[i]), (members, widths[i], widths[i + 1]))
        b = rng.normal(0.0, 0.1, (members, widths[i + 1]))
        layers.append((w.astype(np.float32), b.astype(np.float32)))
    manifest = {
        "name": "tiny-test",
        "targets": [{**t, "calibration": 1.0} for t in targets],
        "grid": grid,
        "preprocess": preprocess or PreprocessSettings().to_dict(),
        "input": {"features": list(features)},
        **({"calibration": calibration} if calibration is not None else {}),
        "architecture": {"input_dim": widths[0], "hidden": list(hidden), "activation": "relu",
                         "dropout": dropout, "members": members, "samples": samples, "var_eps": 1e-6},
        "ood": ood or {},
        "provenance": {"note": "random weights for tests", "seed": seed},
        "metrics": {},
    }
    return save_bundle(path, layers, manifest)


@pytest.fixture
def bundle_factory():
    """`make_bundle` itself, for tests that need another shape, grid, dropout or OOD threshold."""
    return make_bundle


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A random bundle: 200-pixel linear grid (4000-4199 A), hidden [32, 32], M=3, S=4, p=0.1,
    targets teff/logg/vsini. Returns the bundle directory."""
    return make_bundle(tmp_path / "tiny-test")
