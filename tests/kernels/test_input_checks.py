"""What a catalog states about its input, honoured or refused by preprocessing: the medium of its
wavelengths, its resolving power, coverage short of the model grid, long gaps and lost lines."""

import json

import numpy as np
import pyarrow as pa
import pytest
from PyAstronomy import pyasl
from starcast.catalogs.lines import DIAGNOSTIC_LINES
from starcast.catalogs.medium import air_to_vacuum, convert, vacuum_to_air
from starcast.catalogs.physics import instrumental_broadening, pixel_average
from starcast.catalogs.schema import (
    META_MEDIUM,
    META_PIXELS,
    META_RESOLVING_POWER,
    META_WAVELENGTH,
    Flag,
    WavelengthGrid,
)
from starcast.kernels.input_checks import coverage_error
from starcast.kernels.preprocess import PreprocessSettings, preprocess
from starcast.kernels.resample import bin_edges, response_variance, rest_frame_factor

MODEL = WavelengthGrid.linear(4010.0, 0.4, 1951, medium="air")  # the shipped model's grid
OBSERVED = WavelengthGrid.linear(4000.0, 0.2, 4001, medium="air")  # its training spectra's pixels
SOURCE_AIR = np.linspace(4000.0, 4800.0, 8001)  # 0.1 A pixels
LINES_AIR = (4026.191, 4340.462, 4471.480, 4552.622)


def line_spectrum(wl_air, width=0.3):
    """Continuum 1 with Gaussian absorption lines at LINES_AIR (A, air), width in A."""
    flux = np.ones_like(wl_air)
    for centre in LINES_AIR:
        flux *= 1 - 0.5 * np.exp(-0.5 * ((wl_air - centre) / width) ** 2)
    return flux


def shared(flux, grid):
    return pa.table({"flux": pa.array([np.asarray(f, np.float32) for f in np.atleast_2d(flux)],
                                      pa.list_(pa.float32()))}).replace_schema_metadata(
        {META_WAVELENGTH: grid.to_json()})


def per_row(flux, wl, metadata=None, **columns):
    table = pa.table({"flux": pa.array([np.asarray(f, np.float32) for f in flux], pa.list_(pa.float32())),
                      "wavelength": pa.array(list(wl), pa.list_(pa.float64())), **columns})
    return table.replace_schema_metadata(metadata)


def test_medium_conversion_matches_pyastronomy_ciddor_both_ways():
    wavelength = np.array([3100.0, 4471.48, 6564.61, 9000.0, 15000.0])
    np.testing.assert_allclose(vacuum_to_air(wavelength), pyasl.vactoair2(wavelength, mode="ciddor"),
                               atol=1e-6)
    np.testing.assert_allclose(air_to_vacuum(wavelength), pyasl.airtovac2(wavelength, mode="ciddor"),
                               atol=1e-6)
    np.testing.assert_allclose(convert(convert(wavelength, "air", "vacuum"), "vacuum", "air"), wavelength,
                               atol=1e-9)
    assert vacuum_to_air(6564.61) == pytest.approx(6562.80, abs=0.01)  # H alpha, vacuum -> air
    assert vacuum_to_air(1500.0) == 1500.0  # below 2000 A wavelengths are vacuum by convention


def test_vacuum_wavelengths_are_converted_to_the_models_air_on_every_catalog_path():
    flux = line_spectrum(SOURCE_AIR)
    reference = preprocess(shared(flux, WavelengthGrid.explicit(SOURCE_AIR, "air")), MODEL).x[0]
    vacuum = air_to_vacuum(SOURCE_AIR)  # the same spectrum as a vacuum-wavelength instrument sees it
    vacuum_grid = WavelengthGrid.explicit(vacuum, "vacuum")
    paths = {
        "file grid": preprocess(shared(flux, vacuum_grid), MODEL).x[0],
        "source_grid": preprocess(shared(flux, vacuum_grid).replace_schema_metadata(), MODEL,
                                  source_grid=vacuum_grid).x[0],
        "wavelength column": preprocess(per_row([flux], [vacuum], {META_MEDIUM: "vacuum"}), MODEL).x[0],
    }
    for name, x in paths.items():
        assert np.abs(x - reference).max() < 0.01, name
    mislabelled = preprocess(shared(flux, WavelengthGrid.explicit(vacuum, "air")), MODEL).x[0]
    assert np.abs(mislabelled - reference).max() > 0.2  # 1.2 A off on 0.3 A lines: the test can fail


