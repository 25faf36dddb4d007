"""`starcast inspect`: counts, flag counts by bit name and per-target quantiles of a known results
file, checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from starcast.catalogs.schema import Flag, results_schema
from starcast.engine.cli import inspect as inspect_command
from starcast.engine.inspect import format_summary, summarize

from starcast.errors import StarcastError

N = 101


def known_results(path: Path, chi2: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Rows 0..100: teff = 10000 + 100 i, sigmas growing with i; rows 3 and 7 failed; every
    10th row OUT_OF_RANGE; row 3 also NON_FINITE; rows 1, 2 and 20 UPPER_LIMIT and rows 1 and 5
    RV_ESTIMATED (bits that describe a number rather than doubt it); with `chi2` [N], a model with an
    emulator's columns."""
    i = np.arange(N, dtype=np.float64)
    failed = np.isin(i, [3, 7])
    cols = {"id": pa.array(i.astype(np.int64))}
    values = {"teff": 10000 + 100 * i, "teff_err": 1 + i, "teff_err_aleatoric": 0.5 + i / 2,
              "teff_err_epistemic": i ** 2}
    for name, v in values.items():
        cols[name] = pa.array(v, mask=failed)
    flags = np.where(i % 10 == 0, int(Flag.OUT_OF_RANGE), 0)
    flags |= np.where(failed, int(Flag.PREPROCESS_FAILED), 0)
    flags[3] |= Flag.NON_FINITE
    flags[[1, 2, 20]] |= Flag.UPPER_LIMIT
    flags[[1, 5]] |= Flag.RV_ESTIMATED
    if chi2 is not None:
        cols |= {"chi2": pa.array(chi2, mask=failed), "chi2_pixels": pa.array(np.full(N, 1951, np.int32)),
                 "rv": pa.array(np.zeros(N), mask=failed), "rv_err": pa.array(np.ones(N), mask=failed)}
    cols["flags"] = pa.array(flags.astype(np.int32))
    cols["error"] = pa.array(["bad row" if f else None for f in failed], pa.string())
    schema = results_schema(["teff"], emulator=chi2 is not None)
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), path)
    return {k: v[~failed] for k, v in values.items()}


def test_summary_of_a_known_results_file(tmp_path: Path) -> None:
    values = known_results(tmp_path / "r.parquet")
    s = summarize(tmp_path / "r.parquet")
    assert (s["rows"], s["rows_predicted"], s["rows_failed"]) == (N, N - 2, 2)
    assert s["rows_flagged"] == 11 + 2  # rows 0, 10, ..., 100 and the two failed rows (not 1, 2 or 5)
    assert s["flags"] == {**dict.fromkeys(Flag.__members__, 0),  # every bit counted, the unused ones 0
                          "NON_FINITE": 1, "OUT_OF_RANGE": 11, "PREPROCESS_FAILED": 2, "UPPER_LIMIT": 3,
                          "RV_ESTIMATED": 2}
    assert s["top_errors"] == [{"error": "bad row", "rows": 2, "alike": 0}]
    teff = s["targets"]["teff"]
    assert (teff["min"], teff["max"]) == (10000.0, 20000.0)
    assert teff["median"] == pytest.approx(np.median(values["teff"]))
    for suffix in ("_err", "_err_aleatoric", "_err_epistemic"):
        for q in (50, 90, 99):
            expected = np.quantile(values["teff" + suffix], q / 100)  # numpy's linear interpolation
            assert teff["teff" + suffix][f"q{q}"] == pytest.approx(expected), (suffix, q)
    assert s["files_without_marker"] == [str(tmp_path / "r.parquet")]


