"""Stars from a model grid: broadening against PyAstronomy, the v sin i and metal ladders and the RBF
interpolation between nodes measured against exact broadening and left-out nodes, the metal-line scaling
against spectra built from known lines, and the survey's noise."""

from dataclasses import replace

import numpy as np
import pytest
from PyAstronomy import pyasl
from starcast.catalogs import gridsynth as gs
from starcast.catalogs import physics
from starcast.catalogs.grids import ModelGrid
from starcast.catalogs.medium import air_to_vacuum

from starcast.errors import CatalogError

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


def test_a_vacuum_grid_is_observed_in_the_observations_medium_and_a_short_one_is_refused(block):
    """A grid whose wavelengths are in vacuum gives the library its air twin gives (to the
    interpolation of the conversion), not lines 1.2 A red; one that does not reach the observed
    range is an error, not continuum."""
    vsini = np.array([0.0, 50.0])
    air = gs.BroadenedLibrary.build(block, OBS, vsini)
    in_vacuum = replace(block, wavelength=air_to_vacuum(block.wavelength), medium="vacuum")
    vacuum = gs.BroadenedLibrary.build(in_vacuum, OBS, vsini)
    assert np.abs(vacuum.flux - air.flux).max() < 2e-3 and vacuum.key != air.key
    with pytest.raises(CatalogError, match=r"covers 4400.0-4470.0 A \(air\); observing it needs 4440.0-"):
        gs.BroadenedLibrary.build(block.crop(4400.0, 4470.0), OBS, vsini)
    with pytest.raises(CatalogError, match="look like nanometres"):
        gs.BroadenedLibrary.build(replace(block, wavelength=block.wavelength / 10), OBS, vsini)


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


def test_macroturbulence_adds_its_variance_to_a_weak_line():
    """Broadening is linear in 1 - flux, so a weak line's velocity variance grows by the
    radial-tangential kernel's, zeta^2 / 4, at every v sin i; and a library with macroturbulence is
    cached under a key of its own."""
    wl = np.arange(4400.0, 4540.0, 0.01)
    line = 1.0 - 0.01 * np.exp(-0.5 * ((wl - 4470.0) / 0.05) ** 2)
    zeta = 30.0
    plain, macro = (gs.broaden(wl, line, np.array([0.0, 40.0]), replace(OBS, macroturbulence=z))
                    for z in (0.0, zeta))
    v = physics.C_KMS * (OBS.grid().values() / 4470.0 - 1.0)

    def variance(flux):
        depth = 1.0 - flux.astype(np.float64)
        mean = np.sum(depth * v) / np.sum(depth)
        return np.sum(depth * (v - mean) ** 2) / np.sum(depth)
    for p, m in zip(plain, macro, strict=True):
        assert variance(m) - variance(p) == pytest.approx(zeta**2 / 4, rel=0.02)
    params = {"teff": np.array([20000.0]), "logg": np.array([4.0])}
    grid = ModelGrid(wl, line[None, :].astype(np.float32), params, np.array(["line"]))
    keys = {gs.BroadenedLibrary.build(grid, replace(OBS, macroturbulence=z), np.array([0.0])).key
            for z in (0.0, zeta)}
    assert len(keys) == 2


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
    ref = (1 - a) * library.flux[:, 0, rung] + a * library.flux[:, 0, rung + 1]
    assert np.max(np.abs(out - ref)) < 1e-4


def test_left_out_node_is_predicted_by_its_neighbours(block, library):
    """The cubic RBF recovers a node left out of the library several times better than linear."""
    centre = int(np.flatnonzero((library.nodes[:, 0] == 22000) & (library.nodes[:, 1] == 4.0))[0])
    rest = library.subset(np.delete(np.arange(len(library.nodes)), centre))
    truth = library.flux[centre, 0, 20]
    cubic = rest.spectra([22000.0], [4.0], [library.vsini[20]])[0]
    up, down = (np.flatnonzero((library.nodes[:, 0] == 22000) & (library.nodes[:, 1] == g))[0]
                for g in (4.25, 3.75))
    linear = 0.5 * (library.flux[up, 0, 20] + library.flux[down, 0, 20])
    rms = lambda a: float(np.sqrt(np.mean((a - truth) ** 2)))  # noqa: E731
    assert rms(cubic) < 1e-3
    assert rms(cubic) < 0.5 * rms(linear)