def test_import_csv_medium_vacuum_is_honoured(tmp_path):
    from starcast.catalogs.csv_import import csv_to_table

    wl = np.linspace(4000.0, 4800.0, 2001)  # air
    flux = line_spectrum(wl)
    vacuum = air_to_vacuum(wl)
    csv = tmp_path / "v.csv"
    csv.write_text(",".join(f"{w:.6f}" for w in vacuum) + "\n" + ",".join(f"{f:.6f}" for f in flux) + "\n")
    reference = preprocess(shared(flux, WavelengthGrid.explicit(wl, "air")), MODEL).x[0]
    honoured = preprocess(csv_to_table(csv, medium="vacuum"), MODEL).x[0]
    ignored = preprocess(csv_to_table(csv, medium="air"), MODEL).x[0]
    assert np.abs(honoured - reference).max() < 0.01 < np.abs(ignored - reference).max()


AIR_IN_CAPITALS = WavelengthGrid.linear(4000.0, 0.1, 8001, "AIR").to_json()


@pytest.mark.parametrize("metadata", [{META_MEDIUM: "water"}, {META_WAVELENGTH: AIR_IN_CAPITALS}])
def test_a_medium_that_is_neither_air_nor_vacuum_is_an_error(metadata):
    """Stated as `starcast.medium` or as the file grid's, beside per-row wavelengths (the grid's was
    read as no medium stated, and the rows as in the model's)."""
    from starcast.errors import CatalogError

    with pytest.raises(CatalogError, match="'air' or 'vacuum'"):
        preprocess(per_row([line_spectrum(SOURCE_AIR)], [SOURCE_AIR], metadata), MODEL)


def test_rv_and_resolving_power_as_decimals_or_dictionary_encoded_read_as_numbers():
    """Database exports write decimals, pandas categoricals dictionary-encoded values: the same numbers."""
    import decimal

    flux = line_spectrum(SOURCE_AIR)
    plain = preprocess(per_row([flux] * 2, [SOURCE_AIR] * 2, rv=pa.array([12.5, -3.25]),
                               resolving_power=pa.array([40000.0, 40000.0])), MODEL, resolving_power=20000.0)
    rv = pa.array([decimal.Decimal("12.50"), decimal.Decimal("-3.25")], pa.decimal128(6, 2))
    other = preprocess(per_row([flux] * 2, [SOURCE_AIR] * 2, rv=rv,
                               resolving_power=pa.array([40000, 40000]).dictionary_encode()), MODEL,
                       resolving_power=20000.0)
    np.testing.assert_array_equal(other.x, plain.x)
    assert not (plain.flags & Flag.PREPROCESS_FAILED).any()


def test_short_coverage_nulls_the_row_and_states_both_ranges():
    wl = np.linspace(4460.0, 4500.0, 401)
    out = preprocess(per_row([line_spectrum(wl)], [wl]), MODEL)
    assert out.flags[0] & Flag.COVERAGE and out.flags[0] & Flag.PREPROCESS_FAILED
    assert "covers 4460.0-4500.0 A (rest frame), 5.0% of the model's 4010.0-4790.0 A (air)" in out.errors[0]
    assert "singular" not in out.errors[0] and "nanometres" not in out.errors[0]
    half = np.linspace(4000.0, 4400.0, 4001)  # the 4000-4400 A catalog, once Teff -1 600 K
    assert "covers 4000.0-4400.0 A" in preprocess(per_row([line_spectrum(half)], [half]), MODEL).errors[0]


def test_coverage_just_short_is_not_rounded_up_to_what_is_needed():
    text = coverage_error(4052.0, 4790.0, np.linspace(4010.0, 4790.0, 1951), "air", 0.9496, 0.95)
    assert "94.9% of the model's 4010.0-4790.0 A (air), which needs at least 95%" in text


def test_wavelengths_in_nanometres_get_a_hint():
    wl = np.linspace(300.0, 1100.0, 8001)
    out = preprocess(per_row([np.ones_like(wl)], [wl]), MODEL)
    assert "nanometres" in out.errors[0] and "multiply by 10" in out.errors[0]


@pytest.mark.parametrize("wl", [np.linspace(400.0, 480.0, 4001), np.linspace(6000.0, 6800.0, 8001)],
                         ids=["nanometres", "red"])
