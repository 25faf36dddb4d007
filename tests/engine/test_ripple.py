"""The emulator fit's ripple statistic against an independent float64 least-squares fit of a sinusoid:
the largest chi^2 drop over the periodogram's frequencies, as numpy.linalg.lstsq computes it."""

import numpy as np
from starcast.engine.emulator import RIPPLE_PERIODS, RIPPLE_REFINE

import starcast


def lstsq_drop(residual, weight, wavelength, period):
    """chi^2 of `residual` less that after the best weighted fit of a sin + b cos at `period`."""
    phase = 2 * np.pi * (wavelength - wavelength[0]) / period
    basis = np.stack([np.sin(phase), np.cos(phase)], axis=1) * np.sqrt(weight)[:, None]
    target = residual * np.sqrt(weight)
    coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
    return float(target @ target - (target - basis @ coef) @ (target - basis @ coef))


def test_the_ripple_statistic_is_the_chi2_a_sinusoid_removes():
    emulator = starcast.load_model().emulator
    wl = emulator.wavelength
    rng = np.random.default_rng(3)
    sigma = 0.01
    weight = np.full(len(wl), 1 / sigma**2)
    weight[rng.random(len(wl)) < 0.05] = 0.0  # masked pixels are left out
    period = 50.0
    noise = rng.normal(0.0, sigma, (2, len(wl)))
    residual = noise + np.array([[0.0], [0.005]]) * np.sin(2 * np.pi * wl / period + 0.7)
    stat, freq = emulator.ripple(residual.astype(np.float32), np.tile(weight, (2, 1)).astype(np.float32),
                                 np.ones(2))
    # the periodogram's best frequency is within half a grid step of 50 A: within ~20% of the exact drop
    exact = lstsq_drop(residual[1], weight, wl, period)
    assert 0.8 * exact <= stat[1] <= 1.01 * max(lstsq_drop(residual[1], weight, wl, p)
                                                 for p in np.linspace(*RIPPLE_PERIODS, 2000))
    assert exact > 150 and stat[0] < 30  # 0.5% at SNR 100: N (A / sigma)^2 / 4 ~ 230; noise: < 30
    assert stat[1] > 10 * stat[0]


def test_the_fitted_ripples_frequency_is_the_best_near_the_periodograms_peak():
    """`ripple_frequency` refines the periodogram's frequency to within one step of its finer grid
    of the period that a dense float64 least-squares scan finds best, and removes >= 99% of its drop."""
    emulator = starcast.load_model().emulator
    wl = emulator.wavelength
    rng = np.random.default_rng(5)
    weight = np.full(len(wl), 1 / 0.01**2)
    residual = rng.normal(0.0, 0.01, len(wl)) + 0.004 * np.sin(2 * np.pi * wl / 47.3 + 2.1)
    r32, w32 = residual[None].astype(np.float32), weight[None].astype(np.float32)
    _, coarse = emulator.ripple(r32, w32, np.ones(1))
    fine = emulator.ripple_frequency(r32, w32, coarse)[0]
    periods = np.linspace(40.0, 55.0, 3001)
    drops = [lstsq_drop(residual, weight, wl, p) for p in periods]
    step = np.diff(emulator._ripple_frequencies)[0] / RIPPLE_REFINE
    assert abs(fine - 1 / periods[np.argmax(drops)]) <= step
    assert lstsq_drop(residual, weight, wl, 1 / fine) >= 0.99 * max(drops) > 1.01 * lstsq_drop(
        residual, weight, wl, 1 / coarse[0])


def test_each_row_gets_the_best_of_its_own_candidates():
    """Rows of different ripples and masks, refined together: each row's frequency is the candidate
    (its periodogram frequency plus the finer grid's offsets) whose sinusoid a float64 least-squares
    fit of that row finds best (or one within 1e-6 of its drop)."""
    emulator = starcast.load_model().emulator
    wl = emulator.wavelength
    rng = np.random.default_rng(8)
    periods = np.array([18.0, 33.3, 47.3, 61.0, 95.0, 140.0])
    weight = np.full((len(periods), len(wl)), 1 / 0.01**2)
    weight[rng.random(weight.shape) < 0.1] = 0.0
    for row, start in enumerate(rng.integers(0, len(wl) - 300, len(periods))):
        weight[row, start:start + 300] = 0.0  # a gap of 60 A
    residual = rng.normal(0.0, 0.01, weight.shape) + 0.003 * np.sin(
        2 * np.pi * wl[None] / periods[:, None] + rng.uniform(0, 2 * np.pi, (len(periods), 1)))
    r32, w32 = residual.astype(np.float32), weight.astype(np.float32)
    _, coarse = emulator.ripple(r32, w32, np.ones(len(periods)))
    fine = emulator.ripple_frequency(r32, w32, coarse)
    step = np.diff(emulator._ripple_frequencies)[0]
    offsets = step * np.arange(-(RIPPLE_REFINE // 2), RIPPLE_REFINE // 2 + 1) / RIPPLE_REFINE
    for row in range(len(periods)):
        candidates = coarse[row] + offsets
        drops = np.array([lstsq_drop(residual[row], weight[row], wl, 1 / f) for f in candidates])
        assert np.isclose(fine[row], candidates).any()
        assert lstsq_drop(residual[row], weight[row], wl, 1 / fine[row]) >= drops.max() * (1 - 1e-6), row
        assert abs(1 / fine[row] - periods[row]) < 0.05 * periods[row]
