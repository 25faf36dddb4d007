"""The model report's summary: the tables the README quotes, from the evaluation reports."""

from starcast.trainers.report import summary_markdown


def _bins(cover68: float) -> list[dict]:
    return [{"snr_lo": lo, "snr_hi": hi, "n": 5, "rmse": 1.0, "bias": 0.0, "coverage_68": cover68,
             "coverage_95": 0.9} for lo, hi in ((10.0, 20.0), (20.0, 30.0))]


def test_the_summary_shows_the_cross_fitted_coverage_beside_the_pooled_one():
    target = {"rmse": 1.0, "bias": 0.0, "median_sigma": 1.0, "coverage_68": 0.68, "coverage_95": 0.95,
              "coverage_by_snr": _bins(0.70)}
    ood = {"ood": {"auroc_combined": 0.95, "auroc_epistemic_sigma": {"teff": 0.95}}}
    goals = {"teff": {"worst_bin_bias_over_median_sigma": 0.1, "worst_bin_bias_se_over_median_sigma": 0.03}}
    reports = {"test": {"targets": {"teff": target}, "goals": goals}, "ood_hot": ood, "ood_snr5": ood}
    plain = summary_markdown(reports, ("test",), "test")
    crossed = summary_markdown(reports, ("test",), "test", {"teff": {"coverage_by_snr": _bins(0.61)}})
    assert "| 10-20 | 5 | 70% / 90% |" in plain and "cross-fitted" not in plain
    assert "| 0.10 +- 0.03 |" in plain
    head, tail = crossed.split("cross-fitted", 1)
    assert "| 10-20 | 5 | 70% / 90% |" in head and "| 20-30 | 5 | 61% / 90% |" in tail


def test_the_summary_shows_coverage_by_predicted_vsini_where_the_report_has_it():
    vsini_bins = [{"vsini_lo": 0.0, "vsini_hi": 40.0, "n": 7, "rmse": 1.0, "bias": 0.0, "coverage_68": 0.75,
                   "coverage_95": 0.97}]
    target = {"rmse": 1.0, "bias": 0.0, "median_sigma": 1.0, "coverage_68": 0.68, "coverage_95": 0.95,
              "coverage_by_snr": _bins(0.70), "coverage_by_predicted_vsini": vsini_bins}
    ood = {"ood": {"auroc_combined": 0.95, "auroc_epistemic_sigma": {"teff": 0.95}}}
    goals = {"teff": {"worst_bin_bias_over_median_sigma": 0.1, "worst_bin_bias_se_over_median_sigma": 0.03}}
    reports = {"test": {"targets": {"teff": target}, "goals": goals}, "ood_hot": ood, "ood_snr5": ood}
    text = summary_markdown(reports, ("test",), "test")
    assert "predicted v sin i" in text and "| 0-40 | 7 | 75% / 97% |" in text
