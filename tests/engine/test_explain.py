"""Explanations (`engine/explain.py`, `engine/explain_report.py`): integrated-gradients completeness, the
explained function is the deployed estimate (dropout masks included; the shipped model's blend with
its emulator fit), agreement with Captum and with the exact attributions of a linear model, the
path's refinement by its midpoints, the line-mass measure catching a planted continuum-slope shortcut,
and `starcast explain` writing its Parquet, plots and survey view (rows that cannot be predicted
included)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from starcast.catalogs.io import write_catalog
from starcast.catalogs.lines import DIAGNOSTIC_LINES
from starcast.catalogs.schema import Flag, WavelengthGrid
from starcast.engine.cli import explain as explain_command
from starcast.engine.explain import (
    continuum_baseline,
    explained_function,
    integrated_gradients,
    mean_function,
)
from starcast.engine.explain_report import LINE_MASS_GOAL, _line_shares, line_mass, model_report
from starcast.engine.predictor import load_model

from starcast.errors import CatalogError

GRID = WavelengthGrid.linear(3990.0, 1.0, 220)  # covers the tiny bundle's 4000-4199 A


def catalog_table(n: int, seed: int = 0) -> pa.Table:
    """Noisy spectra on GRID with three absorption lines of random depth, a tilted continuum, and SNR."""
    rng = np.random.default_rng(seed)
    wl = GRID.values()
    flux = np.ones((n, len(wl)))
    for centre in (4026.2, 4101.7, 4143.8):
        width = rng.uniform(1, 5, (n, 1))
        flux *= 1 - rng.uniform(0.1, 0.6, (n, 1)) * np.exp(-0.5 * ((wl - centre) / width) ** 2)
    flux *= 1 + rng.uniform(-0.1, 0.1, (n, 1)) * (wl - 4100) / 100
    flux = (flux + rng.normal(0, 0.01, flux.shape)).astype(np.float32)
    err = np.full(flux.size, 0.01, np.float32)
    return pa.table({"id": pa.array(np.arange(n, dtype=np.int64) + 100),
                     "flux": pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), len(wl)),
                     "flux_err": pa.FixedSizeListArray.from_arrays(pa.array(err), len(wl))})


@pytest.fixture
def dropout_model(tmp_path: Path, bundle_factory):
    """A random bundle with MC dropout (p = 0.1, S = 4) and the log10_snr input feature."""
    return load_model(bundle_factory(tmp_path / "b", dropout=0.1, samples=4, features=("log10_snr",)))


def test_attributions_sum_to_prediction_minus_continuum_within_one_percent(dropout_model):
    table = catalog_table(12, seed=1)
    table = table.replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    exp = dropout_model.explain(table, steps=16)
    assert exp.attributions.shape == (12, 3, dropout_model.grid.n)
    gap = exp.prediction - exp.baseline
    assert (np.abs(gap) > 0).all()
    np.testing.assert_array_less(np.abs(exp.attributions.astype(np.float64).sum(axis=2) - gap),
                                 0.01 * np.abs(gap))


def test_explained_function_is_the_deployed_mean_on_each_rows_dropout_masks(dropout_model):
    table = catalog_table(6, seed=2).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    exp = dropout_model.explain(table, steps=4, seed=3)
    ref = dropout_model.predict(table, backend="reference", seed=3)
    for k, t in enumerate(exp.targets):
        # predict clips v sin i at its physical minimum; these random weights keep it above
        np.testing.assert_allclose(exp.prediction[:, k], ref.column(t).to_numpy(), rtol=1e-5)


def test_explained_function_is_the_shipped_models_blend_with_its_emulator_fit(tmp_path: Path):
    """`ob-default` reports the network's mean blended with its emulator fit's labels (the network's
    share from its calibration): the explained function is that estimate, the fit's Gauss-Newton step
    included, to 1.5% of sigma (two float32 implementations of the fit: the broadest-lined rows, whose
    labels their spectra hold least, differ most, ~1%) on TLUSTY spectra it was not trained on, half of
    them with a continuum
    ripple that the fit fits too and half with the diffuse band at 4428 A (a quarter with both) that
    `predict` divides out, two with a gap over He I 4471 (the fit alone, started from the networks'
    reading of the gap filled with the continuum, not of the gap filled with the fit's model that
    their sigmas come from), and its attributions are complete."""
    from starcast.catalogs.grids import read_grid
    from starcast.catalogs.gridsynth import synth_from_grid
    from starcast.catalogs.schema import META_WAVELENGTH, WavelengthGrid, spectrum_array

    from starcast.demo import SAMPLE

    synth_from_grid(read_grid(SAMPLE), 8, tmp_path / "c", at_nodes=True, seed=3, snr=(50.0, 500.0))
    table = pq.read_table(tmp_path / "c")
    wl = WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()]).values()
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    flux[::2] *= 1.0 + 0.01 * np.sin(2 * np.pi * wl / 37.0)
    reddened = np.arange(8) % 4 < 2
    flux[reddened] *= 1.0 - 0.05 / (1.0 + ((wl - 4428.2) / 10.0) ** 2)
    table = table.set_column(table.schema.get_field_index("flux"), "flux",
                             spectrum_array(flux, flux.shape[1]))
    gapped = np.isin(np.arange(8), [1, 6])
    mask = np.stack(table.column("mask").to_numpy(zero_copy_only=False))
    mask[gapped] |= (wl >= 4466.0) & (wl < 4478.0)
    table = table.set_column(table.schema.get_field_index("mask"), "mask",
                             pa.FixedSizeListArray.from_arrays(mask.ravel(), mask.shape[1]))
    model = load_model()
    fit = model.goodness_of_fit(table, backend="cpu")
    assert np.isfinite(fit.ripple_frequency[::2]).all()
    np.testing.assert_array_equal(fit.dib_depths[:, 0] > 0, reddened)
    exp, out = model.explain(table), model.predict(table, backend="cpu")
    assert np.all((out.column("flags").to_numpy()[gapped] & Flag.GAP) != 0)
    for k, t in enumerate(exp.targets):
        miss = np.abs(exp.prediction[:, k] - out.column(t).to_numpy()) / out.column(f"{t}_err").to_numpy()
        assert np.all(miss < 0.015), (t, miss)
    assert np.all(exp.completeness_error() < 0.01), exp.completeness_error()
    # the fit's pixels weighed as the engine weighed them: each row's emulator sigma at its own factor
    prepared = model.prepare(table)
    ok, x, f, _ = explained_function(model, prepared, list(range(len(model.targets))))
    _, _, _, fit, ivar, *_ = model._inputs_as_predicted(prepared, model._samples(None), 0, "auto")
    assert np.ptp(fit.sigma_factor[ok]) > 0.1
    weight = model.emulator.pixel_weight(ivar[ok], fit.sigma_factor[ok])
    np.testing.assert_array_equal(f.weight.numpy(), weight)


def test_explained_blend_on_pixels_coarser_than_the_training_spectras(tmp_path: Path):
    """On pixels coarser than the training spectra's (every second 0.2 A pixel of the generator's, at
    rest: 0.4 A apart and centred on the model grid's bin edges) the emulator fit sees its spectra through
    the excess response (`Emulator.blur`): the explained function does too, and is `predict`'s
    estimate to 1% of sigma."""
    from starcast.catalogs.grids import read_grid
    from starcast.catalogs.gridsynth import synth_from_grid
    from starcast.catalogs.schema import META_WAVELENGTH, spectrum_array
    from starcast.engine.predictor import PREPARED_RESPONSE_EXCESS

    from starcast.demo import SAMPLE

    synth_from_grid(read_grid(SAMPLE), 4, tmp_path / "c", at_nodes=True, seed=5, snr=(100.0, 300.0))
    fine = pq.read_table(tmp_path / "c")
    grid = WavelengthGrid.from_json(fine.schema.metadata[META_WAVELENGTH.encode()])
    columns = {"id": fine.column("id"), "rv": fine.column("rv")}
    for name in ("flux", "flux_err"):
        values = np.stack(fine.column(name).to_numpy(zero_copy_only=False))[:, 1::2]
        columns[name] = spectrum_array(values, values.shape[1])
    coarse = WavelengthGrid.linear(grid.start + grid.step, 2 * grid.step, values.shape[1], medium=grid.medium)
    table = pa.table(columns).replace_schema_metadata({META_WAVELENGTH: coarse.to_json()})
    model = load_model()
    assert (model.prepare(table).column(PREPARED_RESPONSE_EXCESS).to_numpy() > 0.02).all()
    exp, out = model.explain(table), model.predict(table, backend="cpu")
    for k, t in enumerate(exp.targets):
        miss = np.abs(exp.prediction[:, k] - out.column(t).to_numpy()) / out.column(f"{t}_err").to_numpy()
        assert np.all(miss < 0.01), (t, miss)


def test_explanations_of_batches_concatenate_to_the_explanation_of_all_rows(dropout_model):
    """`explain_catalog` explains a catalog batch by batch (a progress step each): the dropout masks
    follow the ids, so the batches' explanations, concatenated, are those of all rows at once."""
    from starcast.engine.explain import Explanation

    table = catalog_table(10, seed=4).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    whole = dropout_model.explain(table, steps=8)
    parts = Explanation.concat([dropout_model.explain(table.slice(s, 4), steps=8) for s in (0, 4, 8)])
    assert parts.ids == whole.ids and parts.errors == whole.errors
    for name in ("flux", "attributions", "prediction", "baseline", "flags"):
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=1e-5, atol=1e-6)


