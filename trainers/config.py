"""The training configuration: a TOML file read into frozen dataclasses (one per section).

Sections: `[data]` (a synthetic survey or a catalog path, targets, split fractions), `[grid]` (the
model's wavelength grid, Angstrom), `[preprocess]` (passed to `PreprocessSettings`),
`[architecture]`, `[training]`, `[calibration]`. Validation happens here, at the boundary; the
training code trusts what it gets. See `trainers/configs/ob-default.toml` for an annotated example.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..catalogs.schema import WavelengthGrid
from ..errors import StarcastError

UNITS = {"teff": "K", "logg": "dex", "vsini": "km/s", "metals": "dex"}


class ConfigError(StarcastError):
    """A training config that cannot be read or holds an invalid value."""


@dataclass(frozen=True)
class DataConfig:
    synth: dict = field(default_factory=dict)  # keyword arguments of catalogs.synth.SynthConfig
    catalog: str = ""  # a catalog (Parquet file/dir) with label columns; used instead of `synth`
    grid: dict = field(default_factory=dict)  # a model grid: fields of trainers.gridsource.GridData
    targets: tuple[str, ...] = ("teff", "logg", "vsini")
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/val/test when there is no split column
    split_seed: int = 0


@dataclass(frozen=True)
class ArchitectureConfig:
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    dropout: float = 0.1  # p on hidden activations, never on the input
    members: int = 5  # M
    samples: int = 32  # default S at inference
    var_eps: float = 1e-6  # var = softplus(raw) + var_eps (standardised units)
    input_rank: int = 0  # train the first layer in the span of this many principal components (0: full)
    input_whiten: bool = False  # standardise each input (component or pixel) to unit variance
    input_noise_probes: int = 0  # extra inputs: random directions outside the components' span
    features: tuple[str, ...] = ()  # scalar inputs after the pixels (starcast.kernels.features)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" (with linear warm-up) or "onecycle"
    warmup_epochs: int = 2
    patience: int = 15  # epochs without a better validation NLL (any member) before stopping
    beta: float = 0.5  # beta-NLL exponent (Seitzer et al. 2022); 0 is the plain Gaussian NLL
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one per member: initialisation and shuffle order
    bootstrap: bool = False  # resample the training set with replacement per member
    augment_copies: int = 2  # noisier copies of the training set (raw flux + noise, then preprocessed)
    augment_prob: float = 0.5  # chance that a training sample is drawn from a noisier copy
    augment_snr_min: float = 20.0  # lowest SNR a copy degrades a spectrum to
    threads: int = 0  # torch CPU threads (0 = torch's default)


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "coverage"  # "coverage" (68%/95% intervals) or "nll" (closed-form NLL optimum)
    samples: int = 32  # S used to calibrate (the deployed default)
    seed: int = 0
    ood_quantile: float = 0.995  # of held-out epistemic sigma (per SNR bin if the model sees it): OOD flag
    scale_label: str = ""  # a target whose network mean the SNR calibration's scale also follows ("": none)

    def label_index(self, targets) -> int | None:
        """The index of `scale_label` among `targets` (None without one)."""
        return list(targets).index(self.scale_label) if self.scale_label else None


@dataclass(frozen=True)
class TrainConfig:
    name: str
    output: str
    data: DataConfig
    grid: WavelengthGrid
    preprocess: dict
    architecture: ArchitectureConfig
    training: TrainingConfig
    calibration: CalibrationConfig
    source: str = ""  # the path the config was read from

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for the manifest's provenance)."""
        return {
            "name": self.name, "output": self.output, "data": asdict(self.data),
            "grid": self.grid.to_dict(), "preprocess": dict(self.preprocess),
            "architecture": asdict(self.architecture), "training": asdict(self.training),
            "calibration": asdict(self.calibration),
        }

    def data_hash(self) -> str:
        """sha256 of what determines the training data: the data section, grid and preprocessing."""
        key = {k: self.to_dict()[k] for k in ("data", "grid", "preprocess")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _section(cls, raw: dict, name: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {unknown} (known: {sorted(known)})")
    values = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        kind = (list, tuple) if isinstance(default, tuple) else (int, float) if type(default) is float \
            else type(default)
        if not isinstance(value, kind) or (isinstance(value, bool) and type(default) is not bool):
            expected = {tuple: "a list", dict: "a table", bool: "true or false", int: "an integer",
                        float: "a number", str: "a string"}[type(default)]
            raise ConfigError(f"{name}.{key} must be {expected}, got {value!r}")
        values[key] = tuple(value) if isinstance(default, tuple) else value
    return cls(**values)


def _grid(raw: dict) -> WavelengthGrid:
    try:
        return WavelengthGrid.from_dict(raw)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"[grid]: not a wavelength grid ({exc!r}); expected kind, start, step, n (or "
                          "values) and medium") from exc


TOP_LEVEL = ("name", "output", "data", "grid", "preprocess", "architecture", "training", "calibration")


def parse_config(raw: dict, source: str = "") -> TrainConfig:
    """Build and validate a `TrainConfig` from the parsed TOML dict."""
    where = f"config {source}: " if source else ""
    for key in ("name", "output", "grid"):
        if key not in raw:
            raise ConfigError(f"{where}missing top-level key {key!r}")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{where}unknown top-level keys or sections {unknown} (known: {list(TOP_LEVEL)})")
    try:
        cfg = TrainConfig(
            name=str(raw["name"]), output=str(raw["output"]),
            data=_section(DataConfig, raw.get("data", {}), "data"),
            grid=_grid(raw["grid"]), preprocess=dict(raw.get("preprocess", {})),
            architecture=_section(ArchitectureConfig, raw.get("architecture", {}), "architecture"),
            training=_section(TrainingConfig, raw.get("training", {}), "training"),
            calibration=_section(CalibrationConfig, raw.get("calibration", {}), "calibration"),
            source=source,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from exc
    _validate(cfg, where)
    return cfg


def _validate(cfg: TrainConfig, where: str) -> None:
    a, t, d = cfg.architecture, cfg.training, cfg.data
    checks = [
        (a.activation in ("relu", "silu"),
         f"architecture.activation must be relu or silu, got {a.activation!r}"),
        (0 <= a.dropout < 1, f"architecture.dropout must be in [0, 1), got {a.dropout}"),
        (a.members >= 1 and a.samples >= 1, "architecture.members and .samples must be >= 1"),
        (len(a.hidden) >= 1 and min(a.hidden) >= 1, "architecture.hidden needs at least one layer"),
        (len(t.seeds) == a.members, f"training.seeds needs one seed per member ({a.members}), "
                                    f"got {len(t.seeds)}"),
        (t.schedule in ("cosine", "onecycle"), f"training.schedule must be cosine or onecycle, "
                                               f"got {t.schedule!r}"),
        (t.epochs >= 1 and t.batch_size >= 1 and t.lr > 0, "training.epochs, batch_size, lr must be > 0"),
        (0 <= t.augment_prob <= 1, "training.augment_prob must be in [0, 1]"),
        (cfg.calibration.method in ("coverage", "nll"), "calibration.method must be coverage or nll"),
        (cfg.calibration.scale_label in ("", *d.targets),
         f"calibration.scale_label must be one of the targets {list(d.targets)} or empty, "
         f"got {cfg.calibration.scale_label!r}"),
        (not cfg.calibration.scale_label or "log10_snr" in a.features,
         "calibration.scale_label needs the SNR-conditional calibration: architecture.features must "
         "include log10_snr"),
        (len(d.split) == 3 and abs(sum(d.split) - 1) < 1e-6, "data.split must be 3 fractions summing to 1"),
        (bool(d.synth) + bool(d.catalog) + bool(d.grid) == 1,
         "[data] needs exactly one of `catalog` (a path), a [data.synth] or a [data.grid] table"),
        (len(d.targets) >= 1, "data.targets must name at least one label column"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}{message}")


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config (TOML). Raises `ConfigError` naming the file and the bad key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return parse_config(raw, source=str(path))
