"""The model-bundle format (DESIGN.md, "Model bundle"): a directory with `model.safetensors` and
`manifest.json`.

Weights are safetensors (`layers.{i}.weight` [M, in, out], `layers.{i}.bias` [M, out]; hidden layers
first, the output head last with 2K outputs), the manifest is plain JSON carrying the sha256 of the
weights file. An optional `emulator.safetensors` (its own sha256 in the manifest's `emulator` entry,
see `emulator.py`) is verified with the rest. Nothing here unpickles or executes code. Inference lives
in `predictor.py`, not here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..catalogs.schema import WavelengthGrid
from ..errors import ModelError
from .calibration import Calibration
from .emulator import Emulator, load_emulator

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
TARGET_KEYS = ("name", "unit", "mean", "std", "min", "max", "calibration")
OPTIONAL_TARGET_KEYS = ("physical_min", "upper_limit_below")
ARCHITECTURE_KEYS = ("input_dim", "hidden", "activation", "dropout", "members", "samples", "var_eps")
REQUIRED_KEYS = ("schema_version", "name", "targets", "grid", "preprocess", "architecture",
                 "weights_sha256")

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Target:
    """One predicted quantity: label mean/std (de-standardisation), training range and the
    calibration factor (a scale on sigma), all in the target's physical `unit`."""

    name: str
    unit: str
    mean: float
    std: float
    min: float
    max: float
    calibration: float
    physical_min: float | None = None  # means below it are reported as it (v sin i >= 0)
    upper_limit_below: float | None = None  # means below it are upper limits (flag UPPER_LIMIT)


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified model bundle. `manifest` is the plain JSON dict; the properties are typed
    views of it. `layers` are float32 CPU tensors `[(W [M,in,out], b [M,out]), ...]`."""

    path: Path
    manifest: dict
    layers: Layers
    emulator: Emulator | None = None  # the manifest's optional `emulator` (see `engine.emulator`)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def weights_sha256(self) -> str:
        return self.manifest["weights_sha256"]

    @property
    def targets(self) -> list[Target]:
        return [Target(**{k: t[k] for k in TARGET_KEYS + OPTIONAL_TARGET_KEYS if k in t})
                for t in self.manifest["targets"]]

    @property
    def target_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["targets"]]

    @property
    def grid(self) -> WavelengthGrid:
        return WavelengthGrid.from_json(json.dumps(self.manifest["grid"]))

    @property
    def preprocess(self) -> dict:
        return self.manifest["preprocess"]

    @property
    def architecture(self) -> dict:
        return self.manifest["architecture"]

    @property
    def input(self) -> dict:
        """What input the model needs: medium, resolving power, wavelength range, and the scalar
        `features` (see `starcast.kernels.features`) appended to the spectrum, in order."""
        return dict(self.manifest.get("input") or {})

    @property
    def features(self) -> list[str]:
        return list(self.input.get("features") or [])

    @property
    def calibration(self) -> Calibration | None:
        """The SNR-conditional calibration applied after the kernel (None: the per-target factors only)."""
        entry = self.manifest.get("calibration")
        return None if entry is None else Calibration.from_manifest(entry, self.target_names)

    @property
    def epistemic_thresholds(self) -> dict[str, float]:
        """Per-target epistemic sigma (physical units) above which a row is flagged HIGH_EPISTEMIC."""
        return dict((self.manifest.get("ood") or {}).get("epistemic_sigma_threshold") or {})


def models_dir() -> Path:
    """The folder of models shipped with the package (`starcast/models/`)."""
    import starcast

    return Path(starcast.__file__).parent / "models"


def available_models() -> list[str]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A bare name (no path separator) is a shipped model in `starcast/models/<name>/`; anything
    else is a directory path."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelError(f"model bundle {path} is not a directory (expected a folder holding "
                             f"{WEIGHTS_FILE} and {MANIFEST_FILE})")
        return path
    path = models_dir() / text
    if not (path / MANIFEST_FILE).is_file():
        shipped = ", ".join(available_models()) or "none"
        raise ModelError(f"no model named {text!r} ships with starcast (available: {shipped}); "
                         f"to load a bundle directory, pass a path such as ./{text}")
    return path


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_bundle(path: str | os.PathLike, layers: Sequence[tuple], manifest: dict) -> Path:
    """Write `layers` (numpy arrays or torch tensors, stored as float32) and `manifest` to the
    directory `path` (created if needed, files overwritten); fills `schema_version` and
    `weights_sha256`. The manifest's `grid` may be a `WavelengthGrid` or its JSON dict.
    Returns the bundle directory. Raises `ModelError` if the shapes disagree with the manifest."""
    path = Path(path)
    tensors = [(_as_tensor(w), _as_tensor(b)) for w, b in layers]
    manifest = dict(manifest)
    if isinstance(manifest.get("grid"), WavelengthGrid):
        manifest["grid"] = json.loads(manifest["grid"].to_json())
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["weights_sha256"] = ""
    _check_manifest(manifest, path)
    _check_shapes(tensors, manifest, path)
    _emulator(manifest, path)
    blob = save_safetensors({f"layers.{i}.{kind}": t for i, (w, b) in enumerate(tensors)
                             for kind, t in (("weight", w), ("bias", b))})
    manifest["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    json.dumps(manifest, allow_nan=False)  # refuse NaN/inf before anything is written
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_FILE).write_bytes(blob)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path


def load_bundle(name_or_path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle: the manifest's schema version and keys, the sha256 of the weights
    file, and the layer shapes against the architecture. Any mismatch raises `ModelError`."""
    path = resolve(name_or_path)
    manifest_file, weights_file = path / MANIFEST_FILE, path / WEIGHTS_FILE
    for f in (manifest_file, weights_file):
        if not f.is_file():
            raise ModelError(f"model bundle {path}: {f.name} is missing; a bundle needs both "
                             f"{MANIFEST_FILE} and {WEIGHTS_FILE} (re-export it with save_bundle)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model bundle {path}: {MANIFEST_FILE} is not valid JSON ({exc})") from exc
    _check_manifest(manifest, path)
    blob = weights_file.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise ModelError(f"model bundle {path}: sha256 of {WEIGHTS_FILE} is {digest}, but the manifest "
                         f"expects {manifest['weights_sha256']}; the weights were modified or belong to "
                         f"another model — restore the original files or re-export the bundle")
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:
        raise ModelError(f"model bundle {path}: {WEIGHTS_FILE} is not a valid safetensors file "
                         f"({exc})") from exc
    layers = _layers_from_tensors(tensors, path)
    _check_shapes(layers, manifest, path)
    return Bundle(path=path, manifest=manifest, layers=layers, emulator=_emulator(manifest, path))


