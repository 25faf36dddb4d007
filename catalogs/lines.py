"""Diagnostic lines of OB-star spectra in the blue-violet (4000-4800 A): name and air wavelength.

The lines on which Teff, log g and v sin i of OB stars are read: the classification lines of B stars
(Walborn & Fitzpatrick 1990, PASP 102, 379: He I-II, Si II-IV, O II, N II, C II-III, Mg II, the Balmer
lines) and the Teff / log g diagnostics of Simon-Diaz & Herrero 2014 (A&A 562, A135). Preprocessing
flags LINE_LOST when one falls in a gap; explanations may reuse the list. Wavelengths are in air
(Angstrom); the synthetic spectra's own line strengths live in `starcast.catalogs.physics`.
`line_windows` gives the pixels on (or in the Balmer wings of) these lines, for measuring where a
model's attributions fall.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DiagnosticLine(NamedTuple):
    name: str
    wavelength: float  # A, air, rest frame
    source: str


_NIST = "NIST ASD v5.11 (Kramida et al. 2023)"
_NIST_BLEND = "NIST ASD v5.11 (Kramida et al. 2023), strongest component of the blend"
# For these, the centre is where the line is deepest in the BSTAR2006 SYNSPEC spectra (Lanz & Hubeny
# 2007; shared/data/tlusty-bstar2006), to the grid's 0.01 A.
_SYNSPEC = "BSTAR2006 SYNSPEC spectra (Lanz & Hubeny 2007), deepest point"
_SYNSPEC_BLEND = "BSTAR2006 SYNSPEC spectra (Lanz & Hubeny 2007), deepest point of the blend"

DIAGNOSTIC_LINES: tuple[DiagnosticLine, ...] = (
    DiagnosticLine("He I 4009", 4009.256, _SYNSPEC),
    DiagnosticLine("He I 4026", 4026.191, _NIST),
    DiagnosticLine("O II 4072", 4072.153, _SYNSPEC),
    DiagnosticLine("O II 4076", 4075.862, _SYNSPEC),
    DiagnosticLine("Si IV 4089", 4088.862, _NIST),
    DiagnosticLine("H delta", 4101.734, _NIST),
    DiagnosticLine("Si IV 4116", 4116.104, _NIST),
    DiagnosticLine("He I 4121", 4120.812, _SYNSPEC),
    DiagnosticLine("Si II 4128-31", 4128.054, _SYNSPEC_BLEND),  # the window reaches 4130.89 too
    DiagnosticLine("He I 4144", 4143.761, _NIST),
    DiagnosticLine("He II 4200", 4199.830, _NIST_BLEND),  # with N III 4200.1 in the hottest ones
    DiagnosticLine("C II 4267", 4267.261, _NIST_BLEND),
    DiagnosticLine("H gamma", 4340.462, _NIST),
    DiagnosticLine("O II 4349", 4349.426, _SYNSPEC),
    DiagnosticLine("O II 4367", 4366.895, _SYNSPEC),
    DiagnosticLine("He I 4388", 4387.929, _NIST),
    DiagnosticLine("O II 4415", 4414.899, _NIST),
    DiagnosticLine("O II 4417", 4416.975, _NIST),
    DiagnosticLine("He I 4438", 4437.551, _SYNSPEC),
    DiagnosticLine("N II 4447", 4447.030, _SYNSPEC),
    DiagnosticLine("He I 4471", 4471.480, _NIST_BLEND),
    DiagnosticLine("Mg II 4481", 4481.126, _NIST_BLEND),
    DiagnosticLine("He II 4541", 4541.591, _NIST),
    DiagnosticLine("Si III 4553", 4552.622, _NIST),
    DiagnosticLine("Si III 4568", 4567.840, _NIST),
    DiagnosticLine("Si III 4575", 4574.757, _NIST),
    DiagnosticLine("N II 4630", 4630.539, _SYNSPEC),
    DiagnosticLine("C III/O II 4650", 4649.135, _SYNSPEC_BLEND),  # O II 4649; C III 4647-51, O II 4651
    DiagnosticLine("O II 4662", 4661.632, _SYNSPEC),
    DiagnosticLine("He II 4686", 4685.710, _NIST_BLEND),
    DiagnosticLine("O II 4705", 4705.346, _SYNSPEC),
    DiagnosticLine("He I 4713", 4713.146, _SYNSPEC),
)

# The Balmer lines whose pressure-broadened wings carry log g, and how far the wings reach (A, each side
# of the centre): on the BSTAR2006 grid (Lanz & Hubeny 2007) the flux at log g 4.0 and 3.0 differs by
# more than 1% (1 A running mean) out to 20-30 A from H delta and H gamma at Teff 15-28 kK.
BALMER_LINES = ("H delta", "H gamma")
BALMER_WING_HALF_WIDTH = 30.0
LINE_HALF_WIDTH = 3.0  # A: a pixel "on" a listed line lies within this of its centre


def line_windows(wavelength, *, half_width: float = LINE_HALF_WIDTH, balmer_wings: bool = False):
    """Boolean mask (P,) of the pixels of `wavelength` (air, A) within `half_width` of a diagnostic
    line, and with `balmer_wings` also within BALMER_WING_HALF_WIDTH of the Balmer lines."""
    wl = np.asarray(wavelength, dtype=np.float64)
    inside = np.zeros(wl.shape, dtype=bool)
    for line in DIAGNOSTIC_LINES:
        reach = BALMER_WING_HALF_WIDTH if balmer_wings and line.name in BALMER_LINES else half_width
        inside |= np.abs(wl - line.wavelength) <= reach
    return inside


def nearest_line(wavelength: float, *, half_width: float = LINE_HALF_WIDTH) -> str | None:
    """The name of the listed line nearest `wavelength` (air, A) if within `half_width`, else None."""
    line = min(DIAGNOSTIC_LINES, key=lambda ln: abs(ln.wavelength - wavelength))
    return line.name if abs(line.wavelength - wavelength) <= half_width else None
