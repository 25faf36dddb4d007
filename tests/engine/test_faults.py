"""Fault injection on the local path (the Ray path's twins are in test_distributed.py): a null id
costs only its row, duplicate ids are flagged and counted, a flipped byte fails only its file, one
run at a time per --out, a full disk stops the run cleanly and resume is then exact, a replaced input
is redone on --resume."""

from __future__ import annotations

import errno
import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.catalogs.schema import META_WAVELENGTH, Flag, WavelengthGrid
from starcast.engine.outdir import LOCK_NAME, OutputLock
from starcast.engine.run import INTERRUPTED, exit_code, run

from starcast.cli import main
from starcast.errors import EXIT_ERROR, EXIT_PARTIAL, OutputError, StarcastError

GRID = WavelengthGrid.linear(3990.0, 1.0, 220)  # covers the tiny bundle's 4000-4199 A
MARK = np.float32(1.0123457)  # one flux value, found in the file by its bytes to flip one of them


def shard(path: Path, ids: list, *, seed: int = 0, wavelength_column: bool = False) -> Path:
    """A Parquet shard written without the catalog checks (so it may hold null or repeated ids),
    uncompressed and plain-encoded with page checksums, so that a flipped byte in the flux stays
    decodable and only the checksum can catch it."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    flux = (1.0 + rng.normal(0, 0.02, (n, GRID.n))).astype(np.float32)
    cols = {"id": pa.array(ids, pa.int64())}
    if wavelength_column:  # a per-row grid instead of the file grid
        cols["wavelength"] = pa.array([GRID.values().tolist()] * n, pa.list_(pa.float64()))
        cols["flux"] = pa.array(flux.tolist(), pa.list_(pa.float32()))
        table = pa.table(cols)
    else:
        cols["flux"] = pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), GRID.n)
        table = pa.table(cols).replace_schema_metadata({META_WAVELENGTH: GRID.to_json()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="none", use_dictionary=False, write_page_checksum=True,
                   row_group_size=64)
    return path


def flip_a_flux_byte(path: Path, ids: list) -> Path:
    """A shard whose row 3 holds MARK at pixel 17, then one bit of MARK flipped in the file: the
    page still decodes (the value changes silently) unless its checksum is verified."""
    shard(path, ids)
    table = pq.read_table(path)
    flux = np.stack(table["flux"].to_numpy(zero_copy_only=False))
    flux[3, 17] = MARK
    table = table.set_column(1, "flux", pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), GRID.n))
    pq.write_table(table, path, compression="none", use_dictionary=False, write_page_checksum=True,
                   row_group_size=64)
    blob = bytearray(path.read_bytes())
    at = blob.find(MARK.tobytes())  # its first copy is in the data page
    blob[at + 1] ^= 0x10
    path.write_bytes(bytes(blob))
    unchecked = np.stack(pq.read_table(path)["flux"].to_numpy(zero_copy_only=False))
    assert unchecked[3, 17] != MARK  # reads "fine" without the checksum: silently wrong flux
    return path


def bad_catalog(folder: Path) -> Path:
    """a: 100 rows, id null at row 7, ids 20 and 21 repeated at rows 60 and 90 (after batch ends);
    b: per-row wavelength column; c: one flipped flux byte; d: plain 40 rows."""
    a = list(range(100))
    a[7], a[60], a[90] = None, 20, 21
    shard(folder / "a.parquet", a, seed=1)
    shard(folder / "b.parquet", list(range(100, 150)), seed=2, wavelength_column=True)
    flip_a_flux_byte(folder / "c.parquet", list(range(200, 270)))
    shard(folder / "d.parquet", list(range(300, 340)), seed=4)
    return folder


def check_bad_catalog_results(out: Path, manifest: dict) -> None:
    """What both paths must give for `bad_catalog`."""
    files = {Path(f["input"]).stem: f for f in manifest["files"]}
    assert [s for s in "abcd" if files[s]["status"] == "failed"] == ["c"]
    assert "checksum" in files["c"]["error"].lower() or "crc" in files["c"]["error"].lower(), files["c"]
    assert files["c"]["rows_in"] == 70 and files["c"]["rows_out"] == 0
    assert manifest["totals"]["rows_in"] == 260 and manifest["totals"]["rows_out"] == 190
    assert (files["a"]["rows_failed"], files["a"]["rows_duplicate"]) == (1, 2)
    assert manifest["totals"]["rows_duplicate"] == 2 and exit_code(manifest) == EXIT_PARTIAL
    a = pq.read_table(out / "results/a.parquet").to_pylist()
    assert len(a) == 100 and a[7]["id"] is None and a[7]["error"] == "id is null (input row 7)"
    assert a[7]["teff"] is None and a[7]["flags"] & Flag.PREPROCESS_FAILED
    others = [r for i, r in enumerate(a) if i != 7]
    assert all(r["error"] is None and np.isfinite(r["teff"]) for r in others)
    duplicates = [i for i, r in enumerate(a) if r["flags"] & Flag.DUPLICATE_ID]
    assert duplicates == [60, 90]  # the later rows; the first ones (20, 21) keep a clean flag
    b = pq.read_table(out / "results/b.parquet")
    assert b["id"].to_pylist() == list(range(100, 150)) and b["error"].null_count == 50
    assert not (out / "results/c.parquet").exists() and not (out / "markers/c.done").exists()
    assert json.loads((out / "markers/a.done").read_text())["duplicates"] == 2


def test_bad_input_costs_only_the_bad_rows_and_the_corrupt_file(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = bad_catalog(tmp_path / "cat")
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, batch_size=50, progress=False)
    check_bad_catalog_results(tmp_path / "out", manifest)

    again = run(cat, tmp_path / "out", model=tiny_bundle, batch_size=50, progress=False, resume=True)
    assert [f["status"] for f in again["files"]] == ["skipped", "skipped", "failed", "skipped"]
    assert again["totals"]["rows_duplicate"] == 2  # counts of skipped files come from their markers


def test_a_batch_that_raises_where_no_check_foresaw_it_costs_only_its_failing_rows(tmp_path: Path,
                                                                                    tiny_bundle: Path,
                                                                                    monkeypatch) -> None:
    """Nothing is lost when the model itself raises: a batch whose preparation raises is prepared again
    row by row and only the row that still raises fails; a batch whose inference raises keeps every
    row, flagged, with the error. The other rows' results are those of a run without the fault."""
    from starcast.engine.predictor import Model

    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    run(cat, tmp_path / "clean", model=tiny_bundle, batch_size=5, progress=False)
    clean = pq.read_table(tmp_path / "clean/results/cat.parquet").to_pylist()
    prepare, infer = Model.prepare, Model.infer

    def raising(method, row, message):
        def wrapped(self, batch, **kwargs):
            if row in batch.column("id").to_pylist():
                raise RuntimeError(message)
            return method(self, batch, **kwargs)
        return wrapped

    for name, method, row, failed, error in (
            ("prepare", prepare, 3, [3], "preprocessing failed: RuntimeError: boom 3"),
            ("infer", infer, 7, [5, 6, 7, 8, 9], "inference failed: RuntimeError: boom 7")):
        monkeypatch.setattr(Model, name, raising(method, row, f"boom {row}"))
        manifest = run(cat, tmp_path / name, model=tiny_bundle, batch_size=5, progress=False)
        monkeypatch.setattr(Model, name, method)
        rows = pq.read_table(tmp_path / name / "results/cat.parquet").to_pylist()
        assert [r["id"] for r in rows] == list(range(10))
        for i, (r, c) in enumerate(zip(rows, clean, strict=True)):
            if i in failed:
                assert r["error"] == error and r["flags"] & Flag.PREPROCESS_FAILED and r["teff"] is None
            else:
                assert r == c
        assert manifest["totals"]["rows_failed"] == len(failed) and exit_code(manifest) == EXIT_PARTIAL


