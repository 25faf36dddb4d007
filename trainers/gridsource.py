"""Training data from a grid of model spectra (`[data.grid]` of a training config): a new survey of
stars between the training nodes for every epoch, and fixed validation and test surveys at nodes left
out of training (leave-nodes-out: the situation of a real star between the nodes), all preprocessed
by the engine's own preprocessing and given the model's input features.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy.stats import norm

from ..catalogs import gridsynth
from ..catalogs.grids import read_grid
from ..catalogs.medium import MEDIA
from ..catalogs.physics import C_KMS
from ..catalogs.schema import ID, SNR, Flag
from ..kernels.features import network_inputs
from ..kernels.preprocess import PreprocessSettings, preprocess
from ..kernels.resample import bin_edges, response_variance, rest_frame_factor
from .config import ConfigError, TrainConfig
from .data import Dataset

SPLIT_SEEDS = {"val": 1_000_001, "test": 1_000_002, "between": 1_000_003}  # with the config's seed


@dataclass(frozen=True)
class GridData:
    """`[data.grid]`: the grid file (relative to the config file), the nodes left out for validation
    and test, rows per epoch and per fixed split, how the survey observes and perturbs."""

    path: str
    medium: str = ""  # "air" or "vacuum": of a grid whose file states none (`read_grid`); "": air
    val_nodes: list = field(default_factory=list)  # [[teff, logg], ...]
    test_nodes: list = field(default_factory=list)
    per_epoch: int = 40000
    refresh_every: int = 1  # epochs each drawn survey is used for (drawing costs more than training)
    val_rows: int = 6000
    test_rows: int = 4000
    observation: dict = field(default_factory=dict)  # catalogs.gridsynth.Observation fields
    perturbations: dict = field(default_factory=dict)  # catalogs.gridsynth.Perturbations fields
    clip_emission: bool = True
    cache: str = ""  # a folder for the broadened library (relative to the config file); "" = none
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GridData:
        """The `[data.grid]` table of `cfg`; `ConfigError` naming the config and the key that is wrong."""
        where, raw = f"config {cfg.source}: " if cfg.source else "", cfg.data.grid
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}[data.grid] must be a table (path = ..., val_nodes = ...), "
                              f"got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown or "path" not in raw:
            raise ConfigError(f"{where}[data.grid] needs `path`; unknown keys {unknown} "
                              f"(known: {sorted(known)})")
        for key, kind in (("observation", gridsynth.Observation), ("perturbations", gridsynth.Perturbations)):
            names = {f.name for f in fields(kind)}
            unknown = sorted(set(raw.get(key, {})) - names)
            if unknown:
                raise ConfigError(f"{where}[data.grid.{key}]: unknown keys {unknown} "
                                  f"(known: {sorted(names)})")
        for key in ("val_nodes", "test_nodes"):
            nodes = raw.get(key, [])
            if not nodes or not all(isinstance(node, list | tuple) and len(node) == 2 for node in nodes):
                raise ConfigError(f"{where}[data.grid] {key} must be [[teff, logg], ...], one node or more "
                                  f"left out of training, got {nodes!r}")
            repeated = [n for i, n in enumerate(nodes) if n in nodes[:i] or (key == "test_nodes" and n in
                                                                              raw.get("val_nodes", []))]
            if repeated:
                raise ConfigError(f"{where}[data.grid] {key}: {repeated} listed twice or in val_nodes too "
                                  "(validation picks each member's best epoch, and the cross-fitted "
                                  "figures fit a calibration on one set and score it on the other)")
        if raw.get("medium", "") not in ("", *MEDIA):
            raise ConfigError(f"{where}[data.grid] medium must be 'air' or 'vacuum' (or absent: the file's, "
                              f"else air), got {raw['medium']!r}")
        metals = raw.get("perturbations", {}).get("metals", (0.0, 0.0))
        made = ("teff", "logg", "vsini", *(("metals",) if metals[1] > metals[0] else ()))
        if not set(cfg.data.targets) <= set(made):
            raise ConfigError(f"{where}data.targets {list(cfg.data.targets)}: a grid's stars carry "
                              f"{list(made)} (metals with a [data.grid.perturbations] metals span)")
        return cls(**raw)

    def resolve(self, path: str, source: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or not source else Path(source).resolve().parent / p


def training_response(obs: gridsynth.Observation, pert: gridsynth.Perturbations, grid: np.ndarray,
                      flux_conserving: bool) -> float:
    """A^2: the variance of the response through which the engine's resampling sees the pixels of
    spectra observed on `obs`'s grid on the model `grid` (`kernels.resample.response_variance`),
    averaged over the stated rv errors of `pert` it removes (41 quantiles of their normal law). A
    spectrum seen through a narrower one (finer pixels) has sharper lines than these, which a model
    trained on them reads as slower rotation: the engine smooths it up to this first."""
    dst = np.empty(len(grid) + 1)
    bin_edges(grid, dst)
    observed, variances = obs.grid().values(), []
    for rv in pert.rv_error_kms * norm.ppf((np.arange(41) + 0.5) / 41):
        src = observed * rest_frame_factor(rv)
        edges = np.empty(len(src) + 1)
        bin_edges(src, edges)
        variances.append(response_variance(src, edges, grid, dst, flux_conserving))
    return float(np.mean(variances))


class GridSource:
    """The libraries and draws of one config: `epoch(e)` and `split("val" | "test")`."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.data = GridData.from_config(cfg)
        self.where = f"config {cfg.source}: " if cfg.source else ""
        self.grid_values = cfg.grid.values()
        self.settings = PreprocessSettings.from_dict(cfg.preprocess)
        self.features = list(cfg.architecture.features)
        self.targets = list(cfg.data.targets)
        self.obs = gridsynth.Observation(**self.data.observation)
        self.pert = gridsynth.Perturbations(**self.data.perturbations)
        grid = read_grid(self.data.resolve(self.data.path, cfg.source), medium=self.data.medium or None)
        if grid.medium != cfg.grid.medium or self.obs.medium != cfg.grid.medium:
            raise ConfigError(f"{self.where}the model's [grid] is in {cfg.grid.medium}, [data.grid]'s "
                              f"spectra in {grid.medium} and [data.grid.observation] in {self.obs.medium}: "
                              "they must agree ([data.grid] medium gives it for a grid whose file states "
                              "none)")
        cache = self.data.resolve(self.data.cache, cfg.source) if self.data.cache else None
        self.full = gridsynth.BroadenedLibrary.build(grid, self.obs,
                                                     metals=gridsynth.metals_ladder(self.pert.metals),
                                                     clip_emission=self.data.clip_emission, cache=cache,
                                                     progress=progress)
        self.held = {s: self._node_index(getattr(self.data, f"{s}_nodes")) for s in ("val", "test")}
        keep = np.setdiff1d(np.arange(len(self.full.nodes)), np.concatenate(list(self.held.values())))
        self._last: tuple = (None, None)  # (draw number, (x, y)) of the latest training survey
        self.train = self.full.subset(keep)

    def _node_index(self, nodes: list) -> np.ndarray:
        out = []
        for teff, logg in nodes:
            known = self.full.nodes
            hit = np.flatnonzero((known[:, 0] == teff) & (np.abs(known[:, 1] - logg) < 1e-6))
            if len(hit) != 1:
                raise ConfigError(f"{self.where}[data.grid] node ({teff}, {logg}) of val_nodes or test_nodes "
                                  "is not in the grid")
            out.append(int(hit[0]))
        return np.array(out, dtype=np.int64)

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(x [N, D + E], y [N, K]) of the training survey of `epoch` (1-based): a new one every
        `refresh_every` epochs, seeded by (seed, its number)."""
        draw = (epoch - 1) // max(self.data.refresh_every, 1)
        if self._last[0] != draw:
            rng = np.random.default_rng([self.data.seed, draw + 1])
            labels = gridsynth.draw_labels(self.train, self.data.per_epoch, self.pert, rng)
            table = gridsynth.draw_survey(self.train, labels, self.pert, rng).table(self.obs)
            self._last = (draw, self.prepare(table)[:2])
        return self._last[1]

    def split_table(self, name: str):
        """A fixed survey as a catalog table (with labels): at the `name` nodes ("val" or "test"), or
        ("between") `val_rows` stars anywhere between the nodes of the full grid, the left-out ones
        included (what a survey of real stars looks like), to score the calibration on beside the
        nodes."""
        rng = np.random.default_rng([self.data.seed, SPLIT_SEEDS[name]])
        ids = {"val": 10**9, "test": 2 * 10**9, "between": 3 * 10**9}[name]
        if name == "between":
            labels = gridsynth.draw_labels(self.full, self.data.val_rows, self.pert, rng)
        else:
            rows = self.data.val_rows if name == "val" else self.data.test_rows
            labels = gridsynth.labels_at(self.full.nodes[rng.choice(self.held[name], rows)], self.pert, rng)
        return gridsynth.draw_survey(self.full, labels, self.pert, rng, id_start=ids).table(self.obs)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, snr, ids) of the fixed survey at the `name` nodes."""
        return self.prepare(self.split_table(name))

    def prepare(self, table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x [N, D + E], y [N, K], snr [N], ids [N]) of a survey table as the engine prepares it;
        rows whose preprocessing failed are dropped."""
        xs, keep = [], []
        for start in range(0, table.num_rows, 8192):
            pre = preprocess(table.slice(start, 8192), self.grid_values, self.settings)
            xs.append(network_inputs(pre.x, pre.ivar, self.features))
            keep.append((pre.flags & Flag.PREPROCESS_FAILED) == 0)
        x, keep = np.concatenate(xs).astype(np.float32), np.concatenate(keep)
        y = np.stack([table.column(t).to_numpy() for t in self.targets], axis=1)
        return x[keep], y[keep], table.column(SNR).to_numpy().astype(np.float64)[keep], \
            table.column(ID).to_numpy()[keep]

    def label_range(self, name: str) -> tuple[float, float]:
        """The training range of a target: the span of the training nodes (teff, logg) or of the draws."""
        if name in ("teff", "logg"):
            col = self.train.nodes[:, ("teff", "logg").index(name)]
            return float(col.min()), float(col.max())
        return getattr(self.pert, name)

    def vsini_resolution_limit(self) -> float:
        """km/s: the instrumental FWHM in velocity, c / R; rotation slower than this is not resolved."""
        return C_KMS / self.obs.resolving_power

    def input_requirements(self) -> dict:
        """The manifest's `input` entries this training fixes: resolving power, wavelength range, the
        pixels its spectra were observed on and their response on the model grid
        (`training_response`)."""
        return {"resolving_power": self.obs.resolving_power,
                "wavelength_range": [float(self.grid_values[0]), float(self.grid_values[-1])],
                "training_pixels": self.obs.grid().to_dict(),
                "response_variance": training_response(self.obs, self.pert, self.grid_values,
                                                       self.settings.method == "flux")}

    def dataset(self, first_epoch: tuple[np.ndarray, np.ndarray]) -> Dataset:
        """The first epoch's training rows with the validation and test surveys, as one `Dataset`
        (`dropped`: the drawn rows whose preprocessing failed)."""
        parts = [(*first_epoch, np.full(len(first_epoch[0]), np.nan), np.arange(len(first_epoch[0])))]
        parts += [self.split("val"), self.split("test")]
        names = ["train", "val", "test"]
        x, y, snr, ids = (np.concatenate([p[i] for p in parts]) for i in range(4))
        split = np.concatenate([np.full(len(p[0]), n) for p, n in zip(parts, names, strict=True)])
        drawn = self.data.per_epoch + self.data.val_rows + self.data.test_rows
        return Dataset(x=x, y=y, snr=snr, ids=ids, split=split, dropped=drawn - len(x))
