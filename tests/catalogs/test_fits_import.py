"""FITS import: 1-D images with linear / log wavelength WCS, binary tables, media, and the errors."""

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from click.testing import CliRunner
from starcast.catalogs.cli import import_fits as import_fits_command
from starcast.catalogs.fits_import import fits_to_table
from starcast.catalogs.io import read_catalog
from starcast.catalogs.medium import air_to_vacuum
from starcast.catalogs.schema import META_MEDIUM, META_PIXELS, META_RESOLVING_POWER

from starcast.errors import EXIT_PARTIAL, CatalogError

N = 50


def image(path, header, flux=None, extra=()):
    hdu = fits.PrimaryHDU(np.linspace(1.0, 2.0, N) if flux is None else flux)
    hdu.header.update(header)
    fits.HDUList([hdu, *extra]).writeto(path)
    return path


def wavelengths(table, row=0):
    return np.asarray(table.column("wavelength")[row].as_py())


def test_linear_and_fits_log_wcs_match_astropy_wcs(tmp_path):
    linear = {"CRVAL1": 400.0, "CDELT1": 0.05, "CRPIX1": 3.0, "CTYPE1": "WAVE", "CUNIT1": "nm"}
    log = {"CRVAL1": 4000.0, "CDELT1": 0.2, "CRPIX1": 1.0, "CTYPE1": "WAVE-LOG", "CUNIT1": "Angstrom"}
    for name, header in (("lin", linear), ("log", log)):
        path = image(tmp_path / f"{name}.fits", header)
        expected = WCS(fits.getheader(path)).all_pix2world(np.arange(N), 0)[0] * 1e10  # SI metres -> A
        np.testing.assert_allclose(wavelengths(fits_to_table([path], medium="air")), expected, rtol=1e-12)


def test_a_spectrums_id_is_its_file_name_without_the_fits_and_compression_suffixes(tmp_path):
    header = {"CRVAL1": 4000.0, "CDELT1": 0.2, "CRPIX1": 1.0, "CTYPE1": "WAVE", "CUNIT1": "Angstrom"}
    paths = [image(tmp_path / name, header) for name in ("hd36591.fits", "hd886.fits.gz", "tau_sco.fit")]
    assert fits_to_table(paths, medium="air").column("id").to_pylist() == ["hd36591", "hd886", "tau_sco"]


def test_iraf_log10_wcs_with_dc_flag(tmp_path):
    path = image(tmp_path / "iraf.fits", {"CRVAL1": 3.6, "CD1_1": 1e-5, "CRPIX1": 1.0, "DC-FLAG": 1})
    np.testing.assert_allclose(wavelengths(fits_to_table([path])), 10 ** (3.6 + 1e-5 * np.arange(N)),
                               rtol=1e-12)


