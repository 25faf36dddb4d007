import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from starcast.catalogs.schema import Flag
from starcast.trainers.cli import eval_
from starcast.trainers.metrics import auroc

NAMES = ("teff", "logg", "vsini")
LO, HI = np.array([15000.0, 1.75, 3.0]), np.array([30000.0, 4.75, 450.0])


def _tables(n=2000, n_out=200, seed=0):
    """Truth with some out-of-range Teff rows, and results whose epistemic sigma is larger there."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(LO, HI, size=(n, 3))
    y[:n_out, 0] = rng.uniform(32000, 40000, n_out)
    ale = np.array([300.0, 0.08, 4.0]) * rng.uniform(0.5, 1.5, size=(n, 3))
    epi = np.array([100.0, 0.03, 1.0]) * rng.uniform(0.5, 1.5, size=(n, 3))
    epi[:n_out] *= 5
    sigma = np.hypot(ale, epi)
    mean = y + sigma * rng.normal(size=(n, 3))
    ids = np.arange(n, dtype=np.int64)
    truth = pa.table({"id": ids[::-1], **{t: y[::-1, k] for k, t in enumerate(NAMES)},
                      "snr": rng.uniform(20, 300, n)[::-1],
                      "split": np.where(ids % 5 == 0, "test", "train")[::-1]})
    cols = {"id": ids}
    for k, t in enumerate(NAMES):
        cols.update({t: mean[:, k], f"{t}_err": sigma[:, k], f"{t}_err_aleatoric": ale[:, k],
                     f"{t}_err_epistemic": epi[:, k]})
    cols["flags"] = np.where(epi[:, 0] > 400, int(Flag.HIGH_EPISTEMIC), 0).astype(np.int32)
    cols["error"] = pa.nulls(n, pa.string())
    return truth, pa.table(cols), y, mean, sigma, epi


def test_eval_cli_writes_report_and_plots_matching_direct_metrics(tmp_path):
    truth, results, y, mean, sigma, epi = _tables()
    pq.write_table(truth, tmp_path / "truth.parquet")
    pq.write_table(results, tmp_path / "results.parquet")
    out = tmp_path / "report"
    ranges = dict(zip(NAMES, zip(LO, HI, strict=True), strict=True))
    from starcast.trainers.evaluate import run_eval

    report = run_eval(tmp_path / "results.parquet", tmp_path / "truth.parquet", out, ranges=ranges,
                      vsini_min=30.0)
    inside = slice(200, None)  # rows 0..199 have out-of-range teff
    r = mean[inside] - y[inside]
    assert report["rows"]["scored"] == 1800 and report["rows"]["truth_out_of_range"] == 200
    for k, t in enumerate(NAMES):
        assert report["targets"][t]["rmse"] == pytest.approx(np.sqrt(np.mean(r[:, k] ** 2)))
    assert report["ood"]["auroc_epistemic_sigma"]["teff"] == pytest.approx(
        auroc(epi[inside, 0], epi[:200, 0]))
    assert report["ood"]["auroc_combined"] > 0.9
    assert {"pred_vs_true.png", "residuals.png", "calibration.png", "kiel.png",
            "sigma_vs_snr.png", "ood_epistemic.png"} <= {p.name for p in out.iterdir()}
    written = json.loads((out / "report.json").read_text())
    goals = written["goals"]
    assert goals["teff"]["coverage_68_ok"]
    snr = truth.column("snr").to_numpy()[::-1][inside]  # the RMSE goals hold at SNR >= 100
    for k, t in enumerate(NAMES):
        rows = (snr >= 100) & ((y[inside, k] > 30.0) if t == "vsini" else True)
        assert goals[t]["rmse"] == pytest.approx(np.sqrt(np.mean(r[rows, k] ** 2)))
        assert written["rmse_at_high_snr"]["rows"][t] == rows.sum() < len(r) - 100


def test_rmse_goals_without_rows_at_high_snr_are_neither_met_nor_missed():
    from starcast.trainers.evaluate import evaluate

    truth, results, *_ = _tables(n=300, n_out=0)
    truth = truth.set_column(truth.schema.get_field_index("snr"), "snr", pa.array(np.full(300, 20.0)))
    goals = evaluate(results, truth)[0]["goals"]
    assert goals["teff"]["rmse"] is None and goals["teff"]["rmse_ok"] is None
    no_snr = evaluate(results, truth.drop_columns(["snr"]))[0]  # every row counts then
    assert no_snr["rmse_at_high_snr"]["snr_min"] is None and no_snr["goals"]["teff"]["rmse_ok"] is not None


def test_eval_cli_split_selects_truth_rows(tmp_path):
    truth, results, *_ = _tables(n=500, n_out=0)
    pq.write_table(truth, tmp_path / "truth.parquet")
    pq.write_table(results, tmp_path / "results.parquet")
    res = CliRunner().invoke(eval_, [str(tmp_path / "results.parquet"), "--truth",
                                     str(tmp_path / "truth.parquet"), "--out", str(tmp_path / "r"),
                                     "--split", "test"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["rows"]["scored"] == 100


def test_eval_cli_scores_an_ood_set_and_takes_the_resolution_given(tmp_path):
    """--ood: the AUROC of each epistemic sigma against those of another results file; --vsini-min:
    the v sin i above which its RMSE at high SNR is given."""
    truth, results, y, mean, _, epi = _tables()
    pq.write_table(truth, tmp_path / "truth.parquet")
    pq.write_table(results.slice(200), tmp_path / "results.parquet")
    pq.write_table(results.slice(0, 200), tmp_path / "ood.parquet")
    res = CliRunner().invoke(eval_, [str(tmp_path / "results.parquet"), "--truth",
                                     str(tmp_path / "truth.parquet"), "--out", str(tmp_path / "r"),
                                     "--ood", str(tmp_path / "ood.parquet"), "--vsini-min", "30",
                                     "--min-match", "0.5"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert (report["ood"]["rows_in"], report["ood"]["rows_out"]) == (1800, 200)
    for k, t in enumerate(NAMES):
        assert report["ood"]["auroc_epistemic_sigma"][t] == pytest.approx(auroc(epi[200:, k], epi[:200, k]))
    snr = truth.column("snr").to_numpy()[::-1]  # in id order
    rows = (snr >= 100) & (y[:, 2] > 30.0) & (np.arange(len(y)) >= 200)
    assert report["rmse_at_high_snr"]["vsini_min"] == 30.0 and report["rmse_at_high_snr"]["rmse"][
        "vsini"] == pytest.approx(np.sqrt(np.mean((mean[rows, 2] - y[rows, 2]) ** 2)))


def test_a_duplicated_id_pairs_its_rows_in_order_and_each_is_scored_once():
    """Ids repeated in the input are predicted once per row (in the input's order): the k-th result row
    of an id is scored against the k-th truth row of that id, not against all of them."""
    from starcast.trainers.evaluate import evaluate

    truth, results, y, mean, *_ = _tables(n=300, n_out=0)
    ids = np.arange(300) // 3  # every id three times, truth and results in the same order
    truth = pa.table({"id": pa.array(ids, pa.int32()), **{t: y[:, k] for k, t in enumerate(NAMES)}})
    results = results.set_column(0, "id", pa.array(ids, pa.int64()))  # another integer width: cast
    report = evaluate(results, truth)[0]
    assert report["rows"]["matched"] == report["rows"]["ids_matched"] == 300
    assert report["rows"]["results_repeated_ids"] == 200 and report["rows"]["truth_unmatched"] == 0
    for k, t in enumerate(NAMES):
        assert report["targets"][t]["rmse"] == pytest.approx(np.sqrt(np.mean((mean[:, k] - y[:, k]) ** 2)))
    extra = results.slice(0, 1)  # a fourth row of id 0 in the results only: unmatched, not re-paired
    report = evaluate(pa.concat_tables([results, extra]), truth)[0]
    assert report["rows"]["matched"] == 300 and report["rows"]["results_unmatched"] == 1


def test_eval_reads_the_results_of_a_runs_output_folder(tmp_path):
    from starcast.trainers.evaluate import run_eval

    truth, results, *_ = _tables(n=300, n_out=0)
    pq.write_table(truth, tmp_path / "truth.parquet")
    (tmp_path / "run" / "results").mkdir(parents=True)
    pq.write_table(results, tmp_path / "run" / "results" / "cat.parquet")
    from_folder = run_eval(tmp_path / "run", tmp_path / "truth.parquet", tmp_path / "a")
    from_file = run_eval(tmp_path / "run" / "results" / "cat.parquet", tmp_path / "truth.parquet",
                         tmp_path / "b")
    assert from_folder["rows"] == from_file["rows"] and from_folder["rows"]["matched"] == 300
    assert from_folder["targets"]["teff"]["rmse"] == from_file["targets"]["teff"]["rmse"]
