"""The fused ensemble x MC-dropout kernel (Triton) and its launcher `ensemble_stats_triton`.

What it computes: DESIGN.md "The numerics", exactly as `reference.ensemble_stats_reference` does, with
the same masks bit for bit (`rng` device form, generated in-kernel). Grid (programs over tiles of
BLOCK_B spectra, members). A program owns one member m: per tile it computes h1 = act(x W1 + b1) once,
all HP columns at once (a [BLOCK_B, D] x [D, HP] GEMM over D chunks), then walks the S samples SB at a
time as GEMMs of R = BLOCK_B * SB rows (spectrum-major): masks z_1 on h1, every hidden layer
(acc * 1/(1-p) + b, act, mask), the 2K-wide head (in fp32, fused into the last hidden layer), softplus,
and a Chan/Welford merge of the chunk's per-target mean, M2 and sum of variances. Per (member,
spectrum, target) it writes those three numbers; a second stage (a few torch ops on [M, B, K]) merges
members — equal counts, fixed order — then de-standardises and calibrates. Members sit in the grid
rather than a loop so that a 1k-spectrum batch already fills an H100 (at BLOCK_B = 32, its 32 tiles x 8
members are capped by the persistent grid to 16 x 8 = 128 programs for 132 SMs) at no cost but 3*K
floats per member. p = 0 runs one sample (all S are identical), so S = 1, p = 0 is a plain deep ensemble.

Rounding (see `pack_weights`): the input is centred in fp32 on a fixed per-model point and cast as
two terms, hi + lo; "tf32" rounds every operand to nearest (`_round_tf32`) because the tensor core
truncates.
`emulate.ensemble_stats_emulated` models all of this in float64 for checks at scale on a CPU.

What stays where (the roofline design; its FLOP/byte model is `bench/kernel_bench.py`'s
`kernel_traffic`): activations never leave the SM. h1 [BLOCK_B, HP] and each layer's input [R, HP] are
register tiles (Triton exposes no addressable shared memory; the compiler stages dot operands through
it). A hidden layer multiplies the whole input tile (K = HP) by one [HP, BLOCK_N] weight tile per
BLOCK_N output columns, applies bias, activation and mask to that [R, BLOCK_N] result while it is in
registers, and joins the column blocks on chip (`_hidden`, `_cat`) into the next layer's input; the last
hidden layer's blocks go straight into the fp32 head and are never assembled. So the only traffic
between the SMs and L2/HBM is x and W1 once per (tile, member), each later layer's weights once per
(tile, member, sample chunk) — R FLOP per byte of 16-bit weights — and 3*K floats per (member,
spectrum) out. Registers bound R: a layer holds its input and its assembled output (2 * R * HP * 2
bytes) plus the accumulator, so R <= 128 at HP = 256 and R <= 64 at HP = 512 (CONFIGS). Hidden widths
are padded to powers of two (`packing.padded_width`): Triton's tiles have power-of-two shapes.

Not measured: there was no GPU where this was written. Correctness is tested under TRITON_INTERPRET=1
at small shapes; speed is untested (`bash bench/gpu_check.sh` runs the tests and benches). Autotuning
ignores the batch size, so within one process a spectrum's result does not depend on its batch; a
different autotune pick (another run or device) can change results by rounding only.

Unverified on hardware (the interpreter runs each program as one thread, checks no resource limits
and cannot show races; bench/gpu_check.sh runs the kernel tests with TRITON_INTERPRET=0 on a GPU):
- Resource fit: the register budget above is computed, not compiled; a config that spills runs
  slowly rather than wrongly, and the autotuner discards configs that raise OutOfResources (shared
  memory for a [HP, BLOCK_N] weight tile and the staged [R, HP] input: 128 KB at HP = 512, R = 64,
  BLOCK_N = 64, fp16). 4-byte ("tf32"/"fp32") activations double every figure.
- Code generation of the recursive `_hidden` (one specialisation per constexpr WIDTH) and of the
  `tl.join`/`tl.permute`/`tl.reshape` register shuffles in `_cat` and the mask and sample reshapes.
- Latency hiding: a K = HP dot has no K loop for the compiler to software-pipeline; the unrolled
  column blocks of `_hidden` are independent, which leaves it room to issue the next weight tile's
  loads and the masks' integer hashing under the current block's MMAs.
- The fp32 head: [R, BLOCK_N] x [BLOCK_N, KP] "ieee" dots per column block of the last hidden layer run
  on the CUDA cores, not the tensor cores (2 * 2 KP / HP of that layer's FLOPs: 12% at HP = 256,
  KP = 16); their [R, KP] accumulators stay in registers across the blocks.
- Batch independence: Triton specialises integer arguments equal to 1 or divisible by 16 (B, D, S),
  which changes alignment and vectorisation of loads, not the order of the arithmetic; expected
  bit-identical across batch sizes, shown only under the interpreter.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from . import rng
from .packing import PRECISIONS, PackedWeights, pack_weights
from .reference import check_inputs, finish
from .rng import keep_mask_tl, stream_tl


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == "silu":
        return v / (1.0 + tl.exp(-v))
    else:
        return tl.where(v < 0.0, 0.0, v)  # not tl.maximum: it would turn a NaN row into zeros


@triton.jit
def _softplus(v):
    e = tl.exp(tl.minimum(v, -5.0))  # below -5: log1p(e) by its series, accurate where log(1 + e) is not
    return tl.where(v < -5.0, e * (1.0 - e * (0.5 - e / 3.0)),
                    tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v))))


@triton.jit
def _round_tf32(v):
    """fp32 -> the nearest tf32 (10-bit mantissa, ties away from zero), bit for bit `tf32_round`. A tensor
    core reads only the top 19 bits of a tf32 operand: unrounded, every product would be cut towards
    zero, a bias that adds up over layers. NaN and inf pass unchanged."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < float("inf"), rounded, v)