def test_torch_ig_agrees_with_captum(dropout_model):
    pytest.importorskip("captum")
    table = catalog_table(5, seed=3).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    ours = dropout_model.explain(table, target=["teff", "vsini"], method="ig", steps=8)
    theirs = dropout_model.explain(table, target=["teff", "vsini"], method="captum", steps=8)
    scale = np.abs(ours.attributions).max()
    np.testing.assert_allclose(ours.attributions, theirs.attributions, atol=1e-5 * scale)


def test_ig_of_a_linear_network_is_weight_times_input_change():
    """With every ReLU active on the whole path, f is linear and IG is exact: (x - 1) * w_eff."""
    rng = np.random.default_rng(0)
    d, h = 30, 8
    w1 = torch.as_tensor(rng.uniform(0, 0.1, (1, d, h)), dtype=torch.float32)
    b1 = torch.full((1, h), 10.0)  # pre-activations stay positive for x in [0, 2]
    wo = torch.as_tensor(rng.normal(0, 1, (1, h, 2)), dtype=torch.float32)
    bo = torch.zeros((1, 2))
    f = mean_function([(w1, b1), (wo, bo)], targets=[0], p=0.0, activation="relu", label_mean=[5.0],
                      label_std=[2.0], dtype=torch.float64)
    x = rng.uniform(0.5, 1.2, (4, d))
    attr, _, _ = integrated_gradients(f, x, continuum_baseline(x, d), steps=3)
    w_eff = 2.0 * (w1[0].double() @ wo[0, :, 0].double()).numpy()
    np.testing.assert_allclose(attr[:, 0], (x - 1.0) * w_eff, rtol=1e-9)


