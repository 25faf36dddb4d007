"""The emulator in a bundle and the engine's goodness of fit: the file's sha256 is checked, the chi^2
columns exist only with an emulator, the reduced chi^2 is the formula of docs/results.md on the prepared
rows, MODEL_MISMATCH follows the threshold, and results written by `run` carry the columns."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.catalogs.schema import CHI2, CHI2_PIXELS, Flag, results_schema
from starcast.engine import emulator as emulator_module
from starcast.engine.bundle import load_bundle, save_bundle
from starcast.engine.calibration import Calibration
from starcast.engine.emulator import EMULATOR_FILE, Emulator, Threshold, save_emulator
from starcast.engine.predictor import PREPARED_IVAR, load_model
from starcast.engine.run import run

from starcast.errors import ModelError

from .conftest import TINY_GRID, make_bundle

LINE = 1.0 - 0.4 * np.exp(-0.5 * ((TINY_GRID.values() - 4100.0) / 3.0) ** 2)  # one absorption line


def add_emulator(path, *, sigma: float = 0.0, threshold: float | dict = 2.0, spectrum=LINE, labels=None,
                 refine_steps: int = 0, continuum_degree: int = -1, ripple_threshold: float | None = None,
                 sigma_scaling: dict | None = None, estimated_noise_threshold=None, contrast_threshold=None,
                 freer_degree: int | None = None):
    """Give the bundle at `path` an emulator of `labels` (default: all three targets) that returns
    `spectrum` whatever the labels, or, with `refine_steps`, `spectrum` plus a small term that
    depends on them (so that its fit moves them); `sigma_scaling`, `estimated_noise_threshold`
    (`chi2_threshold_estimated_noise`), `contrast_threshold`, `freer_degree`: the manifest entry's, if
    any."""
    bundle = load_bundle(path)
    labels = labels or ["teff", "logg", "vsini"]
    k = len(labels)
    slope = 0.01 * np.random.default_rng(0).normal(size=(8, TINY_GRID.n)) if refine_steps else 0.0
    layers = [(np.full((k, 8), 0.1) + np.arange(k)[:, None] * 0.2, np.zeros(8)),
              (np.zeros((8, TINY_GRID.n)) + slope, spectrum)]
    entry = save_emulator(path, layers, np.full(TINY_GRID.n, sigma), {
        "labels": labels, "hidden": [8], "activation": "silu",
        "label_mean": [20000.0, 3.5, 100.0][:k], "label_std": [5000.0, 0.5, 100.0][:k],
        "continuum_degree": continuum_degree, "refine_steps": refine_steps, "chi2_threshold": threshold,
        **({} if ripple_threshold is None else {"ripple_threshold": ripple_threshold}),
        **({} if sigma_scaling is None else {"sigma_scaling": sigma_scaling}),
        **({} if estimated_noise_threshold is None
           else {"chi2_threshold_estimated_noise": estimated_noise_threshold}),
        **({} if contrast_threshold is None else {"contrast_threshold": contrast_threshold}),
        **({} if freer_degree is None else {"freer_degree": freer_degree})})
    save_bundle(path, bundle.layers, {**bundle.manifest, "emulator": entry})
    return path


def catalog(n: int, snr: float, seed: int = 0, spectrum=LINE) -> dict:
    rng = np.random.default_rng(seed)
    flux = spectrum + rng.normal(0.0, 1.0 / snr, (n, TINY_GRID.n))
    return {"id": np.arange(n), "flux": flux.astype(np.float32), "wavelength": TINY_GRID.values(),
            "flux_err": np.full((n, TINY_GRID.n), 1.0 / snr, np.float32), "rv": np.zeros(n)}


def test_results_have_chi2_columns_only_with_an_emulator(tmp_path):
    plain = load_model(make_bundle(tmp_path / "plain"))
    assert plain.emulator is None and CHI2 not in plain.predict(catalog(4, 50.0)).column_names
    assert PREPARED_IVAR not in plain.prepare(_table(catalog(4, 50.0))).column_names
    model = load_model(add_emulator(make_bundle(tmp_path / "emu")))
    out = model.predict(catalog(4, 50.0))
    schema = results_schema(["teff", "logg", "vsini"], emulator=True)
    assert out.schema.field(CHI2).type == schema.field(CHI2).type and out.column(CHI2_PIXELS).type == "int32"
    assert out.column(CHI2).null_count == 0 and out.column(CHI2_PIXELS).to_pylist() == [TINY_GRID.n] * 4


def test_reduced_chi2_is_the_stated_formula_on_the_prepared_rows(tmp_path):
    """sum over pixels with ivar > 0 of (x - e)^2 / (1/ivar + sigma_emu^2), over their number, from
    the prepared x and ivar; about 1 for noise that flux_err describes, and > 1 when sigma_emu = 0
    cannot absorb a wrong spectrum."""
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), sigma=0.003))
    data = catalog(300, 100.0)
    data["flux"][0, 50:60] = np.nan  # masked pixels are left out of the sum
    prepared = model.prepare(_table(data))
    x = np.stack(prepared.column("x").to_numpy(zero_copy_only=False))[:, :TINY_GRID.n]
    ivar = np.stack(prepared.column(PREPARED_IVAR).to_numpy(zero_copy_only=False)).astype(float)
    good = ivar > 0
    expected = np.array([np.sum((x[i] - LINE)[g] ** 2 / (1 / ivar[i][g] + 0.003**2)) / g.sum()
                         for i, g in enumerate(good)])
    out = model.infer(prepared)
    np.testing.assert_allclose(out.column(CHI2).to_numpy(), expected, rtol=1e-4)
    assert out.column(CHI2_PIXELS)[0].as_py() == good[0].sum() < TINY_GRID.n
    assert 0.9 < np.median(expected) < 1.1


def test_reduced_chi2_counts_the_continuum_labels_and_rv_the_fit_fitted(tmp_path):
    """With a continuum and refined labels, the sum over the fit's pixels of the weighted squared
    residual of its final spectrum (`Emulator.fitted` at the fitted labels and rv) is divided by their
    number less the continuum's degree + 1 and the labels and rv (one each)."""
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), sigma=0.003, refine_steps=1,
                                    continuum_degree=2))
    prepared = model.prepare(_table(catalog(40, 100.0)))
    x = np.stack(prepared.column("x").to_numpy(zero_copy_only=False))[:, :TINY_GRID.n].astype(np.float32)
    ivar = np.stack(prepared.column(PREPARED_IVAR).to_numpy(zero_copy_only=False)).astype(float)
    emu = model.emulator
    start = np.tile([20000.0, 3.5, 100.0], (len(x), 1))
    fit = emu.chi2(x, ivar, start)
    weight = emu.pixel_weight(ivar, emu.sigma_factor(start))
    residual = x - emu.fitted(x, weight, fit.labels, fit.rv)
    n = (weight > 0).sum(axis=1)
    expected = (residual.astype(float) ** 2 * weight).sum(axis=1) / (n - 3 - 4)
    assert (fit.labels != start).any(axis=1).all() and (fit.rv != 0).all()  # the labels and rv were fitted
    np.testing.assert_allclose(fit.chi2, expected, rtol=1e-5)
    np.testing.assert_array_equal(fit.pixels, n)


