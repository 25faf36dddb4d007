"""The normal equations kernel against NumPy's float64 sums (and a weighted least-squares solution
from `numpy.linalg.lstsq`), with columns and scales per row or one set for every row, some columns
zero (all of a row's, or up to a pixel)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from starcast.kernels.lstsq import normal_equations


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), k=st.integers(1, 6), d=st.integers(1, 300), shared_columns=st.booleans(),
       shared_scale=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_normal_equations_match_float64_sums(rows, k, d, shared_columns, shared_scale, seed):
    rng = np.random.default_rng(seed)
    columns = rng.normal(size=(k, 1 if shared_columns else rows, d)).astype(np.float32)
    columns[rng.uniform(size=columns.shape[:2]) < 0.3] = 0.0  # all-zero columns, which it skips
    prefix = rng.integers(0, d + 1, columns.shape[:2])  # and columns zero up to a pixel, which it must not
    columns[np.arange(d) < prefix[..., None]] = 0.0
    scale = rng.uniform(0.2, 1.5, (1 if shared_scale else rows, d)).astype(np.float32)
    weight = (rng.uniform(0.0, 1e4, (rows, d)) * (rng.uniform(size=(rows, d)) > 0.1)).astype(np.float32)
    target = rng.normal(size=(rows, d)).astype(np.float32)
    gram, rhs = np.empty((rows, k, k)), np.empty((rows, k))
    normal_equations(columns, scale, weight, target, gram, rhs)
    a = np.broadcast_to(columns, (k, rows, d)).astype(np.float64) * np.broadcast_to(scale, (rows, d))
    w = weight.astype(np.float64)
    np.testing.assert_allclose(gram, np.einsum("bd,ibd,jbd->bij", w, a, a), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(rhs, np.einsum("bd,ibd,bd->bi", w, a, target.astype(np.float64)),
                               rtol=1e-12, atol=1e-9)


def test_normal_equations_solve_the_weighted_fit():
    rng = np.random.default_rng(3)
    rows, k, d = 4, 3, 500
    columns = rng.normal(size=(k, rows, d)).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, (rows, d)).astype(np.float32)
    target = rng.normal(size=(rows, d)).astype(np.float32)
    gram, rhs = np.empty((rows, k, k)), np.empty((rows, k))
    normal_equations(columns, np.ones((1, d), np.float32), weight, target, gram, rhs)
    for b in range(rows):
        root = np.sqrt(weight[b].astype(np.float64))[:, None]
        expected = np.linalg.lstsq(columns[:, b].T * root, target[b] * root[:, 0], rcond=None)[0]
        np.testing.assert_allclose(np.linalg.solve(gram[b], rhs[b]), expected, rtol=1e-9)