def test_refining_the_path_by_its_midpoints_equals_the_rule_over_the_doubled_intervals(dropout_model):
    """Rows that miss completeness are refined by the new midpoints alone: forced to refine from 4 to 16
    intervals (tol 0), the attributions are those of the trapezoid rule over 16 intervals at once."""
    table = catalog_table(3, seed=5).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    prepared = dropout_model.prepare(table)
    ok, x, f, _ = explained_function(dropout_model, prepared, [0, 1, 2])
    base = continuum_baseline(x[ok], dropout_model.grid.n)
    refined, _, _ = integrated_gradients(f, x[ok], base, steps=4, tol=0.0, max_steps=16)
    direct, _, _ = integrated_gradients(f, x[ok], base, steps=16, max_steps=16)
    np.testing.assert_allclose(refined, direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())
    coarse, _, _ = integrated_gradients(f, x[ok], base, steps=4, max_steps=4)
    assert np.abs(coarse - direct).max() > 1e-3 * np.abs(direct).max()  # the refinement did change them

# --- the line-mass measure against a planted shortcut --------------------------------------------

MODEL_GRID = WavelengthGrid.linear(4010.0, 2.0, 391, medium="air")


def _train_mean_model(x: np.ndarray, y: np.ndarray, seed: int):
    """One small ReLU MLP fitted to y (MSE) as bundle-style layers [(W [1,in,out], b [1,out])]; trained on
    x - 1 (the flux's depth below the continuum), the shift folded into the first bias."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.as_tensor(x - 1.0, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)[:, None]
    for _ in range(300):
        opt.zero_grad()
        loss = ((net(xt) - yt) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * yt.var().item()  # it did learn y
    w1 = net[0].weight.detach().T[None]
    b1 = (net[0].bias.detach() - w1[0].sum(dim=0))[None]
    wo = torch.cat([net[2].weight.detach().T, torch.zeros(32, 1)], dim=1)[None]  # mean, raw variance
    bo = torch.cat([net[2].bias.detach(), torch.zeros(1)])[None]
    return [(w1, b1), (wo, bo)]


def _spectra(n: int, y: np.ndarray, *, lines_follow_y: bool, tilt_follows_y: bool, seed: int) -> np.ndarray:
    """Normalised spectra with every listed line (depth set by y, or random) and a continuum tilt (set
    by y, or random), plus 1% noise."""
    rng = np.random.default_rng(seed)
    wl = MODEL_GRID.values()
    flux = np.ones((n, len(wl)))
    for i, line in enumerate(DIAGNOSTIC_LINES):
        depth = 0.3 + 0.2 * (y if lines_follow_y else rng.uniform(-1, 1, n)) * (-1) ** i
        flux *= 1 - depth[:, None] * np.exp(-0.5 * ((wl - line.wavelength) / 1.5) ** 2)
    tilt = y if tilt_follows_y else rng.uniform(-1, 1, n)
    flux *= 1 + 0.05 * tilt[:, None] * (wl - wl.mean()) / (wl[-1] - wl[0])
    return flux + rng.normal(0, 0.01, flux.shape)


def _line_mass_of_model(lines_follow_y: bool, tilt_follows_y: bool) -> float:
    rng = np.random.default_rng(7)
    y = rng.uniform(-1, 1, 768)
    x = _spectra(768, y, lines_follow_y=lines_follow_y, tilt_follows_y=tilt_follows_y, seed=8)
    layers = _train_mean_model(x, y, seed=9)
    f = mean_function(layers, targets=[0], p=0.0, activation="relu", label_mean=[0.0], label_std=[1.0])
    test = x[:64]
    attr, fx, fb = integrated_gradients(f, test.astype(np.float32), continuum_baseline(test, test.shape[1]))
    return float(line_mass(attr[:, 0], MODEL_GRID.values(), "teff").mean())


def test_line_mass_catches_a_continuum_slope_shortcut_and_passes_a_line_model():
    """Two models fit y equally well: one from the line depths, one from a continuum tilt planted to
    follow y while the lines carry nothing. Only the first puts >= LINE_MASS_GOAL of its |attribution|
    on the listed lines (measured: 0.88 and 0.29; the shortcut's 0.29 is the lines' depth below the
    continuum, which weighs IG's gradient there)."""
    honest = _line_mass_of_model(lines_follow_y=True, tilt_follows_y=False)
    shortcut = _line_mass_of_model(lines_follow_y=False, tilt_follows_y=True)
    assert honest >= LINE_MASS_GOAL, (honest, shortcut)
    assert shortcut < LINE_MASS_GOAL, (honest, shortcut)


def test_a_row_without_attribution_has_no_line_mass():
    """A row whose estimate no pixel moves (all attributions 0) has no line mass: NaN, without 0/0's
    warning."""
    wl = MODEL_GRID.values()
    attr = np.zeros((2, len(wl)))
    attr[0, np.argmin(np.abs(wl - 4101.7))] = 1.0  # all of it on H delta
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(line_mass(attr, wl, "teff"), [1.0, np.nan])


def test_line_contrast_separates_a_line_from_the_wing_it_sits_in():
    """A Balmer wing carrying the attribution gives the lines inside it a contrast near 1 and no share
    above their flanks; a spike on one of them (O II 4072, in H delta's wing) stands out."""
    wl = np.arange(4000.0, 4800.0, 0.2)
    h_delta = next(ln.wavelength for ln in DIAGNOSTIC_LINES if ln.name == "H delta")
    wing = np.exp(-0.5 * ((wl - h_delta) / 40.0) ** 2)
    lines = {s["line"]: s for s in _line_shares(wing, wl)[0]}
    assert 0.8 < lines["O II 4072"]["contrast"] < 1.25 and lines["O II 4072"]["share_above_flanks"] < 0.01
    spiked = wing + 5.0 * np.exp(-0.5 * ((wl - 4071.2) / 0.5) ** 2)
    lines = {s["line"]: s for s in _line_shares(spiked, wl)[0]}
    assert lines["O II 4072"]["contrast"] > 2 and lines["O II 4072"]["share_above_flanks"] > 0.05
    assert 0.8 < lines["He I 4121"]["contrast"] < 1.25  # the other lines in the wing are unchanged


# --- the command ------------------------------------------------------------------------------

def test_explain_command_writes_attributions_plots_and_survey(tmp_path: Path, tiny_bundle: Path):
    cat = write_catalog(catalog_table(8), tmp_path / "cat.parquet", grid=GRID)
    out = tmp_path / "ex"
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(out), "--model", str(tiny_bundle),
                                                  "--ids", "101,103,105", "--plots", "2", "--steps", "8"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "attributions.parquet")
    assert table.column("id").to_pylist() == [101, 103, 105]
    assert len(table.column("teff")[0]) == 200 and table.schema.field("teff").type == pa.list_(pa.float32())
    assert WavelengthGrid.from_json(table.schema.metadata[b"starcast.wavelength"].decode()).n == 200
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["101.png", "103.png"]
    survey = json.loads((out / "survey" / "survey.json").read_text())
    assert survey["spectra"] == 3 and set(survey["targets"]) == {"teff", "logg", "vsini"}
    assert (out / "survey" / "survey.png").is_file() and (out / "survey" / "survey.parquet").is_file()