def test_the_fit_frees_its_continuum_where_the_polynomial_cannot_explain_the_spectrum(tmp_path):
    """Half the spectra carry 2% of a T_5 over the grid (a response with more shape than the fit's
    continuum, a line, leaves): with the polynomial alone their chi^2 is far above the threshold of 1.5;
    with `freer_degree` 5 the fit frees its continuum there (`Fit.freed`, still MODEL_MISMATCH) and
    explains them (chi^2 < 1.4, with the 4 more terms counted), and leaves the others bit for bit as
    they were."""
    data = catalog(20, 200.0)
    shape = 1.0 + 0.02 * np.polynomial.chebyshev.chebval(np.linspace(-1.0, 1.0, TINY_GRID.n), [0] * 5 + [1])
    data["flux"][::2] *= shape.astype(np.float32)
    shaped = np.arange(20) % 2 == 0
    fits = {degree: load_model(add_emulator(make_bundle(tmp_path / f"emu{degree}"), continuum_degree=1,
                                            threshold=1.5, freer_degree=degree)).goodness_of_fit(data)
            for degree in (-1, 5)}
    plain, freer = fits[-1], fits[5]
    assert (plain.chi2[shaped] > 2.0).all() and not plain.freed.any()
    assert freer.freed.tolist() == shaped.tolist()
    assert (freer.chi2[shaped] < 1.4).all()
    np.testing.assert_array_equal(freer.chi2[~shaped], plain.chi2[~shaped])
    emulator = load_model(tmp_path / "emu5").emulator
    assert freer.mismatch(emulator)[shaped].all()