def test_inspect_command_reads_a_run_folder_and_prints_the_tables(tmp_path: Path) -> None:
    (tmp_path / "out/results").mkdir(parents=True)
    known_results(tmp_path / "out/results/a.parquet")
    (tmp_path / "out/markers").mkdir()
    (tmp_path / "out/markers/a.done").write_text("{}")
    result = CliRunner().invoke(inspect_command, [str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "101 rows: 99 predicted, 2 failed, 13 flagged" in result.output
    assert "OUT_OF_RANGE" in result.output and "without a completion marker" not in result.output
    teff_line = next(line for line in result.output.splitlines() if line.startswith("teff"))
    assert teff_line.split()[1:4] == ["10000", "15100", "20000"]
    as_json = CliRunner().invoke(inspect_command, [str(tmp_path / "out"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == json.loads(json.dumps(
        summarize(tmp_path / "out")))


def test_inspect_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StarcastError, match="no results file"):
        summarize(tmp_path)


@pytest.mark.parametrize("level", [0.25, 1.0, 1.44])
def test_chi2_is_summarised_with_a_hint_where_most_spectra_are_unexplained(tmp_path: Path, level) -> None:
    """The median and 90% quantile of chi2 against numpy's (failed rows left out); the hint to check
    flux_err, with the factor it likely understates the noise by, only where the median exceeds 1.2
    (clean spectra: 1.00; flux_err understated 1.2x: 1.43 in the perturbation bench), or overstates
    it by, only where the median is below 0.7 (overstated 1.2x: 0.69)."""
    chi2 = level + np.random.default_rng(1).normal(0.0, 0.05, N)
    known_results(tmp_path / "r.parquet", chi2)
    s = summarize(tmp_path / "r.parquet")
    kept = np.delete(chi2, [3, 7])
    assert s["chi2"] == pytest.approx({"q50": np.quantile(kept, 0.5), "q90": np.quantile(kept, 0.9)})
    text = format_summary(s)
    assert f"chi2 (goodness of fit): median {np.median(kept):.3g}" in text
    assert ("understates the noise, by ~1.20x" in " ".join(text.split())) == (level > 1.2), text
    overstated = f"likely overstates it, by ~{np.median(kept) ** -0.5:.2f}x"
    assert (overstated in " ".join(text.split())) == (level < 0.7), text
    assert ("Only 0% are flagged MODEL_MISMATCH" in " ".join(text.split())) == (level > 1.2), text


def test_the_unexplained_chi2_hint_says_when_few_rows_are_a_model_mismatch(tmp_path: Path) -> None:
    """Understated noise raises chi2 alike in every pixel, which MODEL_MISMATCH does not count: the
    hint says how few rows carry it where fewer than half do, and nothing of it where most do."""
    known_results(tmp_path / "r.parquet", np.full(N, 1.44))
    table = pq.read_table(tmp_path / "r.parquet")
    flags = table.column("flags").to_numpy() | int(Flag.MODEL_MISMATCH)
    pq.write_table(table.set_column(table.schema.get_field_index("flags"), "flags",
                                    pa.array(flags, pa.int32())), tmp_path / "flagged.parquet")
    for name, said in (("r", True), ("flagged", False)):
        text = " ".join(format_summary(summarize(tmp_path / f"{name}.parquet")).split())
        assert ("are flagged MODEL_MISMATCH, which reads the chi2 beyond" in text) == said, text


def test_a_model_without_an_emulator_has_no_chi2_summary(tmp_path: Path) -> None:
    known_results(tmp_path / "r.parquet")
    s = summarize(tmp_path / "r.parquet")
    assert s["chi2"] is None and "chi2" not in format_summary(s)


def test_errors_alike_but_for_their_numbers_are_counted_as_one(tmp_path: Path) -> None:
    """A row number or a count in the message does not split a reason into rows of one each."""
    known_results(tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    errors = [None] * N
    errors[3], errors[7] = "id is null (input row 3)", "id is null (input row 17)"
    pq.write_table(table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors)),
                   tmp_path / "r.parquet")
    s = summarize(tmp_path / "r.parquet")
    assert s["top_errors"] == [{"error": "id is null (input row 17)", "rows": 2, "alike": 1}]
    assert "      2  id is null (input row 17)  (and 1 alike but for numbers)" in format_summary(s)


def test_the_text_summary_counts_the_rows_of_errors_beyond_the_five_listed() -> None:
    summary = {"files": ["r.parquet"], "files_without_marker": [], "rows": 10, "rows_predicted": 2,
               "rows_failed": 8, "rows_flagged": 8, "flags": {}, "targets": {}, "chi2": None,
               "top_errors": [{"error": f"reason {k}", "rows": 1 + (k == 0), "alike": 0} for k in range(5)]}
    text = format_summary(summary)
    assert "      2  reason 0" in text and "      2  rows with other errors (`error` column)" in text
    summary["top_errors"] = [{"error": "reason", "rows": 8, "alike": 0}]
    assert "other errors" not in format_summary(summary)
