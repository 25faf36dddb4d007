"""Resumable runs: a killed or interrupted local run, re-run with --resume, yields every id exactly
once and the same numbers as an uninterrupted run; outputs without a marker are never trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starcast.catalogs.io import write_catalog
from starcast.catalogs.schema import WavelengthGrid
from starcast.engine.run import run

from starcast.errors import StarcastError

GRID = WavelengthGrid.linear(3990.0, 1.0, 220)
FILES, ROWS = 8, 200


def shards(folder: Path, files: int = FILES, rows: int = ROWS) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        flux = (1.0 + rng.normal(0, 0.02, (rows, GRID.n))).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(i * rows, (i + 1) * rows, dtype=np.int64)),
                          "flux": pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), GRID.n)})
        write_catalog(table, folder / f"shard-{i:03d}.parquet", grid=GRID)
    return folder


def results(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "results").glob("*.parquet")))


def start_run(cat: Path, out: Path, bundle: Path, *extra: str) -> subprocess.Popen:
    """`starcast run` in a subprocess, small batches so that it runs long enough to be interrupted."""
    cmd = [sys.executable, "-m", "starcast", "run", str(cat), "--out", str(out), "--model", str(bundle),
           "--batch-size", "20", "--seed", "11", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_after_first_file(proc: subprocess.Popen, out: Path, sig: int) -> int:
    """Send `sig` as soon as the first completion marker appears; return how many markers existed."""
    deadline = time.monotonic() + 120
    while not list((out / "markers").glob("*.done")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no file completed in 120 s"
        time.sleep(0.005)
    done = len(list((out / "markers").glob("*.done")))
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bundle_dir) -> tuple[Path, pa.Table]:
    """The catalog and the results of an uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    cat = shards(root / "cat")
    run(cat, root / "reference", model=bundle_dir, batch_size=20, seed=11, progress=False)
    return cat, results(root / "reference").sort_by("id")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from tests.engine.conftest import make_bundle  # the tiny random bundle of tests/engine/conftest.py

    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny-test")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_resume_after_an_interrupted_run_yields_each_id_once(tmp_path: Path, reference, bundle_dir,
                                                              sig: int) -> None:
    cat, expected = reference
    out = tmp_path / "out"
    proc = start_run(cat, out, bundle_dir)
    done_at_stop = stop_after_first_file(proc, out, sig)
    assert proc.returncode != 0
    markers = {p.stem for p in (out / "markers").glob("*.done")}
    assert done_at_stop <= len(markers) < FILES, "the run finished before it was stopped"
    visible = {p.stem for p in (out / "results").glob("*.parquet")}
    assert visible == markers  # nothing half-written under a final name
    if sig == signal.SIGKILL:  # the manifest checkpointed after each file shows what was done
        stopped = json.loads((out / "run-manifest.json").read_text())
        assert stopped["state"] == "running"
        assert {Path(f["input"]).stem for f in stopped["files"] if f["status"] == "done"} <= markers
    if sig == signal.SIGINT:
        assert not list((out / "results").glob(".*")), "Ctrl-C left a temporary file behind"

    manifest = run(cat, out, model=bundle_dir, batch_size=20, seed=11, resume=True, progress=False)
    got = results(out).sort_by("id")
    assert got["id"].to_pylist() == list(range(FILES * ROWS))
    assert got.equals(expected)  # bit-identical: same batches, same masks
    assert manifest["totals"]["files_skipped"] == len(markers)
    assert manifest["totals"]["rows_out"] == FILES * ROWS
    assert not list((out / "results").glob(".*"))  # stale temporaries of the killed run removed


def test_resume_rewrites_a_results_file_without_marker(tmp_path: Path, bundle_dir: Path) -> None:
    cat = shards(tmp_path / "cat", files=2, rows=30)
    out = tmp_path / "out"
    run(cat, out, model=bundle_dir, progress=False)
    (out / "markers/shard-001.done").unlink()
    pq.write_table(pa.table({"id": [1]}), out / "results/shard-001.parquet")  # a stale partial result
    manifest = run(cat, out, model=bundle_dir, resume=True, progress=False)
    assert [f["status"] for f in manifest["files"]] == ["skipped", "done"]
    assert sorted(results(out)["id"].to_pylist()) == list(range(60))


def test_resume_refuses_results_of_another_seed(tmp_path: Path, bundle_dir: Path) -> None:
    cat = shards(tmp_path / "cat", files=1, rows=10)
    run(cat, tmp_path / "out", model=bundle_dir, seed=1, progress=False)
    with pytest.raises(StarcastError, match="cannot resume"):
        run(cat, tmp_path / "out", model=bundle_dir, seed=2, resume=True, progress=False)
    assert os.path.exists(tmp_path / "out/markers/shard-000.done")