def test_the_emulators_sigma_is_scaled_per_row_by_its_factor_at_the_rows_label(tmp_path, monkeypatch):
    """With `sigma_scaling`, each row's sigma_emu is sigma times the factor interpolated (held beyond
    the knots) at the row's starting v sin i, in the chi^2 and in the fit's weights (over chunks of
    rows), and the fit records it."""
    monkeypatch.setattr("starcast.engine.emulator.CHUNK", 3)
    scaling = {"label": "vsini", "knots": [20.0, 220.0], "factors": [2.0, 0.5]}
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), sigma=0.01, sigma_scaling=scaling))
    prepared = model.prepare(_table(catalog(4, 100.0)))
    x = np.stack(prepared.column("x").to_numpy(zero_copy_only=False))[:, :TINY_GRID.n]
    ivar = np.stack(prepared.column(PREPARED_IVAR).to_numpy(zero_copy_only=False)).astype(float)
    labels = np.array([[20000.0, 3.5, v] for v in (0.0, 120.0, 220.0, 400.0)])
    fit = model.emulator.chi2(x, ivar, labels)
    factor = np.array([2.0, 1.25, 0.5, 0.5])
    np.testing.assert_allclose(fit.sigma_factor, factor, rtol=1e-6)
    expected = np.sum((x - LINE) ** 2 / (1 / ivar + (0.01 * factor[:, None]) ** 2), axis=1) / TINY_GRID.n
    np.testing.assert_allclose(fit.chi2, expected, rtol=1e-4)
    assert fit.chi2[0] < fit.chi2[1] < fit.chi2[2]


@pytest.mark.parametrize("scaling", [{"label": "metals", "knots": [0.0], "factors": [1.0]},
                                     {"label": "vsini", "knots": [50.0, 10.0], "factors": [1.0, 1.0]},
                                     {"label": "vsini", "knots": [10.0, 50.0], "factors": [1.0, 0.0]},
                                     {"label": "vsini", "knots": [10.0]},
                                     {"label": "vsini", "knots": [10.0, 50.0], "factors": [1.0]},
                                     {"label": "vsini", "knots": [], "factors": []}])
def test_a_wrong_sigma_scaling_is_refused_naming_the_key(tmp_path, scaling):
    with pytest.raises(ModelError, match="sigma_scaling"):  # by save_bundle, which loads what it seals
        add_emulator(make_bundle(tmp_path / "emu"), sigma_scaling=scaling)


def test_model_mismatch_flag_follows_the_threshold(tmp_path):
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), threshold=1.5))
    clean = model.predict(catalog(200, 100.0))
    wrong = model.predict(catalog(200, 100.0, spectrum=1.0 - 0.5 * (1.0 - LINE)))  # the line half as deep
    flagged = [(np.asarray(t.column("flags")) & Flag.MODEL_MISMATCH) != 0 for t in (clean, wrong)]
    assert flagged[0].mean() < 0.02 and flagged[1].all()
    assert (np.asarray(wrong.column(CHI2)) > 1.5).all()


TABLE = {"log10_snr": [1.5, 2.5], "label": "vsini", "knots": [0.0, 500.0], "values": [[1.2, 5.0], [1.3, 1.1]]}


def test_a_chi2_threshold_table_is_bilinear_in_log_snr_and_the_label_and_held_beyond():
    """Against scipy's RegularGridInterpolator on the inputs clipped to the knots."""
    from scipy.interpolate import RegularGridInterpolator

    labels = ["teff", "logg", "vsini"]
    table = Threshold.from_manifest(TABLE, labels)
    rng = np.random.default_rng(0)
    log_snr, vsini = rng.uniform(0.5, 3.5, 500), rng.uniform(-50.0, 600.0, 500)
    rows = np.stack([np.full(500, 2e4), np.full(500, 3.5), vsini], axis=1)
    reference = RegularGridInterpolator((TABLE["log10_snr"], TABLE["knots"]), np.asarray(TABLE["values"]))
    expected = reference(np.stack([np.clip(log_snr, 1.5, 2.5), np.clip(vsini, 0.0, 500.0)], axis=1))
    np.testing.assert_allclose(table.at(log_snr, rows, labels), expected, rtol=1e-12)
    assert Threshold.from_manifest(TABLE, labels).to_manifest() == TABLE
    assert Threshold.from_manifest(1.7, labels).at(log_snr, rows, labels).tolist() == [1.7] * 500