@triton.jit
def _operand(v, dtype, ROUND: tl.constexpr):
    """An fp32 value as the next dot reads it: ROUND "cast" (to dtype) or "tf32"."""
    if ROUND == "tf32":
        return _round_tf32(v)
    else:
        return v.to(dtype)


@triton.jit
def _cat(a, b):
    """[R, W] and [R, W] -> [R, 2W], a's columns then b's: a change of register layout, on chip."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _hidden(h, w_l, b_l, stream, threshold, scale, n0, dtype, WIDTH: tl.constexpr, R: tl.constexpr,
            HP: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, ROUND: tl.constexpr):
    """Columns n0 .. n0 + WIDTH of the next activation, masked and rounded as the next dot reads it:
    act(h @ W[:, cols] / (1 - p) + b) * z, BLOCK_N columns per dot (the whole of h, K = HP, against a
    [HP, BLOCK_N] weight tile), the halves joined on chip: the activation never leaves the SM."""
    if WIDTH == BLOCK_N:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(w_l + tl.arange(0, HP)[:, None] * HP + offs_n[None, :])
        acc = tl.dot(h, w, tl.zeros((R, BLOCK_N), dtype=tl.float32), input_precision=DOT_PRECISION)
        out = _act(acc * scale + tl.load(b_l + offs_n)[None, :], ACT)
        if DROPOUT:
            out = tl.where(keep_mask_tl(stream, n0 // 2, threshold, R, BLOCK_N), out, 0.0)
        return _operand(out, dtype, ROUND)
    else:
        half: tl.constexpr = WIDTH // 2
        return _cat(_hidden(h, w_l, b_l, stream, threshold, scale, n0, dtype, half, R, HP, BLOCK_N, ACT,
                            DROPOUT, DOT_PRECISION, ROUND),
                    _hidden(h, w_l, b_l, stream, threshold, scale, n0 + half, dtype, half, R, HP, BLOCK_N,
                            ACT, DROPOUT, DOT_PRECISION, ROUND))


@triton.jit
def _head(h, w_o, offs_n, offs_k, KP: tl.constexpr, mu, raw):
    """(mu, raw) += h[:, offs_n] @ W_o[offs_n, means | raw variances], in fp32 ("ieee")."""
    w_mu = tl.load(w_o + offs_n[:, None] * 2 * KP + offs_k[None, :])
    w_raw = tl.load(w_o + offs_n[:, None] * 2 * KP + KP + offs_k[None, :])
    return (tl.dot(h, w_mu, mu, input_precision="ieee"), tl.dot(h, w_raw, raw, input_precision="ieee"))


@triton.jit
def _ensemble_kernel(x_ptr, rows_ptr, centre_ptr, w1_ptr, b1_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr,
                     mean_ptr, m2_ptr, var_ptr,
                     B, D, M, S, K, threshold, scale, var_eps,
                     HP: tl.constexpr, KP: tl.constexpr, NUM_HIDDEN: tl.constexpr, ACT: tl.constexpr,
                     DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     SPLIT_INPUT: tl.constexpr, ROUND: tl.constexpr,
                     BLOCK_B: tl.constexpr, SB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    R: tl.constexpr = BLOCK_B * SB
    pid, m, n_prog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    dtype = w1_ptr.dtype.element_ty
    w1 = w1_ptr + m.to(tl.int64) * D * HP
    w_o = wo_ptr + m.to(tl.int64) * HP * 2 * KP
    member = m.to(tl.uint32)
    offs_bb, offs_r, offs_h = tl.arange(0, BLOCK_B), tl.arange(0, R), tl.arange(0, HP)
    offs_d, offs_n0, offs_k = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N), tl.arange(0, KP)
    for tile in range(pid, tl.cdiv(B, BLOCK_B), n_prog):
        offs_b = tile * BLOCK_B + offs_bb
        valid_b = offs_b < B
        # ---- first layer, once per (tile, member), all HP columns at once: h1 = act(x W1 + b1)
        acc = tl.zeros((BLOCK_B, HP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            in_d = (d0 + offs_d) < D
            xa = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * D + (d0 + offs_d)[None, :],
                         mask=valid_b[:, None] & in_d[None, :], other=0.0)
            xa -= tl.load(centre_ptr + d0 + offs_d, mask=in_d, other=0.0)[None, :]  # fp32, then cast
            w = tl.load(w1 + (d0 + offs_d)[:, None] * HP + offs_h[None, :], mask=in_d[:, None], other=0.0)
            hi = _operand(xa, dtype, ROUND)
            acc = tl.dot(hi, w, acc, input_precision=DOT_PRECISION)
            if SPLIT_INPUT:  # x = hi + lo: the 16-bit cast of the input is the largest rounding
                lo = _operand(xa - hi.to(tl.float32), dtype, ROUND)
                acc = tl.dot(lo, w, acc, input_precision=DOT_PRECISION)
        h1 = _operand(_act(acc + tl.load(b1_ptr + m * HP + offs_h)[None, :], ACT), dtype, ROUND)
        # ---- samples, SB at a time: rows r = (spectrum r // SB, sample s0 + r % SB)
        rb = offs_r // SB
        row_key = tl.load(rows_ptr + tile * BLOCK_B + rb, mask=tile * BLOCK_B + rb < B, other=0).to(tl.uint32)
        mean = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        var_sum = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        for s0 in range(0, S, SB):
            rs = s0 + offs_r % SB
            sample = rs.to(tl.uint32)
            h = tl.reshape(tl.broadcast_to(h1[:, None, :], (BLOCK_B, SB, HP)), (R, HP))  # h1 per sample
            if DROPOUT:
                keep = keep_mask_tl(stream_tl(row_key, member, sample, 1), 0, threshold, R, HP)
                h = tl.where(keep, h, 0.0).to(h1.dtype)
            # ---- hidden layers, then the head. The head runs in fp32 (its weights are fp32, its dot
            # "ieee"): rounding the head's input to 16 bits moved a mean by up to 2.8% of a small
            # sigma. With two or more hidden layers it is fused into the last one, whose fp32
            # activations feed it BLOCK_N columns at a time and are never assembled.
            mu = tl.zeros((R, KP), dtype=tl.float32)
            raw = tl.zeros((R, KP), dtype=tl.float32)
            if NUM_HIDDEN == 1:
                mu, raw = _head(h.to(tl.float32), w_o, offs_h, offs_k, KP, mu, raw)
            for layer in tl.static_range(1, NUM_HIDDEN):  # h_layer (masked) -> h_{layer+1}, then z_{layer+1}
                w_l = wh_ptr + (m * (NUM_HIDDEN - 1) + layer - 1).to(tl.int64) * HP * HP
                b_l = bh_ptr + (m * (NUM_HIDDEN - 1) + layer - 1) * HP
                stream = stream_tl(row_key, member, sample, layer + 1)
                if layer < NUM_HIDDEN - 1:
                    h = _hidden(h, w_l, b_l, stream, threshold, scale, 0, dtype, HP, R, HP, BLOCK_N, ACT,
                                DROPOUT, DOT_PRECISION, ROUND)
                else:
                    for n0 in range(0, HP, BLOCK_N):
                        offs_n = n0 + offs_n0
                        w = tl.load(w_l + offs_h[:, None] * HP + offs_n[None, :])
                        acc = tl.dot(h, w, tl.zeros((R, BLOCK_N), dtype=tl.float32),
                                     input_precision=DOT_PRECISION)
                        out = _act(acc * scale + tl.load(b_l + offs_n)[None, :], ACT)
                        if DROPOUT:
                            out = tl.where(keep_mask_tl(stream, n0 // 2, threshold, R, BLOCK_N), out, 0.0)
                        mu, raw = _head(out, w_o, offs_n, offs_k, KP, mu, raw)
            mu = mu * scale + tl.load(bo_ptr + m * 2 * KP + offs_k)[None, :]
            var = _softplus(raw * scale + tl.load(bo_ptr + m * 2 * KP + KP + offs_k)[None, :]) + var_eps
            # ---- merge this chunk's samples into the running (mean, M2, sum var): Chan et al. (1979)
            valid = tl.reshape(tl.broadcast_to((rs < S)[:, None], (R, KP)), (BLOCK_B, SB, KP))
            mu3 = tl.where(valid, tl.reshape(mu, (BLOCK_B, SB, KP)), 0.0)
            count = tl.minimum(S - s0, SB).to(tl.float32)
            seen = s0 * 1.0
            chunk_mean = tl.sum(mu3, axis=1) / count
            dev = tl.where(valid, mu3 - chunk_mean[:, None, :], 0.0)
            delta = chunk_mean - mean
            mean += delta * (count / (seen + count))
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (seen * count / (seen + count))
            var_sum += tl.sum(tl.where(valid, tl.reshape(var, (BLOCK_B, SB, KP)), 0.0), axis=1)
        out = (m.to(tl.int64) * B + offs_b)[:, None] * K + offs_k[None, :]  # M*B*K may pass 2**31
        ok = valid_b[:, None] & (offs_k < K)[None, :]
        tl.store(mean_ptr + out, mean, mask=ok)
        tl.store(m2_ptr + out, m2, mask=ok)
        tl.store(var_ptr + out, var_sum, mask=ok)


# ---- tile shapes -------------------------------------------------------------------------------

def _config(block_b, sb, block_d, block_n, warps, stages):
    return triton.Config(dict(BLOCK_B=block_b, SB=sb, BLOCK_D=block_d, BLOCK_N=block_n),
                         num_warps=warps, num_stages=stages)


# H100 candidates. R = BLOCK_B * SB rows per GEMM sets the intensity on weights (R FLOP/B, 16 bits);
# registers bound it (`layer_registers`): R = 128 at HP = 256, R = 64 at HP = 512. The 16-wide ones
# serve narrow test models.
CONFIGS = [
    _config(32, 4, 64, 64, 8, 3), _config(64, 2, 64, 64, 8, 3), _config(16, 4, 64, 64, 8, 3),
    _config(32, 2, 64, 64, 8, 3), _config(64, 1, 64, 128, 8, 3), _config(16, 2, 64, 64, 4, 3),
    _config(16, 4, 32, 16, 4, 2), _config(16, 2, 32, 32, 4, 2),
]
INTERPRETER_CONFIG = dict(BLOCK_B=16, SB=2, BLOCK_D=32, BLOCK_N=16)


REGISTER_BUDGET = 200 * 1024  # bytes of a 256 KB register file a program's layer may hold


def layer_registers(meta: dict, hp: int, elt: int = 2) -> int:
    """Bytes of registers a program holds in a hidden layer: its input and its assembled output
    [R, HP] (elt bytes each: 2 for fp16) and one [R, BLOCK_N] fp32 accumulator."""
    r = meta["BLOCK_B"] * meta["SB"]
    return 2 * r * hp * elt + r * meta["BLOCK_N"] * 4


def _fits(meta: dict, hp: int) -> bool:
    return hp % meta["BLOCK_N"] == 0


def _candidates(hp: int) -> list[triton.Config]:
    """The autotuner's configs at padded width hp: those that tile it and keep a layer in registers."""
    return [c for c in CONFIGS if _fits(c.kwargs, hp) and layer_registers(c.kwargs, hp) <= REGISTER_BUDGET]