def test_pixels_finer_than_the_training_spectras_off_the_grid_are_short_coverage_too(wl):
    """Pixels finer than the training spectra's are remade on theirs first; a spectrum none of them
    covers is short of the grid as any other (flag and message), with the nanometres' hint."""
    out = preprocess(per_row([np.ones_like(wl)], [wl]), MODEL, observed=OBSERVED)
    assert out.flags[0] & Flag.COVERAGE and out.flags[0] & Flag.PREPROCESS_FAILED and out.coverage[0] == 0
    assert "0.0% of the model's 4010.0-4790.0 A" in out.errors[0]
    assert ("nanometres" in out.errors[0]) == (wl[0] < 1000)


def test_a_30_angstrom_gap_over_he_i_4471_is_flagged_gap_and_line_lost_but_keeps_its_numbers():
    flux = line_spectrum(SOURCE_AIR)
    over_line, elsewhere = flux.copy(), flux.copy()
    over_line[(SOURCE_AIR > 4456) & (SOURCE_AIR < 4486)] = np.nan
    elsewhere[(SOURCE_AIR > 4600) & (SOURCE_AIR < 4630)] = np.nan  # no diagnostic line in 4600-4630 A
    wide_gap = SOURCE_AIR[(SOURCE_AIR < 4456) | (SOURCE_AIR > 4486)]  # a hole in the wavelengths
    out = preprocess(per_row([over_line, elsewhere, flux, line_spectrum(wide_gap)],
                             [SOURCE_AIR, SOURCE_AIR, SOURCE_AIR, wide_gap]), MODEL)
    gap, lost = (out.flags & Flag.GAP) != 0, (out.flags & Flag.LINE_LOST) != 0
    assert gap.tolist() == [True, True, False, True] and lost.tolist() == [True, False, False, True]
    assert out.errors == [None] * 4  # flags tell the user; the numbers stay


def test_a_bad_pixel_on_a_line_is_interpolated_not_a_lost_line():
    """One bad pixel (a cosmic ray) at He I 4471 is filled from its neighbours: no GAP, no LINE_LOST."""
    flux = line_spectrum(SOURCE_AIR)
    flux[np.argmin(np.abs(SOURCE_AIR - 4471.5))] = np.nan
    out = preprocess(per_row([flux], [SOURCE_AIR]), MODEL)
    assert out.flags[0] == Flag.NON_FINITE and out.errors == [None]


def test_diagnostic_lines_are_on_the_models_grid_and_cite_a_source():
    names = [line.name for line in DIAGNOSTIC_LINES]
    for expected in ("H delta", "H gamma", "He I 4471", "He II 4686", "Mg II 4481", "Si III 4553",
                     "O II 4415"):
        assert expected in names
    assert all(4000 < line.wavelength < 4800 and line.source for line in DIAGNOSTIC_LINES)


def test_higher_resolution_is_smoothed_down_to_the_models():
    fine = np.linspace(4000.0, 4800.0, 32001)  # 0.025 A pixels resolve R = 40 000
    intrinsic = line_spectrum(fine, width=0.02)
    at_40k = instrumental_broadening(fine, intrinsic, 40000.0)
    at_20k = instrumental_broadening(fine, intrinsic, 20000.0)
    table = per_row([at_40k, at_20k, at_40k], [fine] * 3, resolving_power=pa.array([40000.0, 20000.0, None]))
    out = preprocess(table, MODEL, resolving_power=20000.0)
    assert np.abs(out.x[0] - out.x[1]).max() < 1e-4  # smoothed 40 000 = observed at 20 000 (measured 5e-6)
    assert np.abs(out.x[2] - out.x[1]).max() > 0.005  # unsmoothed (R not stated) differs (measured 0.009)
    assert out.flags.tolist() == [0, 0, 0]


def test_lower_resolution_is_flagged_and_nulled_with_both_r_values():
    flux = line_spectrum(SOURCE_AIR)
    table = per_row([flux] * 3, [SOURCE_AIR] * 3, resolving_power=pa.array([5000.0, 18500.0, None]))
    out = preprocess(table, MODEL, resolving_power=20000.0)
    low = Flag.LOW_RESOLUTION | Flag.PREPROCESS_FAILED
    assert out.flags.tolist() == [low, 0, 0]  # 18 500 is within the 10% tolerance; unknown is not checked
    assert "R = 5000" in out.errors[0] and "R = 20000" in out.errors[0]
    file_level = per_row([flux], [SOURCE_AIR], {META_RESOLVING_POWER: json.dumps(2000.0)})
    assert preprocess(file_level, MODEL, resolving_power=20000.0).flags[0] == low
    assert preprocess(file_level, MODEL).flags[0] == 0  # the model states no R: no check