def test_model_mismatch_follows_the_threshold_table_at_each_rows_snr_and_fitted_label(tmp_path):
    """Each row's chi^2 against the table at its log10 SNR (the networks' feature of its prepared ivar)
    and its fit's v sin i: the same spectra pass at one SNR and are flagged at another."""
    from starcast.kernels.features import log10_snr

    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), threshold=TABLE))
    shallow = 1.0 - 0.85 * (1.0 - LINE)
    low, high = catalog(100, 30.0, spectrum=shallow), catalog(100, 300.0, spectrum=shallow)
    data = {**low, **{k: np.concatenate([low[k], high[k]]) for k in ("flux", "flux_err", "rv")},
            "id": np.arange(200)}
    prepared = model.prepare(_table(data))
    out = model.infer(prepared)
    ivar = np.stack(prepared.column(PREPARED_IVAR).to_numpy(zero_copy_only=False)).astype(np.float32)
    fit = model.goodness_of_fit(_table(data))
    limit = model.emulator.chi2_threshold.at(log10_snr(ivar), fit.labels, model.emulator.labels)
    flagged = (np.asarray(out.column("flags")) & Flag.MODEL_MISMATCH) != 0
    np.testing.assert_array_equal(flagged, np.asarray(out.column(CHI2)) > limit)
    assert 0.1 < flagged.mean() < 0.9


def test_rows_whose_noise_is_estimated_take_their_own_chi2_threshold(tmp_path):
    """Rows without flux_err (null in the column, or no column) get their noise from DER_SNR of the
    flux and are judged against `chi2_threshold_estimated_noise`; the others against `chi2_threshold`,
    as is every row of a model without the former."""
    wrong = 1.0 - 0.5 * (1.0 - LINE)  # the line half as deep: chi^2 well above 2 at SNR 100
    data = catalog(20, 100.0, spectrum=wrong)
    table = _table(data)
    err = table.column("flux_err").to_pylist()
    unstated = table.set_column(table.schema.get_field_index("flux_err"), "flux_err",
                                pa.array([e if i % 2 else None for i, e in enumerate(err)],
                                         table.schema.field("flux_err").type))
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), threshold=2.0,
                                    estimated_noise_threshold=1e6))
    for t, flagged in ((table, [True] * 20), (unstated, [bool(i % 2) for i in range(20)]),
                       (table.drop_columns(["flux_err"]), [False] * 20)):
        out = model.predict(t)
        assert (np.asarray(out.column(CHI2)) > 2.0).all()
        assert ((np.asarray(out.column("flags")) & Flag.MODEL_MISMATCH) != 0).tolist() == flagged
    plain = load_model(add_emulator(make_bundle(tmp_path / "plain"), threshold=2.0))
    assert ((np.asarray(plain.predict(unstated).column("flags")) & Flag.MODEL_MISMATCH) != 0).all()


def test_the_misfit_is_how_far_the_chi2_beyond_the_noise_passes_its_threshold(tmp_path):
    """`Fit.misfit`: the chi^2 over the noise's chi^2 (where that is above 1) less the MODEL_MISMATCH
    threshold, for a row whose noise is estimated that table's; 0 below it and where the fit gives no
    chi^2; MODEL_MISMATCH where it is above 0."""
    emulator = load_model(add_emulator(make_bundle(tmp_path / "emu"), threshold=1.1,
                                       estimated_noise_threshold=1.3)).emulator
    n = 6
    fit = emulator_module.Fit(**{f.name: np.full(n, np.nan) for f in dataclasses.fields(emulator_module.Fit)}
                              | {"labels": np.full((n, 3), np.nan), "log_snr": np.full(n, 2.0),
                                 "freed": np.zeros(n, bool),
                                 "chi2": np.array([1.05, 1.2, 1.2, 1.5, 1.2, np.nan]),
                                 "noise_chi2": np.array([np.nan, np.nan, 1.2, np.nan, 0.9, np.nan])})
    estimated = np.array([False, False, False, True, False, False])
    misfit = fit.misfit(emulator, estimated)
    np.testing.assert_allclose(misfit, [0.0, 0.1, 0.0, 0.2, 0.1, 0.0], atol=1e-12)
    assert fit.mismatch(emulator, estimated).tolist() == (misfit > 0).tolist()
    np.testing.assert_allclose(fit.misfit(emulator), [0.0, 0.1, 0.0, 0.4, 0.1, 0.0], atol=1e-12)


@pytest.mark.parametrize("table", [{**TABLE, "label": "metals"}, {**TABLE, "knots": [500.0, 0.0]},
                                   {**TABLE, "log10_snr": [2.5]}, {**TABLE, "values": [[1.2, None], [1, 1]]},
                                   {**TABLE, "label": None}, {k: v for k, v in TABLE.items() if k != "label"},
                                   "1.2", True])
