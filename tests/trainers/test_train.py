from dataclasses import replace

import numpy as np
import pytest
import torch
from starcast.trainers.config import ArchitectureConfig, TrainingConfig
from starcast.trainers.ensemble import EnsembleMLP
from starcast.trainers.export import export_layers
from starcast.trainers.train import Standardiser, estimate_noise_per_snr, train_ensemble

ARCH = ArchitectureConfig(hidden=(32, 32), dropout=0.1, members=3, samples=4)


def _train(toy, epochs, arch=ARCH):
    x, y, snr = toy
    cfg = TrainingConfig(epochs=epochs, batch_size=64, lr=3e-3, seeds=(0, 1, 2), patience=100, threads=1,
                         warmup_epochs=1)
    return train_ensemble(x[:800], y[:800], x[800:], y[800:], arch, cfg, snr_train=snr[:800],
                          progress=False)


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


@pytest.mark.parametrize("rank", [0, 8])
def test_export_folds_standardisation_into_first_layer(toy, rank):
    x, y, _ = toy
    std = Standardiser.fit(x, y, rank)
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


def test_noise_estimate_recovers_injected_noise(make_toy):
    x, _, snr = make_toy(400, d=400)
    assert abs(estimate_noise_per_snr(x, snr) - 1.0) < 0.1
