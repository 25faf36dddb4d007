"""Command-line front of the catalogs sub-package: `starcast synth`, `import-csv` and `import-fits`.

Thin click wrappers over `synth.synth`, `csv_import.import_csv` and `fits_import.import_fits`; they
parse options, show a progress bar and print a one-screen summary. Errors are `StarcastError`s,
printed by the main CLI.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..errors import EXIT_PARTIAL, CatalogError, StarcastError
from .schema import PIXEL_KINDS


def _parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected A:B (two numbers), got {text!r}") from None
    if not 0 < lo <= hi:
        raise click.BadParameter(f"expected 0 < A <= B, got {text!r}")
    return lo, hi


def _summary(out: Path, paths: list[Path], seconds: float) -> str:
    # Reads only the scalar columns, batch by batch, so it stays cheap for a million spectra.
    import numpy as np
    import pyarrow as pa

    from .io import iter_batches, read_grid

    wanted = ["teff", "logg", "vsini", "rv", "snr", "split"]
    names = [n for n in wanted if n in next(iter_batches(paths[0], batch_rows=1)).schema.names]
    table = pa.Table.from_batches(list(iter_batches(out, columns=names)))
    grid = read_grid(paths[0])
    lines = [f"wrote {table.num_rows} spectra in {len(paths)} shard(s) to {out} in {seconds:.1f} s",
             f"grid: {grid.n} pixels, {grid.values()[0]:.1f}-{grid.values()[-1]:.1f} A ({grid.medium})"]
    for name, unit in (("teff", "K"), ("logg", "dex"), ("vsini", "km/s"), ("rv", "km/s"), ("snr", "")):
        if name in names:
            v = table.column(name).to_numpy()
            lines.append(f"{name:>6}: {v.min():10.2f} .. {v.max():10.2f} {unit}")
    if "split" in names:
        values, counts = np.unique(table.column("split").to_numpy(zero_copy_only=False), return_counts=True)
        lines.append("split: " + ", ".join(f"{v} {c}" for v, c in zip(values, counts, strict=True)))
    return "\n".join(lines)


@click.command("synth")
@click.option("--n", "n", type=int, default=None,
              help="Number of spectra (required in random mode and with --grid; seed mode of the simplified "
                   "generator defaults to its whole grid).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the Parquet shards part-00000.parquet, ...")
@click.option("--mode", type=click.Choice(["random", "seed"]), default="random", show_default=True,
              help="random: uniform draws of Teff, log g, v sin i; seed: the simplified generator's "
                   "reference grid with a train/val/test split column, or with --grid stars at the "
                   "grid's nodes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Spectra per shard file.")
@click.option("--snr", "snr", default="50:300", show_default=True,
              help="Range A:B of the per-pixel signal-to-noise on the continuum (uniform draws; "
                   "log-uniform with --grid).")
@click.option("--grid", "grid", default=None, type=click.Path(exists=True, path_type=Path),
              help="Observe stars of a grid of model spectra (e.g. TLUSTY: an npz, CSV, Parquet or a "
                   "folder of text spectra) instead of the simplified generator; --mode seed then puts "
                   "them at the grid's nodes, random between them.")
@click.option("--wavelengths", default=None,
              help="With --grid: the observed range A:B (Angstrom, air; 0.2 A pixels) [default: 4000:4800], "
                   "inside the grid's range.")
@click.option("--grid-medium", type=click.Choice(["air", "vacuum"]), default=None,
              help="With --grid: the medium of the grid's wavelengths where its file states none (a CSV, "
                   "text spectra, an npz's plain `wavelength`) [default: air]; a file that states another "
                   "is an error.")
def synth(n: int | None, out: Path, mode: str, seed: int, shard_rows: int, snr: str,
          grid: Path | None, wavelengths: str | None, grid_medium: str | None) -> None:
    """Synthesise a survey of OB-star spectra (4000-4800 A, R = 20000) as Parquet shards.

    \b
    Examples:
      starcast synth --n 1000 --out survey/
      starcast synth --mode seed --out seed-grid/     # the 24 450-spectrum training grid
      starcast synth --n 1000 --grid grid.npz --out tlusty/   # model-atmosphere physics
      starcast synth --mode seed --n 200 --grid starcast/data/tlusty-sample.npz --out sample/
                                          # the shipped sample: its 5 nodes are too far apart to
                                          # interpolate between
    """
    from .synth import synth as run_synth

    if (mode == "random" or grid is not None) and n is None:
        raise click.UsageError("--n is required in random mode and with --grid")
    if n is not None and n < 1:
        raise click.BadParameter("--n must be at least 1")
    if wavelengths is not None and grid is None:
        raise click.UsageError("--wavelengths goes with --grid (the simplified generator's range is fixed)")
    if grid_medium is not None and grid is None:
        raise click.UsageError("--grid-medium goes with --grid")
    start = time.perf_counter()
    if grid is not None:
        from .grids import read_grid
        from .gridsynth import Observation, synth_from_grid

        obs = Observation()
        if wavelengths is not None:
            lo, hi = _parse_range(wavelengths)
            obs = Observation(start=lo, npix=int(round((hi - lo) / obs.step)) + 1)
        paths = synth_from_grid(read_grid(grid, medium=grid_medium), n, out, at_nodes=mode == "seed",
                                seed=seed, obs=obs, snr=_parse_range(snr), shard_rows=shard_rows,
                                progress=sys.stderr.isatty())
    else:
        paths = run_synth(n, out, mode=mode, seed=seed, shard_rows=shard_rows, snr=_parse_range(snr),
                          progress=sys.stderr.isatty())
    click.echo(_summary(out, paths, time.perf_counter() - start))


PIXELS_OPTION = click.option(
    "--pixels", type=click.Choice(PIXEL_KINDS), default=None,
    help="What every flux value is: its pixel's mean (a detector's; the default when not given) or the "
         "flux at its wavelength (a spectrum interpolated onto a grid), stored as starcast.pixels.")


@click.command("import-csv")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the Parquet shards.")
@click.option("--medium", type=click.Choice(["vacuum", "air"]), default="vacuum", show_default=True,
              help="Whether the header wavelengths are vacuum or air wavelengths.")
@click.option("--resolving-power", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolving power lambda / FWHM of every spectrum (a resolving_power column wins).")
@PIXELS_OPTION
@click.option("--shard-rows", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Spectra per shard file.")
def import_csv(file: Path, out: Path, medium: str, resolving_power: float | None, pixels: str | None,
               shard_rows: int) -> None:
    """Import a wide CSV (one row per spectrum, one column per wavelength in A) as a catalog.

    Headers are wavelengths (e.g. 4460.1,4460.2,...) or the optional columns id, teff, logg, vsini,
    rv, snr, split, resolving_power; a pandas index column (empty header or "Unnamed: 0") is the id
    when there is no id column. Example: starcast import-csv spectra.csv --out catalog/
    """
    from .csv_import import import_csv as run_import

    paths = run_import(file, out, shard_rows=shard_rows, medium=medium, resolving_power=resolving_power,
                       pixels=pixels)
    if not paths:
        raise StarcastError(f"file {file}: nothing imported")
    click.echo(f"imported {file} into {len(paths)} shard(s) in {out}")


@click.command("import-fits")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory for the Parquet shards.")
@click.option("--medium", type=click.Choice(["vacuum", "air"]), default="vacuum", show_default=True,
              help="Medium of the wavelengths where a header does not state it (AIRORVAC, VACUUM, "
                   "CTYPE1 AWAV).")
@click.option("--resolving-power", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolving power lambda / FWHM of every spectrum  [default: SPEC_RES of each header "
                   "that states it].")
@PIXELS_OPTION
@click.option("--hdu", type=click.IntRange(min=0), default=None,
              help="Read this HDU (0 = primary) instead of the first that holds a spectrum.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Spectra per shard file.")
@click.option("--skip-bad", is_flag=True,
              help="Import the files that can be read and name each that cannot (or whose id an earlier "
                   "file has), with why (exit 3), rather than stop at the first.")
def import_fits(files: tuple[Path, ...], out: Path, medium: str, resolving_power: float | None,
                pixels: str | None, hdu: int | None, shard_rows: int, skip_bad: bool) -> None:
    """Import FITS spectra (1-D images with a wavelength WCS, or binary tables) as a catalog.

    Each file gives one spectrum (a table with array cells: one per row); its id is the file name
    without its suffixes (NAME:ROW for a table's rows).
    Example: starcast import-fits spectra/*.fits --out catalog/
    """
    import pyarrow.parquet as pq

    from .fits_import import import_fits as run_import

    skipped: list[CatalogError] = []

    def skip(error: CatalogError) -> None:  # named as it happens, so that a batch of bad files says why
        skipped.append(error)
        click.echo(f"skipping {error}", err=True)

    paths = run_import(files, out, medium=medium, resolving_power=resolving_power, hdu=hdu,
                       shard_rows=shard_rows, pixels=pixels, on_bad=skip if skip_bad else None)
    spectra = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    click.echo(f"imported {spectra} FITS spectra into {len(paths)} shard(s) in {out}"
               + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    if skipped:
        sys.exit(EXIT_PARTIAL)
