"""The dropout-mask RNG: `u(seed, key, member, sample, layer, unit)`, a pure function of its coordinates,
written twice side by side — host (torch int64 lanes, also serving NumPy) and device (Triton uint32) —
so that their bit-equality is visible; plus `id_keys`, the stable 64-bit key of a spectrum id.
Statistical quality for dropout masks, not cryptography. Holds no state: nothing here is seeded globally.

Construction (all arithmetic on 32-bit words, wrapping):
  lowbias32(x)     Wellons' 2-multiply integer finaliser (github.com/skeeto/hash-prospector, "lowbias32")
  mix(h, v)        = lowbias32(((h ^ v) + 0x9E3779B9) mod 2**32)
  row(seed, key)   = mix(mix(mix(mix(SALT, seed_lo), seed_hi), key_lo), key_hi)    once per spectrum
  stream           = mix(mix(mix(row, member), sample), layer)                     once per row, m, s, l
  draw             = mix(stream, unit >> 1)        one 32-bit draw serves two neighbouring units
  u16              = (draw >> (16 * (unit & 1))) & 0xFFFF,   u = u16 / 2**16 in [0, 1)
  keep (z = 1)     = u16 >= round(p * 2**16)
so p is quantised to 1/65536: `effective_p(p)` is the dropout rate actually applied (and the one the
1/(1-p) scale uses); record it in the manifest. Layers are 1-based: the mask on h_l uses layer = l.

Signedness: torch has no uint32 arithmetic on every op, so the host form keeps each word in an int64
lane in [0, 2**32) and masks after every step. The multipliers are written as signed 32-bit values
(congruent mod 2**32), so a product of a word and a multiplier stays below 2**63: no int64 overflow.

A third form, Numba (uint32 lanes), applies the masks on the CPU path in one fused,
parallel pass instead of a chain of torch integer ops.
"""

import numba
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MASK_BITS = 16  # bits of one draw per unit: p resolution 1/65536, two units per 32-bit draw
_MASK_ONE = 1 << MASK_BITS
_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # lowbias32 multipliers (hash-prospector); both < 2**31 once written signed
_MUL2 = 0x846CA68B
_MUL2_SIGNED = _MUL2 - (1 << 32)
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio
_SALT = 0x53544152  # "STAR": keeps row(0, 0) away from lowbias32's fixed point at 0


