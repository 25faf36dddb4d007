"""Stars from a model grid: broadening against PyAstronomy, the v sin i ladder and the RBF interpolation
between nodes measured against exact broadening and left-out nodes, and the survey's noise."""

import numpy as np
import pytest
from PyAstronomy import pyasl
from starcast.catalogs import gridsynth as gs

OBS = gs.Observation(start=4440.0, step=0.2, npix=301)  # 4440-4500 A: He I 4471, Mg II 4481


@pytest.fixture(scope="module")
def block(tlusty_grid):
    """A 5 x 5 block of nodes around 22 kK / log g 3.75 (some withheld ones missing), 4400-4540 A."""
    t, g = tlusty_grid.params["teff"], tlusty_grid.params["logg"]
    keep = (np.abs(t - 22000) <= 2000) & (np.abs(g - 3.75) <= 0.5)
    return tlusty_grid.select(keep).crop(4400.0, 4540.0)


@pytest.fixture(scope="module")
def library(block):
    return gs.BroadenedLibrary.build(block, OBS, gs.vsini_ladder(120.0))


def test_broadening_matches_pyastronomy(block):
    wl, f = block.wavelength, np.minimum(block.flux[0], 1.0).astype(np.float64)
    ours = gs.broaden(wl, f, np.array([0.0, 35.0, 120.0]), OBS)
    for row, vsini in zip(ours, (0.0, 35.0, 120.0), strict=True):
        ref = f if vsini == 0 else pyasl.rotBroad(wl, f, OBS.epsilon, vsini)
        ref = pyasl.instrBroadGaussFast(wl, ref, OBS.resolving_power, edgeHandling="firstlast", equid=True)
        centres = OBS.grid().values()
        binned = np.array([ref[np.abs(wl - c) < 0.5 * OBS.step - 1e-6].mean() for c in centres])
        assert np.max(np.abs(row - binned)) < 2e-3, vsini
        assert np.sqrt(np.mean((row - binned) ** 2)) < 3e-4, vsini


def test_vsini_between_rungs_is_close_to_exact_broadening(block, library):
    ladder = library.vsini
    mid = 0.5 * (ladder[1:] + ladder[:-1])
    node = 0
    t, g = library.nodes[node]
    approx = library.spectra(np.full(len(mid), t), np.full(len(mid), g), mid)
    exact = gs.broaden(block.wavelength, np.minimum(block.flux[node], 1.0).astype(np.float64), mid, OBS)
    # a quarter of the noise per pixel at SNR 500, the top of the training range (measured: 2.2e-4)
    assert np.max(np.abs(approx - exact)) < 5e-4


def test_interpolation_reproduces_the_nodes(library):
    t, g = library.nodes.T
    out = library.spectra(t, g, np.full(len(t), 50.0))
    rung = np.searchsorted(library.vsini, 50.0) - 1
    a = (50.0 - library.vsini[rung]) / (library.vsini[rung + 1] - library.vsini[rung])
    ref = (1 - a) * library.flux[:, rung] + a * library.flux[:, rung + 1]
    assert np.max(np.abs(out - ref)) < 1e-4


def test_left_out_node_is_predicted_by_its_neighbours(block, library):
    """The cubic RBF recovers a node left out of the library several times better than linear."""
    centre = int(np.flatnonzero((library.nodes[:, 0] == 22000) & (library.nodes[:, 1] == 4.0))[0])
    rest = gs.BroadenedLibrary(np.delete(library.nodes, centre, 0), library.vsini,
                               np.delete(np.asarray(library.flux), centre, 0), OBS, "test")
    truth = library.flux[centre, 20]
    cubic = rest.spectra([22000.0], [4.0], [library.vsini[20]])[0]
    up, down = (np.flatnonzero((library.nodes[:, 0] == 22000) & (library.nodes[:, 1] == g))[0]
                for g in (4.25, 3.75))
    linear = 0.5 * (library.flux[up, 20] + library.flux[down, 20])
    rms = lambda a: float(np.sqrt(np.mean((a - truth) ** 2)))  # noqa: E731
    assert rms(cubic) < 1e-3
    assert rms(cubic) < 0.5 * rms(linear)


def test_survey_noise_masks_and_labels(library):
    rng = np.random.default_rng(1)
    pert = gs.Perturbations(teff=(20000.0, 24000.0), logg=(3.25, 4.25), vsini=(0.0, 120.0), gap_prob=0.5)
    labels = gs.draw_labels(library, 400, pert, rng)
    assert library.inside(labels["teff"], labels["logg"]).all()
    survey = gs.draw_survey(library, labels, pert, rng)
    clean = library.spectra(labels["teff"], labels["logg"], labels["vsini"])
    cont = survey.flux_err * survey.snr[:, None]
    z = (survey.flux - cont * clean) / survey.flux_err
    assert abs(np.std(z) - 1.0) < 0.01 and abs(np.mean(z)) < 0.01
    assert 0.3 < np.mean(survey.mask.any(axis=1)) < 0.8
    assert np.all((survey.snr >= 10) & (survey.snr <= 500))
    table = survey.table(OBS)
    assert table.num_rows == 400 and table.schema.metadata
