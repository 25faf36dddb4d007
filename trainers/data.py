"""Training data: a synthetic survey (or a catalog with label columns) preprocessed exactly as the
engine preprocesses it, split into train/val/test.

The split comes from the catalog's `split` column when there is one (the generator's `seed` mode),
else from a seeded random permutation with the configured fractions. Rows the preprocessing flags
(non-finite, masked, short coverage, failed) are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ..catalogs.schema import ID, META_WAVELENGTH, SNR, SPLIT, WAVELENGTH, WavelengthGrid
from ..errors import CatalogError
from .config import TrainConfig

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (N, D) float32, preprocessed on the model grid
    y: np.ndarray  # (N, K) float64, labels in physical units
    snr: np.ndarray | None  # (N,) or None when the catalog has no snr column
    ids: np.ndarray  # (N,)
    split: np.ndarray  # (N,) "train" | "val" | "test"
    dropped: int  # rows removed because preprocessing flagged them

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        sel = self.split == name
        return self.x[sel], self.y[sel], None if self.snr is None else self.snr[sel], self.ids[sel]


def source_table(cfg: TrainConfig) -> pa.Table:
    """The raw catalog: the configured synthetic survey, or the catalog file(s)."""
    if cfg.data.catalog:
        from ..catalogs.io import read_catalog

        return read_catalog(cfg.data.catalog)
    from ..catalogs.synth import SynthConfig, synth_table

    return synth_table(SynthConfig(**cfg.data.synth))


def table_grid(table: pa.Table) -> WavelengthGrid | None:
    """The file-level wavelength grid from the schema metadata (None if rows carry their own)."""
    meta = table.schema.metadata or {}
    if WAVELENGTH in table.column_names or META_WAVELENGTH.encode() not in meta:
        return None
    return WavelengthGrid.from_json(meta[META_WAVELENGTH.encode()])


def preprocess_table(table: pa.Table, cfg: TrainConfig, *, batch_rows: int = 4096,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, D] float32, flags [N] int32) from the engine's `preprocess`, in row batches."""
    from ..kernels.preprocess import PreprocessSettings, preprocess

    settings = PreprocessSettings.from_dict(cfg.preprocess)
    grid, src = cfg.grid.values(), table_grid(table)
    source_grid = None if src is None else src.values()
    xs, flags = [], []
    for start in tqdm(range(0, table.num_rows, batch_rows), desc="preprocess", unit="batch",
                      disable=not progress):
        out = preprocess(table.slice(start, batch_rows), grid, settings, source_grid=source_grid)
        xs.append(np.asarray(out.x, dtype=np.float32))
        flags.append(np.asarray(out.flags, dtype=np.int32))
    return np.concatenate(xs), np.concatenate(flags)


def assign_split(table: pa.Table, cfg: TrainConfig) -> np.ndarray:
    if SPLIT in table.column_names:
        raw = np.asarray(table.column(SPLIT).to_pylist(), dtype=object)
        unknown = sorted({str(s) for s in raw} - set(SPLIT_NAMES))
        if unknown:
            raise CatalogError(f"unknown split values {unknown} (expected train, val, test)", column=SPLIT)
        return np.array([SPLIT_NAMES[str(s)] for s in raw])
    n = table.num_rows
    order = np.random.default_rng(cfg.data.split_seed).permutation(n)
    n_train, n_val = int(round(cfg.data.split[0] * n)), int(round(cfg.data.split[1] * n))
    split = np.full(n, "test", dtype="<U5")
    split[order[:n_train]] = "train"
    split[order[n_train:n_train + n_val]] = "val"
    return split


def load_dataset(cfg: TrainConfig, *, progress: bool = True) -> Dataset:
    """Read or synthesise the catalog, preprocess it on the model grid and split it."""
    table = source_table(cfg)
    missing = [t for t in cfg.data.targets if t not in table.column_names]
    if missing:
        raise CatalogError(f"the training catalog lacks the label columns {missing}",
                           file=cfg.data.catalog or None)
    x, flags = preprocess_table(table, cfg, progress=progress)
    y = np.stack([table.column(t).to_numpy().astype(np.float64) for t in cfg.data.targets], axis=1)
    keep = (flags == 0) & np.isfinite(y).all(axis=1)
    snr = table.column(SNR).to_numpy().astype(np.float64) if SNR in table.column_names else None
    ids = table.column(ID).to_numpy()
    split = assign_split(table, cfg)
    return Dataset(x=x[keep], y=y[keep], snr=None if snr is None else snr[keep], ids=ids[keep],
                   split=split[keep], dropped=int((~keep).sum()))