def test_explain_command_keeps_the_id_type_passes_over_null_ids_and_names_each_plot(tmp_path: Path,
                                                                                   tiny_bundle: Path):
    """uint64 ids above 2^63 come out as they went in; a row with a null id (which cannot key an
    explanation) is passed over, named by file and row, and the next row taken instead; a repeated
    id gets a plot of its own."""
    big = 2**64 - 1
    ids = pa.array([big, None, big, 7, 8], pa.uint64())
    cat = tmp_path / "cat.parquet"  # written as it is: the catalog writer refuses null ids
    pq.write_table(catalog_table(5).set_column(0, "id", ids).replace_schema_metadata(
        {"starcast.wavelength": GRID.to_json()}), cat)
    out = tmp_path / "ex"
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(out), "--model", str(tiny_bundle),
                                                  "--n", "3", "--plots", "3", "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert f"passed over 1 rows with a null id (an explanation is keyed by its id): {cat} row 1" \
        in result.output
    table = pq.read_table(out / "attributions.parquet")
    assert table.schema.field("id").type == pa.uint64() and table.column("id").to_pylist() == [big, big, 7]
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [f"{big}.png", f"{big}_1.png", "7.png"]


def test_explain_command_names_missing_ids(tmp_path: Path, tiny_bundle: Path):
    cat = write_catalog(catalog_table(4), tmp_path / "cat.parquet", grid=GRID)
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(tmp_path / "ex"), "--model",
                                                  str(tiny_bundle), "--ids", "101,999"])
    assert result.exit_code != 0 and "999" in str(result.exception)


