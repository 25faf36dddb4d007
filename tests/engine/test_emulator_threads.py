"""The emulator fit's chunks of rows run side by side on threads, each with one BLAS thread
(`Emulator.chi2`): the same fit as the same chunks one after the other, on the shipped emulator's own
spectra, clean and with what makes it fit again; never chunk threads that each run BLAS on several."""

import threading
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pytest
from starcast.catalogs.io import write_catalog
from starcast.engine import emulator as module
from starcast.engine import pipeline
from starcast.engine.run import run
from threadpoolctl import threadpool_limits

import starcast

ROWS = 48


@pytest.fixture(scope="module")
def fit_input():
    """(emulator, x [ROWS, D], ivar, start labels): emulated spectra at SNR 150 around the labels' mean,
    a third clean, a third behind 10% of light without lines and a third under a 2% ripple, fitted from
    labels a tenth of a std off."""
    emulator = starcast.load_model().emulator
    rng = np.random.default_rng(5)
    labels = emulator.label_mean + rng.uniform(-1.0, 1.0, (ROWS, len(emulator.labels))) * emulator.label_std
    labels[:, emulator.labels.index("vsini")] = rng.uniform(30.0, 300.0, ROWS)
    x = emulator.spectra(labels).astype(np.float64)
    third = ROWS // 3
    x[third:2 * third] = (x[third:2 * third] + 0.1) / 1.1
    x[2 * third:] *= 1.0 + 0.02 * np.sin(2.0 * np.pi * emulator.wavelength / 40.0)
    x = (x + rng.normal(0.0, 1.0 / 150.0, x.shape)).astype(np.float32)
    return emulator, x, np.full_like(x, 150.0**2), labels + 0.1 * emulator.label_std


@pytest.fixture
def seen(monkeypatch):
    """[(thread id, BLAS threads)] of every `refine` call, one per chunk fitted (and per refit)."""
    calls, refine = [], module.Emulator.refine

    def spy(self, *args, **kwargs):
        calls.append((threading.get_ident(), module._blas_threads()))
        return refine(self, *args, **kwargs)
    monkeypatch.setattr(module.Emulator, "refine", spy)
    return calls


def _serial_in_chunks_of_two_threads(fit_input, monkeypatch):
    """The fit with the chunks two threads would get, one after the other, BLAS on one thread."""
    emulator, x, ivar, start = fit_input
    with threadpool_limits(1, user_api="blas"), monkeypatch.context() as patch:
        patch.setattr(module, "_blas_threads", lambda: 2)
        with module._BLAS_LIMIT:  # another fit holds the limit: this one runs its chunks in turn
            return emulator.chi2(x, ivar, start)


def _same(a, b, exact: bool) -> None:
    """Fits `a` and `b` alike: bit for bit, or (BLAS on another number of threads, whose products
    round differently) the labels and rv within 1% of their sigmas (DESIGN's tolerance for a faster
    path), the rest within 1e-3 of itself."""
    for f in fields(a):
        mine, theirs = getattr(a, f.name), getattr(b, f.name)
        if exact:
            np.testing.assert_array_equal(mine, theirs, err_msg=f.name)
        elif f.name in ("labels", "rv"):
            sigma = b.label_err if f.name == "labels" else b.rv_err
            np.testing.assert_array_less(np.abs(mine - theirs), 0.01 * sigma, err_msg=f.name)
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-9, err_msg=f.name)


def test_chunks_on_threads_fit_as_one_after_the_other(fit_input, seen, monkeypatch):
    emulator, x, ivar, start = fit_input
    serial = _serial_in_chunks_of_two_threads(fit_input, monkeypatch)
    assert np.isfinite(serial.veiling).all() and (serial.veil > 0).any() and (serial.ripple_excess > 0).any()
    seen.clear()
    with threadpool_limits(2, user_api="blas"):
        if module._blas_threads() < 2:
            pytest.skip("one core: no threads to fit on")
        threaded = emulator.chi2(x, ivar, start)
        assert module._blas_threads() == 2  # the fit restored the limit it found
    assert len({thread for thread, _ in seen}) == 2 and {blas for _, blas in seen} == {1}, seen
    _same(threaded, serial, exact=True)


def test_a_fit_off_the_thread_that_limits_blas_never_oversubscribes(fit_input, seen, monkeypatch):
    """A caller's thread limits BLAS, the fit runs in another (as `starcast run` did before its
    inference thread set the limit). Where that thread may not set the limit (threadpoolctl's rule for
    BLAS's own thread pool), its chunks run in turn."""
    emulator, x, ivar, start = fit_input
    serial = _serial_in_chunks_of_two_threads(fit_input, monkeypatch)
    seen.clear()
    out = {}
    with threadpool_limits(2, user_api="blas"):
        if module._blas_threads() < 2:
            pytest.skip("one core: no threads to fit on")
        worker = threading.Thread(target=lambda: out.update(fit=emulator.chi2(x, ivar, start)))
        worker.start()
        worker.join()
        assert module._blas_threads() == 2
    assert len({thread for thread, _ in seen}) == 1 or {blas for _, blas in seen} == {1}, seen
    _same(out["fit"], serial, exact=False)


def test_starcast_run_fits_its_chunks_side_by_side_on_the_inference_cores(fit_input, seen, monkeypatch,
                                                                          tmp_path):
    """On the CPU the local pipeline gives inference its share of the cores: its thread limits BLAS to
    them, so that its fit may lower the limit and run its chunks on them, one BLAS thread each."""
    emulator, x, ivar, _ = fit_input
    if module._blas_threads() < 2:
        pytest.skip("one core: no threads to fit on")
    monkeypatch.setattr(pipeline, "thread_budget", lambda backend, workers=1: (1, 2))
    flux = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    noise = pa.FixedSizeListArray.from_arrays(pa.array((1.0 / np.sqrt(ivar)).ravel()), x.shape[1])
    write_catalog(pa.table({"id": np.arange(len(x)), "flux": flux, "flux_err": noise}),
                  tmp_path / "cat.parquet", grid=starcast.load_model().grid)
    manifest = run(tmp_path / "cat.parquet", tmp_path / "out", backend="cpu", progress=False)
    assert manifest["totals"]["rows_out"] == len(x)
    assert len({thread for thread, _ in seen}) == 2 and {blas for _, blas in seen} == {1}, seen
