"""The shipped default model on the physics it was trained on: TLUSTY spectra of the five BSTAR2006
models its networks and emulator never saw (its test nodes, shipped as `starcast/data/tlusty-sample.npz`;
its calibration was fitted on other spectra of these and the validation nodes), observed with
rotation, R = 20 000, continuum distortions and noise. Small and fast; the full figures live in the
model report and bench/results/peers.md."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.catalogs import gridsynth as gs
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import synth_from_grid
from starcast.catalogs.physics import C_KMS
from starcast.catalogs.schema import META_WAVELENGTH, Flag, WavelengthGrid, spectrum_array
from starcast.catalogs.synth import synth
from starcast.engine import emulator as emu
from starcast.engine.emulator import BANDS, DIB_TERMS, Threshold
from starcast.engine.predictor import Model
from starcast.kernels.resample import rest_frame_factor
from starcast.trainers.metrics import coverage

import starcast
from starcast.demo import SAMPLE

TARGETS = ("teff", "logg", "vsini")
NEVER = Threshold.constant(math.inf)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "catalog"
    synth_from_grid(read_grid(SAMPLE), 900, out, at_nodes=True, seed=2026, snr=(10.0, 500.0))
    table = pq.read_table(out)
    return table, starcast.load_model().predict(table, backend="cpu")


def test_sigma_follows_the_noise_in_every_snr_band(survey):
    """68% intervals cover 58-78% of the errors at low, middle and high SNR (n ~ 300 each: the
    binomial scatter is ~3 points), and the error bars grow as the SNR falls."""
    table, out = survey
    snr = table.column("snr").to_numpy()
    bands = [(10, 30), (30, 100), (100, 500)]
    for t in TARGETS:
        y, m, s = (np.asarray(c, float) for c in (table.column(t), out.column(t), out.column(f"{t}_err")))
        sigmas = []
        for lo, hi in bands:
            sel = (snr >= lo) & (snr < hi)
            assert 0.58 <= coverage(y[sel], m[sel], s[sel], 0.68) <= 0.78, (t, lo, hi)
            sigmas.append(np.median(s[sel]))
        assert sigmas[0] > 1.5 * sigmas[2], (t, sigmas)


def test_accuracy_at_high_snr_on_unseen_models(survey):
    """Issue 9's goals at SNR >= 100 on models left out of training: Teff <= 400 K, log g <= 0.10 dex,
    v sin i <= 5 km/s for true v sin i > 15."""
    table, out = survey
    snr, vsini = table.column("snr").to_numpy(), table.column("vsini").to_numpy()
    high = snr >= 100
    rmse = {t: float(np.sqrt(np.mean((out.column(t).to_numpy() - table.column(t).to_numpy())[
        high & ((vsini > 15) if t == "vsini" else True)] ** 2))) for t in TARGETS}
    assert rmse["teff"] <= 400 and rmse["logg"] <= 0.10 and rmse["vsini"] <= 5.0, rmse


def test_the_blend_with_the_emulator_fit_beats_the_network_alone(survey):
    """The shipped estimate blends the network's mean with the emulator fit's labels (weights fitted
    at the held-out nodes): on models it was not trained on it is closer to the truth than the network's
    own mean, for every target (the same spectra, so the comparison is paired)."""
    table, out = survey
    model = starcast.load_model()
    calibration = {k: v for k, v in model.bundle.manifest["calibration"].items() if k != "network_weight"}
    network = Model(replace(model.bundle, manifest={**model.bundle.manifest, "calibration": calibration}))
    alone = network.predict(table, backend="cpu")
    fast = table.column("vsini").to_numpy() > 15
    for t in TARGETS:
        y, rows = table.column(t).to_numpy(), fast if t == "vsini" else slice(None)
        rmse = [float(np.sqrt(np.mean((r.column(t).to_numpy() - y)[rows] ** 2))) for r in (out, alone)]
        assert rmse[0] < 0.97 * rmse[1], (t, rmse)


def test_cpu_and_triton_paths_match_the_float64_reference_on_the_shipped_model(survey):
    """DESIGN.md's tolerance on real spectra, end to end (the networks, then the emulator's fit and the
    blend): means within 1% of sigma, sigmas within 1%; the Triton kernel's 16-bit inputs under
    TRITON_INTERPRET=1 (tests/conftest.py). Measured at most 0.64% (cpu) and 0.54% (triton). The fit
    adds rounding of its own (float32, finite-difference Jacobians), most on the label the spectrum
    constrains least: metals within 1.5% (measured 1.04% cpu on a batch of these 64, 0.99% triton)."""
    table, out = survey
    model = starcast.load_model()
    ref = model.predict(table.slice(0, 64), backend="reference")
    for path in (out.slice(0, 64), model.predict(table.slice(0, 64), backend="triton")):
        for t, budget in (*((t, 0.01) for t in TARGETS), ("metals", 0.015)):
            s = ref.column(f"{t}_err").to_numpy()
            assert np.max(np.abs(path.column(t).to_numpy() - ref.column(t).to_numpy()) / s) < budget, t
            assert np.max(np.abs(path.column(f"{t}_err").to_numpy() / s - 1.0)) < 0.01, t


def test_a_spectrum_reads_alike_in_any_batch(survey):
    """The same rows predicted alone, in batches of 7 and all at once: the flags agree and the numbers
    within 1% of sigma (the fit's float32 sums run in an order that depends on the batch's size; the
    draws, keyed by id, do not)."""
    table, out = survey
    model, whole = starcast.load_model(), out.slice(0, 21)
    for size in (1, 7):
        parts = pa.concat_tables([model.predict(table.slice(i, size), backend="cpu")
                                  for i in range(0, 21, size)])
        assert parts.column("flags").equals(whole.column("flags"))
        for t in TARGETS:
            s = whole.column(f"{t}_err").to_numpy()
            assert np.max(np.abs(parts.column(t).to_numpy() - whole.column(t).to_numpy()) / s) < 0.01
            assert np.max(np.abs(parts.column(f"{t}_err").to_numpy() / s - 1.0)) < 0.01


def test_slow_rotators_are_upper_limits_and_never_negative(survey):
    """UPPER_LIMIT on every v sin i read below c / R, and above it only where the fit's broadening
    statistic finds lines broader than rotation makes them (a MODEL_MISMATCH test)."""
    table, out = survey
    v = out.column("vsini").to_numpy()
    flags = out.column("flags").to_numpy()
    assert (v >= 0).all()
    bound = [t for t in starcast.load_model().targets if t.name == "vsini"][0].upper_limit_below
    assert 14.9 < bound < 15.1  # c / R at R = 20 000
    limit, mismatch = (flags & Flag.UPPER_LIMIT) > 0, (flags & Flag.MODEL_MISMATCH) > 0
    np.testing.assert_array_equal(limit & ~mismatch, (v < bound) & ~mismatch)
    assert limit[v < bound].all() and limit.any()


def test_sharp_lines_at_high_snr_read_at_their_noise(tmp_path):
    """Stars at 0-15 km/s at SNR 300-600 (at rest, rv stated): the emulator's error, larger for sharp
    lines than for broad ones, is counted at the row's v sin i, so their chi^2 is about 1 (on 600 such
    stars median 0.99; with one sigma for every row 1.09), and MODEL_MISMATCH is judged against the
    threshold of clean spectra of their SNR and v sin i (on those 600, 0.7% flagged; 10% against one
    threshold for all rows, 1.19)."""
    synth_from_grid(read_grid(SAMPLE), 80, tmp_path / "c", at_nodes=True, seed=3, snr=(300.0, 600.0),
                    vsini=(0.0, 15.0))
    out = starcast.load_model().predict(pq.read_table(tmp_path / "c"), backend="cpu")
    assert np.median(out.column("chi2").to_numpy()) < 1.04
    assert np.mean((out.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0) <= 0.05


def test_a_small_second_step_reuses_the_first_steps_jacobian(survey, monkeypatch):
    """After its first Gauss-Newton step the fit takes a second with the first's Jacobian (a chord step,
    one emulated spectrum per row instead of len(labels) + 2) where that moves a row little, and a new
    Gauss-Newton step only where it does not: the labels stay within a median 0.05 sigma of two full
    steps' and every row within 1.5 (measured on these 300 rows: median 0.02, max 0.6), for two thirds
    of the emulated spectra."""
    table, _ = survey
    part = table.slice(0, 300)
    model = starcast.load_model()
    emulated, spectra = [], emu.Emulator.spectra
    monkeypatch.setattr(emu.Emulator, "spectra", lambda self, labels: emulated.append(len(labels))
                        or spectra(self, labels))
    chord = model.predict(part, backend="cpu")
    with_chord = sum(emulated)
    emulated.clear()
    monkeypatch.setattr(emu, "CHORD_STEP_MAX", 1e-12)  # every step a Gauss-Newton step
    full = model.predict(part, backend="cpu")
    shift = np.stack([np.abs(chord.column(t).to_numpy() - full.column(t).to_numpy())
                      / full.column(f"{t}_err").to_numpy() for t in (*TARGETS, "metals")]).max(axis=0)
    assert np.median(shift) < 0.05 and shift.max() < 1.5, (np.median(shift), shift.max())
    assert with_chord < 0.75 * sum(emulated), (with_chord, sum(emulated))


def test_scattered_bad_pixels_cost_sharp_lined_stars_only_the_data_they_hold(tmp_path):
    """Slow rotators at SNR 200-500 with 1% and 2.5% of their pixels masked at random, single pixels
    (below MASKED's share): their numbers move from the unmasked ones' within about what losing that
    data allows (measured: at most 0.3 / 1.5 sigma, the median of each row's largest shift 0.09 / 0.29).
    While a model bin half covered by good pixels took their mean as its own (and the fit took one
    Gauss-Newton step), they moved by up to 1.0 / 7.2 sigma (medians 0.24 / 0.79)."""
    synth_from_grid(read_grid(SAMPLE), 20, tmp_path / "c", at_nodes=True, seed=5, snr=(200.0, 500.0),
                    vsini=(0.0, 40.0))
    table = pq.read_table(tmp_path / "c").drop_columns(["mask"])
    n, npix = table.num_rows, len(table.column("flux")[0])
    rng = np.random.default_rng(0)
    masks = [np.zeros((n, npix), bool)] + [rng.random((n, npix)) < share for share in (0.01, 0.025)]
    spoilt = pa.concat_tables([table.append_column("mask", pa.FixedSizeListArray.from_arrays(m.ravel(), npix))
                               for m in masks])
    out = starcast.load_model().predict(spoilt, backend="cpu")
    clean = out.slice(0, n)
    for k in (1, 2):
        moved = out.slice(k * n, n)
        shift = np.stack([np.abs(moved.column(t).to_numpy() - clean.column(t).to_numpy())
                          / clean.column(f"{t}_err").to_numpy() for t in (*TARGETS, "metals")])
        assert shift.max() < 2.0 and np.median(shift.max(axis=0)) < 0.6, (k, shift.max(axis=0))


def _masked(table, lo: float, hi: float):
    """`table` with every row's pixels from `lo` to `hi` A masked besides those it masks."""
    wl = WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()]).values()
    mask = np.stack(table.column("mask").to_numpy(zero_copy_only=False)) | ((wl >= lo) & (wl < hi))
    return table.set_column(table.schema.get_field_index("mask"), "mask",
                            pa.FixedSizeListArray.from_arrays(mask.ravel(), mask.shape[1]))