def test_explain_command_reads_each_files_rows_with_that_files_metadata(tmp_path: Path, tiny_bundle: Path):
    """A catalog of two files whose file-level wavelength grids and column types differ: each file's rows
    are explained as `predict` reads that file (not with the first file's grid)."""
    table = catalog_table(4)
    write_catalog(table, tmp_path / "cat" / "a.parquet", grid=GRID)
    shifted = WavelengthGrid.linear(3992.0, 1.0, 220)  # the same fluxes read 2 A to the red
    b = table.set_column(0, "id", pa.array(np.arange(4, dtype=np.int64) + 500))
    b = b.set_column(1, "flux", b.column("flux").cast(pa.list_(pa.float32())))  # list, not fixed-size
    pq.write_table(b.replace_schema_metadata({"starcast.wavelength": shifted.to_json()}),
                   tmp_path / "cat" / "b.parquet")
    out = tmp_path / "ex"
    result = CliRunner().invoke(explain_command, [str(tmp_path / "cat"), "--out", str(out), "--model",
                                                  str(tiny_bundle), "--ids", "101,502", "--plots", "0",
                                                  "--steps", "4"])
    assert result.exit_code == 0, result.output
    written = pq.read_table(out / "attributions.parquet")
    assert written.column("id").to_pylist() == [101, 502]
    model = load_model(tiny_bundle)
    alone = {101: model.predict(table.slice(1, 1), source_grid=GRID),
             502: model.predict(b.slice(2, 1), source_grid=shifted)}
    for row, i in enumerate((101, 502)):
        for t in ("teff", "logg"):
            assert written.column(f"{t}_pred")[row].as_py() == pytest.approx(alone[i].column(t)[0].as_py(),
                                                                            rel=1e-5), (i, t)