def test_dictionary_encoded_ids_are_read_as_their_values(tmp_path: Path, tiny_bundle: Path) -> None:
    """As pandas writes a categorical id column: predicted, ids (strings) kept in order, a repeat
    flagged as any other."""
    path = shard(tmp_path / "cat" / "s.parquet", list(range(5)))
    table = pq.read_table(path)
    ids = pa.array(["s0", "s1", "s0", "s3", "s4"]).dictionary_encode()
    pq.write_table(table.set_column(0, "id", ids), path)
    manifest = run(path, tmp_path / "out", model=tiny_bundle, progress=False)
    out = pq.read_table(tmp_path / "out" / "results" / "s.parquet")
    assert manifest["totals"]["rows_out"] == 5 and out["error"].null_count == 5
    assert out["id"].type == pa.string() and out["id"].to_pylist() == ["s0", "s1", "s0", "s3", "s4"]
    assert [bool(f & Flag.DUPLICATE_ID) for f in out["flags"].to_pylist()] == [0, 0, 1, 0, 0]


def test_an_rv_column_of_nulls_only_reads_as_rv_not_given(tmp_path: Path, tiny_bundle: Path) -> None:
    """pandas and polars write a column of None as type null: its rows are predicted as rows without
    an rv, not failed."""
    path = shard(tmp_path / "cat" / "s.parquet", list(range(5)))
    plain = run(path, tmp_path / "plain", model=tiny_bundle, progress=False)
    pq.write_table(pq.read_table(path).append_column("rv", pa.nulls(5)), path)
    nulls = run(path, tmp_path / "nulls", model=tiny_bundle, progress=False)
    assert nulls["totals"] == plain["totals"] and nulls["totals"]["rows_failed"] == 0
    assert pq.read_table(tmp_path / "nulls/results/s.parquet").equals(
        pq.read_table(tmp_path / "plain/results/s.parquet"))


