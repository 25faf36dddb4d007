"""The survey generator: determinism, the seed grid and its split, noise, Doppler shift, sampling."""

import hashlib
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.catalogs import physics
from starcast.catalogs.io import read_catalog, read_metadata, write_catalog
from starcast.catalogs.schema import META_GENERATOR, WavelengthGrid, validate
from starcast.catalogs.synth import (
    SynthConfig,
    compute_spectra,
    doppler_factor,
    draw_labels,
    logg_min,
    seed_nodes,
    split_of,
    synth,
    synth_arrays,
    synth_table,
)

from starcast.errors import StarcastError

SMALL = dict(start=4300.0, step=0.2, npix=400)  # 4300-4380 A: H gamma and its wings


def test_same_seed_gives_the_same_bytes(tmp_path):
    a = synth(12, tmp_path / "a", seed=7, shard_rows=5, **SMALL)
    b = synth(12, tmp_path / "b", seed=7, shard_rows=5, **SMALL)
    assert [p.name for p in a] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    digest = [[hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] for paths in (a, b)]
    assert digest[0] == digest[1]
    c = synth(12, tmp_path / "c", seed=8, shard_rows=5, **SMALL)
    assert hashlib.sha256(c[0].read_bytes()).digest() != hashlib.sha256(a[0].read_bytes()).digest()


def test_a_spectrum_does_not_depend_on_thread_count_or_shard_size(tmp_path):
    import numba

    cfg = SynthConfig(n=6, seed=3, **SMALL)
    whole = synth_arrays(cfg)
    labels = draw_labels(cfg)
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        part = compute_spectra(cfg, labels, slice(2, 5))
    finally:
        numba.set_num_threads(previous)
    assert np.array_equal(part.flux, whole.flux[2:5])


def test_shards_hold_the_catalog_schema_and_provenance(tmp_path):
    paths = synth(7, tmp_path, mode="seed", seed=1, shard_rows=4, snr=(30, 40), **SMALL)
    table = read_catalog(tmp_path)
    validate(table)
    assert table.num_rows == 7 and "wavelength" not in table.column_names
    flux_type = table.schema.field("flux").type
    assert pa.types.is_fixed_size_list(flux_type) and flux_type.list_size == 400
    assert flux_type.value_type == pa.float32()
    for name in ("teff", "logg", "vsini", "rv"):
        assert str(table.schema.field(name).type) == "double"
    assert str(table.schema.field("snr").type) == "float"
    assert set(table.column("split").to_pylist()) <= {"train", "val", "test"}
    snr = table.column("snr").to_numpy()
    assert np.all((snr >= 30) & (snr <= 40))
    meta = read_metadata(paths[0])
    import json

    prov = json.loads(meta[META_GENERATOR])
    assert prov["seed"] == 1 and prov["config"]["mode"] == "seed" and prov["version"]
    grid = WavelengthGrid.from_json(meta["starcast.wavelength"])
    assert np.allclose(grid.values(), 4300.0 + 0.2 * np.arange(400))
    assert float(meta["starcast.resolving_power"]) == 20000.0  # the resolving power it was observed at
    assert pq.ParquetFile(paths[0]).metadata.num_rows == 4


def test_seed_grid_drops_the_eddington_corner_and_keeps_24450_spectra():
    nodes = seed_nodes()
    assert len(nodes) == 24450
    pairs = np.unique(nodes[:, :2], axis=0)
    assert len(pairs) == 163
    assert np.all(pairs[:, 1] >= logg_min(pairs[:, 0]) - 1e-9)
    # Electron-scattering Eddington factor sigma_e sigma_SB T^4 / (c g) stays below 0.85.
    gamma = 0.34 * 5.670374e-5 * pairs[:, 0] ** 4 / (2.99792458e10 * 10 ** pairs[:, 1])
    assert gamma.max() < 0.85
    assert not np.any((pairs[:, 0] == 30000) & (pairs[:, 1] < 3.0))


