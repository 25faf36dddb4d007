"""Which pixels drive an estimate: integrated gradients (Sundararajan et al. 2017, ICML) of a model's
predicted mean of each target with respect to the pixels of the preprocessed spectrum.

The explained function is the deployed predictive mean in the target's unit: the average of mu over
the M members and S dropout samples on the spectrum's own masks (exactly what `predict` averages,
before v sin i is clipped at its physical minimum; calibration scales sigmas only). The path runs from
the continuum (flux 1 on every pixel, the input features such as `log10_snr` held at the spectrum's
own values, so their attribution is zero and all of f(x) - f(baseline) lands on pixels) to the
spectrum, with Gauss-Legendre quadrature. Methods: "ig" (torch, all targets from one forward pass per
path point) and "captum" (Captum's `IntegratedGradients`, one call per target); same numbers, see
`bench/explain_bench.py` for their speed. Plots and the survey view live in `explain_report.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..catalogs.schema import ERROR, FLAGS, ID
from ..errors import StarcastError
from ..kernels import rng
from ..kernels.reference import ACTIVATIONS

METHODS = ("ig", "captum")
DEFAULT_STEPS = 32  # quadrature points on the path, doubled for rows that miss completeness by > tol
MAX_STEPS = 1024
COMPLETENESS_TOL = 0.01  # attributions sum to f(x) - f(baseline) within this fraction of it
_PATH_ROWS = 4096  # rows (spectra x path points) per forward pass: bounds memory (~200 MB at D = 2000)


@dataclass(frozen=True)
class Explanation:
    """Attributions of B spectra. `attributions` [B, K, D] float32, in each target's unit per pixel
    (NaN for rows that could not be predicted, see `errors`); `prediction` and `baseline` [B, K] are
    f(x) and f(continuum), so a row's attributions sum to their difference (`completeness_error`)."""

    ids: list
    targets: list[str]
    units: list[str]
    wavelength: np.ndarray  # (D,) model grid, Angstrom, in `medium` ("air" or "vacuum")
    medium: str
    flux: np.ndarray  # (B, D) the preprocessed (continuum-normalised) flux the network saw
    attributions: np.ndarray
    prediction: np.ndarray
    baseline: np.ndarray
    flags: np.ndarray
    errors: list[str | None]
    method: str
    steps: int

    def completeness_error(self) -> np.ndarray:
        """|sum of attributions - (f(x) - f(baseline))| / |f(x) - f(baseline)|, [B, K]."""
        gap = self.prediction - self.baseline
        return np.abs(self.attributions.astype(np.float64).sum(axis=2) - gap) / np.abs(gap)


