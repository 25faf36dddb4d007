"""The predictor honours what the input states and what the model needs: the medium of a dict's
wavelengths, the model's resolving power, coverage short of its grid (numbers null, ranges stated)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from starcast.catalogs.medium import air_to_vacuum
from starcast.catalogs.schema import META_MEDIUM, META_WAVELENGTH, Flag, WavelengthGrid
from starcast.engine.bundle import MANIFEST_FILE, seal
from starcast.engine.predictor import load_model

from starcast.errors import StarcastError

AIR_GRID = WavelengthGrid.linear(4000.0, 0.5, 400, medium="air")  # 4000-4199.5 A, air
WAVELENGTH = np.linspace(3980.0, 4220.0, 2401)  # air
NUMBERS = ["teff", "logg", "vsini"]


def spectra(n: int) -> np.ndarray:
    lines = np.ones((n, len(WAVELENGTH)))
    for centre in (4026.19, 4101.73, 4143.76):
        lines *= 1 - 0.5 * np.exp(-0.5 * ((WAVELENGTH - centre) / 0.5) ** 2)
    return lines.astype(np.float32)


def numbers(table: pa.Table) -> np.ndarray:
    return np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in NUMBERS], axis=1)


def air_model(bundle_factory, tmp_path, **manifest):
    path = bundle_factory(tmp_path / "air-model", grid=AIR_GRID)
    if manifest:
        data = json.loads((path / MANIFEST_FILE).read_text())
        (path / MANIFEST_FILE).write_text(json.dumps({**data, **manifest}))
        seal(path)
    return load_model(path, backend="cpu")


def test_a_dict_is_in_the_models_medium_by_default_and_a_stated_medium_is_converted(bundle_factory, tmp_path):
    model = air_model(bundle_factory, tmp_path)
    flux = spectra(2)
    table = pa.table({"id": [0, 1], "flux": pa.array(list(flux), pa.list_(pa.float32()))})
    as_air = model.predict(table.replace_schema_metadata(
        {META_WAVELENGTH: WavelengthGrid.explicit(WAVELENGTH, "air").to_json()}))
    default = model.predict({"id": [0, 1], "flux": flux, "wavelength": WAVELENGTH})
    np.testing.assert_array_equal(numbers(default), numbers(as_air))
    vacuum = {"id": [0, 1], "flux": flux, "wavelength": air_to_vacuum(WAVELENGTH)}
    stated = numbers(model.predict(vacuum, medium="vacuum"))
    unstated = numbers(model.predict(vacuum))  # read as air: 1.1 A off
    assert np.abs(stated - numbers(as_air)).max() < 0.1 * np.abs(unstated - numbers(as_air)).max()


def test_a_tables_unstated_medium_is_the_one_given_and_a_stated_one_must_agree(bundle_factory, tmp_path):
    model = air_model(bundle_factory, tmp_path)
    flux = spectra(2)
    vacuum = air_to_vacuum(WAVELENGTH)
    table = pa.table({"id": [0, 1], "flux": pa.array(list(flux), pa.list_(pa.float32())),
                      "wavelength": pa.array([vacuum] * 2, pa.list_(pa.float64()))})
    stated = numbers(model.predict(table.replace_schema_metadata({META_MEDIUM: "vacuum"})))
    np.testing.assert_array_equal(numbers(model.predict(table, medium="vacuum")), stated)
    assert np.abs(numbers(model.predict(table)) - stated).max() > 0  # unstated, read as the model's air
    with pytest.raises(StarcastError, match="states its wavelengths are in vacuum"):
        model.predict(table.replace_schema_metadata({META_MEDIUM: "vacuum"}), medium="air")


def test_a_model_that_states_its_resolving_power_refuses_lower_resolution(bundle_factory, tmp_path):
    model = air_model(bundle_factory, tmp_path, input={"medium": "air", "resolving_power": 20000.0})
    flux = spectra(2)
    table = pa.table({"id": [0, 1], "flux": pa.array(list(flux), pa.list_(pa.float32())),
                      "resolving_power": [5000.0, 20000.0]}).replace_schema_metadata(
        {META_WAVELENGTH: WavelengthGrid.explicit(WAVELENGTH, "air").to_json()})
    out = model.predict(table)
    assert out.column("flags")[0].as_py() & Flag.LOW_RESOLUTION and out.column("teff")[0].as_py() is None
    assert "R = 5000" in out.column("error")[0].as_py() and "R = 20000" in out.column("error")[0].as_py()
    assert out.column("error")[1].as_py() is None and out.column("teff")[1].as_py() is not None


def test_short_coverage_gives_null_numbers_and_the_ranges(bundle_factory, tmp_path):
    model = air_model(bundle_factory, tmp_path)
    wl = np.linspace(4100.0, 4150.0, 501)
    out = model.predict({"id": [7], "flux": np.ones((1, len(wl)), np.float32), "wavelength": wl})
    assert out.column("teff")[0].as_py() is None
    assert out.column("flags")[0].as_py() & (Flag.COVERAGE | Flag.PREPROCESS_FAILED)
    assert "covers 4100.0-4150.0 A" in out.column("error")[0].as_py()