def test_cd1_1_wins_over_cdelt1(tmp_path):
    """IRAF and others write both; the FITS WCS standard ignores CDELTi beside a CD matrix."""
    path = image(tmp_path / "cd.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0, "CD1_1": 0.2, "CRPIX1": 1.0})
    np.testing.assert_allclose(wavelengths(fits_to_table([path])), 4000.0 + 0.2 * np.arange(N), rtol=1e-12)


@pytest.mark.parametrize("unit, scale", [("Angstroms", 1.0), ("ANGSTROM", 1.0), ("angstrom", 1.0), ("A", 1.0),
                                         ("AA", 1.0), ("Angstrom", 1.0), ("NM", 10.0), ("Microns", 1e4),
                                         ("0.1 nm", 1.0), ("m", 1e10)])
def test_the_common_spellings_of_wavelength_units(tmp_path, unit, scale):
    path = image(tmp_path / "u.fits", {"CRVAL1": 0.4, "CDELT1": 0.001, "CUNIT1": unit})
    np.testing.assert_allclose(wavelengths(fits_to_table([path])), (0.4 + 0.001 * np.arange(N)) * scale,
                               rtol=1e-12)


@pytest.mark.parametrize("unit", ["furlong", "s"])
def test_a_wavelength_unit_that_is_no_known_length_is_an_error_naming_it(tmp_path, unit):
    path = image(tmp_path / "u.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0, "CUNIT1": unit})
    with pytest.raises(CatalogError, match=f"HDU 0: wavelength unit '{unit}' is not a length unit") as info:
        fits_to_table([path])
    assert "def_unit" not in str(info.value)


def test_the_header_medium_wins_and_mixed_media_are_converted_to_vacuum(tmp_path):
    wcs = {"CRVAL1": 4000.0, "CDELT1": 1.0}
    air = image(tmp_path / "a.fits", {**wcs, "AIRORVAC": "air"})
    vac = image(tmp_path / "v.fits", {**wcs, "VACUUM": True})
    assert fits_to_table([air], medium="vacuum").schema.metadata[META_MEDIUM.encode()] == b"air"
    both = fits_to_table([air, vac])
    assert both.schema.metadata[META_MEDIUM.encode()] == b"vacuum"
    np.testing.assert_allclose(wavelengths(both, 0), air_to_vacuum(4000.0 + np.arange(N)), rtol=1e-12)
    np.testing.assert_allclose(wavelengths(both, 1), 4000.0 + np.arange(N), rtol=1e-12)


def test_an_error_extension_gives_flux_err_and_an_ivar_extension_ivar(tmp_path):
    wcs = {"CRVAL1": 4000.0, "CDELT1": 1.0}
    err = image(tmp_path / "e.fits", wcs, extra=[fits.ImageHDU(np.full(N, 0.5), name="ERR")])
    ivar = image(tmp_path / "i.fits", wcs, extra=[fits.ImageHDU(np.full(N, 4.0), name="IVAR")])
    table = fits_to_table([err, ivar])
    assert table.column("flux_err").to_pylist() == [[0.5] * N, None]
    assert table.column("ivar").to_pylist() == [None, [4.0] * N]


def test_a_1_x_n_image_and_its_errors_read_as_a_1_d_spectrum(tmp_path):
    """NAXIS2 = 1 (a 1 x N image, as some pipelines write one spectrum) is the 1-D spectrum."""
    wcs = {"CRVAL1": 4000.0, "CDELT1": 1.0}
    flat = image(tmp_path / "flat.fits", wcs, extra=[fits.ImageHDU(np.full(N, 0.5), name="ERR")])
    tall = image(tmp_path / "tall.fits", wcs, np.linspace(1.0, 2.0, N)[None],
                 extra=[fits.ImageHDU(np.full((1, N), 0.5), name="ERR")])
    one, two = (fits_to_table([path]) for path in (flat, tall))
    for column in ("wavelength", "flux", "flux_err"):
        assert one.column(column).to_pylist() == two.column(column).to_pylist(), column


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e15])
def test_errors_survive_any_flux_scale(tmp_path, scale):
    """Fluxes in erg/s/cm^2/Hz have errors near 1e-28: as 1/err^2 in float32 they would be inf (bad)."""
    flux, err = np.linspace(1.0, 2.0, N) * scale, np.full(N, 0.01 * scale)
    path = image(tmp_path / "e.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0}, flux=flux,
                 extra=[fits.ImageHDU(err, name="ERR")])
    table = fits_to_table([path])
    np.testing.assert_allclose(table.column("flux_err")[0].as_py(), err, rtol=1e-6)
    np.testing.assert_allclose(table.column("flux")[0].as_py(), flux, rtol=1e-6)


def sci(value, **header):
    hdu = fits.ImageHDU(np.full(N, value), name="SCI")
    hdu.header.update({"CRVAL1": 4000.0, "CDELT1": 1.0, **header})
    return hdu


def err(value, **header):
    hdu = fits.ImageHDU(np.full(N, value), name="ERR")
    hdu.header.update(header)
    return hdu


def test_each_spectrum_of_a_file_gets_the_errors_of_its_extver_or_right_after_it(tmp_path):
    """Two SCI/ERR pairs: by EXTVER, or without EXTVERs by position; never the other spectrum's errors."""
    numbered = tmp_path / "numbered.fits"
    fits.HDUList([fits.PrimaryHDU(), sci(1.0, EXTVER=1), err(0.1, EXTVER=1), sci(2.0, EXTVER=2),
                  err(0.2, EXTVER=2)]).writeto(numbered)
    interleaved = tmp_path / "interleaved.fits"
    fits.HDUList([fits.PrimaryHDU(), sci(1.0), err(0.1), sci(2.0), err(0.2)]).writeto(interleaved)
    for path in (numbered, interleaved):
        for hdu, value in ((None, 0.1), (3, 0.2)):
            np.testing.assert_allclose(fits_to_table([path], hdu=hdu).column("flux_err")[0].as_py(), value)


