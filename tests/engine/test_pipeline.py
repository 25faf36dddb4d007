"""The local streaming pipeline through `starcast.run` and `starcast run`: every input row exactly
once, results metadata, batch independence, bad rows and a corrupt file, a refused model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from starcast.catalogs.io import write_catalog
from starcast.catalogs.schema import Flag, WavelengthGrid
from starcast.engine.cli import run as run_command
from starcast.engine.run import exit_code, run

from starcast.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, ModelError

GRID = WavelengthGrid.linear(3990.0, 1.0, 220)  # covers the tiny bundle's 4000-4199 A


def catalog(path: Path, ids, *, seed: int = 0) -> Path:
    """A catalog on the shared GRID: noisy flat continuum with one absorption line, labels in range."""
    rng = np.random.default_rng(seed)
    n, wl = len(ids), GRID.values()
    depth = rng.uniform(0.1, 0.6, (n, 1))
    flux = 1.0 - depth * np.exp(-0.5 * ((wl - 4100.0) / rng.uniform(2, 8, (n, 1))) ** 2)
    flux = (flux * rng.uniform(0.5, 2.0, (n, 1)) + rng.normal(0, 0.01, (n, len(wl)))).astype(np.float32)
    table = pa.table({
        "id": pa.array(np.asarray(ids, np.int64)),
        "flux": pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), len(wl)),
        "teff": rng.uniform(15000, 40000, n), "logg": rng.uniform(3.0, 4.5, n),
        "vsini": rng.uniform(0, 300, n),
    })
    write_catalog(table, path, grid=GRID)
    return path


def read_results(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "results").glob("*.parquet")))


def assert_same_results(a: pa.Table, b: pa.Table) -> None:
    """Same rows (by id), same flags and errors, numbers equal to float32 rounding (the matrix
    products of a different batch shape may round differently)."""
    a, b = a.sort_by("id"), b.sort_by("id")
    assert a.column_names == b.column_names
    for name in a.column_names:
        if pa.types.is_floating(a.schema.field(name).type):
            np.testing.assert_allclose(a[name].to_numpy(zero_copy_only=False),
                                       b[name].to_numpy(zero_copy_only=False), rtol=1e-5, err_msg=name)
        else:
            assert a[name].to_pylist() == b[name].to_pylist(), name


def test_every_row_appears_once_with_its_numbers_and_metadata(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = tmp_path / "cat"
    cat.mkdir()
    catalog(cat / "a.parquet", range(0, 700), seed=1)
    catalog(cat / "b.parquet", range(700, 1000), seed=2)
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, batch_size=128, seed=7, progress=False)

    results = read_results(tmp_path / "out")
    assert sorted(results["id"].to_pylist()) == list(range(1000))
    assert results["error"].null_count == 1000
    for t in ("teff", "logg", "vsini"):
        for col in (t, f"{t}_err", f"{t}_err_aleatoric", f"{t}_err_epistemic"):
            assert np.isfinite(results[col].to_numpy()).all(), col
    meta = pq.read_schema(tmp_path / "out/results/a.parquet").metadata
    assert meta[b"starcast.model"] == b"tiny-test" and meta[b"starcast.seed"] == b"7"
    assert meta[b"starcast.input"] == str(cat / "a.parquet").encode()
    bundle_manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert meta[b"starcast.model_sha256"].decode() == bundle_manifest["bundle_sha256"]
    assert meta[b"starcast.samples"] == str(bundle_manifest["architecture"]["samples"]).encode()

    assert manifest["totals"] == {"files": 2, "files_done": 2, "files_skipped": 0, "files_failed": 0,
                                  "rows_in": 1000, "rows_out": 1000, "rows_flagged": manifest["totals"][
                                      "rows_flagged"], "rows_failed": 0, "rows_duplicate": 0}
    assert [f["rows_out"] for f in manifest["files"]] == [700, 300]
    assert json.loads((tmp_path / "out/run-manifest.json").read_text()) == manifest
    assert set(manifest["stage_seconds"]) == {"read", "prepare", "infer", "write"}
    assert exit_code(manifest) == EXIT_OK
    for stem in ("a", "b"):
        marker = json.loads((tmp_path / f"out/markers/{stem}.done").read_text())
        assert marker["rows"] == {"a": 700, "b": 300}[stem]
    assert not list((tmp_path / "out/results").glob(".*"))  # no temporary files left


def test_numbers_do_not_depend_on_batch_size(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = catalog(tmp_path / "cat.parquet", range(300))
    run(cat, tmp_path / "big", model=tiny_bundle, batch_size=300, progress=False)
    run(cat, tmp_path / "small", model=tiny_bundle, batch_size=7, progress=False)
    assert_same_results(read_results(tmp_path / "big"), read_results(tmp_path / "small"))


def test_on_the_cpu_preprocessing_and_inference_split_the_cores() -> None:
    import os

    from starcast.engine.pipeline import thread_budget

    cores = len(os.sched_getaffinity(0))
    prepare, infer = thread_budget("cpu")
    assert prepare >= 1 and infer >= 1 and (cores < 2 or prepare + infer == cores)
    assert thread_budget("cpu", workers=2)[0] == max(1, prepare // 2)
    assert thread_budget("triton") == (None, None)  # with a GPU, preprocessing keeps every core


def bad_catalog(path: Path) -> Path:
    """Rows 0-4 fine; 5 all-NaN flux; 6 only 5 pixels; 7 no overlap with the model grid (6000 A);
    8 teff label far outside the training range. Per-row wavelength column (variable lists)."""
    wl, rng = GRID.values(), np.random.default_rng(3)
    rows = [(wl, 1.0 + rng.normal(0, 0.01, wl.size)) for _ in range(5)]
    rows += [(wl, np.full(wl.size, np.nan)), (wl[:5], np.ones(5)), (wl + 2000.0, np.ones(wl.size)),
             (wl, 1.0 + rng.normal(0, 0.01, wl.size))]
    table = pa.table({
        "id": pa.array(np.arange(9, dtype=np.int64)),
        "wavelength": pa.array([w.tolist() for w, _ in rows], pa.list_(pa.float64())),
        "flux": pa.array([f.astype(np.float32).tolist() for _, f in rows], pa.list_(pa.float32())),
        "teff": [20000.0] * 8 + [1.0e6], "logg": [4.0] * 9, "vsini": [100.0] * 9,
    })
    write_catalog(table, path)
    return path


def test_bad_rows_are_flagged_and_a_corrupt_file_is_reported(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = tmp_path / "cat"
    cat.mkdir()
    bad_catalog(cat / "bad.parquet")
    catalog(cat / "good.parquet", range(100, 150))
    (cat / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 100)

    result = CliRunner().invoke(run_command, [str(cat), "--out", str(tmp_path / "out"), "--model",
                                              str(tiny_bundle), "--batch-size", "4", "--no-progress"])
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert "corrupt.parquet" in result.output  # reported on stderr (CliRunner mixes the streams)

    bad = pq.read_table(tmp_path / "out/results/bad.parquet").sort_by("id").to_pylist()
    assert [r["id"] for r in bad] == list(range(9))
    for r in bad[:5]:
        assert r["error"] is None and np.isfinite(r["teff"]) and not r["flags"] & Flag.OUT_OF_RANGE
    for i in (5, 6, 7):
        assert bad[i]["error"] and bad[i]["flags"] and bad[i]["teff"] is None, bad[i]
    assert bad[5]["flags"] & Flag.NON_FINITE
    assert bad[7]["flags"] & Flag.COVERAGE
    # a label outside the training range never sets a flag: flags come from the spectrum and prediction
    assert not bad[8]["flags"] & Flag.OUT_OF_RANGE and bad[8]["error"] is None and np.isfinite(bad[8]["teff"])

    manifest = json.loads((tmp_path / "out/run-manifest.json").read_text())
    files = {Path(f["input"]).name: f for f in manifest["files"]}
    assert files["corrupt.parquet"]["status"] == "failed" and files["corrupt.parquet"]["error"]
    assert [f["input"] for f in manifest["files_failed"]] == [str(cat / "corrupt.parquet")]
    assert files["bad.parquet"]["rows_failed"] == 3 and files["bad.parquet"]["rows_flagged"] >= 3
    assert manifest["totals"]["rows_in"] == manifest["totals"]["rows_out"] == 59
    assert manifest["totals"]["files_failed"] == 1 and manifest["totals"]["rows_failed"] == 3
    assert not (tmp_path / "out/results/corrupt.parquet").exists()
    assert not (tmp_path / "out/markers/corrupt.done").exists()


def test_a_bundle_with_a_wrong_hash_is_refused_before_anything_is_written(tmp_path: Path,
                                                                           tiny_bundle: Path) -> None:
    cat = catalog(tmp_path / "cat.parquet", range(10))
    weights = tiny_bundle / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="sha256"):
        run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    assert not (tmp_path / "out").exists()

    from starcast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(cat), "--out", str(tmp_path / "out"), "--model", str(tiny_bundle)])
    assert exit_info.value.code == EXIT_ERROR


def test_a_run_whose_every_file_fails_says_so_in_its_manifest_and_points_at_it(tmp_path: Path,
                                                                               tiny_bundle: Path) -> None:
    cat = catalog(tmp_path / "cat" / "a.parquet", range(3))
    pq.write_table(pq.read_table(cat).drop_columns(["id"]), cat)  # no id column: the file fails
    result = CliRunner().invoke(run_command, [str(cat), "--out", str(tmp_path / "out"), "--model",
                                              str(tiny_bundle)])
    assert result.exit_code == EXIT_ERROR, result.output
    manifest = json.loads((tmp_path / "out" / "run-manifest.json").read_text())
    assert manifest["state"] == "finished" and "no input file could be read" in manifest["error"]
    assert "results/" not in result.output and "error: no input file could be read" in result.output


def test_an_empty_input_file_gets_an_empty_results_file(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = catalog(tmp_path / "empty.parquet", [])
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    assert manifest["totals"]["files_done"] == 1
    assert pq.read_table(tmp_path / "out/results/empty.parquet").num_rows == 0
    assert (tmp_path / "out/markers/empty.done").exists()


def test_cli_runs_a_job_spec_and_options_override_it(tmp_path: Path, tiny_bundle: Path) -> None:
    catalog(tmp_path / "cat.parquet", range(20))
    job = tmp_path / "job.toml"
    job.write_text(f'[run]\ninput = "cat.parquet"\nout = "out"\nmodel = "{tiny_bundle}"\nseed = 1\n'
                   'batch_size = 8\nprogress = false\n')
    result = CliRunner().invoke(run_command, ["--config", str(job), "--seed", "4"])
    assert result.exit_code == EXIT_OK, result.output
    manifest = json.loads((tmp_path / "out/run-manifest.json").read_text())
    assert (manifest["seed"], manifest["batch_size"], manifest["totals"]["rows_out"]) == (4, 8, 20)


def test_the_cli_options_reach_the_run_and_a_run_with_other_samples_is_not_resumed(tmp_path: Path,
                                                                                  tiny_bundle: Path) -> None:
    """--samples, --seed and --backend are the run's (its numbers those of `predict` with them), and
    --resume continues only a run with the same ones."""
    from starcast.engine.predictor import load_model

    cat = catalog(tmp_path / "cat.parquet", range(20))
    args = [str(cat), "--out", str(tmp_path / "out"), "--model", str(tiny_bundle), "--no-progress",
            "--samples", "2", "--seed", "3", "--backend", "reference"]
    result = CliRunner().invoke(run_command, args)
    assert result.exit_code == EXIT_OK, result.output
    results = pq.read_table(tmp_path / "out/results/cat.parquet")
    meta = results.schema.metadata
    assert (meta[b"starcast.samples"], meta[b"starcast.seed"], meta[b"starcast.backend"]) == (b"2", b"3",
                                                                                             b"reference")
    expected = load_model(tiny_bundle).predict(pq.read_table(cat), samples=2, seed=3, backend="reference")
    other = load_model(tiny_bundle).predict(pq.read_table(cat), samples=4, seed=3, backend="reference")
    np.testing.assert_array_equal(results["teff"].to_numpy(), expected["teff"].to_numpy())
    assert not np.array_equal(results["teff"].to_numpy(), other["teff"].to_numpy())
    assert CliRunner().invoke(run_command, [*args, "--resume"]).exit_code == EXIT_OK
    assert json.loads((tmp_path / "out/run-manifest.json").read_text())["totals"]["files_skipped"] == 1
    args[args.index("--samples") + 1] = "3"
    refused = CliRunner().invoke(run_command, [*args, "--resume"])
    assert refused.exit_code != EXIT_OK and "cannot resume" in str(refused.exception)
    assert "'samples': 2" in str(refused.exception) and "'samples': 3" in str(refused.exception)