@dataclass(frozen=True)
class MeanFunction:
    """The predictive mean of selected targets as a differentiable torch function of prepared rows.
    `masks[l]` [B, M, S, H_l] are the keep masks of hidden layer l+2 of each row (empty when p = 0)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    masks: list[torch.Tensor]
    p: float
    activation: str
    label_mean: torch.Tensor  # (K_sel,)
    label_std: torch.Tensor  # (K_sel,)
    columns: list[int]  # head columns of the selected targets' means

    def __call__(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """f(x) [N, K_sel] for N prepared rows x [N, D + E]; `row` [N] indexes the masks."""
        act = ACTIVATIONS[self.activation]
        w1, b1 = self.layers[0]
        h = act(torch.einsum("nd,mdh->mnh", x, w1) + b1[:, None])[:, :, None]  # [M, N, 1, H]
        scale = rng.dropout_scale(self.p)
        for layer, (w, b) in enumerate(self.layers[1:]):
            if self.p > 0:
                h = h * self.masks[layer][row].permute(1, 0, 2, 3) * scale  # [M, N, S, H]
            h = torch.einsum("mnsh,mho->mnso", h, w) + b[:, None, None]
            if layer < len(self.layers) - 2:
                h = act(h)
        mu = h[..., self.columns].mean(dim=(0, 2))  # [N, K_sel]
        return mu * self.label_std + self.label_mean


def mean_function(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, targets: list[int], p: float,
                  activation: str, label_mean: Sequence[float], label_std: Sequence[float],
                  keys: np.ndarray | None = None, samples: int = 1, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> MeanFunction:
    """The mean of `targets` (indices among the head's K) in physical units, on the dropout masks of
    rows with RNG `keys` (needed when p > 0), computed in `dtype`."""
    layers = [(w.to(dtype), b.to(dtype)) for w, b in layers]
    masks = []
    if p > 0:
        if keys is None:
            raise ValueError("a dropout model needs the rows' RNG keys to reproduce their masks")
        rows, members = rng.row_keys(seed, torch.as_tensor(keys)), range(layers[0][0].shape[0])
        masks = [rng.keep_masks(rows, members, range(samples), layer, w.shape[1], p).to(dtype)
                 for layer, (w, _) in enumerate(layers[1:], start=1)]
    std = torch.as_tensor([label_std[k] for k in targets], dtype=dtype)
    mean = torch.as_tensor([label_mean[k] for k in targets], dtype=dtype)
    return MeanFunction(layers, masks, float(p), activation, mean, std, list(targets))


def continuum_baseline(x: np.ndarray, pixels: int) -> np.ndarray:
    """The baseline of prepared rows x [B, D + E]: flux 1 on the D pixels, the features unchanged."""
    base = np.array(x, copy=True)
    base[:, :pixels] = 1.0
    return base


def integrated_gradients(f: MeanFunction, x: np.ndarray, baseline: np.ndarray, *, steps: int = DEFAULT_STEPS,
                         method: str = "ig", tol: float = COMPLETENESS_TOL,
                         max_steps: int = MAX_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attributions [B, K_sel, D + E], f(x) [B, K_sel], f(baseline) [B, K_sel]), float64, for prepared
    rows x with their `baseline`. Rows whose attributions miss f(x) - f(baseline) by more than `tol`
    of it (a ReLU network's path crosses kinks the quadrature may straddle) are redone with twice the
    steps, up to `max_steps` (where f(x) ~ f(baseline) the relative miss may stay above `tol`; see
    `Explanation.completeness_error`). Rows go through in chunks of ~_PATH_ROWS path points."""
    if method not in METHODS:
        raise StarcastError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    if steps < 1:
        raise StarcastError(f"steps must be >= 1, got {steps}")
    dtype = f.label_std.dtype
    x, baseline = torch.tensor(x, dtype=dtype), torch.tensor(baseline, dtype=dtype)
    n, k = x.shape[0], len(f.columns)
    attr = np.empty((n, k, x.shape[1]), dtype=np.float64)
    with torch.no_grad():
        fx, fb = f(x, torch.arange(n)).double().numpy(), f(baseline, torch.arange(n)).double().numpy()
    todo = np.arange(n)
    while len(todo) and steps <= max_steps:
        chunk = max(1, _PATH_ROWS // steps)
        for start in range(0, len(todo), chunk):
            rows = torch.as_tensor(todo[start:start + chunk])
            run = _ig_torch if method == "ig" else _ig_captum
            attr[rows] = run(f, x[rows], baseline[rows], rows, steps)
        gap = fx[todo] - fb[todo]
        redo = (np.abs(attr[todo].sum(axis=2) - gap) > tol * np.abs(gap)).any(axis=1)
        todo, steps = todo[redo], 2 * steps
    return attr, fx, fb


def explain_prepared(model, prepared, targets: list[int], *, method: str = "ig", steps: int = DEFAULT_STEPS,
                     samples: int = 1, seed: int = 0, backend: str = "auto") -> Explanation:
    """Explain the rows of a batch prepared by `model` (`Model.prepare`) for the target indices
    `targets`; rows with an error get NaN attributions. `Model.explain` is the public entry point.
    Everything stays in memory (~24 KB per spectrum and target at D = 1951): explain samples of a
    catalog, not all of it."""
    ok, x, keys, _ = model._inputs_as_predicted(prepared, samples, seed, backend)
    arch, d = model.bundle.architecture, model.grid.n
    b, k = len(ok), len(targets)
    attr = np.full((b, k, d), np.nan, dtype=np.float32)
    fx, fb = np.full((b, k), np.nan), np.full((b, k), np.nan)
    rows = np.flatnonzero(ok)
    if len(rows):
        f = mean_function(model.bundle.layers, targets=targets, p=float(arch["dropout"]),
                          activation=arch["activation"], label_mean=[t.mean for t in model.targets],
                          label_std=[t.std for t in model.targets], keys=keys[rows], samples=samples,
                          seed=seed)
        a, fx[rows], fb[rows] = integrated_gradients(f, x[rows], continuum_baseline(x[rows], d), steps=steps,
                                                     method=method)
        attr[rows] = a[:, :, :d]  # the features' attribution is zero: they are held on the path
    chosen = [model.targets[i] for i in targets]
    return Explanation(ids=prepared.column(ID).to_pylist(), targets=[t.name for t in chosen],
                       units=[t.unit for t in chosen], wavelength=model.grid.values(),
                       medium=model.grid.medium, flux=x[:, :d],
                       attributions=attr, prediction=fx, baseline=fb,
                       flags=prepared.column(FLAGS).to_numpy(zero_copy_only=False),
                       errors=prepared.column(ERROR).to_pylist(), method=method, steps=steps)


def _quadrature(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre points and weights on [0, 1] (the scheme Captum uses by default)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return torch.as_tensor((nodes + 1) / 2), torch.as_tensor(weights / 2)


def _ig_torch(f: MeanFunction, x, base, rows, steps: int) -> np.ndarray:
    alphas, weights = (t.to(x.dtype) for t in _quadrature(steps))
    delta = x - base
    path = (base[None] + alphas[:, None, None] * delta[None]).reshape(-1, x.shape[1]).requires_grad_()
    out = f(path, rows.repeat(steps)).sum(dim=0)  # [K]: each path point's output depends on it alone
    grads = torch.stack([torch.autograd.grad(out[k], path, retain_graph=k < len(out) - 1)[0]
                         for k in range(len(out))]).reshape(len(out), steps, *x.shape)
    return (torch.einsum("t,ktbd->bkd", weights, grads) * delta[:, None]).detach().numpy()


def _ig_captum(f: MeanFunction, x, base, rows, steps: int) -> np.ndarray:
    try:
        from captum.attr import IntegratedGradients
    except ImportError as exc:
        raise StarcastError("method 'captum' needs Captum: pip install 'starcast[explain]'") from exc
    ig = IntegratedGradients(f)
    out = [ig.attribute(x, baselines=base, target=k, additional_forward_args=(rows,), n_steps=steps,
                        method="gausslegendre") for k in range(len(f.columns))]
    return torch.stack(out, dim=1).detach().numpy()


__all__ = ["DEFAULT_STEPS", "METHODS", "Explanation", "MeanFunction", "continuum_baseline",
           "explain_prepared", "integrated_gradients", "mean_function"]