def test_errors_that_cannot_be_paired_with_their_spectrum_are_an_error(tmp_path):
    path = tmp_path / "grouped.fits"
    fits.HDUList([fits.PrimaryHDU(), sci(1.0), sci(2.0), err(0.1), err(0.2)]).writeto(path)
    with pytest.raises(CatalogError, match=r"cannot tell whose errors HDU 3, 4 hold: spectra HDU 1, 2"):
        fits_to_table([path])


def test_an_ivar_beyond_float32_is_an_error_naming_the_hdu(tmp_path):
    """Not stored as inf, which would make every pixel bad."""
    path = image(tmp_path / "i.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0},
                 extra=[fits.ImageHDU(np.full(N, 1e40), name="IVAR")])
    with pytest.raises(CatalogError, match=r"HDU 1: IVAR holds 1e\+40, beyond float32"):
        fits_to_table([path])


def test_an_error_extension_of_another_length_is_an_error_naming_the_hdu(tmp_path):
    """Not dropped in silence (the noise would then be estimated from the flux)."""
    err = fits.ImageHDU(np.full(N - 3, 0.5), name="ERR")
    path = image(tmp_path / "e.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0}, extra=[err])
    with pytest.raises(CatalogError, match=r"HDU 1: ERR has shape \(47,\), the flux \(HDU 0\) \(50,\)"):
        fits_to_table([path])


def test_binary_tables_one_spectrum_per_row_or_per_table(tmp_path):
    wl = np.linspace(4000.0, 4100.0, N)
    rows = fits.BinTableHDU.from_columns([
        fits.Column("WAVE", "50D", array=np.stack([wl, wl + 1]), unit="Angstrom"),
        fits.Column("Flux", "50E", array=np.ones((2, N))),
        fits.Column("ERROR", "50E", array=np.full((2, N), 0.1))])
    fits.HDUList([fits.PrimaryHDU(), rows]).writeto(tmp_path / "rows.fits")
    sdss = fits.BinTableHDU.from_columns([  # SDSS spec-*.fits layout: loglam (vacuum), flux, ivar
        fits.Column("loglam", "E", array=np.log10(wl)), fits.Column("flux", "E", array=np.ones(N)),
        fits.Column("ivar", "E", array=np.full(N, 9.0)), fits.Column("and_mask", "J", array=np.zeros(N))])
    fits.HDUList([fits.PrimaryHDU(), sdss]).writeto(tmp_path / "spec.fits")
    table = fits_to_table([tmp_path / "rows.fits", tmp_path / "spec.fits"], medium="vacuum")
    assert table.column("id").to_pylist() == ["rows:0", "rows:1", "spec"]
    np.testing.assert_allclose(wavelengths(table, 1), wl + 1)
    np.testing.assert_allclose(table.column("flux_err")[0].as_py(), np.full(N, 0.1), rtol=1e-7)
    assert table.column("ivar").to_pylist() == [None, None, [9.0] * N]
    np.testing.assert_allclose(wavelengths(table, 2), wl, rtol=1e-6)


def test_an_eso_phase3_qual_column_is_the_mask(tmp_path):
    """ESO Phase 3 tables: WAVE, FLUX, ERR and QUAL (0 = good); a mask column, if also there, adds to it."""
    qual, mask = np.zeros(N, int), np.zeros(N, int)
    qual[3], mask[7] = 16, 1
    for name, columns in (("qual", ["QUAL"]), ("both", ["QUAL", "MASK"])):
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([
            fits.Column("WAVE", "50D", unit="nm", array=[400.0 + 0.1 * np.arange(N)]),
            fits.Column("FLUX", "50E", array=[np.ones(N)]),
            fits.Column("ERR", "50E", array=[np.full(N, 0.1)]),
            *(fits.Column(c, "50J", array=[qual if c == "QUAL" else mask]) for c in columns)])
        ]).writeto(tmp_path / f"{name}.fits")
    table = fits_to_table([tmp_path / "qual.fits", tmp_path / "both.fits"])
    assert [np.flatnonzero(row).tolist() for row in table.column("mask").to_pylist()] == [[3], [3, 7]]