@pytest.fixture(scope="module")
def whole_grid(tlusty_grid):
    """Every node of the grid, 4400-4540 A, v sin i up to 60 km/s."""
    return gs.BroadenedLibrary.build(tlusty_grid.crop(4400.0, 4540.0), OBS, gs.vsini_ladder(60.0))


def _left_out_rms(library: gs.BroadenedLibrary, rung: int = 20) -> float:
    """RMS spectrum error at the grid's interior nodes, each interpolated from all the others."""
    inner = [n for n, _ in gs.holes(library.nodes)]
    assert len(inner) > 30
    t, g = library.nodes.T
    err = [library.subset(np.delete(np.arange(len(t)), n)).spectra([t[n]], [g[n]], [library.vsini[rung]])[0]
           - library.flux[n, 0, rung] for n in inner]
    return float(np.sqrt(np.mean(np.square(err))))


def test_holes_lie_in_the_grid_with_every_node_around_them():
    """On a 5 x 4 lattice (15-19 kK, log g 3.0-3.75) without its 19 kK / 3.75 corner: a hole of one
    node is one of the 3 x 2 interior nodes; one of two in Teff is anchored at 16 or 17 kK, log g 3.25
    or 3.5, and holds its node and the next hotter one."""
    t, g = np.meshgrid(15000.0 + 1000.0 * np.arange(5), 3.0 + 0.25 * np.arange(4), indexing="ij")
    nodes = np.stack([t.ravel(), g.ravel()], axis=1)
    nodes = nodes[~((nodes[:, 0] == 19000.0) & (nodes[:, 1] == 3.75))]
    at = {tuple(node): i for i, node in enumerate(nodes.tolist())}
    interior = {(tt, gg) for tt in (16000.0, 17000.0, 18000.0) for gg in (3.25, 3.5)}
    assert {tuple(nodes[n]): hole for n, hole in gs.holes(nodes)} == {node: [at[node]] for node in interior}
    pairs = {tuple(nodes[n]): sorted(hole) for n, hole in gs.holes(nodes, ((0, 0), (1, 0)))}
    assert pairs == {(tt, gg): sorted([at[(tt, gg)], at[(tt + 1000.0, gg)]])
                     for tt in (16000.0, 17000.0) for gg in (3.25, 3.5)}


def test_weights_kept_per_star_lose_little_against_keeping_all(whole_grid, monkeypatch):
    """Leaving each interior node of the whole grid out, the truncated RBF recovers its spectrum
    within 1.15x the error of the untruncated one (measured 1.04x; keeping 20 weights: 1.7x)."""
    kept = _left_out_rms(whole_grid)
    monkeypatch.setattr(gs, "NEIGHBOURS", len(whole_grid.nodes))
    assert kept < 1.15 * _left_out_rms(whole_grid)


def test_a_log_g_step_counts_as_two_teff_steps(whole_grid, monkeypatch):
    """With log g in units of one grid step (0.25 dex) instead, the left-out nodes' spectra are
    recovered worse (measured 1.3x the error)."""
    ours = _left_out_rms(whole_grid)
    monkeypatch.setattr(gs, "NODE_SCALE", gs.GRID_STEP)
    assert ours < 0.85 * _left_out_rms(whole_grid)


