"""Catalog schema, validation errors, and Parquet shard I/O (round trips, streaming, bad files)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.catalogs.io import (
    iter_batches,
    list_inputs,
    read_catalog,
    read_grid,
    read_metadata,
    write_catalog,
)
from starcast.catalogs.schema import META_WAVELENGTH, WavelengthGrid, catalog_schema, results_schema, validate

from starcast.errors import CatalogError


def table(n=5, d=8, ids=None, **extra):
    rng = np.random.default_rng(0)
    flux = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * d, dtype=np.float32)), d)
    cols = {"id": pa.array(np.arange(n) if ids is None else ids), "flux": flux,
            "teff": pa.array(rng.uniform(15000, 30000, n))}
    cols.update(extra)
    return pa.table(cols)


def test_write_then_read_round_trips_data_grid_and_metadata(tmp_path):
    t = table(n=50)
    grid = WavelengthGrid.linear(4000.0, 0.2, 8)
    path = write_catalog(t, tmp_path / "c.parquet", grid=grid, metadata={"origin": "test"}, row_group_rows=16)
    back = read_catalog(path)
    assert back.equals(t)  # data and types; metadata is compared below
    assert read_grid(path) == grid
    assert read_metadata(path)["origin"] == "test"
    assert pq.ParquetFile(path).num_row_groups == 4


def test_catalog_schema_builds_what_validate_accepts():
    schema = catalog_schema(8, split=True, grid=WavelengthGrid.linear(4000, 0.2, 8))
    assert schema.field("flux").type.list_size == 8
    assert schema.field("teff").type == pa.float64() and schema.field("snr").type == pa.float32()
    empty = schema.empty_table()
    validate(empty)


def test_results_schema_has_the_output_columns():
    schema = results_schema(["teff", "logg"])
    assert schema.names == ["id", "teff", "teff_err", "teff_err_aleatoric", "teff_err_epistemic", "logg",
                            "logg_err", "logg_err_aleatoric", "logg_err_epistemic", "flags", "error"]
    assert schema.field("flags").type == pa.int32() and schema.field("error").type == pa.string()
    assert all(schema.field(n).type == pa.float64() for n in schema.names[1:-2])


def test_missing_id_column_is_rejected():
    with pytest.raises(CatalogError, match="required column missing") as exc:
        validate(table().drop_columns(["id"]), file="x.parquet")
    assert exc.value.column == "id" and exc.value.file == "x.parquet"


def test_null_id_is_rejected_with_its_row():
    with pytest.raises(CatalogError, match="missing id") as exc:
        validate(table(ids=pa.array([1, 2, None, 4, 5])))
    assert exc.value.row == 2


def test_duplicate_ids_are_rejected_with_the_row():
    with pytest.raises(CatalogError, match="duplicate id 'b'") as exc:
        validate(table(ids=pa.array(["a", "b", "c", "b", "e"])))
    assert exc.value.row == 3 and exc.value.column == "id"


def test_ragged_flux_without_wavelength_or_grid_is_rejected():
    flux = pa.array([[1.0, 2.0], [1.0, 2.0], [1.0]], pa.list_(pa.float32()))
    ragged = pa.table({"id": [1, 2, 3], "flux": flux})
    with pytest.raises(CatalogError, match="ragged flux") as exc:
        validate(ragged, file="r.parquet")
    assert exc.value.row == 2 and exc.value.column == "flux" and "r.parquet" in str(exc.value)
    wl = pa.array([[4000.0, 4001.0], [4000.0, 4001.0], [4000.0]], pa.list_(pa.float64()))
    validate(ragged.append_column("wavelength", wl))  # a per-row grid makes ragged rows fine


def test_flux_length_must_match_the_file_grid():
    t = table(d=8).replace_schema_metadata({META_WAVELENGTH: WavelengthGrid.linear(4000, 0.2, 9).to_json()})
    with pytest.raises(CatalogError, match="wavelength grid"):
        validate(t)


@pytest.mark.parametrize("column,values,expected", [
    ("flux", pa.array([["a"], ["b"]]), "list of float32"),
    ("teff", pa.array(["hot", "cold"]), "number"),
    ("id", pa.array([1.5, 2.5]), "int64 or string"),
    ("mask", pa.array([[1.0], [2.0]]), "list of bool"),
])
def test_wrong_types_are_rejected_naming_the_column(column, values, expected):
    t = table(n=2, d=1)
    t = t.set_column(t.column_names.index(column), column, values) if column in t.column_names \
        else t.append_column(column, values)
    with pytest.raises(CatalogError, match=expected) as exc:
        validate(t)
    assert exc.value.column == column


def test_nan_only_and_null_spectra_are_representable(tmp_path):
    flux = pa.array([[np.nan] * 4, None, [1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32()))
    t = pa.table({"id": [1, 2, 3], "flux": flux})
    validate(t)
    back = read_catalog(write_catalog(t, tmp_path / "nan.parquet"))
    assert np.all(np.isnan(back.column("flux")[0].values.to_numpy()))
    assert back.column("flux")[1].as_py() is None


def test_corrupt_and_empty_files_raise_catalog_errors_naming_the_file(tmp_path):
    good = write_catalog(table(), tmp_path / "good.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    for bad, reason in ((corrupt, "Parquet"), (empty, "empty file")):
        for call in (read_catalog, read_metadata, lambda p: list(iter_batches(p))):
            with pytest.raises(CatalogError, match=reason) as exc:
                call(bad)
            assert str(bad) in str(exc.value)


def test_a_csv_or_fits_file_given_as_a_catalog_points_at_its_importer(tmp_path):
    for name, tool in (("spectra.csv", "import-csv"), ("star.FITS", "import-fits"),
                       ("star.fits.gz", "import-fits"), ("other.dat", None)):
        path = tmp_path / name
        path.write_text("id,4000.0\n1,0.9\n")
        with pytest.raises(CatalogError, match="not a readable Parquet file") as exc:
            read_catalog(path)
        assert (f"`starcast {tool}`" in str(exc.value)) if tool else "starcast import" not in str(exc.value)


def test_list_inputs_takes_a_file_a_directory_or_a_glob(tmp_path):
    paths = [write_catalog(table(ids=np.arange(5) + 5 * i), tmp_path / f"part-{i:05d}.parquet")
             for i in (2, 0, 1)]
    assert list_inputs(tmp_path) == sorted(paths)
    assert list_inputs(paths[0]) == [paths[0]]
    assert list_inputs(str(tmp_path / "part-0000[01].parquet")) == sorted(paths)[:2]
    deeper = write_catalog(table(ids=np.arange(5) + 100), tmp_path / "sub" / "more" / "part-9.parquet")
    assert list_inputs(str(tmp_path / "**" / "*.parquet")) == sorted([*paths, deeper])
    with pytest.raises(CatalogError, match="no such file"):
        list_inputs(tmp_path / "nothing-*.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CatalogError, match="no \\*.parquet"):
        list_inputs(tmp_path / "empty_dir")


def test_shards_with_different_grids_are_refused(tmp_path):
    write_catalog(table(), tmp_path / "a.parquet", grid=WavelengthGrid.linear(4000, 0.2, 8))
    write_catalog(table(ids=np.arange(5, 10)), tmp_path / "b.parquet",
                  grid=WavelengthGrid.linear(4000, 0.1, 8))
    with pytest.raises(CatalogError, match="different wavelength grids"):
        read_catalog(tmp_path)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), batch_rows=st.integers(1, 128), row_group_rows=st.integers(1, 64))
def test_iter_batches_streams_every_row_once_in_bounded_batches(tmp_path_factory, n, batch_rows,
                                                                row_group_rows):
    path = write_catalog(table(n=n), tmp_path_factory.mktemp("it") / "c.parquet",
                         row_group_rows=row_group_rows)
    batches = list(iter_batches(path, batch_rows=batch_rows, columns=["id"]))
    assert all(b.num_rows <= batch_rows for b in batches)
    assert np.array_equal(np.concatenate([b.column(0).to_numpy() for b in batches]), np.arange(n))


@settings(max_examples=50, deadline=None)
@given(st.one_of(
    st.builds(WavelengthGrid.linear, st.floats(1000, 10000), st.floats(1e-3, 10), st.integers(1, 10**5),
              st.sampled_from(["air", "vacuum"])),
    st.builds(lambda v: WavelengthGrid.explicit(np.cumsum(v) + 3000.0),
              st.lists(st.floats(0.01, 5.0), min_size=1, max_size=50)),
))
def test_wavelength_grid_json_round_trips(grid):
    back = WavelengthGrid.from_json(grid.to_json())
    assert back == grid and np.array_equal(back.values(), grid.values())


@pytest.mark.parametrize("where", [0.125, 0.25, 0.5, 0.75, 0.875])
def test_a_corrupted_data_page_is_an_error_not_silently_wrong_flux(tmp_path, where):
    path = write_catalog(table(n=200, d=64), tmp_path / "c.parquet")
    data = bytearray(path.read_bytes())
    offset = int(len(data) * where)
    data[offset:offset + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CatalogError, match="c.parquet"):
        read_catalog(path)
    with pytest.raises(CatalogError, match="c.parquet"):
        list(iter_batches(path))


@pytest.mark.parametrize("meta", ["garbage", '{"kind": "linear"}', '{"kind": "weird"}', "[1, 2]",
                                  '{"kind": "explicit", "values": []}',
                                  '{"kind": "linear", "start": 4000, "step": 0, "n": 5}'])
def test_malformed_grid_metadata_is_a_catalog_error_everywhere(tmp_path, meta):
    t = table().replace_schema_metadata({META_WAVELENGTH: meta})
    path = tmp_path / "m.parquet"
    pq.write_table(t, path)
    for call in (read_catalog, read_grid, lambda p: validate(t, file=str(p)),
                 lambda p: write_catalog(t, tmp_path / "w.parquet")):
        with pytest.raises(CatalogError, match="starcast.wavelength") as exc:
            call(path)
        assert exc.value.file is not None


def test_null_wavelength_of_a_present_spectrum_names_the_row():
    wl = pa.array([[4000.0, 4001.0], None], pa.list_(pa.float64()))
    t = pa.table({"id": [1, 2], "flux": pa.array([[1.0, 2.0], [1.0, 2.0]], pa.list_(pa.float32())),
                  "wavelength": wl})
    with pytest.raises(CatalogError, match="wavelength is null") as exc:
        validate(t)
    assert exc.value.row == 1 and exc.value.column == "wavelength"


def test_an_id_column_with_no_values_at_all_is_a_missing_id():
    with pytest.raises(CatalogError, match="missing id") as exc:
        validate(table(n=2, ids=pa.nulls(2)))
    assert exc.value.row == 0


@pytest.mark.parametrize("name, values", [
    ("flux_err", pa.array([[0.1, 0.1], [0.1]], pa.list_(pa.float32()))),
    ("ivar", pa.array([[1.0, 1.0], [1.0, 1.0, 1.0]], pa.list_(pa.float32()))),
    ("mask", pa.array([[False, False], [True]], pa.list_(pa.bool_()))),
])
def test_per_pixel_columns_must_match_the_flux_length(name, values):
    t = pa.table({"id": [1, 2], "flux": pa.array([[1.0, 2.0], [1.0, 2.0]], pa.list_(pa.float32()))})
    with pytest.raises(CatalogError, match=f"flux has 2 pixels but {name} has") as exc:
        validate(t.append_column(name, values), file="p.parquet")
    assert exc.value.row == 1 and exc.value.column == name
    validate(t.append_column(name, pa.array([values[0].as_py(), None], values.type)))  # a null row is fine