def test_a_wrong_chi2_threshold_is_refused_naming_the_key(tmp_path, table):
    with pytest.raises(ModelError, match="chi2_threshold needs"):
        add_emulator(make_bundle(tmp_path / "emu"), threshold=table)
    with pytest.raises(ModelError, match="chi2_threshold_estimated_noise needs"):
        add_emulator(make_bundle(tmp_path / "other"), estimated_noise_threshold=table)
    with pytest.raises(ModelError, match="contrast_threshold needs"):
        add_emulator(make_bundle(tmp_path / "third"), contrast_threshold=table)


def test_the_noise_chi2_reads_the_scatter_and_the_contrast_where_the_excess_lies():
    """`Emulator.noise_and_contrast`: white noise k times its stated sigma reads a noise chi^2 of k^2 and a
    contrast near 0 whatever k; a smooth misfit (a slope of +-10 sigma) leaves the noise chi^2 at 1;
    noise twice as large in the lines alone reads a contrast of ln 4, in the continuum alone -ln 4."""
    rng = np.random.default_rng(1)
    rows, d = 100, 4000
    model = np.where(np.arange(d) % 10 < 2, 0.7, 1.0)[None].repeat(rows, axis=0)  # a fifth in lines
    ivar = np.full((rows, d), 1e4)
    noise = 0.01 * rng.standard_normal((rows, d))
    for k in (1.0, 1.5):
        chi, contrast = Emulator.noise_and_contrast(k * noise, ivar, ivar, model)
        assert abs(np.median(chi) - k**2) < 0.03 * k**2 and np.median(contrast) < 0.05, (k, chi, contrast)
    chi, _ = Emulator.noise_and_contrast(noise + 0.1 * np.linspace(-1.0, 1.0, d), ivar, ivar, model)
    assert abs(np.median(chi) - 1.0) < 0.03, np.median(chi)
    for where, sign in ((model < 1, 1.0), (model == 1, -1.0)):
        _, contrast = Emulator.noise_and_contrast(noise * np.where(where, 2.0, 1.0), ivar, ivar, model)
        assert abs(np.median(contrast) - sign * np.log(4.0)) < 0.1, contrast




def _noise_and_contrast_reference(residual, weight, ivar, emulated):
    """`Emulator.noise_and_contrast` as NumPy array operations over the batch, in float64."""
    residual, weight, ivar, emulated = (np.asarray(a, np.float64) for a in (residual, weight, ivar, emulated))
    r, depth, used = residual, 1.0 - emulated, weight > 0
    continuum = used & (np.abs(depth) < emulator_module.CONTINUUM_DEPTH)
    lines = used & (depth >= emulator_module.LINE_DEPTH)
    lag = emulator_module.NOISE_LAG
    pairs = continuum[:, lag:] & continuum[:, :-lag]
    variance = 1.0 / np.where(used, ivar, 1.0)
    steps = np.where(pairs, (r[:, lag:] - r[:, :-lag]) ** 2 / (variance[:, lag:] + variance[:, :-lag]), 0.0)

    def mean(values, part):
        n = part.sum(axis=1)
        return np.where(n >= emulator_module.CONTRAST_PIXELS, (values * part).sum(axis=1) / np.maximum(n, 1),
                        np.nan)
    chi = r**2 * weight
    return mean(steps, pairs), np.log(mean(chi, lines) / mean(chi, continuum))


def test_the_noise_chi2_and_contrast_kernel_matches_numpy():
    """The one-pass kernel against the batch's array operations, on rows with masked pixels, lines of
    any depth and rows with too few pixels of either kind (NaN)."""
    rng = np.random.default_rng(3)
    rows, d = 40, 1500
    emulated = (1.0 - rng.choice([0.0, 0.005, 0.02, 0.1, 0.4], (rows, d), p=[0.5, 0.2, 0.1, 0.1, 0.1]))
    emulated[-2:, :] = 0.5  # no continuum
    ivar = rng.uniform(1e3, 1e5, (rows, d))
    weight = np.where(rng.random((rows, d)) < 0.1, 0.0, ivar / (1.0 + 1e-4 * ivar))
    residual = (rng.standard_normal((rows, d)) / np.sqrt(ivar)).astype(np.float32)
    got = Emulator.noise_and_contrast(residual, weight.astype(np.float32), ivar.astype(np.float32),
                                      emulated.astype(np.float32))
    want = _noise_and_contrast_reference(residual, weight.astype(np.float32), ivar.astype(np.float32),
                                         emulated.astype(np.float32))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9)
    assert np.isnan(got[1][-2:]).all() and np.isfinite(got[1][:-2]).all()

