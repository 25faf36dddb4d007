"""The model-bundle format: round trip, and refusal of tampered, mismatched or unknown bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from starcast.catalogs.schema import WavelengthGrid
from starcast.engine import bundle as bundle_mod
from starcast.engine.bundle import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_bundle,
    manifest_sha256,
    save_bundle,
    seal,
)

from starcast.errors import ModelError


def _edit_manifest(path, reseal=True, **changes):
    """Change top-level manifest keys; `reseal`: record the new manifest hash (without the checks
    that `seal` makes), so that loading reaches the check under test."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(changes)
    _write(path, manifest, reseal)


def _write(path, manifest, reseal=True):
    if reseal:
        manifest["bundle_sha256"] = manifest_sha256(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_round_trip_preserves_weights_and_manifest(tmp_path):
    rng = np.random.default_rng(1)
    layers = [(rng.normal(size=(2, 5, 16)), rng.normal(size=(2, 16))),
              (rng.normal(size=(2, 16, 4)), rng.normal(size=(2, 4)))]
    grid = WavelengthGrid("log", 4000.0, 1e-4, 5)
    targets = [{"name": n, "unit": "u", "mean": 1.0, "std": 2.0, "min": 0.0, "max": 3.0,
                "calibration": 1.5} for n in ("teff", "logg")]
    manifest = {"name": "rt", "targets": targets, "grid": grid, "preprocess": {"continuum": "poly"},
                "architecture": {"input_dim": 5, "hidden": [16], "activation": "relu", "dropout": 0.2,
                                 "members": 2, "samples": 8, "var_eps": 1e-6},
                "ood": {"epistemic_sigma_threshold": {"teff": 3.0}}, "provenance": {"seed": 3}}
    path = save_bundle(tmp_path / "rt", layers, manifest)

    b = load_bundle(path)
    assert b.path == path and b.name == "rt"
    for (w, bias), (w0, b0) in zip(b.layers, layers, strict=True):
        assert w.dtype == torch.float32
        np.testing.assert_array_equal(w.numpy(), w0.astype(np.float32))
        np.testing.assert_array_equal(bias.numpy(), b0.astype(np.float32))
    assert b.grid == grid
    assert b.target_names == ["teff", "logg"] and b.targets[0].calibration == 1.5
    assert b.preprocess == {"continuum": "poly"} and b.architecture["samples"] == 8
    assert {n: t.to_manifest() for n, t in b.epistemic_thresholds.items()} == {"teff": 3.0}
    assert b.manifest["schema_version"] == 1
    assert b.weights_sha256 == bundle_mod.sha256_file(path / WEIGHTS_FILE)


def test_weights_file_holds_no_pickle(tiny_bundle):
    header_len = int.from_bytes((tiny_bundle / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((tiny_bundle / WEIGHTS_FILE).read_bytes()[8:8 + header_len])
    assert {k for k in header if k != "__metadata__"} == {
        f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")}
    assert header["layers.0.weight"]["shape"] == [3, 200, 32]


def test_tampered_weights_are_refused(tiny_bundle):
    data = bytearray((tiny_bundle / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    (tiny_bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_schema_version_is_refused(tiny_bundle, version):
    _edit_manifest(tiny_bundle, schema_version=version)
    with pytest.raises(ModelError, match="schema_version"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, MANIFEST_FILE])
def test_missing_file_is_refused(tiny_bundle, missing):
    (tiny_bundle / missing).unlink()
    with pytest.raises(ModelError, match=f"{missing} is missing"):
        load_bundle(tiny_bundle)


def test_architecture_inconsistent_with_weights_is_refused(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    manifest["architecture"]["hidden"] = [32, 64]
    _write(tiny_bundle, manifest)
    with pytest.raises(ModelError, match="layer 1"):
        load_bundle(tiny_bundle)


def test_grid_inconsistent_with_input_dim_is_refused(tiny_bundle):
    _edit_manifest(tiny_bundle, grid=WavelengthGrid.linear(4000.0, 1.0, 100).to_dict())
    with pytest.raises(ModelError, match="input_dim"):
        load_bundle(tiny_bundle)


def test_input_centre_is_optional_and_must_give_one_finite_number_per_input(tiny_bundle):
    assert load_bundle(tiny_bundle).input_centre is None
    _edit_manifest(tiny_bundle, input_centre=[1.0] * 199 + [0.5])
    assert load_bundle(tiny_bundle).input_centre.tolist() == [1.0] * 199 + [0.5]
    for bad in ([1.0] * 199, [1.0] * 199 + ["x"], 1.0):
        _edit_manifest(tiny_bundle, input_centre=bad)
        with pytest.raises(ModelError, match="input_centre"):
            load_bundle(tiny_bundle)


def test_save_refuses_layers_that_disagree_with_architecture(tiny_bundle, tmp_path):
    good = load_bundle(tiny_bundle)
    with pytest.raises(ModelError, match="members=3"):
        save_bundle(tmp_path / "bad", [(w[:2], b[:2]) for w, b in good.layers], good.manifest)
    assert not (tmp_path / "bad").exists()


def test_names_resolve_to_the_package_models_folder(tmp_path, monkeypatch, bundle_factory):
    monkeypatch.setattr(bundle_mod, "models_dir", lambda: tmp_path)
    bundle_factory(tmp_path / "ob-test")
    assert load_bundle("ob-test").path == tmp_path / "ob-test"


def test_unknown_name_lists_available_models(tmp_path, monkeypatch, bundle_factory):
    monkeypatch.setattr(bundle_mod, "models_dir", lambda: tmp_path)
    bundle_factory(tmp_path / "ob-alpha")
    bundle_factory(tmp_path / "ob-beta")
    with pytest.raises(ModelError, match="ob-alpha, ob-beta"):
        load_bundle("ob-gamma")


def test_models_dir_is_inside_the_installed_package():
    import starcast

    assert bundle_mod.models_dir().parent == bundle_mod.Path(starcast.__file__).parent


def test_an_edited_manifest_is_refused_until_resealed(tiny_bundle):
    original = load_bundle(tiny_bundle)
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    manifest["targets"][0]["calibration"] *= 3  # sigmas x3 under the genuine model's hash
    _write(tiny_bundle, manifest, reseal=False)
    with pytest.raises(ModelError, match="bundle_sha256 says .* edited after export"):
        load_bundle(tiny_bundle)
    new_hash = seal(tiny_bundle)  # the one-liner an export (or a deliberate edit) calls
    resealed = load_bundle(tiny_bundle)
    assert resealed.sha256 == new_hash != original.sha256
    assert resealed.weights_sha256 == original.weights_sha256 and resealed.targets[0].calibration == 3.0


def _target(i, **changes):
    def edit(m):
        m["targets"][i].update(changes)
    return edit


def _arch(**changes):
    def edit(m):
        m["architecture"].update(changes)
    return edit


@pytest.mark.parametrize("edit, key", [
    (_target(0, std=0.0), r"targets\[0\]\.std"),
    (_target(1, std=-5.0), r"targets\[1\]\.std"),
    (_target(1, min=4.75, max=4.75), r"targets\[1\]\.min must be below"),
    (_target(2, calibration=-1.0), r"targets\[2\]\.calibration"),
    (_target(0, calibration={"method": "snr", "scale": [1.0, 0.0]}), r"targets\[0\]\.calibration"),
    (_target(0, mean="25000"), r"targets\[0\]\.mean"),
    (_arch(hidden=[32, 0]), r"architecture\.hidden"),
    (_arch(members=2.5), r"architecture\.members"),
    (_arch(var_eps=0.0), r"architecture\.var_eps"),
    (_arch(activation="tanh"), r"architecture\.activation"),
    (lambda m: m.update(ood={"epistemic_sigma_threshold": {"teff": -1.0}}),
     r"ood\.epistemic_sigma_threshold\.teff"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "network_weight": {"teff": [1.5], "logg": [0.5], "vsini": [0.0]}}),
     r"calibration' network_weight"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "chi2_inflation": {"teff": 1.0, "logg": -0.5, "vsini": 0.0}}),
     r"calibration' chi2_inflation"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "fit_variance_weight": {"teff": 1.0, "logg": -1.0, "vsini": 0.0}}),
     r"calibration' fit_variance_weight"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "defect_variance": {"teff": 0.5, "logg": 1.5, "vsini": 0.0}}),
     r"calibration' defect_variance"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "network_weight": {t: [0.5] for t in ("teff", "logg", "vsini")},
                                     "network_gain": {"ripple": {"teff": 1.0, "logg": -2.0, "vsini": 0.0},
                                                      "other": {"teff": 1.0, "logg": 0.0, "vsini": 0.0}}}),
     r"calibration' network_gain"),
    (lambda m: m.update(calibration={"kind": "snr", "feature": "log10_snr", "log10_snr_knots": [1.0],
                                     "scale": {t: [1.0] for t in ("teff", "logg", "vsini")},
                                     "floor": {t: 0 for t in ("teff", "logg", "vsini")},
                                     "label_scale": {"target": "vsini", "knots": [50.0, 10.0],
                                                     "scale": {t: [1.0, 1.0] for t in ("teff", "logg")}
                                                     | {"vsini": [1.0, 1.0]}}}),
     r"calibration' label_scale"),
], ids=["std0", "std<0", "min=max", "calibration<0", "scale0", "mean-str", "hidden0", "members-float",
        "var_eps0", "activation", "ood<0", "weight>1", "inflation<0", "fit-weight<0", "defect>1",
        "gain<0", "label-knots"])