def test_seed_split_is_60_20_20_and_a_function_of_the_node():
    labels = draw_labels(SynthConfig(n=None, mode="seed"))
    split = labels["split"]
    fractions = {name: np.mean(split == name) for name in ("train", "val", "test")}
    assert fractions["train"] == pytest.approx(0.6, abs=0.015)
    assert fractions["val"] == pytest.approx(0.2, abs=0.015)
    assert fractions["test"] == pytest.approx(0.2, abs=0.015)
    for i in (0, 100, 20000):
        assert split[i] == split_of(labels["teff"][i], labels["logg"][i], labels["vsini"][i])


def test_random_mode_draws_within_the_configured_ranges():
    cfg = SynthConfig(n=3000, teff=(16000, 28000), logg=(3.0, 4.5), vsini=(10, 20), snr=(60, 70),
                      rv=(-5, 5))
    lab = draw_labels(cfg)
    assert lab["teff"].min() >= 16000 and lab["teff"].max() <= 28000
    assert lab["logg"].min() >= 3.0 and np.all(lab["logg"] >= logg_min(lab["teff"]))
    assert lab["vsini"].min() >= 10 and lab["vsini"].max() <= 20
    assert lab["snr"].min() >= 60 and lab["rv"].max() <= 5 and lab["split"] is None


def test_snr_column_matches_the_added_noise_on_the_continuum():
    cfg = SynthConfig(n=8, seed=5, rv=(0.0, 0.0), snr=(20, 200))
    a = synth_arrays(cfg)
    clean = a.normalised > 0.999  # continuum pixels of the noise-free spectrum
    for i in range(a.flux.shape[0]):
        resid = (a.flux[i] - a.continuum[i] * a.normalised[i]) / a.continuum[i]
        assert np.std(resid[clean[i]]) == pytest.approx(1 / a.snr[i], rel=0.06)
        assert np.allclose(a.flux_err[i], a.continuum[i] / a.snr[i], rtol=1e-6)


def test_rv_shifts_lines_by_the_relativistic_doppler_factor():
    rv = 120.0
    cfg = SynthConfig(n=1, seed=2, rv=(rv, rv), snr=(1e7, 1e7), vsini=(20, 20), teff=(20000, 20000),
                      logg=(4.0, 4.0), start=4540.0, npix=100)
    a = synth_arrays(cfg)
    lam = a.wavelength
    lam0 = physics.LINES[physics.line_index("Si III 4553")].wavelength
    window = np.abs(lam - lam0 * doppler_factor(rv)) < 2.5
    depth = 1 - a.flux[0] / a.continuum[0]
    centre_obs = np.sum(lam[window] * depth[window]) / np.sum(depth[window])
    window = np.abs(lam - lam0) < 2.5
    rest = 1 - a.normalised[0]
    centre_rest = np.sum(lam[window] * rest[window]) / np.sum(rest[window])
    assert centre_obs - centre_rest == pytest.approx(lam0 * (doppler_factor(rv) - 1), abs=0.01)


def test_internal_oversampling_has_converged():
    base = SynthConfig(n=6, seed=9, vsini=(0, 30))  # sharp lines are the hardest case
    coarse = synth_arrays(base)
    fine = synth_arrays(replace(base, oversample=16))
    assert np.max(np.abs(coarse.normalised - fine.normalised)) < 1.5e-3


def test_synth_table_holds_noise_free_truth_consistent_with_flux():
    table = synth_table(SynthConfig(n=3, seed=4, snr=(1e7, 1e7), rv=(0, 0), **SMALL))
    a = synth_arrays(SynthConfig(n=3, seed=4, snr=(1e7, 1e7), rv=(0, 0), **SMALL))
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    assert np.allclose(flux, a.continuum * a.normalised, atol=1e-5)
    assert np.all(a.normalised <= 1.0 + 1e-6) and np.all(a.normalised > 0)
    chunked = synth_table(SynthConfig(n=3, seed=4, snr=(1e7, 1e7), rv=(0, 0), **SMALL), chunk_rows=2)
    assert chunked.equals(table, check_metadata=True)