def _emulator(manifest: dict, path: Path) -> Emulator | None:
    """The verified emulator the manifest names (its file must already be in `path`), or None."""
    entry = manifest.get("emulator")
    if entry is None:
        return None
    return load_emulator(path, entry, len(WavelengthGrid.from_json(json.dumps(manifest["grid"])).values()))


def _as_tensor(a) -> torch.Tensor:
    t = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    return t.to(torch.float32).contiguous()


def _layers_from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Layers:
    n = len(tensors) // 2
    expected = {f"layers.{i}.{kind}" for i in range(n) for kind in ("weight", "bias")}
    if set(tensors) != expected or n == 0:
        raise ModelError(f"model bundle {path}: {WEIGHTS_FILE} holds tensors {sorted(tensors)}, "
                         f"expected layers.{{i}}.weight and layers.{{i}}.bias for i = 0..{max(n - 1, 0)}")
    return [(tensors[f"layers.{i}.weight"].float(), tensors[f"layers.{i}.bias"].float())
            for i in range(n)]


def _check_manifest(manifest: dict, path: Path) -> None:
    where = f"model bundle {path}: {MANIFEST_FILE}"
    if not isinstance(manifest, dict):
        raise ModelError(f"{where} must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelError(f"{where} has schema_version {version!r}; this starcast reads schema_version "
                         f"{SCHEMA_VERSION} only — upgrade starcast or re-export the bundle")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelError(f"{where} lacks the keys {missing}")
    targets = manifest["targets"]
    if not isinstance(targets, list) or not targets:
        raise ModelError(f"{where}: 'targets' must be a non-empty list")
    for i, t in enumerate(targets):
        lacks = [k for k in TARGET_KEYS if k not in t]
        if lacks:
            raise ModelError(f"{where}: target {i} lacks {lacks}")
        if not (t["std"] > 0 and t["calibration"] > 0 and t["min"] <= t["max"]):
            raise ModelError(f"{where}: target {t['name']!r} needs std > 0, calibration > 0 and "
                             f"min <= max (got std={t['std']}, calibration={t['calibration']}, "
                             f"range [{t['min']}, {t['max']}])")
    arch = manifest["architecture"]
    lacks = [k for k in ARCHITECTURE_KEYS if k not in arch]
    if lacks:
        raise ModelError(f"{where}: 'architecture' lacks {lacks}")
    if not 0 <= arch["dropout"] < 1:
        raise ModelError(f"{where}: architecture.dropout must be in [0, 1), got {arch['dropout']}")
    try:
        n = len(WavelengthGrid.from_json(json.dumps(manifest["grid"])).values())
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: 'grid' is not a wavelength grid ({exc})") from exc
    features = (manifest.get("input") or {}).get("features") or []
    if n + len(features) != arch["input_dim"]:
        raise ModelError(f"{where}: the grid has {n} pixels and {len(features)} input features but "
                         f"architecture.input_dim is {arch['input_dim']}")
    if manifest.get("calibration") is not None:
        Calibration.from_manifest(manifest["calibration"], [t["name"] for t in targets])


def _check_shapes(layers: Layers, manifest: dict, path: Path) -> None:
    arch = manifest["architecture"]
    m, k = arch["members"], len(manifest["targets"])
    widths = [arch["input_dim"], *arch["hidden"], 2 * k]
    if len(layers) != len(widths) - 1:
        raise ModelError(f"model bundle {path}: {len(layers)} weight layers, but the architecture "
                         f"(hidden {arch['hidden']} + output head) needs {len(widths) - 1}")
    for i, (w, b) in enumerate(layers):
        want_w, want_b = (m, widths[i], widths[i + 1]), (m, widths[i + 1])
        if tuple(w.shape) != want_w or tuple(b.shape) != want_b:
            raise ModelError(f"model bundle {path}: layer {i} has weight {tuple(w.shape)} and bias "
                             f"{tuple(b.shape)}, but the architecture (members={m}, widths {widths}) "
                             f"needs {want_w} and {want_b}")
