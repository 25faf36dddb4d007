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
