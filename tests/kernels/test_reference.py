"""The torch reference against a hand-written float64 NumPy evaluation, the CPU path against the
reference within DESIGN.md's tolerance, and the statistical behaviour of the ensemble x MC-dropout
estimate (batch independence, NaN isolation, out-of-distribution epistemic growth, 1/sqrt(S))."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.kernels import rng
from starcast.kernels.reference import (
    ensemble_samples,
    ensemble_stats_cpu,
    ensemble_stats_reference,
    pack_cpu,
)


def make_layers(members, dims, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(members, i, o, generator=gen, dtype=dtype) / i ** 0.5,
             0.1 * torch.randn(members, o, generator=gen, dtype=dtype))
            for i, o in zip(dims, dims[1:], strict=False)]


def numpy_stats(x, keys, layers, p, samples, seed, activation):
    """DESIGN.md's numerics written out in float64 NumPy, one (member, sample) pass at a time."""
    act = {"relu": lambda v: np.maximum(v, 0.0), "silu": lambda v: v / (1.0 + np.exp(-v))}[activation]
    ws = [(w.double().numpy(), b.double().numpy()) for w, b in layers]
    rows, k = rng.row_keys(seed, torch.as_tensor(keys)), ws[-1][0].shape[2] // 2
    mus, vars_ = [], []
    for m in range(ws[0][0].shape[0]):
        for s in range(samples):
            h = act(x.astype(np.float64) @ ws[0][0][m] + ws[0][1][m])
            for layer, (w, b) in enumerate(ws[1:], start=1):
                z = rng.keep_masks(rows, [m], [s], layer, h.shape[1], p)[:, 0, 0].numpy()
                o = (h * z / (1.0 - rng.effective_p(p))) @ w[m] + b[m]
                h = act(o)
            mus.append(o[:, :k])
            vars_.append(np.log1p(np.exp(o[:, k:])) + 1e-6)
    mu, var = np.stack(mus), np.stack(vars_)
    return mu.mean(0), var.mean(0), mu.var(0)


def assert_within_design_tolerance(result, reference):
    """DESIGN.md: mean within 1% of the reference total sigma, each sigma within 1% of itself."""
    mean, alea, epi = (t.double() for t in result)
    rmean, ralea, repi = reference
    sigma = (ralea + repi).sqrt()
    assert ((mean - rmean).abs() <= 0.01 * sigma).all()
    assert (((alea + epi).sqrt() - sigma).abs() <= 0.01 * sigma).all()
    assert ((alea.sqrt() - ralea.sqrt()).abs() <= 0.01 * ralea.sqrt()).all()
    assert ((epi.sqrt() - repi.sqrt()).abs() <= 0.01 * sigma).all()  # epistemic may be ~0: relative to sigma


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_matches_numpy_float64(activation, p):
    layers = make_layers(3, [11, 16, 16, 4])
    x = np.random.default_rng(1).normal(size=(5, 11))
    keys = np.arange(5) * 1000 - 7
    got = ensemble_stats_reference(torch.tensor(x), keys, layers, p=p, samples=4, seed=9,
                                   activation=activation)
    for g, want in zip(got, numpy_stats(x, keys, layers, p, 4, 9, activation), strict=True):
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-10, atol=1e-12)


def test_destandardisation_calibration_and_samples_agree():
    layers = make_layers(2, [7, 16, 6])
    x, keys = torch.randn(4, 7), torch.arange(4)
    kw = dict(p=0.2, samples=5, seed=3)
    raw = ensemble_stats_reference(x, keys, layers, **kw)
    lm, ls, cal = [5000.0, 4.0, 10.0], [800.0, 0.5, 20.0], [1.5, 0.9, 1.0]
    mean, alea, epi = ensemble_stats_reference(x, keys, layers, label_mean=lm, label_std=ls, calibration=cal,
                                               **kw)
    lm, ls, cal = (torch.tensor(v, dtype=torch.float64) for v in (lm, ls, cal))
    torch.testing.assert_close(mean, raw[0] * ls + lm)
    torch.testing.assert_close(alea, raw[1] * (ls * cal) ** 2)
    torch.testing.assert_close(epi, raw[2] * (ls * cal) ** 2)
    mu, var = ensemble_samples(x, keys, layers, label_mean=lm, label_std=ls, calibration=cal, **kw)
    assert mu.shape == var.shape == (4, 2, 5, 3)
    torch.testing.assert_close(mu.mean(dim=(1, 2)), mean)
    torch.testing.assert_close(var.mean(dim=(1, 2)), alea)
    torch.testing.assert_close(mu.var(dim=(1, 2), unbiased=False), epi)


def test_p0_skips_dropout_and_s1_is_a_plain_deep_ensemble():
    layers = make_layers(4, [9, 16, 4])
    x, keys = torch.randn(6, 9), torch.arange(6)
    mu, _ = ensemble_samples(x, keys, layers, p=0.0, samples=3, seed=0)
    assert torch.equal(mu[:, :, :1].expand_as(mu), mu)
    plain = torch.stack([torch.relu(x.double() @ layers[0][0][m].double() + layers[0][1][m].double())
                         @ layers[1][0][m].double() + layers[1][1][m].double() for m in range(4)], 1)[..., :2]
    mean, _, epi = ensemble_stats_reference(x, keys, layers, p=0.0, samples=1, seed=0)
    torch.testing.assert_close(mean, plain.mean(1))
    torch.testing.assert_close(epi, plain.var(1, unbiased=False))
    for a, b in zip(ensemble_stats_cpu(x, keys, layers, p=0.0, samples=7, seed=0),
                    ensemble_stats_cpu(x, keys, layers, p=0.0, samples=1, seed=0), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=12, deadline=None)
