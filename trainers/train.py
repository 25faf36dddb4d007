"""The training loop on arrays: preprocessed spectra x [N, D] and raw labels y [N, K] in, a trained
`EnsembleMLP` and its per-epoch history out.

Members train in parallel (one batched module), each with its own seed, shuffle order (optionally a
bootstrap resample) and best-epoch snapshot (early stopping on its validation NLL). Augmentation is
physics only: extra Gaussian noise that lowers a spectrum's SNR to a random value (no RV-error
augmentation: errors of a few km/s shift lines by < 0.1 pixel on the model grid). Reading catalogs,
calibration and export live elsewhere (`pipeline.py`, `calibrate.py`, `export.py`).
"""

from __future__ import annotations

import math
import time
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
    first r principal components of the training spectra, scaled so the projected inputs have unit
    mean variance), or without a projection divide by one global scale (so pure-noise pixels are
    not blown up to unit variance). The projection makes the first layer low rank (W1 = P W1'), so
    training costs r instead of D inputs per member while the exported model stays DESIGN.md's MLP
    on x. Labels: per-target mean and std (the manifest's mean/std)."""

    x_mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, r) float64; (D, D) diagonal 1/scale when no projection is asked for
    y_mean: np.ndarray  # (K,) float64
    y_std: np.ndarray  # (K,) float64

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, rank: int = 0, seed: int = 0) -> Standardiser:
        x_mean = x.mean(axis=0, dtype=np.float64)
        xc = torch.from_numpy(x) - torch.from_numpy(x_mean.astype(np.float32))
        if rank and rank < x.shape[1]:
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(xc, q=rank + 10, niter=3)
            basis = v[:, :rank].double().numpy()
            scale = float(torch.sqrt(torch.mean((xc @ v[:, :rank]) ** 2)))
        else:
            basis = np.eye(x.shape[1])
            scale = float(torch.sqrt(torch.mean(xc**2)))
        return cls(x_mean, basis / max(scale, 1e-6), y.mean(axis=0, dtype=np.float64),
                   np.maximum(y.std(axis=0, dtype=np.float64), 1e-12))

    def x(self, x: np.ndarray, batch_rows: int = 8192) -> torch.Tensor:
        p, mu = torch.from_numpy(self.projection.astype(np.float32)), torch.from_numpy(self.x_mean)
        return torch.cat([(torch.from_numpy(x[s:s + batch_rows]).double() - mu).float() @ p
                          for s in range(0, x.shape[0], batch_rows)])

    def noise_scale(self) -> torch.Tensor:
        """Per input, the sigma that unit white noise in x has after standardisation (r,)."""
        return torch.from_numpy(np.sqrt((self.projection**2).sum(axis=0)).astype(np.float32))

    def y(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((y - self.y_mean) / self.y_std).astype(np.float32))


@dataclass
class TrainResult:
    model: EnsembleMLP
    standardiser: Standardiser
    history: list[dict] = field(default_factory=list)  # one dict per epoch (the CSV log's rows)
    best_epochs: list[int] = field(default_factory=list)  # per member, 1-based
    noise_per_snr: float = 0.0  # per-pixel noise sigma of x times SNR, used by the augmentation
    seconds: float = 0.0


def estimate_noise_per_snr(x: np.ndarray, snr: np.ndarray) -> float:
    """Median over rows of (per-pixel noise sigma of x) x SNR. The noise is measured from second
    differences d = x_i - (x_{i-1} + x_{i+1})/2 (var(d) = 1.5 sigma^2 for white noise) with the
    robust MAD estimate, so the broad stellar lines hardly contribute."""
    d = x[:, 1:-1] - 0.5 * (x[:, :-2] + x[:, 2:])
    sigma = 1.4826 * np.median(np.abs(d), axis=1) / math.sqrt(1.5)
    return float(np.median(sigma * snr))


def _augment(xb: torch.Tensor, snr: torch.Tensor, cfg: TrainingConfig, noise_per_snr: float,
             noise_scale: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Add white noise that takes a spectrum from its SNR s0 to s1 ~ log-uniform[snr_min, s0]:
    extra sigma = k sqrt(1/s1^2 - 1/s0^2) (variances of independent noise add). White noise in x
    stays white in the standardised inputs (orthonormal basis), with sigma `noise_scale` per input."""
    u = torch.rand(snr.shape, generator=g)
    lo = math.log(cfg.augment_snr_min)
    s1 = torch.exp(lo + u * (torch.log(snr) - lo).clamp_min(0.0))
    extra = noise_per_snr * torch.sqrt((1.0 / s1**2 - 1.0 / snr**2).clamp_min(0.0))
    apply = (torch.rand(snr.shape, generator=g) < cfg.augment_prob).float()
    return xb + torch.randn(xb.shape, generator=g) * (extra * apply).unsqueeze(-1) * noise_scale


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
                   arch: ArchitectureConfig, cfg: TrainingConfig, *, snr_train: np.ndarray | None = None,
                   progress: bool = True) -> TrainResult:
    """Train M members on (x_train, y_train) with early stopping on (x_val, y_val). x: preprocessed
    spectra [N, D] float32; y: labels [N, K] in physical units; snr_train (N,) enables augmentation.
    Reproducible: dropout draws from torch's global RNG, seeded here inside a forked RNG state."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(int(cfg.seeds[0]))
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            return _train(x_train, y_train, x_val, y_val, arch, cfg, snr_train, progress)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, x_val, y_val, arch, cfg, snr_train, progress) -> TrainResult:
    start = time.perf_counter()
    std = Standardiser.fit(x_train, y_train, arch.input_rank, int(cfg.seeds[0]))
    xs, ys, xv, yv = std.x(x_train), std.y(y_train), std.x(x_val), std.y(y_val)
    augment = snr_train is not None and cfg.augment_prob > 0
    noise_per_snr = estimate_noise_per_snr(x_train, snr_train) if augment else 0.0
    snr = torch.from_numpy(np.asarray(snr_train, np.float32)) if augment else None
    noise_scale = std.noise_scale()
    model = EnsembleMLP(xs.shape[1], arch.hidden, ys.shape[1], cfg.seeds, dropout=arch.dropout,
                        activation=arch.activation, var_eps=arch.var_eps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, m = xs.shape[0], model.members
    steps = math.ceil(n / cfg.batch_size)
    sched = _schedule(opt, cfg, steps)
    rngs = [np.random.default_rng(seed) for seed in cfg.seeds]
    g = torch.Generator().manual_seed(int(cfg.seeds[0]) + 7919)
    best = [p.detach().clone() for p in model.parameters()]
    best_nll, best_epoch = np.full(m, np.inf), [0] * m
    result = TrainResult(model, std, noise_per_snr=noise_per_snr)
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = torch.from_numpy(np.stack([r.integers(0, n, n) if cfg.bootstrap else r.permutation(n)
                                           for r in rngs]))
        total = 0.0
        for b in range(steps):
            idx = order[:, b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = xs[idx], ys[idx]
            if augment:
                xb = _augment(xb, snr[idx], cfg, noise_per_snr, noise_scale, g)
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