def test_red_to_blue_spectra_are_reversed(tmp_path):
    path = image(tmp_path / "r.fits", {"CRVAL1": 4100.0, "CDELT1": -1.0}, flux=np.arange(N, dtype=float))
    table = fits_to_table([path])
    assert np.all(np.diff(wavelengths(table)) > 0) and table.column("flux")[0].as_py()[0] == N - 1


@pytest.mark.parametrize("make, match", [
    (lambda p: fits.PrimaryHDU(np.ones((4, 4))).writeto(p), "no spectrum"),
    (lambda p: fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("wave", "E", array=np.ones(3))])]).writeto(p), "no spectrum"),
    (lambda p: fits.PrimaryHDU(np.ones(N)).writeto(p), "without a wavelength WCS"),
    (lambda p: p.write_text("not fits"), "not a readable FITS file"),
])
def test_unusable_files_are_errors_naming_the_file(tmp_path, make, match):
    path = tmp_path / "bad.fits"
    make(path)
    with pytest.raises(CatalogError, match=match) as info:
        fits_to_table([path])
    assert str(path) in str(info.value)


def test_a_named_hdu_that_is_not_a_spectrum_names_the_hdu(tmp_path):
    path = tmp_path / "t.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("wave", "E", array=np.ones(3))])]).writeto(path)
    with pytest.raises(CatalogError, match="HDU 1: table needs a flux"):
        fits_to_table([path], hdu=1)


