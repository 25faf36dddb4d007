"""The README's main command, end to end on a tiny model: synthesise, predict, summarise, score."""

from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from starcast.cli import cli
from tests.engine.conftest import make_bundle


def test_demo_predicts_every_synthesised_spectrum_and_writes_plots(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle" / "tiny-test")
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--n", "40", "--model", str(bundle)])
    assert result.exit_code == 0, result.output
    results = pq.read_table(out / "predictions" / "results")  # a plain Parquet dataset
    truth = pq.read_table(out / "catalog", columns=["id"])
    assert sorted(results.column("id").to_pylist()) == sorted(truth.column("id").to_pylist())
    assert (out / "eval" / "report.json").is_file()
    assert list((out / "eval").glob("*.png"))
    assert "metrics and plots" in result.output


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--n", "5"])
    assert result.exit_code != 0
    assert "not empty" in str(result.exception) + result.output
