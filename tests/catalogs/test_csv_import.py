"""Wide-CSV import (one row per spectrum, wavelength headers) and the catalogs CLI commands."""

import numpy as np
import pytest
from click.testing import CliRunner
from starcast.catalogs.cli import import_csv as import_csv_command
from starcast.catalogs.cli import synth as synth_command
from starcast.catalogs.csv_import import csv_to_table, import_csv
from starcast.catalogs.io import read_catalog, read_grid

from starcast.errors import CatalogError


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_wide_csv_becomes_a_catalog_with_a_linear_grid(tmp_path):
    wl = [f"{4460.0 + 0.1 * i:.1f}" for i in range(6)]
    rows = [[10 + i, 20000 + i, 4.0, 100.0] + list(np.linspace(1, 0.5 + 0.1 * i, 6)) for i in range(3)]
    csv = write_csv(tmp_path / "s.csv", ["id", "teff", "logg", "vsini"] + wl, rows)
    paths = import_csv(csv, tmp_path / "out", shard_rows=2)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    table = read_catalog(tmp_path / "out")
    assert table.column("id").to_pylist() == [10, 11, 12]
    assert table.column("teff").to_pylist() == [20000.0, 20001.0, 20002.0]
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    assert np.allclose(flux, np.array(rows)[:, 4:])
    grid = read_grid(paths[0])
    assert grid.kind == "linear" and grid.n == 6 and np.allclose(grid.values(), [float(w) for w in wl])


def test_unsorted_uneven_headers_give_a_sorted_explicit_grid_and_row_ids(tmp_path):
    csv = write_csv(tmp_path / "u.csv", ["4001.5", "4000.0", "4000.5"], [[3, 1, 2], [6, 4, ""]])
    table = csv_to_table(csv, medium="air")
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    assert np.array_equal(flux[0], [1, 2, 3]) and np.isnan(flux[1, 1])  # empty cell -> NaN
    assert table.column("id").to_pylist() == [0, 1]
    grid = read_grid(import_csv(csv, tmp_path / "o", medium="air")[0])
    assert grid.kind == "explicit" and grid.medium == "air"
    assert np.array_equal(grid.values(), [4000.0, 4000.5, 4001.5])


@pytest.mark.parametrize("header,rows,match,column", [
    (["id", "name", "4000.0"], [[1, "x", 1.0]], "neither a wavelength", "name"),
    (["4000.0", "4000.0"], [[1, 2]], "duplicate column", "4000.0"),
    (["id", "4000.0", "4000.1"], [[1, 1.0, "abc"]], "'abc' is not a number", "4000.1"),
    (["id", "teff", "4000.0"], [[1, 2e4, 1.0], [2, "hot", 1.0]], "'hot' is not a number", "teff"),
    (["4000.0", "4000.00"], [[1, 2]], "same wavelength as column '4000.0'", "4000.00"),
    (["id", "teff"], [[1, 20000]], "no wavelength columns", None),
    (["id", "4000.0"], [], "no data rows", None),
])
def test_bad_csv_raises_catalog_error_naming_file_and_column(tmp_path, header, rows, match, column):
    csv = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(CatalogError, match=match) as exc:
        csv_to_table(csv)
    assert str(csv) in str(exc.value) and exc.value.column == column


def test_empty_csv_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CatalogError, match="empty file"):
        csv_to_table(empty)


def test_duplicate_ids_in_csv_are_rejected(tmp_path):
    csv = write_csv(tmp_path / "d.csv", ["id", "4000.0"], [[1, 1.0], [1, 2.0]])
    with pytest.raises(CatalogError, match="duplicate id"):
        csv_to_table(csv)


