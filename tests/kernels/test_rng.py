"""The dropout-mask RNG: host and Triton forms bit for bit against a pure-Python scalar transcription,
mask statistics (rate, no correlation between neighbours), and stable id keys."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.kernels import rng

from .triton_device import DEVICE

M32 = 0xFFFFFFFF


# ---- an independent scalar transcription of the documented construction (Python ints) -----------

def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def mix(h: int, v: int) -> int:
    return lowbias32(((h ^ v) + 0x9E3779B9) & M32)


def u16_scalar(seed: int, key: int, member: int, sample: int, layer: int, unit: int) -> int:
    seed &= (1 << 64) - 1
    key &= (1 << 64) - 1
    h = 0x53544152
    for word in (seed & M32, seed >> 32, key & M32, key >> 32, member, sample, layer, unit >> 1):
        h = mix(h, word)
    return (h >> (16 * (unit & 1))) & 0xFFFF


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return h - (1 << 64) if h >= 1 << 63 else h


# ---- bit equality ------------------------------------------------------------------------------

int64s = st.integers(-(1 << 63), (1 << 63) - 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, (1 << 64) - 1), key=int64s, member=st.integers(0, 63),
       sample=st.integers(0, 4095), layer=st.integers(1, 8), unit=st.integers(0, 1023))
def test_host_rng_matches_scalar_transcription(seed, key, member, sample, layer, unit):
    rows = rng.row_keys(seed, torch.tensor([key]))
    host = rng.uniform16(rng.streams(rows, [member], [sample], layer), unit + 2)[0, 0, 0, unit]
    assert int(host) == u16_scalar(seed, key, member, sample, layer, unit)


@pytest.mark.parametrize("member, sample, layer, width", [(0, 0, 1, 16), (1, 1, 1, 32), (7, 63, 3, 48)])
def test_triton_rng_is_bit_identical_to_host(member, sample, layer, width):
    keys = torch.tensor([0, 1, -1, 2, 1 << 62, -(1 << 63), 12345678901, 99], dtype=torch.int64)
    rows = rng.row_keys(20260, keys)
    host = rng.uniform16(rng.streams(rows, [member], [sample], layer), width)[:, 0, 0]
    device = rng.uniform16_triton(rows.to(DEVICE), member, sample, layer, width)
    assert torch.equal(host, device.cpu().to(torch.int64))


@pytest.mark.parametrize("src_samples, width", [(1, 16), (5, 16), (1, 33), (5, 7)])
def test_numba_fused_masks_are_bit_identical_to_host(src_samples, width):
    rows = rng.row_keys(5, torch.arange(9, dtype=torch.int64) - 4)
    streams = rng.streams(rows, range(3), range(5), 2).permute(1, 0, 2)  # [M, B, S]
    h = torch.randn(3, 9, src_samples, width)
    keep = rng.uniform16(streams, width) >= rng.mask_threshold(0.3)
    assert torch.equal(rng.apply_masks(h, streams, 0.3), h * keep)
    h[1, 2, 0, 3] = float("nan")  # relu passes a NaN on, as torch.relu does; a dropped unit is 0
    bias = torch.randn(3, width)
    pre = h + bias[:, None, None, :]
    for activation, act in (("relu", torch.relu), ("silu", torch.nn.functional.silu)):
        got = rng.apply_masks(h, streams, 0.3, bias, activation)
        assert torch.allclose(got, torch.where(keep, act(pre), 0.0), rtol=0, atol=0, equal_nan=True)
    kept = rng.apply_masks(h, streams, 0.0, bias, "relu")  # p = 0: nothing dropped
    assert torch.allclose(kept, torch.relu(pre).expand(3, 9, 5, width), rtol=0, atol=0, equal_nan=True)


def test_masks_are_a_pure_function_of_coordinates():
    keys = torch.arange(50, dtype=torch.int64) * 7919
    rows = rng.row_keys(3, keys)
    full = rng.keep_masks(rows, range(4), range(6), 2, 32, 0.3)
    part = rng.keep_masks(rng.row_keys(3, keys[[17, 3]]), [2], [5], 2, 32, 0.3)
    assert torch.equal(full[[17, 3]][:, 2:3, 5:6], part)
    assert not torch.equal(full, rng.keep_masks(rng.row_keys(4, keys), range(4), range(6), 2, 32, 0.3))


# ---- statistics --------------------------------------------------------------------------------

def test_mask_rate_matches_effective_p():
    rows = rng.row_keys(0, torch.arange(2000, dtype=torch.int64))
    for p in (0.05, 0.1, 0.5):
        z = rng.keep_masks(rows, range(2), range(8), 1, 64, p)
        n = z.numel()
        kept = z.double().mean().item()
        assert abs(kept - (1 - rng.effective_p(p))) < 5 * np.sqrt(p * (1 - p) / n)


def test_u16_is_uniform():
    rows = rng.row_keys(1, torch.arange(4000, dtype=torch.int64))
    u = rng.uniform16(rng.streams(rows, range(2), range(4), 1), 64).ravel()
    counts = torch.bincount(u >> 10, minlength=64).double()  # 64 bins
    expected = u.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 63 + 6 * np.sqrt(2 * 63)  # ~6 sigma of a chi2 with 63 dof


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().ravel(), b.double().ravel()
    return torch.corrcoef(torch.stack((a, b)))[0, 1].item()


def test_no_correlation_between_neighbouring_units_samples_members_layers_keys():
    keys = torch.arange(3000, dtype=torch.int64)  # consecutive ids: the hardest case for a weak hash
    rows = rng.row_keys(0, keys)
    u = rng.uniform16(rng.streams(rows, range(3), range(6), 1), 64)  # [B, M, S, H]
    u2 = rng.uniform16(rng.streams(rows, range(3), range(6), 2), 64)
    bound = 5 / np.sqrt(u[..., :-1].numel())  # 5 sigma for independent uniforms
    assert abs(_corr(u[..., 0::2], u[..., 1::2])) < bound  # the two halves of one draw
    assert abs(_corr(u[..., 1:-1:2], u[..., 2::2])) < bound  # across neighbouring draws
    assert abs(_corr(u[:, :, :-1], u[:, :, 1:])) < bound  # neighbouring samples
    assert abs(_corr(u[:, :-1], u[:, 1:])) < bound  # neighbouring members
    assert abs(_corr(u[:-1], u[1:])) < bound  # neighbouring keys
    assert abs(_corr(u, u2)) < bound  # neighbouring layers
    # masks, not only uniforms: keep/drop of neighbouring units are independent at p = 0.5
    z = (u >= rng.mask_threshold(0.5)).double()
    assert abs(_corr(z[..., :-1], z[..., 1:])) < bound


def test_effective_p_and_scale():
    assert rng.effective_p(0.0) == 0.0 and rng.dropout_scale(0.0) == 1.0
    assert abs(rng.effective_p(0.1) - 0.1) <= 0.5 / 65536
    assert rng.dropout_scale(0.25) == 1 / 0.75
    with pytest.raises(ValueError):
        rng.mask_threshold(1.0)
    with pytest.raises(ValueError):
        rng.mask_threshold(-0.1)


# ---- id keys -----------------------------------------------------------------------------------

def test_integer_ids_are_their_own_keys():
    ids = np.array([0, 1, -5, 1 << 62], dtype=np.int64)
    assert np.array_equal(rng.id_keys(ids), ids)
    assert np.array_equal(rng.id_keys(pa.array(ids)), ids)
    assert np.array_equal(rng.id_keys(np.array([1 << 63], dtype=np.uint64)), [-(1 << 63)])
    assert rng.id_keys([3, 4]).dtype == np.int64


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=20))
def test_string_ids_are_fnv1a64_of_utf8_everywhere(strings):
    expected = np.array([fnv1a64(s.encode("utf-8")) for s in strings], dtype=np.int64)
    assert np.array_equal(rng.id_keys(strings), expected)
    assert np.array_equal(rng.id_keys(np.array(strings, dtype=object)), expected)
    assert np.array_equal(rng.id_keys(pa.array(strings)), expected)
    assert np.array_equal(rng.id_keys(pa.array(strings, type=pa.large_string())), expected)
    sliced = pa.array(["pad", *strings])[1:]  # a non-zero array offset
    assert np.array_equal(rng.id_keys(sliced), expected)
    chunked = pa.chunked_array([pa.array(strings[:1], pa.string()), pa.array(strings[1:], pa.string())])
    assert np.array_equal(rng.id_keys(chunked), expected)


def test_string_keys_match_published_fnv1a_vectors_and_do_not_collide():
    # test vectors of FNV-1a 64 from the reference page (isthe.com/chongo/tech/comp/fnv)
    assert rng.id_keys([""])[0] == np.uint64(0xCBF29CE484222325).view(np.int64)
    assert rng.id_keys(["a"])[0] == np.uint64(0xAF63DC4C8601EC8C).view(np.int64)
    assert rng.id_keys(["foobar"])[0] == np.uint64(0x85944171F73967E8).view(np.int64)
    names = [f"Gaia DR3 {i}" for i in range(20000)] + [hashlib.md5(str(i).encode()).hexdigest()
                                                         for i in range(20000)]
    assert len(set(rng.id_keys(names).tolist())) == len(names)


def test_null_ids_are_refused():
    with pytest.raises(ValueError, match="null"):
        rng.id_keys(pa.array(["a", None]))
    with pytest.raises(ValueError, match="None"):
        rng.id_keys(np.array(["a", None], dtype=object))


def test_an_object_column_of_integers_is_keyed_as_integers_and_mixed_ids_are_refused():
    ids = np.array([1, 2, -5, 1 << 62], dtype=object)  # e.g. a pandas object column
    assert np.array_equal(rng.id_keys(ids), [1, 2, -5, 1 << 62])
    assert np.array_equal(rng.id_keys([np.int32(7), 8]), [7, 8])
    for mixed in (["a", 1], np.array(["a", 1], dtype=object), [1, 2.5], [True, False]):
        with pytest.raises(ValueError, match="all integers or all strings"):
            rng.id_keys(mixed)
    with pytest.raises(ValueError, match="64 bits"):
        rng.id_keys([1 << 70])