@pytest.mark.parametrize(("name", "column", "error"), [
    ("mask", pa.array([[0] * 220] * 3, pa.list_(pa.uint8())), "column 'mask': expected a list of booleans"),
    ("rv", pa.array(["0", "12 km/s", "5"]), "column 'rv': expected numbers (km/s), got string"),
    ("resolving_power", pa.array(["20000"] * 3), "column 'resolving_power': expected numbers")])
def test_a_file_whose_column_has_the_wrong_type_fails_naming_the_column(tmp_path: Path, tiny_bundle: Path,
                                                                         name, column, error) -> None:
    """A column of the wrong type fails its file with one error naming it, not each row with a parse
    error of its own (text in the rv column did, without naming it)."""
    path = shard(tmp_path / "cat" / "s.parquet", list(range(3)))
    pq.write_table(pq.read_table(path).append_column(name, column), path)
    manifest = run(path, tmp_path / "out", model=tiny_bundle, progress=False)
    assert manifest["files"][0]["status"] == "failed"
    assert manifest["files"][0]["error"].startswith(error)


def test_a_file_grid_in_an_unknown_medium_fails_the_file(tmp_path: Path, tiny_bundle: Path) -> None:
    """The file grid's medium is the file's: one it does not know fails the file, as other bad grid
    metadata does (it failed every row, each with the same error)."""
    path = shard(tmp_path / "cat" / "s.parquet", list(range(3)))
    table = pq.read_table(path)
    grid = json.loads(table.schema.metadata[META_WAVELENGTH.encode()])
    grid["medium"] = "AIR"
    pq.write_table(table.replace_schema_metadata({META_WAVELENGTH: json.dumps(grid)}), path)
    manifest = run(path, tmp_path / "out", model=tiny_bundle, progress=False)
    assert manifest["files"][0]["status"] == "failed"
    assert "medium must be 'air' or 'vacuum', got 'AIR'" in manifest["files"][0]["error"]


def test_label_columns_of_any_type_play_no_part(tmp_path: Path, tiny_bundle: Path) -> None:
    """A text or list column named like a target (an input's own notes) changes nothing: the file is
    predicted as it is without it."""
    path = shard(tmp_path / "cat" / "s.parquet", list(range(5)))
    plain = run(path, tmp_path / "plain", model=tiny_bundle, progress=False)
    table = pq.read_table(path)
    table = table.append_column("teff", pa.array(list("abcde"))).append_column(
        "logg", pa.array([[1.0]] * 5, pa.list_(pa.float64())))
    pq.write_table(table, path)
    labelled = run(path, tmp_path / "labelled", model=tiny_bundle, progress=False)
    assert labelled["totals"] == plain["totals"] and labelled["totals"]["rows_failed"] == 0
    assert pq.read_table(tmp_path / "labelled/results/s.parquet").equals(
        pq.read_table(tmp_path / "plain/results/s.parquet"))


def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(tmp_path: Path, tiny_bundle: Path) -> None:
    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(StarcastError, match=r"in use by another starcast run \(pid \d+ on "):
            run(cat, out, model=tiny_bundle, progress=False)
        assert not (out / "results").exists()
    run(cat, out, model=tiny_bundle, progress=False)
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path: Path, tiny_bundle: Path, capfd) -> None:
    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "x", "started": "then"}))
    manifest = run(cat, out, model=tiny_bundle, progress=False)
    assert manifest["totals"]["rows_out"] == 10
    assert f"pid {dead.pid} on x" in capfd.readouterr().err