def test_a_gap_is_covered_as_the_clean_spectrum_is(survey):
    """A gap on every row at SNR >= 30 (GAP; the estimate is the fit's, which leaves it out): the
    networks read the spectrum with the gap filled by the fit's model, so that 6 A of plain continuum
    (4600-4606 A) leaves each target's sigma the clean row's (median ratio within 2%; measured
    1.000-1.002x), and 12 A over He I 4471 or 20 A over H-gamma does not narrow it (measured
    0.999-1.042x; RMSE 1.01-1.14x clean) and every target stays covered 58-78% (measured 62-70% against
    64-69% clean). While the gap was read filled with the continuum and the networks' variance halved
    on GAP rows, the continuum's gap narrowed the sigmas to 0.90-0.95x (covered 59-64%) and the lines'
    widened them 1.9-3.6x (covered 88-96%)."""
    table, out = survey
    table, out = (t.filter(pa.array(table.column("snr").to_numpy() >= 30)) for t in (table, out))
    model = starcast.load_model()
    for (lo, hi), lines in (((4600.0, 4606.0), False), ((4466.0, 4478.0), True), ((4330.0, 4350.0), True)):
        gapped = model.predict(_masked(table, lo, hi), backend="cpu")
        assert np.all((gapped.column("flags").to_numpy() & Flag.GAP) != 0), (lo, hi)
        for t in (*TARGETS, "metals"):
            ratio = np.median(gapped.column(f"{t}_err").to_numpy() / out.column(f"{t}_err").to_numpy())
            assert ratio >= 0.99 if lines else abs(ratio - 1.0) < 0.02, (lo, t, ratio)
            cover = coverage(table.column(t).to_numpy(), gapped.column(t).to_numpy(),
                             gapped.column(f"{t}_err").to_numpy(), 0.68)
            assert 0.58 <= cover <= 0.78, (lo, t, cover)