def test_rows_whose_noise_is_estimated_count_only_an_excess_in_the_lines(tmp_path):
    """One noise level per row (DER_SNR) overstates photon noise in the lines, which read a deficit
    there: for those rows the contrast counts where it is positive, for the others by its size."""
    model = load_model(add_emulator(make_bundle(tmp_path / "emu"), continuum_degree=1))
    fit = dataclasses.replace(model.goodness_of_fit(catalog(4, 100.0)),
                              contrast=np.array([-1.0, 1.0, -1.0, 1.0]))
    assert fit.excess_contrast().tolist() == [1.0, 1.0, 1.0, 1.0]
    estimated = np.array([True, True, False, False])
    assert fit.excess_contrast(estimated).tolist() == [-1.0, 1.0, 1.0, 1.0]

BROAD = 1.0 - 0.4 * np.exp(-0.5 * ((TINY_GRID.values() - 4100.0) / 8.0) ** 2)  # 37 pixels 3% deep or more


def test_noise_the_flux_err_understates_is_no_mismatch_and_a_misfit_in_the_lines_is(tmp_path, monkeypatch):
    """flux_err 1.3x too small raises the chi^2 above a threshold of 1.5 on >= 80% of the rows, and the
    noise's chi^2 with it: MODEL_MISMATCH tests the chi^2 beyond the noise, which flags <= 15% of them
    (measured 7%: the engine's continuum, clipped against the stated noise, goes wrong on a few of
    these short spectra); a line half as deep is flagged, by the chi^2 and, with the chi^2's threshold
    out of reach, by the contrast alone (from the 37 line pixels of this short grid)."""
    monkeypatch.setattr(emulator_module, "CONTRAST_PIXELS", 30)
    data = catalog(200, 100.0, spectrum=BROAD)
    understated = {**data, "flux_err": data["flux_err"] / 1.3}
    wrong = catalog(200, 100.0, spectrum=1.0 - 0.5 * (1.0 - BROAD))
    for threshold, contrast, cases in ((1.5, None, ((understated, 0.15), (wrong, 1.0))),
                                       (1e6, 1.0, ((data, 0.05), (understated, 0.15), (wrong, 1.0)))):
        model = load_model(add_emulator(make_bundle(tmp_path / str(threshold)), threshold=threshold,
                                        spectrum=BROAD, continuum_degree=1, contrast_threshold=contrast))
        for table, share in cases:
            out = model.predict(table)
            mismatch = ((np.asarray(out.column("flags")) & Flag.MODEL_MISMATCH) != 0).mean()
            assert mismatch >= 0.95 if share == 1.0 else mismatch <= share, (threshold, share, mismatch)
    assert np.mean(np.asarray(model.predict(understated).column(CHI2)) > 1.5) >= 0.8


