"""The predictor: a loaded model bundle that turns catalog rows into the results columns of DESIGN.md.

`Model.predict` is `infer(prepare(batch))`: `prepare` (CPU) turns ids into RNG keys and preprocesses
onto the model grid, `infer` runs the ensemble x MC-dropout kernel of the chosen backend and sets the
quality flags. The local and Ray pipelines call these same two methods (through `rows.Predictor`),
so their numbers cannot differ. Nothing here knows of files, Ray or progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import starcast

from ..catalogs.medium import check_medium
from ..catalogs.schema import (
    CHI2,
    CHI2_PIXELS,
    ERROR,
    FLAGS,
    FLUX,
    FLUX_ERR,
    ID,
    IVAR,
    MASK,
    META_BACKEND,
    META_MEDIUM,
    META_MODEL,
    META_MODEL_SHA256,
    META_SAMPLES,
    META_SEED,
    META_VERSION,
    META_WAVELENGTH,
    RV,
    RV_ERR,
    WAVELENGTH,
    Flag,
    WavelengthGrid,
    results_schema,
)
from ..errors import CatalogError, ModelError, StarcastError
from ..kernels import reference
from ..kernels.features import network_inputs
from ..kernels.input_checks import column_medium, number_column
from ..kernels.preprocess import PreprocessSettings, preprocess
from ..kernels.rng import id_keys
from .bundle import Bundle, load_bundle
from .calibration import EXCESS_PARTS, handled_defect
from .emulator import BANDS, DIB_TERMS, Fit
from .rv import RESAMPLED_RV_KMS, V_MAX, VelocitySearch, at_edge, significant

BACKENDS = ("auto", "triton", "cpu", "reference")
FIT_FIELDS = tuple(f.name for f in fields(Fit))
PREPARED_X, PREPARED_KEY = "x", "key"  # columns of a prepared batch besides id, flags, error
# and, for a model with an emulator, the inverse variance of x on the grid, the rv preprocessing removed
# (given or estimated; km/s), the sigma of an estimated one (null where given), the km/s the check added
# to a given rv, the variance (A^2) by which the row's pixel response is broader than the training
# spectra's (`Preprocessed.response_excess`) and whether its noise is DER_SNR's (no flux_err or ivar)
PREPARED_IVAR, PREPARED_RV, PREPARED_RV_ERR = "ivar", RV, RV_ERR
PREPARED_RESPONSE_EXCESS = "response_excess"
PREPARED_RV_CORRECTION = "rv_correction"
PREPARED_NOISE_ESTIMATED = "noise_estimated"


@dataclass(frozen=True)
class PredictiveSamples:
    """All M x S raw predictions of a few spectra, in the targets' physical units, calibrated.
    `mu`, `sigma`: float64 [B, M, S, K]; rows that could not be predicted hold NaN (see `errors`)."""

    ids: list
    targets: list[str]
    mu: np.ndarray
    sigma: np.ndarray
    flags: np.ndarray
    errors: list[str | None]


@dataclass(frozen=True)
class Estimates:
    """What `predict` computes before it makes columns, to fit a calibration on: which rows were
    predicted (`ok` [B]); the network's mean (blended) and its aleatoric and epistemic variances [B, K],
    calibrated by the model's own calibration, if any (the trainers take them from a copy without one,
    so that nothing is counted twice); the emulator fit's labels per target and their variances
    from its curvature [B, K], its reduced chi^2 [B] as the calibration reads it, its misfit [B]
    (`emulator.Fit.misfit`) and the parts of its excess [B, len(EXCESS_PARTS)] (`emulator.Fit.excess`;
    NaN, NaN, NaN, 0 and 0 where the fit gives none, and everywhere without an emulator); the variance
    that light without lines the fit removed adds to each target [B, K] (`Model._light_var`; in `var_a`
    where the model has a calibration); the log10 SNR [B] the calibration reads for each row
    (`Model._calibration_log_snr`) and the one the HIGH_EPISTEMIC thresholds read
    (`Model._flag_log_snr`); which rows have a gap [B]."""

    ok: np.ndarray
    mean: np.ndarray
    var_a: np.ndarray
    var_e: np.ndarray
    fitted: np.ndarray
    fit_var: np.ndarray
    chi2: np.ndarray
    misfit: np.ndarray
    excess: np.ndarray
    light_var: np.ndarray
    log_snr: np.ndarray
    flag_log_snr: np.ndarray
    gapped: np.ndarray


def load_model(name_or_path: str | os.PathLike = "ob-default", *, samples: int | None = None,
               seed: int = 0, backend: str = "auto") -> Model:
    """Load a model bundle (a shipped name such as "ob-default", or a directory) and verify it.
    `samples`, `seed` and `backend` are the defaults `Model.__call__` uses."""
    return Model(load_bundle(name_or_path), samples=samples, seed=seed, backend=backend)


class Model:
    """An ensemble of M MLPs with MC dropout, ready to predict catalog rows (see module docstring)."""

    def __init__(self, bundle: Bundle, *, samples: int | None = None, seed: int = 0,
                 backend: str = "auto"):
        self.bundle = bundle
        self.targets = bundle.targets
        self.grid = bundle.grid
        try:
            self.settings = PreprocessSettings.from_dict(bundle.preprocess)
        except StarcastError as exc:
            raise ModelError(f"model bundle {bundle.path}: manifest 'preprocess': {exc}") from exc
        self.samples, self.seed, self.backend = samples, seed, backend
        self.features = bundle.features
        self.calibration = bundle.calibration
        if self.calibration is not None and "log10_snr" not in self.features:
            raise ModelError(f"model bundle {bundle.path}: its calibration depends on the SNR, but "
                             "'log10_snr' is not among its input features")
        self.resolving_power = bundle.input.get("resolving_power")
        self.response = float(bundle.input.get("response_variance", 0.0))
        pixels = bundle.input.get("training_pixels")
        self.training_pixels = None if pixels is None else WavelengthGrid.from_dict(pixels)
        self.emulator = bundle.emulator
        if self.emulator is not None and not set(self.emulator.labels) <= set(bundle.target_names):
            raise ModelError(f"model bundle {bundle.path}: the emulator takes {self.emulator.labels}, "
                             f"but the model predicts {bundle.target_names}")
        self._weights: dict[str, object] = {}  # per backend: layers on its device, or packed
        self._search: VelocitySearch | None = None

    @property
    def name(self) -> str:
        return self.bundle.name

    def __repr__(self) -> str:
        arch = self.bundle.architecture
        return (f"Model({self.name!r}, targets={[t.name for t in self.targets]}, "
                f"members={arch['members']}, samples={arch['samples']}, dropout={arch['dropout']}, "
                f"pixels={arch['input_dim']})")

    def __call__(self, batch: pa.RecordBatch | pa.Table, *,
                 source_grid: WavelengthGrid | None = None) -> pa.Table:
        """Predict one batch with the defaults given to `load_model`."""
        return self.predict(batch, samples=self.samples, seed=self.seed, backend=self.backend,
                            source_grid=source_grid)

    def predict(self, table_or_batch, *, samples: int | None = None, seed: int = 0,
                backend: str = "auto", source_grid: WavelengthGrid | None = None,
                medium: str | None = None) -> pa.Table:
        """Predict every row of a catalog table or batch (or a dict of columns: `id`, 2-D `flux`, a
        shared 1-D or per-row 2-D `wavelength` in Angstrom). `medium` ("air" or "vacuum"): that of
        wavelengths whose medium the input does not state (a dict; a table without `starcast.medium`
        metadata), default the model's; a table that states another is an error. Returns one results
        row per input row, in order: `id`; per target `t`, `t_err` (total sigma), `t_err_aleatoric`,
        `t_err_epistemic` (float64, physical units, null where the row could not be predicted); with
        an emulator `chi2` (float64, reduced chi^2 of the fit), `chi2_pixels` (int32), `rv` and
        `rv_err` (float64, km/s: the radial velocity that fits, estimated where the input gave none);
        `flags` (int32, `Flag` bits); `error`.
        Exactly `infer(prepare(...))`, the two halves the pipelines run on different workers."""
        table, source_grid = _as_table(table_or_batch, source_grid, medium, self.grid.medium)
        return self.infer(self.prepare(table, source_grid=source_grid), samples=samples, seed=seed,
                          backend=backend)

    def _preprocess(self, table: pa.Table, source_grid: WavelengthGrid | None):
        """`preprocess` as the model's training asks: its grid, settings, resolving power and the
        pixels and pixel response of its training spectra."""
        return preprocess(table, self.grid, self.settings, source_grid=source_grid,
                          resolving_power=self.resolving_power, response=self.response,
                          observed=self.training_pixels)

    def prepare(self, batch: pa.RecordBatch | pa.Table, *,
                source_grid: WavelengthGrid | None = None) -> pa.RecordBatch:
        """The CPU half: RNG keys from ids and preprocessing onto the model grid. Returns one row per
        input row with `id`, `x` (fixed_size_list<float32>[D]), `key` (int64), `flags` (int32),
        `error` (null for rows that go through the network) and, for a model with an emulator, `ivar`
        (fixed_size_list<float32>[grid pixels], 0 = not used),
        `rv` and `rv_err` (float64, km/s): a row without an rv (no column, or null) gets one estimated
        from its spectrum (`engine.rv`), removed by preprocessing, and the flag RV_ESTIMATED.
        `source_grid`: the file's shared grid when there is no `wavelength` column (else it is read
        from the schema metadata, `starcast.wavelength`)."""
        table, source_grid = _as_table(batch, source_grid, None, self.grid.medium)
        if ID not in table.column_names:
            raise CatalogError("the catalog has no 'id' column", column=ID)
        try:
            keys = id_keys(table.column(ID))
        except ValueError as exc:
            raise CatalogError(str(exc), column=ID) from exc
        pre = self._preprocess(table, source_grid)
        if self.emulator is not None:
            rv, rv_err, estimated, correction = self._radial_velocities(table, pre, source_grid)
        x = network_inputs(pre.x, pre.ivar, self.features)
        flags = np.asarray(pre.flags, dtype=np.int32).copy()
        errors = list(pre.errors)
        for i in np.flatnonzero(~np.isfinite(x).all(axis=1)):
            errors[i] = errors[i] or f"row {i}: preprocessed flux is not finite"
        failed = np.array([e is not None for e in errors], dtype=bool)
        flags[failed] |= Flag.PREPROCESS_FAILED
        if self.emulator is not None:
            flags[estimated & ~failed] |= Flag.RV_ESTIMATED
        x[failed] = 0.0  # never NaN in a prepared batch; these rows are not predicted
        columns = {ID: _array(table.column(ID)),
                   PREPARED_X: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
                   PREPARED_KEY: pa.array(keys, pa.int64()), FLAGS: pa.array(flags, pa.int32()),
                   ERROR: pa.array(errors, pa.string())}
        if self.emulator is not None:
            columns.update(self.fit_columns(np.where(failed[:, None], 0.0, pre.ivar), rv, rv_err,
                                            correction, pre.response_excess, pre.noise_estimated))
        return pa.RecordBatch.from_pydict(columns)  # label columns an input carries play no part

    def infer(self, prepared: pa.RecordBatch | pa.Table, *, samples: int | None = None, seed: int = 0,
              backend: str = "auto") -> pa.Table:
        """The accelerator half: the ensemble kernel on the prepared rows without an error, then the
        statistics, flags and metadata of the results table (one row per prepared row, in order)."""
        samples, backend = self._samples(samples), resolve_backend(backend)
        ok, stats, fit, x, _, network, _ = self._infer(prepared, samples, seed, backend)
        return self._results(prepared, ok, *stats, network, samples, seed, backend, fit,
                             self._flag_log_snr(x))

    def goodness_of_fit(self, table_or_batch, *, backend: str = "auto",
                        source_grid: WavelengthGrid | None = None, medium: str | None = None) -> Fit:
        """The emulator's `Fit` of every row as `predict` computes it (reduced chi^2, pixels, residual
        rv, ripple statistic; NaN where a row is not predicted), e.g. to calibrate its thresholds."""
        if self.emulator is None:
            raise StarcastError(f"model {self.name!r} has no emulator, so no goodness of fit")
        table, source_grid = _as_table(table_or_batch, source_grid, medium, self.grid.medium)
        prepared = self.prepare(table, source_grid=source_grid)
        return self._infer(prepared, self._samples(None), 0, resolve_backend(backend))[2]

    def estimates(self, table_or_batch, *, samples: int | None = None, seed: int = 0,
                  backend: str = "auto") -> Estimates:
        """The `Estimates` of every row, as `predict` computes them."""
        table, source_grid = _as_table(table_or_batch, None, None, self.grid.medium)
        prepared = self.prepare(table, source_grid=source_grid)
        ok, stats, fit, x, *_ = self._infer(prepared, self._samples(samples), seed, resolve_backend(backend))
        if fit is None:
            fitted, fit_var = np.full_like(stats[0], np.nan), np.full_like(stats[0], np.nan)
            chi2, excess = np.full(len(ok), np.nan), np.zeros((len(ok), len(EXCESS_PARTS)))
            misfit, light_var = np.zeros(len(ok)), np.zeros_like(stats[0])
        else:
            fitted, fit_var = self._in_targets(fit.labels), self._in_targets(fit.label_err) ** 2
            chi2, excess, light_var = self._calibration_chi2(fit), fit.excess, self._light_var(fit)
            misfit = fit.misfit(self.emulator, self._noise_estimated(prepared))
        return Estimates(ok, *stats, fitted, fit_var, chi2, misfit, excess, light_var,
                         self._calibration_log_snr(x, fit), self._flag_log_snr(x), self._gapped(prepared))

    def _in_targets(self, per_label: np.ndarray) -> np.ndarray:
        """[B, K]: an array of the emulator's labels [B, len(labels)] (its fit's labels or their sigmas)
        in the columns of the targets (NaN for the others)."""
        names = [t.name for t in self.targets]
        out = np.full((len(per_label), len(names)), np.nan)
        out[:, [names.index(n) for n in self.emulator.labels]] = per_label
        return out

    def _infer(self, prepared, samples: int, seed: int, backend: str):
        """(ok [B], (mean, var_a, var_e) [B, K] calibrated, the mean blended with the emulator fit's
        labels where the calibration holds network weights, var_a with what the light without lines the
        fit removed adds (`_light_var`); the emulator's Fit or None; x: the
        network's inputs the estimates came from; the inverse variances [B, D] the fit weighed x with,
        or None; the networks' mean [B, K] before the blend; x with the gaps of GAP rows filled by the
        fit's model, as the networks read them for the sigmas, `_gap_filled`: x itself without any)."""
        ok, x, keys = self._unpack(prepared)
        mean = np.full((len(ok), len(self.targets)), np.nan)
        var_a, var_e = mean.copy(), mean.copy()
        rows = np.flatnonzero(ok)
        self._network(backend, x, keys, rows, (mean, var_a, var_e), samples, seed)
        fit = ivar = filled = None
        if self.emulator is not None:
            fit, ivar = self._goodness_of_fit(prepared, rows, x, mean)
            # light without lines, bands (diffuse, nebular) or a residual rv the fit resolves: remove them
            # from the spectrum (the networks never saw light without lines, a band, nor the shift) and
            # predict those rows again
            veiled = rows[(fit.veil[rows] > 0) & (fit.veil[rows] < 1)]
            banded = rows[fit.dib_fitted(self.emulator)[rows].any(axis=1)]
            moved = rows[significant(fit.rv[rows], fit.rv_err[rows])]
            again_rows = np.union1d(np.union1d(veiled, banded), moved)
            shift = np.zeros(len(fit.rv))
            if len(again_rows):
                x, d = x.copy(), self.grid.n  # x may be a read-only view of the batch
                if len(veiled):  # x = continuum e + b: the star's light is x - b, its continuum ~1 - b
                    kept = 1.0 - fit.veil[veiled, None].astype(np.float32)
                    x[veiled, :d] = (x[veiled, :d] - (1.0 - kept)) / kept
                    ivar[veiled] *= kept**2
                    if "log10_snr" in self.features:  # the noise against the star's continuum
                        x[veiled, d + self.features.index("log10_snr")] += np.log10(kept[:, 0])
                if len(banded):
                    band = self.emulator.band(fit.dib_depths[banded])
                    x[banded, :d] /= band
                    ivar[banded] *= band**2
                shift[moved] = fit.rv[moved]
                if len(moved):
                    x[moved, :d] = self.emulator.shift(x[moved, :d], -shift[moved])
                    # a pixel is kept only where every pixel its interpolation weighs was good
                    good = (ivar[moved] > 0).astype(np.float32)
                    whole = np.abs(self.emulator.shift(good, -shift[moved]) - 1.0) < 1e-4
                    shifted = np.maximum(self.emulator.shift(ivar[moved], -shift[moved]), 0.0)
                    ivar[moved] = np.where(whole, shifted, 0.0)
                self._network(backend, x, keys, again_rows, (mean, var_a, var_e), samples, seed)
                again = self._fit(again_rows, x, ivar, self.response_excess(prepared), mean,
                                  self._noise_estimated(prepared))
                removed = {name: getattr(fit, name).copy() for name in ("dib_depths", "veiling", "veil",
                                                                         "label_err")}
                for name in FIT_FIELDS:
                    getattr(fit, name)[again_rows] = getattr(again, name)[again_rows]
                fit.rv[again_rows] += shift[again_rows]
                # (1 + a) (1 + b) ~ 1 + a + b: exact for bands of a few %; a strong nebular line's depths
                # sum to roughly what was removed (the spectrum itself is divided by each pass's own)
                fit.dib_depths[banded] += removed["dib_depths"][banded]
                # the light's statistic before it was removed (MODEL_MISMATCH) and all the light removed
                fit.veiling[veiled] = removed["veiling"][veiled]
                fit.veil[veiled] = 1.0 - (1.0 - removed["veil"][veiled]) * (1.0 - fit.veil[veiled])
                before, after = removed["label_err"][veiled], fit.label_err[veiled]
                fit.veil_var[veiled] = np.maximum(before**2 - after**2, 0.0)
            # a gap: the networks read its pixels as the continuum it was filled with, which widens their
            # variance as much as it misleads them, while the estimate there is the fit's (which leaves
            # the gap out, and whose variance, added in the calibration, knows what it lost); predict
            # those rows again with the gap filled by the fit's model, as if its pixels had been there
            gapped = rows[self._gapped(prepared)[rows] & np.isfinite(fit.chi2[rows])]
            if len(gapped):
                filled = self._gap_filled(x, ivar, fit, gapped, fit.rv - shift,
                                          self.response_excess(prepared))
                self._network(backend, filled, keys, gapped, (mean, var_a, var_e), samples, seed)
        filled = x if filled is None else filled
        network = mean.copy()
        if self.calibration is not None and len(rows):
            fit_var = defect = None
            if fit is not None:
                fit_var = self._in_targets(fit.label_err)[rows] ** 2
                defect = handled_defect(fit.excess[rows])
            log_snr = self._calibration_log_snr(x, fit)[rows]
            var_a[rows], var_e[rows] = self.calibration.apply(log_snr, var_a[rows],
                                                              np.maximum(var_e[rows], 0.0), mean=mean[rows],
                                                              fit_var=fit_var, defect=defect)
            if fit is not None:  # network and fit blended; noise the fit sees
                mean[rows] = self.calibration.blend(log_snr, mean[rows],
                                                    self._in_targets(fit.labels)[rows], fit.excess[rows],
                                                    self._gapped(prepared)[rows])
                misfit = fit.misfit(self.emulator, self._noise_estimated(prepared))
                var_a[rows] *= self.calibration.inflation(self._calibration_chi2(fit)[rows], misfit[rows])
                var_a[rows] += self._light_var(fit)[rows]
        return ok, (mean, var_a, var_e), fit, x, ivar, network, filled

    def _gap_filled(self, x: np.ndarray, ivar: np.ndarray, fit: Fit, rows: np.ndarray, rv: np.ndarray,
                    blur: np.ndarray) -> np.ndarray:
        """A copy of x [B, D + E] whose pixels on `rows` that the fit left out (ivar 0: the gap, masked
        pixels, ends the spectrum does not cover) hold the fit's model there: the emulated spectrum at
        its labels, shifted by `rv` [B] km/s (the rv left in x) and seen through `blur` [B], times the
        continuum (the polynomial and its ripple) that fits the other pixels."""
        d, emulator = self.grid.n, self.emulator
        weight = emulator.pixel_weight(ivar[rows], fit.sigma_factor[rows])
        model = emulator.fitted(x[rows, :d], weight, fit.labels[rows], rv[rows],
                                emulator.defect_columns(ripple=fit.ripple_frequency[rows]), blur=blur[rows])
        x = x.copy()
        x[rows, :d] = np.where(ivar[rows] > 0, x[rows, :d], model)
        return x

    def _light_var(self, fit: Fit) -> np.ndarray:
        """[B, K]: the variance that not knowing the light without lines the fit removed adds to each
        target (`Fit.veil_var`, 0 for a target the emulator does not fit); the calibration, fitted on
        clean spectra, does not hold it."""
        return np.nan_to_num(self._in_targets(fit.veil_var))

    @staticmethod
    def _calibration_chi2(fit: Fit) -> np.ndarray:
        """The fit's reduced chi^2 as the calibration reads it (`Calibration.inflation`): at least 1 on
        a row whose spectrum was shifted by the residual rv the fit resolved, whose interpolation
        smooths the noise (offset spectra: median chi^2 0.83) without the flux_err overstating it."""
        return np.where(significant(fit.rv, fit.rv_err), np.maximum(fit.chi2, 1.0), fit.chi2)

    def _inputs_as_predicted(self, prepared, samples: int, seed: int, backend: str):
        """(ok, x, keys, fit, ivar, flags, filled) of a prepared batch, x as `predict` with `backend`
        last fed it to the network for its estimate: with an emulator, after removing the residual rv
        its fit resolves (`_infer`), whose `Fit` and inverse variances come with it (else None);
        `flags` [B] int32, those `predict` reports; `filled`, x as the networks read it for the sigmas
        (a GAP row's gap filled by the fit's model). `explain` and `predict_samples` start from these,
        so that they describe the numbers (and flags) `predict` reports."""
        backend = resolve_backend(backend)
        ok, stats, fit, x, ivar, network, filled = self._infer(prepared, samples, seed, backend)
        results = self._results(prepared, ok, *stats, network, samples, seed, backend, fit,
                                self._flag_log_snr(x))
        return ok, x, self._unpack(prepared)[2], fit, ivar, results.column(FLAGS).to_numpy(), filled

    def predict_samples(self, table_or_batch, *, samples: int | None = None, seed: int = 0,
                        source_grid: WavelengthGrid | None = None, medium: str | None = None,
                        backend: str = "auto") -> PredictiveSamples:
        """All M x S (mu, sigma) pairs per row, from the float64 reference on the same dropout masks
        as `predict`: the full predictive distribution of a few spectra (memory grows as B x M x S).
        These are the networks' draws, calibrated as `predict`'s parts are: their mean variance is its
        aleatoric variance, their spread about their mean (scaled) its epistemic one, so that their
        mixture has its total sigma. Where the calibration blends in the emulator's fit, `predict`'s
        estimate is that blend, not the mean of the draws, and on a row with a gap it is the fit alone.
        `backend`: that of the `predict` to describe (its emulator fit decides the input's residual rv)."""
        table, source_grid = _as_table(table_or_batch, source_grid, medium, self.grid.medium)
        samples = self._samples(samples)
        prepared = self.prepare(table, source_grid=source_grid)
        ok, x, keys, fit, _, flags, filled = self._inputs_as_predicted(prepared, samples, seed, backend)
        shape = (len(ok), self.bundle.architecture["members"], samples, len(self.targets))
        mu, var = np.full(shape, np.nan), np.full(shape, np.nan)
        rows = np.flatnonzero(ok)
        if len(rows):
            m, v = reference.ensemble_samples(*self._inputs("reference", filled[rows], keys[rows]),
                                              **self._kernel_args(samples, seed))
            mu[rows], var[rows] = m.cpu().double().numpy(), v.cpu().double().numpy()
            if self.calibration is not None:
                centre = mu[rows].mean(axis=(1, 2), keepdims=True)
                spread = mu[rows] - centre
                var_mu = spread.var(axis=(1, 2))
                scale2, epistemic = self.calibration.apply(self._calibration_log_snr(x, fit)[rows],
                                                           np.ones((len(rows), mu.shape[3])), var_mu,
                                                           mean=centre[:, 0, 0])
                # the spread about the mean scaled to predict's epistemic sigma (its floor included)
                with np.errstate(invalid="ignore", divide="ignore"):
                    stretch = np.sqrt(epistemic / var_mu)
                mu[rows] = centre + spread * np.nan_to_num(stretch, nan=1.0, posinf=1.0)[:, None, None, :]
                if fit is not None:  # each draw carries the fit's variance, so their mean is predict's
                    misfit = fit.misfit(self.emulator, self._noise_estimated(prepared))
                    scale2 *= self.calibration.inflation(self._calibration_chi2(fit)[rows], misfit[rows])
                    defect = handled_defect(fit.excess[rows])
                    var[rows] *= self.calibration.defect_factor(defect)[:, None, None, :]
                    var[rows] += self.calibration.fit_variance(self._in_targets(fit.label_err)[rows] ** 2)[
                        :, None, None, :]
                var[rows] *= scale2[:, None, None, :]
        return PredictiveSamples(ids=prepared.column(ID).to_pylist(), targets=[t.name for t in self.targets],
                                 mu=mu, sigma=np.sqrt(var), flags=flags,
                                 errors=prepared.column(ERROR).to_pylist())

    def explain(self, table_or_batch, *, target: str | list[str] | None = None, method: str = "ig",
                steps: int | None = None, samples: int | None = None, seed: int = 0,
                source_grid: WavelengthGrid | None = None, medium: str | None = None, backend: str = "auto"):
        """Integrated-gradients attributions of the predicted mean of `target` (one name, a list, or
        None: all) to the D pixels of each row, averaged over the M members and S dropout samples on
        the row's own masks; returns an `explain.Explanation` (arrays; see `starcast.engine.explain`).
        `backend`: that of the `predict` to explain (its emulator fit decides the input's residual rv)."""
        from . import explain

        names = [t.name for t in self.targets]
        wanted = names if target is None else [target] if isinstance(target, str) else list(target)
        unknown = [t for t in wanted if t not in names]
        if unknown or not wanted:
            raise StarcastError(f"model {self.name!r} has no target(s) {unknown or wanted}; it predicts "
                                f"{', '.join(names)}")
        table, source_grid = _as_table(table_or_batch, source_grid, medium, self.grid.medium)
        prepared = self.prepare(table, source_grid=source_grid)
        return explain.explain_prepared(self, prepared, [names.index(t) for t in wanted], method=method,
                                        steps=steps or explain.DEFAULT_STEPS, samples=self._samples(samples),
                                        seed=seed, backend=backend)

    def metadata(self, *, samples: int | None = None, seed: int = 0, backend: str = "auto") -> dict:
        """The results' file metadata: model name and hash (`bundle_sha256`), seed, S, code version,
        backend."""
        return {META_MODEL: self.name, META_MODEL_SHA256: self.bundle.sha256,
                META_SEED: str(seed), META_SAMPLES: str(self._samples(samples)),
                META_VERSION: starcast.__version__, META_BACKEND: resolve_backend(backend)}

    # -- the steps ------------------------------------------------------------------------------

    def _samples(self, samples: int | None) -> int:
        s = self.bundle.architecture["samples"] if samples is None else samples
        if int(s) != s or s < 1:
            raise StarcastError(f"samples must be a positive integer, got {samples!r}")
        return int(s)

    def _log_snr(self, x: np.ndarray) -> np.ndarray:
        """The log10_snr input feature of prepared rows x [B, D + E]."""
        return x[:, self.grid.n + self.features.index("log10_snr")].astype(np.float64)

    def _calibration_log_snr(self, x: np.ndarray, fit: Fit | None) -> np.ndarray:
        """The log10 SNR the calibration reads for rows x [B, D + E]: the networks' feature, lowered by
        half the log of the emulator fit's reduced chi^2 where it exceeds 1 (`_calibration_chi2`; the
        noise the spectrum shows beyond what its flux_err states, Birge's ratio; without a fit, the
        feature)."""
        log_snr = self._log_snr(x)
        if fit is None:
            return log_snr
        excess = np.maximum(np.nan_to_num(self._calibration_chi2(fit), nan=1.0), 1.0)
        return log_snr - 0.5 * np.log10(excess)

    @staticmethod
    def _noise_estimated(prepared: pa.RecordBatch | pa.Table) -> np.ndarray:
        """[B] bool: the prepared rows whose noise the engine estimated (no flux_err or ivar: DER_SNR)."""
        return _array(prepared.column(PREPARED_NOISE_ESTIMATED)).to_numpy(zero_copy_only=False)

    @staticmethod
    def _gapped(prepared: pa.RecordBatch | pa.Table) -> np.ndarray:
        """[B] bool: the prepared rows with a gap filled by the continuum (`Flag.GAP`)."""
        flags = _array(prepared.column(FLAGS)).to_numpy(zero_copy_only=False)
        return (flags & int(Flag.GAP)) != 0

    def _unpack(self, prepared: pa.RecordBatch | pa.Table):
        """(ok, x [B, D] float32, keys [B] int64) of a prepared batch; `ok`: rows without an error."""
        xs = _array(prepared.column(PREPARED_X))
        dim = self.bundle.architecture["input_dim"]
        if not pa.types.is_fixed_size_list(xs.type) or xs.type.list_size != dim:
            raise StarcastError(f"prepared column 'x' must be fixed_size_list<float32>[{dim}] for model "
                                f"{self.name!r}, got {xs.type}; was it prepared by another model?")
        x = xs.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        keys = _array(prepared.column(PREPARED_KEY)).to_numpy(zero_copy_only=False).astype(np.int64)
        ok = _array(prepared.column(ERROR)).is_null().to_numpy(zero_copy_only=False)
        return ok, x, keys

    def _network(self, backend: str, x: np.ndarray, keys: np.ndarray, rows: np.ndarray, out: tuple,
                 samples: int, seed: int) -> None:
        """The ensemble kernel on `rows` of x into out = (mean, var_a, var_e) [B, K] (uncalibrated)."""
        if not len(rows):
            return
        # the kernels bound their own memory (row chunks / tiles)
        stats = self._kernel(backend)(*self._inputs(backend, x[rows], keys[rows]),
                                      **self._kernel_args(samples, seed))
        for target, value in zip(out, stats, strict=True):
            target[rows] = value.detach().cpu().double().numpy()

    def fit_columns(self, ivar: np.ndarray, rv: np.ndarray, rv_err: np.ndarray, rv_correction: np.ndarray,
                    response_excess: np.ndarray, noise_estimated: np.ndarray) -> dict:
        """The prepared columns a model with an emulator adds: `ivar` [B, grid pixels], `rv`, `rv_err`
        [B] (NaN -> null), `rv_correction` [B] (km/s the check added to a given rv), `response_excess`
        [B], `noise_estimated` [B] (no flux_err or ivar: the noise is DER_SNR's)."""
        ivar = np.asarray(ivar, np.float32)
        return {PREPARED_IVAR: pa.FixedSizeListArray.from_arrays(pa.array(ivar.reshape(-1)), ivar.shape[1]),
                PREPARED_RV: pa.array(rv, pa.float64(), from_pandas=True),
                PREPARED_RV_ERR: pa.array(rv_err, pa.float64(), from_pandas=True),
                PREPARED_RV_CORRECTION: pa.array(rv_correction, pa.float64()),
                PREPARED_RESPONSE_EXCESS: pa.array(response_excess, pa.float32()),
                PREPARED_NOISE_ESTIMATED: pa.array(noise_estimated, pa.bool_())}

    def _radial_velocities(self, table: pa.Table, pre, source_grid) -> tuple[np.ndarray, ...]:
        """(rv, rv_err, estimated, correction) per row. A row without a given rv gets one estimated from
        its spectrum preprocessed at rest (rv_err its sigma, `estimated`); a given rv is checked by a
        search of its spectrum preprocessed at it, and where that finds it off (beyond RESAMPLED_RV_KMS
        and 4 sigmas) the search's rv replaces it (rv_err its sigma, `correction` the km/s added; else
        rv_err is NaN, correction 0). An estimate at the edge of the search's range may be a star beyond
        it: its spectrum, put at rest by that estimate, is searched again as a given rv is checked (which
        reaches twice as far), and what that finds is added, however small (rv_err its sigma); where it
        finds nothing, the edge estimate and its sigma stand. Rows of `pre` at a new rv are preprocessed
        again."""
        n = table.num_rows
        column = table.column(RV) if RV in table.column_names else pa.nulls(n, pa.float64())
        given = _array(column).is_valid().to_numpy(zero_copy_only=False)
        rv = np.asarray(pc.fill_null(number_column(column, RV, "km/s"), 0.0).to_numpy(zero_copy_only=False),
                        np.float64).copy()
        usable = np.array([e is None for e in pre.errors], dtype=bool)
        found, found_err = np.full(n, np.nan), np.full(n, np.nan)
        estimated = ~given & usable
        if estimated.any():
            found[estimated], found_err[estimated] = self._velocity_search().estimate(pre.x[estimated],
                                                                                     pre.ivar[estimated])
        checked = given & usable
        if checked.any():
            found[checked], found_err[checked] = self._velocity_search().check(pre.x[checked],
                                                                               pre.ivar[checked])
        corrected = given & significant(found, found_err, RESAMPLED_RV_KMS)
        moved = estimated | corrected
        rv[moved] += found[moved]
        rv_err = np.where(moved, found_err, np.nan)
        self._preprocess_at(table, pre, np.flatnonzero(moved), rv, source_grid)
        beyond = np.flatnonzero(estimated & at_edge(found, V_MAX))
        beyond = beyond[[pre.errors[r] is None for r in beyond]]
        if len(beyond):
            more, more_err = self._velocity_search().check(pre.x[beyond], pre.ivar[beyond])
            found_more = np.isfinite(more)
            beyond, more, more_err = beyond[found_more], more[found_more], more_err[found_more]
            rv[beyond] += more
            rv_err[beyond] = more_err
            self._preprocess_at(table, pre, beyond, rv, source_grid)
        return rv, rv_err, estimated, np.where(corrected, found, 0.0)

    def _preprocess_at(self, table: pa.Table, pre, rows: np.ndarray, rv: np.ndarray, source_grid) -> None:
        """Preprocess `rows` of `table` again at `rv` [B] km/s, into `pre`."""
        if not len(rows):
            return
        subset = table.take(pa.array(rows))
        if RV in subset.column_names:
            subset = subset.drop_columns([RV])
        again = self._preprocess(subset.append_column(RV, pa.array(rv[rows], pa.float64())), source_grid)
        for name in ("x", "ivar", "flags", "coverage", "bad_fraction", "response_excess"):
            getattr(pre, name)[rows] = getattr(again, name)
        for i, r in enumerate(rows):
            pre.errors[r] = again.errors[i]

    def _velocity_search(self) -> VelocitySearch:
        if self._search is None:  # built on first use: only rows without an rv need it
            self._search = VelocitySearch(self.emulator, *self._label_range(self.emulator.labels))
        return self._search

    def _label_range(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) of the training range of `labels`."""
        by_name = {t.name: t for t in self.targets}
        return tuple(np.array([getattr(by_name[n], end) for n in labels], np.float64)
                     for end in ("min", "max"))

    def _goodness_of_fit(self, prepared, rows: np.ndarray, x: np.ndarray, mean: np.ndarray):
        """(`emulator.Fit` of every row, NaN / 0 where not predicted; ivar [B, grid pixels]) of the
        predicted `rows`: the prepared spectra against the emulator from the predicted labels, refined
        within the training range (after any backend)."""
        missing = [c for c in (PREPARED_IVAR, PREPARED_RV, PREPARED_RV_ERR, PREPARED_RV_CORRECTION,
                               PREPARED_RESPONSE_EXCESS, PREPARED_NOISE_ESTIMATED)
                   if c not in prepared.column_names]
        if missing:
            raise StarcastError(f"the prepared batch has no {missing} column(s), which model {self.name!r} "
                                "needs for its goodness of fit; was it prepared by another model?")
        d = len(self.emulator.sigma)
        ivar = _array(prepared.column(PREPARED_IVAR)).flatten().to_numpy(zero_copy_only=False)
        ivar = ivar.reshape(-1, d).astype(np.float32)  # a copy: infer may shift rows of it
        return self._fit(rows, x, ivar, self.response_excess(prepared), mean,
                         self._noise_estimated(prepared)), ivar

    @staticmethod
    def response_excess(prepared) -> np.ndarray:
        """[B] float32, A^2: the prepared rows' `response_excess`, through which the emulator's fit sees
        its spectra (`Emulator.blur`)."""
        return _array(prepared.column(PREPARED_RESPONSE_EXCESS)).to_numpy(zero_copy_only=False)

    def _fit(self, rows: np.ndarray, x: np.ndarray, ivar: np.ndarray, blur: np.ndarray, mean: np.ndarray,
             noise_estimated: np.ndarray):
        """The emulator's `Fit` of `rows` of x (B rows; NaN / 0 in the others), seen through `blur`, the
        rows of `noise_estimated` [B] with the noise DER_SNR's."""
        n = len(mean)
        fit = Fit(chi2=np.full(n, np.nan), pixels=np.zeros(n, np.int32), rv=np.zeros(n),
                  rv_err=np.full(n, np.nan), ripple=np.full(n, np.nan), ripple_excess=np.zeros(n),
                  ripple_frequency=np.full(n, np.nan), veiling=np.full(n, np.nan),
                  broadening=np.full(n, np.nan), noise_chi2=np.full(n, np.nan),
                  contrast=np.full(n, np.nan), veil=np.zeros(n),
                  veil_var=np.zeros((n, len(self.emulator.labels))),
                  dib=np.full((n, len(BANDS)), np.nan), dib_depths=np.zeros((n, DIB_TERMS * len(BANDS))),
                  labels=np.full((n, len(self.emulator.labels)), np.nan),
                  label_err=np.full((n, len(self.emulator.labels)), np.nan),
                  sigma_factor=np.ones(n, np.float32), log_snr=np.full(n, np.nan), freed=np.zeros(n, bool))
        if len(rows):
            names = [t.name for t in self.targets]
            labels = mean[rows][:, [names.index(n) for n in self.emulator.labels]]
            lo, hi = self._label_range(self.emulator.labels)
            part = self.emulator.chi2(x[rows, :self.grid.n], ivar[rows], labels, lo, hi, blur[rows],
                                      self._log_snr(x[rows]) if "log10_snr" in self.features else None,
                                      noise_estimated[rows])
            for name in FIT_FIELDS:
                getattr(fit, name)[rows] = getattr(part, name)
        return fit

    def _inputs(self, backend: str, x: np.ndarray, keys: np.ndarray):
        """(x, keys, weights) on the backend's device; weights are moved and packed (Triton: padded,
        low precision, centred; CPU: the batched layout) once per model, not per batch."""
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        if backend not in self._weights:
            layers = [(w.to(device), b.to(device)) for w, b in self.bundle.layers]
            if backend == "triton":
                from ..kernels.packing import pack_weights

                layers = pack_weights(layers, device=device, centre=kernel_centre(self.bundle))
            elif backend == "cpu":
                layers = reference.pack_cpu(layers, float(self.bundle.architecture["dropout"]))
            self._weights[backend] = layers
        return torch.from_numpy(x).to(device), torch.from_numpy(keys).to(device), self._weights[backend]

    def _kernel_args(self, samples: int, seed: int) -> dict:
        arch = self.bundle.architecture
        return {"p": float(arch["dropout"]), "samples": samples, "seed": int(seed),
                "activation": arch["activation"], "var_eps": float(arch["var_eps"]),
                "label_mean": [t.mean for t in self.targets], "label_std": [t.std for t in self.targets],
                "calibration": [t.calibration for t in self.targets]}

    @staticmethod
    def _kernel(backend: str):
        if backend == "triton":
            from ..kernels.ensemble_mlp import ensemble_stats_triton

            return ensemble_stats_triton
        return {"cpu": reference.ensemble_stats_cpu, "reference": reference.ensemble_stats_reference}[backend]

    def _flag_log_snr(self, x: np.ndarray) -> np.ndarray:
        """The log10 SNR the HIGH_EPISTEMIC thresholds read for rows x [B, D + E]: the networks'
        feature, the noise the spectrum states (0 for a model that does not see its SNR, whose
        thresholds are one number each). Not the calibration's: a spectrum the model cannot explain
        reads a lower SNR there, where the networks disagree more on clean spectra too, so the stars
        the flag is for would meet the thresholds of noisier ones."""
        return self._log_snr(x) if "log10_snr" in self.features else np.zeros(len(x))

    def _results(self, prepared, ok, mean, var_a, var_e, network, samples, seed, backend, fit,
                 log_snr: np.ndarray) -> pa.Table:
        var_e = np.maximum(var_e, 0.0)  # avg(mu^2) - mean^2 can round to a tiny negative number
        err_a, err_e, err = np.sqrt(var_a), np.sqrt(var_e), np.sqrt(var_a + var_e)
        lo = np.array([t.min for t in self.targets])
        hi = np.array([t.max for t in self.targets])
        flags = _array(prepared.column(FLAGS)).to_numpy(zero_copy_only=False).astype(np.int32)
        thresholds = self.bundle.epistemic_thresholds
        # Flags come from the spectrum and the prediction only, never from label columns of the input.
        with np.errstate(invalid="ignore"):  # NaN (rows not predicted) compares False
            # The blend with the fit, whose labels stay within the range, leaves it only where the
            # networks' mean does; with the fit pinned at a bound it must be flagged however little
            # the networks weigh (a weight of 1e-20 moves no float64 off the bound).
            out_of_range = (((network < lo) & (mean <= lo)) | ((network > hi) & (mean >= hi))).any(axis=1)
            high = np.zeros(len(ok), dtype=bool)
            # lines broader than rotation makes them bound the rotation read from their width from above
            broadened = np.zeros(len(ok), dtype=bool) if fit is None else fit.broadened(self.emulator)
            upper = np.zeros(len(ok), dtype=bool)
            for k, t in enumerate(self.targets):
                if t.name in thresholds:
                    high |= err_e[:, k] > thresholds[t.name].at(log_snr, mean, self.bundle.target_names)
                if t.upper_limit_below is not None:
                    upper |= (mean[:, k] < t.upper_limit_below) | broadened
                if t.physical_min is not None:
                    mean[:, k] = np.where(mean[:, k] < t.physical_min, t.physical_min, mean[:, k])
        flags |= np.where(out_of_range, int(Flag.OUT_OF_RANGE), 0).astype(np.int32)
        flags |= np.where(high, int(Flag.HIGH_EPISTEMIC), 0).astype(np.int32)
        flags |= np.where(upper, int(Flag.UPPER_LIMIT), 0).astype(np.int32)
        if fit is not None:
            flags |= np.where(fit.mismatch(self.emulator, self._noise_estimated(prepared)),
                              int(Flag.MODEL_MISMATCH), 0).astype(np.int32)
            # the fitted rv against the given one: what the check corrected plus the fit's residual
            correction = _array(prepared.column(PREPARED_RV_CORRECTION)).to_numpy(zero_copy_only=False)
            wrong_rv = ok & ((flags & Flag.RV_ESTIMATED) == 0) & significant(correction + fit.rv, fit.rv_err)
            flags |= np.where(wrong_rv, int(Flag.RV_MISMATCH), 0).astype(np.int32)
            rv_used = _array(prepared.column(PREPARED_RV)).to_numpy(zero_copy_only=False).astype(np.float64)
            rv = rv_used + fit.rv
            rv_err = np.where(np.isfinite(fit.rv_err), fit.rv_err,
                              _array(prepared.column(PREPARED_RV_ERR)).to_numpy(zero_copy_only=False))
        ids = _array(prepared.column(ID))
        columns = {ID: ids}
        for k, t in enumerate(self.targets):
            for suffix, values in (("", mean), ("_err", err), ("_err_aleatoric", err_a),
                                   ("_err_epistemic", err_e)):
                columns[t.name + suffix] = pa.array(values[:, k], pa.float64(), mask=~ok)
        if fit is not None:
            columns[CHI2] = pa.array(fit.chi2, pa.float64(), mask=~np.isfinite(fit.chi2))
            columns[CHI2_PIXELS] = pa.array(fit.pixels, pa.int32(), mask=~ok)
            columns[RV] = pa.array(rv, pa.float64(), mask=~ok | ~np.isfinite(rv))
            columns[RV_ERR] = pa.array(rv_err, pa.float64(), mask=~ok | ~np.isfinite(rv_err))
        columns[FLAGS] = pa.array(flags, pa.int32())
        columns[ERROR] = _array(prepared.column(ERROR))
        schema = results_schema([t.name for t in self.targets], id_type=ids.type, emulator=fit is not None)
        meta = self.metadata(samples=samples, seed=seed, backend=backend)
        return pa.Table.from_pydict(columns, schema=schema.with_metadata(meta))


def kernel_centre(bundle: Bundle) -> np.ndarray:
    """The point the GPU kernel centres its inputs on before the 16-bit cast, fixed per model (never
    from a batch): the manifest's `input_centre` (the training mean), else one fitted to the first
    layer (`kernels.packing.fitted_centre`). It changes rounding only, not the model's function."""
    from ..kernels.packing import fitted_centre

    centre = bundle.input_centre
    return fitted_centre(*bundle.layers[0]).numpy() if centre is None else centre


def resolve_backend(backend: str) -> str:
    """`auto` is the Triton kernel on a CUDA GPU, else the CPU path; the others force one."""
    if backend not in BACKENDS:
        raise StarcastError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "cpu"
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise StarcastError("backend 'triton' needs a CUDA GPU and none is visible; use backend 'cpu' "
                            "(or set TRITON_INTERPRET=1 to run the kernel in Triton's slow interpreter)")
    return backend


def _as_table(data, source_grid: WavelengthGrid | None, medium: str | None,
              default_medium: str) -> tuple[pa.Table, WavelengthGrid | None]:
    """Accept a pa.Table, pa.RecordBatch, polars DataFrame or dict of columns. A dict's wavelengths are
    in `medium` (None: `default_medium`); a table's in the medium its metadata states, else in
    `medium` where one is given (a table that states another is an error). (A shared grid in the
    schema metadata, `starcast.wavelength`, is read by `preprocess` when `source_grid` is None.)"""
    if medium is not None:
        try:
            check_medium(medium)
        except ValueError as exc:
            raise StarcastError(str(exc)) from None
    if isinstance(data, dict):
        return _table_from_arrays(data, source_grid, medium or default_medium)
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif hasattr(data, "to_arrow") and not isinstance(data, pa.Table):
        data = data.to_arrow()
    if not isinstance(data, pa.Table):
        raise StarcastError(f"cannot predict from a {type(data).__name__}; pass a pyarrow Table or "
                            "RecordBatch, a polars DataFrame, or a dict of columns")
    if medium is not None:
        stated = column_medium(data.schema)
        if stated is None:
            data = data.replace_schema_metadata({**(data.schema.metadata or {}), META_MEDIUM: medium})
        elif stated != medium:
            raise StarcastError(f"the table states its wavelengths are in {stated} ({META_MEDIUM} or "
                                f"{META_WAVELENGTH} metadata), medium= says {medium}")
    return data, source_grid


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _table_from_arrays(columns: dict, source_grid, medium: str):
    """A dict with `id`, 2-D `flux` (and `flux_err`, `ivar`, `mask`: rows x pixels) and a 1-D shared or
    2-D per-row `wavelength` (Angstrom, in `medium`); other entries one value per row. A
    `StarcastError` names the entry that is not so."""
    columns = dict(columns)
    if ID not in columns or FLUX not in columns:
        raise StarcastError(f"a dict to predict needs '{ID}' and '{FLUX}' entries; it has "
                            f"{sorted(columns)}")
    try:
        ids = pa.array(list(columns.pop(ID)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise StarcastError(f"'{ID}' must be all integers or all strings ({exc})") from None
    wavelength = columns.pop(WAVELENGTH, None)
    if wavelength is not None and np.ndim(wavelength) == 1:
        wavelength = np.asarray(wavelength, np.float64)
        if not (np.isfinite(wavelength).all() and np.all(np.diff(wavelength) > 0)):
            raise StarcastError(f"'{WAVELENGTH}' (1-D: one grid for every row) must be finite and "
                                "strictly increasing")
        source_grid = WavelengthGrid.explicit(wavelength, medium)
    elif wavelength is not None:
        columns[WAVELENGTH] = wavelength
    out = {ID: ids}
    for name, values in columns.items():
        try:
            arr = np.asarray(values)
        except ValueError:
            raise StarcastError(f"'{name}' has rows of different lengths: give it as a 2-D array "
                                "(rows x pixels; NaN where a row has no pixel)") from None
        per_pixel = name in (FLUX, FLUX_ERR, IVAR, MASK, WAVELENGTH)
        if arr.ndim != (2 if per_pixel else 1) or len(arr) != len(ids):
            shape = f"{len(ids)} x pixels" if per_pixel else f"{len(ids)} values, one per row"
            raise StarcastError(f"'{name}' must be {shape} (as '{ID}' has {len(ids)} rows); it is "
                                f"{arr.shape}" + (f": one spectrum is {name}[None, :]" if arr.ndim == 1 and
                                                 per_pixel else ""))
        if per_pixel:
            out[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
        else:
            out[name] = pa.array(arr)
    if isinstance(source_grid, WavelengthGrid) and out[FLUX].type.list_size != source_grid.n:
        raise StarcastError(f"'{FLUX}' has {out[FLUX].type.list_size} pixels per row, '{WAVELENGTH}' "
                            f"{source_grid.n}")
    if source_grid is not None:
        return pa.table(out).replace_schema_metadata({META_WAVELENGTH: source_grid.to_json()}), source_grid
    return pa.table(out).replace_schema_metadata({META_MEDIUM: medium}), source_grid


__all__ = ["BACKENDS", "PREPARED_IVAR", "PREPARED_KEY", "PREPARED_X", "Model", "PredictiveSamples",
           "load_model", "resolve_backend"]
