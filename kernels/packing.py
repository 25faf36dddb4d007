"""The fused kernel's weights: `pack_weights` pads, centres and casts a model's layers once into
`PackedWeights` (the layout `ensemble_mlp` reads), with `fitted_centre` (a model's input centre from
its first layer) and `tf32_round` (bit for bit the kernel's tf32 rounding). Torch only, no kernel.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

_CENTRE_RIDGE = 0.01  # fitted_centre's pull to the prior, relative to W1's mean squared row norm
# name -> (storage dtype of weights and activations, tl.dot input_precision). No bf16: on the shipped
# model its 7-bit mantissa moves means by up to 6-7% of sigma (bench/results/precision_cpu.md; 3.4%
# from rounding the weights alone, docs/record.md "Inference kernels"), beyond DESIGN.md's 1%, and
# tensor cores run it no faster than fp16.
PRECISIONS = {
    "fp16": (torch.float16, "tf32"),
    "tf32": (torch.float32, "tf32"),
    "fp32": (torch.float32, "ieee"),
}


@dataclass(frozen=True)
class PackedWeights:
    """Weights laid out for the kernel: widths zero-padded to HP (padded units stay exactly 0)."""
    w1: torch.Tensor  # [M, D, HP]
    b1: torch.Tensor  # [M, HP] float32: b1 + centre W1, folded in float64
    centre: torch.Tensor  # [D] float32: the kernel multiplies x - centre (in fp32, then cast) by W1
    wh: torch.Tensor  # [M, L-1, HP, HP] (a placeholder when L = 1)
    bh: torch.Tensor  # [M, L-1, HP] float32
    wo: torch.Tensor  # [M, HP, 2 KP] float32, the head runs in fp32: means [0, K), raw vars [KP, KP + K)
    bo: torch.Tensor  # [M, 2 KP] float32
    hp: int
    kp: int
    num_hidden: int
    shapes: tuple  # the original ((W shape, b shape), ...), for argument checks
    precision: str
    split_input: bool  # the first layer multiplies x - centre as two terms, hi + lo, each in the dot's dtype

    def shape_only(self):
        """Meta tensors with the original layer shapes (what `check_inputs` validates against)."""
        return [(torch.empty(w, device="meta"), torch.empty(b, device="meta")) for w, b in self.shapes]


def padded_width(width: int) -> int:
    """Kernel width of a hidden layer: a power of two up to 64, then a multiple of 64."""
    return max(16, triton.next_power_of_2(width)) if width <= 64 else -(-width // 64) * 64


def pack_weights(layers, precision: str = "fp16", device=None, centre=None,
                 split_input: bool | None = None) -> PackedWeights:
    """Pad and cast `layers` ([(W [M, in, out], b [M, out]), ...], head last) for the kernel.

    `centre` (a number or [D], default 0): a fixed point near the inputs. The kernel casts x - centre,
    not x, to 16 bits and the first bias absorbs centre W1 (folded in float64), so the result is the
    same function of x and only the rounding changes: a bundle whose standardisation is folded into
    W1 has |x W1| ~ |b1| >> |x W1 + b1|, which 16-bit inputs cannot resolve unless x is centred first.
    It must not depend on the batch (see `Bundle.input_centre`, the model's training mean).
    `split_input` (default: all but "fp32"): cast x - centre as hi + lo, two terms of the dot's dtype,
    which doubles the first layer's tensor-core work (it reuses the W1 tile) and removes the largest
    rounding left after centring, that of the input itself."""
    dtype = PRECISIONS[precision][0]
    device = device if device is not None else layers[0][0].device
    d = layers[0][0].shape[1]
    centre = torch.as_tensor(0.0 if centre is None else centre, dtype=torch.float64).cpu()
    if centre.ndim > 1 or centre.numel() not in (1, d) or not centre.isfinite().all():
        raise ValueError(f"centre must be a finite number or {d} numbers (one per input), "
                         f"got shape {tuple(centre.shape)}")
    centre = centre.expand(d).float().contiguous()  # the kernel subtracts this fp32 value: fold it
    hidden = [w.shape[2] for w, _ in layers[:-1]]
    if any(h % 16 for h in hidden):
        raise ValueError(f"hidden widths must be multiples of 16 for the Triton kernel, got {hidden}")
    hp, k = padded_width(max(hidden)), layers[-1][0].shape[2] // 2
    kp = max(16, triton.next_power_of_2(k))

    def pad(t, *widths):  # zero-pad the trailing dims of t up to widths
        spec = [p for size, want in zip(reversed(t.shape), reversed(widths), strict=False)
                for p in (0, want - size)]
        return F.pad(t.to(device=device, dtype=torch.float32), spec)

    (w1, b1), hidden_layers, (wo, bo) = layers[0], layers[1:-1], layers[-1]
    b1 = b1.double().cpu() + torch.einsum("d,mdh->mh", centre.double(), w1.double().cpu())
    members = w1.shape[0]
    if hidden_layers:
        wh = torch.stack([pad(w, hp, hp) for w, _ in hidden_layers], dim=1)
        bh = torch.stack([pad(b, hp) for _, b in hidden_layers], dim=1)
    else:
        wh = torch.zeros((members, 1, 16, 16), device=device)  # never read when L = 1
        bh = torch.zeros((members, 1, 16), device=device)
    wo_p = torch.cat((pad(wo[..., :k], hp, kp), pad(wo[..., k:], hp, kp)), dim=2)
    bo_p = torch.cat((pad(bo[..., :k], kp), pad(bo[..., k:], kp)), dim=1)
    def cast(t):  # the dot's operand: 16 bits, or fp32 rounded to tf32 (see _round_tf32)
        return (tf32_round(t) if precision == "tf32" else t.to(dtype)).contiguous()

    return PackedWeights(cast(pad(w1, w1.shape[1], hp)), pad(b1, hp), centre.to(device), cast(wh),
                         bh.contiguous(), wo_p.contiguous(), bo_p.contiguous(), hp, kp, len(layers) - 1,
                         tuple((tuple(w.shape), tuple(b.shape)) for w, b in layers), precision,
                         precision != "fp32" if split_input is None else split_input)


def fitted_centre(w1: torch.Tensor, b1: torch.Tensor, prior: float = 1.0) -> torch.Tensor:
    """A centre for `pack_weights` from the first layer alone, for bundles that do not store their
    training mean: the x nearest `prior` (1: continuum-normalised flux) with x W1 + b1 ~ 0 for every
    member, by ridge least squares in float64. A folded standardisation makes that x the training
    mean wherever W1 looks (ob-default: 0.002 rms from the mean of 1024 real spectra,
    bench/precision_bench.py)."""
    a = w1.double().cpu().permute(1, 0, 2).reshape(w1.shape[1], -1)  # [D, M*H]
    gram = a @ a.T
    ridge = _CENTRE_RIDGE * gram.diagonal().mean()
    rhs = a @ -b1.double().cpu().reshape(-1) + ridge * prior
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), rhs)


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to the nearest tf32 (ties away from zero), bit for bit `_round_tf32`."""
    t = t.float().contiguous()
    rounded = ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(t.abs() < float("inf"), rounded, t)
