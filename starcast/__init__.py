"""starcast: stellar parameters with calibrated uncertainties for survey catalogs of spectra.

The public API is deliberately small: `load_model`, `run`, `synth` and the catalog schema
(`starcast.catalogs.schema`). Everything else is internal. Heavy modules (torch, ray) are imported
only when one of these names is first used, so `import starcast` and `starcast --help` stay fast.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "starcast.engine.predictor",
    "run": "starcast.engine.run",
    "synth": "starcast.catalogs.synth",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(_import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'starcast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazy public ones, so that tab completion offers them."""
    return sorted({*globals(), *_PUBLIC})
