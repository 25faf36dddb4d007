"""The fused ensemble x MC-dropout kernel (Triton) and its launcher `ensemble_stats_triton`.

What it computes: DESIGN.md "The numerics", exactly as `reference.ensemble_stats_reference` does, with
the same masks bit for bit (`rng` device form, generated in-kernel). Grid (programs over tiles of
BLOCK_B spectra, members). A program owns one member m: per tile it computes h1 = act(x W1 + b1) once (a
[BLOCK_B, D] x [D, HP] GEMM over D chunks), then walks the S samples SB at a time as a GEMM of R =
BLOCK_B * SB rows (spectrum-major): masks z_1 on h1, every hidden layer (acc * 1/(1-p) + b, act, mask),
the 2K-wide head (in fp32, fused into the last hidden layer), softplus, and a Chan/Welford merge of the
chunk's per-target mean, M2 and sum of variances in registers. Per (member, spectrum, target) it writes
those three numbers; a second stage (a few torch ops on [M, B, K]) merges members — equal counts, fixed
order — then de-standardises and calibrates. Members sit in the grid rather than a loop so that a
1k-spectrum batch already fills an H100 (at BLOCK_B = 32, its 32 tiles x 8 members are capped by the
persistent grid to 16 x 8 = 128 programs for 132 SMs) at no cost but 3*K floats per member. p = 0 runs
one sample (all S are identical), so S = 1, p = 0 is a plain deep ensemble.

Rounding (see `pack_weights`): the input is centred in fp32 on a fixed per-model point and cast as
two terms, hi + lo; "tf32" rounds every operand to nearest (`_round_tf32`) because the tensor core
truncates.
`emulate.ensemble_stats_emulated` models all of this in float64 for checks at scale on a CPU.

What stays where: weights stream from L2/HBM once per (tile, member, sample chunk), so the
arithmetic intensity on weights is R flops/byte (fp16); accumulators, masks, RNG state and the
running statistics live in registers. Triton exposes no addressable shared memory, and an [R, 512]
activation does not fit registers (kept there as register tiles, the activations of width 512 spill
kilobytes per thread: docs/record.md, "Inference kernels"), so each program keeps h1 and two ping-pong
activations of its tile in a private scratch slab (BLOCK_B*HP + 2*R*HP elements). This is a
deviation from "activations never touch device memory": the grid is persistent, one program per SM,
so on `survey` (fp16, 128 slabs on an H100) the slabs in use total 36-42 MB (computed from the shapes,
not measured), of the order of the H100's 50 MB L2 — mostly L2 traffic, part may spill to HBM.
`tl.debug_barrier()` orders a layer's writes before the next reads.

Correctness: tests under TRITON_INTERPRET=1 at small shapes, and the tests and the precision bench on
an H200 at the shipped model's shapes; speed: measured on an H200 at the `seed` shapes only
(`bash bench/gpu_check.sh` runs the tests and benches; bench/results/nvidia_h200); `survey` shapes
and other GPUs unmeasured. Autotuning
ignores the batch size, so within one process a spectrum's result does not depend on its batch; a
different autotune pick (another run or device) can change results by rounding only.

Checked on hardware only in part (the interpreter runs each program as one thread, checks no resource
limits and cannot show races; bench/gpu_check.sh runs the kernel tests with TRITON_INTERPRET=0 on a
GPU; on an H200 the shipped model's results matched the float64 reference as the emulation does,
bench/results/nvidia_h200, which a stale scratch read or a wrong reshape would have broken):
- Scratch visibility: activations written by some threads of a program are read by others after
  `tl.debug_barrier()` (bar.sync, which CUDA defines to make global writes visible block-wide),
  including through the software-pipelined loads of `_dense`; a stale read would show as a mismatch
  with the reference.
- Resource fit: measured without a GPU, from the sm_90 binaries Triton's ptxas builds here
  (`compiled_resources`, bench/results/kernel_model.md): every config in CONFIGS compiles at widths 256
  and 512 with 134-242 registers per thread and no spills (tested), and 40-80 KB of shared memory
  (6 KB for the 16-wide one).
  4-byte ("tf32"/"fp32") operands double the shared memory; the autotuner discards configs that raise
  OutOfResources (a fixed `config` has no fallback).
- Lowering of `tl.join`/`tl.reshape` on boolean masks and of the [R, KP] -> [BLOCK_B, SB, KP] reshape:
  it compiles; its results are checked only under the interpreter.
- The fp32 head: two [R, BLOCK_N] x [BLOCK_N, KP] "ieee" dots per chunk of the last hidden layer run
  on the CUDA cores, not the tensor cores (2 * 2 KP / HP of that layer's FLOPs: 12% at HP = 256,
  KP = 16); their [R, KP] accumulators stay in registers across the chunks.
- Batch independence: Triton specialises integer arguments equal to 1 or divisible by 16 (B, D, S),
  which changes alignment and vectorisation of loads, not the order of the arithmetic; expected
  bit-identical across batch sizes, shown only under the interpreter.
"""

