"""The README's main command, end to end on a tiny model: synthesise, predict, summarise, score."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from starcast.cli import cli
from tests.engine.conftest import make_bundle


def test_demo_predicts_every_synthesised_spectrum_and_writes_plots(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle" / "tiny-test")
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--n", "40", "--model", str(bundle)])
    assert result.exit_code == 0, result.output
    results = pq.read_table(out / "predictions" / "results")  # a plain Parquet dataset
    truth = pq.read_table(out / "catalog", columns=["id", "teff"]).to_pydict()
    assert sorted(results.column("id").to_pylist()) == sorted(truth["id"])
    report = json.loads((out / "eval" / "report.json").read_text())
    true_teff = dict(zip(truth["id"], truth["teff"], strict=True))
    scored = [(t, true_teff[i]) for i, t in zip(results["id"].to_pylist(), results["teff"].to_pylist(),
                                                strict=True) if t is not None]
    error = np.array([t - true for t, true in scored])
    assert report["rows"]["scored"] == len(scored) > 0
    assert report["targets"]["teff"]["rmse"] == pytest.approx(np.sqrt(np.mean(error**2)))
    assert list((out / "eval").glob("*.png"))
    assert "metrics and plots" in result.output


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--n", "5"])
    assert result.exit_code != 0
    assert "not empty" in str(result.exception) + result.output
