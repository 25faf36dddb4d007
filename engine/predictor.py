"""The predictor: a loaded model bundle that turns catalog rows into the results columns of DESIGN.md.

`Model.predict` (and `Model.__call__`, the one code path the local and Ray pipelines share) runs
ids -> RNG keys, preprocessing onto the model grid, the ensemble x MC-dropout kernel of the chosen
backend, and the quality flags. It knows nothing of files, Ray or progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

import starcast

from ..catalogs.schema import ERROR, FLAGS, ID, META_WAVELENGTH, Flag, WavelengthGrid
from ..errors import CatalogError, ModelError, StarcastError
from ..kernels import reference
from ..kernels.preprocess import PreprocessSettings, preprocess
from ..kernels.rng import id_keys
from .bundle import Bundle, load_bundle

BACKENDS = ("auto", "triton", "cpu", "reference")

# Keys of the results' Arrow/Parquet metadata (UTF-8 strings).
META_MODEL, META_MODEL_SHA256 = "starcast.model", "starcast.model_sha256"
META_SEED, META_SAMPLES = "starcast.seed", "starcast.samples"
META_VERSION, META_BACKEND = "starcast.version", "starcast.backend"


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
        self._grid_values = self.grid.values()
        self._layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

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
        """Predict one batch with the defaults given to `load_model` (the pipelines' entry point)."""
        return self.predict(batch, samples=self.samples, seed=self.seed, backend=self.backend,
                            source_grid=source_grid)

    def predict(self, table_or_batch, *, samples: int | None = None, seed: int = 0,
                backend: str = "auto", source_grid: WavelengthGrid | None = None) -> pa.Table:
        """Predict every row of a catalog table or batch (or a dict of columns: `id`, 2-D `flux`, a
        shared 1-D `wavelength`). Returns one results row per input row, in order: `id`; per target
        `t`, `t_err` (total sigma), `t_err_aleatoric`, `t_err_epistemic` (float64, physical units,
        null where the row could not be predicted); `flags` (int32, `Flag` bits); `error`."""
        table, source_grid = _as_table(table_or_batch, source_grid)
        samples = self._samples(samples)
        backend = resolve_backend(backend)
        ok, x, keys, flags, errors = self._prepare(table, source_grid)
        mean = np.full((table.num_rows, len(self.targets)), np.nan)
        var_a, var_e = mean.copy(), mean.copy()
        rows = np.flatnonzero(ok)
        if len(rows):  # the kernels bound their own memory (row chunks / tiles)
            stats = self._kernel(backend)(*self._inputs(backend, x[rows], keys[rows]),
                                          **self._kernel_args(samples, seed))
            for out, value in zip((mean, var_a, var_e), stats, strict=True):
                out[rows] = value.detach().cpu().double().numpy()
        return self._results(table, ok, mean, var_a, var_e, flags, errors, samples, seed, backend)

    def predict_samples(self, table_or_batch, *, samples: int | None = None, seed: int = 0,
                        source_grid: WavelengthGrid | None = None) -> PredictiveSamples:
        """All M x S (mu, sigma) pairs per row, from the float64 reference on the same dropout masks
        as `predict`: the full predictive distribution of a few spectra (memory grows as B x M x S)."""
        table, source_grid = _as_table(table_or_batch, source_grid)
        samples = self._samples(samples)
        ok, x, keys, flags, errors = self._prepare(table, source_grid)
        arch = self.bundle.architecture
        shape = (table.num_rows, arch["members"], samples, len(self.targets))
        mu, var = np.full(shape, np.nan), np.full(shape, np.nan)
        rows = np.flatnonzero(ok)
        if len(rows):
            m, v = reference.ensemble_samples(*self._inputs("reference", x[rows], keys[rows]),
                                              **self._kernel_args(samples, seed))
            mu[rows], var[rows] = m.cpu().double().numpy(), v.cpu().double().numpy()
        return PredictiveSamples(ids=table.column(ID).to_pylist(), targets=[t.name for t in self.targets],
                                 mu=mu, sigma=np.sqrt(var), flags=flags, errors=errors)

    def metadata(self, *, samples: int | None = None, seed: int = 0, backend: str = "auto") -> dict:
        """The results' file metadata: model name and weights hash, seed, S, code version, backend."""
        return {META_MODEL: self.name, META_MODEL_SHA256: self.bundle.weights_sha256,
                META_SEED: str(seed), META_SAMPLES: str(self._samples(samples)),
                META_VERSION: starcast.__version__, META_BACKEND: resolve_backend(backend)}

    # -- the steps ------------------------------------------------------------------------------

    def _samples(self, samples: int | None) -> int:
        s = self.bundle.architecture["samples"] if samples is None else samples
        if int(s) != s or s < 1:
            raise StarcastError(f"samples must be a positive integer, got {samples!r}")
        return int(s)

    def _prepare(self, table: pa.Table, source_grid: WavelengthGrid | None):
        """Keys and preprocessing. Returns (ok, x, keys, flags, errors): `ok` marks the rows that go
        through the network; the others carry PREPROCESS_FAILED and a message in `errors`."""
        if ID not in table.column_names:
            raise CatalogError("the catalog has no 'id' column", column=ID)
        try:
            keys = id_keys(table.column(ID))
        except ValueError as exc:
            raise CatalogError(str(exc), column=ID) from exc
        pre = preprocess(table, self._grid_values, self.settings, source_grid=source_grid)
        x = np.ascontiguousarray(pre.x, dtype=np.float32)
        flags = np.asarray(pre.flags, dtype=np.int32).copy()
        errors = list(pre.errors)
        finite = np.isfinite(x).all(axis=1)
        for i in np.flatnonzero(~finite):
            errors[i] = errors[i] or "preprocessed flux is not finite"
        ok = np.array([e is None for e in errors], dtype=bool) & finite
        flags[~ok] |= Flag.PREPROCESS_FAILED
        return ok, x, keys, flags, errors

    def _inputs(self, backend: str, x: np.ndarray, keys: np.ndarray):
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        if backend not in self._layers:
            self._layers[backend] = [(w.to(device), b.to(device)) for w, b in self.bundle.layers]
        return (torch.from_numpy(x).to(device), torch.from_numpy(keys).to(device),
                self._layers[backend])

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

    def _results(self, table, ok, mean, var_a, var_e, flags, errors, samples, seed, backend) -> pa.Table:
        var_e = np.maximum(var_e, 0.0)  # avg(mu^2) - mean^2 can round to a tiny negative number
        err_a, err_e, err = np.sqrt(var_a), np.sqrt(var_e), np.sqrt(var_a + var_e)
        lo = np.array([t.min for t in self.targets])
        hi = np.array([t.max for t in self.targets])
        with np.errstate(invalid="ignore"):
            out_of_range = ((mean < lo) | (mean > hi)).any(axis=1)
            thresholds = self.bundle.epistemic_thresholds
            high = np.zeros(len(ok), dtype=bool)
            for k, t in enumerate(self.targets):
                if t.name in thresholds:
                    high |= err_e[:, k] > thresholds[t.name]
        for k, t in enumerate(self.targets):
            if t.name in table.column_names:  # truth given: is it inside the training range?
                truth = table.column(t.name).to_numpy(zero_copy_only=False).astype(np.float64)
                with np.errstate(invalid="ignore"):
                    out_of_range |= (truth < lo[k]) | (truth > hi[k])
        flags = flags | np.where(out_of_range, Flag.OUT_OF_RANGE, 0) | np.where(high, Flag.HIGH_EPISTEMIC, 0)
        null = ~ok
        columns = {ID: table.column(ID)}
        for k, t in enumerate(self.targets):
            for suffix, values in (("", mean), ("_err", err), ("_err_aleatoric", err_a),
                                   ("_err_epistemic", err_e)):
                columns[t.name + suffix] = pa.array(values[:, k], pa.float64(), mask=null)
        columns[FLAGS] = pa.array(flags.astype(np.int32), pa.int32())
        columns[ERROR] = pa.array(errors, pa.string())
        meta = self.metadata(samples=samples, seed=seed, backend=backend)
        return pa.table(columns).replace_schema_metadata(meta)


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


def _as_table(data, source_grid: WavelengthGrid | None) -> tuple[pa.Table, WavelengthGrid | None]:
    """Accept a pa.Table, pa.RecordBatch, polars DataFrame or dict of columns. (A shared grid in the
    schema metadata, `starcast.wavelength`, is read by `preprocess` when `source_grid` is None.)"""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif hasattr(data, "to_arrow") and not isinstance(data, pa.Table):
        data = data.to_arrow()
    elif isinstance(data, dict):
        data, source_grid = _table_from_arrays(data, source_grid)
    if not isinstance(data, pa.Table):
        raise StarcastError(f"cannot predict from a {type(data).__name__}; pass a pyarrow Table or "
                            "RecordBatch, a polars DataFrame, or a dict of columns")
    return data, source_grid


def _table_from_arrays(columns: dict, source_grid):
    """A dict with 2-D `flux` (and `flux_err`, `mask`) and a 1-D shared `wavelength` (Angstrom)."""
    columns = dict(columns)
    wavelength = columns.pop("wavelength", None)
    if wavelength is not None and np.ndim(wavelength) == 1:
        source_grid = WavelengthGrid.explicit(wavelength)
    elif wavelength is not None:
        columns["wavelength"] = wavelength
    out = {}
    for name, values in columns.items():
        arr = np.asarray(values)
        if arr.ndim == 2:
            flat = pa.array(arr.reshape(-1))
            out[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
        else:
            out[name] = pa.array(arr)
    if source_grid is not None:
        return pa.table(out).replace_schema_metadata({META_WAVELENGTH: source_grid.to_json()}), source_grid
    return pa.table(out), source_grid


__all__ = ["BACKENDS", "Model", "PredictiveSamples", "load_model", "resolve_backend"]
