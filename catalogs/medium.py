"""Air and vacuum wavelengths: the standard conversion between the two media (Angstrom).

Catalogs state their medium (`WavelengthGrid.medium`, the `starcast.medium` file metadata, the
`--medium` import options); preprocessing converts input wavelengths to the model's medium with these
functions. Below 2000 A wavelengths are vacuum by convention (IAU) and left unchanged.
"""

from __future__ import annotations

import numpy as np

AIR, VACUUM = "air", "vacuum"
MEDIA = (AIR, VACUUM)
_UV_LIMIT = 2000.0  # A; IAU convention: vacuum wavelengths below, air above (Morton 2000, ApJS 130, 403)


def _refractive_index(vacuum: np.ndarray) -> np.ndarray:
    # Ciddor 1996, Appl. Opt. 35, 1566, eq. 1 (standard air, 15 C, 450 ppm CO2), as in SDSS `vactoair`;
    # sigma2 is the squared vacuum wavenumber in 1/micron^2.
    sigma2 = (1e4 / vacuum) ** 2
    return 1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2)


def vacuum_to_air(wavelength) -> np.ndarray:
    """Air wavelengths (A) of vacuum wavelengths (A); unchanged below 2000 A."""
    vac = np.asarray(wavelength, dtype=np.float64)
    return np.where(vac >= _UV_LIMIT, vac / _refractive_index(np.maximum(vac, _UV_LIMIT)), vac)


def air_to_vacuum(wavelength) -> np.ndarray:
    """Vacuum wavelengths (A) of air wavelengths (A): `vacuum_to_air` inverted by fixed-point
    iteration (n varies slowly, so four steps reach 1e-9 A); unchanged below 2000 A."""
    air = np.asarray(wavelength, dtype=np.float64)
    vac = air.copy()
    for _ in range(4):
        vac = air * _refractive_index(np.maximum(vac, _UV_LIMIT))
    return np.where(air >= _UV_LIMIT, vac, air)


def check_medium(medium: str, what: str = "medium") -> str:
    """`medium` if it is "air" or "vacuum", else a ValueError naming `what`."""
    if medium not in MEDIA:
        raise ValueError(f"{what} must be 'air' or 'vacuum', got {medium!r}")
    return medium


def convert(wavelength, source: str, target: str) -> np.ndarray:
    """Wavelengths (A) in medium `source` expressed in medium `target` (a copy when they are equal)."""
    check_medium(source, "source medium")
    check_medium(target, "target medium")
    if source == target:
        return np.array(wavelength, dtype=np.float64)
    return vacuum_to_air(wavelength) if target == AIR else air_to_vacuum(wavelength)
