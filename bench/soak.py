"""Soak test of `starcast run` under faults, every outcome compared cell by cell with a clean run.

A synthetic survey of `--n` spectra in `--shards` shards gets a null id (shard 1), a repeated id
(shard 2) and one flipped flux byte (shard 3, rewritten uncompressed so that only the page checksum
can catch it). Then:
  1. reference: one uninterrupted local run;
  2. local: `--kills` SIGKILLs at random moments (each a few files further on, up to a second into
     the next file), each followed by `--resume`, until the run ends;
  3. ray (with `--ray`): the same on `--ray local` (each kill takes the driver's whole process group,
     so the local Ray instance dies with it);
  4. full disk (as root): a run into a tmpfs smaller than the results (exit 2 expected, no temporary
     file left), then the tmpfs grown and `--resume`.
Each scenario reports ids lost, ids duplicated and cells changed against the reference (exactly
for the local path; beyond float32 rounding, rtol 1e-5, for Ray, whose batch shapes differ).

Usage: python bench/soak.py --n 30000 --shards 10 --kills 2 --samples 8 [--ray] [--work DIR]
Writes bench/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from starcast.catalogs.synth import synth

RESULTS = Path(__file__).resolve().parent / "results"


def make_catalog(folder: Path, n: int, shards: int, seed: int) -> dict:
    """The survey with its three faults; returns what was planted where."""
    files = synth(n, folder, mode="random", seed=seed, shard_rows=-(-n // shards), snr=(20.0, 300.0))
    null_file, dup_file, flip_file = files[1], files[2], files[3]

    table = pq.read_table(null_file)
    ids = table["id"].to_pylist()
    null_id, ids[5] = ids[5], None
    _rewrite(null_file, table.set_column(0, pa.field("id", table.schema.field("id").type), pa.array(ids)))

    table = pq.read_table(dup_file)
    ids = table["id"].to_pylist()
    lost_to_dup, ids[10] = ids[10], ids[9]
    _rewrite(dup_file, table.set_column(0, "id", pa.array(ids, table.schema.field("id").type)))

    before = pq.read_table(flip_file)
    _rewrite(flip_file, before, compression="none")
    meta = pq.ParquetFile(flip_file).metadata.row_group(0)
    flux = next(c for c in map(meta.column, range(meta.num_columns)) if c.path_in_schema.startswith("flux"))
    at = flux.data_page_offset + flux.total_compressed_size // 2
    blob = bytearray(flip_file.read_bytes())
    blob[at] ^= 0x10
    flip_file.write_bytes(bytes(blob))
    try:  # pyarrow's default read does not verify page checksums
        silent = not pq.read_table(flip_file).equals(before)
        decodes_without_checksum = True
    except (OSError, pa.ArrowException):
        silent, decodes_without_checksum = False, False
    return {"null_id": {"file": null_file.name, "row": 5, "id_was": null_id},
            "duplicate_id": {"file": dup_file.name, "row": 10, "id_lost": lost_to_dup},
            "flipped_byte": {"file": flip_file.name, "offset": at,
                             "decodes_without_checksum": decodes_without_checksum, "silent": silent}}


def _rewrite(path: Path, table: pa.Table, compression: str = "zstd") -> None:
    pq.write_table(table, path, compression=compression, write_page_checksum=True, row_group_size=1024)


def command(cat: Path, out: Path, args, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "starcast", "run", str(cat), "--out", str(out), "--samples",
           str(args.samples), "--seed", "1", "--batch-size", str(args.batch_size), "--no-progress", *extra]
    return cmd


def run_once(cmd: list[str], kill_at: tuple[int, float] | None = None) -> dict:
    """One `starcast run` in its own process group. `kill_at` = (m, t): once the run's --out
    holds m completion markers, wait t more seconds (so the kill lands inside a file) and SIGKILL
    the whole group."""
    t0 = time.perf_counter()
    markers = Path(cmd[cmd.index("--out") + 1], "markers")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    done_at_kill = None
    if kill_at is not None:
        while proc.poll() is None and len(list(markers.glob("*.done"))) < kill_at[0]:
            time.sleep(0.05)
        time.sleep(kill_at[1])
        if proc.poll() is None:
            done_at_kill = len(list(markers.glob("*.done")))
            os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    return {"exit": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "killed": done_at_kill is not None, "files_done_at_kill": done_at_kill,
            "stderr_tail": err.decode(errors="replace").strip().splitlines()[-3:]}


def soak(cat: Path, out: Path, args, extra: tuple[str, ...], rng: random.Random) -> list[dict]:
    """`--kills` runs each killed a few files further than the last, then a run to the end."""
    attempts, done = [], 0
    for k in range(args.kills):
        done = min(args.shards - 2, done + rng.randint(1, max(1, (args.shards - 2) // args.kills)))
        cmd = command(cat, out, args, *extra, *(("--resume",) if k else ()))
        attempts.append(run_once(cmd, (done, rng.uniform(0.0, 1.0))))
    attempts.append(run_once(command(cat, out, args, *extra, *(("--resume",) if args.kills else ()))))
    return attempts


def compare(reference: Path, out: Path, rtol: float) -> dict:
    """Ids lost, ids duplicated, cells changed in `out` against `reference` (per results file; a
    cell is changed if it differs at all, or for rtol > 0 by more than rtol relative)."""
    lost = duplicated = changed = rows = 0
    files = sorted(p.name for p in (reference / "results").glob("*.parquet"))
    for name in files:
        a = pq.read_table(reference / "results" / name)
        path = out / "results" / name
        b = pq.read_table(path) if path.exists() else a.slice(0, 0)
        rows += a.num_rows
        ids_a, ids_b = Counter(a["id"].to_pylist()), Counter(b["id"].to_pylist())
        lost += sum((ids_a - ids_b).values())
        duplicated += sum((ids_b - ids_a).values())
        if a["id"].to_pylist() != b["id"].to_pylist():
            continue  # rows lost or extra: counted above
        for col in a.column_names:
            if pa.types.is_floating(a.schema.field(col).type):
                x, y = a[col].to_numpy(zero_copy_only=False), b[col].to_numpy(zero_copy_only=False)
                same = np.isclose(x, y, rtol=rtol, atol=0.0, equal_nan=True) if rtol else (
                    (x == y) | (np.isnan(x) & np.isnan(y)))
                changed += int((~same).sum())
            else:
                changed += sum(u != v for u, v in zip(a[col].to_pylist(), b[col].to_pylist(), strict=True))
    stray = sorted(p.name for p in (out / "results").glob("*.parquet") if p.name not in files)
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    return {"rows_compared": rows, "ids_lost": lost, "ids_duplicated": duplicated, "cells_changed": changed,
            "stray_results_files": stray, "temporary_files_left": leftovers}


def full_disk(cat: Path, work: Path, reference: Path, args) -> dict:
    """A run into a tmpfs smaller than the results, then the tmpfs grown and --resume."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    need = sum(p.stat().st_size for p in (reference / "results").glob("*.parquet"))
    mnt = work / "tmpfs"
    mnt.mkdir()
    small = max(64 * 1024, need * 4 // 10)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={small}", "tmpfs", str(mnt)], check=True)
    try:
        first = run_once(command(cat, mnt / "out", args))
        manifest = (mnt / "out/run-manifest.json")
        state = {"manifest_written": manifest.exists(),
                 "temporary_files_left": sorted(str(p.relative_to(mnt)) for p in mnt.rglob(".*partial"))}
        subprocess.run(["mount", "-o", f"remount,size={need * 3}", str(mnt)], check=True)
        second = run_once(command(cat, mnt / "out", args, "--resume"))
        return {"tmpfs_bytes": small, "results_bytes": need, "full": first, "after_full": state,
                "resumed": second, "compare": compare(reference, mnt / "out", rtol=0.0)}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--kills", type=int, default=2, help="SIGKILLs per scenario, each followed by --resume")
    ap.add_argument("--samples", type=int, default=8, help="MC-dropout samples (fewer: a faster soak)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--ray", action="store_true", help="also soak the --ray local path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="starcast-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python bench/soak.py " + " ".join(sys.argv[1:]),
                    "config": {**vars(args), "work": str(work)}, "load_average_at_start": os.getloadavg()}
    try:
        cat = work / "catalog"
        t0 = time.perf_counter()
        report["faults"] = make_catalog(cat, args.n, args.shards, args.seed)
        report["synth_s"] = round(time.perf_counter() - t0, 1)
        ref = run_once(command(cat, work / "reference", args))
        report["reference"] = ref | {"totals": json.loads((work / "reference/run-manifest.json").read_text())[
            "totals"]}
        report["local"] = {"attempts": soak(cat, work / "local", args, (), rng)}
        report["local"]["compare"] = compare(work / "reference", work / "local", rtol=0.0)
        if args.ray:
            ray_ref = run_once(command(cat, work / "ray-clean", args, "--ray", "local"))
            clean = compare(work / "reference", work / "ray-clean", 1e-5)
            attempts = soak(cat, work / "ray", args, ("--ray", "local"), rng)
            report["ray"] = {"clean": ray_ref | {"compare": clean}, "attempts": attempts}
            report["ray"]["compare"] = compare(work / "reference", work / "ray", rtol=1e-5)
        report["full_disk"] = full_disk(cat, work, work / "reference", args)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "soak.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(r: dict) -> str:
    flip = r["faults"]["flipped_byte"]
    lines = [f"# soak: `{r['command']}`", "",
             f"{r['config']['n']} spectra in {r['config']['shards']} shards; faults planted: null id, "
             f"repeated id, flipped flux byte ({flip['file']}: decodes without checksum: "
             f"{flip['decodes_without_checksum']}, silently different: {flip['silent']}). "
             f"Reference run: exit {r['reference']['exit']}, "
             f"{r['reference']['wall_s']} s, totals {r['reference']['totals']}.", "",
             "| scenario | runs (exit codes) | rows compared | ids lost | ids duplicated | cells changed "
             "| temp files left |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    scenarios = [("local, kills + resume", r["local"]["attempts"], r["local"]["compare"])]
    if "ray" in r:
        scenarios += [("ray local, clean", [r["ray"]["clean"]], r["ray"]["clean"]["compare"]),
                      ("ray local, kills + resume", r["ray"]["attempts"], r["ray"]["compare"])]
    if "compare" in r["full_disk"]:
        scenarios.append(("full disk, then resume", [r["full_disk"]["full"], r["full_disk"]["resumed"]],
                          r["full_disk"]["compare"]))
    for name, attempts, c in scenarios:
        codes = ", ".join(f"killed ({a['files_done_at_kill']} files done)" if a["killed"] else str(a["exit"])
                          for a in attempts)
        lines.append(f"| {name} | {codes} | {c['rows_compared']} | {c['ids_lost']} | {c['ids_duplicated']} | "
                     f"{c['cells_changed']} | {len(c['temporary_files_left'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