def test_metal_lines_are_scaled_in_optical_depth_and_h_he_lines_kept():
    """A broad He I 4471 profile times narrow metal lines exp(-tau): the scaling recovers
    profile x exp(-10**metals tau) and leaves the He core as it is."""
    wl = np.arange(4440.0, 4520.0, 0.01)
    profile = 1.0 - 0.5 * np.exp(-0.5 * ((wl - 4471.48) / 3.0) ** 2)
    tau = sum(t0 * np.exp(-0.5 * ((wl - c) / 0.05) ** 2)
              for c, t0 in ((4450.0, 0.05), (4462.0, 0.3), (4481.1, 1.0), (4505.0, 2.0)))
    metals = np.array([-0.3, 0.0, 0.3])
    out = gs.scale_metal_lines(wl, profile * np.exp(-tau), metals)
    for row, m in zip(out, metals, strict=True):
        assert np.max(np.abs(row - profile * np.exp(-(10.0**m) * tau))) < 2e-3, m
    assert np.array_equal(out[1], profile * np.exp(-tau))
    core = np.abs(wl - 4471.48) <= gs.HHE_CORE_HALF_WIDTH
    assert np.array_equal(out[0][core], out[2][core])


def test_metals_between_rungs_are_close_to_exact_scaling(block):
    """Linear between metal rungs 0.1 dex apart against the library built at the star's own metals:
    within half the noise per pixel at SNR 500."""
    models = block.select(np.arange(0, len(block.flux), 3))
    ladder = gs.vsini_ladder(120.0)
    rungs = gs.BroadenedLibrary.build(models, OBS, ladder, metals=gs.metals_ladder((-0.3, 0.3)))
    exact = gs.BroadenedLibrary.build(models, OBS, ladder, metals=np.array([-0.25, 0.15]))
    for z, m in enumerate(exact.metals):
        for v in (0, 12, 30):
            t, g = models.nodes().T
            approx = rungs.spectra(t, g, np.full(len(t), ladder[v]), np.full(len(t), m))
            assert np.max(np.abs(approx - exact.flux[:, z, v])) < 1e-3, (m, ladder[v])
    assert np.array_equal(rungs.flux[:, 3], gs.BroadenedLibrary.build(models, OBS, ladder).flux[:, 0])


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
    assert table.num_rows == 400 and table.schema.metadata[b"starcast.pixels"] == b"integrated"
    # the catalog states the resolving power it was observed at, which the engine smooths to its own
    assert float(survey.table(replace(OBS, resolving_power=40000.0)).schema.metadata[
        b"starcast.resolving_power"]) == 40000.0


def test_stars_are_drawn_only_between_models_that_span_both_axes_and_in_their_box(block, library):
    rng = np.random.default_rng(2)
    line = gs.BroadenedLibrary.build(block.select(block.params["logg"] == 4.0), OBS, np.array([0.0]))
    for draw in (lambda: gs.draw_labels(line, 5, gs.Perturbations(), rng),
                 lambda: line.spectra(np.array([22000.0]), np.array([4.0]), np.array([0.0]))):
        with pytest.raises(CatalogError, match=r"3 or more models spanning both .* and log g \[4.0\]"):
            draw()
    with pytest.raises(CatalogError, match=r"label box \(Teff \(31000.0, 32000.0\).* does not overlap"):
        gs.draw_labels(library, 5, gs.Perturbations(teff=(31000.0, 32000.0)), rng)


def test_labels_carry_metals_drawn_where_the_perturbations_span_some_else_their_one_value(library):
    rng = np.random.default_rng(2)
    np.testing.assert_array_equal(gs.draw_labels(library, 10, gs.Perturbations(), rng)["metals"], 0.0)
    fixed = gs.draw_labels(library, 10, gs.Perturbations(metals=(0.2, 0.2)), rng)["metals"]
    np.testing.assert_array_equal(fixed, 0.2)
    labels = gs.draw_labels(library, 200, gs.Perturbations(metals=(-0.3, 0.3)), rng)
    assert labels["metals"].min() >= -0.3 and labels["metals"].max() <= 0.3 and labels["metals"].std() > 0.1
    assert list(gs.metals_ladder((-0.3, 0.3))) == [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
    assert list(gs.metals_ladder((0.0, 0.0))) == [0.0]
