"""`Emulator.refine`'s steps on the shipped model's emulator: without chord steps the fit is Gauss-Newton
steps one after the other; with chord steps only, the Jacobian and errors stay the first step's; a
partial share blends the two steps; each row is fitted as if alone (the rows that take a new Gauss-Newton
step are fitted as a subset)."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import synth_from_grid
from starcast.engine import emulator as emu

import starcast
from starcast.demo import SAMPLE


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(emulator, x, weight, labels, lo, hi) of 12 TLUSTY rows, from labels off by 0.003-1 std, so that
    the chord step is small on some rows, blended on some and far on others."""
    out = tmp_path_factory.mktemp("c") / "catalog"
    synth_from_grid(read_grid(SAMPLE), 12, out, at_nodes=True, seed=3, snr=(20.0, 300.0))
    model = starcast.load_model()
    prepared = model.prepare(pq.read_table(out))
    _, x, _, fit, ivar, *_ = model._inputs_as_predicted(prepared, model._samples(None), 0, "cpu")
    e = model.emulator
    lo, hi = model._label_range(e.labels)
    rng = np.random.default_rng(1)
    off = rng.normal(size=fit.labels.shape) * e.label_std * np.geomspace(0.003, 1.0, len(x))[:, None]
    return (e, x[:, :len(e.sigma)].astype(np.float32), e.pixel_weight(ivar, fit.sigma_factor),
            np.clip(fit.labels + off, lo, hi), lo, hi)


def _refine(e, steps, x, weight, labels, rv, lo, hi, **kw):
    return dataclasses.replace(e, refine_steps=steps).refine(x, weight, labels, rv, lo, hi, **kw)


def test_without_chord_steps_the_fit_is_gauss_newton_steps_one_after_the_other(start, monkeypatch):
    e, x, weight, labels, lo, hi = start
    monkeypatch.setattr(emu, "CHORD_STEP_MAX", 1e-12)
    rv = np.zeros(len(x))
    for _ in range(3):
        labels, rv, errors, jac = _refine(e, 1, x, weight, labels, rv, lo, hi)
    got = _refine(e, 3, x, weight, start[3], np.zeros(len(x)), lo, hi)
    for a, b in zip(got, (labels, rv, errors, jac), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_with_chord_steps_alone_the_jacobian_and_errors_stay_the_first_steps(start, monkeypatch):
    e, x, weight, labels, lo, hi = start
    monkeypatch.setattr(emu, "CHORD_STEP_MAX", np.inf)
    rv = np.zeros(len(x))
    one, two, three = (_refine(e, n, x, weight, labels, rv, lo, hi) for n in (1, 2, 3))
    for later in (two, three):
        np.testing.assert_array_equal(later[2], one[2])
        np.testing.assert_array_equal(later[3], one[3])
    assert not np.array_equal(two[0], one[0]) and not np.array_equal(three[0], two[0])  # the steps moved


def test_a_partial_share_blends_the_chord_and_the_gauss_newton_step(start, monkeypatch):
    """The second step moves the labels by the share's part of the way from the chord step's to the
    Gauss-Newton step's labels, and the errors and Jacobian are the Gauss-Newton step's."""
    e, x, weight, labels, lo, hi = start
    rv = np.linspace(-20.0, 20.0, len(x))

    def at(share):
        monkeypatch.setattr(emu, "full_step_share", lambda size: np.full(np.shape(size), share))
        return _refine(e, 2, x, weight, labels, rv, lo, hi)

    chord, full, blend = at(0.0), at(1.0), at(0.25)
    np.testing.assert_allclose(blend[0], 0.75 * chord[0] + 0.25 * full[0], rtol=1e-12)
    np.testing.assert_allclose(blend[1], 0.75 * chord[1] + 0.25 * full[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(blend[2], full[2])
    np.testing.assert_array_equal(blend[3], full[3])


@pytest.mark.parametrize("veil", [False, True])
def test_each_row_is_fitted_as_if_alone(start, veil):
    """Three steps with a ripple's continuum terms (and light without lines): each row's labels within
    0.05 sigma of the row fitted alone (the float32 emulator's products differ by up to ~0.03 sigma with
    the batch's size), its errors and Jacobian within 1%; a row mixed up with another is far off."""
    e, x, weight, labels, lo, hi = start
    rv = np.linspace(-20.0, 20.0, len(x))
    extra = e.defect_columns(np.full(len(x), 1 / 37.0))
    whole = _refine(e, 3, x, weight, labels, rv, lo, hi, extra=extra, veil=veil)
    for i in range(len(x)):
        r = slice(i, i + 1)
        labels_i, rv_i, errors_i, jac_i = _refine(e, 3, x[r], weight[r], labels[r], rv[r], lo, hi,
                                                  extra=extra[r], veil=veil)
        moved = np.append(labels_i[0] - whole[0][i], rv_i[0] - whole[1][i]) / whole[2][i]
        assert np.abs(moved).max() < 0.05, (i, moved)
        np.testing.assert_allclose(errors_i[0], whole[2][i], rtol=0.01)
        np.testing.assert_allclose(jac_i[:, 0], whole[3][:, i], rtol=0, atol=0.01 * np.abs(jac_i).max())