def reference_normalised(cfg, lab, i):
    """Spectrum i rebuilt independently: scipy Voigt profiles, np.convolve, trapezoid pixel means."""
    from scipy import special
    from starcast.catalogs.synth import _internal_grid, _sigma_instrument

    lam = _internal_grid(cfg, cfg.grid().values())
    tau = np.zeros_like(lam)
    for line, w in zip(physics.LINES, physics.line_strengths(lab["teff"][i], lab["logg"][i]), strict=True):
        thermal = 2 * physics.K_B * lab["teff"][i] / (line.mass * physics.AMU) * 1e-6  # (km/s)^2
        b = np.sqrt(thermal + cfg.microturbulence**2)
        sigma = line.wavelength * b / (physics.C_KMS * np.sqrt(2))
        gamma = line.gamma0 * 10 ** (0.5 * (lab["logg"][i] - 4))
        win = np.abs(lam - line.wavelength) < line.window
        edge = special.voigt_profile(line.window, sigma, gamma)
        profile = special.voigt_profile(lam[win] - line.wavelength, sigma, gamma)
        tau[win] += w * np.clip(profile - edge, 0, None)
    kern = physics.velocity_kernel(physics.C_KMS * np.log(lam[1] / lam[0]), lab["vsini"][i], cfg.epsilon,
                                   _sigma_instrument(cfg))
    g = np.convolve(np.exp(-tau), kern, mode="same")
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(lam))])
    wl = cfg.grid().values()
    edges = np.concatenate([[wl[0] - cfg.step / 2], wl + cfg.step / 2])
    return np.diff(np.interp(edges, lam, cum)) / cfg.step


def test_generator_matches_an_independent_numpy_scipy_rebuild():
    cfg = SynthConfig(n=4, seed=11)
    lab = draw_labels(cfg)
    ours = synth_arrays(cfg).normalised
    for i in range(4):
        assert np.max(np.abs(ours[i] - reference_normalised(cfg, lab, i))) < 2e-3


@pytest.mark.parametrize("bad", [dict(mode="grid"), dict(n=0), dict(n=None), dict(snr=(300, 50)),
                                 dict(rv=(-1e5, 0)), dict(npix=1), dict(epsilon=1.5)])
def test_bad_configurations_are_refused_with_a_message(bad):
    with pytest.raises(StarcastError, match="bad synth configuration"):
        SynthConfig(**bad)


def test_random_ranges_beyond_the_eddington_envelope_are_an_error():
    with pytest.raises(StarcastError, match="Eddington"):
        draw_labels(SynthConfig(n=5, teff=(29000, 30000), logg=(1.75, 2.0)))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 6), npix=st.integers(2, 300), start=st.floats(4000.0, 4500.0),
       seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["random", "seed"]))
def test_any_small_survey_validates_and_round_trips_through_parquet(tmp_path_factory, n, npix, start, seed,
                                                                    mode):
    cfg = SynthConfig(n=n, npix=npix, start=start, seed=seed, mode=mode)
    table = synth_table(cfg)
    validate(table)
    assert np.all(np.isfinite(np.stack(table.column("flux").to_numpy(zero_copy_only=False))))
    path = write_catalog(table, tmp_path_factory.mktemp("rt") / "s.parquet")
    assert read_catalog(path).equals(table, check_metadata=True)


def test_a_shard_size_below_one_is_refused_not_written_as_empty_shards(tmp_path):
    for rows in (0, -3):
        with pytest.raises(StarcastError, match="shard_rows"):
            synth(3, tmp_path / f"s{rows}", shard_rows=rows, **SMALL)
        assert not list(tmp_path.glob(f"s{rows}/*.parquet"))


def test_an_unknown_setting_is_an_error_naming_it(tmp_path):
    with pytest.raises(StarcastError, match=r"unknown settings \['grid'\]: SynthConfig's fields are"):
        synth(3, tmp_path / "s", grid="grid.npz", **SMALL)
    assert not (tmp_path / "s").exists()
