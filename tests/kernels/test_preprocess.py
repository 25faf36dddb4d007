"""The batch entry point: Arrow layouts and slicing, Doppler correction, gap filling, bad-data flags,
row independence and the settings round trip."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.catalogs.schema import META_WAVELENGTH, Flag, WavelengthGrid
from starcast.kernels.preprocess import PreprocessSettings, preprocess, resample
from starcast.kernels.resample import rest_frame_factor

from starcast.errors import CatalogError, StarcastError

GRID = np.linspace(4000.0, 4800.0, 2000)
SOURCE = np.linspace(3990.0, 4810.0, 2100)
NO_CONTINUUM = PreprocessSettings(continuum="none")


def spectra(n, seed=0, wl=SOURCE):
    """Lines on a sloped continuum with 1% noise, as float32 (B, len(wl))."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(4050, 4750, (n, 1, 6))
    lines = np.prod(1 - 0.4 * np.exp(-0.5 * ((wl[None, :, None] - centres) / 1.5) ** 2), axis=2)
    slope = 1 + rng.uniform(-0.2, 0.2, (n, 1)) * (wl - 4400) / 400
    return (slope * lines * (1 + rng.normal(0, 0.01, (n, len(wl))))).astype(np.float32)


def list_column(rows, kind="fixed", dtype=None):
    dtype = dtype or pa.float32()
    rows = [None if r is None else np.asarray(r) for r in rows]
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(rows), dtype), len(rows[0]))
    typ = pa.large_list(dtype) if kind == "large" else pa.list_(dtype)
    return pa.array([None if r is None else r.tolist() for r in rows], typ)


@pytest.mark.parametrize("kind", ["fixed", "list", "large"])
def test_list_large_list_and_fixed_size_list_give_identical_results(kind):
    flux = spectra(6)
    ref = preprocess(pa.table({"flux": list_column(flux)}), GRID, None, source_grid=SOURCE)
    out = preprocess(pa.table({"flux": list_column(flux, kind)}), GRID, None, source_grid=SOURCE)
    np.testing.assert_array_equal(out.x, ref.x)
    np.testing.assert_array_equal(out.flags, ref.flags)


@pytest.mark.parametrize("kind", ["fixed", "list"])
def test_sliced_and_chunked_batches_match_the_whole_batch(kind):
    flux = spectra(10, seed=1)
    wl = np.tile(SOURCE, (10, 1)) + np.arange(10)[:, None] * 0.01
    table = pa.table({"flux": list_column(flux, kind), "wavelength": list_column(wl, kind, pa.float64())})
    whole = preprocess(table, GRID, PreprocessSettings())
    batch = table.to_batches()[0].slice(3, 4)
    np.testing.assert_array_equal(preprocess(batch, GRID, PreprocessSettings()).x, whole.x[3:7])
    chunked = pa.concat_tables([table.slice(0, 3), table.slice(3, 5), table.slice(8)])
    np.testing.assert_array_equal(preprocess(chunked, GRID, PreprocessSettings()).x, whole.x)


@settings(max_examples=10, deadline=None)
@given(st.permutations(range(5)))
def test_a_row_gives_the_same_output_whatever_batch_it_is_in(order):
    flux = spectra(5, seed=2)
    flux[1, 100:120] = np.nan
    flux[3] = np.nan
    alone = [preprocess(pa.table({"flux": list_column(flux[i:i + 1])}), GRID, PreprocessSettings(),
                        source_grid=SOURCE).x[0] for i in range(5)]
    mixed = preprocess(pa.table({"flux": list_column(flux[list(order)])}), GRID, PreprocessSettings(),
                       source_grid=SOURCE)
    for pos, i in enumerate(order):
        np.testing.assert_array_equal(mixed.x[pos], alone[i])


