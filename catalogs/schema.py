"""The contract of a spectrum catalog (DESIGN.md, "Catalog") and of a results catalog ("Output").

Holds the column names, the quality flags, and the shared wavelength grid stored in Parquet file
metadata. Building and validating tables against the schema also lives here; reading and writing
files does not (see `starcast.catalogs.io`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

import numpy as np

# Input columns. Wavelengths are in Angstrom; `rv` in km/s (positive = receding).
ID, FLUX, WAVELENGTH, FLUX_ERR, IVAR, MASK, RV, SNR, SPLIT = (
    "id", "flux", "wavelength", "flux_err", "ivar", "mask", "rv", "snr", "split")
LABELS = ("teff", "logg", "vsini")  # K, dex (cgs), km/s

# File metadata keys (Parquet key-value metadata, UTF-8 JSON values).
META_WAVELENGTH = "starcast.wavelength"
META_GENERATOR = "starcast.generator"

# Output columns besides the per-target ones (`t`, `t_err`, `t_err_aleatoric`, `t_err_epistemic`).
FLAGS, ERROR = "flags", "error"


class Flag(enum.IntFlag):
    """Per-row quality bits of the `flags` column (int32). A row with any bit set still has a row."""

    NON_FINITE = 1  # NaN/inf/negative flux or non-positive errors in the input
    MASKED = 2  # too many masked or bad pixels
    COVERAGE = 4  # the input does not cover the model's wavelength grid
    OUT_OF_RANGE = 8  # labels (truth) or predictions outside the training range
    HIGH_EPISTEMIC = 16  # epistemic uncertainty above the model's out-of-distribution threshold
    PREPROCESS_FAILED = 32  # preprocessing failed; see `error`


@dataclass(frozen=True)
class WavelengthGrid:
    """A wavelength grid in Angstrom: linear (`step` in A), log-linear (`step` in ln(lambda)), or explicit.

    Stored as JSON under `starcast.wavelength` in the Parquet metadata, e.g.
    `{"kind": "linear", "start": 4000.0, "step": 0.2, "n": 4000, "medium": "vacuum"}`.
    """

    kind: str  # "linear" | "log" | "explicit"
    start: float = 0.0
    step: float = 0.0
    n: int = 0
    values_: tuple[float, ...] | None = None
    medium: str = "vacuum"  # "vacuum" | "air"

    @classmethod
    def linear(cls, start: float, step: float, n: int, medium: str = "vacuum") -> WavelengthGrid:
        return cls("linear", float(start), float(step), int(n), None, medium)

    @classmethod
    def explicit(cls, values, medium: str = "vacuum") -> WavelengthGrid:
        values = tuple(float(v) for v in np.asarray(values, dtype=np.float64))
        return cls("explicit", values[0], 0.0, len(values), values, medium)

    def values(self) -> np.ndarray:
        if self.kind == "linear":
            return self.start + self.step * np.arange(self.n, dtype=np.float64)
        if self.kind == "log":
            return np.exp(np.log(self.start) + self.step * np.arange(self.n, dtype=np.float64))
        if self.kind == "explicit":
            return np.asarray(self.values_, dtype=np.float64)
        raise ValueError(f"unknown wavelength grid kind {self.kind!r} (expected linear, log or explicit)")

    def to_json(self) -> str:
        if self.kind == "explicit":
            return json.dumps({"kind": "explicit", "values": list(self.values_), "medium": self.medium})
        return json.dumps({"kind": self.kind, "start": self.start, "step": self.step, "n": self.n,
                           "medium": self.medium})

    @classmethod
    def from_json(cls, text: str | bytes) -> WavelengthGrid:
        d = json.loads(text)
        kind = d.get("kind", "linear")
        if kind == "explicit":
            return cls.explicit(d["values"], d.get("medium", "vacuum"))
        if kind not in ("linear", "log"):
            raise ValueError(f"unknown wavelength grid kind {kind!r} (expected linear, log or explicit)")
        return cls(kind, float(d["start"]), float(d["step"]), int(d["n"]), None, d.get("medium", "vacuum"))
