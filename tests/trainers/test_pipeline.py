"""End to end: a tiny config trained through `starcast train`, and the exported bundle predicting,
through the engine's predictor, the numbers of the in-memory ensemble on the same dropout masks."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from starcast.engine.bundle import load_bundle
from starcast.engine.emulator import EMULATOR_FILE
from starcast.engine.predictor import load_model
from starcast.kernels import rng
from starcast.trainers.cli import train
from starcast.trainers.config import parse_config
from starcast.trainers.data import preprocess_table, source_table
from starcast.trainers.pipeline import train_from_config

from starcast.errors import OutputError

RAW = {
    "name": "tiny", "output": "unused",
    "data": {"synth": {"mode": "random", "n": 300, "seed": 3, "snr": [50.0, 300.0]}},
    "grid": {"kind": "linear", "start": 4010.0, "step": 2.0, "n": 391, "medium": "air"},
    "architecture": {"hidden": [32, 32], "dropout": 0.1, "members": 2, "samples": 4},
    "training": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "seeds": [0, 1], "warmup_epochs": 1,
                 "threads": 1},
    "calibration": {"samples": 4},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = parse_config(RAW)
    return cfg, train_from_config(cfg, output=tmp_path_factory.mktemp("b") / "tiny", progress=False)


def _in_memory_stats(result, x, ids, samples, seed, calibration):
    """Mean and variances from the in-memory torch module, masks from the kernels' RNG."""
    model, std = result.model, result.standardiser
    rows = rng.row_keys(seed, rng.id_keys(ids))
    h1 = model.first_layer(std.x(x))
    mus, variances = [], []
    with torch.no_grad():
        for s in range(samples):
            masks = [rng.keep_masks(rows, range(model.members), [s], layer, w.shape[1], model.dropout)
                     [:, :, 0].permute(1, 0, 2).float() for layer, w in enumerate(model.weights[1:], 1)]
            mu, var = model.rest(h1, masks)
            mus.append(mu.double())
            variances.append(var.double())
    mu, var = torch.stack(mus), torch.stack(variances)  # [S, M, B, K]
    mean = mu.mean(dim=(0, 1))
    scale = torch.from_numpy(std.y_std * calibration) ** 2
    return (mean.numpy() * std.y_std + std.y_mean, (var.mean(dim=(0, 1)) * scale).numpy(),
            (((mu - mean) ** 2).mean(dim=(0, 1)) * scale).numpy())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_exported_bundle_predicts_the_in_memory_ensemble(trained, backend):
    cfg, out = trained
    table = source_table(cfg).slice(0, 40)
    x, flags = preprocess_table(table, cfg, progress=False)
    assert not flags.any()
    model = load_model(out.path)
    samples = 4
    pred = model.predict(table, samples=samples, seed=5, backend=backend)
    calibration = np.array([t.calibration for t in model.targets])
    mean, var_a, var_e = _in_memory_stats(out.result, x, table.column("id").to_numpy(), samples, 5,
                                          calibration)
    for k, t in enumerate(cfg.data.targets):
        sigma = np.sqrt(var_a[:, k] + var_e[:, k])
        # DESIGN.md tolerance: mean within 1% of sigma, sigmas within 1% of themselves
        assert np.abs(pred.column(t).to_numpy() - mean[:, k]).max() <= 1e-3 * sigma.min()
        np.testing.assert_allclose(pred.column(f"{t}_err").to_numpy(), sigma, rtol=1e-3)
        np.testing.assert_allclose(pred.column(f"{t}_err_aleatoric").to_numpy(), np.sqrt(var_a[:, k]),
                                   rtol=1e-3)
        np.testing.assert_allclose(pred.column(f"{t}_err_epistemic").to_numpy(), np.sqrt(var_e[:, k]),
                                   rtol=1e-3, atol=1e-3 * sigma.min())


def test_manifest_carries_calibration_thresholds_and_provenance(trained):
    cfg, out = trained
    bundle = load_bundle(out.path)
    m = bundle.manifest
    assert [t["name"] for t in m["targets"]] == list(cfg.data.targets)
    assert all(t["calibration"] > 0 and t["min"] < t["max"] for t in m["targets"])
    assert set(m["ood"]["epistemic_sigma_threshold"]) == set(cfg.data.targets)
    assert m["provenance"]["epochs_run"] == 3 and len(m["provenance"]["losses"]) == 3
    assert m["provenance"]["data_sha256"] == cfg.data_hash()
    assert {"val", "test"} <= set(m["metrics"])
    assert (out.path / "report" / "training_log.csv").read_text().count("\n") == 4


def test_train_command_writes_a_loadable_bundle(tmp_path):
    out = tmp_path / "cli-bundle"
    lines = ['name = "cli"', f'output = "{out}"', "[data.synth]", 'mode = "random"', "n = 200",
             "seed = 4", "[grid]", 'kind = "linear"', "start = 4010.0", "step = 4.0", "n = 196",
             "[architecture]", "hidden = [16]", "members = 2", "samples = 2",
             "[training]", "epochs = 2", "batch_size = 64", "seeds = [0, 1]", "threads = 1",
             "[calibration]", "samples = 2"]
    (tmp_path / "c.toml").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(train, [str(tmp_path / "c.toml"), "--quiet"])
    assert res.exit_code == 0, res.output
    first = load_bundle(out).manifest
    assert first["name"] == "cli"

    # run twice, the model is kept: refused before any training, the bundle untouched
    res = CliRunner().invoke(train, [str(tmp_path / "c.toml"), "--quiet"])
    assert isinstance(res.exception, OutputError) and "--overwrite" in str(res.exception)
    assert load_bundle(out).manifest["bundle_sha256"] == first["bundle_sha256"]
    # --overwrite replaces every file of the old bundle: none of them is left beside the new one
    (out / EMULATOR_FILE).write_bytes(b"an earlier model's emulator")
    res = CliRunner().invoke(train, [str(tmp_path / "c.toml"), "--quiet", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / EMULATOR_FILE).exists() and load_bundle(out).manifest["name"] == "cli"
    # a folder holding other files is not a bundle to replace, --overwrite or not
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(train, [str(tmp_path / "c.toml"), "--quiet", "--overwrite"])
    assert isinstance(res.exception, OutputError) and "notes.txt" in str(res.exception)
    assert (out / "notes.txt").read_text() == "mine"
    # --out and --epochs override the config's output and training.epochs
    res = CliRunner().invoke(train, [str(tmp_path / "c.toml"), "--quiet", "--out", str(tmp_path / "other"),
                                     "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "other").manifest["provenance"]["epochs_run"] == 1
    assert first["provenance"]["epochs_run"] == 2 and (out / "notes.txt").read_text() == "mine"


def test_manifest_records_the_dropout_rate_the_masks_apply(trained):
    cfg, out = trained
    arch = load_bundle(out.path).architecture
    assert arch["mask_bits"] == rng.MASK_BITS
    assert arch["dropout_effective"] == rng.effective_p(cfg.architecture.dropout) != 0.1  # quantised