def test_clean_spectra_are_seldom_flagged(survey):
    """MODEL_MISMATCH's tests (chi^2, ripple, veiling, broadening, contrast) each flag a tail of clean
    spectra, nearly disjoint ones, so their tails add up: together <= 2% of the survey's clean rows,
    SNR 10-500 (measured: 0.9%; 2.6% with the chi^2's tail at 1% and the others' at 0.5%)."""
    _, out = survey
    assert np.mean((out.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0) <= 0.02


def test_high_epistemic_reads_the_spectrums_snr(survey, tmp_path):
    """HIGH_EPISTEMIC's thresholds follow the SNR the spectrum states (`ood.epistemic_sigma_threshold`:
    the 99.9th percentile of held-out spectra in each of 6 SNR bins), where the networks disagree more
    on noisier spectra: <= 4% of the survey's clean stars at SNR 10-20 are flagged (measured: 1.4%;
    7.4% under one threshold per target, the 99.5th percentile over every SNR), and >= 85% of stars
    hotter than the grid (32-40 kK, the simplified generator's) at SNR 50-300 (measured: 92%; 76%)."""
    table, out = survey
    noisy = table.column("snr").to_numpy() < 20
    synth(300, tmp_path / "hot", mode="random", seed=7, snr=(50.0, 300.0), teff=(32000.0, 40000.0))
    hot = starcast.load_model().predict(pq.read_table(tmp_path / "hot"), backend="cpu")
    flagged = [np.mean((t.column("flags").to_numpy()[rows] & Flag.HIGH_EPISTEMIC) != 0)
               for t, rows in ((out, noisy), (hot, slice(None)))]
    assert flagged[0] <= 0.04 and flagged[1] >= 0.85, flagged


def test_a_catalog_without_flux_err_is_flagged_about_as_often_as_with_it(survey):
    """Without flux_err the noise is DER_SNR of the flux, a few percent off either way, which moves the
    chi^2 as much: judged against the threshold fitted on such spectra
    (`chi2_threshold_estimated_noise`), <= 4% of the survey's rows are MODEL_MISMATCH (measured: 0.6%;
    with flux_err 0.9%), where against the threshold of rows with flux_err more are (1.8%)."""
    table, with_errors = survey
    model = starcast.load_model()
    without = model.predict(table.drop_columns(["flux_err"]), backend="cpu")
    one = Model(replace(model.bundle, emulator=replace(model.emulator, chi2_threshold_estimated_noise=None)))
    plain = one.predict(table.drop_columns(["flux_err"]), backend="cpu")
    flagged = [np.mean((t.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0)
               for t in (without, with_errors, plain)]
    assert flagged[0] <= 0.04 and flagged[2] > flagged[0], flagged


def _flux_err_times(table, scale: float):
    """`table` with every row's flux_err times `scale`."""
    err = np.stack(table.column("flux_err").to_numpy(zero_copy_only=False))
    return table.set_column(table.schema.get_field_index("flux_err"), "flux_err",
                            spectrum_array(err * scale, err.shape[1]))


def _times(table, factor):
    """`table` with every row's flux multiplied by `factor(wavelength)` ([rows, pixels])."""
    wl = WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()]).values()
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False)) * factor(wl)
    return table.set_column(table.schema.get_field_index("flux"), "flux", spectrum_array(flux, flux.shape[1]))


def _rippled(table, amplitude: float = 0.01, period: float = 50.0):
    """`table` with a continuum ripple (an echelle blaze left over) of random phase on every row."""
    phase = np.random.default_rng(4).uniform(0, 2 * np.pi, (len(table), 1))
    return _times(table, lambda wl: 1 + amplitude * np.sin(2 * np.pi * wl / period + phase))