def test_rv_is_removed_before_the_single_resampling():
    rest = np.linspace(3980.0, 4820.0, 8400)
    flux = spectra(4, seed=3, wl=rest).astype(np.float64)
    rv = np.array([-140.0, -20.0, 60.0, 150.0])
    observed_wl = rest / np.array([rest_frame_factor(v) for v in rv])[:, None]  # receding -> redder
    table = pa.table({"flux": list_column(flux), "wavelength": list_column(observed_wl, "list", pa.float64()),
                      "rv": pa.array(rv)})
    out = preprocess(table, GRID, NO_CONTINUUM)
    for i in range(4):
        np.testing.assert_allclose(out.x[i], resample(rest, flux[i], GRID), rtol=1e-5)
    assert np.all(out.coverage == 1.0) and np.all(out.flags == 0)


def test_wavelengths_come_from_source_grid_or_the_schema_metadata():
    flux = spectra(2)
    with pytest.raises(CatalogError, match="no wavelength column"):
        preprocess(pa.table({"flux": list_column(flux)}), GRID, PreprocessSettings())
    grid = WavelengthGrid.linear(3990.0, SOURCE[1] - SOURCE[0], len(SOURCE))
    table = pa.table({"flux": list_column(flux)}).replace_schema_metadata({META_WAVELENGTH: grid.to_json()})
    via_metadata = preprocess(table, GRID, PreprocessSettings())
    via_argument = preprocess(pa.table({"flux": list_column(flux)}), GRID, PreprocessSettings(),
                              source_grid=grid)
    np.testing.assert_array_equal(via_metadata.x, via_argument.x)


@pytest.mark.parametrize("meta", ['{"kind": "linear"}', "not json",
                                  '{"kind": "linear", "start": 4000, "step": -1, "n": 5}'])
def test_malformed_grid_metadata_is_a_catalog_error(meta):
    table = pa.table({"flux": list_column(spectra(1))}).replace_schema_metadata({META_WAVELENGTH: meta})
    with pytest.raises(CatalogError, match="malformed 'starcast.wavelength' metadata"):
        preprocess(table, GRID, PreprocessSettings())


def test_short_gaps_are_interpolated_and_long_gaps_set_to_one():
    flux = np.ones((1, len(GRID)), np.float32) * np.linspace(1.0, 2.0, len(GRID), dtype=np.float32)
    flux[0, 500:503] = np.nan
    flux[0, 1000:1100] = np.nan
    out = preprocess(pa.table({"flux": list_column(flux)}), GRID, NO_CONTINUUM, source_grid=GRID)
    np.testing.assert_allclose(out.x[0, 500:503], flux[0, 497:500] + 3 * (flux[0, 1] - flux[0, 0]), rtol=1e-5)
    assert np.all(out.x[0, 1000:1100] == 1.0)
    assert np.all(out.ivar[0, 1000:1100] == 0.0) and np.all(out.ivar[0, :500] > 0)
    assert out.bad_fraction[0] == pytest.approx(103 / len(GRID))
    assert out.flags[0] == Flag.NON_FINITE | Flag.GAP | Flag.LINE_LOST  # 4400-4440 A holds O II 4415, 4417


def test_ivar_column_gives_the_same_result_as_flux_err():
    flux = spectra(3)
    err = np.full_like(flux, 0.01)
    a = preprocess(pa.table({"flux": list_column(flux), "flux_err": list_column(err)}), GRID,
                   PreprocessSettings(), source_grid=SOURCE)
    b = preprocess(pa.table({"flux": list_column(flux), "ivar": list_column(err ** -2)}), GRID,
                   PreprocessSettings(), source_grid=SOURCE)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-4)
    # catalogs merged from several: each row its own flux_err, or else its ivar (row 2 has both, one
    # of them 4x off: flux_err wins); a null flux_err does not throw the row's ivar away
    merged = pa.table({"flux": list_column(flux),
                       "flux_err": pa.array([err[0].tolist(), None, err[2].tolist()], pa.list_(pa.float32())),
                       "ivar": pa.array([None, (err[1] ** -2).tolist(), (0.25 * err[2] ** -2).tolist()],
                                        pa.list_(pa.float32()))})
    c = preprocess(merged, GRID, PreprocessSettings(), source_grid=SOURCE)
    np.testing.assert_allclose(c.ivar, a.ivar, rtol=1e-4)
    assert not c.noise_estimated.any()