def test_the_estimate_blends_the_network_and_the_fit_as_the_calibration_says(tmp_path):
    """With `network_weight` w in the calibration, each target the emulator fits is w(SNR) times the
    network's mean plus 1 - w times the fit's labels (`goodness_of_fit(...).labels`, refined by a
    Gauss-Newton step; SNR: the row's, lowered by half the log of its chi^2 above 1, Birge's ratio),
    the network's odds w / (1 - w) grown by 1 + g_r e_r + g_o e_o with
    `network_gain` (g_r, g_o), e_r the part of the fit's excess chi^2 that a ripple explains, e_o the
    rest (here that of noise the flux_err understates), and a spectrum with a gap (GAP) takes the fit
    alone; a target it does not fit (here v sin i) keeps the network's mean. With
    `fit_variance_weight` lambda, each fitted target's aleatoric variance gains lambda times the
    variance of the fit's label (`Fit.label_err` squared) before the scale s, the network's weighed
    first by `defect_variance` d on the rows with a fitted ripple, not on those with a gap (whose
    networks' variances both models take from the gap filled by the fit's model); with `chi2_inflation` c,
    it is then multiplied by 1 + c sqrt(m) (m the fit's misfit, `Fit.misfit`: its chi^2 beyond the noise
    past the MODEL_MISMATCH threshold), and below chi2 = 1 (the `chi2` column) by chi2 itself (a
    spectrum less noisy than its flux_err says); the epistemic part is unchanged.
    `predict_samples`' draws carry the same: their mean variance is the aleatoric part."""
    features, targets = ("log10_snr",), ["teff", "logg", "vsini"]
    cal = Calibration(np.array([1.0, 2.5]), np.full((3, 2), 1.5), np.zeros(3),
                      np.array([[0.0, 1.0], [0.25, 0.25], [0.0, 0.0]]),
                      np.array([[0.0, 0.0], [4.0, 1.0], [0.0, 0.0]]), np.array([0.0, 2.0, 30.0]),
                      np.array([0.5, 2.0, 1.0]), np.array([0.5, 0.25, 0.0]))
    plain = cal.to_manifest(targets)
    for key in ("network_weight", "network_gain", "chi2_inflation", "fit_variance_weight", "defect_variance"):
        del plain[key]
    paths = {name: add_emulator(make_bundle(tmp_path / name, features=features, calibration=entry),
                                labels=["teff", "logg"], refine_steps=1, continuum_degree=0,
                                ripple_threshold=30.0, threshold=1.1)
             for name, entry in (("plain", plain), ("blend", cal.to_manifest(targets)))}
    data = catalog(6, 30.0)
    data["flux"][3:] = LINE + np.random.default_rng(1).normal(0.0, 1.0 / 200.0, (3, TINY_GRID.n))
    data["flux_err"][3:] = 1.0 / 200.0
    data["flux"][3] *= 1.0 + 0.003 * np.sin(2.0 * np.pi * TINY_GRID.values() / 50.0)  # a ripple of 50 A
    data["flux_err"][5] /= 1.5  # a spectrum noisier than its flux_err says: chi^2 ~ 2.25
    data["flux"][[1, 4], 140:170] = np.nan  # a gap of 30 pixels, longer than preprocessing fills
    network, blended = (load_model(paths[name]).predict(data, backend="cpu") for name in ("plain", "blend"))
    fit = load_model(paths["plain"]).goodness_of_fit(data, backend="cpu")
    fitted = fit.labels
    gapped = (blended.column("flags").to_numpy() & Flag.GAP) != 0
    np.testing.assert_array_equal(gapped, [False, True, False, False, True, False])
    chi2 = blended.column(CHI2).to_numpy()
    # the SNR the calibration reads: the stated one, lowered where the fit's chi^2 says it is lower
    log_snr = np.log10(np.array([30.0] * 3 + [200.0] * 2 + [300.0])) - 0.5 * np.log10(np.maximum(chi2, 1.0))
    excess = np.maximum(chi2 - 1, 0)
    ripple, other = fit.excess.T
    misfit = np.maximum(fit.chi2_beyond_noise - load_model(paths["plain"]).emulator.chi2_threshold.at(
        fit.log_snr, fit.labels, ["teff", "logg"]), 0.0)
    # the ripple leaves a misfit past the threshold (1.1); noise the flux_err understates (row 5) none
    assert misfit[3] > 0.05 and (misfit[[0, 1, 2, 4, 5]] == 0).all() and chi2[5] > 2.0
    np.testing.assert_allclose(other, excess, rtol=1e-9)  # what the fit, with any ripple, leaves
    assert ripple[3] > max(0.2, excess[3])  # the ripple is fitted (its statistic passed 30): most of it gone
    assert excess[5] > 0.8 and ripple[5] == 0  # noise: not a ripple
    for k, t in enumerate(["teff", "logg"]):
        w0 = np.interp(log_snr, [1.0, 2.5], cal.network_weight[k])
        odds_gain = cal.network_gain[k, 0] * ripple + cal.network_gain[k, 1] * other
        w = np.where(gapped, 0.0, w0 * (1 + odds_gain) / (1 + w0 * odds_gain))
        expected = w * network.column(t).to_numpy() + (1 - w) * fitted[:, k]
        np.testing.assert_allclose(blended.column(t).to_numpy(), expected, rtol=1e-3)
        assert np.all(np.abs(fitted[:, k] - network.column(t).to_numpy()) > 0)  # the fit moved them
    np.testing.assert_array_equal(blended.column("vsini").to_numpy(), network.column("vsini").to_numpy())
    fit_var = np.c_[fit.label_err**2, np.zeros(len(excess))]  # the emulator does not fit v sin i
    assert np.all(fit_var[:, :2] > 0)
    for k, t in enumerate(targets):
        var_a = [r.column(f"{t}_err_aleatoric").to_numpy() ** 2 for r in (network, blended)]
        d = np.where(ripple > 0, cal.defect_variance[k], 1.0)  # row 3: a ripple
        with_fit = d * var_a[0] + 1.5**2 * cal.fit_variance_weight[k] * fit_var[:, k]  # the fit's, scaled too
        factor = np.minimum(chi2, 1.0) * (1 + cal.chi2_inflation[k] * np.sqrt(misfit))
        np.testing.assert_allclose(var_a[1], with_fit * factor, rtol=1e-9)
        var_e = [r.column(f"{t}_err_epistemic").to_numpy() for r in (network, blended)]
        np.testing.assert_array_equal(*var_e)
    draws = load_model(paths["blend"]).predict_samples(data, backend="cpu")
    mean_var = (draws.sigma**2).mean(axis=(1, 2))
    aleatoric, epistemic = (np.stack([blended.column(f"{t}_err_{part}").to_numpy() for t in targets], axis=1)
                            for part in ("aleatoric", "epistemic"))
    np.testing.assert_allclose(mean_var, aleatoric**2, rtol=1e-4)
    # their spread is the epistemic part (scaled, with the floor): the mixture has predict's total sigma
    np.testing.assert_allclose(draws.mu.std(axis=(1, 2)), epistemic, rtol=1e-6)


