"""Cosmic-ray hits and hot pixels (`_mask_spikes` in preprocessing) on TLUSTY spectra of the shipped
sample: masked and filled where they are, and nothing masked where there are none."""

import numpy as np
import pyarrow as pa
import pytest
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import survey_table
from starcast.catalogs.schema import FLUX, FLUX_ERR, spectrum_array
from starcast.engine.predictor import load_model
from starcast.kernels.preprocess import PreprocessSettings, preprocess

from starcast.demo import SAMPLE
from starcast.errors import StarcastError

OFF = PreprocessSettings(spike_sigma=0.0)


@pytest.fixture(scope="module")
def model():
    return load_model("ob-default")


def stars(n, seed, snr, vsini=(0.0, 450.0)):
    return survey_table(read_grid(SAMPLE), n, at_nodes=True, seed=seed, snr=snr, vsini=vsini)


def prepared(model, table, settings=None):
    return preprocess(table, model.grid, settings or PreprocessSettings(),
                      resolving_power=model.resolving_power)


def with_hits(table, seed, hits=5):
    """Each spectrum with `hits` cosmic-ray hits one to three pixels wide, 0.3-2x its median flux high
    (not in flux_err), away from the ends."""
    flux = np.stack(table.column(FLUX).to_numpy(zero_copy_only=False)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for row in flux:
        for at, width in zip(rng.integers(30, len(row) - 30, hits), rng.integers(1, 4, hits), strict=True):
            row[at:at + width] += rng.uniform(0.3, 2.0) * np.median(row)
    return table.set_column(table.schema.get_field_index(FLUX), FLUX, spectrum_array(flux, flux.shape[1]))


@pytest.mark.parametrize("snr,vsini", [((10.0, 50.0), (0.0, 450.0)), ((300.0, 1000.0), (0.0, 20.0)),
                                       ((100.0, 500.0), (0.0, 450.0)), ((1e7, 1e7), (0.0, 450.0))])
@pytest.mark.parametrize("errors", [True, False])
def test_clean_tlusty_spectra_lose_no_pixel(model, snr, vsini, errors):
    # slow rotators at high SNR: the sharpest, deepest lines the grid has, against the smallest sigma;
    # and spectra all but free of noise, whose sigma is the floor
    table = stars(120, seed=int(snr[0]), snr=snr, vsini=vsini)
    if not errors:  # the noise level then comes from DER_SNR
        table = table.drop_columns([FLUX_ERR])
    on, off = prepared(model, table), prepared(model, table, OFF)
    np.testing.assert_array_equal(on.x, off.x)
    np.testing.assert_array_equal(on.ivar, off.ivar)


@pytest.mark.parametrize("errors", [True, False])
def test_cosmic_ray_hits_are_masked_and_the_spectrum_recovered(model, errors):
    table = stars(60, seed=3, snr=(100.0, 300.0))
    if not errors:
        table = table.drop_columns([FLUX_ERR])
    hit = with_hits(table, seed=4)
    clean, on, off = prepared(model, table), prepared(model, hit), prepared(model, hit, OFF)
    assert np.abs(off.x - clean.x).max(axis=1).min() > 0.2  # unmasked, every row is spoiled
    # masked: the pixels kept are the clean ones to within the noise (a model pixel that shares an input
    # pixel with a hit is dropped), and the filled ones (interpolated between their neighbours, ivar 0)
    # within what a line edge can bend between them (measured 0.11 over the widest hit's model pixels)
    kept = on.ivar > 0
    assert (np.abs(on.x - clean.x) * np.sqrt(clean.ivar))[kept].max() < 8
    assert np.abs(on.x - clean.x)[~kept].max() < 0.15
    assert (on.flags == clean.flags).all()
    assert np.all(on.bad_fraction - clean.bad_fraction < 0.01)  # 5 hits: at most ~10 of 1951 pixels


def test_a_hit_three_pixels_wide_beside_a_masked_pixel_goes_whole(model):
    """The last pixel of the hit has its nearest good neighbour four steps away, past the hit and the
    pixel the input masks (within two steps, it was left, and a quarter of it leaked into a model
    pixel of full weight: a 16-sigma residual)."""
    table = stars(20, seed=9, snr=(100.0, 300.0))
    flux = np.stack(table.column(FLUX).to_numpy(zero_copy_only=False)).astype(np.float32)
    mask = np.zeros(flux.shape, bool)
    mask[:, 1000] = True
    flux[:, 1001:1004] += np.median(flux, axis=1, keepdims=True)
    masked = table.set_column(table.schema.get_field_index("mask"), "mask", pa.array(list(mask)))
    hit = masked.set_column(masked.schema.get_field_index(FLUX), FLUX, spectrum_array(flux, flux.shape[1]))
    clean, on = prepared(model, masked), prepared(model, hit)
    kept = on.ivar > 0
    assert (np.abs(on.x - clean.x) * np.sqrt(clean.ivar))[kept].max() < 8


def test_the_estimates_of_hit_spectra_are_those_of_the_clean_ones(model):
    table = stars(40, seed=5, snr=(50.0, 300.0))
    clean = model.predict(table, backend="cpu")
    hit = model.predict(with_hits(table, seed=6), backend="cpu")
    for t in ("teff", "logg", "vsini"):
        a, b = clean.column(t).to_numpy(), hit.column(t).to_numpy()
        err = clean.column(f"{t}_err").to_numpy()
        shift = np.abs(a - b) / err  # a hit in a line's core takes that line's pixels away
        assert shift.max() < 1.0 and np.median(shift) < 0.1, (t, np.sort(shift)[-5:])
    np.testing.assert_array_equal(clean.column("flags").to_numpy(), hit.column("flags").to_numpy())


def test_spike_sigma_must_not_be_negative():
    with pytest.raises(StarcastError, match="spike_sigma"):
        PreprocessSettings(spike_sigma=-1.0)
    assert PreprocessSettings.from_dict(OFF.to_dict()) == OFF


def test_a_table_without_hits_keeps_its_pixels_in_a_batch_with_hits(model):
    table = stars(10, seed=7, snr=(100.0, 300.0))
    both = pa.concat_tables([table, with_hits(table, seed=8)])
    np.testing.assert_array_equal(prepared(model, both).x[:10], prepared(model, table).x)