def test_import_fits_command_writes_a_catalog_with_medium_resolving_power_and_pixels(tmp_path):
    path = image(tmp_path / "s.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0})
    result = CliRunner().invoke(import_fits_command, [str(path), "--out", str(tmp_path / "o"),
                                                      "--medium", "air", "--resolving-power", "20000",
                                                      "--pixels", "integrated"])
    assert result.exit_code == 0, result.output
    table = read_catalog(tmp_path / "o")
    meta = table.schema.metadata
    assert meta[META_MEDIUM.encode()] == b"air" and meta[META_RESOLVING_POWER.encode()] == b"20000.0"
    assert meta[META_PIXELS.encode()] == b"integrated"
    assert table.column("id").to_pylist() == ["s"]


def test_spec_res_gives_a_resolving_power_column_unless_one_is_given(tmp_path):
    """ESO Phase 3 states the resolving power as SPEC_RES (in the primary header of its tables)."""
    wcs = {"CRVAL1": 4000.0, "CDELT1": 1.0}
    stated, plain = image(tmp_path / "a.fits", {**wcs, "SPEC_RES": 48000.0}), image(tmp_path / "b.fits", wcs)
    table_hdu = fits.BinTableHDU.from_columns([fits.Column("WAVE", "50D", array=[4000.0 + np.arange(N)]),
                                               fits.Column("FLUX", "50E", array=[np.ones(N)])])
    primary = fits.PrimaryHDU()
    primary.header["SPEC_RES"] = 20000
    fits.HDUList([primary, table_hdu]).writeto(tmp_path / "adp.fits")
    table = fits_to_table([stated, plain, tmp_path / "adp.fits"])
    assert table.column("resolving_power").to_pylist() == [48000.0, None, 20000.0]
    assert META_RESOLVING_POWER.encode() not in table.schema.metadata
    given = fits_to_table([stated, plain], resolving_power=30000.0)
    assert "resolving_power" not in given.column_names
    assert given.schema.metadata[META_RESOLVING_POWER.encode()] == b"30000.0"


def test_a_spec_res_that_is_not_a_resolving_power_is_an_error_unless_one_is_given(tmp_path):
    path = image(tmp_path / "a.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0, "SPEC_RES": -1.0})
    with pytest.raises(CatalogError, match="HDU 0: SPEC_RES is -1.0, not a resolving power"):
        fits_to_table([path])
    assert fits_to_table([path], resolving_power=30000.0).num_rows == 1


def test_import_fits_command_reads_the_hdu_asked_for(tmp_path):
    """A file with a spectrum in its primary image and another in a table extension: the first by
    default, the table's with --hdu 1."""
    table_hdu = fits.BinTableHDU.from_columns([fits.Column("wave", "D", array=np.linspace(5000.0, 5049.0, N)),
                                               fits.Column("flux", "E", array=np.full(N, 3.0))])
    path = image(tmp_path / "s.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0}, extra=[table_hdu])
    for args, first, flux in (([], 4000.0, 1.0), (["--hdu", "1"], 5000.0, 3.0)):
        out = tmp_path / f"o{len(args)}"
        result = CliRunner().invoke(import_fits_command, [str(path), "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        table = read_catalog(out)
        assert wavelengths(table)[0] == pytest.approx(first)
        assert table.column("flux")[0].as_py()[0] == flux


def test_skip_bad_imports_the_readable_files_and_names_each_other_with_why(tmp_path):
    """A batch with a file whose wavelength unit is unknown, one that is not FITS and one whose id the
    first already has: without --skip-bad the import stops at the first bad file, naming it; with it,
    the readable file is imported (and alone in `starcast.source`), each other is named on stderr with
    why, and the command exits 3, as a run does when some files fail."""
    good = image(tmp_path / "good.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0})
    unit = image(tmp_path / "unit.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0, "CUNIT1": "furlong"})
    (tmp_path / "junk.fits").write_text("not a FITS file")
    (tmp_path / "again").mkdir()
    again = image(tmp_path / "again" / "good.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0})
    files = [str(good), str(unit), str(tmp_path / "junk.fits"), str(again)]
    strict = CliRunner().invoke(import_fits_command, [*files, "--out", str(tmp_path / "strict")])
    assert strict.exit_code != 0 and "unit.fits" in str(strict.exception)
    assert not list((tmp_path / "strict").glob("*.parquet"))
    result = CliRunner().invoke(import_fits_command, [*files, "--out", str(tmp_path / "o"), "--skip-bad"])
    assert result.exit_code == EXIT_PARTIAL, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipping ")]
    assert len(skipped) == 3 and all(name in "".join(skipped) for name in ("unit.fits", "junk.fits",
                                                                           "again/good.fits"))
    assert "furlong" in skipped[0] and "not a readable FITS file" in skipped[1] and "rename one" in skipped[2]
    table = read_catalog(tmp_path / "o")
    assert table.column("id").to_pylist() == ["good"]
    assert json.loads(table.schema.metadata[b"starcast.source"]) == {"fits": [str(good)]}
    assert "imported 1 FITS spectra" in result.stdout and "3 file(s) skipped" in result.stdout
    nothing = CliRunner().invoke(import_fits_command, [files[1], "--out", str(tmp_path / "n"), "--skip-bad"])
    assert nothing.exit_code != 0 and "no FITS file could be read" in str(nothing.exception)
    assert "furlong" in nothing.stderr


def test_a_file_given_twice_is_read_once(tmp_path):
    """Overlapping globs name a file twice: it is one spectrum, not a clash of its id with itself."""
    path = image(tmp_path / "s.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0})
    (tmp_path / "sub").mkdir()
    table = fits_to_table([path, tmp_path / "sub" / ".." / "s.fits"])
    assert table.column("id").to_pylist() == ["s"]


def test_whatever_astropy_raises_on_a_file_is_an_error_naming_the_file(tmp_path, monkeypatch):
    """Not only OSError, ValueError and TypeError: whatever astropy raises on a malformed file (a
    KeyError stands for the others here) names the file, so that `--skip-bad` can skip it too."""
    path = image(tmp_path / "s.fits", {"CRVAL1": 4000.0, "CDELT1": 1.0})

    def broken(*args, **kwargs):
        raise KeyError("NAXIS1")
    monkeypatch.setattr(fits, "open", broken)
    with pytest.raises(CatalogError, match=r"s\.fits: not a readable FITS file \(KeyError"):
        fits_to_table([path])
