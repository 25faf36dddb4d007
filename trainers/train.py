"""The training loop on arrays: preprocessed spectra x [N, D] and raw labels y [N, K] in, a trained
`EnsembleMLP` and its per-epoch history out.

Members train in parallel (one batched module), each with its own seed, shuffle order (optionally a
bootstrap resample) and best-epoch snapshot (early stopping on its validation NLL). Augmentation is
physics only: each batch draws some spectra from noisier copies of the training set (made by
`data.py` on the raw flux, then preprocessed like the rest). Reading catalogs, calibration and
export live elsewhere (`pipeline.py`, `calibrate.py`, `export.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ArchitectureConfig, TrainingConfig
from .ensemble import EnsembleMLP, gaussian_nll

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Standardiser:
    """Input: subtract the per-pixel training mean, then project onto `projection` ([D, r]: the
    first r principal components of the training spectra, or the identity), scaled either to unit
    variance per input (`whiten`) or by one global scale, plus optional noise probes (below). The
    projection makes the first layer low rank (W1 = P W1'), so training costs r instead of D inputs
    per member while the exported model stays DESIGN.md's MLP on x. Labels: per-target mean and
    std (the manifest's mean/std)."""

    x_mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, r) float64; (D, D) diagonal 1/scale when no projection is asked for
    y_mean: np.ndarray  # (K,) float64
    y_std: np.ndarray  # (K,) float64

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, rank: int = 0, seed: int = 0, whiten: bool = False,
            probes: int = 0, features: int = 0) -> Standardiser:
        """`features`: the last columns of x are scalar input features (`kernels.features`), each
        standardised on its own and passed beside the projection of the pixels."""
        if features:
            pixels = cls.fit(x[:, :-features], y, rank, seed, whiten, probes)
            f_mean = x[:, -features:].mean(axis=0, dtype=np.float64)
            f_std = np.maximum(x[:, -features:].std(axis=0, dtype=np.float64), 1e-12)
            d, r = pixels.projection.shape
            projection = np.zeros((d + features, r + features))
            projection[:d, :r] = pixels.projection
            projection[d:, r:] = np.diag(1.0 / f_std)
            return cls(np.concatenate([pixels.x_mean, f_mean]), projection, pixels.y_mean, pixels.y_std)
        x_mean = x.mean(axis=0, dtype=np.float64)
        xc = torch.from_numpy(x) - torch.from_numpy(x_mean.astype(np.float32))
        g = torch.Generator().manual_seed(seed)
        if rank and rank < x.shape[1]:
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(xc, q=rank + 10, niter=3)
            v = v[:, :rank]
        else:
            v = torch.eye(x.shape[1])
        spread = torch.sqrt(torch.mean((xc @ v) ** 2, dim=0))  # (r,) per input
        # whiten: unit variance per input (noise-dominated components stay visible, so the variance
        # head can read the noise level); else one global scale for all inputs
        scale = spread.double().numpy() if whiten else float(torch.sqrt(torch.mean(spread**2)))
        basis = v.double().numpy() / np.maximum(scale, 1e-6)
        if probes and v.shape[1] < x.shape[1]:
            basis = np.concatenate([basis, _noise_probes(xc, v, probes, g)], axis=1)
        return cls(x_mean, basis, y.mean(axis=0, dtype=np.float64),
                   np.maximum(y.std(axis=0, dtype=np.float64), 1e-12))

    def x(self, x: np.ndarray, batch_rows: int = 8192) -> torch.Tensor:
        p, mu = torch.from_numpy(self.projection.astype(np.float32)), torch.from_numpy(self.x_mean)
        return torch.cat([(torch.from_numpy(x[s:s + batch_rows]).double() - mu).float() @ p
                          for s in range(0, x.shape[0], batch_rows)])

    def y(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((y - self.y_mean) / self.y_std).astype(np.float32))


def _noise_probes(xc: torch.Tensor, v: torch.Tensor, n: int, g: torch.Generator) -> np.ndarray:
    """n random orthonormal directions orthogonal to the span of `v`, each scaled to unit variance
    over the training rows: what they see is mostly noise, so |probe| tells the network the noise
    level (a projection onto the leading components alone hides it). (D, n) float64."""
    r = torch.randn(xc.shape[1], n, generator=g, dtype=torch.float64)
    vd = v.double()
    r -= vd @ (vd.T @ r)
    q, _ = torch.linalg.qr(r)
    spread = torch.sqrt(torch.mean((xc.double() @ q) ** 2, dim=0))
    return (q / spread.clamp_min(1e-12)).numpy()


@dataclass
class TrainResult:
    model: EnsembleMLP
    standardiser: Standardiser
    history: list[dict] = field(default_factory=list)  # one dict per epoch (the CSV log's rows)
    best_epochs: list[int] = field(default_factory=list)  # per member, 1-based
    seconds: float = 0.0


