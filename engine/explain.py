"""Which pixels drive an estimate: integrated gradients (Sundararajan et al. 2017, ICML) of a model's
estimate of each target with respect to the pixels of the preprocessed spectrum.

The explained function is the deployed estimate in the target's unit, before v sin i is clipped at its
physical minimum: the average of mu over the M members and S dropout samples on the spectrum's own
masks and, for a model whose calibration blends it with its emulator's fit (`engine.calibration`),
that blend, w mean + (1 - w) t_fit, t_fit the labels of the fit (`FitFunction`: the emulator's
Gauss-Newton refinement of the network's labels, as `predict` runs it, written in torch so that it
can be differentiated), w and the fit's pixel weights held at the spectrum's own. The path runs from
the continuum (flux 1 on every pixel, the input features such as `log10_snr` held at the spectrum's
own values, so their attribution is zero and all of f(x) - f(baseline) lands on pixels) to the
spectrum, with the trapezoid rule, refined where completeness is missed. Methods: "ig" (torch, all
targets from one forward pass per path point, refining by the new points alone) and "captum" (Captum's
`IntegratedGradients`, one call per target, the whole path again); same numbers, see
`bench/explain_bench.py` for their speed. Plots and the survey view live in `explain_report.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..catalogs.physics import C_KMS
from ..catalogs.schema import ERROR, ID
from ..errors import StarcastError
from ..kernels import rng
from ..kernels.reference import ACTIVATIONS
from . import emulator as emu

METHODS = ("ig", "captum")
DEFAULT_STEPS = 32  # intervals of the path, doubled for rows that miss completeness by > tol
MAX_STEPS = 1024
COMPLETENESS_TOL = 0.01  # attributions sum to f(x) - f(baseline) within this fraction of it


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

    @classmethod
    def concat(cls, parts: Sequence[Explanation]) -> Explanation:
        """The explanations of consecutive batches of rows as one (same model, targets and method;
        `steps` the first's)."""
        first = parts[0]
        rows = {name: [getattr(p, name) for p in parts] for name in ("ids", "errors")}
        arrays = {name: np.concatenate([getattr(p, name) for p in parts])
                  for name in ("flux", "attributions", "prediction", "baseline", "flags")}
        return replace(first, ids=sum(rows["ids"], []), errors=sum(rows["errors"], []), **arrays)

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
    path_rows = 4096  # path points per forward pass: bounds memory (~200 MB at D = 2000)

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

    @property
    def dtype(self) -> torch.dtype:
        return self.label_std.dtype


@dataclass(frozen=True)
class FitFunction:
    """The labels of an emulator's fit (`engine.emulator.Emulator.refine`: damped Gauss-Newton steps
    with a finite-difference Jacobian in the labels and a residual velocity, from start labels, the
    emulated spectrum times a weighted least-squares continuum; then, on rows where the fit found a
    band (BANDS), the same steps again with it in the continuum, and then on rows where it found a
    continuum ripple, again with that too) as a differentiable torch function of the spectra, in the
    numpy fit's precisions: float32 spectra, float64 labels and normal equations. Which rows have the
    band or a ripple, and its frequency, are held at the numpy fit's (as the blend's shares are), and so
    may be the Gauss-Newton step's share in each step after the first (`full_step_share`; it changes
    steeply on some paths of spectra, whose integrals it would then take many points to resolve).
    `tests/engine/test_explain.py` holds it to `predict`."""

    emulator: emu.Emulator
    lo: np.ndarray  # (k,) the labels' training range, as `predict` bounds the fit
    hi: np.ndarray

    def spectra(self, labels: torch.Tensor) -> torch.Tensor:
        """`Emulator.spectra`: float32 [..., D] at float64 `labels` [..., k]."""
        e = self.emulator
        h = ((labels - torch.as_tensor(e.label_mean)) / torch.as_tensor(e.label_std)).float()
        for i, (w, b) in enumerate(e.layers):
            h = h @ torch.as_tensor(w) + torch.as_tensor(b)
            if i < len(e.layers) - 1:
                h = ACTIVATIONS[e.activation](h)
        return h

    def shift(self, spectra: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        """`Emulator.shift` of spectra [N, D] by rv [N]: spectra at wavelength x rest_frame_factor(rv),
        by cubic convolution (`kernels.resample.doppler_shift`), the ends held."""
        wave = torch.as_tensor(self.emulator.wavelength)
        beta = rv / C_KMS
        lam = wave[None] * torch.sqrt((1.0 - beta) / (1.0 + beta))[:, None]
        d = len(wave)
        k = (torch.searchsorted(wave, lam.detach().contiguous(), right=True) - 1).clamp(0, d - 2)
        t = ((lam - wave[k]) / (wave[k + 1] - wave[k])).clamp(0.0, 1.0).float()
        before, here = spectra.gather(1, (k - 1).clamp(min=0)), spectra.gather(1, k)
        there, after = spectra.gather(1, k + 1), spectra.gather(1, (k + 2).clamp(max=d - 1))
        cubic = 3.0 * (here - there) + after - before
        quadratic = 2.0 * before - 5.0 * here + 4.0 * there - after
        return here + 0.5 * t * (there - before + t * (quadratic + t * cubic))

    def blur(self, spectra: torch.Tensor, variance: np.ndarray) -> torch.Tensor:
        """`Emulator.blur` of spectra [J, N, D] by `variance` [N] A^2 (the same weights)."""
        rows, weights = self.emulator.blur_weights(variance)
        if not len(rows):
            return spectra
        weights = torch.as_tensor(weights)
        half, d = weights.shape[1] // 2, spectra.shape[-1]
        part = spectra[:, rows]
        padded = torch.cat([part[..., :1].expand(*part.shape[:-1], half), part,
                            part[..., -1:].expand(*part.shape[:-1], half)], dim=-1)
        out = spectra.clone()
        out[:, rows] = sum(weights[:, j:j + 1] * padded[..., j:j + d] for j in range(weights.shape[1]))
        return out

    def fitted(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rv: torch.Tensor,
               blur: np.ndarray, extra: torch.Tensor | None = None):
        """`Emulator.fitted` at J sets of labels [J, N, k] and velocities [J, N] for spectra x [N, D]
        seen through `blur` [N] (with the continuum terms `extra` [N, D, q],
        `Emulator.defect_columns`, if given): the shifted emulated spectra times their best continuum,
        [J, N, D]. A set at rest is not shifted (as numpy skips it; the shift would be the identity)."""
        e = self.blur(self.spectra(labels), blur)
        e = torch.stack([self.shift(ej, vj) if torch.any(vj) else ej for ej, vj in zip(e, rv, strict=True)])
        basis = torch.as_tensor(self.emulator.continuum_basis).float()  # [D, p]
        p = basis.shape[1] + (0 if extra is None else extra.shape[2])
        if p == 0:
            return e
        we = (weight * e).double()
        if extra is None:  # one basis for all rows, as numpy: the sums as matrix products
            products = torch.as_tensor(self.emulator.continuum_products)
            gram = ((we * e) @ products).unflatten(-1, (p, p))  # [J, N, p, p]
            rhs = (we * x) @ basis.double()
        else:
            basis = torch.cat([basis.expand(len(x), -1, -1), extra], dim=2)  # [N, D, p]
            basis64 = basis.double()
            gram = torch.einsum("jnd,ndi,ndk->jnik", we * e, basis64, basis64)
            rhs = torch.einsum("jnd,ndi->jni", we * x, basis64)
        trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(dim=-1)
        gram = gram + torch.eye(p, dtype=gram.dtype) * (1e-9 * trace + 1e-300)[..., None, None]
        coef = torch.linalg.solve(gram, rhs[..., None])[..., 0].float()  # [J, N, p]
        if extra is None:
            return e * (coef @ basis.T)
        return e * torch.einsum("ndi,jni->jnd", basis, coef)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ripple: np.ndarray,
                 dib: np.ndarray, blur: np.ndarray, full_step: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, np.ndarray]:
        """(the fitted labels [N, k] (float64), the Gauss-Newton steps' shares [N, 3, refine_steps - 1])
        of float32 spectra x [N, D] with float32 pixel weights `weight` [N, D] seen through `blur` [N]
        (`Emulator.blur`), from float64 `labels` [N, k] (physical units), then with the bands
        where `dib` [N, len(BANDS)] holds, then with the ripple of frequency `ripple` [N] (1/A) on the
        rows where it is finite (and those bands). Each step evaluates the model and its
        k + 1 finite-difference neighbours together. `full_step`: the shares to hold, as returned
        (None: `full_step_share` of each step's size)."""
        k = len(self.emulator.labels)
        scale, offset = self._units()
        z = torch.cat([(labels - offset[:k]) / scale[:k], torch.zeros((len(x), 1), dtype=scale.dtype)], dim=1)
        shares = self.no_shares(len(x))
        held = None if full_step is None else np.asarray(full_step)
        z, shares[:, 0] = self._steps(x, weight, z, blur, None, None if held is None else held[:, 0])
        banded, rippled = np.flatnonzero(dib.any(axis=1)), np.flatnonzero(np.isfinite(ripple))
        for part, (rows, extra) in enumerate(
                ((banded, lambda r: self.emulator.defect_columns(dib=dib[r])),
                 (rippled, lambda r: self.emulator.defect_columns(ripple[r], dib[r]))), start=1):
            if len(rows):
                at = torch.as_tensor(rows)
                refit, shares[rows, part] = self._steps(x[at], weight[at], z[at], blur[rows],
                                                        torch.as_tensor(extra(rows)),
                                                        None if held is None else held[rows, part])
                z = z.index_put((at,), refit)
        return (z * scale + offset)[:, :k], shares

    def no_shares(self, rows: int) -> np.ndarray:
        """Zero Gauss-Newton shares for `rows` rows, [rows, 3, refine_steps - 1]: the fit's three parts
        (plain, with the bands, with the ripple) and its steps after the first."""
        return np.zeros((rows, 3, max(self.emulator.refine_steps - 1, 0)))

    def _units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) [k + 1] of the standardised labels and velocity: physical = z scale + offset."""
        e = self.emulator
        return (torch.as_tensor(np.append(e.label_std, emu.V_UNIT)),
                torch.as_tensor(np.append(e.label_mean, 0.0)))

    def _steps(self, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, blur: np.ndarray,
               extra: torch.Tensor | None, full_step: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
        """`Emulator.refine`'s steps from the standardised labels and velocity z [N, k + 1]: a Gauss-Newton
        step, then each a chord step with the last Jacobian, blended with a Gauss-Newton step by the
        latter's share, `full_step` [N, refine_steps - 1] (None: `full_step_share` of the chord step's
        size); returns z and the shares."""
        e = self.emulator
        k = len(e.labels)
        scale, offset = self._units()
        zlo = torch.as_tensor(np.append((self.lo - e.label_mean) / e.label_std, -emu.V_FIT_MAX / emu.V_UNIT))
        zhi = torch.as_tensor(np.append((self.hi - e.label_mean) / e.label_std, emu.V_FIT_MAX / emu.V_UNIT))
        step_max = torch.as_tensor(np.append(np.ones(k), emu.V_STEP_MAX))
        eye = torch.eye(k + 1, dtype=scale.dtype)
        # the labels and their k + 1 finite-difference neighbours, [k + 2, 1, k + 1]
        probes = torch.cat([torch.zeros((1, k + 1), dtype=scale.dtype), emu.STEP * eye])[:, None]

        def step(x, weight, jac, base):  # (z's damped step [N, k + 1], its size in sigmas [N], detached)
            gram = torch.einsum("nid,njd->nij", jac * weight[:, None], jac).double()
            grad = torch.einsum("nid,nd->ni", jac, weight * (x - base)).double()
            trace = torch.diagonal(gram, dim1=1, dim2=2).sum(dim=1)
            damped = gram + eye * (1e-3 * trace / (k + 1) + 1e-12)[:, None, None]
            delta = torch.linalg.solve(damped, grad[..., None])[..., 0]
            size = torch.einsum("ni,nij,nj->n", delta, gram, delta).detach().sqrt()
            return torch.clamp(delta, -step_max, step_max), size

        def gauss_newton(x, weight, z, blur, extra):  # (z after the step, its Jacobian [N, k + 1, D])
            phys = (z[None] + probes) * scale + offset
            model = self.fitted(x, weight, phys[..., :k], phys[..., k], blur, extra)  # [k + 2, N, D]
            base, jac = model[0], ((model[1:] - model[0]) / emu.STEP).transpose(0, 1)
            return torch.clamp(z + step(x, weight, jac, base)[0], zlo, zhi), jac

        shares = self.no_shares(len(x))[:, 0]
        if not e.refine_steps:
            return z, shares
        z, jac = gauss_newton(x, weight, z, blur, extra)
        for n in range(e.refine_steps - 1):
            phys = z[None] * scale + offset
            base = self.fitted(x, weight, phys[..., :k], phys[..., k], blur, extra)[0]
            delta, size = step(x, weight, jac, base)
            chord = torch.clamp(z + delta, zlo, zhi)
            shares[:, n] = emu.full_step_share(size.numpy()) if full_step is None else full_step[:, n]
            rows = np.flatnonzero(shares[:, n] > 0.0)
            if len(rows):
                at = torch.as_tensor(rows)
                full, jac_full = gauss_newton(x[at], weight[at], z[at], blur[rows],
                                              None if extra is None else extra[at])
                share = torch.as_tensor(shares[rows, n])[:, None]
                chord = chord.index_put((at,), chord[at] + share * (full - chord[at]))
                jac = jac.index_put((at,), jac_full)
            z = chord
        return z, shares


@dataclass(frozen=True)
class EstimateFunction:
    """The deployed estimate of selected targets: the network's mean (`network`, all K targets) blended
    with the labels of the emulator's fit from it on the rows it fits, with the network's share w
    [B, K] and the fit's pixel weights [B, D] held at the row's own (`Calibration.blend`)."""

    network: MeanFunction
    fit: FitFunction
    weight: torch.Tensor  # [B, D] float32
    ripple: np.ndarray  # [B] float64: the frequency (1/A) of the ripple the fit fitted; NaN: none
    dib: np.ndarray  # [B, len(BANDS)] bool: the bands the fit holds
    blur: np.ndarray  # [B] A^2: the response through which the fit sees each row (`Emulator.blur`)
    share: torch.Tensor  # [B, K] float64
    fitted_rows: torch.Tensor  # [B] bool: rows the emulator fits
    full_step: np.ndarray  # [B, 3, refine_steps - 1]: the fit's Gauss-Newton shares (`FitFunction`)
    fit_columns: list[int]  # the target index of each of the emulator's labels
    columns: list[int]  # the selected targets
    # path points per forward pass: the fit's [k + 2, N, D] spectra are memory-bound; measured on
    # ob-default, 128-256 explain 2x faster than 1024 (the networks alone: 4096 is fastest)
    path_rows = 256

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def __call__(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        net = self.network(x, row).double()
        out = net.clone()
        rows = torch.nonzero(self.fitted_rows[row]).flatten()
        if len(rows):
            d, cols = self.weight.shape[1], self.fit_columns
            start = net[rows][:, cols]
            fit_rows = row[rows].numpy()
            fitted, _ = self.fit(x[rows, :d].float(), self.weight[row[rows]], start, self.ripple[fit_rows],
                                 self.dib[fit_rows], self.blur[fit_rows], self.full_step[fit_rows])
            w = self.share[row[rows]][:, cols]
            out[rows[:, None], torch.as_tensor(cols)[None]] = w * start + (1.0 - w) * fitted
        return out[:, self.columns].to(x.dtype)


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


def estimate_function(model, network: MeanFunction, targets: list[int], x: np.ndarray, ivar: np.ndarray,
                      fit: emu.Fit, gapped: np.ndarray, blur: np.ndarray) -> EstimateFunction:
    """The `EstimateFunction` of `targets` for prepared rows x [B, D + E] of `model` (its network's
    mean of all targets, `network`), their inverse variances [B, D] as its emulator fit weighs them,
    that fit of the rows (`emulator.Fit`: its chi^2, NaN on rows it does not fit, the bands and
    ripples it found and the parts of its excess), which rows have a gap and the response excess
    through which the fit sees each (`Emulator.blur`); the blend's shares at the rows' own SNR,
    excess and gap."""
    emulator, names = model.emulator, [t.name for t in model.targets]
    weight = torch.as_tensor(emulator.pixel_weight(ivar, fit.sigma_factor))
    share = model.calibration.network_share(model._calibration_log_snr(x, fit), fit.excess, gapped)
    fit_function = FitFunction(emulator, *model._label_range(emulator.labels))
    ripple, dib, blur = fit.ripple_frequency, fit.dib_fitted(emulator), np.asarray(blur, np.float64)
    columns = [names.index(n) for n in emulator.labels]
    rows = np.flatnonzero(np.isfinite(fit.chi2))
    full_step = fit_function.no_shares(len(x))
    if len(rows):  # the Gauss-Newton steps' shares at the rows' own spectra, held on their paths
        at = torch.as_tensor(rows)
        with torch.no_grad():
            spectra = torch.as_tensor(x[rows], dtype=network.dtype)
            start = network(spectra, at).double()[:, columns]
            _, full_step[rows] = fit_function(spectra[:, :weight.shape[1]].float(), weight[at], start,
                                              ripple[rows], dib[rows], blur[rows])
    return EstimateFunction(network, fit_function, weight, ripple, dib, blur, torch.as_tensor(share),
                            torch.as_tensor(np.isfinite(fit.chi2)), full_step, columns, list(targets))


def continuum_baseline(x: np.ndarray, pixels: int) -> np.ndarray:
    """The baseline of prepared rows x [B, D + E]: flux 1 on the D pixels, the features unchanged."""
    base = np.array(x, copy=True)
    base[:, :pixels] = 1.0
    return base


def integrated_gradients(f: MeanFunction, x: np.ndarray, baseline: np.ndarray, *, steps: int = DEFAULT_STEPS,
                         method: str = "ig", tol: float = COMPLETENESS_TOL,
                         max_steps: int = MAX_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attributions [B, K_sel, D + E], f(x) [B, K_sel], f(baseline) [B, K_sel]), float64, for prepared
    rows x with their `baseline`, by the trapezoid rule over `steps` intervals of the path. Rows whose
    attributions miss f(x) - f(baseline) by more than `tol` of it (a ReLU network's path crosses kinks
    the quadrature may straddle) are redone with twice the intervals, up to `max_steps` (where
    f(x) ~ f(baseline) the relative miss may stay above `tol`; see `Explanation.completeness_error`);
    "ig" then evaluates the new midpoints alone, Captum the whole path again. Rows go through in
    chunks of ~`f.path_rows` path points."""
    if method not in METHODS:
        raise StarcastError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    if steps < 1:
        raise StarcastError(f"steps must be >= 1, got {steps}")
    dtype = f.dtype
    x, baseline = torch.tensor(x, dtype=dtype), torch.tensor(baseline, dtype=dtype)
    n, k = x.shape[0], len(f.columns)
    attr = np.empty((n, k, x.shape[1]), dtype=np.float64)
    # "ig": the trapezoid's weighted sum of gradient x (x - baseline) so far
    total = np.zeros_like(attr) if method == "ig" else None
    with torch.no_grad():
        fx, fb = f(x, torch.arange(n)).double().numpy(), f(baseline, torch.arange(n)).double().numpy()
    todo = np.arange(n)
    alphas, weights = (t.to(dtype) for t in _trapezoid(steps))
    while len(todo) and steps <= max_steps:
        chunk = max(1, f.path_rows // (len(alphas) if method == "ig" else steps + 1))
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            rows = torch.as_tensor(idx)
            if method == "ig":
                total[idx] += _gradient_sum(f, x[rows], baseline[rows], rows, alphas, weights)
                attr[idx] = total[idx] / steps
            else:
                attr[idx] = _ig_captum(f, x[rows], baseline[rows], rows, steps)
        gap = fx[todo] - fb[todo]
        redo = (np.abs(attr[todo].sum(axis=2) - gap) > tol * np.abs(gap)).any(axis=1)
        todo, steps = todo[redo], 2 * steps
        alphas, weights = (t.to(dtype) for t in _trapezoid(steps, refined=True))
    return attr, fx, fb


def explained_function(model, prepared, targets: list[int], *, samples: int | None = None, seed: int = 0,
                       backend: str = "auto"
                       ) -> tuple[np.ndarray, np.ndarray, MeanFunction | None, np.ndarray]:
    """(ok [B], x [B, D + E], f, flags [B]): which rows of a batch prepared by `model` can be predicted,
    the rows as the model predicts them, the deployed estimate of the target indices `targets` on the
    ok rows (f(x[ok], i) for the i-th of them; None when there are none) with `samples` dropout samples
    (None: the model's S): the network's mean, or an `EstimateFunction` where the model's calibration
    blends it with the emulator fit; and the flags `predict` gives the rows."""
    samples = model._samples(samples)
    ok, x, keys, fit, ivar, flags, _ = model._inputs_as_predicted(prepared, samples, seed, backend)
    arch, rows = model.bundle.architecture, np.flatnonzero(ok)
    if not len(rows):
        return ok, x, None, flags
    cal = model.calibration
    blended = fit is not None and cal is not None and cal.network_weight is not None
    means, stds = [t.mean for t in model.targets], [t.std for t in model.targets]
    f = mean_function(model.bundle.layers, targets=list(range(len(means))) if blended else targets,
                      p=float(arch["dropout"]), activation=arch["activation"], label_mean=means,
                      label_std=stds, keys=keys[rows], samples=samples, seed=seed)
    if blended:
        f = estimate_function(model, f, targets, x[rows], ivar[rows], fit.rows(rows),
                              model._gapped(prepared)[rows], model.response_excess(prepared)[rows])
    return ok, x, f, flags


def explain_prepared(model, prepared, targets: list[int], *, method: str = "ig", steps: int = DEFAULT_STEPS,
                     samples: int = 1, seed: int = 0, backend: str = "auto") -> Explanation:
    """Explain the rows of a batch prepared by `model` (`Model.prepare`) for the target indices
    `targets`; rows with an error get NaN attributions. `Model.explain` is the public entry point.
    Everything stays in memory (~40 KB per spectrum and target at D = 1951, while it runs): explain
    samples of a catalog, not all of it."""
    ok, x, f, flags = explained_function(model, prepared, targets, samples=samples, seed=seed,
                                         backend=backend)
    d, rows = model.grid.n, np.flatnonzero(ok)
    attr = np.full((len(ok), len(targets), d), np.nan, dtype=np.float32)
    fx, fb = np.full((len(ok), len(targets)), np.nan), np.full((len(ok), len(targets)), np.nan)
    if len(rows):
        a, fx[rows], fb[rows] = integrated_gradients(f, x[rows], continuum_baseline(x[rows], d), steps=steps,
                                                     method=method)
        attr[rows] = a[:, :, :d]  # the features' attribution is zero: they are held on the path
    chosen = [model.targets[i] for i in targets]
    return Explanation(ids=prepared.column(ID).to_pylist(), targets=[t.name for t in chosen],
                       units=[t.unit for t in chosen], wavelength=model.grid.values(),
                       medium=model.grid.medium, flux=x[:, :d],
                       attributions=attr, prediction=fx, baseline=fb,
                       flags=flags,
                       errors=prepared.column(ERROR).to_pylist(), method=method, steps=steps)


def _trapezoid(steps: int, refined: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and weights (x `steps`) of the trapezoid rule over `steps` equal intervals of [0, 1], or,
    `refined`, only those it adds to the rule over steps / 2 intervals (their midpoints): the rest are
    that rule's, whose weighted sum it reuses."""
    if refined:
        return (torch.arange(steps // 2, dtype=torch.float64) * 2 + 1) / steps, torch.ones(steps // 2,
                                                                                        dtype=torch.float64)
    weights = torch.ones(steps + 1, dtype=torch.float64)
    weights[[0, -1]] = 0.5
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), weights


def _gradient_sum(f: MeanFunction, x, base, rows, alphas, weights) -> np.ndarray:
    """sum_i weights_i grad f(base + alphas_i (x - base)) * (x - base), [B, K, D + E]."""
    delta = x - base
    path = (base[None] + alphas[:, None, None] * delta[None]).reshape(-1, x.shape[1]).requires_grad_()
    out = f(path, rows.repeat(len(alphas))).sum(dim=0)  # [K]: each path point's output depends on it alone
    grads = torch.stack([torch.autograd.grad(out[k], path, retain_graph=k < len(out) - 1)[0]
                         for k in range(len(out))]).reshape(len(out), len(alphas), *x.shape)
    return (torch.einsum("t,ktbd->bkd", weights, grads) * delta[:, None]).detach().numpy()


def _ig_captum(f: MeanFunction, x, base, rows, steps: int) -> np.ndarray:
    try:
        from captum.attr import IntegratedGradients
    except ImportError as exc:
        raise StarcastError("method 'captum' needs Captum: pip install 'starcast[explain]'") from exc
    ig = IntegratedGradients(f)
    out = [ig.attribute(x, baselines=base, target=k, additional_forward_args=(rows,), n_steps=steps + 1,
                        method="riemann_trapezoid") for k in range(len(f.columns))]
    # Captum's trapezoid weighs its n points by 1 / n (the ends by half), a total of 1 - 1 / n: rescaled,
    # it is the trapezoid rule over n - 1 intervals
    return (torch.stack(out, dim=1) * ((steps + 1) / steps)).detach().numpy()


__all__ = ["DEFAULT_STEPS", "METHODS", "EstimateFunction", "Explanation", "FitFunction", "MeanFunction",
           "continuum_baseline", "estimate_function", "explain_prepared", "explained_function",
           "integrated_gradients", "mean_function"]
