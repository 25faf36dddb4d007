import os

# Triton kernels run under the interpreter on machines without a GPU (CI), at small shapes.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# The reference study's physics (shared/data beside the repository): read-only, never copied into git.
TLUSTY_GRID = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/tlusty-bstar2006/grid.npz"


@pytest.fixture(scope="session")
def tlusty_grid():
    """The TLUSTY BSTAR2006 grid (quality models only). CI always has it; elsewhere the tests that
    need it skip, saying why."""
    if not TLUSTY_GRID.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{TLUSTY_GRID} is missing: CI must run with shared/ beside the repository")
        pytest.skip(f"{TLUSTY_GRID} not found (shared/ is not beside this checkout)")
    from starcast.catalogs.grids import read_grid

    return read_grid(TLUSTY_GRID)


@pytest.fixture
def unchecked(monkeypatch):
    """The engine's check of a given rv bypassed (its search finds nothing left), as where it misses a
    wrong rv: then only the emulator fit resolves the residual and the engine shifts the spectra on its
    grid (`Model._infer`)."""
    import numpy as np
    from starcast.engine.rv import VelocitySearch

    monkeypatch.setattr(VelocitySearch, "check",
                        lambda self, x, ivar: (np.zeros(len(x)), np.full(len(x), np.nan)))
