"""Scalar inputs a model may take beside the spectrum: what a continuum-normalised flux does not show
but the network needs to know its own uncertainty. Computed from the preprocessed rows, identically
in training and inference; a model's manifest names the ones it takes (`input.features`), in order.
"""

from __future__ import annotations

import numpy as np

SNR_RANGE = (1.0, 1000.0)  # clip: the preprocessing's noise floor caps the SNR at 1000 anyway


def snr_per_pixel(ivar: np.ndarray) -> np.ndarray:
    """Median over the model grid of 1 / sigma of the normalised flux (B,): the SNR per model pixel
    on the continuum (filled pixels, ivar = 0, count as 0, the same in training and inference)."""
    return np.median(np.sqrt(np.maximum(ivar, 0.0)), axis=1)


def log10_snr(ivar: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(snr_per_pixel(ivar), *SNR_RANGE))


FEATURES = {"log10_snr": log10_snr}


def input_features(ivar: np.ndarray, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """(B, len(names)) float32 features of preprocessed rows with inverse variances `ivar` (B, D)."""
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown input features {unknown} (known: {sorted(FEATURES)})")
    columns = [FEATURES[n](ivar).astype(np.float32) for n in names]
    return np.stack(columns, axis=1) if columns else np.zeros((len(ivar), 0), np.float32)


def network_inputs(x: np.ndarray, ivar: np.ndarray, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """(B, D + E) float32, C-contiguous: the preprocessed spectra x (B, D) followed by the features
    `names` of each row; the one place training and inference assemble what the network sees."""
    return np.ascontiguousarray(np.concatenate([x, input_features(ivar, names)], axis=1), dtype=np.float32)
