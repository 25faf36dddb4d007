"""`starcast inspect`: a summary of a results catalog, computed with polars in one lazy scan.

Counts (rows, rows with numbers, failed, flagged), rows per flag bit, the most common errors, per
target the distribution of the estimate (min, median, max) and quantiles (median, 90%, 99%) of its
total, aleatoric and epistemic sigma, and, for a model with an emulator, the median and 90% quantile
of `chi2`, with a hint where most spectra are not explained to their stated noise, or scatter less
than it says. Units are those of
the model's targets (K, dex, km/s).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import polars as pl

from ..catalogs.schema import CHI2, ERROR, FLAGS, INFORMATIONAL, Flag
from ..errors import StarcastError
from .manifest import MARKERS_DIR, RESULTS_DIR

QUANTILES = (0.5, 0.9, 0.99)
SIGMAS = ("_err", "_err_aleatoric", "_err_epistemic")
# A median chi2 above this says most spectra are not explained to their stated noise: clean spectra
# give 1.00 in every SNR bin, noise understated by 10% gives 1.2.
UNEXPLAINED_CHI2 = 1.2
# A median chi2 below this says the stated noise is larger than the spectra's: flux_err overstated 1.2x
# gives 0.69; resampling that smooths the noise lowers it less (spectra off the model grid: 0.83).
OVERSTATED_CHI2 = 0.7


def results_files(spec: str | os.PathLike) -> list[Path]:
    """A results file, a folder of them, or a run's output folder (its `results/`)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if (path / RESULTS_DIR).is_dir():
        path = path / RESULTS_DIR
    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise StarcastError(f"{spec}: no results file (expected a .parquet file or a folder holding them)")
    return files


def summarize(spec: str | os.PathLike) -> dict:
    """The summary of the results at `spec` as a plain dict (see the module docstring)."""
    files = results_files(spec)
    lf = pl.scan_parquet(files)
    try:
        names = lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise StarcastError(f"{spec}: not a readable Parquet results file "
                            f"({type(exc).__name__}: {exc})") from None
    missing = " or ".join(repr(c) for c in (FLAGS, ERROR) if c not in names)
    if missing:
        raise StarcastError(f"{spec}: not a results catalog (no {missing} column); inspect summarises what "
                            f"`starcast run` writes: run `starcast run {spec} --out DIR`, then "
                            "`starcast inspect DIR`")
    targets = [n[: -len("_err_epistemic")] for n in names if n.endswith("_err_epistemic")]
    exprs = [pl.len().alias("rows"), pl.col(ERROR).is_null().sum().alias("predicted"),
             pl.col(ERROR).is_not_null().sum().alias("failed"),
             ((pl.col(FLAGS) & ~int(INFORMATIONAL)) != 0).sum().alias("flagged")]
    exprs += [((pl.col(FLAGS) & int(bit)) != 0).sum().alias(f"flag:{bit.name}") for bit in Flag]
    for t in targets:
        exprs += [pl.col(t).min().alias(f"{t}:min"), pl.col(t).median().alias(f"{t}:median"),
                  pl.col(t).max().alias(f"{t}:max")]
        exprs += [pl.col(t + s).quantile(q, interpolation="linear").alias(f"{t}{s}:q{q}")
                  for s in SIGMAS for q in QUANTILES]
    if CHI2 in names:
        exprs += [pl.col(CHI2).quantile(q, interpolation="linear").alias(f"chi2:q{q}") for q in QUANTILES[:2]]
    row = lf.select(exprs).collect().row(0, named=True)
    # errors alike but for their numbers (a row number, a count of pixels) are one reason
    kind = pl.col(ERROR).str.replace_all(r"\d+(\.\d+)?", "#").alias("kind")
    errors = (lf.filter(pl.col(ERROR).is_not_null()).group_by(kind)
              .agg(pl.len(), pl.col(ERROR).min(), pl.col(ERROR).n_unique().alias("texts"))
              .sort(["len", ERROR], descending=[True, False]).head(5).collect())
    return {
        "files": [str(f) for f in files],
        "files_without_marker": [str(f) for f in files
                                 if not (f.parent.parent / MARKERS_DIR / f"{f.stem}.done").exists()],
        "rows": row["rows"], "rows_predicted": row["predicted"], "rows_failed": row["failed"],
        "rows_flagged": row["flagged"],
        "flags": {bit.name: row[f"flag:{bit.name}"] for bit in Flag},
        "top_errors": [{"error": e, "rows": n, "alike": texts - 1}
                       for e, n, texts in errors.select(ERROR, "len", "texts").iter_rows()],
        "targets": {t: {"min": row[f"{t}:min"], "median": row[f"{t}:median"], "max": row[f"{t}:max"],
                        **{f"{t}{s}": {f"q{int(q * 100)}": row[f"{t}{s}:q{q}"] for q in QUANTILES}
                           for s in SIGMAS}}
                    for t in targets},
        "chi2": {f"q{int(q * 100)}": row[f"chi2:q{q}"] for q in QUANTILES[:2]} if CHI2 in names else None,
    }