import functools
import os
import re
import subprocess
import tempfile

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
    """An fp32 value as the dot and the scratch hold it: ROUND "cast" (to dtype) or "tf32"."""
    if ROUND == "tf32":
        return _round_tf32(v)
    else:
        return v.to(dtype)


@triton.jit
def _dense(a_ptr, w_ptr, w_stride, n0, R: tl.constexpr, HP: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[R, BLOCK_N] = A[R, HP] @ W[HP, n0:n0+BLOCK_N], A row-major in scratch, fp32 accumulation."""
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HP, BLOCK_K):
        a = tl.load(a_ptr + offs_r[:, None] * HP + (k0 + offs_k)[None, :])
        w = tl.load(w_ptr + (k0 + offs_k)[:, None] * w_stride + offs_n[None, :])
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _head(h, w_o, offs_n, offs_k, KP: tl.constexpr, mu, raw):
    """(mu, raw) += h[:, offs_n] @ W_o[offs_n, means | raw variances], in fp32 ("ieee")."""
    w_mu = tl.load(w_o + offs_n[:, None] * 2 * KP + offs_k[None, :])
    w_raw = tl.load(w_o + offs_n[:, None] * 2 * KP + KP + offs_k[None, :])
    return (tl.dot(h, w_mu, mu, input_precision="ieee"), tl.dot(h, w_raw, raw, input_precision="ieee"))


@triton.jit
def _ensemble_kernel(x_ptr, rows_ptr, centre_ptr, w1_ptr, b1_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr,
                     mean_ptr, m2_ptr, var_ptr, scratch_ptr,
                     B, D, M, S, K, threshold, scale, var_eps, scratch_stride,
                     HP: tl.constexpr, KP: tl.constexpr, NUM_HIDDEN: tl.constexpr, ACT: tl.constexpr,
                     DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     SPLIT_INPUT: tl.constexpr, ROUND: tl.constexpr,
                     BLOCK_B: tl.constexpr, SB: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    R: tl.constexpr = BLOCK_B * SB
    pid, m, n_prog = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    dtype = w1_ptr.dtype.element_ty
    h1_buf = scratch_ptr + (m * n_prog + pid).to(tl.int64) * scratch_stride
    buf_a = h1_buf + BLOCK_B * HP
    buf_b = buf_a + R * HP
    w1 = w1_ptr + m.to(tl.int64) * D * HP
    member = m.to(tl.uint32)
    offs_bb, offs_r = tl.arange(0, BLOCK_B), tl.arange(0, R)
    offs_d, offs_n0, offs_k = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N), tl.arange(0, KP)
    for tile in range(pid, tl.cdiv(B, BLOCK_B), n_prog):
        offs_b = tile * BLOCK_B + offs_bb
        valid_b = offs_b < B
        # ---- first layer, once per (tile, member): h1 = act(x W1 + b1) -> scratch
        for n0 in range(0, HP, BLOCK_N):
            offs_n = n0 + offs_n0
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                in_d = (d0 + offs_d) < D
                xa = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * D + (d0 + offs_d)[None, :],
                             mask=valid_b[:, None] & in_d[None, :], other=0.0)
                xa -= tl.load(centre_ptr + d0 + offs_d, mask=in_d, other=0.0)[None, :]  # fp32, then cast
                w = tl.load(w1 + (d0 + offs_d)[:, None] * HP + offs_n[None, :], mask=in_d[:, None], other=0.0)
                hi = _operand(xa, dtype, ROUND)
                acc = tl.dot(hi, w, acc, input_precision=DOT_PRECISION)
                if SPLIT_INPUT:  # x = hi + lo: the 16-bit cast of the input is the largest rounding
                    lo = _operand(xa - hi.to(tl.float32), dtype, ROUND)
                    acc = tl.dot(lo, w, acc, input_precision=DOT_PRECISION)
            h = _act(acc + tl.load(b1_ptr + m * HP + offs_n)[None, :], ACT)
            tl.store(h1_buf + offs_bb[:, None] * HP + offs_n[None, :], _operand(h, dtype, ROUND))
        tl.debug_barrier()
        # ---- samples, SB at a time: rows r = (spectrum r // SB, sample s0 + r % SB)
        rb = offs_r // SB
        row_key = tl.load(rows_ptr + tile * BLOCK_B + rb, mask=tile * BLOCK_B + rb < B, other=0).to(tl.uint32)
        mean = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        var_sum = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
        for s0 in range(0, S, SB):
            rs = s0 + offs_r % SB
            sample = rs.to(tl.uint32)
            stream = stream_tl(row_key, member, sample, 1)
            for n0 in range(0, HP, BLOCK_N):  # z_1 on h1: scratch h1 -> buf_a, rows replicated per sample
                offs_n = n0 + offs_n0
                h = tl.load(h1_buf + rb[:, None] * HP + offs_n[None, :])
                if DROPOUT:
                    h = tl.where(keep_mask_tl(stream, n0 // 2, threshold, R, BLOCK_N), h, 0.0)
                tl.store(buf_a + offs_r[:, None] * HP + offs_n[None, :], h)
            tl.debug_barrier()
            # ---- hidden layers and the head. The head runs in fp32 (its weights are fp32, its dot
            # "ieee"): rounding the head's input to 16 bits moved a mean by up to 2.8% of a small
            # sigma. With two or more hidden layers it is fused into the last one, whose fp32
            # activations feed it chunk by chunk and never go to scratch.
            w_o = wo_ptr + m.to(tl.int64) * HP * 2 * KP
            mu = tl.zeros((R, KP), dtype=tl.float32)
            raw = tl.zeros((R, KP), dtype=tl.float32)
            if NUM_HIDDEN == 1:
                for n0 in range(0, HP, BLOCK_N):
                    offs_n = n0 + offs_n0
                    h = tl.load(buf_a + offs_r[:, None] * HP + offs_n[None, :]).to(tl.float32)
                    mu, raw = _head(h, w_o, offs_n, offs_k, KP, mu, raw)
            src, dst = buf_a, buf_b
            for layer in tl.static_range(1, NUM_HIDDEN):  # h_layer (masked) -> h_{layer+1}, then z_{layer+1}
                w_l = wh_ptr + (m * (NUM_HIDDEN - 1) + layer - 1).to(tl.int64) * HP * HP
                b_l = bh_ptr + (m * (NUM_HIDDEN - 1) + layer - 1) * HP
                stream = stream_tl(row_key, member, sample, layer + 1)
                for n0 in range(0, HP, BLOCK_N):
                    offs_n = n0 + offs_n0
                    acc = _dense(src, w_l, HP, n0, R, HP, BLOCK_K, BLOCK_N, DOT_PRECISION)
                    h = _act(acc * scale + tl.load(b_l + offs_n)[None, :], ACT)
                    if DROPOUT:
                        h = tl.where(keep_mask_tl(stream, n0 // 2, threshold, R, BLOCK_N), h, 0.0)
                    if layer == NUM_HIDDEN - 1:
                        mu, raw = _head(h, w_o, offs_n, offs_k, KP, mu, raw)
                    else:
                        tl.store(dst + offs_r[:, None] * HP + offs_n[None, :], _operand(h, dtype, ROUND))
                tl.debug_barrier()
                src, dst = dst, src
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
            tl.debug_barrier()  # the next chunk overwrites the scratch activations
        out = (m.to(tl.int64) * B + offs_b)[:, None] * K + offs_k[None, :]  # M*B*K may pass 2**31
        ok = valid_b[:, None] & (offs_k < K)[None, :]
        tl.store(mean_ptr + out, mean, mask=ok)
        tl.store(m2_ptr + out, m2, mask=ok)
        tl.store(var_ptr + out, var_sum, mask=ok)


# ---- tile shapes -------------------------------------------------------------------------------

def _config(block_b, sb, block_d, block_k, block_n, warps, stages):
    return triton.Config(dict(BLOCK_B=block_b, SB=sb, BLOCK_D=block_d, BLOCK_K=block_k, BLOCK_N=block_n),
                         num_warps=warps, num_stages=stages)


# H100 candidates: R = BLOCK_B * SB rows per GEMM sets the intensity on weights; BLOCK_N bounds the
# fp32 accumulator (R x BLOCK_N / threads registers); BLOCK_B >= 64 puts the first layer on wgmma.
# Kept: R = 128 shapes that compile for sm_90, specialised as at real shapes, without spilling at
# hidden widths 256 and 512 (`compiled_resources`, tested). The 16-wide one serves narrow models.
CONFIGS = [
    _config(16, 8, 64, 32, 128, 8, 3), _config(32, 4, 64, 64, 64, 8, 3), _config(32, 4, 64, 32, 64, 8, 3),
    _config(16, 8, 64, 64, 64, 8, 3), _config(64, 2, 32, 64, 64, 8, 3), _config(16, 4, 32, 16, 16, 4, 2),
]
INTERPRETER_CONFIG = dict(BLOCK_B=16, SB=2, BLOCK_D=32, BLOCK_K=16, BLOCK_N=16)


def _fits(meta: dict, hp: int) -> bool:
    return hp % meta["BLOCK_K"] == 0 and hp % meta["BLOCK_N"] == 0


def _check_config(config: dict, hp: int) -> None:
    """Refuse fixed tile shapes the kernel would read or write out of bounds with (no GPU-side check)."""
    names = ("BLOCK_B", "SB", "BLOCK_D", "BLOCK_K", "BLOCK_N")
    if sorted(config) != sorted(names):
        raise ValueError(f"config must give exactly {names}, got {sorted(config)}")
    if any(v < 1 or v & (v - 1) for v in config.values()) or min(config[n] for n in names if n != "SB") < 16:
        raise ValueError(f"config values must be powers of two, >= 16 except SB, got {config}")
    if not _fits(config, hp):
        raise ValueError(f"BLOCK_K and BLOCK_N must divide the padded hidden width {hp}, got {config}")


def _persistent_programs(device: torch.device, members: int, max_tiles: int) -> int:
    """Programs per member: about one per SM over all members on a GPU, one per tile otherwise."""
    if _interpreting() or device.type != "cuda":
        return max_tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(max_tiles, max(1, sms // members))


@functools.cache
def _tuned_kernel(hp: int):
    configs = [c for c in CONFIGS if _fits(c.kwargs, hp)]
    key = ["D", "M", "S", "K", "HP", "NUM_HIDDEN", "DROPOUT", "DOT_PRECISION"]  # not B: see the docstring
    return triton.autotune(configs, key=key)(_ensemble_kernel)


def _shape_meta(hp: int, kp: int, num_hidden: int, activation: str, dropout: bool, precision: str,
                split_input: bool) -> dict:
    """The kernel's constexpr arguments other than the tile shapes."""
    return dict(HP=hp, KP=kp, NUM_HIDDEN=num_hidden, ACT=activation, DROPOUT=dropout,
                DOT_PRECISION=PRECISIONS[precision][1], SPLIT_INPUT=split_input,
                ROUND="tf32" if precision == "tf32" else "cast")


def compiled_resources(config: triton.Config, hp: int, num_hidden: int, precision: str = "fp16",
                       arch: int = 90) -> dict:
    """Compile the kernel for an NVIDIA GPU of compute capability `arch` (no GPU needed: Triton's own
    ptxas) with dropout, ReLU and up to 16 targets, and read its resources from the binary: registers
    and spill stack per thread, shared memory per program. Returns dict(regs, spill_bytes, shared_bytes).
    What the interpreter cannot show: that the kernel compiles at all, and whether a config spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtype = "fp16" if PRECISIONS[precision][0] == torch.float16 else "fp32"  # the packed weights' dtype
    names = _ensemble_kernel.arg_names
    types = {"rows_ptr": "*i32", "w1_ptr": f"*{dtype}", "wh_ptr": f"*{dtype}", "scratch_ptr": f"*{dtype}",
             "scale": "fp32", "var_eps": "fp32"}
    constants = {**_shape_meta(hp, 16, num_hidden, "relu", True, precision, precision != "fp32"),
                 **config.kwargs}
    signature = {n: "constexpr" if n in constants else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
                 for n in names}
    # as the JIT specialises a launch at real shapes: 16-byte-aligned pointers, and B, D, S and the
    # scratch stride multiples of 16 (it then vectorises loads, which takes registers)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n.endswith("_ptr") or n in ("B", "D", "S", "scratch_stride")}
    kernel = triton.compile(ASTSource(_ensemble_kernel, signature, constexprs=constants, attrs=aligned),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return dict(regs=int(regs), spill_bytes=int(stack), shared_bytes=int(kernel.metadata.shared))


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
        wide = min(packed.hp, 64)
        config = {**INTERPRETER_CONFIG, "BLOCK_D": 128, "BLOCK_K": wide, "BLOCK_N": wide}
    if config is not None:
        _check_config(config, packed.hp)
    candidates = [config] if config is not None else [c.kwargs for c in CONFIGS if _fits(c.kwargs, packed.hp)]
    max_tiles = max(triton.cdiv(n, c["BLOCK_B"]) for c in candidates)
    programs = _persistent_programs(device, members, max_tiles)
    stride = max(c["BLOCK_B"] * packed.hp * (1 + 2 * c["SB"]) for c in candidates)
    scratch = torch.empty(programs * members * stride, dtype=packed.w1.dtype, device=device)
    args = (x, rows, packed.centre, packed.w1, packed.b1, packed.wh, packed.bh, packed.wo, packed.bo,
            *partials, scratch, n, d, members, s_eff, k, rng.mask_threshold(p), rng.dropout_scale(p), var_eps,
            stride)
    meta = _shape_meta(packed.hp, packed.kp, packed.num_hidden, activation, p > 0, precision,
                       packed.split_input)
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
