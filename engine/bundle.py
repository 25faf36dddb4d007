"""The model-bundle format (DESIGN.md, "Model bundle"): a directory with `model.safetensors` and
`manifest.json`.

Weights are safetensors (`layers.{i}.weight` [M, in, out], `layers.{i}.bias` [M, out]; hidden layers
first, the output head last with 2K outputs), the manifest is plain JSON carrying the sha256 of the
weights file (`weights_sha256`) and `bundle_sha256`, the sha256 of the manifest's canonical JSON
(keys sorted, no spaces, UTF-8) without that key: it covers every number of the manifest and, through
`weights_sha256`, the weights. `save_bundle` and `seal` write both; loading checks both, then the
values of the keys it knows (finite, positive scales, sane architecture). An optional
`emulator.safetensors` (its own sha256 in the manifest's `emulator` entry, see `emulator.py`) is
verified with the rest. Nothing here unpickles or executes code. Inference lives in `predictor.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from ..kernels.reference import ACTIVATIONS
from .calibration import Calibration
from .emulator import Emulator, Threshold, load_emulator

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
REPORT_DIR = "report"  # the model's evaluation report and training log, beside the weights
TARGET_KEYS = ("name", "unit", "mean", "std", "min", "max", "calibration")
OPTIONAL_TARGET_KEYS = ("physical_min", "upper_limit_below")
ARCHITECTURE_KEYS = ("input_dim", "hidden", "activation", "dropout", "members", "samples", "var_eps")
REQUIRED_KEYS = ("schema_version", "name", "targets", "grid", "preprocess", "architecture",
                 "weights_sha256", "bundle_sha256")
_SEAL_HINT = "re-export the bundle, or re-seal it with starcast.engine.bundle.seal(path) if the edit is yours"
INPUT_CENTRE = "input_centre"  # optional: the training mean of each input (input_dim floats)

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
    upper_limit_below: float | None = None  # means below it (or Fit.broadened) are upper limits: UPPER_LIMIT


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
    def sha256(self) -> str:
        """The model's identity: `bundle_sha256`, over the manifest and (through its hash) the weights."""
        return self.manifest["bundle_sha256"]

    @property
    def targets(self) -> list[Target]:
        return [Target(**{k: t[k] for k in TARGET_KEYS + OPTIONAL_TARGET_KEYS if k in t})
                for t in self.manifest["targets"]]

    @property
    def target_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["targets"]]

    @property
    def grid(self) -> WavelengthGrid:
        return WavelengthGrid.from_dict(self.manifest["grid"])

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
    def input_centre(self) -> np.ndarray | None:
        """The mean of each network input over the training set (float64 [input_dim]), or None when
        the manifest has no `input_centre`. Only the GPU kernel's rounding uses it (see
        `kernels.packing.pack_weights`): the model's function does not depend on it."""
        centre = self.manifest.get(INPUT_CENTRE)
        return None if centre is None else np.asarray(centre, dtype=np.float64)

    @property
    def epistemic_thresholds(self) -> dict[str, Threshold]:
        """Per target, the epistemic sigma (physical units) above which a row is flagged HIGH_EPISTEMIC:
        one number, or a table of the row's log10 SNR (`Threshold`, SNR alone)."""
        return _epistemic_thresholds(self.manifest, f"model bundle {self.path}: {MANIFEST_FILE}")


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
    directory `path` (created if needed, files overwritten); fills `schema_version`, `weights_sha256`
    and `bundle_sha256`. The manifest's `grid` may be a `WavelengthGrid` or its JSON dict.
    Returns the bundle directory. Raises `ModelError` if the shapes or values are not valid."""
    path = Path(path)
    tensors = [(_as_tensor(w), _as_tensor(b)) for w, b in layers]
    manifest = dict(manifest)
    if isinstance(manifest.get("grid"), WavelengthGrid):
        manifest["grid"] = manifest["grid"].to_dict()
    manifest["schema_version"] = SCHEMA_VERSION
    _emulator(manifest, path)
    blob = save_safetensors({f"layers.{i}.{kind}": t for i, (w, b) in enumerate(tensors)
                             for kind, t in (("weight", w), ("bias", b))})
    manifest = _sealed(manifest, hashlib.sha256(blob).hexdigest(), path)
    _check_shapes(tensors, manifest, path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_FILE).write_bytes(blob)
    _write_manifest(path, manifest)
    return path


def seal(path: str | os.PathLike) -> str:
    """Re-seal the bundle directory `path` after its manifest was edited (e.g. a new calibration):
    recompute `weights_sha256` from the weights file and `bundle_sha256` over the manifest, check
    the values and shapes, rewrite `manifest.json`. Returns the new `bundle_sha256`."""
    path = Path(path)
    manifest = _read_manifest(path)
    blob = (path / WEIGHTS_FILE).read_bytes()
    manifest = _sealed(manifest, hashlib.sha256(blob).hexdigest(), path)
    _check_shapes(_layers_from_tensors(_load_tensors(blob, path), path), manifest, path)
    _emulator(manifest, path)
    _write_manifest(path, manifest)
    return manifest["bundle_sha256"]


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON of `manifest` without `bundle_sha256` (what that key records)."""
    body = {k: v for k, v in manifest.items() if k != "bundle_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_bundle(name_or_path: str | os.PathLike) -> Bundle:
    """Load and verify a bundle: the manifest's schema version, keys and values, the sha256 of the
    weights file and of the manifest, and the layer shapes against the architecture. Any mismatch
    raises `ModelError` naming the file or key."""
    path = resolve(name_or_path)
    manifest = _read_manifest(path)
    _check_manifest(manifest, path)
    blob = (path / WEIGHTS_FILE).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise ModelError(f"model bundle {path}: sha256 of {WEIGHTS_FILE} is {digest}, but the manifest "
                         f"expects {manifest['weights_sha256']}; the weights were modified or belong to "
                         f"another model — restore the original files or re-export the bundle")
    digest = manifest_sha256(manifest)
    if digest != manifest["bundle_sha256"]:
        raise ModelError(f"model bundle {path}: the sha256 of {MANIFEST_FILE} is {digest}, but its "
                         f"bundle_sha256 says {manifest['bundle_sha256']}; the manifest was edited after "
                         f"export — restore it, {_SEAL_HINT}")
    layers = _layers_from_tensors(_load_tensors(blob, path), path)
    _check_shapes(layers, manifest, path)
    return Bundle(path=path, manifest=manifest, layers=layers, emulator=_emulator(manifest, path))


def _read_manifest(path: Path) -> dict:
    manifest_file, weights_file = path / MANIFEST_FILE, path / WEIGHTS_FILE
    for f in (manifest_file, weights_file):
        if not f.is_file():
            raise ModelError(f"model bundle {path}: {f.name} is missing; a bundle needs both "
                             f"{MANIFEST_FILE} and {WEIGHTS_FILE} (re-export it with save_bundle)")
    try:
        return json.loads(manifest_file.read_text(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model bundle {path}: {MANIFEST_FILE} is not valid JSON ({exc})") from exc
    except ValueError as exc:
        raise ModelError(f"model bundle {path}: {MANIFEST_FILE} holds {exc}; every number must be "
                         f"finite") from exc


def _no_constant(name: str):
    raise ValueError(f"the non-finite number {name}")


def _sealed(manifest: dict, weights_sha256: str, path: Path) -> dict:
    """`manifest` with both hashes filled, after its values were checked."""
    manifest = {**manifest, "weights_sha256": weights_sha256, "bundle_sha256": ""}
    _check_manifest(manifest, path)
    try:
        manifest["bundle_sha256"] = manifest_sha256(manifest)
    except ValueError as exc:  # NaN or infinity somewhere (allow_nan=False)
        raise ModelError(f"model bundle {path}: the manifest holds a non-finite number ({exc})") from exc
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def _load_tensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(blob)
    except SafetensorError as exc:
        raise ModelError(f"model bundle {path}: {WEIGHTS_FILE} is not a valid safetensors file "
                         f"({exc})") from exc


def _emulator(manifest: dict, path: Path) -> Emulator | None:
    """The verified emulator the manifest names (its file must already be in `path`), or None."""
    entry = manifest.get("emulator")
    if entry is None:
        return None
    return load_emulator(path, entry, WavelengthGrid.from_dict(manifest["grid"]).values())


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
        key = f"targets[{i}]"
        if not isinstance(t["name"], str) or not t["name"] or not isinstance(t["unit"], str):
            raise ModelError(f"{where}: {key} needs a non-empty string name and a string unit")
        _require(_real(t["mean"]), where, f"{key}.mean", "a finite number", t["mean"])
        _require(_real(t["std"]) and t["std"] > 0, where, f"{key}.std", "a finite number > 0", t["std"])
        for bound in ("min", "max"):
            _require(_real(t[bound]), where, f"{key}.{bound}", "a finite number", t[bound])
        _require(t["min"] < t["max"], where, f"{key}.min", f"below {key}.max ({t['max']})", t["min"])
        _check_scales(t["calibration"], where, f"{key}.calibration")
    arch = manifest["architecture"]
    lacks = [k for k in ARCHITECTURE_KEYS if k not in arch]
    if lacks:
        raise ModelError(f"{where}: 'architecture' lacks {lacks}")
    for k in ("input_dim", "members", "samples"):
        _require(_count(arch[k]), where, f"architecture.{k}", "a positive integer", arch[k])
    hidden = arch["hidden"]
    _require(isinstance(hidden, list) and all(_count(h) for h in hidden), where, "architecture.hidden",
             "a list of positive integers", hidden)
    _require(_real(arch["dropout"]) and 0 <= arch["dropout"] < 1, where, "architecture.dropout",
             "in [0, 1)", arch["dropout"])
    _require(_real(arch["var_eps"]) and arch["var_eps"] > 0, where, "architecture.var_eps",
             "a finite number > 0", arch["var_eps"])
    _require(arch["activation"] in ACTIVATIONS, where, "architecture.activation",
             f"one of {sorted(ACTIVATIONS)}", arch["activation"])
    for name, threshold in _epistemic_thresholds(manifest, where).items():
        values = threshold.values
        _require(np.isfinite(values).all() and (values > 0).all(), where,
                 f"ood.epistemic_sigma_threshold.{name}", "a number > 0 or a table of them",
                 threshold.to_manifest())
    try:
        n = len(WavelengthGrid.from_dict(manifest["grid"]).values())
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: 'grid' is not a wavelength grid ({exc})") from exc
    features = (manifest.get("input") or {}).get("features") or []
    if n + len(features) != arch["input_dim"]:
        raise ModelError(f"{where}: the grid has {n} pixels and {len(features)} input features but "
                         f"architecture.input_dim is {arch['input_dim']}")
    if manifest.get("calibration") is not None:
        Calibration.from_manifest(manifest["calibration"], [t["name"] for t in targets])
    centre = manifest.get(INPUT_CENTRE)
    if centre is not None and not (isinstance(centre, list) and len(centre) == arch["input_dim"]
                                   and all(isinstance(v, int | float) and np.isfinite(v) for v in centre)):
        raise ModelError(f"{where}: '{INPUT_CENTRE}' must be a list of {arch['input_dim']} finite numbers "
                         f"(the training mean of each input)")


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require(ok: bool, where: str, key: str, expected: str, got) -> None:
    if not ok:
        raise ModelError(f"{where}: {key} must be {expected}, got {got!r}")


def _epistemic_thresholds(manifest: dict, where: str) -> dict[str, Threshold]:
    """The manifest's `ood.epistemic_sigma_threshold`, per target (`ModelError` naming `where` for one
    that is neither a number nor a table of log10 SNR)."""
    table = (manifest.get("ood") or {}).get("epistemic_sigma_threshold") or {}
    return {name: Threshold.from_manifest(value, [], where, key=f"ood.epistemic_sigma_threshold.{name}")
            for name, value in table.items()}


def _check_scales(value, where: str, key: str) -> None:
    """A per-target calibration is a scale on sigma, a finite number > 0 (the richer, SNR-conditional
    calibration is the manifest's top-level `calibration`, checked by `Calibration.from_manifest`)."""
    _require(_real(value) and value > 0, where, key, "a finite number > 0 (a scale on sigma)", value)


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
