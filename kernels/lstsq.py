"""The normal equations of many small weighted least-squares fits, one per row, in one pass.

The emulator (`starcast.engine.emulator`) fits every spectrum twice over: its continuum (a few
Chebyshev polynomials times the emulated spectrum) and, per Gauss-Newton step, its labels (the
Jacobian's columns). Each fit needs k (k + 1) / 2 + k weighted sums over D pixels per row; NumPy
forms each sum from temporaries the size of the batch, this loop from one row's pixels in cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(fastmath={"reassoc", "contract"}, cache=True, nogil=True)
def normal_equations(columns, scale, weight, target, gram, rhs):
    """gram[b] = A^T W A and rhs[b] = A^T W y of the weighted least-squares fit of each row b of
    target [B, D] (y) by the k columns A[:, i] = scale[b] * columns[i, b] (elementwise over the D
    pixels), W = diag(weight[b]): gram [B, k, k] and rhs [B, k] float64, filled in place. columns
    [k, B, D] or [k, 1, D] (one set for every row), scale [B, D] or [1, D]: an array of one row
    serves every row. Products and sums in float64, the sums' order left to the compiler (so that
    they vectorise); a row's all-zero columns are skipped (their sums are 0: the emulator's fit gives
    each refitted row the columns of every diffuse band that any row of its batch has). Serial and
    without the GIL, as `resample.doppler_shift`: `Emulator.chi2` fits chunks of rows on threads of
    its own (over rows in parallel here, between the emulator's BLAS products, `infer` took twice as
    long on 2 cores: these threads waited for BLAS's)."""
    k, _, d = columns.shape
    u, v = np.empty(d), np.empty(d)  # one row's weight * scale^2 and weight * scale * target
    used = np.empty(k, np.bool_)  # the row's columns that are not all zero
    for b in range(target.shape[0]):
        c = b if columns.shape[1] > 1 else 0
        s = b if scale.shape[0] > 1 else 0
        for p in range(d):
            ws = np.float64(weight[b, p]) * scale[s, p]
            u[p] = ws * scale[s, p]
            v[p] = ws * target[b, p]
        for i in range(k):
            used[i] = False
            for p in range(d):
                if columns[i, c, p] != 0.0:
                    used[i] = True
                    break
        for i in range(k):
            for j in range(i, k):
                total = 0.0
                if used[i] and used[j]:
                    for p in range(d):
                        total += u[p] * columns[i, c, p] * columns[j, c, p]
                gram[b, i, j] = total
                gram[b, j, i] = total
            total = 0.0
            if used[i]:
                for p in range(d):
                    total += v[p] * columns[i, c, p]
            rhs[b, i] = total
