import numpy as np
import pytest
from starcast.catalogs.synth import SynthConfig, synth_table
from starcast.trainers.data import noisier


@pytest.mark.parametrize("fixed", [True, False])
def test_noisier_copy_adds_the_noise_of_the_lower_snr(fixed):
    table = synth_table(SynthConfig(n=40, seed=2, npix=500, snr=(50.0, 300.0)))
    if not fixed:  # the same rows as variable-length lists
        import pyarrow as pa

        for col in ("flux", "flux_err"):
            arr = table.column(col).combine_chunks()
            table = table.set_column(table.schema.get_field_index(col), col,
                                     pa.ListArray.from_arrays(pa.array(np.arange(41) * 500, pa.int32()),
                                                              arr.values))
    out = noisier(table, 20.0, np.random.default_rng(0))
    s0, s1 = table.column("snr").to_numpy(), out.column("snr").to_numpy()
    assert np.all((s1 <= s0 + 1e-3) & (s1 >= 20.0 - 1e-3)) and np.any(s1 < 0.9 * s0)
    f0 = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    f1 = np.stack(out.column("flux").to_numpy(zero_copy_only=False))
    e0 = np.stack(table.column("flux_err").to_numpy(zero_copy_only=False))
    e1 = np.stack(out.column("flux_err").to_numpy(zero_copy_only=False))
    ratio = (s0 / s1)[:, None]
    np.testing.assert_allclose(e1, e0 * ratio, rtol=1e-4)
    rows = ratio[:, 0] > 1.2
    z = (f1 - f0)[rows] / (e0 * np.sqrt(ratio**2 - 1))[rows]
    assert abs(z.std() - 1.0) < 0.03 and abs(z.mean()) < 0.03