def test_out_must_be_new_unless_resuming_and_never_a_file(tmp_path: Path, tiny_bundle: Path, capsys) -> None:
    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    run(cat, tmp_path / "out", model=tiny_bundle, seed=1, progress=False)
    with pytest.raises(StarcastError, match="not empty.*--resume"):
        run(cat, tmp_path / "out", model=tiny_bundle, seed=1, progress=False)
    with pytest.raises(StarcastError, match="cannot resume"):
        run(cat, tmp_path / "out", model=tiny_bundle, seed=2, progress=False, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(cat), "--out", str(tmp_path / "file"), "--model", str(tiny_bundle)])
    assert exit_info.value.code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err


def test_a_full_disk_stops_the_run_cleanly_and_resume_is_exact(tmp_path: Path, tiny_bundle: Path,
                                                              monkeypatch, capsys) -> None:
    cat = tmp_path / "cat"
    for i in range(3):
        shard(cat / f"s{i}.parquet", list(range(100 * i, 100 * i + 100)), seed=i)
    run(cat, tmp_path / "reference", model=tiny_bundle, batch_size=30, progress=False)
    calls, write_table = [], pq.ParquetWriter.write_table

    def fill_up(self, table, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # the 2nd file's 2nd batch: one file is complete, one half-written
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_table(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fill_up)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(cat), "--out", str(out), "--model", str(tiny_bundle), "--batch-size", "30",
              "--no-progress"])
    assert exit_info.value.code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    manifest = json.loads((out / "run-manifest.json").read_text())
    assert manifest["state"] == "stopped" and "No space left" in manifest["error"]
    assert [f["status"] for f in manifest["files"]] == ["done", "pending", "pending"]
    assert not [p for p in out.rglob(".*") if p.name != LOCK_NAME] and not (out / LOCK_NAME).exists()

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    resumed = run(cat, out, model=tiny_bundle, batch_size=30, progress=False, resume=True)
    assert [f["status"] for f in resumed["files"]] == ["skipped", "done", "done"]
    for i in range(3):
        assert pq.read_table(out / f"results/s{i}.parquet").equals(
            pq.read_table(tmp_path / f"reference/results/s{i}.parquet"))


def test_output_errors_are_output_errors(tmp_path: Path, tiny_bundle: Path, monkeypatch) -> None:
    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OutputError, match="I/O error"):
        run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    assert not list((tmp_path / "out").rglob(".*partial"))


def test_an_unexpected_error_stops_the_run_with_its_manifest_saying_so(tmp_path: Path, tiny_bundle: Path,
                                                                         monkeypatch) -> None:
    cat = shard(tmp_path / "cat.parquet", list(range(10)))

    def broken(self, files, reports):
        raise RuntimeError("boom")

    monkeypatch.setattr("starcast.engine.run.LocalPipeline.run", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    manifest = json.loads((tmp_path / "out/run-manifest.json").read_text())
    assert manifest["state"] == "stopped" and manifest["error"] == "internal error: RuntimeError: boom"


def test_an_interrupted_run_says_so_in_its_manifest(tmp_path: Path, tiny_bundle: Path, monkeypatch) -> None:
    """Ctrl-C (KeyboardInterrupt) stops the run with `state: stopped` and the error saying so, where
    the manifest said `running` as for a kill."""
    cat = shard(tmp_path / "cat.parquet", list(range(10)))

    def interrupted(self, files, reports):
        raise KeyboardInterrupt

    monkeypatch.setattr("starcast.engine.run.LocalPipeline.run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    manifest = json.loads((tmp_path / "out/run-manifest.json").read_text())
    assert manifest["state"] == "stopped" and manifest["error"] == INTERRUPTED


def test_resume_redoes_an_input_replaced_under_the_same_name(tmp_path: Path, tiny_bundle: Path,
                                                            capfd) -> None:
    cat = tmp_path / "cat"
    shard(cat / "s0.parquet", list(range(50)))
    shard(cat / "s1.parquet", list(range(50, 100)))
    run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    shard(cat / "s1.parquet", list(range(1000, 1050)), seed=9)  # same name and size, new spectra
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, progress=False, resume=True)
    assert [f["status"] for f in manifest["files"]] == ["skipped", "done"]
    assert "changed" in manifest["files"][1]["note"] and "changed" in capfd.readouterr().err
    assert pq.read_table(tmp_path / "out/results/s1.parquet")["id"].to_pylist() == list(range(1000, 1050))


def test_resume_refuses_an_input_that_lacks_files_the_run_has_results_of(tmp_path: Path,
                                                                         tiny_bundle: Path) -> None:
    """Resumed on part of its input, a run would leave the other files' results in `results/` beside
    its own, uncounted by its manifest: refused, naming them, and nothing changed."""
    cat = two_shards_run(tmp_path, tiny_bundle)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out/results").iterdir()}
    with pytest.raises(StarcastError, match=r"holds results of inputs that .*s0.parquet does not list \(s1"):
        run(cat / "s0.parquet", tmp_path / "out", model=tiny_bundle, progress=False, resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out/results").iterdir()} == before
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, progress=False, resume=True)
    assert [f["status"] for f in manifest["files"]] == ["skipped", "skipped"]


def two_shards_run(tmp_path: Path, tiny_bundle: Path) -> Path:
    """A catalog of two 20-row shards, s0 and s1, run into tmp_path / "out"; the catalog's folder."""
    cat = tmp_path / "cat"
    shard(cat / "s0.parquet", list(range(20)))
    shard(cat / "s1.parquet", list(range(20, 40)))
    run(cat, tmp_path / "out", model=tiny_bundle, progress=False)
    return cat


def test_resume_redoes_an_input_whose_results_are_gone_and_says_why(tmp_path: Path,
                                                                     tiny_bundle: Path) -> None:
    cat = two_shards_run(tmp_path, tiny_bundle)
    (tmp_path / "out/results/s1.parquet").unlink()
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, progress=False, resume=True)
    assert [f["status"] for f in manifest["files"]] == ["skipped", "done"]
    assert manifest["files"][0]["note"] is None and "not its results" in manifest["files"][1]["note"]
    assert pq.read_table(tmp_path / "out/results/s1.parquet").num_rows == 20


