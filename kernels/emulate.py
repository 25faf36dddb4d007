"""A float64 model of the fused kernel's rounding: `ensemble_stats_emulated` runs DESIGN.md's numerics on
the kernel's packed weights, rounding exactly where the kernel rounds — the centred input cast to the
storage dtype, the weights as packed, each activation stored to scratch (all but the last hidden
layer's, which feeds the fp32 head), and for "tf32" every dot operand of the hidden layers as a tensor
core reads it — and accumulating in float64 where the kernel accumulates in fp32.

It checks a precision's numerics at scale on a CPU (hundreds of spectra of a real model in seconds,
where the Triton interpreter manages a few); it is not a kernel and proves nothing about the GPU code,
which the interpreter and GPU tests compare against the reference directly.
"""

import torch
import torch.nn.functional as F

from . import rng
from .packing import tf32_round
from .reference import ACTIVATIONS, check_inputs, finish

_TF32_DROPPED_BITS = 13  # fp32 has a 23-bit mantissa, tf32 keeps 10


def tf32_truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 values with the low 13 mantissa bits cleared: what a tensor core reads of a tf32 operand
    that was not rounded first (truncation: the worse of the two roundings, so a safe model)."""
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~((1 << _TF32_DROPPED_BITS) - 1)).view(torch.float32)


def ensemble_stats_emulated(x, keys, packed, *, p: float, samples: int, seed: int, activation: str = "relu",
                            var_eps: float = 1e-6, label_mean=None, label_std=None, calibration=None):
    """(mean, aleatoric, epistemic) float64 [B, K] as the kernel computes them from `packed`
    (`packing.PackedWeights`), bar fp32 accumulation order; CPU tensors."""
    x, keys, members, k = check_inputs(x, keys, packed.shape_only(), p, samples, activation)
    storage, tf32 = packed.w1.dtype, packed.precision == "tf32"
    act, scale = ACTIVATIONS[activation], rng.dropout_scale(p)
    s_eff = samples if p > 0 else 1

    def store(t):  # an fp32 value as the kernel casts it for a dot or the scratch
        return (tf32_round(t) if tf32 else t.to(storage)).double()

    def operand(t):  # what the tensor core multiplies
        return tf32_truncate(t).double() if tf32 else t.double()

    (_, h1), *hidden, _ = [w[1:] for w, _ in packed.shapes]
    rows = rng.row_keys(seed, keys)
    x = x.float() - packed.centre.cpu()  # fp32, as in the kernel
    hi = store(x)
    parts = (hi, store(x - hi.float())) if packed.split_input else (hi,)
    mu = torch.empty((members, x.shape[0], s_eff, k), dtype=torch.float64)
    var = torch.empty_like(mu)
    for m in range(members):
        w1 = operand(packed.w1[m, :, :h1].cpu())
        h = store(act(sum(operand(part) @ w1 for part in parts) + packed.b1[m, :h1].cpu().double()))
        h = h[None, :, None, :]  # [1, B, 1, H]: shared by all samples, as in the kernel
        for layer, (n_in, n_out) in enumerate(hidden, start=1):
            if p > 0:
                h = rng.apply_masks(h, rng.streams(rows, [m], range(s_eff), layer).permute(1, 0, 2), p)
            w = packed.wh[m, layer - 1, :n_in, :n_out].cpu()
            h = act(operand(h) @ operand(w) * scale + packed.bh[m, layer - 1, :n_out].cpu().double())
            h = h if layer == len(hidden) else store(h)  # the last one feeds the fp32 head unrounded
        if p > 0:
            h = rng.apply_masks(h, rng.streams(rows, [m], range(s_eff), len(hidden) + 1).permute(1, 0, 2), p)
        h = h.expand(1, -1, s_eff, -1)[0]
        wo, bo, kp = packed.wo[m].cpu(), packed.bo[m].cpu().double(), packed.kp
        head = h @ torch.cat((wo[:h.shape[-1], :k], wo[:h.shape[-1], kp:kp + k]), dim=1).double()  # fp32
        out = head * scale + torch.cat((bo[:k], bo[kp:kp + k]))
        mu[m], var[m] = out[..., :k], F.softplus(out[..., k:]) + var_eps
    mean = mu.mean(dim=(0, 2))
    epistemic = ((mu - mean[None, :, None]) ** 2).mean(dim=(0, 2))
    return finish(mean, var.mean(dim=(0, 2)), epistemic, label_mean, label_std, calibration)
