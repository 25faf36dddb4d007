"""Equivalent widths measured on generated spectra follow the spectral-type trends of OB stars."""

import numpy as np
import pytest
from starcast.catalogs import physics
from starcast.catalogs.synth import SynthConfig, compute_spectra

TEFFS = np.arange(15000.0, 30001.0, 1000.0)


def spectra(teff, logg, vsini=10.0):
    """Noise-free rest-frame spectra (normalised) at the given labels."""
    teff, logg = np.broadcast_arrays(np.asarray(teff, float), np.asarray(logg, float))
    n = teff.size
    labels = {"teff": teff.ravel().copy(), "logg": logg.ravel().copy(), "vsini": np.full(n, vsini),
              "snr": np.full(n, 100.0, np.float32), "rv": np.zeros(n), "coeffs": np.zeros((n, 3)),
              "ids": np.arange(n, dtype=np.int64), "split": None}
    arrays = compute_spectra(SynthConfig(n=n), labels, slice(0, n))
    return arrays.wavelength, arrays.normalised.astype(np.float64)


def ew(lam, flux, name, half=3.0):
    """Equivalent width (A) against a straight pseudo-continuum through the window edges."""
    lam0 = physics.LINES[physics.line_index(name)].wavelength
    w = (lam > lam0 - half) & (lam < lam0 + half)
    x, f = lam[w], flux[..., w]
    cont = f[..., :1] + (f[..., -1:] - f[..., :1]) * (x - x[0]) / (x[-1] - x[0])
    return np.sum(1 - f / cont, axis=-1) * (lam[1] - lam[0])


@pytest.fixture(scope="module")
def teff_scan():
    return spectra(TEFFS, np.full(TEFFS.size, 4.0))


def test_he_i_peaks_between_20_and_25_kk(teff_scan):
    lam, flux = teff_scan
    for name in ("He I 4471", "He I 4026", "He I 4388"):
        w = ew(lam, flux, name)
        assert 20000 <= TEFFS[np.argmax(w)] <= 25000, name
        assert w.max() > 1.3 * w[0] and w.max() > 1.3 * w[-1], name


def test_he_ii_appears_above_27_kk(teff_scan):
    lam, flux = teff_scan
    w = ew(lam, flux, "He II 4686")
    assert np.all(w[TEFFS <= 25000] < 0.03)
    assert w[-1] > 0.15
    assert np.all(np.diff(w[TEFFS >= 26000]) > 0)


def test_mg_ii_fades_with_teff(teff_scan):
    lam, flux = teff_scan
    w = ew(lam, flux, "Mg II 4481")
    assert np.all(np.diff(w) < 0)
    assert w[0] > 5 * w[-1]


def test_silicon_ionisation_moves_from_si_iii_to_si_iv_with_teff(teff_scan):
    lam, flux = teff_scan
    si3, si4 = ew(lam, flux, "Si III 4553"), ew(lam, flux, "Si IV 4089")
    ratio = si4 / si3
    assert np.all(np.diff(ratio[TEFFS >= 18000]) > 0)
    assert si3[TEFFS == 20000][0] > 3 * si4[TEFFS == 20000][0]
    assert si4[-1] > si3[-1]


def test_balmer_wings_widen_with_logg():
    logg = np.array([2.5, 3.0, 3.5, 4.0, 4.5])
    lam, flux = spectra(np.full(logg.size, 20000.0), logg)
    hg = physics.LINES[physics.line_index("H gamma")].wavelength
    wing = 1 - flux[:, np.argmin(np.abs(lam - (hg + 8.0)))]
    core = flux < 1 - 0.5 * (1 - flux.min(axis=1, keepdims=True))
    near = np.abs(lam - hg) < 40
    half_depth_width = np.sum(core & near, axis=1)
    assert np.all(np.diff(wing) > 0)
    assert np.all(np.diff(half_depth_width) > 0)
