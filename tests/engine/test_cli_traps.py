"""The traps a new user meets, each answered by one line and exit 2: inspect on an input catalog, eval
against the wrong truth catalog, a run whose only input is unreadable; --debug for the traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import starcast
from starcast.cli import main
from starcast.errors import StarcastError

TARGETS = ("teff", "logg", "vsini")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def results(path: Path, ids) -> Path:
    n = len(ids)
    cols = {"id": pa.array(ids, pa.int64())}
    for t in TARGETS:
        cols.update({t: np.full(n, 1.0), f"{t}_err": np.full(n, 1.0), f"{t}_err_aleatoric": np.full(n, 1.0),
                     f"{t}_err_epistemic": np.full(n, 0.1)})
    cols.update({"flags": pa.array(np.zeros(n, np.int32)), "error": pa.nulls(n, pa.string())})
    pq.write_table(pa.table(cols), path)
    return path


def truth(path: Path, ids) -> Path:
    n = len(ids)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), **{t: np.full(n, 1.0) for t in TARGETS}}), path)
    return path


def test_inspect_on_an_input_catalog_says_what_it_expects(tmp_path, capsys):
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"id": [1, 2], "flux": [[1.0, 2.0], [1.0, 2.0]]}), catalog)
    code, output = run_cli(["inspect", str(catalog)], capsys)
    assert code == 2 and "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "not a results catalog" in output and "starcast run" in output


def test_eval_against_the_wrong_truth_catalog_fails_with_the_counts(tmp_path, capsys):
    res = results(tmp_path / "results.parquet", range(100))
    wrong = truth(tmp_path / "wrong.parquet", range(1000, 1100))
    code, output = run_cli(["eval", str(res), "--truth", str(wrong), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "only 0 of 100 result ids are in the truth catalog" in output
    partial = truth(tmp_path / "partial.parquet", range(5, 105))  # 95 of 100 match: scored, counts shown
    code, output = run_cli(["eval", str(res), "--truth", str(partial), "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "95 matched, 5 results without truth, 5 truths without results" in output
    code, _ = run_cli(["eval", str(res), "--truth", str(partial), "--out", str(tmp_path / "r"),
                       "--min-match", "0.99"], capsys)
    assert code == 2


def test_eval_notes_results_predicted_from_another_catalog_than_the_truth(tmp_path, capsys):
    """Two synthetic surveys share their ids (0 ... N-1): the results record the file they were
    predicted from, and eval says when the truth is another."""
    first, second = (truth(tmp_path / f"{name}.parquet", range(50)) for name in ("first", "second"))
    res = results(tmp_path / "results.parquet", range(50))
    table = pq.read_table(res)
    pq.write_table(table.replace_schema_metadata({"starcast.input": str(first)}), res)
    code, output = run_cli(["eval", str(res), "--truth", str(second), "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and f"predicted from {first}, not from the truth catalog's files" in output
    code, output = run_cli(["eval", str(res), "--truth", str(first), "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "note:" not in output


def test_a_run_whose_only_input_is_unreadable_exits_2(tmp_path, capsys, tiny_bundle):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00garbage" * 100)
    code, output = run_cli(["run", str(corrupt), "--out", str(tmp_path / "out"), "--model", str(tiny_bundle),
                            "--no-progress"], capsys)
    assert code == 2 and "corrupt.parquet" in output


def test_debug_shows_the_traceback_the_one_line_error_stands_for_and_version_names_the_release(tmp_path,
                                                                                                capsys):
    argv = ["inspect", str(truth(tmp_path / "input.parquet", range(3)))]
    code, output = run_cli(argv, capsys)
    assert code == 2 and output.startswith("error: ") and "Traceback" not in output
    with pytest.raises(StarcastError) as raised:
        main(["--debug", *argv])
    assert str(raised.value) in output
    code, output = run_cli(["--version"], capsys)
    assert code == 0 and output.strip() == f"starcast, version {starcast.__version__}"
