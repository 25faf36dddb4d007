"""The calibration a bundle applies to its sigmas after the kernel's reduction, the same for every
backend: per target, a scale that depends on the spectrum's SNR (piecewise linear in log10 SNR between
knots, constant beyond them) on both parts, and a systematic floor added in quadrature to the
epistemic part (what the grid's physics and the interpolation between its nodes do not know,
measured on grid nodes left out of training). Fitting it is the trainers' job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError


@dataclass(frozen=True)
class Calibration:
    knots: np.ndarray  # (Q,) log10 SNR per model pixel, increasing
    scale: np.ndarray  # (K, Q) sigma multipliers at the knots
    floor: np.ndarray  # (K,) physical units

    def apply(self, log_snr: np.ndarray, var_a: np.ndarray, var_e: np.ndarray) -> tuple[np.ndarray, ...]:
        """Calibrated (var_aleatoric, var_epistemic), [B, K], from the kernel's variances."""
        s = np.stack([np.interp(log_snr, self.knots, row) for row in self.scale], axis=1)
        return s**2 * var_a, s**2 * var_e + self.floor**2

    def to_manifest(self, targets: list[str]) -> dict:
        return {"kind": "snr", "feature": "log10_snr", "log10_snr_knots": self.knots.tolist(),
                "scale": {t: self.scale[k].tolist() for k, t in enumerate(targets)},
                "floor": {t: float(self.floor[k]) for k, t in enumerate(targets)}}

    @classmethod
    def from_manifest(cls, entry: dict, targets: list[str]) -> Calibration:
        try:
            if entry["kind"] != "snr":
                raise ValueError(f"unknown kind {entry['kind']!r}")
            knots = np.asarray(entry["log10_snr_knots"], np.float64)
            scale = np.asarray([entry["scale"][t] for t in targets], np.float64).reshape(len(targets), -1)
            floor = np.asarray([entry["floor"][t] for t in targets], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"manifest 'calibration' is malformed: {exc!r}") from exc
        if (scale.shape[1] != len(knots) or not np.all(np.diff(knots) > 0)
                or not (np.isfinite(scale).all() and (scale > 0).all())
                or not (np.isfinite(floor).all() and (floor >= 0).all())):
            raise ModelError("manifest 'calibration' needs increasing knots, one positive finite scale per "
                             "knot and target, and a finite floor >= 0 per target")
        return cls(knots, scale, floor)
