"""The emulator fit's chunks of rows run side by side on threads (`Emulator.chi2`): the same fit as one
after the other, on the shipped emulator's own spectra, clean and with what makes it fit again."""

from dataclasses import fields

import numpy as np
import pytest
from starcast.engine.emulator import _blas_threads
from threadpoolctl import threadpool_limits

import starcast

ROWS = 48


def _spectra(emulator, rng) -> tuple[np.ndarray, np.ndarray]:
    """(x [ROWS, D], labels [ROWS, k]): emulated spectra at SNR 150 around the labels' mean, a third
    of them clean, a third behind 10% of light without lines and a third under a 2% ripple."""
    labels = emulator.label_mean + rng.uniform(-1.0, 1.0, (ROWS, len(emulator.labels))) * emulator.label_std
    labels[:, emulator.labels.index("vsini")] = rng.uniform(30.0, 300.0, ROWS)
    x = emulator.spectra(labels).astype(np.float64)
    third = ROWS // 3
    x[third:2 * third] = (x[third:2 * third] + 0.1) / 1.1
    x[2 * third:] *= 1.0 + 0.02 * np.sin(2.0 * np.pi * emulator.wavelength / 40.0)
    x += rng.normal(0.0, 1.0 / 150.0, x.shape)
    return x.astype(np.float32), labels


def test_chunks_on_threads_fit_as_one_after_the_other():
    emulator = starcast.load_model().emulator
    x, labels = _spectra(emulator, np.random.default_rng(5))
    ivar = np.full_like(x, 150.0**2)
    start = labels + 0.1 * emulator.label_std  # a step for the fit to take
    with threadpool_limits(1, user_api="blas"):
        serial = emulator.chi2(x, ivar, start)
    with threadpool_limits(2, user_api="blas"):
        if _blas_threads() < 2:
            pytest.skip("one core: no threads to fit on")
        threaded = emulator.chi2(x, ivar, start)
        assert _blas_threads() == 2  # the fit restored the limit it found
    assert np.isfinite(serial.veiling).all() and (serial.veil > 0).any() and (serial.ripple_excess > 0).any()
    for f in fields(serial):
        np.testing.assert_allclose(getattr(threaded, f.name), getattr(serial, f.name), rtol=1e-4, atol=1e-6,
                                   err_msg=f.name)
