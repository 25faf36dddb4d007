"""The numerics of DESIGN.md in torch: `ensemble_stats_reference` (plain loops, float64 by default — what
every other backend is compared against), `ensemble_stats_cpu` (the fast CPU path: first layer once
per member and shared by all S samples, batched matmuls over M x S, masks generated in a fused
parallel pass) and
`ensemble_samples` (all M x S raw samples of a few spectra). Masks come from `rng`, bit for bit.

Weights: `layers = [(W, b), ...]`, W [M, in, out], b [M, out]; hidden layers first, the head last with
2K outputs (K means, then K raw variances, var = softplus(raw) + var_eps), all in standardised units.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import rng

ACTIVATIONS = {"relu": torch.relu, "silu": F.silu}
Layers = Sequence[tuple[torch.Tensor, torch.Tensor]]
_CHUNK_ELEMENTS = 1 << 22  # CPU path: rows per chunk so that one [M, rows, S, H] activation is ~16 MB


def check_inputs(x, keys, layers: Layers, p: float, samples: int, activation: str):
    """Validate shapes and arguments; returns (x as a tensor, keys as int64 tensor, M, K)."""
    x = torch.as_tensor(x)
    keys = torch.as_tensor(np.asarray(keys) if not torch.is_tensor(keys) else keys)
    if x.ndim != 2:
        raise ValueError(f"x must be [B, D], got shape {tuple(x.shape)}")
    if keys.shape != (x.shape[0],) or keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64 [{x.shape[0]}] (see rng.id_keys), got "
                         f"{keys.dtype} {tuple(keys.shape)}")
    if len(layers) < 2:
        raise ValueError("layers needs at least one hidden layer and the output head")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng.mask_threshold(p)  # validates p
    members, width = layers[0][0].shape[0], x.shape[1]
    for i, (w, b) in enumerate(layers):
        if w.ndim != 3 or w.shape[0] != members or w.shape[1] != width or b.shape != (members, w.shape[2]):
            raise ValueError(f"layer {i}: expected W [{members}, {width}, out] and b [{members}, out], "
                             f"got W {tuple(w.shape)}, b {tuple(b.shape)}")
        width = w.shape[2]
    if width % 2:
        raise ValueError(f"the head must have 2K outputs (means, then raw variances), got {width}")
    return x, keys, members, width // 2


def finish(mean, aleatoric, epistemic, label_mean=None, label_std=None, calibration=None):
    """De-standardise (mean*std + label_mean, var*std**2) and calibrate (var *= calibration**2)."""
    def vec(v, default):
        return torch.as_tensor(default if v is None else v, dtype=mean.dtype, device=mean.device)
    std, cal = vec(label_std, 1.0), vec(calibration, 1.0)
    var_scale = (std * cal) ** 2
    return mean * std + vec(label_mean, 0.0), aleatoric * var_scale, epistemic * var_scale


# ---- the reference: member by member, sample by sample ------------------------------------------

def _reference_samples(x, keys, layers, *, p, samples, seed, activation, var_eps, dtype):
    """Standardised (mu, var), each [B, M, S, K], computed one member and one sample at a time."""
    x, keys, members, k = check_inputs(x, keys, layers, p, samples, activation)
    act, x = ACTIVATIONS[activation], x.to(dtype)
    layers = [(w.to(dtype), b.to(dtype)) for w, b in layers]
    rows, scale = rng.row_keys(seed, keys), rng.dropout_scale(p)
    mu = torch.empty((x.shape[0], members, samples, k), dtype=dtype)
    var = torch.empty_like(mu)
    for m in range(members):
        h1 = act(x @ layers[0][0][m] + layers[0][1][m])
        for s in range(samples):
            h = h1
            for layer, (w, b) in enumerate(layers[1:], start=1):  # mask z_layer acts on h_layer
                if p > 0:
                    z = rng.keep_masks(rows, [m], [s], layer, h.shape[1], p)[:, 0, 0]
                    h = h * z * scale
                out = h @ w[m] + b[m]
                h = act(out) if layer < len(layers) - 1 else None
            mu[:, m, s] = out[:, :k]
            var[:, m, s] = F.softplus(out[:, k:]) + var_eps
    return mu, var


def ensemble_stats_reference(x, keys, layers: Layers, *, p: float, samples: int, seed: int,
                             activation: str = "relu", var_eps: float = 1e-6, label_mean=None,
                             label_std=None, calibration=None, dtype: torch.dtype = torch.float64):
    """(mean, var_aleatoric, var_epistemic), each [B, K], de-standardised and calibrated."""
    mu, var = _reference_samples(x, keys, layers, p=p, samples=samples, seed=seed,
                                 activation=activation, var_eps=var_eps, dtype=dtype)
    mean = mu.mean(dim=(1, 2))
    epistemic = ((mu - mean[:, None, None]) ** 2).mean(dim=(1, 2))  # two-pass: never negative
    return finish(mean, var.mean(dim=(1, 2)), epistemic, label_mean, label_std, calibration)


def ensemble_samples(x, keys, layers: Layers, *, p: float, samples: int, seed: int,
                     activation: str = "relu", var_eps: float = 1e-6, label_mean=None, label_std=None,
                     calibration=None, dtype: torch.dtype = torch.float64):
    """All M x S samples (mu, var), each [B, M, S, K], de-standardised and calibrated, for a few spectra.

    Calibration c scales sigma: var -> c**2 var and each mu's deviation from the ensemble mean -> c times
    itself, so the mean, average var and spread of the returned samples are exactly the statistics
    `ensemble_stats_reference` returns.
    """
    mu, var = _reference_samples(x, keys, layers, p=p, samples=samples, seed=seed,
                                 activation=activation, var_eps=var_eps, dtype=dtype)
    k = mu.shape[-1]
    std = torch.as_tensor(1.0 if label_std is None else label_std, dtype=dtype).expand(k)
    cal = torch.as_tensor(1.0 if calibration is None else calibration, dtype=dtype).expand(k)
    shift = torch.as_tensor(0.0 if label_mean is None else label_mean, dtype=dtype).expand(k)
    mean = mu.mean(dim=(1, 2), keepdim=True)
    mu = (mean + cal * (mu - mean)) * std + shift
    return mu, var * (std * cal) ** 2


# ---- the CPU path: same numerics, batched --------------------------------------------------------

@dataclass(frozen=True)
class CpuWeights:
    """Weights laid out once for `ensemble_stats_cpu`: W1 as one [D, M*H1] matrix, the 1/(1-p) scale
    folded into the later layers (so they are tied to p), the head zero-padded to 16 columns (BLAS
    then takes its regular, position-blind path)."""
    w1: torch.Tensor  # [D, M*H1]
    b1: torch.Tensor  # [M*H1]
    rest: list  # [(W * scale [M, H, H'], b [M, 1, H'])], hidden layers then the padded head
    p: float
    shapes: tuple  # the original ((W shape, b shape), ...), for argument checks

    def shape_only(self):
        return [(torch.empty(w, device="meta"), torch.empty(b, device="meta")) for w, b in self.shapes]


def pack_cpu(layers: Layers, p: float, dtype: torch.dtype = torch.float32) -> CpuWeights:
    """Lay `layers` out for `ensemble_stats_cpu` at dropout rate p (done once per model, not per batch)."""
    w1, b1 = layers[0]
    scale = rng.dropout_scale(p)
    rest = [((w * scale).to(dtype), b.to(dtype)[:, None, :]) for w, b in layers[1:]]
    w, b = rest[-1]
    rest[-1] = (F.pad(w, (0, -w.shape[2] % 16)), F.pad(b, (0, -b.shape[2] % 16)))
    return CpuWeights(w1.to(dtype).permute(1, 0, 2).reshape(w1.shape[1], -1).contiguous(),
                      b1.to(dtype).reshape(-1), rest, p,
                      tuple((tuple(w.shape), tuple(b.shape)) for w, b in layers))


def ensemble_stats_cpu(x, keys, layers: Layers | CpuWeights, *, p: float, samples: int, seed: int,
                       activation: str = "relu", var_eps: float = 1e-6, label_mean=None,
                       label_std=None, calibration=None, dtype: torch.dtype = torch.float32,
                       chunk_rows: int | None = None):
    """Same arguments and result as `ensemble_stats_reference`, float32 by default, fast on a CPU.

    The first layer is one GEMM [B, D] x [D, M*H1] shared by all samples; each later layer is one
    batched matmul over members of [rows*S, H] x [H, H'], its bias, activation and the next masks applied
    in one fused pass (`rng.apply_masks`); the 1/(1-p) scale is folded into the next
    layer's weights. With p = 0 the S samples are identical, so one is computed. Rows are processed
    in fixed-size chunks (the last one zero-padded) that keep each activation near 16 MB: every GEMM has
    the same shape whatever the batch, so a row's result is bit-identical alone or in any batch.
    `chunk_rows` overrides the chunk (benchmarks search it); any fixed value keeps that property.
    `layers` may be `pack_cpu(layers, p)`, packed once for many batches (then `dtype` is the packing's).
    """
    packed = layers if isinstance(layers, CpuWeights) else pack_cpu(layers, p, dtype)
    if packed.p != p:
        raise ValueError(f"weights were packed for dropout p = {packed.p}, not {p}")
    x, keys, members, k = check_inputs(x, keys, packed.shape_only(), p, samples, activation)
    x = x.to(packed.w1.dtype)
    s_eff = samples if p > 0 else 1
    rows_all = rng.row_keys(seed, keys)
    widest = max(w[2] for w, _ in packed.shapes)
    chunk = chunk_rows or _chunk_rows(members * s_eff * widest)
    n = x.shape[0]
    x = torch.cat((x, x.new_zeros((-n % chunk, x.shape[1]))))  # pad: every chunk has the same shape
    rows_all = torch.cat((rows_all, rows_all.new_zeros(-n % chunk)))
    outs = [torch.empty((x.shape[0], k), dtype=x.dtype) for _ in range(3)]
    for start in range(0, x.shape[0], chunk):
        sl = slice(start, start + chunk)
        stats = _cpu_chunk(x[sl], rows_all[sl], packed.w1, packed.b1, packed.rest, members, s_eff, p,
                           activation, var_eps, k)
        for out, stat in zip(outs, stats, strict=True):
            out[sl] = stat
    return finish(*(out[:n] for out in outs), label_mean, label_std, calibration)


def _chunk_rows(elements_per_row: int) -> int:
    """Rows per chunk: a power of two, at most 256, keeping one activation near _CHUNK_ELEMENTS."""
    return 1 << max(0, min(8, (_CHUNK_ELEMENTS // elements_per_row).bit_length() - 1))


def _cpu_chunk(x, rows, w1, b1, rest, members, s_eff, p, activation, var_eps, k):
    """One chunk: the first layer's GEMM once for all samples, then per layer one fused pass (bias,
    activation and that layer's masks: `rng.apply_masks`) and one batched GEMM over members."""
    n = x.shape[0]
    h, bias = torch.mm(x, w1).view(n, members, 1, -1).transpose(0, 1), b1  # [M, n, 1, H1], before bias
    for layer, (w, b) in enumerate(rest, start=1):  # z_layer on h_layer, then the next weights
        streams = rng.streams(rows, range(members), range(s_eff), layer).permute(1, 0, 2) if p > 0 else \
            rows.new_zeros((members, n, s_eff))  # p = 0: nothing is dropped, no stream is read
        h = rng.apply_masks(h, streams, p, bias, activation).view(members, n * s_eff, -1)
        if layer < len(rest):
            h, bias = torch.bmm(h, w).view(members, n, s_eff, -1), b
    w_head, b_head = rest[-1]
    out = torch.baddbmm(b_head, h, w_head)  # [M, n*S, 2K padded to 16]
    # [n, 2K, M*S] contiguous: each row reduces its own contiguous run, in an order set by index alone
    out = out.view(members, n, s_eff, -1)[..., :2 * k].permute(1, 3, 0, 2).reshape(n, 2 * k, -1)
    mu, var = out[:, :k], F.softplus(out[:, k:]) + var_eps
    mean = mu.mean(dim=-1)
    epistemic = ((mu - mean[..., None]) ** 2).mean(dim=-1)  # two-pass: never negative
    return mean, var.mean(dim=-1), epistemic