@pytest.mark.parametrize("errors", [True, False])
def test_negative_flux_within_its_noise_is_data_and_beyond_it_a_bad_pixel(errors):
    """Pixels of low SNR dip below zero in deep lines: that is noise, and dropping it would make those
    lines shallow. Only flux more than NEGATIVE_SIGMA sigma (flux_err, else DER_SNR's) below zero is
    bad, NON_FINITE. Lines 0.8 deep at 0.4 noise per pixel: 6% of the line cores below zero; the
    mean of 200 rows matches the noise-free row's to its own scatter."""
    from starcast.kernels.preprocess import NEGATIVE_SIGMA

    rng = np.random.default_rng(2)
    line = 1.0 - 0.8 * np.exp(-0.5 * ((SOURCE - 4400.0) / 1.5) ** 2)
    noisy = (line + 0.4 * rng.standard_normal((200, len(SOURCE)))).astype(np.float32)
    assert (noisy[:, np.abs(SOURCE - 4400.0) < 1.0] < 0).mean() > 0.05
    noisy[0, 100] = -(NEGATIVE_SIGMA + 1.0) * 0.4  # beyond any noise: a glitch
    columns = {"flux": list_column(noisy)}
    if errors:
        columns["flux_err"] = list_column(np.full_like(noisy, 0.4))
    out = preprocess(pa.table(columns), GRID, None, source_grid=SOURCE)
    assert out.flags[0] & Flag.NON_FINITE and not np.any(out.flags[1:] & Flag.NON_FINITE)
    clean = preprocess(pa.table({"flux": list_column([line.astype(np.float32)])}), GRID, None,
                       source_grid=SOURCE).x[0]
    core = np.abs(GRID - 4400.0) < 1.0
    scatter = out.x[1:, core].std(axis=0) / np.sqrt(199)
    assert np.all(np.abs(out.x[1:, core].mean(axis=0) - clean[core]) < 4 * scatter)


def test_bad_data_gets_the_right_flags_and_messages_and_the_batch_goes_on():
    n = len(SOURCE)
    flux = list(spectra(10, seed=4))
    err = [np.full(n, 0.01, np.float32) for _ in range(10)]
    wl = [SOURCE.copy() for _ in range(10)]
    mask = [np.zeros(n, bool) for _ in range(10)]
    flux[1] = flux[1].copy()
    flux[1][[10, 500, 501]] = [np.nan, np.inf, -1.0]  # a few non-finite/negative pixels: interpolated
    flux[2] = np.full(n, np.nan, np.float32)  # nothing usable
    err[3] = err[3].copy()
    err[3][50] = 0.0  # a non-positive error
    mask[4] = np.arange(n) % 3 == 0  # a third masked: too many bad pixels
    wl[5] = SOURCE + 300.0  # covers only part of the model grid: no numbers, the ranges in the error
    wl[6] = SOURCE[::-1].copy()  # not increasing
    flux[7] = None  # null row
    err[8] = err[8][:-1]  # length mismatch
    wl[9] = SOURCE + 2000.0  # no overlap at all
    table = pa.table({"flux": list_column(flux, "list"), "flux_err": list_column(err, "list"),
                      "wavelength": list_column(wl, "list", pa.float64()),
                      "mask": list_column(mask, "list", pa.bool_())})
    out = preprocess(table, GRID, PreprocessSettings())
    F = Flag
    failed = F.PREPROCESS_FAILED
    assert out.flags.tolist() == [0, F.NON_FINITE, F.NON_FINITE | F.MASKED | failed, F.NON_FINITE,
                                  F.MASKED, F.COVERAGE | failed, failed, failed, failed,
                                  F.COVERAGE | failed]
    assert [i for i, e in enumerate(out.errors) if e is not None] == [2, 5, 6, 7, 8, 9]
    assert "good pixels" in out.errors[2] and "increasing" in out.errors[6]
    assert "covers 4290.0-5110.0 A (rest frame), 63.7% of the model's 4000.0-4800.0 A" in out.errors[5]
    assert "null" in out.errors[7] and "flux_err has" in out.errors[8] and "covers 5990.0" in out.errors[9]
    assert out.coverage[5] == pytest.approx((4800.0 - 4290.0) / 800.0, abs=0.002)
    assert np.all(out.x[[2, 5, 6, 7, 8, 9]] == 1.0) and np.all(np.isfinite(out.x))
    for i in (0, 1, 3, 4):  # the good and the flagged-but-processed rows are untouched by the others
        alone = preprocess(table.slice(i, 1), GRID, PreprocessSettings())
        np.testing.assert_array_equal(out.x[i], alone.x[0])


