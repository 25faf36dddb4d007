"""`starcast eval`: a results catalog against the true labels, as a JSON report and PNG plots.

Rows are matched by `id`, the k-th row of an id in the results with the k-th of that id in the truth
(a duplicated id is predicted once per row, in the input's order), so that each row is scored once
(fewer than `min_match` of the smaller side matched is an error: the wrong truth catalog); rows
without a finite prediction are counted, not scored. Truths outside
the model's training range (or a second, out-of-distribution results catalog) are scored only by
how well the epistemic sigma singles them out (AUROC); accuracy and calibration use in-range rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..catalogs.io import list_inputs
from ..catalogs.physics import C_KMS
from ..catalogs.schema import FLAGS, ID, META_GENERATOR, META_INPUT, SNR, SPLIT, Flag
from ..engine.inspect import results_files
from ..errors import CatalogError
from .metrics import VSINI_EDGES, auroc, binned_bias, coverage_in_bins, summary, worst_bias
from .plots import EvalArrays, write_plots

OCCURRENCE = "__occurrence"  # the column that numbers the rows of each id, 0 first: a join key beside id
MIN_MATCH = 0.9  # default: at least this fraction of the smaller of results and truth must match by id
BIAS_MIN_SNR, BIAS_BINS = 30.0, 5  # the bias goal: at SNR >= this, in this many bins of each true parameter
RMSE_MIN_SNR = 100.0  # the RMSE goals hold at SNR >= this (v sin i: true above the resolution)
GOALS = {"rmse": {"teff": 400.0, "logg": 0.10, "vsini": 5.0}, "coverage_68": (0.65, 0.71),
         "coverage_95": (0.93, 0.97), "bias_over_median_sigma": 0.25}


def read_columns(path: str | Path | list[Path], columns: list[str] | None = None) -> pa.Table:
    """Selected columns of a Parquet file, directory of shards, glob or list of files (never the flux)."""
    files = [str(f) for f in (path if isinstance(path, list) else list_inputs(path))]
    try:
        ds = pads.dataset(files, format="parquet")
        present = [c for c in (columns or ds.schema.names) if c in ds.schema.names]
        return ds.to_table(columns=present)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"cannot read Parquet ({exc})", file=str(path)) from exc


def predicted_from_elsewhere(results: list[Path], truth_path: str | Path) -> list[str]:
    """The inputs the results record (`starcast.input`) that exist here and are not files of the
    truth catalog: results scored against another catalog's labels, which matching ids alone do not
    reveal (every synthetic survey numbers its rows 0 ... N-1)."""
    truth_files = {Path(f).resolve() for f in list_inputs(truth_path)}
    inputs = {(pq.read_schema(f).metadata or {}).get(META_INPUT.encode()) for f in results}
    return sorted(str(p) for p in (Path(i.decode()) for i in inputs if i is not None)
                  if p.is_file() and p.resolve() not in truth_files)


def instrumental_resolution_kms(path: str | Path) -> float | None:
    """c / R (km/s, the FWHM of the instrumental profile) from a synthetic catalog's generator
    metadata (the simplified generator's `config` or a grid survey's `observation`), or None when the
    catalog does not say."""
    meta = pads.dataset(str(path), format="parquet").schema.metadata or {}
    try:
        generator = json.loads(meta[META_GENERATOR.encode()])
        power = (generator.get("config") or generator["observation"])["resolving_power"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return C_KMS / float(power)


def result_targets(results: pa.Table) -> list[str]:
    names = results.column_names
    return [c for c in names if f"{c}_err" in names and f"{c}_err_epistemic" in names]


def with_occurrence(table: pa.Table) -> pa.Table:
    """`table` with an OCCURRENCE column: 0 on the first row of each id, 1 on its second, ..."""
    codes = _array(pc.dictionary_encode(_array(table.column(ID))).indices)
    codes = pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    first = np.r_[True, np.diff(codes[order]) != 0]  # the first of each id in sorted order
    start = np.maximum.accumulate(np.where(first, np.arange(len(codes)), 0))
    occurrence = np.empty(len(codes), np.int64)
    occurrence[order] = np.arange(len(codes)) - start
    return table.append_column(OCCURRENCE, pa.array(occurrence))


def ids_like(results: pa.Table, truth: pa.Table) -> pa.Table:
    """`truth` with its ids cast to the results' id type (e.g. int32 to int64); `CatalogError` when
    they cannot be (strings against integers)."""
    ours, theirs = results.schema.field(ID).type, truth.schema.field(ID).type
    if ours == theirs:
        return truth
    try:
        return truth.set_column(truth.schema.get_field_index(ID), ID, truth.column(ID).cast(ours))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise CatalogError(f"ids are {ours} in the results but {theirs} in the truth catalog") from None


def _paired(results: pa.Table, truth: pa.Table) -> pa.Table:
    """The inner join of `with_occurrence` tables on id and occurrence (truth columns suffixed)."""
    return results.join(truth, keys=[ID, OCCURRENCE], join_type="inner", right_suffix="_true")


def _arrays(results: pa.Table, truth: pa.Table | None) -> dict[str, np.ndarray]:
    """Numeric columns as float arrays, after the `_paired` join with `truth` when given."""
    table = results if truth is None else _paired(results, truth)
    out = {}
    for col in table.column_names:
        if col in (ID, OCCURRENCE) or pa.types.is_string(table.column(col).type):
            continue
        out[col] = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def _finite(cols: dict, names: list[str], truth: bool) -> np.ndarray:
    keys = [f"{n}{s}" for n in names for s in ("", "_err", "_err_epistemic")]
    if truth:
        keys += [f"{n}_true" for n in names]
    return np.all([np.isfinite(cols[k]) for k in keys], axis=0) & np.all(
        [cols[f"{n}_err"] > 0 for n in names], axis=0)


def match_ids(results: pa.Table, truth: pa.Table, min_match: float = MIN_MATCH) -> dict:
    """Counts of result and truth rows, paired by id and occurrence (`with_occurrence` tables) and not,
    and of result rows whose id an earlier row has; `CatalogError` when fewer than `min_match` of the
    smaller of the two match (results scored against the wrong truth catalog)."""
    matched = _paired(results.select([ID, OCCURRENCE]), truth.select([ID, OCCURRENCE])).num_rows
    repeated = int(pc.sum(pc.greater(results.column(OCCURRENCE), 0)).as_py() or 0)
    counts = {"results": results.num_rows, "truth": truth.num_rows, "ids_matched": matched,
              "results_unmatched": results.num_rows - matched, "truth_unmatched": truth.num_rows - matched,
              "results_repeated_ids": repeated}
    smaller = min(results.num_rows, truth.num_rows)
    if matched < min_match * smaller or smaller == 0:
        raise CatalogError(f"only {matched} of {results.num_rows} result ids are in the truth catalog "
                           f"({truth.num_rows} rows); at least {min_match:.0%} of the smaller must match "
                           "(--min-match): is it the truth catalog of these results?")
    return counts


def _array(column):
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def evaluate(results: pa.Table, truth: pa.Table, *, ranges: dict[str, tuple[float, float]] | None = None,
             ood_results: pa.Table | None = None, vsini_min: float | None = None, bins: int = BIAS_BINS,
             min_match: float = MIN_MATCH) -> tuple[dict, EvalArrays]:
    """The report (JSON-able dict) and the arrays behind it. `ranges`: training range per target;
    truths outside it count as out of distribution. `vsini_min`: the instrumental resolution in km/s
    (v sin i accuracy is also reported for true v sin i above it). `min_match`: see `match_ids`.
    Bias is reported in `bins` bins of each true parameter, over the rows at SNR >= 30 when the truth
    has an SNR (below it noise, not the model, dominates the errors)."""
    names = [n for n in result_targets(results) if n in truth.column_names]
    if not names:
        raise CatalogError("no target is both predicted in the results and present in the truth catalog")
    results, truth = with_occurrence(results), with_occurrence(ids_like(results, truth))
    ids = match_ids(results, truth, min_match)
    keep = [ID, OCCURRENCE, *names, *(c for c in (SNR,) if c in truth.column_names)]
    truth = truth.select(keep).rename_columns([c if c in (ID, OCCURRENCE, SNR) else f"{c}_true"
                                               for c in keep])
    results = results.drop_columns([c for c in (SNR,) if c in results.column_names])
    cols = _arrays(results, truth)
    ok = _finite(cols, names, truth=True)
    y = np.stack([cols[f"{n}_true"] for n in names], 1)
    in_range = np.ones(len(y), bool)
    for k, n in enumerate(names):
        if ranges and n in ranges:
            in_range &= (y[:, k] >= ranges[n][0]) & (y[:, k] <= ranges[n][1])
    sel = ok & in_range
    a = EvalArrays(
        names=tuple(names), y=y[sel], mean=np.stack([cols[n][sel] for n in names], 1),
        sigma=np.stack([cols[f"{n}_err"][sel] for n in names], 1),
        sigma_aleatoric=np.stack([cols[f"{n}_err_aleatoric"][sel] for n in names], 1),
        sigma_epistemic=np.stack([cols[f"{n}_err_epistemic"][sel] for n in names], 1),
        snr=cols[SNR][sel] if SNR in cols else None)
    report = {"rows": {**ids, "matched": len(y), "scored": int(sel.sum()),
                       "not_finite": int((~ok).sum()), "truth_out_of_range": int((ok & ~in_range).sum())},
              "targets": {}}
    for k, n in enumerate(names):
        r = a.mean[:, k] - a.y[:, k]
        entry = summary(a.y[:, k], a.mean[:, k], a.sigma[:, k])
        high = np.ones(len(r), bool) if a.snr is None else a.snr >= BIAS_MIN_SNR
        entry["bias_in_bins"] = {p: binned_bias(a.y[high, j], r[high], a.sigma[high, k], bins)
                                 for j, p in enumerate(names)}
        if a.snr is not None:
            entry["coverage_by_snr"] = coverage_in_bins(a.snr, a.y[:, k], a.mean[:, k], a.sigma[:, k])
        if "vsini" in names:  # how much a spectrum tells depends on its line widths too
            entry["coverage_by_predicted_vsini"] = coverage_in_bins(
                a.mean[:, names.index("vsini")], a.y[:, k], a.mean[:, k], a.sigma[:, k], VSINI_EDGES, "vsini")
        report["targets"][n] = entry
    if vsini_min is not None and "vsini" in names:
        k = names.index("vsini")
        above = a.y[:, k] > vsini_min
        report["vsini_above_resolution"] = {"vsini_min": vsini_min, **{
            key: v for key, v in summary(a.y[above, k], a.mean[above, k], a.sigma[above, k]).items()
            if key != "calibration_curve"}}
    if FLAGS in cols:
        report["rows"]["flagged_high_epistemic"] = int(
            ((cols[FLAGS][sel].astype(np.int64) & int(Flag.HIGH_EPISTEMIC)) > 0).sum())
    ood_epi = _ood_sigma(cols, ok & ~in_range, names, ood_results)
    if ood_epi is not None and len(ood_epi):
        report["ood"] = _ood_report(a.sigma_epistemic, ood_epi, names)
    high_snr = np.ones(len(a.y), bool) if a.snr is None else a.snr >= RMSE_MIN_SNR
    rows = {n: high_snr & (a.y[:, k] > vsini_min) if n == "vsini" and vsini_min is not None else high_snr
            for k, n in enumerate(names)}
    report["rmse_at_high_snr"] = {
        "snr_min": None if a.snr is None else RMSE_MIN_SNR, "vsini_min": vsini_min,
        "rows": {n: int(rows[n].sum()) for n in names},
        "rmse": {n: float(np.sqrt(np.mean((a.mean[rows[n], k] - a.y[rows[n], k]) ** 2)))
                 if rows[n].any() else None for k, n in enumerate(names)}}
    report["goals"] = check_goals(report)
    return report, EvalArrays(**{**a.__dict__, "ood_sigma_epistemic": ood_epi})


def _ood_sigma(cols: dict, out_rows: np.ndarray, names: list[str], ood_results: pa.Table | None):
    parts = []
    if out_rows.any():
        parts.append(np.stack([cols[f"{n}_err_epistemic"][out_rows] for n in names], 1))
    if ood_results is not None:
        ood = _arrays(ood_results, None)
        fin = _finite(ood, names, truth=False)
        parts.append(np.stack([ood[f"{n}_err_epistemic"][fin] for n in names], 1))
    return np.concatenate(parts) if parts else None


def _ood_report(epi_in: np.ndarray, epi_out: np.ndarray, names: list[str]) -> dict:
    """AUROC per target, and for the combined score max_k(sigma_epi_k / median in-distribution)."""
    scale = np.median(epi_in, axis=0)
    combined = auroc((epi_in / scale).max(1), (epi_out / scale).max(1))
    return {"rows_in": len(epi_in), "rows_out": len(epi_out),
            "auroc_epistemic_sigma": {n: auroc(epi_in[:, k], epi_out[:, k]) for k, n in enumerate(names)},
            "auroc_combined": combined}


def check_goals(report: dict) -> dict:
    """Pass/fail of the issue's goals, with the measured values, per target (the RMSE at SNR >=
    RMSE_MIN_SNR, where the truth has an SNR; the worst bin's bias with its standard error)."""
    out = {}
    for n, t in report["targets"].items():
        rmse = report["rmse_at_high_snr"]["rmse"][n]
        worst = worst_bias(t["bias_in_bins"].values())
        g = {"coverage_68": t["coverage_68"], "coverage_68_ok": GOALS["coverage_68"][0] <= t["coverage_68"]
             <= GOALS["coverage_68"][1], "coverage_95": t["coverage_95"],
             "coverage_95_ok": GOALS["coverage_95"][0] <= t["coverage_95"] <= GOALS["coverage_95"][1],
             "worst_bin_bias_over_median_sigma": worst[0], "worst_bin_bias_se_over_median_sigma": worst[1],
             "bias_ok": bool(worst[0] < GOALS["bias_over_median_sigma"])}
        if n in GOALS["rmse"]:  # None where no row is at that SNR: neither met nor missed
            g.update(rmse=rmse, rmse_goal=GOALS["rmse"][n],
                     rmse_ok=None if rmse is None else bool(rmse <= GOALS["rmse"][n]))
        out[n] = g
    if "ood" in report:
        out["ood_auroc_ok"] = bool(report["ood"]["auroc_combined"] >= 0.9)
    return out