def test_a_resolving_power_that_is_not_a_positive_number_fails_its_row_and_says_so():
    flux = line_spectrum(SOURCE_AIR)
    values = [-1.0, 0.0, np.inf, np.nan, 20000.0]  # NaN, as pandas writes a missing value: not known
    out = preprocess(per_row([flux] * 5, [SOURCE_AIR] * 5, resolving_power=pa.array(values)), MODEL)
    assert [bool(f & Flag.PREPROCESS_FAILED) for f in out.flags] == [True, True, True, False, False]
    assert out.errors[0] == "resolving_power is -1: a positive number, or null where not known"
    assert "is 0:" in out.errors[1] and "is inf:" in out.errors[2] and out.errors[3] is None


def test_finer_pixels_are_smoothed_up_to_the_pixel_response_of_the_training_spectra():
    """The same R = 20 000 spectrum on 0.05 A pixels has sharper lines on the 0.4 A model grid than on
    the 0.2 A pixels a model was trained on, whose centres are the grid's bin edges: with that pixel
    response stated, the finer one is smoothed up to it and reads as the training spectra do, which
    stay untouched."""
    hires = np.arange(3995.0, 4805.0, 0.005)
    spectrum = instrumental_broadening(hires, line_spectrum(hires, width=0.03), 20000.0)

    def observed(step):  # pixel averages, centred at 4000 + k step as gridsynth.Observation's
        centres = np.arange(4000.0, 4800.0 + step / 2, step)
        edges = np.concatenate([centres - step / 2, centres[-1:] + step / 2])
        return centres, pixel_average(hires, spectrum, edges)

    (train_wl, train), (fine_wl, fine) = observed(0.2), observed(0.05)
    model = MODEL.values()
    edges, model_edges = np.empty(len(train_wl) + 1), np.empty(len(model) + 1)
    bin_edges(train_wl, edges)
    bin_edges(model, model_edges)
    response = response_variance(train_wl, edges, model, model_edges, True)
    table = per_row([train, fine], [train_wl, fine_wl])
    smoothed, plain = preprocess(table, MODEL, response=response), preprocess(table, MODEL)
    assert np.array_equal(smoothed.x[0], plain.x[0])
    # measured 0.0021 smoothed (a Gaussian's shape for the pixels' trapezoid), 0.0106 not
    assert np.abs(smoothed.x[1] - smoothed.x[0]).max() < 0.003
    assert np.abs(plain.x[1] - plain.x[0]).max() > 0.008


def test_pixels_as_fine_as_the_training_spectras_are_remade_as_those_whatever_the_rv():
    """A star at 37 km/s on 0.02 A pixels, and on the 0.2 A pixels of the training spectra but at that
    rv (so off their centres by a fraction of a pixel): smoothed by what their pixels lack of the
    training spectra's box and interpolated at their centres (`observed`), they come out as the star
    at rest on the training spectra's own pixels, which stay untouched; smoothed up to the training
    spectra's mean response instead, and rebinned where they fall, they do not (a line seen through
    pixels off the bin edges, or through a Gaussian, has another shape)."""
    hires = np.arange(3990.0, 4810.0, 0.005)
    spectrum = instrumental_broadening(hires, line_spectrum(hires, width=0.03), 20000.0)
    factor = rest_frame_factor(37.0)

    def observed(step, rv_factor):  # pixel averages, centred at 4000 + k step in the observer's frame
        centres = np.arange(4000.0, 4800.0 + step / 2, step)
        edges = np.concatenate([centres - step / 2, centres[-1:] + step / 2])
        return centres, pixel_average(hires / rv_factor, spectrum, edges)

    rows = [observed(0.2, 1.0), observed(0.02, factor), observed(0.2, factor)]
    table = per_row([f for _, f in rows], [wl for wl, _ in rows], rv=pa.array([0.0, 37.0, 37.0]))
    remade = preprocess(table, MODEL, response=0.0225, observed=OBSERVED)
    smoothed = preprocess(table, MODEL, response=0.0225)
    assert np.array_equal(remade.x[0], smoothed.x[0])
    off = {name: np.abs(out.x[1:] - out.x[0])[:, 5:-5].max(axis=1) for name, out in
           (("remade", remade), ("smoothed", smoothed))}
    # measured: fine 0.00037 remade, 0.0025 smoothed; shifted 0.0015 and 0.0036
    assert off["remade"][0] < 6e-4 and off["smoothed"][0] > 5 * off["remade"][0], off
    assert off["remade"][1] < 0.6 * off["smoothed"][1], off


