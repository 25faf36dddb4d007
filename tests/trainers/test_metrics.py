import numpy as np
import pytest
import scipy.stats
import uncertainty_toolbox as uct
from sklearn.metrics import roc_auc_score
from starcast.trainers.metrics import auroc, binned_bias, coverage, coverage_in_bins, summary, worst_bias


@pytest.fixture(scope="module")
def preds():
    rng = np.random.default_rng(3)
    n = 3000
    sigma = rng.uniform(0.2, 3.0, n)
    mean = rng.normal(10, 5, n)
    y = mean + 1.3 * sigma * rng.standard_t(5, n) + 0.1
    return y, mean, sigma


def test_summary_agrees_with_uncertainty_toolbox(preds):
    y, mean, sigma = preds
    ours = summary(y, mean, sigma)
    acc = uct.metrics_accuracy.prediction_error_metrics(mean, y)
    assert ours["rmse"] == pytest.approx(acc["rmse"], rel=1e-12)
    assert ours["mae"] == pytest.approx(acc["mae"], rel=1e-12)
    assert ours["nll"] == pytest.approx(uct.metrics_scoring_rule.nll_gaussian(mean, sigma, y), rel=1e-10)
    assert ours["sharpness"] == pytest.approx(uct.metrics_calibration.sharpness(sigma), rel=1e-12)
    mace = uct.metrics_calibration.mean_absolute_calibration_error(mean, sigma, y, num_bins=100,
                                                                    vectorized=True)
    assert ours["calibration_error"] == pytest.approx(mace, abs=1e-9)
    exp, obs = uct.metrics_calibration.get_proportion_lists_vectorized(mean, sigma, y, num_bins=100)
    np.testing.assert_allclose(ours["calibration_curve"]["observed"], obs, atol=1e-4)
    assert ours["bias"] == pytest.approx(np.mean(mean - y))


def test_coverage_hand_computed_case():
    y = np.zeros(4)
    mean = np.array([0.5, 0.99, 1.5, -3.0])
    sigma = np.ones(4)
    assert coverage(y, mean, sigma, 0.68) == 0.5  # |z| <= 0.994: the first two
    assert coverage(y, mean, sigma, 0.95) == 0.75  # |z| <= 1.960: all but the last


def test_coverage_in_bins_of_snr_separates_narrow_low_snr_sigmas_from_wide_high_snr_ones():
    snr = np.array([20.0, 25.0, 250.0, 280.0])
    y = np.zeros(4)
    mean = np.array([2.0, -3.0, 0.1, -0.2])  # the low-SNR rows miss by 2-3 sigma, the others do not
    bins = coverage_in_bins(snr, y, mean, np.ones(4))
    assert [(b["snr_lo"], b["n"], b["coverage_68"], b["coverage_95"]) for b in bins] == [
        (20.0, 2, 0.0, 0.0), (200.0, 2, 1.0, 1.0)]
    assert [b["rmse"] for b in bins] == pytest.approx([np.sqrt(6.5), np.sqrt(0.025)])
    assert [b["bias"] for b in bins] == pytest.approx([-0.5, -0.05])


def test_binned_bias_hand_computed_case():
    param = np.repeat([0.0, 1.0], 20)
    residual = np.repeat([0.2, -1.0], 20)
    sigma = np.ones(40)
    bins = binned_bias(param, residual, sigma, bins=2)
    assert [b["bias"] for b in bins] == pytest.approx([0.2, -1.0])
    assert [b["ok"] for b in bins] == [True, False]


def test_binned_bias_standard_error_is_that_of_a_mean():
    rng = np.random.default_rng(3)
    residual = rng.normal(0.0, 2.0, 400)
    (only,) = binned_bias(np.zeros(400), residual, np.ones(400), bins=1)
    assert only["bias_se"] == pytest.approx(scipy.stats.sem(residual), rel=1e-12)
    assert only["bias_se"] == pytest.approx(0.1, rel=0.1)


def test_worst_bias_is_the_largest_over_every_parameters_bins_in_units_of_their_sigma():
    first = [{"bias": 0.2, "bias_se": 0.1, "median_sigma": 1.0},
             {"bias": -3.0, "bias_se": 1.0, "median_sigma": 10.0}]
    second = [{"bias": 0.5, "bias_se": 0.4, "median_sigma": 2.0}]
    assert worst_bias([first, second]) == pytest.approx((0.3, 0.1))  # |-3| / 10 beats 0.5 / 2
    assert np.isnan(worst_bias([[], []])).all()


def test_auroc_agrees_with_sklearn_including_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10, 300).astype(float), rng.integers(3, 14, 200).astype(float)
    ref = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(ref, rel=1e-12)