def test_import_csv_command_writes_shards(tmp_path):
    csv = write_csv(tmp_path / "c.csv", ["4000.0", "4000.2"], [[1, 2], [3, 4]])
    result = CliRunner().invoke(import_csv_command, [str(csv), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert read_catalog(tmp_path / "o").num_rows == 2


def test_synth_command_writes_a_seed_survey_and_summarises_it(tmp_path):
    result = CliRunner().invoke(synth_command, ["--n", "12", "--out", str(tmp_path), "--mode", "seed",
                                                "--shard-rows", "5", "--snr", "40:60", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 spectra in 3 shard(s)" in result.output and "split:" in result.output
    snr = read_catalog(tmp_path).column("snr").to_numpy()
    assert np.all((snr >= 40) & (snr <= 60))


def test_synth_command_rejects_a_bad_snr_range(tmp_path):
    result = CliRunner().invoke(synth_command, ["--n", "2", "--out", str(tmp_path), "--snr", "60"])
    assert result.exit_code != 0 and "A:B" in result.output


def test_synth_command_observes_a_grid_over_the_range_given(tmp_path):
    from starcast.demo import SAMPLE

    args = ["--n", "4", "--grid", str(SAMPLE), "--mode", "seed", "--wavelengths", "4400:4500"]
    result = CliRunner().invoke(synth_command, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    grid = read_grid(tmp_path / "a" / "part-00000.parquet")
    assert (grid.start, grid.step, grid.n, grid.medium) == (4400.0, 0.2, 501, "air")
    result = CliRunner().invoke(synth_command, [*args[:-1], "3900:4500", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "observing it needs 3900.0-4500.0 A" in str(result.exception)
    result = CliRunner().invoke(synth_command, ["--n", "2", "--wavelengths", "4400:4500", "--out",
                                                str(tmp_path / "c")])
    assert result.exit_code != 0 and "--wavelengths goes with --grid" in result.output


def test_synth_command_observes_a_grid_in_the_medium_given(tmp_path):
    """A CSV grid states no medium: with --grid-medium vacuum its stars are those of the same models in
    an npz that states vacuum, read as air (the default) they are 1.2 A off; beside a file that states
    another medium it is an error."""
    from starcast.catalogs import grids
    from starcast.catalogs.medium import convert

    from starcast.demo import SAMPLE
    from tests.catalogs.test_grids import write_csv_grid

    air = grids.read_grid(SAMPLE).crop(4380.0, 4520.0)
    vacuum = grids.ModelGrid(convert(air.wavelength, "air", "vacuum"), air.flux, air.params, air.names,
                             "vacuum")
    csv_grid, npz = write_csv_grid(vacuum, tmp_path / "g.csv"), grids.write_npz(vacuum, tmp_path / "g.npz")

    def observed(grid, name, *medium):
        args = ["--n", "5", "--mode", "seed", "--wavelengths", "4400:4500", "--grid", str(grid), *medium]
        result = CliRunner().invoke(synth_command, [*args, "--out", str(tmp_path / name)])
        if result.exit_code:
            return result
        return np.stack(read_catalog(tmp_path / name).column("flux").to_numpy(zero_copy_only=False))

    stated = observed(npz, "npz")
    np.testing.assert_allclose(observed(csv_grid, "vacuum", "--grid-medium", "vacuum"), stated, atol=1e-6)
    assert np.abs(observed(csv_grid, "air") - stated).max() > 0.05
    refused = observed(npz, "refused", "--grid-medium", "air")
    assert refused.exit_code and "states its wavelengths are in vacuum, not in air" in str(refused.exception)
    result = CliRunner().invoke(synth_command, ["--n", "2", "--grid-medium", "air", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--grid-medium goes with --grid" in result.output


def test_an_output_directory_holding_shards_is_refused(tmp_path):
    csv = write_csv(tmp_path / "c.csv", ["4000.0", "4000.2"], [[1, 2], [3, 4]])
    import_csv(csv, tmp_path / "o")
    with pytest.raises(CatalogError, match="already holds"):
        import_csv(csv, tmp_path / "o")


def test_bad_cells_and_ragged_lines_name_their_row(tmp_path):
    csv = write_csv(tmp_path / "c.csv", ["id", "4000.0", "4000.1"], [[1, 1.0, 2.0], [2, 1.0, "x"]])
    with pytest.raises(CatalogError) as exc:
        csv_to_table(csv)
    assert exc.value.row == 1 and exc.value.column == "4000.1"
    csv.write_text("id,4000.0,4000.1\n1,1.0,2.0\n2,1.0\n")
    with pytest.raises(CatalogError, match="line 3 has 2 fields, the header has 3") as exc:
        csv_to_table(csv)
    assert exc.value.row == 1


def test_headers_with_spaces_after_the_commas_are_read(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("id, teff, 4000.0, 4000.2\n7, 20000, 1.0, 0.5\n")
    table = csv_to_table(csv)
    assert table.column("id").to_pylist() == [7] and table.column("teff").to_pylist() == [20000.0]
    assert table.column("flux").to_pylist() == [[1.0, 0.5]]


def test_known_column_headers_are_read_in_any_case(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("ID,RV,Teff,Metals,4000.0,4000.2\n7,12.5,20000,-0.2,1.0,0.5\n")
    table = csv_to_table(csv)
    assert table.column("id").to_pylist() == [7] and table.column("rv").to_pylist() == [12.5]
    assert table.column("teff").to_pylist() == [20000.0] and table.column("metals").to_pylist() == [-0.2]
    csv.write_text("id,ID,4000.0\n7,8,1.0\n")  # the same column twice is still refused
    with pytest.raises(CatalogError, match="duplicate column header"):
        csv_to_table(csv)


def test_commands_refuse_a_shard_size_below_one(tmp_path):
    csv = write_csv(tmp_path / "c.csv", ["4000.0", "4000.2"], [[1, 2]])
    for command, args in ((import_csv_command, [str(csv)]), (synth_command, ["--n", "2"])):
        result = CliRunner().invoke(command, [*args, "--out", str(tmp_path / "o"), "--shard-rows", "0"])
        assert result.exit_code != 0 and "--shard-rows" in result.output


@pytest.mark.parametrize("index_header", ["", "Unnamed: 0"])
def test_the_pandas_index_column_is_the_id(tmp_path, index_header):
    # `DataFrame.to_csv` writes the index first with an empty header (read back: "Unnamed: 0").
    csv = write_csv(tmp_path / "p.csv", [index_header, "4000.0", "4000.5", "4001.0"],
                    [[5, 1, 2, 3], [9, 4, 5, 6]])
    assert csv_to_table(csv).column("id").to_pylist() == [5, 9]
    with_id = write_csv(tmp_path / "q.csv", [index_header, "id", "4000.0", "4000.5"], [[0, 11, 1, 2]])
    assert csv_to_table(with_id).column("id").to_pylist() == [11]  # an id column wins; the index goes


def test_medium_resolving_power_and_pixels_reach_the_catalog_metadata(tmp_path):
    from starcast.catalogs.io import read_metadata
    from starcast.catalogs.schema import META_PIXELS, META_RESOLVING_POWER

    csv = write_csv(tmp_path / "m.csv", ["id", "4000.0", "4000.5", "4001.0"], [[1, 1, 2, 3]])
    result = CliRunner().invoke(import_csv_command, [str(csv), "--out", str(tmp_path / "o"),
                                                     "--medium", "vacuum", "--resolving-power", "40000",
                                                     "--pixels", "sampled"])
    assert result.exit_code == 0, result.output
    shard = tmp_path / "o" / "part-00000.parquet"
    assert read_grid(shard).medium == "vacuum" and read_metadata(shard)[META_RESOLVING_POWER] == "40000.0"
    assert read_metadata(shard)[META_PIXELS] == "sampled"
    assert META_PIXELS not in csv_to_table(csv).schema.metadata  # not stated: the default, integrated
    with pytest.raises(CatalogError, match="pixels must be one of integrated, sampled"):
        csv_to_table(csv, pixels="points")
    with pytest.raises(CatalogError, match="'air' or 'vacuum'"):
        csv_to_table(csv, medium="water")