def test_coarser_pixels_are_left_as_they_are_and_their_excess_response_is_stated():
    """0.4 A pixels centred on the 0.4 A model grid's bin edges: each model pixel is half of two of
    them, a response of 0.4^2 / 12 + 0.2^2 A^2, which no smoothing takes back; the row keeps its
    flux and states what its response has beyond the model's (`response_excess`), which the fit
    then sees its spectra through. 0.2 A pixels at the same edges (0.0233) are within the tolerance
    of the training spectra's mean response (0.0225): nothing to state."""
    model = MODEL.values()
    edges = np.empty(len(model) + 1)
    bin_edges(model, edges)
    coarse, train = edges[1:-1], np.arange(edges[1], edges[-2], 0.2)
    table = per_row([line_spectrum(coarse), line_spectrum(train)], [coarse, train])
    stated, plain = preprocess(table, MODEL, response=0.0225), preprocess(table, MODEL)
    assert np.array_equal(stated.x[0], plain.x[0])
    assert stated.response_excess[0] == pytest.approx(0.4**2 / 12 + 0.2**2 - 0.0225, rel=1e-6)
    assert stated.response_excess[1] == 0.0 and np.all(plain.response_excess == 0.0)
    # samples (a spectrum interpolated onto a grid) lose their pixels' box of 0.4^2 / 12
    sampled = preprocess(table.replace_schema_metadata({META_PIXELS: "sampled"}), MODEL, response=0.0225)
    assert sampled.response_excess[0] == pytest.approx(0.2**2 - 0.0225, rel=1e-6)


@pytest.mark.parametrize("value", ["pixels", '"point"', "1"])
def test_an_unknown_pixel_kind_is_an_error_naming_the_key_and_the_kinds(value):
    from starcast.errors import CatalogError

    table = per_row([line_spectrum(SOURCE_AIR)], [SOURCE_AIR], {META_PIXELS: value})
    with pytest.raises(CatalogError, match="starcast.pixels.*integrated, sampled"):
        preprocess(table, MODEL)
    for kind in ("sampled", '"sampled"', "integrated"):
        preprocess(table.replace_schema_metadata({META_PIXELS: kind}), MODEL)


@pytest.mark.parametrize("method", ["flux", "linear"])
@pytest.mark.parametrize("case", ["finer pixels", "higher resolution", "remade finer pixels",
                                  "remade shifted pixels"])
def test_the_propagated_errors_are_those_of_the_smoothed_noise(case, method):
    """Smoothing averages the noise of neighbouring pixels, which the resampling then takes as
    independent: the errors it propagates are scaled by what the smoothing leaves of their variance
    (`smoothed_noise_ratio`), so that the noise on the model grid is what they state (pulls of unit
    scatter; 0.88 and 0.89 without the scaling with flux-conserving rebinning, measured). The
    responses: those of 0.2 A pixels on the grid, rebinned (0.0225 A^2) or interpolated (0.0071).
    Remade on the training spectra's pixels (0.05 A pixels, or 0.2 A ones off their centres, of a
    star at 37 km/s, whose phase drifts along the spectrum), the errors are those of every step's
    correlations (`remade_variance`)."""
    rng = np.random.default_rng(7)
    step = {"finer pixels": 0.05, "higher resolution": 0.025, "remade finer pixels": 0.05}.get(case, 0.2)
    wl = np.arange(4000.0, 4800.0, step)
    err = np.full((20, len(wl)), 0.01)
    flux = 1.0 + err * rng.standard_normal(err.shape)
    columns = {"flux_err": pa.array(list(err.astype(np.float32)), pa.list_(pa.float32()))}
    settings = PreprocessSettings(method=method)
    response = 0.0225 if method == "flux" else 0.0071
    if case == "finer pixels":
        out = preprocess(per_row(flux, [wl] * 20, **columns), MODEL, settings, response=response)
    elif case == "higher resolution":
        out = preprocess(per_row(flux, [wl] * 20, resolving_power=pa.array([40000.0] * 20), **columns), MODEL,
                         settings, resolving_power=20000.0)
    else:
        out = preprocess(per_row(flux, [wl] * 20, rv=pa.array([37.0] * 20), **columns), MODEL, settings,
                         response=response, observed=OBSERVED)
    pulls = ((out.x - 1.0) * np.sqrt(out.ivar))[:, 20:-20]
    assert 0.97 < pulls.std() < 1.03, pulls.std()