def test_resume_leaves_no_results_of_an_input_that_changed_and_now_fails(tmp_path: Path,
                                                                         tiny_bundle: Path) -> None:
    cat = two_shards_run(tmp_path, tiny_bundle)
    (cat / "s1.parquet").write_text("hello\n")
    manifest = run(cat, tmp_path / "out", model=tiny_bundle, progress=False, resume=True)
    assert [f["status"] for f in manifest["files"]] == ["skipped", "failed"]
    assert not (tmp_path / "out/results/s1.parquet").exists()
    assert not (tmp_path / "out/markers/s1.done").exists()


def test_a_glob_reaching_into_out_does_not_take_its_results_for_inputs(tmp_path: Path,
                                                                       tiny_bundle: Path) -> None:
    shard(tmp_path / "g" / "s0.parquet", list(range(20)))
    pattern, out = str(tmp_path / "g" / "**" / "*.parquet"), tmp_path / "g" / "out"
    first = run(pattern, out, model=tiny_bundle, progress=False)
    again = run(pattern, out, model=tiny_bundle, progress=False, resume=True)
    assert [f["status"] for f in first["files"]] == ["done"]
    assert [f["status"] for f in again["files"]] == ["skipped"]


def test_an_unreachable_ray_address_is_refused_naming_it(tmp_path: Path, tiny_bundle: Path) -> None:
    pytest.importorskip("ray")
    cat = shard(tmp_path / "cat.parquet", list(range(10)))
    with pytest.raises(StarcastError, match="cannot connect to a Ray cluster at '127.0.0.1:1'"):
        run(cat, tmp_path / "out", model=tiny_bundle, ray="127.0.0.1:1", progress=False)
    assert json.loads((tmp_path / "out/run-manifest.json").read_text())["state"] == "stopped"
    run(cat, tmp_path / "out", model=tiny_bundle, progress=False)  # no results yet: no --resume needed


def test_the_wait_for_ray_results_is_bounded_and_closes_its_source() -> None:
    from starcast.engine.distributed import bounded

    closed = threading.Event()

    def source(n: int, block: bool = False):
        try:
            yield from range(n)
            if block:
                time.sleep(60)
        finally:
            closed.set()

    assert list(bounded(source(5), 5.0)) == list(range(5))
    with pytest.raises(StarcastError, match="no results from the Ray cluster for 0 s"):
        list(bounded(source(2, block=True), 0.3))  # unbounded, the source would end after 60 s unraised
    closed.clear()
    for item in bounded(source(100), 5.0):
        if item == 3:
            break  # the consumer stops early (e.g. an error while writing)
    assert closed.wait(5), "the source was not closed"
