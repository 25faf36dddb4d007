"""The calibration a bundle applies to its sigmas after the kernel's reduction, the same for every
backend: per target, a scale that depends on the spectrum's SNR (piecewise linear in log10 SNR between
knots, constant beyond them; with an emulator, the SNR its fit's chi^2 says the spectrum has,
`Model._calibration_log_snr`) on both parts, and a systematic floor added in quadrature to the
epistemic part (what the grid's physics and the interpolation between its nodes do not know,
measured on grid nodes left out of training). Fitting it is the trainers' job.

A model with an emulator may also blend its estimate: per target, the network's mean weighted by w
and the labels of the emulator's fit (`engine.emulator`) by 1 - w, w piecewise linear in log10 SNR at
the same knots. The two err in partly different ways (the network's imperfect inference, the
emulator's interpolation between nodes), so the blend, with w fitted at nodes left out of training, is
closer to the truth than the network and on a par with the fit; the scales and floor are fitted to
the blended estimate.
Where the fit cannot explain a spectrum to its noise, the kind of misfit decides whom to trust more:
the network's odds w / (1 - w) grow by 1 + g_r e_r + g_o e_o (`network_gain`, per target one g >= 0
per part of EXCESS_PARTS), e_r the excess reduced chi^2 that fitting a continuum ripple (an echelle
blaze left over, fringing) removed from the fit, e_o the excess max(chi2 - 1, 0) it left
(`emulator.Fit.excess`), as inverse-variance weights do when the fit's error variance grows linearly
in each part, so w = w0 (1 + G) / (1 + w0 G) (`raised_share`),
G = g_r e_r + g_o e_o, w0 the weight at the row's SNR. The parts are kept apart because they differ:
a ripple the fit has fitted no longer misleads it, while the rest (the emulator's own error, noise
the flux_err understates, a defect such as a wrong wavelength medium) may mislead both.
A spectrum with a gap (`Flag.GAP`) takes the fit alone (w = 0): the fit leaves the gap's pixels out,
while the networks read them as the continuum they were filled with. Its networks' variances are
those of the spectrum with the gap filled by the fit's model (`Model._infer`), as if its pixels had
been there; what the gap's pixels would have told is in the fit's variance.

The scale may also follow the network's mean of one target (`label_scale`: per target, a factor
piecewise linear in that mean between knots, constant beyond them): how much a spectrum says about
each label depends on it as well as on the noise (a slow rotator's sharp lines tell more than the
same SNR spread over broad ones), more than the network's own variances follow.

A model with an emulator may also add the variance of the fit's labels from its curvature (`emulator.Fit`'s
`label_err`, squared) to the network's aleatoric part before the scales, weighed by `fit_variance_weight`
(per target): the curvature knows what each spectrum's pixels tell about each label (a gap over a
line, a fast rotator's shallow lines), which the network's own variance follows less well; with the
sum, one sigma covers both the 68% and the 95% intervals more evenly than with the network's alone
(whose errors have heavier tails), measured with the calibration fitted on two surveys and scored on
the third.

On a row with a defect that the fit handles and the networks do not (`handled_defect`: a ripple the
fit has fitted), the networks' aleatoric variance grows with the defect while the estimate, the
fit's, hardly errs more: it is weighed there by `defect_variance` d per target (0 <= d <= 1) before
the fit's variance is added, so that such rows are covered as the clean ones are.

A model with an emulator may also inflate the aleatoric part by 1 + c sqrt(m) per target
(`misfit_growth`), m the misfit (`emulator.Fit.misfit`): how far the reduced chi^2 of the emulator's
fit beyond the noise (over what the residual's scatter from pixel to pixel says of the noise) passes
its MODEL_MISMATCH threshold. A spectrum the fit cannot explain (a continuum with more shape than the
fit's, a feature the model lacks) misleads the labels too, the more the larger the misfit, but the
labels absorb part of it, which the chi^2 then does not show: on continua beyond the fit's cubic the
variance the errors need grows as the square root of m, not in proportion (docs/record.md, "Sigmas
where the fit cannot explain the spectrum"). Below the threshold a misfit cannot be told from a clean
spectrum, whose sigma the scales hold. Noise the flux_err understates raises the whole chi^2, not m:
it is left to the SNR the calibration reads (above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError


def raised_share(w0: np.ndarray, odds_gain: np.ndarray) -> np.ndarray:
    """The network's weight whose odds w / (1 - w) are those of `w0` times 1 + `odds_gain`, written
    so that w0 = 0 and 1 stay 0 and 1."""
    return w0 * (1.0 + odds_gain) / (1.0 + w0 * odds_gain)


EXCESS_PARTS = ("ripple", "other")  # the parts of the fit's excess reduced chi^2 the blend's gain follows


def handled_defect(excess: np.ndarray) -> np.ndarray:
    """[B] bool: rows with a defect the emulator fit handles and the networks do not: a continuum ripple
    the fit has fitted (the ripple's part of `excess` [B, len(EXCESS_PARTS)] above 0). A gap is not
    one: the networks read it filled with the fit's model (`Model._gap_filled`)."""
    return np.asarray(excess)[:, EXCESS_PARTS.index("ripple")] > 0


def chi2_excess(chi2: np.ndarray) -> np.ndarray:
    """max(chi2 - 1, 0), 0 where the reduced chi^2 is NaN (a row the emulator does not fit)."""
    return np.where(np.isfinite(chi2), np.maximum(chi2 - 1.0, 0.0), 0.0)


def misfit_growth(misfit: np.ndarray) -> np.ndarray:
    """sqrt(misfit): what `chi2_inflation` multiplies in the aleatoric variance's inflation."""
    return np.sqrt(misfit)


def noise_ratio(chi2: np.ndarray) -> np.ndarray:
    """min(chi2, 1), 1 where the reduced chi^2 is NaN: below 1 the spectrum is less noisy than its
    flux_err says, by that ratio in variance (Birge's ratio; the scatter of a clean chi^2 over ~2000
    pixels is 0.03)."""
    return np.where(np.isfinite(chi2), np.minimum(chi2, 1.0), 1.0)


@dataclass(frozen=True)
class Calibration:
    knots: np.ndarray  # (Q,) log10 SNR per model pixel, increasing
    scale: np.ndarray  # (K, Q) sigma multipliers at the knots
    floor: np.ndarray  # (K,) physical units
    network_weight: np.ndarray | None = None  # (K, Q) in [0, 1], the network's share; None: no blend
    network_gain: np.ndarray | None = None  # (K, len(EXCESS_PARTS)) >= 0: g of the network's odds per
    # unit of each part of the excess chi^2; None: 0 (also without network_weight: no blend to raise)
    chi2_inflation: np.ndarray | None = None  # (K,) >= 0: c of the aleatoric inflation; None: none
    fit_variance_weight: np.ndarray | None = None  # (K,) >= 0: lambda on the fit's variance; None: 0
    defect_variance: np.ndarray | None = None  # (K,) in [0, 1]: d on the networks' aleatoric variance on
    # rows with a `handled_defect`; None: 1
    label: int | None = None  # the target whose network mean `label_scale` follows; None: no such scale
    label_knots: np.ndarray | None = None  # (P,) increasing, in that target's unit
    label_scale: np.ndarray | None = None  # (K, P) > 0: sigma multipliers at the label's knots

    def apply(self, log_snr: np.ndarray, var_a: np.ndarray, var_e: np.ndarray,
              mean: np.ndarray | None = None, fit_var: np.ndarray | None = None,
              defect: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Calibrated (var_aleatoric, var_epistemic), [B, K], from the kernel's variances; `mean` [B, K]:
        the network's mean (physical units), needed with a `label_scale`; `fit_var` [B, K]: the variance
        of the emulator fit's labels (NaN where it gives none: counted 0), added to the aleatoric part
        times `fit_variance_weight`; `defect` [B] bool (`handled_defect`; None: none): rows whose
        networks' variance `defect_factor` weighs first."""
        s = np.stack([np.interp(log_snr, self.knots, row) for row in self.scale], axis=1)
        if self.label_scale is not None:
            if mean is None:
                raise ValueError("this calibration follows the network's mean of a target: pass `mean`")
            s = s * self.label_factor(mean)
        if defect is not None:
            var_a = var_a * self.defect_factor(defect)
        if fit_var is not None:
            var_a = var_a + self.fit_variance(fit_var)
        return s**2 * var_a, s**2 * var_e + self.floor**2

    def defect_factor(self, defect: np.ndarray) -> np.ndarray:
        """[B, K] the factor on the networks' aleatoric variance: `defect_variance` on the rows of
        `defect` [B] bool, 1 elsewhere and without one."""
        d = np.ones(len(self.scale)) if self.defect_variance is None else self.defect_variance
        return np.where(np.asarray(defect, bool)[:, None], d[None, :], 1.0)

    def fit_variance(self, fit_var: np.ndarray) -> np.ndarray:
        """[B, K]: what the emulator fit's label variances `fit_var` [B, K] add to the network's aleatoric
        variance before the scales, `fit_variance_weight` times them (NaN, where the fit gives none, and
        no weight count 0)."""
        if self.fit_variance_weight is None:
            return np.zeros_like(fit_var)
        return self.fit_variance_weight * np.nan_to_num(fit_var, nan=0.0)

    def label_factor(self, mean: np.ndarray) -> np.ndarray:
        """[B, K] the `label_scale` factor at the network's mean [B, K] of its target (1 without one)."""
        if self.label_scale is None:
            return np.ones((len(mean), len(self.scale)))
        return np.stack([np.interp(mean[:, self.label], self.label_knots, row) for row in self.label_scale],
                        axis=1)

    def inflation(self, chi2: np.ndarray, misfit: np.ndarray) -> np.ndarray:
        """[B, K] factor on the aleatoric variance given the emulator fit's reduced chi^2 [B] and its
        misfit [B] (`emulator.Fit.misfit`, >= 0): with a `chi2_inflation` c, 1 + c sqrt(misfit), times chi2
        where chi2 is below 1 (`noise_ratio`: flux_err overstating the noise, all of the aleatoric part
        from it); 1 without, and where chi2 is NaN (a row the emulator does not fit)."""
        if self.chi2_inflation is None:
            return np.ones((len(chi2), len(self.scale)))
        return noise_ratio(chi2)[:, None] * (1.0 + misfit_growth(misfit)[:, None] * self.chi2_inflation)

    def network_share(self, log_snr: np.ndarray, excess: np.ndarray, gapped: np.ndarray) -> np.ndarray:
        """[B, K] the network's weight w in the blend at each row's log10 SNR and the parts of the fit's
        excess reduced chi^2 ([B, len(EXCESS_PARTS)]), 0 on rows with a gap (`gapped` [B] bool); 1
        without a blend."""
        if self.network_weight is None:
            return np.ones((len(log_snr), len(self.scale)))
        w0 = np.stack([np.interp(log_snr, self.knots, row) for row in self.network_weight], axis=1)
        if self.network_gain is not None:
            w0 = raised_share(w0, np.asarray(excess, np.float64) @ self.network_gain.T)
        return np.where(np.asarray(gapped, bool)[:, None], 0.0, w0)

    def blend(self, log_snr: np.ndarray, mean: np.ndarray, fitted: np.ndarray, excess: np.ndarray,
              gapped: np.ndarray) -> np.ndarray:
        """[B, K]: the network's `mean` blended with the emulator fit's labels `fitted` ([B, K], NaN
        for a target or row the emulator does not fit: the network's mean stays there) at each row's
        log10 SNR, the parts of the fit's excess chi^2 and whether it has a gap (`network_share`)."""
        w = self.network_share(log_snr, excess, gapped)
        return np.where(np.isfinite(fitted), w * mean + (1.0 - w) * fitted, mean)

    def to_manifest(self, targets: list[str]) -> dict:
        entry = {"kind": "snr", "feature": "log10_snr", "log10_snr_knots": self.knots.tolist(),
                 "scale": {t: self.scale[k].tolist() for k, t in enumerate(targets)},
                 "floor": {t: float(self.floor[k]) for k, t in enumerate(targets)}}
        if self.network_weight is not None:
            entry["network_weight"] = {t: self.network_weight[k].tolist() for k, t in enumerate(targets)}
        if self.network_gain is not None:
            entry["network_gain"] = {part: {t: float(self.network_gain[k, i]) for k, t in enumerate(targets)}
                                     for i, part in enumerate(EXCESS_PARTS)}
        for name in ("chi2_inflation", "fit_variance_weight", "defect_variance"):
            if getattr(self, name) is not None:
                entry[name] = {t: float(getattr(self, name)[k]) for k, t in enumerate(targets)}
        if self.label_scale is not None:
            entry["label_scale"] = {"target": targets[self.label], "knots": self.label_knots.tolist(),
                                    "scale": {t: self.label_scale[k].tolist() for k, t in enumerate(targets)}}
        return entry

    @classmethod
    def from_manifest(cls, entry: dict, targets: list[str]) -> Calibration:
        try:
            if entry["kind"] != "snr":
                raise ValueError(f"unknown kind {entry['kind']!r}")
            knots = np.asarray(entry["log10_snr_knots"], np.float64)
            scale = np.asarray([entry["scale"][t] for t in targets], np.float64).reshape(len(targets), -1)
            floor = np.asarray([entry["floor"][t] for t in targets], np.float64)
            weight = entry.get("network_weight")
            if weight is not None:
                weight = np.asarray([weight[t] for t in targets], np.float64).reshape(len(targets), -1)
            gain = entry.get("network_gain")
            if gain is not None:
                gain = np.asarray([[gain[part][t] for part in EXCESS_PARTS] for t in targets], np.float64)
            elif "network_chi2_gain" in entry:  # an earlier manifest's one gain for any excess: the same
                # gain on every part, as g e_r + g e_o = g max(chi2 - 1, 0)
                one = np.asarray([entry["network_chi2_gain"][t] for t in targets], np.float64)
                gain = np.repeat(one[:, None], len(EXCESS_PARTS), axis=1)
            inflation, fit_weight, defect = (None if entry.get(name) is None
                                             else np.asarray([entry[name][t] for t in targets], np.float64)
                                             for name in ("chi2_inflation", "fit_variance_weight",
                                                          "defect_variance"))
            label, label_knots, label_scale = None, None, None
            if "label_scale" in entry:
                by_label = entry["label_scale"]
                label = targets.index(by_label["target"])
                label_knots = np.asarray(by_label["knots"], np.float64)
                label_scale = np.asarray([by_label["scale"][t] for t in targets], np.float64)
                label_scale = label_scale.reshape(len(targets), -1)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"manifest 'calibration' is malformed: {exc!r}") from exc
        if (scale.shape[1] != len(knots) or not np.all(np.diff(knots) > 0)
                or not (np.isfinite(scale).all() and (scale > 0).all())
                or not (np.isfinite(floor).all() and (floor >= 0).all())):
            raise ModelError("manifest 'calibration' needs increasing knots, one positive finite scale per "
                             "knot and target, and a finite floor >= 0 per target")
        if weight is not None and (weight.shape != scale.shape or not np.isfinite(weight).all()
                                   or weight.min() < 0 or weight.max() > 1):
            raise ModelError("manifest 'calibration' network_weight needs one weight in [0, 1] per knot "
                             "and target")
        for name, value, shape in (("network_gain", gain, (len(targets), len(EXCESS_PARTS))),
                                   ("chi2_inflation", inflation, floor.shape),
                                   ("fit_variance_weight", fit_weight, floor.shape),
                                   ("defect_variance", defect, floor.shape)):
            if value is not None and not (value.shape == shape and np.isfinite(value).all()
                                          and (value >= 0).all()):
                raise ModelError(f"manifest 'calibration' {name} needs one finite value >= 0 per target"
                                 + (f" and each of {EXCESS_PARTS}" if len(shape) > 1 else ""))
        if label_scale is not None and (
                label_knots.ndim != 1 or len(label_knots) < 1 or label_scale.shape[1] != len(label_knots)
                or not np.all(np.diff(label_knots) > 0)
                or not (np.isfinite(label_scale).all() and (label_scale > 0).all())):
            raise ModelError("manifest 'calibration' label_scale needs increasing knots and one positive "
                             "finite scale per knot and target")
        if defect is not None and defect.max(initial=0.0) > 1:
            raise ModelError("manifest 'calibration' defect_variance needs one value in [0, 1] per target")
        return cls(knots, scale, floor, weight, gain, inflation, fit_weight, defect, label, label_knots,
                   label_scale)