def test_explain_command_reads_ids_in_the_id_columns_type(tmp_path: Path, tiny_bundle: Path):
    """An id that an integer id column cannot hold is one it does not have: named (a CatalogError, which
    the command line gives as one line, exit 2; not a traceback); one written with a sign or leading
    zeros is the number it reads as; dictionary-encoded string ids (a pandas categorical) are read as
    their values, as `run` reads them."""
    cat = write_catalog(catalog_table(4), tmp_path / "cat.parquet", grid=GRID)
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(tmp_path / "ex"), "--model",
                                                  str(tiny_bundle), "--ids", "abc,1.5,+-5,101"])
    assert isinstance(result.exception, CatalogError)
    assert "no rows with id abc, 1.5, +-5" in str(result.exception)
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(tmp_path / "ex2"), "--model",
                                                  str(tiny_bundle), "--ids", "+101,0102", "--plots", "0",
                                                  "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "ex2" / "attributions.parquet").column("id").to_pylist() == [101, 102]
    names = pa.array([f"s {i}" for i in range(4)]).dictionary_encode()
    pq.write_table(catalog_table(4).set_column(0, "id", names).replace_schema_metadata(
        {"starcast.wavelength": GRID.to_json()}), tmp_path / "named.parquet")
    named = str(tmp_path / "named.parquet")
    result = CliRunner().invoke(explain_command, [named, "--out", str(tmp_path / "ex3"), "--model",
                                                  str(tiny_bundle), "--ids", "s 2", "--plots", "0",
                                                  "--steps", "4"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "ex3" / "attributions.parquet").column("id").to_pylist() == ["s 2"]


def test_explanations_carry_the_flags_predict_gives(dropout_model, bundle_factory, tmp_path: Path):
    """The flags of an explanation, and of `predict_samples`, are `predict`'s, those set from the
    prediction (here HIGH_EPISTEMIC on half the rows) included, not only the preprocessing's."""
    table = catalog_table(12, seed=2).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    sigma = dropout_model.predict(table).column("teff_err_epistemic").to_numpy()
    model = load_model(bundle_factory(tmp_path / "ood", dropout=0.1, samples=4, features=("log10_snr",),
                                      ood={"epistemic_sigma_threshold": {"teff": float(np.median(sigma))}}))
    flags = model.predict(table).column("flags").to_numpy()
    assert ((flags & Flag.HIGH_EPISTEMIC) > 0).sum() == 6
    np.testing.assert_array_equal(model.explain(table, steps=4).flags, flags)
    np.testing.assert_array_equal(model.predict_samples(table).flags, flags)


def test_model_report_writes_the_survey_view_into_the_bundle_without_attributions(tiny_bundle: Path):
    table = catalog_table(4).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    summary = model_report(tiny_bundle, table, plots=1)
    folder = tiny_bundle / "report" / "explain"
    assert summary["rows"] == 4 and (folder / "survey" / "survey.md").is_file()
    assert len(list((folder / "plots").glob("*.png"))) == 1
    assert not (folder / "attributions.parquet").exists()


def test_a_row_that_cannot_be_predicted_gets_nan_attributions_and_exit_code_3(tmp_path: Path,
                                                                             tiny_bundle: Path):
    table = catalog_table(3)
    flux = table.column("flux").combine_chunks()
    values = flux.values.to_numpy().copy()
    values[:flux.type.list_size] = np.nan  # row 0: no finite flux
    width = flux.type.list_size
    table = table.set_column(1, "flux", pa.FixedSizeListArray.from_arrays(pa.array(values), width))
    cat = write_catalog(table, tmp_path / "cat.parquet", grid=GRID)
    result = CliRunner().invoke(explain_command, [str(cat), "--out", str(tmp_path / "ex"), "--model",
                                                  str(tiny_bundle), "--plots", "5", "--steps", "4"])
    assert result.exit_code == 3, result.output
    written = pq.read_table(tmp_path / "ex" / "attributions.parquet")
    teff = written.column("teff").to_pylist()
    assert np.isnan(teff[0]).all() and np.isfinite(teff[1]).all()
    assert len(list((tmp_path / "ex" / "plots").glob("*.png"))) == 2
    # why, in the file and on the terminal, as `run` says it
    error = written.column("error").to_pylist()
    assert error[0] and "good pixels" in error[0] and error[1:] == [None, None]
    assert written.column("flags")[0].as_py() & Flag.PREPROCESS_FAILED
    assert f"id {table.column('id')[0].as_py()}: {error[0]}" in result.output
    # a second explanation into the same folder would mix its plots with these: refused
    again = CliRunner().invoke(explain_command, [str(cat), "--out", str(tmp_path / "ex"), "--model",
                                                 str(tiny_bundle), "--plots", "1", "--steps", "4"])
    assert again.exit_code == 2 and "is not empty" in again.output


def test_a_batch_without_a_row_that_can_be_predicted_gets_nan_attributions(dropout_model):
    table = catalog_table(2).replace_schema_metadata({"starcast.wavelength": GRID.to_json()})
    flux = table.column("flux").combine_chunks()
    nan = pa.array(np.full(len(flux.values), np.nan, np.float32))
    table = table.set_column(1, "flux", pa.FixedSizeListArray.from_arrays(nan, flux.type.list_size))
    exp = dropout_model.explain(table)
    assert np.isnan(exp.attributions).all() and all(exp.errors)