@given(members=st.integers(1, 4), samples=st.integers(1, 6), k=st.integers(1, 4),
       d=st.integers(1, 70), hidden=st.lists(st.sampled_from([16, 32, 48]), min_size=1, max_size=3),
       p=st.sampled_from([0.0, 0.05, 0.25, 0.5]), activation=st.sampled_from(["relu", "silu"]),
       seed=st.integers(0, 2 ** 64 - 1))
def test_cpu_path_matches_reference_within_design_tolerance(members, samples, k, d, hidden, p, activation,
                                                            seed):
    layers = make_layers(members, [d, *hidden, 2 * k], seed=seed % 1000)
    x, keys = torch.randn(5, d), torch.tensor([3, -1, 1 << 40, 7, 0])
    kw = dict(p=p, samples=samples, seed=seed, activation=activation, label_mean=[1.0] * k,
              label_std=[2.0] * k, calibration=[1.2] * k)
    assert_within_design_tolerance(ensemble_stats_cpu(x, keys, layers, **kw),
                                   ensemble_stats_reference(x, keys, layers, **kw))


def test_cpu_result_of_a_spectrum_is_identical_alone_in_any_batch_and_order():
    layers = make_layers(3, [37, 32, 16, 6])
    x, keys = torch.randn(4096, 37), torch.arange(4096) * 3 + 11
    kw = dict(p=0.2, samples=5, seed=1)
    full = ensemble_stats_cpu(x, keys, layers, **kw)
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(0))
    shuffled = ensemble_stats_cpu(x[perm], keys[perm], layers, **kw)
    for idx in ([5], list(range(7)), [4095, 255, 256, 2]):
        alone = ensemble_stats_cpu(x[idx], keys[idx], layers, **kw)
        assert all(torch.equal(a[idx], b) for a, b in zip(full, alone, strict=True))
    assert all(torch.equal(a[perm], b) for a, b in zip(full, shuffled, strict=True))


@pytest.mark.parametrize("chunk", [None, 8, 64])
def test_cpu_weights_packed_once_and_any_chunk_give_the_same_numbers(chunk):
    layers = make_layers(2, [29, 32, 32, 6], seed=3)
    x, keys = torch.randn(40, 29), torch.arange(40)
    kw = dict(p=0.1, samples=4, seed=2)
    direct = ensemble_stats_cpu(x, keys, layers, **kw)
    packed = ensemble_stats_cpu(x, keys, pack_cpu(layers, 0.1), chunk_rows=chunk, **kw)
    assert_within_design_tolerance(packed, ensemble_stats_reference(x, keys, layers, **kw))
    if chunk is None:  # same chunk: bit-identical (a different chunk may round differently in BLAS)
        assert all(torch.equal(a, b) for a, b in zip(direct, packed, strict=True))
    alone = ensemble_stats_cpu(x[7:8], keys[7:8], pack_cpu(layers, 0.1), chunk_rows=chunk, **kw)
    assert all(torch.equal(a[7:8], b) for a, b in zip(packed, alone, strict=True))
    with pytest.raises(ValueError, match="packed for dropout"):
        ensemble_stats_cpu(x, keys, pack_cpu(layers, 0.2), **kw)


@pytest.mark.parametrize("path", [ensemble_stats_cpu, ensemble_stats_reference])
def test_nan_row_does_not_contaminate_neighbours(path):
    layers = make_layers(2, [13, 16, 16, 4])
    x, keys = torch.randn(5, 13), torch.arange(5)
    clean = path(x, keys, layers, p=0.2, samples=3, seed=0)
    x[2, 4] = float("nan")
    dirty = path(x, keys, layers, p=0.2, samples=3, seed=0)
    others = [0, 1, 3, 4]
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a[others], b[others])
        assert b[2].isnan().all()


def test_epistemic_grows_far_outside_the_training_data():
    """Train a tiny MC-dropout ensemble on x ~ N(0, 1); epistemic sigma is larger at x ~ 8 + N(0, 1)."""
    torch.manual_seed(0)
    d, members, p = 4, 3, 0.2
    x_train = torch.randn(256, d)
    y = torch.sin(x_train[:, :1]) + 0.1 * torch.randn(256, 1)
    nets = []
    for _ in range(members):
        net = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Dropout(p),
                                  torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Dropout(p),
                                  torch.nn.Linear(32, 2))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(100):
            out = net(x_train)
            var = torch.nn.functional.softplus(out[:, 1:]) + 1e-6
            loss = (0.5 * (y - out[:, :1]) ** 2 / var + 0.5 * var.log()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets.append([lin for lin in net if isinstance(lin, torch.nn.Linear)])
    layers = [(torch.stack([net[i].weight.detach().T for net in nets]),
               torch.stack([net[i].bias.detach() for net in nets])) for i in range(3)]
    keys = torch.arange(200)
    _, _, epi_in = ensemble_stats_cpu(torch.randn(200, d), keys, layers, p=p, samples=16, seed=0)
    _, _, epi_out = ensemble_stats_cpu(8 + torch.randn(200, d), keys, layers, p=p, samples=16, seed=0)
    assert epi_out.median() > 10 * epi_in.median()


def test_mean_over_samples_converges_as_one_over_sqrt_s():
    """One spectrum under 400 different keys: the spread of the S-sample mean shrinks as S**-0.5."""
    layers = make_layers(1, [10, 32, 32, 2], seed=4)
    x = torch.randn(1, 10).expand(400, 10)
    keys = torch.arange(400)
    sizes = [4, 16, 64]
    spread = [ensemble_stats_cpu(x, keys, layers, p=0.3, samples=s, seed=0)[0].double().std().item()
              for s in sizes]
    slope = np.polyfit(np.log(sizes), np.log(spread), 1)[0]
    assert -0.6 < slope < -0.4