def test_a_continuum_ripple_is_a_model_mismatch(survey):
    """A 1% ripple of period 50 A at SNR >= 50: MODEL_MISMATCH on >= 95% of rows (the fit's ripple
    statistic; the chi^2 alone catches ~90%), on <= 3% of the same rows without it."""
    table, out = survey
    rows = np.flatnonzero(table.column("snr").to_numpy() >= 50)
    rippled = starcast.load_model().predict(_rippled(table.take(rows)), backend="cpu")
    flagged = [np.mean((t.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0)
               for t in (out.take(rows), rippled)]
    assert flagged[0] <= 0.03 and flagged[1] >= 0.95, flagged


def _legendre(order: int, amplitude: float):
    """The factor 1 + `amplitude` P_order(x), x the wavelength mapped onto [-1, 1] (a continuum shape
    beyond what a polynomial of lower degree holds)."""
    from numpy.polynomial import legendre

    def factor(wl):
        x = 2.0 * (wl - wl[0]) / (wl[-1] - wl[0]) - 1.0
        return 1.0 + amplitude * legendre.legval(x, np.eye(order + 1)[order])
    return factor


@pytest.fixture(scope="module")
def misstated(survey):
    """The survey's rows at SNR >= 50 and the shipped model's results on them as they are (`clean`),
    with flux_err 1.2x too small (`understated`) and with a continuum beyond the cubic of the
    preprocessing, 1% of a fourth- or sixth-order Legendre term (`shaped`, `shaped6`)."""
    table, out = survey
    at = np.flatnonzero(table.column("snr").to_numpy() >= 50)
    rows = table.take(at)
    model = starcast.load_model()
    return rows, {"clean": out.take(at), **{name: model.predict(t, backend="cpu") for name, t in (
        ("understated", _flux_err_times(rows, 1.0 / 1.2)), ("shaped", _times(rows, _legendre(4, 0.01))),
        ("shaped6", _times(rows, _legendre(6, 0.01))))}}


def test_noise_the_flux_err_understates_is_told_from_a_misfit(misstated):
    """flux_err 1.2x too small at SNR >= 50 (median chi^2 ~1.44): MODEL_MISMATCH tests the chi^2 beyond
    what the continuum's scatter from pixel to pixel says of the noise, so <= 15% of the rows are
    flagged (measured: 6.7%; the chi^2 itself is above its threshold on nearly all), where a continuum
    beyond the cubic the fit holds (1% of a fourth-order Legendre term), which that scatter does not
    see, is flagged on >= 70% (measured: 91%; at 0.5%, 65%; clean: 0.5%)."""
    _, results = misstated
    flagged = {name: np.mean((r.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0)
               for name, r in results.items()}
    assert flagged["understated"] <= 0.15 and flagged["shaped"] >= 0.70, flagged


def test_a_continuum_beyond_the_cubic_is_fitted_out_and_understated_noise_keeps_its_sigmas(misstated):
    """Where the cubic cannot explain such a continuum, the fit frees its own up to the sixth degree
    (`Emulator.freer_degree`): Teff and log g stay within 1.3x their clean RMSE at 1% of P_4 (measured
    1.03x and 1.14x; 1.85x and 2.26x with the cubic alone) and within 1.5x and 2.5x at 1% of P_6
    (1.21x and 1.92x; 2.53x and 4.61x), 55-90% of their errors within the 68% intervals (69%, 69% and
    65%, 60%; 65%, 77% and 44%, 11% with the cubic alone and the sigmas widened with its misfit),
    where the understated noise, no misfit, keeps its rows covered as the clean ones are, 62-78%
    (measured 68%, 70%; clean 67%, 69%)."""
    rows, results = misstated
    bound = {"shaped": (1.3, 1.3), "shaped6": (1.5, 2.5)}
    for name, r in results.items():
        for t, most in zip(("teff", "logg"), bound.get(name, (np.inf, np.inf)), strict=True):
            y = rows.column(t).to_numpy()
            cover = coverage(y, r.column(t).to_numpy(), r.column(f"{t}_err").to_numpy(), 0.68)
            clean = np.sqrt(np.mean((results["clean"].column(t).to_numpy() - y) ** 2))
            assert np.sqrt(np.mean((r.column(t).to_numpy() - y) ** 2)) <= most * clean, (name, t)
            assert (0.55 <= cover <= 0.90) if name in bound else (0.62 <= cover <= 0.78), (name, t, cover)


def _veiled(table, fraction: float):
    """`table` with `fraction` of each row's continuum added as light without lines (scattered light
    the reduction left): every line shallower by 1 / (1 + fraction)."""
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    flux = flux + fraction * np.median(flux, axis=1, keepdims=True)
    return table.set_column(table.schema.get_field_index("flux"), "flux", spectrum_array(flux, flux.shape[1]))


def test_light_without_lines_is_flagged_and_fitted_out(survey):
    """5% of the continuum as light without lines at SNR >= 100, which the labels absorb so that the
    chi^2 alone flags only some of those rows: MODEL_MISMATCH on >= 85% of them (the fit's veiling
    statistic; measured: 96%, 67% with the chi^2 alone), on <= 3% of the same rows without the light
    (measured: 0.8%). The light is fitted and removed, so log g and v sin i stay within 2x and 1.5x
    their clean RMSE (measured 1.92x and 1.30x, 11.6x and 7.6x without the statistic; log g's excess
    is mostly the 4% of rows whose light the labels mimic so well that it goes unseen) with 68%
    coverage of 55-85% (measured 57%, 62%; clean 71%, 67%; 59% and 63%, log g 1.83x, before the fit
    looked for nebular emission lines, which it finds in the shallower cores of 12% of these rows; 53%
    and 58% without the variance the light's freedom adds, on an earlier bundle)."""
    table, out = survey
    rows = np.flatnonzero(table.column("snr").to_numpy() >= 100)
    model = starcast.load_model()
    blind = Model(replace(model.bundle, emulator=replace(
        model.emulator, veiling_threshold=math.inf, broadening_threshold=NEVER, contrast_threshold=NEVER)))
    clean = out.take(rows)
    veiled = _veiled(table.take(rows), 0.05)
    seen, unseen = (m.predict(veiled, backend="cpu") for m in (model, blind))
    flagged = [np.mean((t.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0)
               for t in (clean, seen, unseen)]
    assert flagged[0] <= 0.03 and flagged[1] >= 0.85 and flagged[2] <= flagged[1] - 0.25, flagged
    for t in ("logg", "vsini"):
        y = table.column(t).to_numpy()[rows]
        rmse = [np.sqrt(np.mean((r.column(t).to_numpy() - y) ** 2)) for r in (clean, seen, unseen)]
        cover = coverage(y, seen.column(t).to_numpy(), seen.column(f"{t}_err").to_numpy(), 0.68)
        limit = {"logg": 2.0, "vsini": 1.5}[t]
        assert rmse[1] <= limit * rmse[0] and 3 * rmse[1] < rmse[2], (t, rmse)
        assert 0.55 <= cover <= 0.85, (t, cover)


def test_macroturbulence_is_flagged_and_bounds_the_vsini(tmp_path):
    """Radial-tangential macroturbulence of 40 km/s (no grid model has any; B giants and supergiants
    show such) on slow rotators (v sin i 0-60 km/s) at SNR 100-500, which the networks and the fit
    read as rotation (v sin i 17 km/s high) and the chi^2 flags on half of them: MODEL_MISMATCH on >= 85%
    (the fit's broadening statistic; measured: 100%, 48% without it), on <= 5% of the same stars
    without the macroturbulence (measured: 0.8%). Their v sin i is then an upper bound: UPPER_LIMIT on
    >= 85% (measured: 100%; without the statistic 0%, none reading below c / R), on the clean ones
    those read below c / R (measured: 24%)."""
    grid = read_grid(SAMPLE)
    tables = {}
    for name, zeta in (("clean", 0.0), ("macroturbulent", 40.0)):
        synth_from_grid(grid, 120, tmp_path / name, at_nodes=True, seed=7, snr=(100.0, 500.0),
                        vsini=(0.0, 60.0), obs=gs.Observation(macroturbulence=zeta))
        tables[name] = pq.read_table(tmp_path / name)
    model = starcast.load_model()
    blind = Model(replace(model.bundle, emulator=replace(model.emulator, broadening_threshold=NEVER)))
    runs = {"clean": model.predict(tables["clean"], backend="cpu"),
            "macroturbulent": model.predict(tables["macroturbulent"], backend="cpu"),
            "blind": blind.predict(tables["macroturbulent"], backend="cpu")}
    def share(bit: Flag) -> dict[str, float]:
        return {k: float(np.mean((t.column("flags").to_numpy() & bit) != 0)) for k, t in runs.items()}

    flagged, bounds = share(Flag.MODEL_MISMATCH), share(Flag.UPPER_LIMIT)
    assert flagged["clean"] <= 0.05 and flagged["macroturbulent"] >= 0.85, flagged
    assert flagged["blind"] <= flagged["macroturbulent"] - 0.3, flagged
    assert bounds["macroturbulent"] >= 0.85 and bounds["blind"] <= 0.1 and bounds["clean"] <= 0.35, bounds


def test_a_continuum_ripple_is_fitted_out(survey):
    """The same 1% ripple at SNR >= 100 is fitted with the labels on every row (`Fit.ripple_excess` > 0):
    the chi^2 it leaves is that of a clean spectrum (median <= 1.05; measured 1.02), nearly all the
    excess was the ripple's (median share >= 0.9; measured 1.00), and Teff and log g stay within
    1.5x their clean RMSE (measured 1.09x, 1.03x; 2.4-2.9x when the fit had no ripple) with 68%
    coverage of 60-95% (measured 82%, 88%: the networks' variance in the sigma grows with the ripple,
    the fit's error hardly does). Noise the flux_err understates by 1.5x is not taken for a ripple
    (fitted on <= 3% of rows; measured 0%)."""
    table, _ = survey
    rows = table.take(np.flatnonzero(table.column("snr").to_numpy() >= 100))
    model = starcast.load_model()
    rippled, understated_fit = (model.goodness_of_fit(t, backend="cpu")
                                for t in (_rippled(rows), _flux_err_times(rows, 1.0 / 1.5)))
    share = rippled.excess[:, 0] / np.maximum(rippled.excess.sum(axis=1), 1e-9)
    assert (rippled.ripple_excess > 0).all() and np.median(rippled.chi2) <= 1.05 and np.median(share) >= 0.9
    assert np.mean(understated_fit.ripple_excess > 0) <= 0.03 and np.median(understated_fit.chi2) > 2.0
    clean, spoilt = (model.predict(t, backend="cpu") for t in (rows, _rippled(rows)))
    for t in ("teff", "logg"):
        y = rows.column(t).to_numpy()
        rmse = [np.sqrt(np.mean((r.column(t).to_numpy() - y) ** 2)) for r in (clean, spoilt)]
        cover = coverage(y, spoilt.column(t).to_numpy(), spoilt.column(f"{t}_err").to_numpy(), 0.68)
        assert rmse[1] <= 1.5 * rmse[0] and 0.60 <= cover <= 0.95, (t, rmse, cover)


def test_the_fits_label_sigmas_are_the_scatter_of_its_labels_over_noise():
    """The emulator fit's label sigmas from its curvature (`Fit.label_err`, which the calibration
    adds to the network's variance) against the scatter of the fitted labels over 200 noise draws of
    one star, at two of the shipped sample's nodes (left out of training), SNR 150, v sin i 200 km/s:
    the scatter is 0.8-1.4x the median sigma for every label (measured at all five nodes, v sin i 30
    and 200: 0.88-1.21x)."""
    lib = gs.BroadenedLibrary.build(read_grid(SAMPLE), gs.Observation(), metals=np.array([0.0]))
    model, n = starcast.load_model(), 200
    pert = gs.Perturbations(snr=(150.0, 150.0), ripple_prob=0.0, gap_prob=0.0, rv_error_kms=0.0)
    for node in (0, 4):
        labels = {"teff": np.full(n, lib.nodes[node, 0]), "logg": np.full(n, lib.nodes[node, 1]),
                  "vsini": np.full(n, 200.0), "metals": np.zeros(n)}
        table = gs.draw_survey(lib, labels, pert, np.random.default_rng(node)).table(lib.obs)
        fit = model.goodness_of_fit(table.drop_columns(list(labels)), backend="cpu")
        ratio = np.nanstd(fit.labels, axis=0) / np.nanmedian(fit.label_err, axis=0)
        assert np.all((ratio > 0.8) & (ratio < 1.4)), (node, ratio)


def _coverage_with_misstated_noise(survey, scale: float) -> tuple[dict, pa.Table]:
    """(68% coverage per target of the SNR >= 100 rows of `survey` with their flux_err times `scale`,
    under the shipped calibration (`shipped`) and without its chi^2 inflation (`without`); the shipped
    model's results on those rows)."""
    table, _ = survey
    rows = table.take(np.flatnonzero(table.column("snr").to_numpy() >= 100))
    misstated = _flux_err_times(rows, scale)
    model = starcast.load_model()
    cover, results = {}, {}
    for name, m in (("shipped", model), ("without", _without_chi2_inflation(model))):
        out = results[name] = m.predict(misstated, backend="cpu")
        cover[name] = {t: coverage(rows.column(t).to_numpy(), out.column(t).to_numpy(),
                                   out.column(f"{t}_err").to_numpy(), 0.68) for t in TARGETS}
    return cover, results["shipped"]


def _without_chi2_inflation(model):
    """`model` with its calibration but for the chi^2 inflation (and so Birge's ratio below 1)."""
    calibration = {k: v for k, v in model.bundle.manifest["calibration"].items() if k != "chi2_inflation"}
    return Model(replace(model.bundle, manifest={**model.bundle.manifest, "calibration": calibration}))


def test_error_bars_hold_where_the_noise_is_understated(survey):
    """Noise the flux_err understates by 1.5x at SNR >= 100 (the fit's chi^2 ~2.2; the calibration saw
    such spectra, `trainers.emulator.UNDERSTATED_NOISE`): the calibration reads the SNR the fit's chi^2
    says the spectrum has (Birge's ratio), not the stated one, so the error bars keep their size
    (median ratio to those with the noise as stated >= 0.95; measured 0.976 for each; 0.89-0.93 when it
    read the stated SNR) and >= 64% of the Teff, log g and v sin i errors stay inside the 68% intervals
    (measured: 68.9, 71.1, 65.3%; 70.4, 72.2, 66.6% with the noise as stated)."""
    cover, out = _coverage_with_misstated_noise(survey, 1.0 / 1.5)
    assert min(cover["shipped"].values()) >= 0.64, cover
    table, stated = survey
    high = table.column("snr").to_numpy() >= 100
    for t in TARGETS:
        ratio = out.column(f"{t}_err").to_numpy() / stated.column(f"{t}_err").to_numpy()[high]
        assert np.median(ratio) >= 0.95, (t, np.median(ratio))


def test_error_bars_narrow_with_the_fits_chi2_where_the_noise_is_overstated(survey):
    """flux_err 1.2x the noise at SNR >= 100 (the fit's chi^2 ~0.69): the aleatoric variance narrows
    by chi^2 (Birge's ratio below 1, with the calibration's chi^2 inflation), so that the 68% intervals
    cover 60-76% of the Teff, log g and v sin i errors (measured: 69.1, 70.9, 64.8%; 70.4, 72.2, 66.6% with
    the noise as stated), where without it they cover more (74.9, 75.2, 70.6%)."""
    cover, _ = _coverage_with_misstated_noise(survey, 1.2)
    assert all(0.60 <= c <= 0.76 for c in cover["shipped"].values()), cover
    assert all(cover["without"][t] > cover["shipped"][t] + 0.03 for t in TARGETS), cover


def test_spectra_the_engine_shifts_are_not_narrowed(survey, unchecked):
    """Wavelengths 0.3 A off (~20 km/s) and the engine's check of the given rv bypassed: a residual rv
    the fit resolves, so the engine shifts those spectra on its grid, and the interpolation smooths
    their noise, lowering the chi^2 below 1 (median ~0.8) though flux_err states the noise right; their
    aleatoric sigmas are not narrowed by it (as without the chi^2 inflation, where chi^2 < 1)."""
    table, _ = survey
    rows = table.take(np.flatnonzero(table.column("snr").to_numpy() >= 100))
    grid = WavelengthGrid.from_json(rows.schema.metadata[META_WAVELENGTH.encode()])
    off = WavelengthGrid.linear(grid.start + 0.3, grid.step, grid.n, grid.medium)
    meta = {**rows.schema.metadata, META_WAVELENGTH.encode(): off.to_json().encode()}
    rows = rows.replace_schema_metadata(meta)
    model = starcast.load_model()
    out, plain = (m.predict(rows, backend="cpu") for m in (model, _without_chi2_inflation(model)))
    chi2 = out.column("chi2").to_numpy()
    shifted = ((out.column("flags").to_numpy() & Flag.RV_MISMATCH) != 0) & (chi2 < 1.0)
    assert shifted.mean() >= 0.8 and np.median(chi2) < 0.9, (shifted.mean(), np.median(chi2))
    for t in TARGETS:
        np.testing.assert_allclose(out.column(f"{t}_err_aleatoric").to_numpy()[shifted],
                                   plain.column(f"{t}_err_aleatoric").to_numpy()[shifted], rtol=1e-9)


def _slow_rotators(obs: gs.Observation, snr: float = 300.0, n: int = 8, rv: float = 0.0,
                   vsini: tuple = (20.0, 30.0, 45.0)):
    """(v sin i [S], catalog table): n noise draws each of stars at two of the sample's nodes rotating at
    `vsini` km/s, receding at `rv` km/s (stated), observed on `obs`'s pixels at `snr` per 0.4 A (the
    model grid's pixel)."""
    sample, vsini = read_grid(SAMPLE), np.array(vsini)
    seen = sample.wavelength / rest_frame_factor(rv)
    clean = np.concatenate([gs.broaden(seen, np.minimum(sample.flux[k], 1.0), vsini, obs) for k in (1, 3)])
    rng = np.random.default_rng(11)
    err = np.full((len(clean) * n, obs.npix), math.sqrt(obs.step / 0.4) / snr, np.float32)
    flux = np.repeat(clean, n, axis=0) + err * rng.standard_normal(err.shape, np.float32)
    table = pa.table({"id": pa.array(np.arange(len(flux)), pa.int64()),
                      "flux": spectrum_array(flux, obs.npix), "flux_err": spectrum_array(err, obs.npix),
                      "rv": pa.array(np.full(len(flux), rv))},
                     metadata={META_WAVELENGTH: obs.grid().to_json()})
    return np.repeat(np.tile(vsini, 2), n), table


def test_a_spectrum_degraded_from_a_higher_resolution_is_read_at_its_noise_without_flux_err():
    """Stars of the sample observed at R 48 000 on 0.01 A pixels with white noise (SNR 100-800 per
    0.4 A), convolved down to R 20 000 and averaged onto 0.05 A pixels, as a user degrades an archive
    spectrum, given without flux_err: the noise is estimated from the flux over as many pixels as make
    a training spectrum's pixel, where the convolution left it (measured per pixel, comparing pixels
    it made alike, the median chi2 was 5.4 here, 10 on 150 such stars with 95% of them MODEL_MISMATCH;
    now 1.25 here), and the error bars hold."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(5)
    sample, n, fine, binned = read_grid(SAMPLE), 40, 0.01, 5
    high = gs.Observation(start=3990.0, step=fine, npix=82001, resolving_power=48000.0)
    node, vsini = rng.integers(0, len(sample.flux), n), rng.uniform(3.0, 300.0, n)
    flux = np.concatenate([gs.broaden(sample.wavelength, np.minimum(sample.flux[k], 1.0), vsini[[i]], high)
                           for i, k in enumerate(node)])
    snr = np.exp(rng.uniform(np.log(100.0), np.log(800.0), n))
    flux += math.sqrt(0.4 / fine) / snr[:, None] * rng.standard_normal(flux.shape)
    fwhm = 4400.0 * math.sqrt(1 / 20000.0**2 - 1 / 48000.0**2) / fine  # pixels, at mid-range
    npix = (high.npix - 1) // binned
    flux = gaussian_filter1d(flux, fwhm / math.sqrt(8 * math.log(2)), axis=1)[:, :npix * binned]
    flux = flux.reshape(n, npix, binned).mean(axis=2).astype(np.float32)
    grid = WavelengthGrid.linear(high.start + fine * (binned - 1) / 2, fine * binned, npix, "air")
    table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "flux": spectrum_array(flux, npix),
                      "rv": pa.array(np.zeros(n)), "resolving_power": pa.array(np.full(n, 20000.0))},
                     metadata={META_WAVELENGTH: grid.to_json()})
    out = starcast.load_model().predict(table, backend="cpu")
    assert np.median(out.column("chi2").to_numpy()) < 1.6
    truth = {"teff": sample.nodes()[node, 0], "logg": sample.nodes()[node, 1], "vsini": vsini}
    for t, true in truth.items():
        assert coverage(true, out.column(t).to_numpy(), out.column(f"{t}_err").to_numpy(), 0.95) >= 0.85, t


def test_slow_rotators_read_alike_on_finer_pixels_and_at_any_rv():
    """Stars rotating at 12-22 km/s (two of the sample's nodes, SNR 300) on the 0.2 A pixels of the
    training spectra at rest, and at 37 km/s on 0.05 A pixels or on 0.2 A ones (off the training
    pixels' centres by half a pixel). The engine remakes the latter two as the training spectra's own
    pixels (the manifest's `training_pixels`; `response_variance` is what the trainer computes from
    the config): then they read as the first, on average within 0.03 km/s (finer) and 0.27 km/s
    faster (shifted; measured). Only smoothed up to the training spectra's mean response and
    rebinned where they fall, as before, lines of another shape read 1.15 and 1.54 km/s slower; with
    no pixel response at all the finer read 7.8 km/s slower."""
    from starcast.trainers.config import load_config
    from starcast.trainers.gridsource import training_response

    cfg = load_config(Path(starcast.__file__).parents[1] / "trainers" / "configs" / "ob-default.toml")
    obs = gs.Observation(**cfg.data.grid["observation"])
    pert = gs.Perturbations(**cfg.data.grid["perturbations"])
    model = starcast.load_model()
    assert model.bundle.input["response_variance"] == pytest.approx(
        training_response(obs, pert, cfg.grid.values(), cfg.preprocess["method"] == "flux"), rel=1e-9)
    assert model.bundle.input["training_pixels"] == obs.grid().to_dict()

    def without(*keys):
        inputs = {k: v for k, v in model.bundle.input.items() if k not in keys}
        return Model(replace(model.bundle, manifest={**model.bundle.manifest, "input": inputs}))

    smoothed, plain = without("training_pixels"), without("training_pixels", "response_variance")
    slow = (12.0, 16.0, 22.0)
    truth, training = _slow_rotators(obs, vsini=slow)
    _, fine = _slow_rotators(replace(obs, step=0.05, npix=16001), rv=37.0, vsini=slow)
    _, shifted = _slow_rotators(obs, rv=37.0, vsini=slow)
    read = {name: m.predict(t, backend="cpu").column("vsini").to_numpy() - truth
            for name, m, t in (("training", model, training), ("fine", model, fine),
                               ("shifted", model, shifted), ("smoothed fine", smoothed, fine),
                               ("smoothed shifted", smoothed, shifted), ("plain fine", plain, fine))}
    slower = {name: float(np.mean(r - read["training"])) for name, r in read.items()}
    assert abs(slower["fine"]) < 0.4 and abs(slower["shifted"]) < 0.6, slower
    assert slower["smoothed fine"] < -0.8 and slower["smoothed shifted"] < -0.8, slower
    assert slower["plain fine"] < -4.0, slower


def test_slow_rotators_on_coarser_pixels_read_through_their_response(monkeypatch):
    """The same stars on 0.4 A pixels centred on the model grid's bin edges: each model pixel is half
    of two, a response of variance 0.053 A^2 against the training spectra's 0.0225, broader lines
    that no smoothing takes back. The emulator's fit sees its spectra through the excess
    (`Emulator.blur`): then they read 1.3 km/s faster than on the training spectra's pixels on
    average (2.4 at 20 km/s; measured), against 9.4 km/s without it (13 at 20 km/s)."""
    from starcast.engine.emulator import Emulator

    obs = gs.Observation()
    model = starcast.load_model()
    truth, training = _slow_rotators(obs)
    _, coarse = _slow_rotators(replace(obs, start=obs.start + obs.step, step=2 * obs.step,
                                       npix=obs.npix // 2))
    read = {name: model.predict(t, backend="cpu") for name, t in (("training", training), ("coarse", coarse))}
    monkeypatch.setattr(Emulator, "blur", lambda self, spectra, variance: spectra)
    read["unseen"] = model.predict(coarse, backend="cpu")
    read = {name: out.column("vsini").to_numpy() - truth for name, out in read.items()}
    assert abs(np.mean(read["coarse"] - read["training"])) < 2.0, read
    assert np.mean(read["unseen"] - read["training"]) > 5.0, read


@pytest.fixture(scope="module")
def metal_poor():
    """The same 600 stars of the sample at SNR 50-300 twice (at five nodes: with fewer, a coverage is
    left several points to chance), of the grid's composition and with metal lines 0.2 dex weaker
    (inside the model's training span, as in mildly metal-poor real B stars): (truth, results at 0 dex,
    results at -0.2 dex)."""
    from starcast.catalogs import gridsynth as gs

    lib = gs.BroadenedLibrary.build(read_grid(SAMPLE), gs.Observation(), metals=np.array([-0.2, 0.0]))
    pert = gs.Perturbations(snr=(50.0, 300.0), ripple_prob=0.0, gap_prob=0.0, rv_error_kms=0.0)
    model, out = starcast.load_model(), []
    for metals in (0.0, -0.2):
        rng = np.random.default_rng(5)
        labels = gs.labels_at(lib.nodes[rng.integers(0, len(lib.nodes), 600)], pert, rng)
        labels["metals"] = np.full(600, metals)
        table = gs.draw_survey(lib, labels, pert, rng).table(lib.obs)
        out.append(model.predict(table.drop_columns(list(labels)), backend="cpu"))
    return labels, *out


def test_metal_poor_stars_keep_their_teff_and_their_metals_are_measured(metal_poor):
    """The model was trained with metal lines 0.5-2x the grid's: weaker metal lines must not pass for
    a cooler star (the previous default, trained on one composition, put -0.2 dex stars ~1 kK too cool
    with 14% coverage; measured here: Teff RMSE 130 K -> 162 K, 68% coverage 66%), and `metals` must
    find the -0.2 dex (median -0.202, coverage 64%)."""
    labels, solar, poor = metal_poor
    for t in TARGETS:
        err = [r.column(t).to_numpy() - labels[t] for r in (solar, poor)]
        rmse = [float(np.sqrt(np.mean(e**2))) for e in err]
        cover = coverage(labels[t], poor.column(t).to_numpy(), poor.column(f"{t}_err").to_numpy(), 0.68)
        assert rmse[1] <= 1.5 * rmse[0] and 0.58 <= cover <= 0.78, (t, rmse, cover)
    for r, truth in ((solar, 0.0), (poor, -0.2)):
        m, s = r.column("metals").to_numpy(), r.column("metals_err").to_numpy()
        cover = coverage(np.full(len(m), truth), m, s, 0.68)
        assert abs(np.median(m) - truth) < 0.05 and 0.58 <= cover <= 0.78, (truth, np.median(m), cover)


def test_metal_lines_beyond_the_trained_span_are_out_of_range_however_little_the_networks_weigh(
        metal_poor):
    """Metal lines 0.5 dex weaker than the grid's, beyond the trained -0.3 dex: the emulator fit's
    metals stay within the range, pinned at -0.3, and the networks' mean lies below it, so >= 95% of
    rows are OUT_OF_RANGE, with the calibration as shipped and with the networks' weight in metals set
    to 0 (the estimate the fit's alone, on the bound); <= 2% of the 0 and -0.2 dex rows are (measured:
    0.0% and 0.0%)."""
    labels, solar, poor = metal_poor
    lib = gs.BroadenedLibrary.build(read_grid(SAMPLE), gs.Observation(), metals=np.array([-0.5]))
    pert = gs.Perturbations(snr=(50.0, 300.0), ripple_prob=0.0, gap_prob=0.0, rv_error_kms=0.0)
    rng = np.random.default_rng(6)
    drawn = gs.labels_at(lib.nodes[rng.integers(0, len(lib.nodes), 200)], pert, rng)
    drawn["metals"] = np.full(200, -0.5)
    table = gs.draw_survey(lib, drawn, pert, rng).table(lib.obs).drop_columns(list(drawn))
    model = starcast.load_model()
    calibration = model.bundle.manifest["calibration"]
    weight = {**calibration["network_weight"], "metals": [0.0] * len(calibration["network_weight"]["metals"])}
    manifest = {**model.bundle.manifest, "calibration": {**calibration, "network_weight": weight}}
    fit_alone = Model(replace(model.bundle, manifest=manifest))
    for m in (model, fit_alone):
        out = m.predict(table, backend="cpu")
        assert np.mean((out.column("flags").to_numpy() & Flag.OUT_OF_RANGE) != 0) >= 0.95
        assert np.median(out.column("metals").to_numpy()) <= -0.3
    for r in (solar, poor):
        assert np.mean((r.column("flags").to_numpy() & Flag.OUT_OF_RANGE) != 0) <= 0.02


def _numbers_as_clean(table, out, spoilt, more_mismatch: float = 0.01) -> None:
    """`spoilt`, the predictions of a perturbed `table`, flag no more rows MODEL_MISMATCH than `out`,
    the clean ones, do (+ `more_mismatch`, a share of the rows), and keep Teff and log g within 1.2x of
    their clean RMSE with a 68% coverage of 58-78% in each SNR band."""
    mismatch = [np.mean((t.column("flags").to_numpy() & Flag.MODEL_MISMATCH) != 0) for t in (out, spoilt)]
    assert mismatch[1] <= mismatch[0] + more_mismatch, mismatch
    snr = table.column("snr").to_numpy()
    for t in ("teff", "logg"):
        y = table.column(t).to_numpy()
        for lo, hi in ((10, 30), (30, 100), (100, 500)):
            rows = (snr >= lo) & (snr < hi)
            rmse = [np.sqrt(np.mean((r.column(t).to_numpy()[rows] - y[rows]) ** 2)) for r in (out, spoilt)]
            cover = coverage(y[rows], spoilt.column(t).to_numpy()[rows],
                             spoilt.column(f"{t}_err").to_numpy()[rows], 0.68)
            assert rmse[1] <= 1.2 * rmse[0] and 0.58 <= cover <= 0.78, (t, lo, rmse, cover)


def test_the_diffuse_band_at_4428_is_fitted_out(survey):
    """A Lorentzian band 5% deep at 4428.2 A with a FWHM of 20 A (a star reddened by E(B-V) ~0.5; the
    fit's terms start from another centre and width) on every row: the fit finds the band on nearly
    every row at SNR >= 30 (>= 97%; measured 100%, 96% at SNR 10-30) and on few clean ones (<= 2%;
    measured 0.4%), its depth within 0.005 (median at SNR >= 100: 0.0498); `predict` divides it out
    and predicts again, so that its numbers are as clean ones (`_numbers_as_clean`; measured: 0.7%
    MODEL_MISMATCH against 0.9% clean, Teff and log g 0.99-1.02x their clean RMSE, covered 64-72%, within
    1.3 points of clean). Without the band in the fit, every row at SNR >= 50 was flagged and Teff and log
    g were 7.2x and 7.5x their clean RMSE at SNR 100-500."""
    table, out = survey
    model = starcast.load_model()
    reddened = _times(table, lambda wl: 1.0 - 0.05 / (1.0 + ((wl - 4428.2) / 10.0) ** 2))
    snr = table.column("snr").to_numpy()
    depth = [model.goodness_of_fit(t, backend="cpu").dib_depths[:, 0] for t in (table, reddened)]
    fits = [d > 0 for d in depth]
    assert np.mean(fits[1][snr >= 30]) >= 0.97 and np.mean(fits[0]) <= 0.02, [np.mean(f) for f in fits]
    assert np.median(depth[1][snr >= 100]) == pytest.approx(0.05, abs=0.005)
    _numbers_as_clean(table, out, model.predict(reddened, backend="cpu"))


def test_the_narrow_diffuse_bands_are_fitted_out(survey):
    """The narrow bands at 4502, 4727 and 4763 A as a star reddened by E(B-V) ~1 carries them
    (Gaussians 4.7%, 6.7% and 3.8% deep, `bench/perturbations.py`'s NARROW_DIBS), seen through a cloud
    at +20 km/s and 1.1x as wide as the fit's terms start, on every row: the fit finds each on nearly
    every row at SNR >= 100 (>= 97%; measured 99.7-100%, 91-100% at SNR 30-100) and on few clean ones
    (<= 2% each; measured 0.4-0.8%), its depth within 10% (medians at SNR >= 100 2.5-4.7% short of
    the drawn depths: the wider band's equivalent width in a shallower profile); `predict` divides
    them out and predicts again, so that their numbers are as clean ones (`_numbers_as_clean`;
    measured: 0.7% MODEL_MISMATCH against 0.9% clean, Teff and log g 0.99-1.00x their clean RMSE,
    covered 64-71%, within 1 point of clean). Without them in the fit, 93% of such rows at SNR 50-300 were
    flagged MODEL_MISMATCH, with Teff and log g 1.4x their clean RMSE (TLUSTY test nodes)."""
    table, out = survey
    model = starcast.load_model()
    bands = ((1, 4501.8, 3.0, 0.047), (2, 4726.8, 3.5, 0.067), (3, 4762.6, 2.5, 0.038))
    reddened = _times(table, lambda wl: np.prod([
        1.0 - depth * np.exp(-4.0 * np.log(2.0) * ((wl - centre - 0.3) / (1.1 * fwhm)) ** 2)
        for _, centre, fwhm, depth in bands], axis=0))
    snr = table.column("snr").to_numpy()
    fits = [model.goodness_of_fit(t, backend="cpu").dib_depths for t in (table, reddened)]
    for j, _, _, drawn in bands:
        clean, found = (f[:, DIB_TERMS * j] for f in fits)
        assert np.mean(found[snr >= 100] > 0) >= 0.97 and np.mean(clean > 0) <= 0.02, j
        assert np.median(found[snr >= 100]) == pytest.approx(drawn, rel=0.1), j
    _numbers_as_clean(table, out, model.predict(reddened, backend="cpu"))


def test_the_narrow_interstellar_lines_cost_nothing(survey):
    """CH+ 4232.55 A and CH 4300.31 A, 40 mA each (a strongly reddened sightline), unresolved (the
    instrument's Gaussian, FWHM 0.22 A), from a cloud at -100 to +100 km/s relative to each star: the
    fit gives their pixels no weight, so their numbers are as clean ones (`_numbers_as_clean`;
    measured: MODEL_MISMATCH 0.7% as clean, Teff and log g 0.99-1.01x their clean RMSE, covered
    65-71%). With their pixels weighed, 46% of such rows at SNR 50-300 were flagged MODEL_MISMATCH
    (TLUSTY test nodes, `bench/perturbations.py`)."""
    table, out = survey
    velocity = np.random.default_rng(5).uniform(-100.0, 100.0, (len(table), 1))

    def lines(wl):
        at = np.array([4232.55, 4300.31])[:, None, None] * (1.0 + velocity / C_KMS)  # [2, rows, 1]
        depth = 0.040 / (1.0645 * 0.22)  # a Gaussian of 40 mA equivalent width and a FWHM of 0.22 A
        return np.prod(1.0 - depth * np.exp(-4.0 * np.log(2.0) * ((wl - at) / 0.22) ** 2), axis=0)
    _numbers_as_clean(table, out, starcast.load_model().predict(_times(table, lines), backend="cpu"))


def test_nebular_emission_in_the_line_cores_is_fitted_out(survey):
    """An H II region's emission in the aperture on every row: H gamma of 0.1 A equivalent width, H
    delta 0.55x and He I 4471 0.09x as strong (`bench/perturbations.py`'s `nebular`), Gaussians of the
    gas's 30 km/s within the instrument's profile, at -15 to +15 km/s relative to each star, on its
    continuum: the fit finds the H gamma line on most rows at SNR >= 50 (>= 90%; measured 92%) and on
    few clean ones (<= 2%; measured 0.3%); `predict` divides the lines out and predicts again, so that
    Teff and log g are as clean ones (`_numbers_as_clean`, with up to 2 points more MODEL_MISMATCH than
    clean: measured 1.9% against 0.9%, 9 rows of 900 more, on the edge of 1 point, where one row
    rounded otherwise on another machine would fail it; 1.01-1.07x their clean RMSE, covered 63-72%) and
    v sin i (true > 15 km/s) at SNR >= 30 within 1.5x its clean RMSE, covered 58-78% (measured 1.10x,
    62.8% against 68.3% clean). Without the nebular
    lines in the fit, 74% of the rows were flagged MODEL_MISMATCH, Teff and log g were 4.8x and 6.1x
    their clean RMSE at SNR 100-500, and v sin i 4.2x, covered 10%."""
    table, out = survey
    model = starcast.load_model()
    wl = WavelengthGrid.from_json(table.schema.metadata[META_WAVELENGTH.encode()]).values()
    flux = np.stack(table.column("flux").to_numpy(zero_copy_only=False))
    at = 1.0 + np.random.default_rng(6).uniform(-15.0, 15.0, (len(table), 1)) / C_KMS
    fwhm = np.hypot(30.0, C_KMS / 20000.0) / C_KMS  # over the wavelength
    emission = sum(0.1 * share / (1.0645 * line * fwhm)
                   * np.exp(-4.0 * np.log(2.0) * ((wl - line * at) / (line * fwhm)) ** 2)
                   for line, share in ((4340.47, 1.0), (4101.74, 0.55), (4471.48, 0.09)))
    lit = table.set_column(table.schema.get_field_index("flux"), "flux", spectrum_array(
        flux + np.median(flux, axis=1, keepdims=True) * emission, flux.shape[1]))
    snr = table.column("snr").to_numpy()
    h_gamma = next(j for j, band in enumerate(BANDS) if band.emission and band.centre == 4340.47)
    found = [model.goodness_of_fit(t, backend="cpu").dib_depths[:, DIB_TERMS * h_gamma] < 0
             for t in (table, lit)]
    assert np.mean(found[1][snr >= 50]) >= 0.9 and np.mean(found[0]) <= 0.02, [np.mean(f) for f in found]
    spoilt = model.predict(lit, backend="cpu")
    _numbers_as_clean(table, out, spoilt, more_mismatch=0.02)
    y = table.column("vsini").to_numpy()
    rows = (snr >= 30) & (y > 15)
    rmse = [np.sqrt(np.mean((r.column("vsini").to_numpy()[rows] - y[rows]) ** 2)) for r in (out, spoilt)]
    cover = coverage(y[rows], spoilt.column("vsini").to_numpy()[rows],
                     spoilt.column("vsini_err").to_numpy()[rows], 0.68)
    assert rmse[1] <= 1.5 * rmse[0] and 0.58 <= cover <= 0.78, (rmse, cover)
