"""Tiny labelled spectra for trainer tests: a few Gaussian absorption lines whose depth and width
depend smoothly on three labels, plus white noise at a known SNR. Seconds to train on, not physics."""

import numpy as np
import pytest


def toy_spectra(n: int, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.uniform([15000.0, 2.0, 10.0], [30000.0, 4.5, 300.0], size=(n, 3))
    u = (y - [15000.0, 2.0, 10.0]) / [15000.0, 2.5, 290.0]
    pix = np.arange(d)[None, :]
    x = np.ones((n, d))
    for centre, k in ((0.2 * d, 0), (0.5 * d, 1), (0.8 * d, 2)):
        depth, width = 0.2 + 0.5 * u[:, [k]], 1.5 + 4.0 * u[:, [(k + 1) % 3]]
        x -= depth * np.exp(-0.5 * ((pix - centre) / width) ** 2)
    snr = rng.uniform(50, 300, n)
    x += rng.normal(size=x.shape) / snr[:, None]
    return x.astype(np.float32), y, snr


@pytest.fixture(scope="session")
def toy():
    return toy_spectra(1200)


@pytest.fixture(scope="session")
def make_toy():
    return toy_spectra


def tiny_grid_config(tlusty_grid, work, *, name: str, val_rows: int, epochs: int, metals=None):
    """A training config on a 5 x 5 block of TLUSTY nodes around 22 kK / log g 3.75 (4400-4560 A),
    one validation and one test node left out; trains in seconds. With `metals` (a span in dex), the
    metal lines are drawn within it and `metals` is a fourth target."""
    from starcast.catalogs.grids import write_npz
    from starcast.trainers.config import parse_config

    t, g = tlusty_grid.params["teff"], tlusty_grid.params["logg"]
    block = tlusty_grid.select((np.abs(t - 22000) <= 2000) & (np.abs(g - 3.75) <= 0.5)).crop(4400.0, 4560.0)
    write_npz(block, work / "block.npz")
    return parse_config({
        "name": name, "output": str(work / "bundle"),
        "data": {"grid": {"path": str(work / "block.npz"), "cache": str(work / "cache"),
                          "val_nodes": [[22000, 4.0]], "test_nodes": [[21000, 3.75]],
                          "per_epoch": 1500, "val_rows": val_rows, "test_rows": 300,
                          "observation": {"start": 4420.0, "step": 0.2, "npix": 601},
                          "perturbations": {"teff": [20000.0, 24000.0], "logg": [3.25, 4.25],
                                            **({} if metals is None else {"metals": list(metals)})}},
                 **({} if metals is None else {"targets": ["teff", "logg", "vsini", "metals"]})},
        "grid": {"kind": "linear", "start": 4430.0, "step": 0.4, "n": 251, "medium": "air"},
        "architecture": {"hidden": [32, 32], "dropout": 0.0, "members": 2, "samples": 1, "input_rank": 32,
                         "features": ["log10_snr"]},
        "training": {"epochs": epochs, "batch_size": 128, "lr": 3e-3, "seeds": [0, 1], "warmup_epochs": 1,
                     "augment_copies": 0, "threads": 1},
        "calibration": {"samples": 1},
    })
