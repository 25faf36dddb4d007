from dataclasses import replace

import numpy as np
import pytest
import torch
from starcast.trainers.config import ArchitectureConfig, TrainingConfig
from starcast.trainers.ensemble import EnsembleMLP
from starcast.trainers.export import export_layers
from starcast.trainers.train import Standardiser, train_ensemble

ARCH = ArchitectureConfig(hidden=(32, 32), dropout=0.1, members=3, samples=4)


def _train(toy, epochs, arch=ARCH):
    x, y, _ = toy
    cfg = TrainingConfig(epochs=epochs, batch_size=64, lr=3e-3, seeds=(0, 1, 2), patience=100, threads=1,
                         warmup_epochs=1)
    rng = np.random.default_rng(9)  # one noisier copy: extra white noise at SNR 30
    noisy = (x[:800] + rng.normal(size=x[:800].shape) / 30.0).astype(np.float32)[None]
    return train_ensemble(x[:800], y[:800], x[800:], y[800:], arch, cfg, x_noisy=noisy, progress=False)


@pytest.mark.parametrize("rank", [0, 16])
def test_tiny_training_lowers_validation_nll(toy, rank):
    result = _train(toy, epochs=8, arch=replace(ARCH, input_rank=rank))
    nll = [row["val_nll"] for row in result.history]
    assert nll[-1] < nll[0] - 0.5
    assert len(result.best_epochs) == 3 and all(1 <= e <= 8 for e in result.best_epochs)


def test_members_differ_and_training_is_reproducible(toy):
    a, b = _train(toy, epochs=2), _train(toy, epochs=2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    w = a.model.weights[0]
    assert not torch.allclose(w[0], w[1])


def _numpy_forward(layers, x, masks, p):
    """DESIGN.md's numerics in float64 numpy, independent of the torch module."""
    h = np.maximum(np.einsum("bd,mdh->mbh", x, layers[0][0].double().numpy())
                   + layers[0][1].double().numpy()[:, None], 0)
    for i, (w, b) in enumerate(layers[1:], start=1):
        h = (h * masks[i - 1] / (1 - p)) @ w.double().numpy() + b.double().numpy()[:, None]
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    k = h.shape[-1] // 2
    return h[..., :k], np.logaddexp(0, h[..., k:]) + ARCH.var_eps


@pytest.mark.parametrize(("rank", "whiten", "probes"), [(0, False, 0), (8, False, 0), (8, True, 0),
                                                       (8, False, 4)])
def test_export_folds_standardisation_into_first_layer(toy, rank, whiten, probes):
    x, y, _ = toy
    std = Standardiser.fit(x, y, rank, whiten=whiten, probes=probes)
    model = EnsembleMLP(std.projection.shape[1], ARCH.hidden, 3, (0, 1, 2), dropout=ARCH.dropout)
    with torch.no_grad():  # non-trivial biases, so the fold of b1 is exercised
        for b in model.biases:
            b.normal_(0, 0.3)
    rng = np.random.default_rng(1)
    masks = [rng.random((3, 50, 32)) >= ARCH.dropout for _ in range(2)]
    mu, var = model.rest(model.first_layer(std.x(x[:50])),
                         [torch.from_numpy(m.astype(np.float32)) for m in masks])
    layers = export_layers(model, std)
    mu_ref, var_ref = _numpy_forward(layers, x[:50].astype(np.float64), masks, ARCH.dropout)
    np.testing.assert_allclose(mu.detach().numpy(), mu_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(var.detach().numpy(), var_ref, rtol=1e-4, atol=1e-5)


def test_whitened_projection_gives_unit_variance_inputs(toy):
    x, y, _ = toy
    xs = Standardiser.fit(x, y, 8, whiten=True).x(x).double()
    np.testing.assert_allclose(xs.pow(2).mean(0).numpy(), 1.0, rtol=1e-3)
    np.testing.assert_allclose(xs.mean(0).numpy(), 0.0, atol=1e-3)


def test_noise_probes_are_orthogonal_to_the_components_and_track_the_noise(make_toy):
    x, y, snr = make_toy(1000, d=200)
    std = Standardiser.fit(x, y, 16, probes=8)
    unit = std.projection / np.linalg.norm(std.projection, axis=0)
    np.testing.assert_allclose(unit[:, :16].T @ unit[:, 16:], 0.0, atol=1e-5)
    xs = std.x(x).double().numpy()
    np.testing.assert_allclose((xs[:, 16:] ** 2).mean(0), 1.0, rtol=1e-3)
    assert np.corrcoef(np.abs(xs[:, 16:]).mean(1), 1 / snr)[0, 1] > 0.7