def test_rows_no_continuum_can_be_fitted_to_or_put_at_rest_fail_with_their_reason():
    """The reasons results.md lists for a row without numbers, each on its row alone: flux zero on
    every pixel, a continuum that dips below zero (a step down to 1e-6), one pixel, an rv faster than
    light or not finite; a good row beside them is as it is alone."""
    n = len(SOURCE)
    flux = [*spectra(1, seed=8), np.zeros(n), np.r_[np.ones(n // 2), np.full(n - n // 2, 1e-6)], [1.0],
            *spectra(2, seed=9)]
    wl = [SOURCE, SOURCE, SOURCE, [4400.0], SOURCE, SOURCE]
    table = pa.table({"flux": list_column(flux, "list"), "wavelength": list_column(wl, "list", pa.float64()),
                      "flux_err": list_column([np.full(len(w), 0.01) for w in wl], "list"),
                      "rv": [0.0, 0.0, 0.0, 0.0, 4.0e5, np.inf]})
    out = preprocess(table, GRID, PreprocessSettings())
    assert out.errors == [None, "the flux is zero on every good pixel",
                          "the fitted continuum is not positive everywhere", "fewer than 2 pixels",
                          *["rv is not finite or not slower than light"] * 2]
    assert ((out.flags & Flag.PREPROCESS_FAILED) != 0).tolist() == [False] + [True] * 5
    np.testing.assert_array_equal(out.x[0], preprocess(table.slice(0, 1), GRID, PreprocessSettings()).x[0])


@pytest.mark.parametrize("method", ["flux", "linear"])
def test_a_few_input_pixels_stretched_over_the_grid_are_too_few_good_pixels(method):
    # 2, 5 or 49 pixels across the model grid rebin/interpolate to hundreds of "good" grid pixels.
    lengths = (2, 5, 49, 60)
    table = pa.table({"flux": pa.array([np.full(n, 2.0).tolist() for n in lengths], pa.list_(pa.float32())),
                      "wavelength": pa.array([np.linspace(4010.0, 4790.0, n).tolist() for n in lengths],
                                             pa.list_(pa.float64()))})
    out = preprocess(table, GRID, PreprocessSettings(method=method, min_good_pixels=50))
    failed = (out.flags & Flag.PREPROCESS_FAILED) != 0
    assert failed.tolist() == [True, True, True, False]
    assert "only 2 good pixels" in out.errors[0] and "only 49 good pixels" in out.errors[2]
    check_neutral_failures(out)


def test_settings_round_trip_through_a_dict_and_reject_unknown_keys():
    s = PreprocessSettings(method="linear", continuum_degree=2, clip_low=2.5)
    assert PreprocessSettings.from_dict(s.to_dict()) == s
    with pytest.raises(StarcastError, match="unknown preprocess settings"):
        PreprocessSettings.from_dict({**s.to_dict(), "smoothing": 3})
    with pytest.raises(StarcastError, match="method"):
        PreprocessSettings(method="cubic")
    with pytest.raises(StarcastError, match="continuum_degree must be of type int"):
        PreprocessSettings.from_dict({"continuum_degree": "3"})


def test_null_rv_means_no_shift_and_a_non_finite_rv_fails_only_its_row():
    flux = np.repeat(spectra(1), 3, axis=0)
    table = pa.table({"flux": list_column(flux), "rv": pa.array([None, np.nan, 0.0])})
    out = preprocess(table, GRID, PreprocessSettings(), source_grid=SOURCE)
    np.testing.assert_array_equal(out.x[0], out.x[2])
    assert out.flags.tolist() == [0, Flag.PREPROCESS_FAILED, 0] and "rv" in out.errors[1]


def test_an_empty_batch_gives_empty_results():
    table = pa.table({"flux": pa.array([], pa.list_(pa.float32()))})
    out = preprocess(table, GRID, PreprocessSettings(), source_grid=SOURCE)
    assert out.x.shape == (0, len(GRID)) and out.flags.shape == (0,) and out.errors == []


@pytest.mark.parametrize("scale", [1e-17, 1e6])
def test_normalised_output_does_not_depend_on_flux_units(scale):
    flux = spectra(3, seed=6)
    err = np.full_like(flux, 0.01)

    def run(k):
        table = pa.table({"flux": list_column(flux * k), "flux_err": list_column(err * k)})
        return preprocess(table, GRID, PreprocessSettings(), source_grid=SOURCE)
    a, b = run(1.0), run(scale)
    np.testing.assert_allclose(b.x, a.x, rtol=1e-5)
    np.testing.assert_allclose(b.ivar, a.ivar, rtol=1e-4)
    assert b.flags.tolist() == a.flags.tolist() == [0, 0, 0]


@pytest.mark.parametrize("method", ["flux", "linear"])
def test_a_constant_spectrum_normalises_to_one(method):
    table = pa.table({"flux": list_column(np.full((2, len(SOURCE)), 7.5, np.float32))})
    out = preprocess(table, GRID, PreprocessSettings(method=method), source_grid=SOURCE)
    np.testing.assert_allclose(out.x, 1.0, rtol=1e-6)
    assert np.all(out.flags == 0)


def test_the_kernel_cache_key_tracks_the_resample_and_continuum_sources():
    import hashlib
    from pathlib import Path

    import starcast.kernels.preprocess as module

    digest = hashlib.sha256()
    for name in ("resample.py", "continuum.py"):
        digest.update((Path(module.__file__).parent / name).read_bytes())
    assert module.DEPENDENCY_FINGERPRINT == digest.hexdigest()[:16], (
        "kernels/resample.py or continuum.py changed: set DEPENDENCY_FINGERPRINT in kernels/preprocess.py "
        f"to {digest.hexdigest()[:16]!r} so that Numba recompiles the cached batch kernel")


@st.composite
def messy_rows(draw):
    """A row of random length, values from a palette of bad ones, maybe a shifted or reversed grid."""
    n = draw(st.integers(0, 300))
    palette = st.sampled_from([1.0, 0.5, 2.0, 0.0, -1.0, np.nan, np.inf, -np.inf])
    flux = [draw(palette) if draw(st.booleans()) else 1.0 for _ in range(n)]
    start = draw(st.sampled_from([3990.0, 4500.0, 6000.0]))
    wl = list(start + 0.4 * np.arange(n))
    if draw(st.booleans()):
        wl = wl[::-1]
    return None if draw(st.integers(0, 9)) == 0 else flux, wl, draw(st.sampled_from([0.0, 100.0, np.nan]))


@settings(max_examples=40, deadline=None)
@given(st.lists(messy_rows(), min_size=1, max_size=6))
def test_messy_batches_never_raise_and_failed_rows_are_neutral(rows):
    table = pa.table({"flux": pa.array([r[0] for r in rows], pa.list_(pa.float32())),
                      "wavelength": pa.array([r[1] for r in rows], pa.list_(pa.float64())),
                      "rv": pa.array([r[2] for r in rows])})
    for settings_ in (PreprocessSettings(min_good_pixels=20), PreprocessSettings(continuum="none")):
        check_neutral_failures(preprocess(table, GRID, settings_))


def check_neutral_failures(out):
    assert np.all(np.isfinite(out.x)) and np.all(np.isfinite(out.ivar)) and np.all(out.ivar >= 0)
    failed = (out.flags & Flag.PREPROCESS_FAILED) != 0
    assert [e is not None for e in out.errors] == failed.tolist()
    assert np.all(out.x[failed] == 1.0) and np.all(out.ivar[failed] == 0.0)