def mask_threshold(p: float) -> int:
    """The integer threshold t with keep = (u16 >= t); p must lie in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must lie in [0, 1), got {p}")
    t = int(round(p * _MASK_ONE))
    if t >= _MASK_ONE:
        raise ValueError(f"dropout p = {p} rounds to 1 at {MASK_BITS}-bit resolution")
    return t


def effective_p(p: float) -> float:
    """The dropout rate actually applied: p quantised to 1/65536 (record this in the manifest)."""
    return mask_threshold(p) / _MASK_ONE


def dropout_scale(p: float) -> float:
    """The inverted-dropout scale 1 / (1 - effective_p(p)), exact in float64."""
    return _MASK_ONE / (_MASK_ONE - mask_threshold(p))


# ---- host form: torch int64 lanes holding uint32 words ---------------------------------------------

def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2_SIGNED) & _M32
    return x ^ (x >> 16)


def _mix(h: torch.Tensor, v) -> torch.Tensor:
    return _lowbias32(((h ^ v) + _GOLDEN) & _M32)


def row_keys(seed: int, keys) -> torch.Tensor:
    """Per-spectrum 32-bit row hash of (seed, key) as int64 [B] in [0, 2**32); keys: int64 [B]."""
    keys = torch.as_tensor(np.asarray(keys, dtype=np.int64) if not torch.is_tensor(keys) else keys)
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64 (see id_keys), got {keys.dtype}")
    seed = int(seed) & ((1 << 64) - 1)
    h = torch.full_like(keys, _SALT)
    h = _mix(h, seed & _M32)
    h = _mix(h, seed >> 32)
    h = _mix(h, keys & _M32)
    return _mix(h, (keys >> 32) & _M32)


def streams(rows: torch.Tensor, members, samples, layer: int) -> torch.Tensor:
    """Stream words for every (row, member, sample) of one layer: shape [B, len(members), len(samples)]."""
    m = torch.as_tensor(members, dtype=torch.int64, device=rows.device)
    s = torch.as_tensor(samples, dtype=torch.int64, device=rows.device)
    h = _mix(rows[:, None], m[None, :])
    h = _mix(h[:, :, None], s[None, None, :])
    return _mix(h, layer)


def uniform16(stream: torch.Tensor, width: int) -> torch.Tensor:
    """u16 for units 0..width-1 of every stream word: shape [*stream.shape, width] (int64, < 2**16)."""
    pair = torch.arange((width + 1) // 2, dtype=torch.int64, device=stream.device)
    draw = _mix(stream[..., None], pair)
    halves = torch.stack((draw & 0xFFFF, draw >> 16), dim=-1)
    return halves.reshape(*stream.shape, -1)[..., :width]


def keep_masks(rows: torch.Tensor, members, samples, layer: int, width: int, p: float) -> torch.Tensor:
    """Dropout masks z (bool, True = keep) of one layer: shape [B, len(members), len(samples), width]."""
    return uniform16(streams(rows, members, samples, layer), width) >= mask_threshold(p)


# ---- device form: Triton uint32, the same steps ----------------------------------------------------

@triton.jit
def lowbias32_tl(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def mix_tl(h, v):
    """h: uint32 tensor; v: uint32 tensor or scalar of the same coordinates."""
    return lowbias32_tl((h ^ v) + 0x9E3779B9)


@triton.jit
def stream_tl(row, member, sample, layer):
    """row: uint32 [BLOCK_B]; member, sample, layer: uint32 scalars -> uint32 [BLOCK_B]."""
    return mix_tl(mix_tl(mix_tl(row, member), sample), layer)


@triton.jit
def keep_mask_tl(stream, pair0, threshold, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Keep mask [BLOCK_B, BLOCK_H] for units 2*pair0 .. 2*pair0 + BLOCK_H - 1 of each row's stream."""
    pair = (pair0 + tl.arange(0, BLOCK_H // 2)).to(tl.uint32)
    draw = mix_tl(stream[:, None], pair[None, :])
    lo = (draw & 0xFFFF) >= threshold
    hi = (draw >> 16) >= threshold
    return tl.reshape(tl.join(lo, hi), (BLOCK_B, BLOCK_H))


@triton.jit
def _uniform16_kernel(rows_ptr, out_ptr, n_rows, member, sample, layer, width,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Test kernel: u16 of every (row, unit) for one (member, sample, layer), as int32 [n_rows, width]."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row = tl.load(rows_ptr + offs_b, mask=offs_b < n_rows, other=0).to(tl.uint32)
    stream = stream_tl(row, member.to(tl.uint32), sample.to(tl.uint32), layer.to(tl.uint32))
    pair = tl.arange(0, BLOCK_H // 2).to(tl.uint32)
    draw = mix_tl(stream[:, None], pair[None, :])
    u = tl.reshape(tl.join(draw & 0xFFFF, draw >> 16), (BLOCK_B, BLOCK_H)).to(tl.int32)
    offs_h = tl.arange(0, BLOCK_H)
    ok = (offs_b[:, None] < n_rows) & (offs_h[None, :] < width)
    tl.store(out_ptr + offs_b[:, None] * width + offs_h[None, :], u, mask=ok)


def int32_bits(words: torch.Tensor) -> torch.Tensor:
    """uint32 words held in int64 lanes -> int32 with the same 32 bits (what Triton loads as uint32)."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def uniform16_triton(rows: torch.Tensor, member: int, sample: int, layer: int, width: int) -> torch.Tensor:
    """The device form of `uniform16(streams(rows, [member], [sample], layer), width)`: int32 [B, width]."""
    n = rows.shape[0]
    rows32 = int32_bits(rows)
    out = torch.empty((n, width), dtype=torch.int32, device=rows.device)
    block_h = triton.next_power_of_2(max(width, 2))
    _uniform16_kernel[(triton.cdiv(n, 16),)](rows32, out, n, member, sample, layer, width,
                                             BLOCK_B=16, BLOCK_H=block_h)
    return out


# ---- CPU form: Numba, fused with applying the mask ------------------------------------------------

# uint32 throughout, each step cast back to 32 bits, so that LLVM multiplies in 32-bit vector lanes
# (AVX2 has no 64-bit lane multiply): twice the speed of the same hash in uint64 with masks
_U16, _U15, _UHALF = np.uint32(16), np.uint32(15), np.uint32(0xFFFF)
_UMUL1, _UMUL2, _UGOLDEN = np.uint32(_MUL1), np.uint32(_MUL2), np.uint32(_GOLDEN)


@numba.njit(inline="always")
def _lowbias32_nb(x):
    x = np.uint32(x ^ (x >> _U16))
    x = np.uint32(x * _UMUL1)
    x = np.uint32(x ^ (x >> _U15))
    x = np.uint32(x * _UMUL2)
    return np.uint32(x ^ (x >> _U16))


@numba.njit(inline="always")
def _mix_nb(h, v):
    return _lowbias32_nb(np.uint32(np.uint32(h ^ v) + _UGOLDEN))


_EPILOGUES = {None: 0, "relu": 1}  # apply_masks' activation -> the code _masked_nb reads


@numba.njit(parallel=True, cache=True)
def _masked_nb(src, bias, epilogue, streams, threshold, out):
    """out[m, b, s, j] = act(src[m, b, s or 0, j] + bias[m, j]) * keep(streams[m, b, s], j), for src
    with S or 1 samples; act by `_EPILOGUES` code (0: none, 1: relu). A row's 16-bit draws are hashed
    into a buffer first and applied in a second loop: both vectorise. threshold 0 keeps every unit
    without hashing."""
    members, rows, samples, width = out.shape
    src_samples = src.shape[2]
    t = np.uint32(threshold)
    pairs = (width + 1) // 2
    for flat in numba.prange(members * rows):
        m, b = np.int64(flat) // rows, np.int64(flat) % rows
        u16 = np.ones(2 * pairs, dtype=np.uint32)  # all kept while threshold is 0
        for s in range(samples):
            if threshold > 0:
                stream = np.uint32(streams[m, b, s])
                for pair in range(pairs):
                    draw = _mix_nb(stream, np.uint32(pair))
                    u16[2 * pair] = draw & _UHALF
                    u16[2 * pair + 1] = draw >> _U16
            row_in, row_out = src[m, b, s if src_samples == samples else 0], out[m, b, s]
            for j in range(width):
                v = row_in[j] + bias[m, j]
                if epilogue == 1:
                    v = 0.0 if v < 0.0 else v  # not max(v, 0): a NaN stays NaN
                row_out[j] = v if u16[j] >= t else 0.0


def apply_masks(h: torch.Tensor, streams: torch.Tensor, p: float, bias: torch.Tensor | None = None,
                activation: str | None = None) -> torch.Tensor:
    """act(h + bias) [M, n, S or 1, H] times the keep masks of `streams` [M, n, S] -> [M, n, S, H] (no
    1/(1-p)), in one parallel pass: bias [M, H] (default 0), activation "relu", "silu" or None.

    Bit-identical to `act(h + bias) * (uniform16(streams, H) >= mask_threshold(p))`.
    """
    members, rows, samples = streams.shape
    if activation == "silu":  # Numba's exp does not vectorise (no SVML): torch's silu does, one pass more
        shift = 0.0 if bias is None else bias.reshape(members, 1, 1, -1)
        h, bias, activation = F.silu(h + shift), None, None
    out = torch.empty((members, rows, samples, h.shape[-1]), dtype=h.dtype)
    bias = h.new_zeros((members, h.shape[-1])) if bias is None else bias.to(h.dtype).reshape(members, -1)
    _masked_nb(h.contiguous().numpy(), bias.contiguous().numpy(), _EPILOGUES[activation],
               streams.contiguous().numpy(), mask_threshold(p), out.numpy())
    return out


# ---- spectrum ids -> 64-bit keys -----------------------------------------------------------------

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)  # FNV-1a 64 (Fowler, Noll, Vo; IETF draft-eastlake-fnv)
_FNV_PRIME = np.uint64(0x100000001B3)


def _fnv1a64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """FNV-1a 64 of each byte string data[offsets[i]:offsets[i+1]], vectorised over strings."""
    starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    h = np.full(len(lengths), _FNV_OFFSET, dtype=np.uint64)
    for i in range(int(lengths.max(initial=0))):
        active = lengths > i
        byte = data[np.where(active, starts + i, 0)].astype(np.uint64)
        h = np.where(active, (h ^ byte) * _FNV_PRIME, h)
    return h.view(np.int64)


def _string_keys(strings) -> np.ndarray:
    encoded = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return _fnv1a64(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)


def _arrow_string_keys(arr: pa.Array) -> np.ndarray:
    offset_type = np.int64 if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type) \
        else np.int32
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
    return _fnv1a64(data, offsets.astype(np.int64))


def id_keys(ids) -> np.ndarray:
    """The RNG key of each spectrum id, int64 [B], stable across runs, machines and versions.

    Integer ids are their own key (uint64 ids keep their bits). String (or bytes) ids are keyed by
    FNV-1a 64 of their UTF-8 bytes, read as int64. Accepts a NumPy array, a sequence, or a pyarrow
    (Chunked)Array of integers or strings; nulls are refused. (A NumPy "U"/"S" array has already
    lost trailing NUL characters; lists, object arrays and Arrow arrays keep them.)
    """
    if isinstance(ids, pa.ChunkedArray):
        parts = [id_keys(chunk) for chunk in ids.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if isinstance(ids, pa.Array):
        if ids.null_count:
            raise ValueError(f"spectrum ids must not be null ({ids.null_count} null ids)")
        if pa.types.is_integer(ids.type):
            return _int_keys(ids.to_numpy(zero_copy_only=False))
        if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) \
                or pa.types.is_binary(ids.type) or pa.types.is_large_binary(ids.type):
            return _arrow_string_keys(ids)
        raise ValueError(f"spectrum ids must be integers or strings, got arrow type {ids.type}")
    if torch.is_tensor(ids):
        ids = ids.cpu().numpy()
    if isinstance(ids, list | tuple):
        return _object_keys(list(ids))  # not via np.asarray: NumPy strings drop trailing NUL characters
    arr = np.asarray(ids)
    if arr.dtype.kind in "iu":
        return _int_keys(arr)
    if arr.dtype.kind in "US":
        return _string_keys(arr.ravel().tolist())
    if arr.dtype.kind == "O":
        return _object_keys(arr.ravel().tolist())
    raise ValueError(f"spectrum ids must be integers or strings, got dtype {arr.dtype}")


def _object_keys(values: list) -> np.ndarray:
    """Keys of Python objects, all strings/bytes or all integers (an object column of ints is ints)."""
    if any(v is None for v in values):
        raise ValueError("spectrum ids must not be None")
    if all(isinstance(v, str | bytes) for v in values):
        return _string_keys(values)
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        arr = np.array(values)
        if arr.dtype.kind not in "iu":
            raise ValueError("integer spectrum ids must fit in 64 bits")
        return _int_keys(arr)
    raise ValueError("spectrum ids must be all integers or all strings, got "
                     f"{sorted({type(v).__name__ for v in values})}")


def _int_keys(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr).ravel()
    if arr.dtype == np.uint64:
        return arr.view(np.int64).copy()
    return arr.astype(np.int64)