def _schedule(opt: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    warm = max(1, cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def validation_nll(model: EnsembleMLP, x: torch.Tensor, y: torch.Tensor,
                   batch_rows: int = 4096) -> tuple[np.ndarray, float]:
    """Per-member Gaussian NLL and the ensemble's (moment-matched Gaussian), dropout off, mean over
    rows and targets, standardised units."""
    model.eval()
    per_member, ens = [], []
    for s in range(0, x.shape[0], batch_rows):
        mu, var = model(x[s:s + batch_rows])
        yb = y[s:s + batch_rows]
        per_member.append(gaussian_nll(mu, var, yb).sum(dim=(1, 2)))
        mean = mu.mean(0)
        total = var.mean(0) + mu.var(0, unbiased=False)
        ens.append(gaussian_nll(mean, total, yb).sum())
    n = x.shape[0] * y.shape[1]
    return (torch.stack(per_member).sum(0) / n + HALF_LOG_2PI).numpy(), float(sum(ens) / n + HALF_LOG_2PI)


def train_ensemble(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   arch: ArchitectureConfig, cfg: TrainingConfig, *, x_noisy: np.ndarray | None = None,
                   epoch_data: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
                   progress: bool = True) -> TrainResult:
    """Train M members on (x_train, y_train) with early stopping on (x_val, y_val). x: preprocessed
    spectra [N, D] float32 (then the model's input features, `arch.features`); y: labels [N, K] in
    physical units; x_noisy [C, N, D]: noisier copies of x_train (same rows), drawn instead of
    x_train with probability `cfg.augment_prob` per sample; `epoch_data(epoch)`: a new training set
    for every epoch after the first (fresh draws from a model grid), replacing x_train.
    Reproducible: dropout draws from torch's global RNG, seeded here inside a forked RNG state."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(int(cfg.seeds[0]))
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            return _train(x_train, y_train, x_val, y_val, arch, cfg, x_noisy, epoch_data, progress)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, x_val, y_val, arch, cfg, x_noisy, epoch_data, progress) -> TrainResult:
    start = time.perf_counter()
    std = Standardiser.fit(x_train, y_train, arch.input_rank, int(cfg.seeds[0]), arch.input_whiten,
                           arch.input_noise_probes, len(arch.features))
    variants = [x_train, *([] if x_noisy is None else list(x_noisy))]
    xs = torch.stack([std.x(v) for v in variants])  # [C+1, N, r]: the data, then its noisier copies
    ys, xv, yv = std.y(y_train), std.x(x_val), std.y(y_val)
    model = EnsembleMLP(xs.shape[2], arch.hidden, ys.shape[1], cfg.seeds, dropout=arch.dropout,
                        activation=arch.activation, var_eps=arch.var_eps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, m = xs.shape[1], model.members
    steps = math.ceil(n / cfg.batch_size)
    sched = _schedule(opt, cfg, steps)
    rngs = [np.random.default_rng(seed) for seed in cfg.seeds]
    g = torch.Generator().manual_seed(int(cfg.seeds[0]) + 7919)
    best = [p.detach().clone() for p in model.parameters()]
    best_nll, best_epoch = np.full(m, np.inf), [0] * m
    result = TrainResult(model, std)
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        if epoch_data is not None and epoch > 1:
            x_new, y_new = epoch_data(epoch)
            xs, ys = std.x(x_new)[None], std.y(y_new)
            n, steps = xs.shape[1], math.ceil(xs.shape[1] / cfg.batch_size)
        model.train()
        order = torch.from_numpy(np.stack([r.integers(0, n, n) if cfg.bootstrap else r.permutation(n)
                                           for r in rngs]))
        total = 0.0
        for b in range(steps):
            idx = order[:, b * cfg.batch_size:(b + 1) * cfg.batch_size]
            variant = torch.zeros_like(idx)
            if len(variants) > 1:
                noisy = torch.rand(idx.shape, generator=g) < cfg.augment_prob
                pick = torch.randint(1, len(variants), idx.shape, generator=g)
                variant = torch.where(noisy, pick, variant)
            xb, yb = xs[variant, idx], ys[idx]
            mu, var = model(xb)
            loss = gaussian_nll(mu, var, yb, cfg.beta).mean(dim=(1, 2)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() / m
        member_nll, ens_nll = validation_nll(model, xv, yv)
        for k in np.flatnonzero(member_nll < best_nll):
            best_nll[k], best_epoch[k] = member_nll[k], epoch
            for saved, p in zip(best, model.parameters(), strict=True):
                saved[k] = p.detach()[k]
        row = {"epoch": epoch, "lr": sched.get_last_lr()[0], "train_loss": total / steps,
               "val_nll": ens_nll, "val_nll_members_mean": float(member_nll.mean()),
               "seconds": time.perf_counter() - t0}
        result.history.append(row)
        bar.set_postfix(train=f"{row['train_loss']:.3f}", val_nll=f"{ens_nll:.3f}")
        if epoch - max(best_epoch) >= cfg.patience:
            break
    with torch.no_grad():
        for saved, p in zip(best, model.parameters(), strict=True):
            p.copy_(saved)
    model.eval()
    result.best_epochs = best_epoch
    result.seconds = time.perf_counter() - start
    return result
