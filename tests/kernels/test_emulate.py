"""Every precision of the fused kernel on the shipped model (ob-default) with real spectra (TLUSTY
models of the shipped sample, observed by `catalogs.gridsynth` and preprocessed by `Model.prepare`),
against the float64 reference: DESIGN.md's 1% of
sigma. At scale (256 spectra) through `emulate`, the float64 model of the kernel's rounding; the
kernel itself (interpreter: 16 spectra; GPU: 256) must agree with that model to rounding order."""

import numpy as np
import pytest
import torch
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import survey_table
from starcast.engine.predictor import kernel_centre
from starcast.kernels.emulate import ensemble_stats_emulated
from starcast.kernels.packing import PRECISIONS, fitted_centre, pack_weights
from starcast.kernels.reference import ensemble_stats_reference

import starcast
from starcast.demo import SAMPLE

from .test_ensemble_mlp import triton_stats
from .triton_device import DEVICE, GPU

# Largest |error| as a fraction of sigma (mean: of the reference total sigma; sigma: of itself).
# DESIGN.md's budget is 1%. On the TLUSTY-trained ob-default (S = 1, small sigmas at high SNR) fp16 and
# tf32 meet it on every row (worst 0.87-0.94% over 1024 spectra with a centre and the split input,
# bench/results/precision_cpu.md), since the head runs in fp32 (rounding its input to 16 bits cost up
# to 2.5%).
BUDGET = 0.01


def tlusty_table(n: int, seed: int):
    """n stars of the shipped TLUSTY sample (at its nodes), v sin i 0-450, SNR 20-300."""
    return survey_table(read_grid(SAMPLE), n, at_nodes=True, seed=seed)


@pytest.fixture(scope="module")
def shipped():
    """(model, x [256, D] float32, keys, the kernel args, the float64 reference statistics)."""
    model = starcast.load_model("ob-default")
    table = tlusty_table(256, seed=11)
    prepared = model.prepare(table)
    assert prepared.column("error").null_count == 256
    ok, x, keys = model._unpack(prepared)
    x, keys = torch.from_numpy(x.copy()), torch.from_numpy(keys.copy())
    kw = model._kernel_args(model.bundle.architecture["samples"], 0)
    return model, x, keys, kw, ensemble_stats_reference(x, keys, model.bundle.layers, **kw)


def errors(got, ref):
    """(worst mean error / total sigma, worst relative error of the total sigma)."""
    mean, alea, epi = (t.double().cpu() for t in got)
    sigma = (ref[1] + ref[2]).sqrt()
    return (((mean - ref[0]).abs() / sigma).max().item(),
            (((alea + epi).sqrt() - sigma).abs() / sigma).max().item())


def packed_for(model, precision, device="cpu"):
    return pack_weights(model.bundle.layers, precision, device, centre=kernel_centre(model.bundle))


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_every_precision_on_256_shipped_spectra_through_the_rounding_model(shipped, precision):
    model, x, keys, kw, ref = shipped
    mean_err, sigma_err = errors(ensemble_stats_emulated(x, keys, packed_for(model, precision), **kw), ref)
    assert mean_err <= BUDGET and sigma_err <= BUDGET, (mean_err, sigma_err)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_kernel_agrees_with_the_rounding_model_on_the_shipped_model(shipped, precision):
    """What makes the 256-spectrum check above a check of the kernel: same packed weights, the
    kernel's statistics within 0.1% of sigma of the emulator's (measured <= 0.03%: fp32 summation
    order), and within the budget of the reference."""
    model, x, keys, kw, ref = shipped
    rows = slice(0, 256 if GPU else 16)
    kw = kw if GPU else {**kw, "samples": 8}  # the interpreter: fewer spectra and samples
    ref = ref if GPU else ensemble_stats_reference(x[rows], keys[rows], model.bundle.layers, **kw)
    packed = packed_for(model, precision)
    got = triton_stats(x[rows], keys[rows], packed_for(model, precision, DEVICE), precision=precision, **kw)
    emulated = ensemble_stats_emulated(x[rows], keys[rows], packed, **kw)
    assert errors(got, tuple(t.double() for t in emulated))[0] <= 0.001
    mean_err, sigma_err = errors(got, ref)
    assert mean_err <= BUDGET and sigma_err <= BUDGET, (mean_err, sigma_err)


def test_the_stored_and_the_fitted_centre_are_near_the_mean_input(shipped):
    """ob-default stores its training mean as input_centre (what the kernel subtracts); for bundles
    without one, the fit from W1, b1 alone lands near the mean of real inputs too (measured 0.02 rms on
    these spectra; 1.0, the continuum, is further from the spectra and 1 dex from the log10_snr input)."""
    model, x, *_ = shipped
    mean = x.double().mean(dim=0)
    stored = torch.from_numpy(model.bundle.input_centre)
    np.testing.assert_array_equal(kernel_centre(model.bundle), model.bundle.input_centre)
    assert (stored - mean).pow(2).mean().sqrt().item() < 0.02
    fitted = fitted_centre(*model.bundle.layers[0])
    assert (fitted - mean).pow(2).mean().sqrt().item() < 0.03 and np.isfinite(fitted.numpy()).all()


def test_engine_triton_backend_matches_reference_on_the_shipped_model(shipped):
    """`predict(backend="triton")` as users call it (fp16, the model's centre) within DESIGN.md's 1%
    of the reported (calibrated) sigma, on every row."""
    model, x, keys, *_ = shipped
    rows = 256 if GPU else 12
    table = tlusty_table(rows, seed=12)
    samples = None if GPU else 4
    ref = model.predict(table, backend="reference", samples=samples)
    tri = model.predict(table, backend="triton", samples=samples)
    for t in model.targets:
        sigma = ref.column(f"{t.name}_err").to_numpy()
        assert (np.abs(tri.column(t.name).to_numpy() - ref.column(t.name).to_numpy()) <= 0.01 * sigma).all()
        assert (np.abs(tri.column(f"{t.name}_err").to_numpy() - sigma) <= 0.01 * sigma).all()
