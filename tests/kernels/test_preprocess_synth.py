"""Preprocessing the synthetic generator's spectra (`starcast.catalogs.synth`), whose truth is known:
the multiplicative continuum it applied and the noise-free, rest-frame, normalised spectrum."""

import numpy as np
import pytest
from starcast.catalogs.synth import SynthConfig, arrays_to_table, synth_arrays
from starcast.kernels.preprocess import PreprocessSettings, preprocess, resample
from starcast.kernels.resample import rest_frame_factor


def survey(n, seed, grid=None, **ranges):
    config = SynthConfig(n=n, seed=seed, **{k: (v, v) if np.isscalar(v) else v for k, v in ranges.items()})
    arrays = synth_arrays(config)
    grid = arrays.wavelength if grid is None else grid
    return arrays, preprocess(arrays_to_table(arrays, config), grid, PreprocessSettings())


@pytest.mark.parametrize("teff,logg,vsini", [
    (15000, 4.75, 0),  # the broadest, deepest Balmer wings of the grid
    (15000, 4.75, 450),
    (20000, 4.0, 200),
    (30000, 4.25, 450),
    (25000, 2.75, 100),
])
def test_generator_continuum_is_recovered_to_half_a_percent_at_snr_50(teff, logg, vsini):
    a, out = survey(8, seed=teff + vsini, teff=teff, logg=logg, vsini=vsini, snr=50.0)
    grid = a.wavelength
    for i in range(8):
        rest = grid * rest_frame_factor(a.rv[i])  # the observed pixels' rest-frame wavelengths
        fitted = resample(rest, a.flux[i].astype(np.float64), grid) / out.x[i]
        truth = resample(rest, a.continuum[i].astype(np.float64), grid)
        assert np.nanmedian(np.abs(fitted / truth - 1)) < 0.005, (i, a.continuum[i][::800])
    assert np.all(out.flags == 0)


@pytest.mark.parametrize("snr", [50.0, 100.0])
def test_preprocessed_generator_spectra_match_the_noise_free_rest_frame_spectrum_within_the_noise(snr):
    a, out = survey(24, seed=11, snr=snr)  # random Teff, log g, v sin i (0-450 km/s) and rv
    for i in range(24):
        good = out.ivar[i] > 0
        z = (out.x[i] - a.normalised[i])[good] * np.sqrt(out.ivar[i][good])
        assert good.mean() > 0.99
        assert np.mean(z**2) < 1.25, (i, a.teff[i], a.logg[i], a.vsini[i])  # chi^2 / dof
        assert np.mean(z**2) > 0.8  # nor is ivar too small (the noise overstated)
        assert abs(np.mean(z)) < 0.25  # continuum bias well under the noise


def test_continuum_is_recovered_when_rebinning_onto_a_coarser_narrower_model_grid():
    grid = 4010.0 + 0.4 * np.arange(1951)  # the shipped model's grid: half the pixels, 10 A margins
    a, out = survey(8, seed=5, grid=grid, teff=16000, logg=4.5, vsini=300, snr=50.0)
    for i in range(8):
        rest = a.wavelength * rest_frame_factor(a.rv[i])
        fitted = resample(rest, a.flux[i].astype(np.float64), grid) / out.x[i]
        truth = resample(rest, a.continuum[i].astype(np.float64), grid)
        assert np.median(np.abs(fitted / truth - 1)) < 0.005
    assert np.all(out.coverage == 1.0) and np.all(out.flags == 0)