def _check_config(config: dict, hp: int) -> None:
    """Refuse fixed tile shapes the kernel would read or write out of bounds with (no GPU-side check)."""
    names = ("BLOCK_B", "SB", "BLOCK_D", "BLOCK_N")
    if sorted(config) != sorted(names):
        raise ValueError(f"config must give exactly {names}, got {sorted(config)}")
    if any(v < 1 or v & (v - 1) for v in config.values()) or min(config[n] for n in names if n != "SB") < 16:
        raise ValueError(f"config values must be powers of two, >= 16 except SB, got {config}")
    if not _fits(config, hp):
        raise ValueError(f"BLOCK_N must divide the padded hidden width {hp}, got {config}")


def _persistent_programs(device: torch.device, members: int, max_tiles: int) -> int:
    """Programs per member: about one per SM over all members on a GPU, one per tile otherwise."""
    if _interpreting() or device.type != "cuda":
        return max_tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(max_tiles, max(1, sms // members))


@functools.cache
def _tuned_kernel(hp: int):
    configs = _candidates(hp)
    key = ["D", "M", "S", "K", "HP", "NUM_HIDDEN", "DROPOUT", "DOT_PRECISION"]  # not B: see the docstring
    return triton.autotune(configs, key=key)(_ensemble_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- launcher ----------------------------------------------------------------------------------

def ensemble_stats_triton(x, keys, layers, *, p: float, samples: int, seed: int, activation: str = "relu",
                          var_eps: float = 1e-6, label_mean=None, label_std=None, calibration=None,
                          precision: str = "fp16", partials=None, config: dict | triton.Config | None = None):
    """Same arguments and result as `ensemble_stats_reference` (float32 [B, K] tensors on x's device).

    `layers` may also be `pack_weights(layers, precision)`, packed once for many batches.

    `precision` (replaces the reference's `dtype`): one of `packing.PRECISIONS`, "fp16" (default:
    fp16 weights, inputs and activations with fp32 accumulation), "tf32" or "fp32". On the shipped
    model (inputs centred and split, see `pack_weights`) fp16 and tf32 keep every mean within 1% of
    sigma of the float64 reference (bench/precision_bench.py). `partials`: optional per-member output buffers
    (mean, M2, sum var), each float32 [M, B, K] (tests poison them). `config`: fixed tile shapes
    instead of autotuning, a dict of block sizes or one of CONFIGS (then with its warps and stages);
    under TRITON_INTERPRET=1 the default is INTERPRETER_CONFIG, widened.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if isinstance(layers, PackedWeights) and layers.precision != precision:
        raise ValueError(f"weights were packed for {layers.precision!r}, not {precision!r}")
    shapes = layers.shape_only() if isinstance(layers, PackedWeights) else layers
    x, keys, members, k = check_inputs(x, keys, shapes, p, samples, activation)
    device = x.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton kernel needs x on a CUDA device (or TRITON_INTERPRET=1), got {device}")
    packed = layers if isinstance(layers, PackedWeights) else pack_weights(layers, precision, device)
    if packed.w1.device != device:
        raise ValueError(f"weights were packed on {packed.w1.device}, but x is on {device}")
    x = x.to(device=device, dtype=torch.float32).contiguous()
    rows = rng.int32_bits(rng.row_keys(seed, keys.to(device)))
    n, d = x.shape
    s_eff = samples if p > 0 else 1  # p = 0: all samples identical, one suffices
    if partials is None:
        partials = tuple(torch.empty((members, n, k), dtype=torch.float32, device=device) for _ in range(3))
    if len(partials) != 3 or any(t.shape != (members, n, k) or t.dtype != torch.float32 or t.device != device
                                 or not t.is_contiguous() for t in partials):
        raise ValueError(f"partials must be three contiguous float32 [{members}, {n}, {k}] tensors "
                         f"on {device}")
    if n == 0:
        return finish(*(t.sum(0) for t in partials), label_mean, label_std, calibration)
    launch = {}  # a triton.Config from CONFIGS brings its warps and stages, as the autotuner runs it
    if isinstance(config, triton.Config):
        config, launch = dict(config.kwargs), dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config is None and _interpreting():  # wider blocks where they fit: fewer, faster numpy steps
        config = {**INTERPRETER_CONFIG, "BLOCK_D": 128, "BLOCK_N": min(packed.hp, 64)}
    if config is not None:
        _check_config(config, packed.hp)
    candidates = [config] if config is not None else [c.kwargs for c in _candidates(packed.hp)]
    max_tiles = max(triton.cdiv(n, c["BLOCK_B"]) for c in candidates)
    programs = _persistent_programs(device, members, max_tiles)
    args = (x, rows, packed.centre, packed.w1, packed.b1, packed.wh, packed.bh, packed.wo, packed.bo,
            *partials, n, d, members, s_eff, k, rng.mask_threshold(p), rng.dropout_scale(p), var_eps)
    meta = dict(HP=packed.hp, KP=packed.kp, NUM_HIDDEN=packed.num_hidden, ACT=activation, DROPOUT=p > 0,
                DOT_PRECISION=PRECISIONS[precision][1], SPLIT_INPUT=packed.split_input,
                ROUND="tf32" if precision == "tf32" else "cast")
    if config is not None:
        grid = (min(programs, triton.cdiv(n, config["BLOCK_B"])), members)
        _ensemble_kernel[grid](*args, **meta, **config, **launch)
    else:
        kernel = _tuned_kernel(packed.hp)
        kernel[lambda c: (min(programs, triton.cdiv(n, c["BLOCK_B"])), members)](*args, **meta)
    mean_m, m2_m, var_m = partials
    mean = mean_m.mean(dim=0)  # members have equal counts: Chan's merge reduces to these sums
    epistemic = (m2_m.sum(dim=0) + s_eff * ((mean_m - mean) ** 2).sum(dim=0)) / (members * s_eff)
    return finish(mean, var_m.sum(dim=0) / (members * s_eff), epistemic, label_mean, label_std, calibration)
