"""Continuum normalisation of the reference physics (TLUSTY/SYNSPEC spectra, whose normalisation is
exact: SYNSPEC's flux over its own continuum) where it is hardest: the Balmer wings, tens of
Angstrom wide, that carry log g."""

import numpy as np
import pyarrow as pa
import pytest
from starcast.catalogs import gridsynth as gs
from starcast.kernels.preprocess import PreprocessSettings, preprocess, resample

OBS = gs.Observation()  # 4000-4800 A at 0.2 A, R 20 000: the shipped model's observations
MODEL_GRID = 4010.0 + 0.4 * np.arange(1951)  # the shipped model's grid
BALMER = {"H delta": 4101.74, "H gamma": 4340.47}  # A, air
SNR = 300.0


def observed(spectrum, responses):
    """The preprocessed spectrum (rows, MODEL_GRID) of `spectrum` (on OBS's grid) seen through each
    multiplicative response, with flux errors at SNR."""
    flux = spectrum * responses
    columns = {name: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel().astype(np.float32)), v.shape[1])
               for name, v in (("flux", flux), ("flux_err", flux / SNR))}
    out = preprocess(pa.table(columns), MODEL_GRID, PreprocessSettings(), source_grid=OBS.grid().values())
    assert np.all(out.flags == 0)
    return out.x


@pytest.mark.parametrize("teff,logg,vsini", [
    (15000, 4.75, 0.0),  # the grid's broadest, deepest wings
    (15000, 4.75, 300.0),
    (20000, 4.5, 300.0),
    (25000, 4.0, 0.0),
])
def test_balmer_wings_keep_their_depth_whatever_the_instruments_response(tlusty_grid, teff, logg, vsini):
    node = np.flatnonzero((tlusty_grid.params["teff"] == teff) & (tlusty_grid.params["logg"] == logg))[0]
    spectrum = gs.broaden(tlusty_grid.wavelength, np.asarray(tlusty_grid.flux[node], np.float64),
                          np.array([vsini]), OBS)[0].astype(np.float64)
    truth = resample(OBS.grid().values(), spectrum, MODEL_GRID)
    # Responses as the training spectra's (`Perturbations`: cubic, up to 10%) and none at all.
    u = (OBS.grid().values() - 4400.0) / 400.0
    coef = np.random.default_rng(teff + int(vsini)).uniform(-0.1, 0.1, (6, 3))
    responses = np.vstack([1 + coef @ np.stack([u, u**2, u**3]), np.ones_like(u)])
    x = observed(spectrum, responses)
    for name, centre in BALMER.items():
        wing = (np.abs(MODEL_GRID - centre) > 8.0) & (np.abs(MODEL_GRID - centre) < 60.0)
        assert truth[wing].min() < 0.93  # these are wings, not continuum
        # The model sees the same wings through any response: within half the noise of a pixel at
        # SNR 500, the highest it was trained at (the clipping keeps slightly different pixels).
        assert np.ptp(x[:, wing], axis=0).max() < 0.5 / 500, name
        # and they stay within 1.5% of the exact normalisation (the cubic continuum, laid over 800 A
        # of which the wings fill much, lifts them by up to 1.2%: a fixed lift the model learns).
        assert np.abs(x[:, wing] / truth[wing] - 1).max() < 0.015, name
