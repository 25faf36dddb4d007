"""Training on a grid of model spectra, end to end on a 5 x 5 block of TLUSTY nodes: fresh draws every
epoch, nodes left out for validation and test, the SNR feature and the SNR-conditional calibration,
and the engine predicting the validation survey with the calibration the trainer fitted."""

from dataclasses import replace

import numpy as np
import pytest
from starcast.engine.predictor import load_model
from starcast.trainers.config import ConfigError, parse_config
from starcast.trainers.gridsource import GridData, GridSource
from starcast.trainers.metrics import coverage
from starcast.trainers.pipeline import train_from_config

from tests.trainers.conftest import tiny_grid_config


@pytest.fixture(scope="module")
def config(tlusty_grid, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny-grid")
    return tiny_grid_config(tlusty_grid, work, name="tiny-grid", val_rows=900,
                            epochs=3)


@pytest.fixture(scope="module")
def trained(config):
    return train_from_config(config, progress=False)


def test_every_epoch_is_a_new_survey_of_training_nodes_only(config, trained):
    source = GridSource(config, progress=False)
    (x1, y1), (_, y2) = source.epoch(1), source.epoch(2)
    assert x1.shape[1] == 251 + 1 and not np.array_equal(y1, y2)
    np.testing.assert_array_equal(source.epoch(1)[1], y1)  # seeded
    held = {(22000.0, 4.0), (21000.0, 3.75)}
    assert not held & {tuple(n) for n in source.train.nodes} and len(source.train.nodes) == len(
        source.full.nodes) - 2
    _, y_val, _, _ = source.split("val")
    assert set(map(tuple, y_val[:, :2])) == {(22000.0, 4.0)}


def test_manifest_states_the_input_and_the_calibration(trained):
    manifest = trained.path.joinpath("manifest.json").read_text()
    bundle = load_model(trained.path).bundle
    assert bundle.features == ["log10_snr"] and bundle.input["resolving_power"] == 20000.0
    assert bundle.calibration is not None and len(bundle.calibration.knots) == 6
    vsini = [t for t in bundle.targets if t.name == "vsini"][0]
    assert vsini.physical_min == 0.0 and 14.9 < vsini.upper_limit_below < 15.1
    assert '"val_nodes"' in manifest  # the left-out nodes are part of the provenance
    provenance = bundle.manifest["provenance"]  # every drawn row counted: kept or dropped
    assert sum(provenance["rows"].values()) + provenance["rows_dropped_by_preprocessing"] == 1500 + 900 + 300


def test_engine_reproduces_the_calibrated_validation_coverage(config, trained):
    """The engine, from the raw validation catalog, gives the numbers the trainer calibrated: its
    sigmas cover ~68% of the errors in each SNR third (the calibration was fitted on these rows)."""
    table = GridSource(config, progress=False).split_table("val")
    model = load_model(trained.path)
    out = model.predict(table, backend="cpu")
    snr = table.column("snr").to_numpy()
    for t in ("teff", "logg"):
        y, m, s = (np.asarray(c, float) for c in (table.column(t), out.column(t), out.column(f"{t}_err")))
        assert abs(coverage(y, m, s, 0.68) - model.bundle.manifest["metrics"]["val"][t]["coverage_68"]) < 0.02
        for part in np.array_split(np.argsort(snr), 3):
            assert 0.55 < coverage(y[part], m[part], s[part], 0.68) < 0.81, (t, snr[part].mean())


def test_a_metals_span_draws_metal_lines_and_trains_a_fourth_target(tlusty_grid, tmp_path):
    """With `perturbations.metals`, every survey draws metals uniformly in the span, the library holds
    a rung every 0.1 dex, and the bundle predicts `metals` within that training range."""
    config = tiny_grid_config(tlusty_grid, tmp_path, name="tiny-metals", val_rows=300, epochs=1,
                              metals=(-0.1, 0.1))
    source = GridSource(config, progress=False)
    assert list(source.full.metals) == [-0.1, 0.0, 0.1]
    _, y = source.epoch(1)
    assert y.shape[1] == 4 and y[:, 3].min() >= -0.1 and y[:, 3].max() <= 0.1 and y[:, 3].std() > 0.04
    model = load_model(train_from_config(config, progress=False).path)
    metals = [t for t in model.targets if t.name == "metals"][0]
    assert (metals.min, metals.max, metals.unit) == (-0.1, 0.1, "dex")
    out = model.predict(source.split_table("test"), backend="cpu")
    assert np.isfinite(out.column("metals").to_numpy()).all()


NODES = {"val_nodes": [[20000, 4.0]], "test_nodes": [[22000, 4.0]]}


@pytest.mark.parametrize("grid, targets, match", [
    ("grid.npz", None, r"\[data.grid\] must be a table"),
    ({"path": "g.npz", "observation": {"R": 20000}}, None, r"observation\]: unknown keys \['R'\]"),
    ({"path": "g.npz", "perturbations": {"vsin": [0, 1]}}, None, r"perturbations\]: unknown keys \['vsin'\]"),
    ({"path": "g.npz", "val_nodes": [[20000]]}, None, r"val_nodes must be \[\[teff, logg\], ...\]"),
    ({"path": "g.npz", "val_nodes": []}, None, r"val_nodes must be .* one node or more"),
    ({"path": "g.npz", **NODES, "test_nodes": [[20000, 4.0]]}, None, r"test_nodes: \[\[20000, 4.0\]\]"),
    ({"path": "g.npz", **NODES}, ("teff", "feh"), r"data.targets \['teff', 'feh'\]: a grid's stars carry"),
    ({"path": "g.npz", **NODES}, ("teff", "metals"), r"carry \['teff', 'logg', 'vsini'\] \(metals with"),
    ({"pth": "g.npz"}, None, r"needs `path`; unknown keys \['pth'\]"),
    ({"path": "g.npz", **NODES, "medium": "AIR"}, None, r"\[data.grid\] medium must be 'air' or 'vacuum'"),
], ids=["string", "observation", "perturbations", "node", "no nodes", "test in val", "unknown target",
        "metals unspanned", "path", "medium"])
def test_a_grid_table_that_is_wrong_is_an_error_naming_the_config_and_key(config, grid, targets, match):
    data = replace(config.data, grid=grid, targets=targets or config.data.targets)
    with pytest.raises(ConfigError, match="config cfg.toml: .*" + match):
        GridData.from_config(replace(config, data=data, source="cfg.toml"))


def test_a_grid_that_states_no_medium_is_read_in_the_configs(config, tmp_path):
    """[data.grid] medium gives a CSV grid's medium, which must then agree with the model's grid."""
    from starcast.catalogs.grids import read_grid

    from tests.catalogs.test_grids import write_csv_grid

    block = read_grid(config.data.grid["path"])
    path = write_csv_grid(block, tmp_path / "block.csv")
    for medium, match in (("vacuum", r"\[data.grid\]'s spectra in vacuum .* \(\[data.grid\] medium gives"),
                          ("", r"in air and \[data.grid.observation\] in vacuum")):
        grid = {**config.data.grid, "path": str(path), "medium": medium,
                "observation": {**config.data.grid["observation"], "medium": "air" if medium else "vacuum"}}
        with pytest.raises(ConfigError, match=match):
            GridSource(replace(config, data=replace(config.data, grid=grid)), progress=False)


@pytest.mark.parametrize("change, match", [
    (lambda raw: raw.update(trainig={"epochs": 3}), r"unknown top-level keys or sections \['trainig'\]"),
    (lambda raw: raw["training"].update(epochs="3"), r"training.epochs must be an integer, got '3'"),
    (lambda raw: raw["architecture"].update(hidden="32"), r"architecture.hidden must be a list"),
    (lambda raw: raw["training"].update(lr=True), r"training.lr must be a number, got True"),
], ids=["section typo", "string epochs", "string hidden", "bool lr"])
def test_a_config_typo_or_wrong_type_is_an_error_naming_it(config, change, match):
    raw = config.to_dict()
    change(raw)
    with pytest.raises(ConfigError, match="config cfg.toml: " + match):
        parse_config(raw, source="cfg.toml")
