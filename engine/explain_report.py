"""What the attributions of `explain.py` say, for people: the line-mass measure (how much of a target's
|attribution| falls on the listed diagnostic lines, `catalogs.lines`), the Parquet file of
attributions, per-spectrum plots (spectrum with its attribution as a colour band, lines labelled, one
panel per target) and the survey view (mean |attribution| per pixel and target, overall and per Teff
region, with a table of the top lines). Computing attributions is not done here.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ..catalogs.io import list_inputs
from ..catalogs.lines import DIAGNOSTIC_LINES, LINE_HALF_WIDTH, DiagnosticLine, line_windows, nearest_line
from ..catalogs.medium import convert
from ..catalogs.schema import ERROR, FLAGS, ID, META_WAVELENGTH, WavelengthGrid
from ..errors import CatalogError
from .bundle import REPORT_DIR
from .explain import Explanation
from .inputs import open_input, read_input

LINE_MASS_GOAL = 0.6  # issue 14: >= 60% of the |attribution| of Teff and log g on the listed lines
BALMER_TARGETS = ("logg",)  # targets whose line windows include the Balmer wings
TEFF_REGIONS = ((15000.0, 20000.0), (20000.0, 25000.0), (25000.0, 30000.0))  # K, by predicted Teff
TOP_PEAKS = 10
EXPLAIN_BATCH = 16  # rows per `Model.explain` call: one step of the progress bar (~15 s on two cores)
SELECT_BATCH_ROWS = 4096  # rows read at a time while choosing those to explain
FAILED_LISTED = 5  # rows without attributions named, with their errors, in the summary
FLANK_REACH = 3  # a line's flanks reach this many LINE_HALF_WIDTHs from its centre (the local level)


def line_mass(attributions: np.ndarray, wavelength: np.ndarray, target: str, *,
              balmer_wings: bool | None = None) -> np.ndarray:
    """Fraction of each row's |attribution| (rows [B, D] of one target) within LINE_HALF_WIDTH of a listed
    line, and within the Balmer wings for log g (or as `balmer_wings` says); (B,). NaN for a row
    without attribution: no pixel moves its estimate (a label held at its range's bound)."""
    wings = target in BALMER_TARGETS if balmer_wings is None else balmer_wings
    inside = line_windows(wavelength, balmer_wings=wings)
    mass = np.abs(attributions)
    total = mass.sum(axis=1)
    return np.divide(mass[:, inside].sum(axis=1), total, out=np.full(len(mass), np.nan), where=total > 0)


def write_attributions(exp: Explanation, path: Path, grid: WavelengthGrid, id_type: pa.DataType) -> Path:
    """Parquet: `id` (of the input's `id_type`), per target `t` (list<float32>, one value per model
    pixel, the target's unit), `t_pred` (f(x)), `t_baseline` (f(continuum)), and as in results `flags`
    and `error` (why a row has no attributions); the model grid in the metadata (`starcast.wavelength`)."""
    cols = {ID: pa.array(exp.ids, id_type)}
    for k, t in enumerate(exp.targets):
        cols[t] = pa.array(list(exp.attributions[:, k]), pa.list_(pa.float32()))
        cols[f"{t}_pred"] = pa.array(exp.prediction[:, k], pa.float64())
        cols[f"{t}_baseline"] = pa.array(exp.baseline[:, k], pa.float64())
    cols[FLAGS] = pa.array(exp.flags, pa.int32())
    cols[ERROR] = pa.array(exp.errors, pa.string())
    meta = {META_WAVELENGTH: grid.to_json(), "starcast.explain_method": exp.method,
            "starcast.explain_steps": str(exp.steps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), path)
    return path


def air_wavelength(exp: Explanation) -> np.ndarray:
    """The model grid in air (A), where the line list lives; plots and line masses use it."""
    return convert(exp.wavelength, exp.medium, "air")


_LABEL_PT = 3.4  # points of height per character of a line name written upwards at fontsize 6
_LABEL_GAP = 0.012  # names of lines closer than this fraction of the plotted range go on another level


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _label_layout(wavelength: np.ndarray) -> tuple[list[tuple[DiagnosticLine, int]], float]:
    """The listed lines within `wavelength`'s range, each with the level of its name (the lowest one
    whose previous name is at least _LABEL_GAP of the range away, so that no two names overlap), and
    the height of a level in points."""
    lo, hi = wavelength[0], wavelength[-1]
    last: list[float] = []  # per level, the wavelength of its latest name
    levels = []
    for line in sorted(DIAGNOSTIC_LINES, key=lambda ln: ln.wavelength):
        if lo <= line.wavelength <= hi:
            level = next((k for k, w in enumerate(last) if line.wavelength - w >= _LABEL_GAP * (hi - lo)),
                         len(last))
            last[level:level + 1] = [line.wavelength]
            levels.append((line, level))
    return levels, _LABEL_PT * max((len(line.name) for line, _ in levels), default=0) + 4


def _label_pad(wavelength: np.ndarray) -> float:
    """Points above the top panel that its line names take."""
    levels, step = _label_layout(wavelength)
    return step * (1 + max((level for _, level in levels), default=0)) + 4


def _label_lines(ax, wavelength: np.ndarray, top: bool) -> None:
    levels, step = _label_layout(wavelength)
    for line, level in levels:
        ax.axvline(line.wavelength, color="0.6", lw=0.5, ls=":", zorder=0)
        if top:
            ax.annotate(line.name, (line.wavelength, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, 3 + step * level), textcoords="offset points", rotation=90, fontsize=6,
                        ha="center", va="bottom")


def plot_spectrum(exp: Explanation, row: int, path: Path) -> Path:
    """One panel per target: the normalised flux, coloured by the signed attribution per pixel, over a
    band of the same colours; the listed lines marked and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    wl, flux = air_wavelength(exp), exp.flux[row]
    fig, axes = plt.subplots(len(exp.targets), 1, figsize=(11, 2.6 * len(exp.targets) + 0.8), sharex=True,
                             squeeze=False)
    pts = np.stack([wl, flux], axis=1)[:, None, :]
    segs = np.concatenate([pts[:-1], pts[1:]], axis=1)
    for k, (ax, t, unit) in enumerate(zip(axes[:, 0], exp.targets, exp.units, strict=True)):
        a = exp.attributions[row, k]
        lim = float(np.nanmax(np.abs(a))) or 1.0
        lc = LineCollection(segs, cmap="coolwarm", norm=plt.Normalize(-lim, lim), lw=1.2)
        lc.set_array(0.5 * (a[:-1] + a[1:]))
        ax.add_collection(lc)
        lo, hi = np.nanmin(flux) - 0.12, np.nanmax(flux) + 0.05
        ax.imshow(a[None], extent=(wl[0], wl[-1], lo, lo + 0.06), aspect="auto", cmap="coolwarm",
                  norm=lc.norm, interpolation="nearest")  # the band: attribution per pixel
        ax.set_xlim(wl[0], wl[-1])
        ax.set_ylim(lo, hi)
        ax.set_ylabel("normalised flux")
        _label_lines(ax, wl, top=k == 0)
        share = line_mass(a[None], wl, t)[0]
        on_lines = f"{100 * share:.0f}% of |attribution| on listed lines" if np.isfinite(share) else (
            "no pixel moves it")
        ax.set_title(f"{t} = {_fmt(exp.prediction[row, k])} {unit} (continuum: {_fmt(exp.baseline[row, k])}"
                     f" {unit}); {on_lines}", fontsize=8, loc="left",
                     pad=_label_pad(wl) if k == 0 else 4)
        fig.colorbar(lc, ax=ax, pad=0.01).set_label(f"attribution ({unit} / pixel)", fontsize=7)
    axes[-1, 0].set_xlabel("wavelength (Angstrom, air)")
    fig.suptitle(f"spectrum {exp.ids[row]}: integrated gradients ({exp.method}, baseline = continuum)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def survey_view(exp: Explanation, out: Path) -> dict:
    """Mean |attribution| per pixel and target over the explained rows, overall and per predicted-Teff
    region: `out/survey.parquet` (wavelength + one column per target and region), `out/survey.png`,
    `out/survey.json` (line-mass fractions, the top peaks with their identifications, the listed lines
    ranked by their share) and `out/survey.md` (the same as tables). Returns the JSON dict."""
    out.mkdir(parents=True, exist_ok=True)
    ok = np.isfinite(exp.prediction).all(axis=1)
    wl, a = air_wavelength(exp), np.abs(exp.attributions[ok].astype(np.float64))
    teff = exp.prediction[ok, exp.targets.index("teff")] if "teff" in exp.targets else None
    regions = {"all": np.ones(len(a), dtype=bool)}
    if teff is not None:
        regions.update({f"teff_{lo / 1000:g}-{hi / 1000:g}kK": (teff >= lo) & (teff < hi)
                        for lo, hi in TEFF_REGIONS})
    cols = {"wavelength_air": pa.array(wl)}
    summary: dict = {"spectra": int(ok.sum()), "method": exp.method, "line_half_width_A": LINE_HALF_WIDTH,
                     "goal": LINE_MASS_GOAL, "targets": {}}
    for k, t in enumerate(exp.targets):
        per_row = line_mass(exp.attributions[ok, k], wl, t)
        wings = line_mass(exp.attributions[ok, k], wl, t, balmer_wings=True)
        entry = {"line_mass_mean": float(np.nanmean(per_row)),  # rows without attribution have none
                 "line_mass_median": float(np.nanmedian(per_row)),
                 "line_mass_with_balmer_wings_mean": float(np.nanmean(wings)), "regions": {}}
        for name, sel in regions.items():
            if not sel.any():
                continue
            mean_abs = a[sel, k].mean(axis=0)
            cols[f"{t}_{name}"] = pa.array(mean_abs)
            entry["regions"][name] = {"spectra": int(sel.sum()),
                                      "line_mass_of_mean": float(line_mass(mean_abs[None], wl, t)[0])}
        entry["top_peaks"] = _top_peaks(a[:, k].mean(axis=0), wl)
        entry["lines"], entry["line_mass_above_flanks_of_mean"] = _line_shares(a[:, k].mean(axis=0), wl)
        summary["targets"][t] = entry
    pq.write_table(pa.table(cols), out / "survey.parquet")
    (out / "survey.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "survey.md").write_text(_markdown(summary) + "\n")
    _plot_survey(cols, exp, regions, out / "survey.png")
    return summary


def _top_peaks(mean_abs: np.ndarray, wl: np.ndarray) -> list[dict]:
    """The TOP_PEAKS largest local maxima of a mean |attribution| curve, each with its listed line
    (within LINE_HALF_WIDTH) or null, and its share of the total."""
    peak = np.flatnonzero((mean_abs[1:-1] >= mean_abs[:-2]) & (mean_abs[1:-1] > mean_abs[2:])) + 1
    peak = peak[np.argsort(mean_abs[peak])[::-1][:TOP_PEAKS]]
    total = mean_abs.sum()
    return [{"wavelength": round(float(wl[i]), 2), "line": nearest_line(float(wl[i])),
             "share_of_pixel": float(mean_abs[i] / total)} for i in peak]


def _line_shares(mean_abs: np.ndarray, wl: np.ndarray) -> tuple[list[dict], float]:
    """Each listed line's share of the mean |attribution| within LINE_HALF_WIDTH of it, largest first,
    with its contrast: the mean attribution per pixel in its window over that of its flanks (pixels
    FLANK_REACH x LINE_HALF_WIDTH from it, outside every window; null where there are none), and the
    share above that flank level. A line inside a Balmer wing or a broad feature has contrast ~1 if
    only the wing carries the attribution, and well above 1 if the line itself does. Also returns the
    share above the local level over the union of the windows (each pixel measured against the flanks
    of its nearest line; nothing counted where that line has no flanks)."""
    total, windows = mean_abs.sum(), line_windows(wl)
    level, nearest = mean_abs.copy(), np.full(len(wl), np.inf)
    shares = []
    for ln in DIAGNOSTIC_LINES:
        d = np.abs(wl - ln.wavelength)
        window = d <= LINE_HALF_WIDTH
        flanks = (d > LINE_HALF_WIDTH) & (d <= FLANK_REACH * LINE_HALF_WIDTH) & ~windows
        flank = float(mean_abs[flanks].mean()) if flanks.any() else None
        closer = window & (d < nearest)
        level[closer], nearest[closer] = (mean_abs[closer] if flank is None else flank), d[closer]
        contrast = float(mean_abs[window].mean() / flank) if window.any() and flank else None
        above = 0.0 if flank is None else max(0.0, float(mean_abs[window].sum()) - flank * window.sum())
        shares.append({"line": ln.name, "wavelength": ln.wavelength, "contrast": contrast,
                       "share": float(mean_abs[window].sum() / total), "share_above_flanks": above / total})
    above_all = float(np.clip(mean_abs - level, 0.0, None)[windows].sum() / total)
    return sorted(shares, key=lambda s: -s["share"]), above_all


def _markdown(summary: dict) -> str:
    lines = [f"Mean |attribution| over {summary['spectra']} spectra (integrated gradients, "
             f"{summary['method']}); line mass = share within +-{summary['line_half_width_A']:g} A of the "
             "listed lines (log g: also the Balmer wings, +-30 A).", "",
             "| target | line mass (mean over spectra) | with the Balmer wings for every target "
             "| of the mean curve above each line's flanks | of the mean curve, per Teff region |",
             "| --- | --- | --- | --- | --- |"]
    for t, e in summary["targets"].items():
        regions = ", ".join(f"{n} {100 * r['line_mass_of_mean']:.0f}% ({r['spectra']})"
                            for n, r in e["regions"].items())
        lines.append(f"| {t} | {100 * e['line_mass_mean']:.1f}% | "
                     f"{100 * e['line_mass_with_balmer_wings_mean']:.1f}% | "
                     f"{100 * e['line_mass_above_flanks_of_mean']:.1f}% | {regions} |")
    half = summary["line_half_width_A"]
    for t, e in summary["targets"].items():
        lines += ["", f"Top lines for {t} (contrast: attribution per pixel on the line over its flanks, "
                  f"{half:g}-{FLANK_REACH * half:g} A away):", "",
                  "| line | A (air) | share | contrast |", "| --- | --- | --- | --- |"]
        for s in e["lines"][:12]:
            contrast = "n/a" if s["contrast"] is None else f"{s['contrast']:.1f}"
            lines.append(f"| {s['line']} | {s['wavelength']:.2f} | {100 * s['share']:.1f}% | {contrast} |")
        peaks = ", ".join(f"{p['wavelength']:.1f} ({p['line'] or 'unlisted'})" for p in e["top_peaks"])
        lines.append(f"\nLargest peaks of mean |attribution| for {t}: {peaks}")
    return "\n".join(lines)


def _plot_survey(cols: dict, exp: Explanation, regions: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wl = air_wavelength(exp)
    fig, axes = plt.subplots(len(exp.targets), 1, figsize=(11, 2.4 * len(exp.targets) + 0.8), sharex=True,
                             squeeze=False)
    for k, (ax, t, unit) in enumerate(zip(axes[:, 0], exp.targets, exp.units, strict=True)):
        for name in regions:
            if f"{t}_{name}" in cols:
                ax.plot(wl, cols[f"{t}_{name}"].to_numpy(), lw=1.4 if name == "all" else 0.7, label=name,
                        color="k" if name == "all" else None)
        inside = line_windows(wl, balmer_wings=t in BALMER_TARGETS)
        ax.fill_between(wl, 0, 1, where=inside, color="gold", alpha=0.25, lw=0,
                        transform=ax.get_xaxis_transform(), label="listed lines")
        _label_lines(ax, wl, top=k == 0)
        ax.set_ylabel(f"mean |attribution|\n({unit} / pixel)", fontsize=8)
        ax.set_title(t, fontsize=8, loc="left", pad=_label_pad(wl) if k == 0 else 4)
    axes[0, 0].legend(fontsize=6, loc="upper right", ncols=5)
    axes[-1, 0].set_xlabel("wavelength (Angstrom, air)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_names(ids: list) -> list[str]:
    """A file name per row for its plot: `<id>.png`, `<id>_<k>.png` for the k-th repeat of an id
    (k from 1), characters other than letters, digits, `.`, `-` and `_` as `_`."""
    seen: dict = {}
    names = []
    for i in ids:
        k = seen[i] = seen.get(i, -1) + 1
        safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in str(i))
        names.append(f"{safe}.png" if k == 0 else f"{safe}_{k}.png")
    return names


def explain_catalog(model, tables: list[pa.Table], out: Path, *, method: str = "ig", steps: int | None = None,
                    plots: int = 10, seed: int = 0, attributions: bool = True) -> dict:
    """Explain every row of `tables` (ids not null; one table per input file, each read with its own
    file metadata: wavelength grid, medium, resolving power, pixels) with `model` (all targets) and
    write `out/attributions.parquet` (unless not `attributions`), `out/plots/` (`plot_names`) for the
    first `plots` rows that could be predicted, and the survey view in `out/survey/`. Returns the
    survey summary with the rows' count and completeness errors added."""
    parts = []
    with tqdm(total=sum(t.num_rows for t in tables), unit="spectra", dynamic_ncols=True,
              desc="starcast explain", disable=not sys.stderr.isatty()) as bar:
        for table in tables:
            for start in range(0, table.num_rows, EXPLAIN_BATCH):
                batch = table.slice(start, EXPLAIN_BATCH)
                parts.append(model.explain(batch, method=method, steps=steps, seed=seed))
                bar.update(len(parts[-1].ids))
    exp = Explanation.concat(parts)
    out = Path(out)
    if attributions:
        write_attributions(exp, out / "attributions.parquet", model.grid, tables[0].schema.field(ID).type)
    good = np.isfinite(exp.prediction).all(axis=1)
    ok = np.flatnonzero(good)
    names = plot_names(exp.ids)
    for row in ok[:plots]:
        plot_spectrum(exp, int(row), out / "plots" / names[row])
    summary = survey_view(exp, out / "survey") if len(ok) else {"spectra": 0, "targets": {}}
    err = exp.completeness_error()[ok]
    failed = [(i, e) for i, e, g in zip(exp.ids, exp.errors, good, strict=True) if not g]
    summary.update(rows=len(exp.ids), rows_failed=len(failed), plots=int(min(len(ok), plots)),
                   failed=[{"id": str(i), "error": e} for i, e in failed[:FAILED_LISTED]],
                   completeness_error_median=float(np.median(err)) if len(ok) else None,
                   completeness_error_max=float(np.max(err)) if len(ok) else None)
    (out / "survey" / "survey.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "survey" / "survey.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def model_report(bundle: str | Path, table: pa.Table, *, plots: int = 3) -> dict:
    """The survey view of a bundle on a catalog table (and `plots` per-spectrum plots), written into
    `BUNDLE/report/explain/` (the one before removed) without the attributions themselves (~23 MB per
    1000 spectra)."""
    from .predictor import load_model

    out = Path(bundle) / REPORT_DIR / "explain"
    shutil.rmtree(out, ignore_errors=True)
    return explain_catalog(load_model(bundle), [table], out, plots=plots, attributions=False)


def _id_keys(wanted: list[str], id_type: pa.DataType, file: Path) -> dict[str, object]:
    """The ids of `wanted` (as typed on the command line) that an id column of `id_type` can hold, each
    read in that type: for integer ids the whole numbers within its range, for string ids the text
    (another id matches no row; a column of null ids, none). Ids of any other type are `file`'s error,
    as in a run."""
    if pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
        return {s: s for s in wanted}
    if pa.types.is_null(id_type):
        return {}
    if not pa.types.is_integer(id_type):
        raise CatalogError(f"expected integer or string ids, got {id_type}", file=file, column=ID)
    limits = np.iinfo(id_type.to_pandas_dtype())
    numbers = {s: int(s) for s in wanted if re.fullmatch(r"[+-]?[0-9]+", s)}
    return {s: k for s, k in numbers.items() if limits.min <= k <= limits.max}


def select_rows(catalog: str | Path, ids: str | None, n: int) -> tuple[list[pa.Table], list[str]]:
    """The rows of a catalog to explain, one table per input file that has any (with that file's
    metadata, which its rows are read with), each file opened and read as a run opens and reads it
    (`engine.inputs`: its grid metadata checked, dictionary-encoded ids decoded): those whose id is in
    the comma-separated `ids`, else the first `n` whose id is not null (an explanation is keyed by its
    id); and the rows passed over for a null id, as "FILE row N" (N from 0 in its file). Raises
    CatalogError naming the ids that are not there, the files whose ids are of another type than the
    first's (the attributions' one id column), or, where no row has an id, the catalog."""
    wanted = None if ids is None else [s.strip() for s in ids.split(",") if s.strip()]
    tables, rows, passed_over, found = [], 0, [], set()
    for file in list_inputs(catalog):
        parts, start = [], 0
        for batch in read_input(open_input(file), SELECT_BATCH_ROWS):
            col = batch.column(ID)
            if wanted is not None:
                keys = _id_keys(wanted, col.type, file)
                chosen = pc.fill_null(pc.is_in(col, value_set=pa.array(list(keys.values()), col.type)), False)
                present = set(batch.filter(chosen).column(ID).to_pylist())
                found |= {s for s, key in keys.items() if key in present}
            else:
                valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
                chosen = valid & (np.cumsum(valid) <= n - rows)  # no more than the rows still wanted
                end = np.flatnonzero(chosen)[-1] if rows + chosen.sum() >= n else len(valid)
                passed_over += [f"{file} row {start + r}" for r in np.flatnonzero(~valid[:end])]
            parts.append(batch.filter(chosen))
            rows += parts[-1].num_rows
            start += batch.num_rows
            if wanted is None and rows >= n:
                break
        if sum(part.num_rows for part in parts):
            table = pa.Table.from_batches(parts).replace_schema_metadata(parts[0].schema.metadata)
            if tables and table.schema.field(ID).type != tables[0].schema.field(ID).type:
                raise CatalogError(f"{file}: its ids are {table.schema.field(ID).type}, those of the rows "
                                   f"before {tables[0].schema.field(ID).type}: explain them apart", column=ID)
            tables.append(table)
        if wanted is None and rows >= n:
            break
    missing = [] if wanted is None else [s for s in wanted if s not in found]
    if missing:
        raise CatalogError(f"{catalog}: no rows with id {', '.join(missing[:10])}", column=ID)
    if not tables:
        raise CatalogError(f"{catalog}: no rows with an id to explain", column=ID)
    return tables, passed_over