def run_eval(results_path: str | Path, truth_path: str | Path, out: str | Path, *,
             split: str | None = None, ood_path: str | Path | None = None,
             ranges: dict[str, tuple[float, float]] | None = None,
             vsini_min: float | None = None, min_match: float = MIN_MATCH) -> dict:
    """Read the files, evaluate, write `report.json` and the PNGs into `out`; returns the report."""
    files = results_files(results_path)
    results = read_columns(files)
    truth = read_columns(truth_path, [ID, SNR, SPLIT, *result_targets(results)])
    if split is not None:
        if SPLIT not in truth.column_names:
            raise CatalogError(f"--split {split} given, but the truth catalog has no split column",
                               file=str(truth_path))
        truth = truth.filter(pa.compute.equal(truth.column(SPLIT), split))
    truth = truth.drop_columns([c for c in (SPLIT,) if c in truth.column_names])
    ood = read_columns(results_files(ood_path)) if ood_path is not None else None
    if vsini_min is None:
        vsini_min = instrumental_resolution_kms(truth_path)
    try:
        report, arrays = evaluate(results, truth, ranges=ranges, ood_results=ood, vsini_min=vsini_min,
                                  min_match=min_match)
    except CatalogError as exc:
        raise CatalogError(exc.reason, file=f"{results_path} against {truth_path}") from None
    report["inputs"] = {"results": str(results_path), "truth": str(truth_path), "split": split,
                        "ood": None if ood_path is None else str(ood_path),
                        "predicted_from_elsewhere": predicted_from_elsewhere(files, truth_path)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.name for p in write_plots(arrays, out)]
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    return report
