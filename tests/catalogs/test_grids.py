"""Reading grids of model spectra: every format gives the same models as the npz they were written from."""

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.catalogs.grids import ModelGrid, read_grid, write_npz
from starcast.catalogs.io import write_catalog
from starcast.catalogs.schema import WavelengthGrid, spectrum_array

from starcast.errors import CatalogError
from tests.conftest import TLUSTY_GRID


@pytest.fixture(scope="module")
def small(tlusty_grid):
    """Four models, 4470-4472 A (201 pixels)."""
    return tlusty_grid.select(np.arange(0, 40, 10)).crop(4470.0, 4472.0)


def same(a: ModelGrid, b: ModelGrid) -> None:
    np.testing.assert_allclose(a.wavelength, b.wavelength, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.flux, b.flux, rtol=0, atol=1e-6)
    for p in ("teff", "logg"):
        np.testing.assert_array_equal(a.params[p], b.params[p])


def test_npz_keeps_quality_models_only(tlusty_grid):
    everything = read_grid(TLUSTY_GRID, quality_only=False)
    assert len(everything.flux) == 147 and len(tlusty_grid.flux) == 136
    assert tlusty_grid.medium == "air" and tlusty_grid.wavelength[0] == 3990.0


def write_csv_grid(grid: ModelGrid, path):
    """`grid` as a wide CSV (header names in any case, blank lines at the end as editors leave them)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Model", "Teff", "logg", *[repr(float(x)) for x in grid.wavelength]])
        for i in range(len(grid.flux)):
            w.writerow([grid.names[i], grid.params["teff"][i], grid.params["logg"][i],
                        *[repr(float(v)) for v in grid.flux[i]]])
        fh.write("\n\n")
    return path


def test_wide_csv(small, tmp_path):
    same(read_grid(write_csv_grid(small, tmp_path / "grid.csv")), small)


def test_a_grid_that_states_no_medium_is_in_the_one_given_and_one_that_states_another_is_an_error(
        small, tmp_path):
    """A CSV or text spectra state no medium (air unless given); an npz or Parquet grid does, and a
    medium given beside it that differs would put its wavelengths 1.2 A off."""
    csv_path = write_csv_grid(small, tmp_path / "grid.csv")
    _text_grid(tmp_path / "text", small)
    for path in (csv_path, tmp_path / "text"):
        assert read_grid(path).medium == "air" and read_grid(path, medium="vacuum").medium == "vacuum"
    plain = tmp_path / "plain.npz"  # a bare `wavelength` array states no medium
    np.savez(plain, wavelength=small.wavelength, flux=small.flux, **small.params)
    assert read_grid(plain).medium == "air" and read_grid(plain, medium="vacuum").medium == "vacuum"
    npz = write_npz(small, tmp_path / "grid.npz")
    table = pa.table({"id": pa.array(np.arange(len(small.flux))),
                      "flux": spectrum_array(small.flux, len(small.wavelength)), **small.params})
    parquet = write_catalog(table, tmp_path / "grid.parquet",
                            grid=WavelengthGrid.explicit(small.wavelength, "vacuum"))
    assert read_grid(npz, medium="air").medium == "air" and read_grid(parquet).medium == "vacuum"
    for path, stated, given in ((npz, "air", "vacuum"), (parquet, "vacuum", "air")):
        with pytest.raises(CatalogError, match=f"{path.name}: the grid's file states its wavelengths are in "
                                               f"{stated}, not in {given} as given"):
            read_grid(path, medium=given)
    with pytest.raises(CatalogError, match="grid.csv: a grid's medium must be 'air' or 'vacuum', got 'AIR'"):
        read_grid(csv_path, medium="AIR")


def test_parquet(small, tmp_path):
    d = len(small.wavelength)
    table = pa.table({"id": pa.array(np.arange(len(small.flux)), pa.int64()),
                      "flux": spectrum_array(small.flux, d), "teff": small.params["teff"],
                      "logg": small.params["logg"]})
    grid = WavelengthGrid.explicit(small.wavelength, "air")
    path = write_catalog(table, tmp_path / "grid.parquet", grid=grid)
    grid = read_grid(path)
    same(grid, small)
    assert grid.medium == "air"


@pytest.mark.parametrize("row, flux, match", [
    (1, lambda f: f[:-3], "row 1, column 'flux': flux has 198 values, the file's wavelength grid 201"),
    (2, lambda f: None, "row 2, column 'flux': flux has no values")])
def test_a_parquet_grid_row_off_its_wavelength_grid_is_an_error_naming_it(small, tmp_path, row, flux, match):
    """Flattened and cut into rows, a row of another length shifted every row after it (one 3 pixels
    short beside one 3 long read as a grid, unchanged in shape). Written as it is (the catalog writer
    refuses such rows)."""
    rows = [list(map(float, f)) for f in small.flux]
    rows[row] = flux(rows[row])
    grid = WavelengthGrid.explicit(small.wavelength, "air")
    table = pa.table({"id": pa.array(np.arange(len(rows))), "flux": pa.array(rows, pa.list_(pa.float32())),
                      "teff": small.params["teff"], "logg": small.params["logg"]},
                     metadata={"starcast.wavelength": grid.to_json()})
    pq.write_table(table, tmp_path / "g.parquet")
    with pytest.raises(CatalogError, match=match):
        read_grid(tmp_path / "g.parquet")


def test_a_grid_without_models_is_an_error_naming_it(tmp_path):
    path = tmp_path / "none.npz"
    np.savez(path, wavelength_air=np.arange(4000.0, 4010.0), flux=np.ones((1, 10)), teff=[20000.0],
             logg=[4.0], quality_ok=[False])
    with pytest.raises(CatalogError, match="none.npz: the grid holds no models"):
        read_grid(path)


def test_text_spectra_named_like_tlusty(small, tmp_path):
    for i in range(len(small.flux)):  # suffixes in any case, as some systems write them
        suffix = (".7", ".TXT", ".Dat", ".spec")[i % 4]
        name = f"BG{int(small.params['teff'][i])}g{int(round(small.params['logg'][i] * 100)):03d}v2{suffix}"
        np.savetxt(tmp_path / name, np.stack([small.wavelength, small.flux[i]], axis=1))
    grid = read_grid(tmp_path)
    by_node = lambda g: g.select(np.lexsort((g.params["logg"], g.params["teff"])))  # noqa: E731
    same(by_node(grid), by_node(small))


def test_text_spectra_without_parameters_name_the_file(tmp_path):
    np.savetxt(tmp_path / "star.txt", np.array([[4000.0, 1.0], [4001.0, 0.9]]))
    with pytest.raises(CatalogError, match="star.txt.*params.csv"):
        read_grid(tmp_path)


def _text_grid(folder, small) -> list:
    """`small` written as TLUSTY-named text spectra into `folder`; their paths."""
    folder.mkdir()
    paths = []
    for i in range(len(small.flux)):
        teff, logg = int(small.params["teff"][i]), round(small.params["logg"][i] * 100)
        paths.append(folder / f"BG{teff}g{logg:03d}.txt")
        np.savetxt(paths[-1], np.stack([small.wavelength, small.flux[i]], axis=1))
    return paths


def _rewrite(path, wavelength, flux):
    np.savetxt(path, np.stack([wavelength, flux], axis=1))


@pytest.mark.parametrize("change, match", [
    (lambda p, g: p[0].with_name(p[0].stem + "v10.txt").write_bytes(p[0].read_bytes()),
     "shares its node .* one model per node"),
    (lambda p, g: _rewrite(p[2], g.wavelength, 1e8 * g.flux[2]),
     "median flux of .* normalised to the continuum"),
    (lambda p, g: _rewrite(p[1], g.wavelength[::-1], g.flux[1]),
     "BG.*: needs two or more rows of strictly increasing"),
    (lambda p, g: _rewrite(p[3], g.wavelength[:-20], g.flux[3][:-20]),
     "BG.*: covers .* the grid's first spectrum"),
    (lambda p, g: p[1].rename(p[1].with_name("TL120000g700.txt")),
     "TL120000g700.txt: cannot read teff/logg"),
], ids=["duplicate node", "not normalised", "decreasing", "shorter", "unanchored name"])
def test_a_text_grid_not_one_model_per_node_on_one_range_names_the_file(small, tmp_path, change, match):
    paths = _text_grid(tmp_path / "g", small)
    change(paths, small)
    with pytest.raises(CatalogError, match=match):
        read_grid(tmp_path / "g")


def test_a_grid_file_that_is_not_a_grid_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, wavelength_air=np.arange(3.0), flux=np.ones(3), teff=np.ones(1), logg=np.ones(1))
    with pytest.raises(CatalogError, match=f"file {path}: "):
        read_grid(path)


def test_every_diagnostic_line_is_an_absorption_minimum_of_the_tlusty_spectra(tlusty_grid):
    """Each listed line centre lies within 0.1 A (a blend: 0.3 A) of the deepest point, within
    +-0.5 A, of the model where that line is deepest, at least 10% below the continuum: the list names
    lines these spectra have, where they have them."""
    from starcast.catalogs.lines import DIAGNOSTIC_LINES

    wl = tlusty_grid.wavelength
    for line in DIAGNOSTIC_LINES:
        near = np.abs(wl - line.wavelength) < 0.5
        flux = tlusty_grid.flux[:, near]
        model = np.argmin(flux.min(axis=1))
        deepest = wl[near][np.argmin(flux[model])]
        assert 1.0 - flux[model].min() > 0.1, line
        assert abs(deepest - line.wavelength) < (0.3 if "blend" in line.source else 0.1), (line, deepest)


def test_a_params_csv_as_spreadsheets_write_it_is_read_and_its_errors_name_the_row(small, tmp_path):
    paths = _text_grid(tmp_path / "g", small)
    rows = [f" {p.name} , {small.params['teff'][i]}, {small.params['logg'][i]}" for i, p in enumerate(paths)]
    (tmp_path / "g" / "params.csv").write_text("\ufefffile, teff, logg\n" + "\n".join(rows) + "\n\n",
                                               encoding="utf-8")
    by_node = lambda g: g.select(np.lexsort((g.params["logg"], g.params["teff"])))  # noqa: E731
    same(by_node(read_grid(tmp_path / "g")), by_node(small))
    for bad in (rows[0] + "\n" + rows[0], f"{paths[0].name}, x, 3.5"):
        (tmp_path / "g" / "params.csv").write_text("file,teff,logg\n" + bad + "\n")
        with pytest.raises(CatalogError, match=r"params.csv, row \d: needs a file name not listed before"):
            read_grid(tmp_path / "g")
    # a row naming a file the directory does not hold (a model it would silently lack)
    (tmp_path / "g" / "params.csv").write_text("file,teff,logg\n" + "\n".join(rows) + "\nBG99.txt,20000,4\n")
    with pytest.raises(CatalogError, match="params.csv lists BG99.txt, which the directory does not hold"):
        read_grid(tmp_path / "g")