def format_summary(summary: dict) -> str:
    """The summary as text tables for the terminal."""
    lines = [f"{len(summary['files'])} results file(s), {summary['rows']} rows: "
             f"{summary['rows_predicted']} predicted, {summary['rows_failed']} failed, "
             f"{summary['rows_flagged']} flagged"]
    if summary["files_without_marker"]:
        lines.append(f"warning: {len(summary['files_without_marker'])} file(s) without a completion marker")
    lines += ["", "flag                 rows"]
    lines += [f"{name:<20} {n:>5}" for name, n in summary["flags"].items()]
    if summary["top_errors"]:
        lines += ["", "most common errors"]
        for e in summary["top_errors"]:
            alike = f"  (and {e['alike']} alike but for numbers)" if e["alike"] else ""
            lines.append(f"{e['rows']:>7}  {e['error']}{alike}")
        rest = summary["rows_failed"] - sum(e["rows"] for e in summary["top_errors"])
        if rest:
            lines.append(f"{rest:>7}  rows with other errors (`error` column)")
    head = f"{'target':<8}" + "".join(f" {h:>10}" for h in ("min", "median", "max"))
    head += "".join(f" {name + '.' + q:>10}" for name in ("err", "alea", "epis")
                    for q in ("q50", "q90", "q99"))
    lines += ["", "sigmas: total (err), aleatoric (alea), epistemic (epis); quantiles over rows", head]
    for t, d in summary["targets"].items():
        cells = [d["min"], d["median"], d["max"]] + [d[f"{t}{s}"][q] for s in SIGMAS
                                                     for q in ("q50", "q90", "q99")]
        lines.append(f"{t:<8}" + "".join(_cell(v) for v in cells))
    chi2 = summary.get("chi2")
    if chi2 and chi2["q50"] is not None:
        lines += ["", f"chi2 (goodness of fit): median {chi2['q50']:.3g}, 90% {chi2['q90']:.3g}"]
        if chi2["q50"] > UNEXPLAINED_CHI2:
            factor = chi2["q50"] ** 0.5
            mismatch = summary["flags"][Flag.MODEL_MISMATCH.name] / max(summary["rows_predicted"], 1)
            few = (f" Only {mismatch:.0%} are flagged MODEL_MISMATCH, which reads the chi2 beyond what "
                   "their own scatter says of the noise: their excess lies alike in every pixel, as noise "
                   "that flux_err understates gives." if mismatch < 0.5 else "")
            hint = (f"hint: most spectra are not explained to their stated noise.{few} If their numbers "
                    f"look sane, flux_err likely understates the noise, by ~{factor:.2f}x (chi2 then stays "
                    "level with SNR; stars unlike the model's grid raise it as SNR^2): scale flux_err by "
                    "that, or leave it out and the noise is estimated from the flux (DER_SNR). Spectra "
                    "convolved down from a higher resolution carry noise shared between neighbouring "
                    "pixels, which per-pixel flux_err leaves out: leave it out.")
            lines += textwrap.wrap(hint, width=100, subsequent_indent="  ", break_on_hyphens=False)
        elif chi2["q50"] < OVERSTATED_CHI2:
            hint = ("hint: most spectra scatter less about the model than their stated noise: flux_err "
                    f"likely overstates it, by ~{chi2['q50'] ** -0.5:.2f}x; the networks read the spectra as "
                    "that much noisier (the aleatoric sigmas are narrowed by chi2 to make up for it). Scale "
                    "flux_err down by that, or leave it out and the noise is estimated from the flux "
                    "(DER_SNR). Spectra given without flux_err read low too where that estimate takes sharp "
                    "lines' fine structure for noise (high SNR).")
            lines += textwrap.wrap(hint, width=100, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)


def _cell(value) -> str:
    return f" {'-':>10}" if value is None else f" {value:>10.5g}"