def test_bad_values_are_refused_naming_the_key(tiny_bundle, edit, key):
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    edit(manifest)
    _write(tiny_bundle, manifest)  # hashes right, values wrong: an exporter's bug, not tampering
    with pytest.raises(ModelError, match=key):
        load_bundle(tiny_bundle)
    with pytest.raises(ModelError, match=key):
        seal(tiny_bundle)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(tiny_bundle, text):
    raw = (tiny_bundle / MANIFEST_FILE).read_text()
    (tiny_bundle / MANIFEST_FILE).write_text(raw.replace('"mean": 25000.0', f'"mean": {text}', 1))
    with pytest.raises(ModelError, match=f"non-finite number {text}"):
        load_bundle(tiny_bundle)


def test_unknown_sections_are_covered_by_the_hash_but_not_checked(tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    manifest["input"] = {"medium": "air", "resolving_power": 6000}
    manifest["notes"] = {"observer": "anyone", "scale": [-1, "not checked"]}
    layers = load_bundle(tiny_bundle).layers
    save_bundle(tiny_bundle, layers, manifest)
    assert load_bundle(tiny_bundle).manifest["input"]["resolving_power"] == 6000
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    manifest["input"]["resolving_power"] = 60000
    _write(tiny_bundle, manifest, reseal=False)
    with pytest.raises(ModelError, match="bundle_sha256"):
        load_bundle(tiny_bundle)


def test_save_refuses_bad_values_before_writing(tiny_bundle, tmp_path):
    good = load_bundle(tiny_bundle)
    manifest = json.loads(json.dumps(good.manifest))
    manifest["targets"][0]["std"] = float("nan")
    with pytest.raises(ModelError, match=r"targets\[0\]\.std"):
        save_bundle(tmp_path / "bad", good.layers, manifest)
    assert not (tmp_path / "bad").exists()


def test_the_shipped_model_is_sealed():
    b = load_bundle("ob-default")
    assert b.sha256 == manifest_sha256(b.manifest) and b.weights_sha256 == bundle_mod.sha256_file(
        b.path / WEIGHTS_FILE)