def test_a_manifest_with_one_chi2_gain_reads_as_that_gain_on_every_part_of_the_excess():
    """An earlier manifest's `network_chi2_gain` g raised the odds by g max(chi2 - 1, 0), which is
    g e_r + g e_o over the parts of the excess: it loads as `network_gain` (g, g)."""
    targets = ["a", "b"]
    blend = Calibration(np.array([1.0]), np.ones((2, 1)), np.zeros(2), network_weight=np.full((2, 1), 0.5))
    entry = blend.to_manifest(targets)
    entry["network_chi2_gain"] = {"a": 3.0, "b": 0.5}
    gain = Calibration.from_manifest(entry, targets).network_gain
    np.testing.assert_array_equal(gain, [[3.0, 3.0], [0.5, 0.5]])


def test_a_tampered_or_missing_emulator_file_is_refused(tmp_path):
    path = add_emulator(make_bundle(tmp_path / "emu"))
    blob = bytearray((path / EMULATOR_FILE).read_bytes())
    blob[-1] ^= 1
    (path / EMULATOR_FILE).write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=f"sha256 of {EMULATOR_FILE}"):
        load_model(path)
    (path / EMULATOR_FILE).unlink()
    with pytest.raises(ModelError, match=f"{EMULATOR_FILE} is missing"):
        load_model(path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["emulator"]["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="bundle_sha256"):  # an edited manifest is refused first
        load_model(path)


def test_run_writes_the_chi2_columns(tmp_path):
    from starcast.catalogs.io import write_catalog

    model_dir = add_emulator(make_bundle(tmp_path / "emu"))
    data = catalog(6, 50.0)
    data["flux"][2] = np.nan  # a row that fails preprocessing: null chi2
    write_catalog(_table(data), tmp_path / "in.parquet")
    run(tmp_path / "in.parquet", tmp_path / "out", model=model_dir, backend="cpu", progress=False)
    out = pq.read_table(tmp_path / "out" / "results" / "in.parquet")
    assert out.column(CHI2).null_count == 1 and out.column(CHI2_PIXELS).type == "int32"


def _table(data: dict):
    from starcast.engine.predictor import _as_table

    return _as_table(data, None, None, TINY_GRID.medium)[0]


def test_a_label_scale_multiplies_each_sigma_by_its_factor_at_the_networks_mean(tmp_path):
    """`label_scale` on a target: every target's sigmas (both parts; no floor here) are those of the
    same calibration without it, times the factor interpolated at the network's mean of that target
    (here Teff, which the networks report unclipped), in `predict` and in `predict_samples` (whose
    float64 mean differs in the 7th digit)."""
    features, targets = ("log10_snr",), ["teff", "logg", "vsini"]
    data = catalog(6, 30.0)
    plain = Calibration(np.array([1.0, 2.5]), np.ones((3, 2)), np.zeros(3))
    probe = load_model(make_bundle(tmp_path / "probe", features=features,
                                   calibration=plain.to_manifest(targets)))
    base = probe.predict(data, backend="cpu")
    teff = base.column("teff").to_numpy()
    knots, scale = np.array([teff.min(), teff.max()]), np.array([[0.5, 2.0], [1.0, 3.0], [2.0, 2.0]])
    labelled = Calibration(plain.knots, plain.scale, plain.floor, label=0, label_knots=knots,
                           label_scale=scale)
    model = load_model(make_bundle(tmp_path / "label", features=features,
                                   calibration=labelled.to_manifest(targets)))
    out = model.predict(data, backend="cpu")
    samples = [m.predict_samples(data) for m in (probe, model)]
    for k, t in enumerate(targets):
        factor = np.interp(teff, knots, scale[k])
        for part in ("_err_aleatoric", "_err_epistemic"):
            np.testing.assert_allclose(out.column(t + part).to_numpy(),
                                       base.column(t + part).to_numpy() * factor, rtol=1e-6)
        np.testing.assert_allclose(samples[1].sigma[..., k], samples[0].sigma[..., k] * factor[:, None, None],
                                   rtol=1e-5)
